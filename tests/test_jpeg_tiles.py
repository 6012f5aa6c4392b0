"""The direct JPEG tile path (wsitile.jpeg_tiles, cpp/src/jpeg_tiles.cpp) against openslide-python.

Every tile decoded straight from the file must be exactly what OpenSlide's read_region gives for the
same level pixels (edge tiles clipped to white), with and without JPEGTables, for YCbCr and RGB
photometric tags; a level whose check fails, a stale layout or a corrupt tile must never yield pixels
that differ from OpenSlide's.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import imagecodecs
import numpy as np
import openslide
import pytest
import tifffile

import wsitile
from wsitile import _core, jpeg_tiles

TILE = 256


def split_tables(jpeg: bytes) -> tuple[bytes, bytes]:
    """A full JPEG -> (tables-only stream, abbreviated stream), as scanners write tiled TIFFs: the
    quantisation and Huffman tables move to the TIFF's JPEGTables tag."""
    assert jpeg[:2] == b"\xff\xd8"
    i, tables, rest = 2, b"", b""
    while True:
        marker, n = jpeg[i : i + 2], int.from_bytes(jpeg[i + 2 : i + 4], "big")
        if marker == b"\xff\xda":  # start of scan: the entropy-coded data follows
            rest += jpeg[i:]
            break
        if marker in (b"\xff\xdb", b"\xff\xc4"):
            tables += jpeg[i : i + 2 + n]
        else:
            rest += jpeg[i : i + 2 + n]
        i += 2 + n
    return b"\xff\xd8" + tables + b"\xff\xd9", b"\xff\xd8" + rest


