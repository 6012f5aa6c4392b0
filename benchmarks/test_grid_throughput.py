"""The tissue grid of a Camelyon-size slide: what `wsitile predict` (and `train`, per slide) builds
before its first window. The slide is the GPU suite's mosaic (98,304 x 196,608 px, ~25% tissue,
`benchmarks.gpu.inference.mosaic_slide`; ~30 s to write); its tissue level is 6,144 x 3,072 px.

Rates are the grid's windows (48,309) per second of the step timed. Baselines in the same run: the tissue mask through skimage's rgb2hsv
saturation image and threshold_otsu on it (what the code did before the (max, min) table), and the
float64 table lookup with threshold_otsu on the image (before the histogram).

    pytest benchmarks/test_grid_throughput.py --benchmark-only
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import wsitile
from wsitile import tissue

from .conftest import RATIOS, record

ROUNDS = 3
WINDOWS = 48_309  # tissue windows of the mosaic at the seed's settings (deterministic generator)
RATIOS += [
    ("tissue mask (max, min histogram)", "tissue mask (rgb2hsv + otsu on the image)"),
    ("tissue mask (max, min histogram)", "tissue mask (float64 table + otsu on the image)"),
    ("tissue mask (max, min histogram)", "tissue mask (max, min histogram, scipy opening and closing)"),
    ("Loader over 4 Camelyon-size slides, 2 threads", "Loader over 4 Camelyon-size slides, 1 thread"),
    ("tissue level read (Slide.read_level, JPEG tiles on 2 threads)", "tissue level read (OpenSlide read_region)"),
]


@pytest.fixture(scope="module")
def camelyon_size(tmp_path_factory) -> Path:
    from wsitile.synth import write_slide

    from .gpu.inference import mosaic_slide

    root = tmp_path_factory.mktemp("camelyon_size")
    write_slide(root / "source.tif", 16384, seed=7, tumour=False)
    mosaic_slide(root / "camelyon.tif", root / "source.tif", 6, 12, 0.25)
    return root / "camelyon.tif"


def _mask_rgb2hsv(rgb: np.ndarray) -> np.ndarray:
    from skimage.color import rgb2hsv
    from skimage.filters import threshold_otsu

    sat = rgb2hsv(rgb)[..., 1]
    return tissue.clean_mask(sat > max(float(threshold_otsu(sat)), tissue.MIN_SATURATION))


def _mask_table(rgb: np.ndarray) -> np.ndarray:
    from skimage.filters import threshold_otsu

    sat = tissue.saturation(rgb)
    return tissue.clean_mask(sat > max(float(threshold_otsu(sat)), tissue.MIN_SATURATION))


def _mask_histogram(rgb: np.ndarray) -> np.ndarray:
    return tissue.clean_mask(tissue.saturation_mask(rgb))


def _mask_scipy_morphology(rgb: np.ndarray) -> np.ndarray:
    """The histogram mask cleaned with scipy's binary_opening and binary_closing (before tissue.erode
    and tissue.dilate)."""
    from scipy import ndimage

    raw = tissue.saturation_mask(rgb)
    if not raw.any():
        return raw
    cross = ndimage.generate_binary_structure(2, 1)
    opened = ndimage.binary_opening(raw, structure=cross)
    return tissue.fill_holes(ndimage.binary_closing(opened, structure=cross, iterations=2, border_value=0), cross)


@pytest.fixture(scope="module")
def tissue_level(camelyon_size) -> np.ndarray:
    slide = wsitile.Slide(camelyon_size)
    level = tissue.tissue_level(slide, 2, 80)
    return slide.read_region((0, 0), level, slide.level_dimensions[level])


@pytest.mark.parametrize("method", ["rgb2hsv + otsu on the image", "float64 table + otsu on the image",
                                    "max, min histogram, scipy opening and closing", "max, min histogram"])
def test_tissue_mask(benchmark, tissue_level, method):
    """The mask of the tissue level (read once, outside the timing): saturation, Otsu, morphology."""
    fn = {"rgb2hsv + otsu on the image": _mask_rgb2hsv, "float64 table + otsu on the image": _mask_table,
          "max, min histogram, scipy opening and closing": _mask_scipy_morphology,
          "max, min histogram": _mask_histogram}[method]
    mask = benchmark.pedantic(fn, args=(tissue_level,), rounds=ROUNDS, iterations=1)
    np.testing.assert_array_equal(mask, _mask_histogram(tissue_level))  # every method, the same mask
    record(benchmark, f"tissue mask ({method})", WINDOWS)


@pytest.mark.parametrize("how", ["OpenSlide read_region", "Slide.read_level, JPEG tiles on 2 threads"])
def test_tissue_level_read(benchmark, camelyon_size, how):
    """The tissue level (6,144 x 3,072 px) read whole: OpenSlide's read_region (one thread, the
    baseline) against read_level (its JPEG tiles decoded straight from the file); same pixels."""
    slide = wsitile.Slide(camelyon_size)
    level = tissue.tissue_level(slide, 2, 80)
    if how.startswith("OpenSlide"):
        fn = lambda: slide.read_region((0, 0), level, slide.level_dimensions[level])  # noqa: E731
    else:
        fn = lambda: slide.read_level(level, threads=2)  # noqa: E731
    rgb = benchmark.pedantic(fn, rounds=ROUNDS, iterations=1)
    np.testing.assert_array_equal(rgb, slide.read_region((0, 0), level, slide.level_dimensions[level]))
    record(benchmark, f"tissue level read ({how})", WINDOWS)


def test_build_grid(benchmark, camelyon_size):
    """The whole grid: tissue level read, mask, integral image, windows (seed settings, 80 px)."""
    grid = benchmark.pedantic(wsitile.build_grid, args=(camelyon_size, None), rounds=ROUNDS, iterations=1)
    assert len(grid) == WINDOWS
    record(benchmark, "build_grid, Camelyon-size slide (80 px, levels 2+3)", len(grid))


@pytest.mark.parametrize("threads", [1, 2])
def test_loader_opens_four_slides(benchmark, camelyon_size, threads):
    """`wsitile.Loader` over four Camelyon-size slides (the mosaic four times): grids, masks and tile
    tables, which the Loader prepares for several slides at once when it has threads (1: one after
    the other, the baseline)."""

    def open_loader():
        wsitile.Loader([(camelyon_size, None)] * 4, threads=threads).close()

    benchmark.pedantic(open_loader, rounds=ROUNDS, iterations=1)
    record(benchmark, f"Loader over 4 Camelyon-size slides, {threads} thread{'s' if threads > 1 else ''}", 4 * WINDOWS)
