"""`wsitile demo` end to end, as the README's first command runs it (the slowest test: ~4 minutes)."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("jax")

from wsitile.cli import main  # noqa: E402
from wsitile.heatmap import load_heatmap  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_demo_learns_the_synthetic_tumours(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("auc", "threshold", "sensitivity", "specificity", "recall", "precision", "froc", "slide_auc"):
        assert key in metrics, key
        assert metrics[key] is None or 0 <= metrics[key] <= 1, (key, metrics[key])
    assert metrics["auc"] >= 0.95, metrics  # the held-out tumour slide, window level
    assert "AUC" in printed and "FROC" in printed

    # The window metrics are those of the held-out heatmap against its true labels.
    from sklearn.metrics import roc_auc_score

    from wsitile.grid import build_grid

    heatmap = load_heatmap(out / "predictions" / "tumor_004" / "heatmap.npz")
    grid = build_grid(heatmap.slide, out / "slides" / "tumor_004_mask.tif", levels=tuple(heatmap.levels),
                      window=heatmap.window, center=heatmap.center, stride=heatmap.stride)
    np.testing.assert_array_equal(grid.coords, heatmap.coords)
    assert roc_auc_score(grid.labels, heatmap.probs) == pytest.approx(metrics["auc"], abs=1e-9)

    report = (out / "report.md").read_text()
    for picture in ("heatmap_vs_truth.png", "roc.png", "froc.png", "training.png",
                    "predictions/tumor_004/heatmap.png"):
        assert picture in report
        assert (out / picture).read_bytes()[:8] == PNG, picture


def test_demo_refuses_a_folder_with_a_run_before_any_work(tmp_path, capsys, monkeypatch):
    """A second demo into the same folder fails at once, in one line naming the folder, with demo's
    own advice (it has no --resume), before making slides or training."""
    import orbax.checkpoint as ocp

    from wsitile import train

    out = tmp_path / "demo"
    mngr = train.checkpoint_manager(out)  # a finished run's checkpoint, as a first demo leaves it
    try:
        mngr.save(1, args=ocp.args.Composite(state=ocp.args.StandardSave({"x": np.zeros(2, np.float32)})))
        mngr.wait_until_finished()
    finally:
        mngr.close()

    def no_training(*args, **kwargs):
        raise AssertionError("demo trained into a folder that holds a run")

    monkeypatch.setattr(train, "fit", no_training)
    assert main(["demo", "--out", str(out)]) == 1
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("wsitile demo: error: ") and str(out) in lines[0], lines[0]
    assert "--resume" not in lines[0] and "another --out" in lines[0], lines[0]
    assert not (out / "slides").exists()  # refused before the synthetic slides
    assert train.find_checkpoint(out) == (out, 1)  # the earlier run is left as it was

    # A folder of someone else's files (slides/tumor_001.tif would be replaced): refused the same way.
    other = tmp_path / "mine"
    (other / "slides").mkdir(parents=True)
    (other / "slides" / "tumor_001.tif").write_bytes(b"my slide")
    assert main(["demo", "--out", str(other)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not an empty folder" in err and str(other) in err, err
    assert (other / "slides" / "tumor_001.tif").read_bytes() == b"my slide"


def test_demo_reruns_into_the_empty_folders_a_failed_one_left(tmp_path, capsys, monkeypatch):
    """A demo that failed making its slides (a full disk) leaves an empty slides/: the rerun goes ahead
    (it was refused as "not an empty folder"). Stopped here at the slides, which it reached."""
    from wsitile import synth

    out = tmp_path / "demo"
    (out / "slides").mkdir(parents=True)

    def reached(*args, **kwargs):
        raise OSError(28, "the slides, reached")

    monkeypatch.setattr(synth, "synth_dataset", reached)
    assert main(["demo", "--out", str(out)]) == 1
    assert capsys.readouterr().err.strip().endswith("the slides, reached")
    (out / "slides" / "link").symlink_to(tmp_path)  # a link is something
    assert main(["demo", "--out", str(out)]) == 1
    assert "is not an empty folder" in capsys.readouterr().err


def test_demo_results_are_written_together(tmp_path, monkeypatch, disk_full, earlier_files):
    """metrics.json and report.md (which shows those metrics): a report that cannot be written
    leaves both files as they were, not new metrics beside an old report."""
    from wsitile import demo

    earlier = earlier_files(tmp_path, ["metrics.json", "report.md"])
    write = demo.atomic_write
    monkeypatch.setattr(demo, "atomic_write", lambda path, fn: disk_full() if path.name == "report.md" else write(path, fn))
    metrics = dict.fromkeys((*demo.SEED_KEYS, "froc", "slide_auc"), 0.5) | dict(n_windows=10, n_tumour=2, seconds=1.0)
    with pytest.raises(OSError, match="No space left"):
        demo._write_results(tmp_path, metrics, "tumor_001.tif", ["tumor_001.tif"], [])
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == earlier
    monkeypatch.setattr(demo, "atomic_write", write)
    demo._write_results(tmp_path, metrics, "tumor_001.tif", ["tumor_001.tif"], [])
    assert json.loads((tmp_path / "metrics.json").read_text()) == metrics
    assert "| froc | 0.50000 |" in (tmp_path / "report.md").read_text()