def write_tiff(path, *, ycbcr: bool, tables: bool, seed: int = 0) -> None:
    """A two-level tiled JPEG TIFF, 1000 x 700 px (not a multiple of the tile: clipped edge tiles whose
    padding is noise), pink-ish texture OpenSlide opens as generic-tiff."""
    rng = np.random.default_rng(seed)
    with tifffile.TiffWriter(path) as tw:
        for k, (h, w) in enumerate([(700, 1000), (350, 500)]):
            image = (rng.integers(0, 256, (h, w, 3), dtype=np.uint8) // 3 + np.array([170, 110, 160], np.uint8))
            tiles, table = [], b""
            for ty in range(0, h, TILE):
                for tx in range(0, w, TILE):
                    tile = rng.integers(0, 256, (TILE, TILE, 3), dtype=np.uint8)
                    part = image[ty : ty + TILE, tx : tx + TILE]
                    tile[: part.shape[0], : part.shape[1]] = part
                    encoded = bytes(
                        imagecodecs.jpeg8_encode(
                            tile, level=85, colorspace="RGB", outcolorspace="YCBCR" if ycbcr else "RGB",
                            subsampling=(2, 2) if ycbcr else None,
                        )
                    )
                    if tables:
                        table, encoded = split_tables(encoded)
                    tiles.append(encoded)
            extratags = [(347, 7, len(table), table, True)] if tables else []
            tw.write(iter(tiles), shape=(h, w, 3), dtype=np.uint8, tile=(TILE, TILE), subfiletype=int(k > 0),
                     compression="jpeg", photometric="rgb", subsampling=(2, 2), extratags=extratags)
    if not ycbcr:  # tifffile tags JPEG as YCbCr; these tiles are RGB JPEGs, so say so
        with tifffile.TiffFile(path, mode="r+b") as tif:
            for page in tif.pages:
                page.tags["PhotometricInterpretation"].overwrite(2)


def over_white(rgba) -> np.ndarray:
    """openslide-python's RGBA composited over white, as wsitile does (premultiplied: c + 255 - a)."""
    rgba = np.asarray(rgba)
    return (rgba[..., :3] + (255 - rgba[..., 3:].astype(np.uint16))).astype(np.uint8)


def openslide_tile(slide: openslide.OpenSlide, level: int, col: int, row: int) -> np.ndarray:
    """Tile (col, row) of `level` through openslide-python, over white."""
    d = int(slide.level_downsamples[level])
    return over_white(slide.read_region((col * TILE * d, row * TILE * d), level, (TILE, TILE)))


@pytest.fixture(scope="module", params=["ycbcr-tables", "rgb-tables", "ycbcr"])
def crafted(request, tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("jpeg") / f"{request.param}.tif"
    write_tiff(path, ycbcr=request.param.startswith("ycbcr"), tables=request.param.endswith("tables"))
    return str(path)


@pytest.fixture(scope="module")
def libjpeg() -> None:
    if not jpeg_tiles.ensure_libjpeg():
        pytest.fail(f"no usable libjpeg among {jpeg_tiles.libjpeg_candidates()}")


def test_every_tile_matches_openslide(crafted, libjpeg):
    layout = jpeg_tiles.tile_layout(crafted)
    assert layout is not None and layout.page_sizes == [(1000, 700, TILE), (500, 350, TILE)]
    expected_photometric = 2 if "rgb" in os.path.basename(crafted) else 6
    with tifffile.TiffFile(crafted) as tif:
        assert tif.pages[0].photometric == expected_photometric
        assert bool(tif.pages[0].jpegtables) == crafted.endswith("tables.tif")
    slide = openslide.OpenSlide(crafted)
    for page, (w, h) in enumerate(slide.level_dimensions):
        for row in range(-(-h // TILE)):
            for col in range(-(-w // TILE)):
                direct = _core.read_jpeg_tile(crafted, layout, page, col, row)
                np.testing.assert_array_equal(direct, openslide_tile(slide, page, col, row), err_msg=f"{page} {col} {row}")


def test_synthetic_slide_tiles_match_openslide(tumour_slide, libjpeg):
    path = str(tumour_slide["slide"])
    layout = jpeg_tiles.tile_layout(path)
    slide = openslide.OpenSlide(path)
    assert layout is not None and len(layout.page_sizes) == slide.level_count
    only = jpeg_tiles.tile_layout(path, {slide.level_dimensions[2], slide.level_dimensions[3]})
    assert only is not None and only.page_sizes == [(*slide.level_dimensions[k], TILE) for k in (2, 3)]
    rng = np.random.default_rng(1)
    for page, (w, h) in enumerate(slide.level_dimensions):
        for col, row in {(0, 0), (-(-w // TILE) - 1, -(-h // TILE) - 1), *map(tuple, rng.integers(0, -(-w // TILE), (3, 2)))}:
            row = min(row, -(-h // TILE) - 1)
            direct = _core.read_jpeg_tile(path, layout, page, col, row)
            np.testing.assert_array_equal(direct, openslide_tile(slide, page, col, row))


def place(x: int, y: int, window: int, d0: float, dt: float) -> tuple[int, int]:
    """Issue 2 item 7: tower t's level-0 read location for tower 0's top-left (x, y) in level-Lb pixels."""
    c = ((x + window / 2) * d0, (y + window / 2) * d0)
    return tuple(int(round(np.floor(ci / dt - window / 2) * dt)) for ci in c)  # type: ignore[return-value]


@pytest.mark.parametrize("shuffle", [False, True])
def test_loader_decodes_tiles_and_matches_openslide(crafted, libjpeg, shuffle):
    kwargs = dict(levels=(0, 1), window=80, stride=60, tissue_threshold=None, batch_size=16, threads=2, shuffle=shuffle)
    direct = wsitile.Loader([(crafted, None)], **kwargs)
    assert direct.decoders == [("libjpeg", "libjpeg")]
    reference = wsitile.Loader([(crafted, None)], decoder="openslide", **kwargs)
    assert reference.decoders == [("openslide", "openslide")]
    a, b = list(direct), list(reference)
    np.testing.assert_array_equal(np.concatenate([x["images"] for x in a]), np.concatenate([x["images"] for x in b]))
    slide = openslide.OpenSlide(crafted)
    ds = slide.level_downsamples
    batch = a[0]
    for k in range(len(batch["labels"])):
        x, y = (int(v) for v in batch["coords"][k])  # level 0 = level Lb here
        for t, level in enumerate((0, 1)):
            loc = place(x, y, 80, ds[0], ds[level])
            np.testing.assert_array_equal(batch["images"][k, t], over_white(slide.read_region(loc, level, (80, 80))))


def test_failed_check_falls_back_to_openslide(crafted, libjpeg, monkeypatch):
    """A layout that decodes to other pixels (the photometric tag flipped) must fail the per-level check:
    the loader then reads through OpenSlide and its pixels stay OpenSlide's."""
    good = jpeg_tiles.tile_layout(crafted)
    assert good is not None
    st = os.stat(crafted)
    with tifffile.TiffFile(crafted) as tif:
        pages = [
            (p.imagewidth, p.imagelength, p.tilewidth, p.photometric != 6, np.asarray(p.dataoffsets, np.uint64),
             np.asarray(p.databytecounts, np.uint64), bytes(p.jpegtables or b""))
            for p in tif.pages
        ]
    wrong = _core.JpegTileLayout((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns), pages)
    assert not np.array_equal(_core.read_jpeg_tile(crafted, wrong, 0, 1, 1), _core.read_jpeg_tile(crafted, good, 0, 1, 1))
    monkeypatch.setattr(jpeg_tiles, "tile_layout", lambda path, sizes=None: wrong)
    kwargs = dict(levels=(0, 1), window=80, stride=80, tissue_threshold=None, shuffle=False, threads=1)
    fallback = wsitile.Loader([(crafted, None)], **kwargs)
    assert fallback.decoders == [("openslide", "openslide")]
    reference = wsitile.Loader([(crafted, None)], decoder="openslide", **kwargs)
    np.testing.assert_array_equal(np.concatenate([b["images"] for b in fallback]),
                                  np.concatenate([b["images"] for b in reference]))


def test_stale_layout_raises_slide_changed(crafted, libjpeg, tmp_path):
    path = tmp_path / "copy.tif"
    shutil.copy(crafted, path)
    layout = jpeg_tiles.tile_layout(path)
    assert layout is not None
    os.utime(path, ns=(0, 10**9))  # same bytes, new mtime: the layout is no longer trusted
    with pytest.raises(wsitile.SlideChangedError, match="changed"):
        _core.read_jpeg_tile(str(path), layout, 0, 0, 0)


def test_corrupt_tile_error_names_file_and_tile(crafted, libjpeg, tmp_path):
    path = tmp_path / "corrupt.tif"
    shutil.copy(crafted, path)
    with tifffile.TiffFile(path) as tif:
        offset, count = tif.pages[0].dataoffsets[1], tif.pages[0].databytecounts[1]
    with open(path, "r+b") as fh:
        fh.seek(offset)
        fh.write(np.random.default_rng(0).integers(0, 256, count, dtype=np.uint8).tobytes())
    layout = jpeg_tiles.tile_layout(path)
    with pytest.raises(RuntimeError, match=rf"{path}: JPEG tile \(1, 0\) of the 1000x700 page: libjpeg: "):
        _core.read_jpeg_tile(str(path), layout, 0, 1, 0)
    np.testing.assert_array_equal(_core.read_jpeg_tile(str(path), layout, 0, 0, 0),
                                  openslide_tile(openslide.OpenSlide(str(path)), 0, 0, 0))


def test_other_files_and_no_libjpeg_read_through_openslide(tumour_slide, monkeypatch):
    assert jpeg_tiles.tile_layout(tumour_slide["mask"]) is None  # deflate pages: nothing to decode
    assert jpeg_tiles.tile_layout(tumour_slide["xml"]) is None  # not a slide at all
    monkeypatch.setattr(jpeg_tiles, "ensure_libjpeg", lambda: False)
    loader = wsitile.Loader([(tumour_slide["slide"], None)], shuffle=False, threads=1)
    assert loader.decoders == [("openslide", "openslide")]
    with pytest.raises(ValueError, match="decoder 'pillow'"):
        wsitile.Loader([(tumour_slide["slide"], None)], decoder="pillow")


def test_load_libjpeg_errors_name_the_library(tmp_path):
    """In a fresh interpreter (a loaded libjpeg stays for the process): a missing file and a library
    that is not libjpeg are refused with the path; then a real one loads."""
    code = textwrap.dedent(
        """
        import ctypes.util, sys
        from wsitile import _core, jpeg_tiles
        for bad in ("/nonexistent/libjpeg.so.62", ctypes.util.find_library("z")):
            try:
                _core.load_libjpeg(bad)
            except RuntimeError as e:
                assert str(bad) in str(e), e
                print("refused", bad)
            else:
                sys.exit(f"{bad} loaded")
        assert not _core.libjpeg_loaded()
        assert jpeg_tiles.ensure_libjpeg()
        print("loaded")
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("refused") == 2 and out.stdout.strip().endswith("loaded")


def test_thrashing_block_cache_still_decodes_tiles_and_matches_openslide(tumour_slide, libjpeg):
    """Shuffled, with a 1 MB block cache that holds 5 tiles of the ~100 the epoch touches: JPEG tile
    blocks are still used (a miss costs a tile decode, as in OpenSlide's own cache), blocks are
    evicted and their memory recycled all along, and every window is OpenSlide's."""
    kwargs = dict(shuffle=True, threads=2, batch_size=32, cache_mb=1, seed=3)
    direct = wsitile.Loader([(tumour_slide["slide"], None)], **kwargs)
    assert direct.decoders == [("libjpeg", "libjpeg")] and direct._core.uses_block_cache(0)
    reference = wsitile.Loader([(tumour_slide["slide"], None)], decoder="openslide", **kwargs)
    assert not reference._core.uses_block_cache(0)  # OpenSlide blocks would thrash: one read per window
    for _ in range(2):  # two epochs: the second starts from a full, recycled arena
        a, b = list(direct), list(reference)
        np.testing.assert_array_equal(np.concatenate([x["images"] for x in a]), np.concatenate([x["images"] for x in b]))
    assert direct._core.cache_bytes_used <= 1 << 20


# --- partial decoding: each window's part of a tile (shuffled epochs that thrash the block cache) ---


def random_regions(rng: np.random.Generator, tile: int, n: int) -> list[tuple[int, int, int, int]]:
    """(x, y, w, h) inside a tile: random ones, plus 1-px strips and the regions touching each edge."""
    regions = [(0, 0, tile, tile), (0, 0, 1, 1), (tile - 1, tile - 1, 1, 1), (16, 16, 16, 16), (15, 17, 2, tile - 17)]
    for _ in range(n):
        x, y = (int(v) for v in rng.integers(0, tile, 2))
        regions.append((x, y, int(rng.integers(1, tile - x + 1)), int(rng.integers(1, tile - y + 1))))
    return regions


def test_tile_regions_equal_the_whole_tile_decode(crafted, libjpeg):
    """Every tile of both pages (edge tiles whose padding is noise, clipped to white; RGB and YCbCr;
    with and without JPEGTables), many regions each: partial decoding (crop + skip, one pixel of
    margin) gives exactly the whole tile's pixels there."""
    layout = jpeg_tiles.tile_layout(crafted)
    rng = np.random.default_rng(5)
    for page, (w, h, _) in enumerate(layout.page_sizes):
        for row in range(-(-h // TILE)):
            for col in range(-(-w // TILE)):
                whole = _core.read_jpeg_tile(crafted, layout, page, col, row)
                for x, y, rw, rh in random_regions(rng, TILE, 12):
                    part = _core.read_jpeg_tile_region(crafted, layout, page, col, row, x, y, rw, rh)
                    np.testing.assert_array_equal(part, whole[y : y + rh, x : x + rw],
                                                  err_msg=f"page {page} tile ({col}, {row}) region {(x, y, rw, rh)}")


def test_synthetic_slide_tile_regions_equal_the_whole_tile_decode(tumour_slide, libjpeg):
    path = str(tumour_slide["slide"])
    layout = jpeg_tiles.tile_layout(path)
    rng = np.random.default_rng(6)
    for page, (w, h, _) in enumerate(layout.page_sizes[:3]):
        for col, row in map(tuple, rng.integers(0, -(-min(w, h) // TILE), (6, 2))):
            whole = _core.read_jpeg_tile(path, layout, page, int(col), int(row))
            for x, y, rw, rh in random_regions(rng, TILE, 20):
                part = _core.read_jpeg_tile_region(path, layout, page, int(col), int(row), x, y, rw, rh)
                np.testing.assert_array_equal(part, whole[y : y + rh, x : x + rw])


def test_tile_region_outside_the_tile_is_refused(crafted, libjpeg):
    layout = jpeg_tiles.tile_layout(crafted)
    for x, y, w, h in [(-1, 0, 8, 8), (0, 0, TILE + 1, 8), (250, 0, 7, 8), (0, 0, 0, 8)]:
        with pytest.raises((RuntimeError, ValueError), match="region|at least"):
            _core.read_jpeg_tile_region(crafted, layout, 0, 0, 0, x, y, w, h)


def thrash_kwargs(**extra):
    return dict(levels=(0, 1), window=80, stride=60, tissue_threshold=None, batch_size=16, threads=2, **extra)


def test_thrashing_shuffled_epoch_decodes_tile_regions_and_matches_openslide(crafted, libjpeg):
    """A 1 MB block cache and a shuffled epoch over both levels: level 1's 4 tiles (0.8 MB) fit and
    are cached, level 0's 12 (2.4 MB) would not, so tower 0 cuts its windows from their part of each
    tile, uncached; every window is OpenSlide's."""
    regions = wsitile.Loader([(crafted, None)], **thrash_kwargs(shuffle=True, cache_mb=1, seed=2))
    assert regions.decoders == [("libjpeg", "libjpeg")] and regions.tile_regions_used == [(True, False)]
    reference = wsitile.Loader([(crafted, None)], decoder="openslide", **thrash_kwargs(shuffle=True, cache_mb=1, seed=2))
    a, b = list(regions), list(reference)
    np.testing.assert_array_equal(np.concatenate([x["images"] for x in a]), np.concatenate([x["images"] for x in b]))


def test_tile_region_policy(tumour_slide, libjpeg):
    """Regions only where shuffled blocks would mostly miss: never in grid order or when the epoch
    fits; the smaller level keeps the cache when it fits in it; tile_regions=False turns them off."""
    slides = [(tumour_slide["slide"], None)]
    kwargs = dict(levels=(1, 2), window=80, stride=80, tissue_threshold=None, threads=1, seed=0)
    # Level 1 is 4096 px (48 MB of RGB), level 2 2048 px (12 MB).
    assert wsitile.Loader(slides, shuffle=True, cache_mb=512, **kwargs).tile_regions_used == [(False, False)]
    assert wsitile.Loader(slides, shuffle=False, cache_mb=1, **kwargs).tile_regions_used == [(False, False)]
    assert wsitile.Loader(slides, shuffle=True, cache_mb=16, **kwargs).tile_regions_used == [(True, False)]
    assert wsitile.Loader(slides, shuffle=True, cache_mb=1, **kwargs).tile_regions_used == [(True, True)]
    with pytest.raises(TypeError, match="tile_regions 'no'"):
        wsitile.Loader(slides, tile_regions="no", **kwargs)
    off = wsitile.Loader(slides, shuffle=True, cache_mb=1, tile_regions=False, **kwargs)
    assert off.tile_regions_used == [(False, False)] and off.decoders == [("libjpeg", "libjpeg")]
    mixed = wsitile.Loader(slides, shuffle=True, cache_mb=16, augment=True, **kwargs)
    whole = wsitile.Loader(slides, shuffle=True, cache_mb=16, augment=True, tile_regions=False, **kwargs)
    np.testing.assert_array_equal(np.concatenate([b["images"] for b in mixed]),
                                  np.concatenate([b["images"] for b in whole]))


@pytest.mark.parametrize("shuffle", [False, True])
def test_no_block_cache_cuts_windows_from_tile_parts(crafted, libjpeg, shuffle):
    """cache_mb=0 (no block cache): every JPEG tower cuts each window from its part of the tiles, in
    grid order too, instead of one OpenSlide read_region per window; tile_regions=False and
    decoder="openslide" keep OpenSlide; every window is OpenSlide's."""
    kwargs = thrash_kwargs(shuffle=shuffle, cache_mb=0, seed=4)
    parts = wsitile.Loader([(crafted, None)], **kwargs)
    assert parts.decoders == [("libjpeg", "libjpeg")] and parts.tile_regions_used == [(True, True)]
    assert not parts._core.uses_block_cache(0)
    off = wsitile.Loader([(crafted, None)], tile_regions=False, **kwargs)
    assert off.decoders == [("openslide", "openslide")] and off.tile_regions_used == [(False, False)]
    reference = wsitile.Loader([(crafted, None)], decoder="openslide", **kwargs)
    assert reference.decoders == [("openslide", "openslide")]
    for _ in range(2):
        a, b, c = list(parts), list(off), list(reference)
        want = np.concatenate([x["images"] for x in c])
        np.testing.assert_array_equal(np.concatenate([x["images"] for x in a]), want)
        np.testing.assert_array_equal(np.concatenate([x["images"] for x in b]), want)
    assert parts._core.cache_bytes_used == 0


def test_corrupt_tile_in_a_region_names_file_and_is_skipped(crafted, libjpeg, tmp_path):
    """A corrupt tile read as a region fails its sample the way a whole-tile read does: RuntimeError
    naming the slide, or with on_error="skip" left out, the other windows still OpenSlide's."""
    path = tmp_path / "corrupt.tif"
    shutil.copy(crafted, path)
    with tifffile.TiffFile(path) as tif:
        offset, count = tif.pages[0].dataoffsets[1], tif.pages[0].databytecounts[1]
    with open(path, "r+b") as fh:
        fh.seek(offset + count // 3)
        fh.write(np.random.default_rng(0).integers(0, 256, count // 3, dtype=np.uint8).tobytes())
    loader = wsitile.Loader([(path, None)], **thrash_kwargs(shuffle=True, cache_mb=1))
    assert loader.tile_regions_used == [(True, False)]  # the corrupt tile is on level 0
    with pytest.raises(RuntimeError, match=str(path)):
        list(loader)
    skipping = wsitile.Loader([(path, None)], on_error="skip", **thrash_kwargs(shuffle=True, cache_mb=1))
    kept = list(skipping)
    assert 0 < skipping.num_skipped < skipping.num_samples
    slide = openslide.OpenSlide(str(path))
    ds = slide.level_downsamples
    for batch in kept:
        for k in range(len(batch["labels"])):
            x, y = (int(v) for v in batch["coords"][k])
            for t, level in enumerate((0, 1)):
                loc = place(x, y, 80, ds[0], ds[level])
                np.testing.assert_array_equal(batch["images"][k, t], over_white(slide.read_region(loc, level, (80, 80))))
