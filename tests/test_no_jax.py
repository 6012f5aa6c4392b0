"""Without the `train` extra: extraction, synthetic slides, evaluation and FROC work; the model
commands say which extra to install, in one line.

A child interpreter hides the model stack (jax, flax, optax, orbax, h5py) behind an import hook, as if
only the core dependencies were installed.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

CHILD = textwrap.dedent(
    r"""
    import contextlib, io, sys
    from importlib.abc import MetaPathFinder

    HIDDEN = {"jax", "jaxlib", "flax", "optax", "orbax", "h5py", "keras"}

    class Hide(MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] in HIDDEN:
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    sys.meta_path.insert(0, Hide())

    from pathlib import Path
    import numpy as np
    import wsitile
    from wsitile.augment import draw_params
    from wsitile.cli import main
    from wsitile.heatmap import Heatmap, save_heatmap
    from wsitile.synth import write_slide

    tmp = Path(sys.argv[1])
    data = tmp / "data"
    data.mkdir()
    write_slide(data / "tumor_001.tif", 4096, seed=7, tumour=True)

    def run(*argv):
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main([str(a) for a in argv])
        return code, out.getvalue(), err.getvalue()

    # Extraction: the Python API and the command.
    loader = wsitile.Loader([(data / "tumor_001.tif", data / "tumor_001_mask.tif")], levels=(2, 3),
                            batch_size=16, shuffle=True, seed=0, augment=True)
    with loader:
        batch = next(iter(loader))
    assert batch["images"].shape == (16, 2, 80, 80, 3), batch["images"].shape
    params = draw_params(wsitile.AugmentConfig(), seed=0, epoch=0, sample_indices=batch["sample_index"])
    aug = wsitile.augment_batch(batch["images"], **params)
    assert aug.shape == batch["images"].shape
    code, out, err = run("extract", data / "tumor_001.tif", "--mask", data / "tumor_001.xml", "--out", tmp / "t.npz")
    assert code == 0 and (tmp / "t.npz").is_file(), err

    # Evaluation and FROC of a heatmap made without a model.
    grid = wsitile.build_grid(data / "tumor_001.tif", data / "tumor_001_mask.tif")
    probs = np.clip(0.2 + 0.6 * grid.labels, 0, 1).astype(np.float32)
    (tmp / "pred").mkdir()
    save_heatmap(tmp / "pred" / "heatmap.npz", Heatmap.from_grid(grid, probs))
    code, out, err = run("evaluate", tmp / "pred" / "heatmap.npz", "--mask", data / "tumor_001_mask.tif",
                         "--out", tmp / "eval")
    assert code == 0 and (tmp / "eval" / "metrics.json").is_file(), err
    code, out, err = run("froc", tmp / "pred" / "heatmap.npz", "--masks-dir", data, "--out", tmp / "froc")
    assert code == 0 and (tmp / "froc" / "metrics.json").is_file(), err

    # The model commands: one line naming the extra, exit status 1.
    for argv in (["train", data, "--out", tmp / "run", "--steps", "1"],
                 ["predict", data / "tumor_001.tif", "--checkpoint", tmp / "run", "--out", tmp / "p"],
                 ["demo", "--out", tmp / "demo"]):
        code, out, err = run(*argv)
        assert code == 1, (argv, code, err)
        assert err.count("\n") == 1 and "pip install 'wsitile[train]'" in err, err
        print(err, end="")

    loaded = sorted(m for m in sys.modules if m.partition(".")[0] in HIDDEN)
    assert not loaded, loaded
    print("ok")
    """
)


def test_core_without_the_train_extra(tmp_path):
    result = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path)], capture_output=True, text=True,
                            cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[-1] == "ok"
    assert lines[0].startswith("wsitile train: error: `wsitile train` needs the model stack: pip install 'wsitile[train]'")
