"""Whole-slide images, read by the C++ engine through libopenslide."""

from __future__ import annotations

import math
import os
from typing import Sequence

import numpy as np

from . import _core
from ._openslide import ensure_loaded


class Slide:
    """An OpenSlide-readable slide (Camelyon16 .tif, .svs, .mrxs, generic tiled TIFF, ...).

    Coordinates are level-0 pixels, (x, y) as in OpenSlide, 64-bit. Downsamples are the slide's own
    (real slides have inexact ones such as 4.0003), never assumed to be 2**level.
    """

    def __init__(self, path: str | os.PathLike[str]):
        ensure_loaded()
        self.path = os.fspath(path)
        self._slide = _core.Slide(self.path)

    @property
    def level_count(self) -> int:
        return int(self._slide.level_count)

    @property
    def level_dimensions(self) -> list[tuple[int, int]]:
        return [(int(w), int(h)) for w, h in self._slide.level_dimensions]

    @property
    def dimensions(self) -> tuple[int, int]:
        return self.level_dimensions[0]

    @property
    def level_downsamples(self) -> list[float]:
        return list(self._slide.level_downsamples)

    @property
    def vendor(self) -> str:
        return str(self._slide.vendor)

    def get_property(self, name: str) -> str | None:
        """An OpenSlide property (e.g. "openslide.mpp-x"), or None."""
        return self._slide.property(name)

    @property
    def mpp(self) -> tuple[float, float]:
        """Microns per level-0 pixel (x, y); NaN when the slide does not say."""

        def read(key: str) -> float:
            value = self.get_property(key)
            try:
                return float(value) if value is not None else math.nan
            except ValueError:
                return math.nan

        return read("openslide.mpp-x"), read("openslide.mpp-y")

    def check_level(self, level: int) -> None:
        if not 0 <= level < self.level_count:
            raise ValueError(
                f"{self.path}: level {level} out of range (the slide has levels 0..{self.level_count - 1})"
            )

    def read_region(self, location: Sequence[int], level: int, size: Sequence[int]) -> np.ndarray:
        """RGB uint8 (h, w, 3) of `level` whose top-left is the level-0 `location`; white outside."""
        self.check_level(level)
        return self._slide.read_region((int(location[0]), int(location[1])), int(level), (int(size[0]), int(size[1])))

    def read_level(self, level: int, threads: int | None = None) -> np.ndarray:
        """The whole `level` as RGB uint8 (h, w, 3): ``read_region((0, 0), level, dimensions)``, with a
        JPEG-tiled level's tiles decoded on `threads` threads (default: the usable cores)."""
        from . import jpeg_tiles
        from .grid import default_threads  # here: grid imports this module

        self.check_level(level)
        threads = default_threads() if threads is None else threads
        layout = jpeg_tiles.tile_layout(self.path, {self.level_dimensions[level]}) if jpeg_tiles.ensure_libjpeg() else None
        # A handle of its own with that page's tile table (ms to parse); without one, OpenSlide reads it.
        reader = self._slide if layout is None else _core.Slide(self.path, layout)
        return reader.read_level(int(level), max(1, int(threads)))

    def __repr__(self) -> str:
        return f"Slide({self.path!r}, levels={self.level_count}, dimensions={self.dimensions})"
