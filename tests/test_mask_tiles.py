"""Centre labels straight from mask tiles (wsitile.mask_tiles) against OpenSlide (`_core.mask_any`)
and against NumPy on the whole level-0 mask."""

from __future__ import annotations

import imagecodecs
import numpy as np
import pytest
import tifffile

import wsitile
from wsitile import _core
from wsitile.mask_tiles import any_in_rects
from wsitile.slide import Slide

TILE = 256


def numpy_any(level0: np.ndarray, rects: np.ndarray) -> np.ndarray:
    h, w = level0.shape[:2]
    out = []
    for x0, y0, x1, y1 in rects:
        x0, x1, y0, y1 = max(x0, 0), min(x1, w), max(y0, 0), min(y1, h)
        out.append(x1 > x0 and y1 > y0 and bool(level0[y0:y1, x0:x1].any()))
    return np.array(out, dtype=np.uint8)


def random_rects(rng: np.random.Generator, w: int, h: int, n: int, near: np.ndarray | None = None) -> np.ndarray:
    """Rectangles of 1-700 px, some crossing or beyond the edges, some empty, many near tumour."""
    size = rng.integers(1, 700, (n, 2))
    x0 = rng.integers(-300, w + 50, n)
    y0 = rng.integers(-300, h + 50, n)
    if near is not None and len(near):  # half of them around tumour pixels: partial hits matter most
        pick = near[rng.integers(0, len(near), n // 2)]
        x0[: n // 2] = pick[:, 1] - rng.integers(0, 400, n // 2)
        y0[: n // 2] = pick[:, 0] - rng.integers(0, 400, n // 2)
    rects = np.stack([x0, y0, x0 + size[:, 0], y0 + size[:, 1]], axis=1).astype(np.int64)
    rects[:5, 2] = rects[:5, 0]  # empty
    return rects


def test_synthetic_mask_matches_openslide_and_numpy(tumour_slide):
    mask = tumour_slide["mask"]
    level0 = tifffile.imread(mask, key=0)
    h, w = level0.shape[:2]
    rng = np.random.default_rng(0)
    rects = random_rects(rng, w, h, 3000, near=np.argwhere(level0[::16, ::16] > 0) * 16)
    fast = any_in_rects(mask, rects, w, h, threads=2)
    assert fast is not None and fast.dtype == np.uint8
    assert 100 < int(fast.sum()) < len(rects) - 100  # both answers well represented
    np.testing.assert_array_equal(fast, numpy_any(level0, rects))
    np.testing.assert_array_equal(fast, _core.mask_any(Slide(mask)._slide, rects, 2))


def write_mask(path, image: np.ndarray, *, compression: str = "zlib", photometric: str = "minisblack") -> None:
    """A tiled mask whose edge tiles carry non-zero padding beyond the image (which must not count)."""
    h, w = image.shape[:2]
    tiles = []
    for ty in range(0, h, TILE):
        for tx in range(0, w, TILE):
            tile = np.full((TILE, TILE) + image.shape[2:], 255, np.uint8)
            part = image[ty : ty + TILE, tx : tx + TILE]
            tile[: part.shape[0], : part.shape[1]] = part
            if compression == "zlib":
                tiles.append(bytes(imagecodecs.zlib_encode(tile)))
            else:
                tiles.append(bytes(imagecodecs.jpeg8_encode(np.ascontiguousarray(tile), level=90)))
    with tifffile.TiffWriter(path) as tw:
        tw.write(iter(tiles), shape=image.shape, dtype=np.uint8, tile=(TILE, TILE), compression=compression,
                 photometric=photometric)


@pytest.mark.parametrize("channels", [1, 3])
def test_edge_tiles_padding_and_rgb(tmp_path, channels):
    rng = np.random.default_rng(channels)
    image = np.zeros((700, 1000) + ((3,) if channels == 3 else ()), np.uint8)
    for _ in range(6):  # small tumours, some on the right and bottom edge tiles
        x, y = rng.integers(0, 1000 - 40), rng.integers(0, 700 - 40)
        image[y : y + rng.integers(1, 40), x : x + rng.integers(1, 40)] = 200
    image[690:, 990:] = 255  # the bottom-right corner, next to the padding
    path = tmp_path / "mask.tif"
    write_mask(path, image, photometric="minisblack" if channels == 1 else "rgb")
    rects = random_rects(rng, 1000, 700, 2000, near=np.argwhere(image.reshape(700, 1000, -1).any(axis=2)))
    fast = any_in_rects(path, rects, 1000, 700, threads=2)
    assert fast is not None and fast.sum() > 50
    np.testing.assert_array_equal(fast, numpy_any(image, rects))
    np.testing.assert_array_equal(fast, _core.mask_any(Slide(path)._slide, rects, 1))
    beyond = np.array([[1000, 0, 1300, 700], [0, 700, 1000, 900]])  # only padding: no tumour
    np.testing.assert_array_equal(any_in_rects(path, beyond, 1000, 700), [0, 0])


def test_lossy_or_unknown_masks_go_through_openslide(tmp_path, tumour_slide):
    image = np.zeros((512, 512), np.uint8)
    image[100:300, 200:260] = 255
    jpeg = tmp_path / "jpeg_mask.tif"
    write_mask(jpeg, image, compression="jpeg")
    assert any_in_rects(jpeg, np.array([[0, 0, 10, 10]]), 512, 512) is None
    assert any_in_rects(tumour_slide["mask"], np.array([[0, 0, 10, 10]]), 100, 100) is None  # size mismatch
    # build_grid still labels such a mask, through OpenSlide.
    slide = tmp_path / "slide.tif"
    tifffile.imwrite(slide, np.full((512, 512, 3), 200, np.uint8), tile=(TILE, TILE), compression="jpeg")
    grid = wsitile.build_grid(slide, jpeg, levels=(0,), window=80, center=50, stride=80, tissue_threshold=None)
    level0 = np.asarray(Slide(jpeg).read_region((0, 0), 0, (512, 512)))[..., :3].any(axis=2)
    o = 15
    expected = [level0[y + o : y + o + 50, x + o : x + o + 50].any() for x, y in grid.xy]
    np.testing.assert_array_equal(grid.labels, expected)
    assert 0 < grid.labels.sum() < len(grid)


def test_corrupt_mask_tile_falls_back_to_openslide_error(tmp_path, tumour_slide, caplog):
    """A mask tile that does not decode: labelling goes through OpenSlide, which names the mask."""
    path = tmp_path / "tumor_001_mask.tif"
    path.write_bytes(tumour_slide["mask"].read_bytes())
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        big = int(np.argmax(page.databytecounts))  # a tile with tumour edges: not shared with others
        offset, count = page.dataoffsets[big], page.databytecounts[big]
    with open(path, "r+b") as fh:
        fh.seek(offset)
        fh.write(b"\x00" * count)
    with pytest.raises(RuntimeError, match=str(path)):
        wsitile.build_grid(tumour_slide["slide"], path, tissue_threshold=None, threads=1)
    assert any("reading mask tiles failed" in r.getMessage() for r in caplog.records)
