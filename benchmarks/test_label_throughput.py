"""Centre labelling from the mask TIFF on the 16,384 px benchmark slide (levels 2/3 grid, 2,601
windows, tissue filter off): from the mask's tiles (wsitile.mask_tiles, what build_grid uses) against
OpenSlide read_region of every centre rectangle (`_core.mask_any`, the fallback) and against what a
user would write (read the whole level-0 mask with tifffile, max-pool to level 2, slice each centre).

    pytest benchmarks/test_label_throughput.py --benchmark-only
"""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

import wsitile
from wsitile import _core
from wsitile.grid import centre_rects
from wsitile.mask_tiles import any_in_rects
from wsitile.slide import Slide

from .conftest import record

ROUNDS = 3


@pytest.fixture(scope="module")
def setup(bench_slide):
    grid = wsitile.build_grid(bench_slide["slide"], None, tissue_threshold=None)
    rects = centre_rects(grid.xy, grid.window, grid.center, grid.downsamples[0])
    truth = wsitile.build_grid(bench_slide["slide"], bench_slide["mask"], tissue_threshold=None).labels
    assert truth.sum() > 0
    return str(bench_slide["mask"]), grid, rects, truth


@pytest.mark.parametrize("threads", [1, 2])
def test_mask_tiles(benchmark, setup, threads):
    mask, grid, rects, truth = setup
    labels = benchmark.pedantic(any_in_rects, args=(mask, rects, 16384, 16384, threads), rounds=ROUNDS, iterations=1)
    np.testing.assert_array_equal(labels, truth)
    record(benchmark, f"labels from mask tiles, {threads} thread{'s' if threads > 1 else ''}", len(rects))


def test_openslide_mask_any(benchmark, setup):
    mask, grid, rects, truth = setup
    handle = Slide(mask)._slide
    labels = benchmark.pedantic(_core.mask_any, args=(handle, rects, 1), rounds=ROUNDS, iterations=1)
    np.testing.assert_array_equal(labels, truth)
    record(benchmark, "labels through OpenSlide, 1 thread", len(rects))


def test_numpy_whole_mask(benchmark, setup):
    mask, grid, rects, truth = setup

    def label() -> np.ndarray:
        level0 = tifffile.imread(mask, key=0) > 0
        d = 4
        lb = level0.reshape(level0.shape[0] // d, d, level0.shape[1] // d, d).max(axis=(1, 3))
        o = (grid.window - grid.center) // 2
        return np.array([lb[y + o : y + o + grid.center, x + o : x + o + grid.center].any() for x, y in grid.xy],
                        dtype=np.uint8)

    labels = benchmark.pedantic(label, rounds=ROUNDS, iterations=1)
    np.testing.assert_array_equal(labels, truth)
    record(benchmark, "labels with NumPy on the whole level-0 mask", len(rects))
