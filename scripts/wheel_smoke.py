#!/usr/bin/env python3
"""Smoke test of an installed wsitile wheel (with its `train` extra): import, synth, extract, augment,
one training step, predict, evaluate.

Run by scripts/wheel_smoke.sh in a fresh virtual environment, and by cibuildwheel's test-command on
every wheel it builds. It refuses to test a source tree or an editable install (the model package
must sit inside the installed wsitile package, as the wheel lays it out), unless --allow-source.
Everything is written to a temporary folder; a CPU run takes about a minute, most of it compiling.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

T0 = time.perf_counter()


def step(message: str) -> None:
    print(f"[{time.perf_counter() - T0:6.1f} s] {message}", flush=True)


def run(*argv: object) -> None:
    """A `wsitile` command through the installed console script; its output is shown, failure raises."""
    exe = shutil.which("wsitile", path=str(Path(sys.executable).parent)) or shutil.which("wsitile")
    assert exe, "the wsitile console script is not installed"
    cmd = [exe, *map(str, argv)]
    step("$ wsitile " + " ".join(cmd[1:]))
    subprocess.run(cmd, check=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--allow-source", action="store_true", help="also run against a source/editable install")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = parser.parse_args()

    import numpy as np

    import wsitile
    import wsitile.models
    from wsitile import _core
    from wsitile.augment import AugmentConfig, draw_params
    from wsitile.heatmap import load_heatmap
    from wsitile.synth import write_slide

    import jax

    package = Path(wsitile.__file__).parent
    step(f"wsitile {wsitile.__version__} from {package} (Python {sys.version.split()[0]}, JAX {jax.__version__}, "
         f"{jax.default_backend()})")
    installed = Path(wsitile.models.__file__).parent.parent == package
    if not installed and not args.allow_source:
        print(f"{package}: not an installed wheel (wsitile.models is {wsitile.models.__file__})", file=sys.stderr)
        return 2
    assert wsitile.__version__ != "0+unknown", "no installed metadata"
    for name in ("_core.pyi", "py.typed"):
        assert (package / name).is_file(), f"{name} is not installed"
    if installed:
        assert Path(_core.__file__).parent == package, _core.__file__

    work = Path(tempfile.mkdtemp(prefix="wsitile-smoke-"))
    try:
        run("--version")
        slide, mask = work / "tumor_001.tif", work / "tumor_001_mask.tif"
        write_slide(slide, 4096, seed=7, tumour=True)  # also tumor_001_mask.tif and tumor_001.xml
        step(f"synth: {slide.name} ({slide.stat().st_size // 1024} KiB)")

        loader = wsitile.Loader([(slide, mask)], levels=(2, 3), batch_size=16, shuffle=True, seed=0)
        with loader:
            batch = next(iter(loader))
        images = batch["images"]
        assert images.shape == (16, 2, 80, 80, 3) and images.dtype == np.uint8, (images.shape, images.dtype)
        assert images.std() > 5, "blank windows"
        # Pillow (a dependency of matplotlib and scikit-image) brings the libjpeg the direct path loads.
        assert loader.decoders == [("libjpeg", "libjpeg")], loader.decoders
        reference = wsitile.Loader([(slide, mask)], levels=(2, 3), batch_size=16, shuffle=True, seed=0,
                                   decoder="openslide")
        with reference:
            assert np.array_equal(next(iter(reference))["images"], images), "libjpeg and OpenSlide pixels differ"
        step(f"extract (OpenSlide {_core.openslide_version()}, JPEG tiles decoded by libjpeg): "
             f"{loader.num_samples} windows, {int(loader.labels.sum())} tumour; one batch {images.shape}")

        params = draw_params(AugmentConfig(), seed=0, epoch=0, sample_indices=batch["sample_index"])
        augmented = wsitile.augment_batch(images, **params)
        assert augmented.shape == images.shape and augmented.dtype == np.float32
        assert 0.0 <= float(augmented.min()) and float(augmented.max()) <= 1.0
        step("augment: ok")

        run("train", slide, "--out", work / "run", "--width", "0.125", "--batch-size", "8", "--steps", "1")
        assert (work / "run" / "config.json").is_file() and (work / "run" / "checkpoints").is_dir()
        run("predict", slide, "--checkpoint", work / "run", "--out", work / "pred", "--batch-size", "32")
        heatmap = load_heatmap(work / "pred" / "heatmap.npz")
        assert len(heatmap) > 0 and np.isfinite(heatmap.probs).all()
        run("evaluate", work / "pred" / "heatmap.npz", "--mask", mask, "--out", work / "eval")
        assert (work / "eval" / "metrics.json").is_file()
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    step("wheel smoke test passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
