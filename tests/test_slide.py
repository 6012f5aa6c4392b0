"""wsitile.Slide: metadata and read_region against openslide-python, and hostile slide files."""

from __future__ import annotations

import os
import shutil

import numpy as np
import openslide
import pytest
import tifffile

import wsitile


def openslide_rgba(osr: openslide.OpenSlide, location, level: int, size) -> np.ndarray:
    return np.asarray(osr.read_region(tuple(int(v) for v in location), int(level), tuple(int(v) for v in size)))


def openslide_rgb(osr: openslide.OpenSlide, location, level: int, size) -> np.ndarray:
    """The oracle: OpenSlide's RGBA, RGB where opaque and white where transparent."""
    rgba = openslide_rgba(osr, location, level, size)
    alpha = rgba[..., 3]
    assert np.isin(alpha, (0, 255)).all(), "this region has partially transparent pixels"
    return np.where((alpha == 255)[..., None], rgba[..., :3], np.uint8(255)).astype(np.uint8)


def assert_matches_openslide(got: np.ndarray, osr: openslide.OpenSlide, location, level: int, size) -> None:
    """Exact where OpenSlide's alpha is 0 or 255; elsewhere (sub-pixel edge of a level-0 location that
    is not a multiple of the downsample) OpenSlide's pixel composited over white, within rounding."""
    rgba = openslide_rgba(osr, location, level, size)
    alpha = rgba[..., 3:].astype(np.int32)
    solid = (alpha[..., 0] == 0) | (alpha[..., 0] == 255)
    expected = np.where(alpha == 255, rgba[..., :3], 255)
    np.testing.assert_array_equal(got[solid], expected[solid], err_msg=f"{location} {level} {size}")
    over_white = rgba[..., :3].astype(np.int32) * alpha / 255.0 + (255 - alpha)
    np.testing.assert_allclose(got[~solid], over_white[~solid], atol=2.5, err_msg=f"{location} {level} {size}")


@pytest.fixture(scope="module")
def pair(tumour_slide):
    osr = openslide.OpenSlide(str(tumour_slide["slide"]))
    yield wsitile.Slide(tumour_slide["slide"]), osr
    osr.close()


def test_metadata_matches_openslide(pair, tumour_slide):
    slide, osr = pair
    assert slide.level_count == osr.level_count == 5
    assert slide.level_dimensions == [tuple(d) for d in osr.level_dimensions]
    assert slide.dimensions == (8192, 8192)
    assert slide.level_dimensions == [(8192 >> k, 8192 >> k) for k in range(5)]
    assert slide.level_downsamples == pytest.approx(list(osr.level_downsamples))
    assert slide.level_downsamples == [1.0, 2.0, 4.0, 8.0, 16.0]
    assert slide.mpp == pytest.approx((0.243, 0.243))
    assert slide.get_property("openslide.mpp-x") == osr.properties["openslide.mpp-x"]
    assert slide.get_property("no.such.property") is None
    assert slide.path == os.fspath(tumour_slide["slide"])
    assert slide.vendor == osr.properties["openslide.vendor"]


def test_path_like_and_str_accepted(tumour_slide):
    assert wsitile.Slide(str(tumour_slide["slide"])).dimensions == wsitile.Slide(tumour_slide["slide"]).dimensions


