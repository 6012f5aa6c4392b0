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
