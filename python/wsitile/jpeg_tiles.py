"""Tiled JPEG TIFF pages for the engine's direct decode path.

OpenSlide's `read_region` spends most of its time compositing tiles with cairo, not decoding them
(BENCHMARKS.md). For the loader's block cache, which reads whole tile-aligned blocks, the C++ core
can decode the tiles itself: tifffile reads each JPEG page's tile offsets, byte counts and
JPEGTables here, and the core reads the bytes and decodes them with libjpeg-turbo - the copy Pillow
ships, loaded at run time like libopenslide. Each level is checked against OpenSlide (its most
detailed tile decoded both ways must agree byte for byte) before it is used; anything else - other
formats, other compressions, a failed check - keeps reading through OpenSlide.
"""

from __future__ import annotations

import ctypes.util
import functools
import logging
import os
from pathlib import Path

import numpy as np

from . import _core

logger = logging.getLogger(__name__)

_JPEG = 7  # TIFF Compression
_RGB, _YCBCR = 2, 6  # TIFF Photometric


def libjpeg_candidates() -> list[str]:
    """Where a libjpeg (6.2 API) may be: Pillow's bundled libjpeg-turbo first, then the system's."""
    found: list[str] = []
    try:
        import PIL

        pil = Path(PIL.__file__).resolve().parent
        for folder in (pil.parent / "pillow.libs", pil / ".dylibs"):
            found += sorted(str(p) for p in folder.glob("libjpeg*"))
    except ImportError:
        pass
    system = ctypes.util.find_library("jpeg")
    if system:
        found.append(system)
    return found


@functools.cache
def ensure_libjpeg() -> bool:
    """Load libjpeg into the engine once; False (and the OpenSlide path everywhere) when none loads."""
    if _core.libjpeg_loaded():
        return True
    for path in libjpeg_candidates():
        try:
            _core.load_libjpeg(path)
            return True
        except RuntimeError as e:
            logger.debug("libjpeg %s not usable: %s", path, e)
    logger.info("no usable libjpeg found: slides are read through OpenSlide only")
    return False


def _identity(path: str) -> tuple[int, int, int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def tile_layout(
    path: str | os.PathLike[str], sizes: "set[tuple[int, int]] | None" = None
) -> _core.JpegTileLayout | None:
    """The tiled JPEG pages of a TIFF slide that OpenSlide reads as generic-tiff, or None.

    A page qualifies when it is tiled with square tiles, JPEG-compressed, 8-bit RGB or YCbCr,
    interleaved, and has no missing tile (byte count 0); with `sizes`, only pages of those (width,
    height) are read (the loader's tower levels: a Camelyon16 level 0 alone has ~80,000 tiles). Which
    OpenSlide level a page serves is decided in the core by size, and only after the check against
    OpenSlide.
    """
    import openslide
    import tifffile

    path = os.fspath(path)
    try:
        if openslide.OpenSlide.detect_format(path) != "generic-tiff":
            return None
        before = _identity(path)
        pages = []
        with tifffile.TiffFile(path) as tif:
            for page in tif.pages:
                if not (
                    isinstance(page, tifffile.TiffPage)
                    and (sizes is None or (page.imagewidth, page.imagelength) in sizes)
                    and page.is_tiled
                    and page.tilewidth == page.tilelength
                    and page.tiledepth == 1
                    and page.imagedepth == 1
                    and page.compression == _JPEG
                    and page.photometric in (_RGB, _YCBCR)
                    and page.planarconfig == 1
                    and page.bitspersample == 8
                    and page.samplesperpixel == 3
                ):
                    continue
                bytecounts = np.asarray(page.databytecounts, dtype=np.uint64)
                if bytecounts.size == 0 or not bytecounts.all():
                    continue
                pages.append(
                    (
                        int(page.imagewidth),
                        int(page.imagelength),
                        int(page.tilewidth),
                        page.photometric == _YCBCR,
                        np.asarray(page.dataoffsets, dtype=np.uint64),
                        bytecounts,
                        bytes(page.jpegtables or b""),
                    )
                )
        if not pages or _identity(path) != before:
            return None  # nothing to decode, or the file changed while it was parsed
        return _core.JpegTileLayout(before, pages)
    except (OSError, ValueError, tifffile.TiffFileError, openslide.OpenSlideError) as e:
        logger.debug("%s: no JPEG tile layout (%s); reading through OpenSlide", path, e)
        return None