def _regions(rng: np.random.Generator, dims, downsamples, count: int):
    """Random (location, level, size): inside, straddling every edge, negative and fully outside."""
    out = []
    for k in range(count):
        level = int(rng.integers(0, len(dims)))
        w_l, h_l = dims[level]
        d = downsamples[level]
        size = (int(rng.integers(1, 200)), int(rng.integers(1, 200)))
        kind = k % 5
        if kind == 0:  # inside
            lx, ly = rng.integers(0, w_l - size[0] + 1), rng.integers(0, h_l - size[1] + 1)
        elif kind == 1:  # straddles the right / bottom edge
            lx, ly = w_l - rng.integers(1, size[0] + 1), h_l - rng.integers(1, size[1] + 1)
        elif kind == 2:  # negative coordinates, straddling top / left
            lx, ly = -rng.integers(0, size[0]), -rng.integers(0, size[1])
        elif kind == 3:  # straddles one edge only, random side
            lx, ly = rng.integers(-size[0] // 2, w_l), -rng.integers(1, size[1] + 1)
        else:  # fully outside
            lx, ly = w_l + rng.integers(0, 50), -size[1] - rng.integers(0, 50)
        out.append(((int(round(lx * d)), int(round(ly * d))), level, size))
    return out


def test_read_region_matches_openslide(pair):
    slide, osr = pair
    rng = np.random.default_rng(1234)
    for location, level, size in _regions(rng, slide.level_dimensions, slide.level_downsamples, 60):
        got = slide.read_region(location, level, size)
        assert got.dtype == np.uint8 and got.shape == (size[1], size[0], 3)
        np.testing.assert_array_equal(got, openslide_rgb(osr, location, level, size), err_msg=f"{location} {level} {size}")


@pytest.mark.parametrize("level", [0, 2, 4])
def test_read_region_unaligned_level0_location(pair, level):
    """A level-0 location that is not a multiple of the downsample: same pixels as OpenSlide."""
    slide, osr = pair
    for location in [(4097, 4099), (3, -5), (8191, 8190), (-15, 8177)]:
        assert_matches_openslide(slide.read_region(location, level, (37, 23)), osr, location, level, (37, 23))


def test_read_region_whole_level_and_tissue_present(pair):
    slide, osr = pair
    w, h = slide.level_dimensions[4]
    got = slide.read_region((0, 0), 4, (w, h))
    np.testing.assert_array_equal(got, openslide_rgb(osr, (0, 0), 4, (w, h)))
    # Not vacuous: the slide has tissue (coloured) and glass (bright) pixels.
    assert got.std() > 10


@pytest.mark.parametrize("threads", [1, 3])
def test_read_level_matches_openslide(pair, tumour_slide, threads):
    """read_level (JPEG tiles decoded on threads) is OpenSlide's whole level, on every level (edge
    tiles clipped), and on a file without JPEG tiles (the mask: OpenSlide's path)."""
    from wsitile import jpeg_tiles

    slide, osr = pair
    for level in range(slide.level_count):
        w, h = slide.level_dimensions[level]
        assert jpeg_tiles.tile_layout(slide.path, {(w, h)}) is not None  # the direct path is the one tested
        got = slide.read_level(level, threads=threads)
        assert got.shape == (h, w, 3) and got.flags.c_contiguous and got.flags.writeable
        np.testing.assert_array_equal(got, openslide_rgb(osr, (0, 0), level, (w, h)), err_msg=f"level {level}")
    mask = wsitile.Slide(tumour_slide["mask"])
    last = mask.level_count - 1
    np.testing.assert_array_equal(mask.read_level(last, threads=threads),
                                  mask.read_region((0, 0), last, mask.level_dimensions[last]))
    with pytest.raises(ValueError, match="out of range"):
        slide.read_level(slide.level_count)


def test_read_region_outside_is_white(pair):
    slide, _ = pair
    np.testing.assert_array_equal(slide.read_region((-1000, -1000), 0, (100, 50)), 255)
    np.testing.assert_array_equal(slide.read_region((8192, 0), 0, (10, 10)), 255)
    np.testing.assert_array_equal(slide.read_region((0, 8192 * 4), 3, (10, 10)), 255)
    part = slide.read_region((-40, 0), 2, (20, 20))  # level-2 columns -10..9
    np.testing.assert_array_equal(part[:, :10], 255)


def test_read_region_array_owns_memory(pair):
    slide, _ = pair
    a = slide.read_region((100, 100), 1, (64, 64))
    b = slide.read_region((100, 100), 1, (64, 64))
    assert a.flags.c_contiguous and a.flags.writeable
    assert not np.shares_memory(a, b)
    copy = a.copy()
    for _ in range(5):
        slide.read_region((4000, 4000), 1, (64, 64))
    np.testing.assert_array_equal(a, copy)


def test_mask_slide_read_matches_tifffile(tumour_slide):
    """The mask TIFF read through the engine equals its page 0 (255 = tumour)."""
    mask = wsitile.Slide(tumour_slide["mask"])
    with tifffile.TiffFile(tumour_slide["mask"]) as tf:
        page0 = tf.pages[0].asarray()
    ys, xs = np.nonzero(page0)
    assert len(ys) > 0
    y, x = int(ys[len(ys) // 2]), int(xs[len(xs) // 2])
    x0, y0 = max(0, x - 100), max(0, y - 100)
    got = mask.read_region((x0, y0), 0, (200, 200))
    ref = page0[y0 : y0 + 200, x0 : x0 + 200]
    for c in range(3):
        np.testing.assert_array_equal(got[: ref.shape[0], : ref.shape[1], c], ref)


# ---- errors -------------------------------------------------------------------------------------


def test_read_region_level_out_of_range(pair, tumour_slide):
    slide, _ = pair
    for level in (5, -1):
        with pytest.raises(ValueError, match=r"level -?\d out of range.*levels 0\.\.4"):
            slide.read_region((0, 0), level, (10, 10))


@pytest.mark.parametrize("size", [(0, 10), (10, 0), (-5, 5)])
def test_read_region_bad_size(pair, size):
    slide, _ = pair
    with pytest.raises(ValueError, match="size"):
        slide.read_region((0, 0), 0, size)


def test_missing_slide(tmp_path):
    path = tmp_path / "nope" / "missing.tif"
    with pytest.raises(FileNotFoundError, match=str(path)):
        wsitile.Slide(path)


def test_directory_is_not_a_slide(tmp_path):
    with pytest.raises(ValueError, match=str(tmp_path)):
        wsitile.Slide(tmp_path)


def test_text_file_is_not_a_slide(tmp_path):
    path = tmp_path / "notes.tif"
    path.write_text("this is not a TIFF\n" * 20)
    with pytest.raises(ValueError, match=str(path)):
        wsitile.Slide(path)


def test_empty_file_is_not_a_slide(tmp_path):
    path = tmp_path / "empty.tif"
    path.write_bytes(b"")
    with pytest.raises(ValueError, match=str(path)):
        wsitile.Slide(path)


@pytest.mark.parametrize("fraction", [0.5, 0.95])
def test_truncated_slide_raises(tumour_slide, tmp_path, fraction):
    path = tmp_path / f"truncated_{fraction}.tif"
    shutil.copy(tumour_slide["slide"], path)
    os.truncate(path, int(os.path.getsize(path) * fraction))
    with pytest.raises(Exception, match=str(path)) as info:
        slide = wsitile.Slide(path)
        for level in range(slide.level_count):
            w, h = slide.level_dimensions[level]
            slide.read_region((0, 0), level, (w, h))
    assert isinstance(info.value, (ValueError, RuntimeError, OSError))


def _corrupt_tiles(src, dst, page: int) -> None:
    """Copy `src` to `dst` with every tile of `page` overwritten by garbage (structure intact)."""
    shutil.copy(src, dst)
    with tifffile.TiffFile(dst) as tf:
        p = tf.pages[page]
        spans = list(zip(p.dataoffsets, p.databytecounts))
    rng = np.random.default_rng(0)
    with open(dst, "r+b") as fh:
        for offset, count in spans:
            fh.seek(offset)
            fh.write(rng.integers(0, 256, size=count, dtype=np.uint8).tobytes())


def test_corrupt_tile_data_raises_on_read(tumour_slide, tmp_path):
    """Tiles that do not decode: an exception naming the path and level, never a crash."""
    path = tmp_path / "corrupt.tif"
    _corrupt_tiles(tumour_slide["slide"], path, page=2)
    slide = wsitile.Slide(path)  # the directory is fine
    with pytest.raises(RuntimeError, match=rf"{path}.*level 2"):
        slide.read_region((0, 0), 2, (512, 512))
    with pytest.raises(RuntimeError, match=rf"{path}.*level 2"):  # a tile that fails: OpenSlide names it
        wsitile.Slide(path).read_level(2)
