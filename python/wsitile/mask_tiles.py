"""Centre labels straight from a mask TIFF's level-0 tiles.

Labelling asks, for each window, whether the level-0 mask has a tumour pixel in its centre
rectangle. Through OpenSlide (`_core.mask_any`) that is a read_region of every centre rectangle,
~15 ns a pixel for cairo's compositing: seconds per slide, minutes for a Camelyon16-size one. Tumour
masks are almost all background, and compressed background tiles are byte-identical, so here each
distinct compressed tile is decoded once (tifffile + imagecodecs, in threads), tiles whose pixels
are all zero answer every rectangle over them at once, and only rectangles over tiles with tumour
pixels are looked at pixel by pixel. The answer is the same (tests/test_mask_tiles.py checks it
against OpenSlide and against NumPy on the whole mask); masks this does not cover exactly - other
than a tiled, 8-bit, lossless, MinIsBlack or RGB level 0 - return None and go through OpenSlide.
"""

from __future__ import annotations

import os
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator, cast

import numpy as np
import tifffile

#: TIFF compressions whose decoded values are exactly the file's (no lossy codec): none, LZW,
#: deflate (both tags), PackBits, zstd.
LOSSLESS = {1, 5, 8, 32946, 32773, 50000}


def _level0_page(tif: tifffile.TiffFile, width: int, height: int) -> tifffile.TiffPage | None:
    page = tif.pages[0]
    if not isinstance(page, tifffile.TiffPage):
        return None
    ok = (
        page.is_tiled
        and page.tiledepth == 1
        and page.imagedepth == 1
        and (page.imagewidth, page.imagelength) == (width, height)
        and page.bitspersample == 8
        and page.sampleformat == 1
        and page.photometric in (1, 2)  # MinIsBlack, RGB: 0 is background, as OpenSlide renders it
        and (page.planarconfig == 1 or page.samplesperpixel == 1)
        and page.compression in LOSSLESS
    )
    return page if ok else None


def any_in_rects(mask: str | os.PathLike[str], rects: np.ndarray, width: int, height: int,
                 threads: int = 1) -> np.ndarray | None:
    """uint8 (N,): 1 where the half-open level-0 rectangle (x0, y0, x1, y1) holds a pixel > 0 of the
    mask's level 0 (width x height), or None when the file is not one this reads exactly."""
    rects = np.asarray(rects, dtype=np.int64).reshape(-1, 4)
    out = np.zeros(len(rects), dtype=np.uint8)
    with tifffile.TiffFile(mask) as tif:
        page = _level0_page(tif, width, height)
        if page is None:
            return None
        tw, th = page.tilewidth, page.tilelength
        across = -(-width // tw)
        # Clip to the level (outside it OpenSlide is transparent: no tumour); drop empty rectangles.
        r = rects.copy()
        r[:, [0, 2]] = r[:, [0, 2]].clip(0, width)
        r[:, [1, 3]] = r[:, [1, 3]].clip(0, height)
        live = np.flatnonzero((r[:, 2] > r[:, 0]) & (r[:, 3] > r[:, 1]))
        if live.size == 0:
            return out
        r = r[live]
        tx0, ty0 = r[:, 0] // tw, r[:, 1] // th
        nx, ny = (r[:, 2] - 1) // tw - tx0 + 1, (r[:, 3] - 1) // th - ty0 + 1
        # (rectangle, tile) pairs: each rectangle repeated once per tile it touches.
        count = nx * ny
        which = np.repeat(np.arange(len(r)), count)
        k = np.arange(count.sum()) - np.repeat(np.cumsum(count) - count, count)
        tile = (ty0[which] + k // nx[which]) * across + tx0[which] + k % nx[which]
        order = np.argsort(tile, kind="stable")
        which, tile = which[order], tile[order]
        tiles, starts = np.unique(tile, return_index=True)
        rects_of = dict(zip(tiles.tolist(), np.split(which, starts[1:])))

        offsets, counts = page.dataoffsets, page.databytecounts
        by_content: dict[bytes, list[int]] = defaultdict(list)
        present = [int(t) for t in tiles if counts[t] > 0]  # a missing tile (0 bytes) is background
        segments = tif.filehandle.read_segments(
            [offsets[t] for t in present], [counts[t] for t in present], indices=present, sort=True
        )
        for data, index in cast("Iterator[tuple[bytes, int]]", segments):
            by_content[bytes(data)].append(index)

        def tumour(item: tuple[bytes, list[int]]) -> tuple[np.ndarray | None, list[int]]:
            data, where = item
            pixels = page.decode(data, where[0], jpegtables=page.jpegtables)[0]
            m: np.ndarray = np.asarray(np.asarray(pixels).reshape(th, tw, -1).any(axis=2))
            return (m if m.any() else None), where

        hits = np.zeros(len(r), dtype=bool)
        with ThreadPoolExecutor(max(1, threads)) as pool:  # imagecodecs releases the GIL
            for m, where in pool.map(tumour, by_content.items()):
                if m is None:
                    continue  # all background: every rectangle over these tiles stays 0 here
                for t in where:
                    x, y = (t % across) * tw, (t // across) * th
                    for i in rects_of[t]:
                        if not hits[i]:
                            x0, y0 = max(r[i, 0], x) - x, max(r[i, 1], y) - y
                            x1, y1 = min(r[i, 2], x + tw) - x, min(r[i, 3], y + th) - y
                            hits[i] = m[y0:y1, x0:x1].any()
        out[live] = hits
    return out
