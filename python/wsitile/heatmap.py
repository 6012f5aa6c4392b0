"""Slide heatmaps: the ``heatmap.npz`` contract between ``wsitile predict`` and the evaluation.

A heatmap holds one tumour probability per predicted window of the engine's grid (DESIGN.md section 4):

- ``coords``: int64 (N, 2), level-0 (x, y) of tower 0's window top-left, exactly ``Grid.coords``
  (= round(xy * d0), xy the level-Lb top-left, d0 the slide's downsample of the base level Lb);
- ``probs``: float32 (N,), in [0, 1];
- ``levels``: int64 (L,), the tower levels, finest (Lb) first;
- ``window``, ``center``, ``stride``: int64 scalars, as the grid was built with;
- ``grid_shape``: int64 (2,), (rows, cols) of the full grid, before the tissue filter;
- ``slide``: str, the slide's path.

Nothing else is stored. To put a window back into its grid cell one needs d0, the slide's downsample
of Lb; the file does not carry it. ``base_downsample`` takes it from the slide file when that can be
opened: exact (real slides have inexact downsamples such as 4.0003, and some formats are not 2^L per
level), and it checks at the same time that the coordinates lie on that slide's grid. When the slide
cannot be opened (a heatmap moved to another machine) d0 is derived from the coordinates alone: the
smallest step between distinct x or y values is one grid step stride * d0 (up to the rounding to
integers), every coordinate is an integer number of steps and so bounds d0 to an interval of width
1 / (steps * stride); d0 is the simplest decimal in the intersection of these intervals, so it
reproduces every coordinate (and is exactly 4.0 or 4.0003 when the slide's value is). That needs two
windows adjacent in some row or column, which any heatmap over tissue has; a heatmap of isolated
windows on every other cell is ambiguous (a coarser grid explains it as well) and would be placed on
that coarser grid.
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .grid import MAX_SIZE
from .masks import atomic_write

__all__ = ["HEATMAP_KEYS", "Heatmap", "base_downsample", "grid_cells", "grid_image", "load_heatmap", "save_heatmap"]

#: The arrays a heatmap.npz holds, no more, no less.
HEATMAP_KEYS = ("coords", "probs", "levels", "window", "center", "stride", "grid_shape", "slide")


def _int_scalar(value: object, name: str, where: str, minimum: int) -> int:
    arr = np.asarray(value)
    if arr.ndim != 0 or arr.dtype.kind not in "iu":
        raise ValueError(f"{where}: {name} must be an integer scalar, got {arr.dtype} of shape {arr.shape}")
    if not minimum <= int(arr) <= MAX_SIZE:
        raise ValueError(f"{where}: {name} must be in [{minimum}, 2**40], got {int(arr)}")
    return int(arr)


@dataclass(frozen=True, eq=False)
class Heatmap:
    """One slide's window probabilities (the heatmap.npz contract); validated on construction.

    ``path`` is where it was read from (None when built in memory); errors name it.
    """

    coords: np.ndarray
    probs: np.ndarray
    levels: np.ndarray
    window: int
    center: int
    stride: int
    grid_shape: tuple[int, int]
    slide: str
    path: str | None = None

    def __post_init__(self) -> None:
        where = self.path or "heatmap"
        coords = np.asarray(self.coords)
        if coords.ndim != 2 or coords.shape[1] != 2 or (coords.size and coords.dtype.kind not in "iu"):
            raise ValueError(f"{where}: coords must be an integer (N, 2) array, got {coords.dtype} {coords.shape}")
        coords = np.ascontiguousarray(coords, dtype=np.int64)
        if coords.size and not (coords.min() >= 0 and coords.max() <= MAX_SIZE):
            raise ValueError(f"{where}: coords must be level-0 pixels in [0, 2**40]")
        probs = np.asarray(self.probs)
        if probs.shape != (len(coords),) or (probs.size and probs.dtype.kind != "f"):
            raise ValueError(
                f"{where}: probs must be a float (N,) array matching coords (N = {len(coords)}), "
                f"got {probs.dtype} {probs.shape}"
            )
        probs = np.ascontiguousarray(probs, dtype=np.float32)
        if probs.size and not (np.isfinite(probs).all() and probs.min() >= 0.0 and probs.max() <= 1.0):
            raise ValueError(f"{where}: probs must be finite probabilities in [0, 1]")
        levels = np.asarray(self.levels)
        if levels.ndim != 1 or levels.size == 0 or levels.dtype.kind not in "iu":
            raise ValueError(
                f"{where}: levels must be a non-empty integer (L,) array, got {levels.dtype} {levels.shape}"
            )
        levels = levels.astype(np.int64)
        if levels.min() < 0 or np.any(np.diff(levels) <= 0):
            raise ValueError(f"{where}: levels {levels.tolist()} must be non-negative and increasing")
        window = _int_scalar(self.window, "window", where, 1)
        center = _int_scalar(self.center, "center", where, 1)
        stride = _int_scalar(self.stride, "stride", where, 1)
        if center > window:
            raise ValueError(f"{where}: center {center} is larger than the window {window}")
        shape = np.asarray(self.grid_shape)
        if shape.shape != (2,) or shape.dtype.kind not in "iu" or shape.min() < 0:
            raise ValueError(f"{where}: grid_shape must be two non-negative integers (rows, cols), got {shape!r}")
        if int(shape[0]) * int(shape[1]) > MAX_SIZE:  # Python ints: no int64 overflow on the way
            raise ValueError(f"{where}: grid_shape {shape.tolist()} has more than 2**40 cells")
        slide = np.asarray(self.slide)
        if slide.ndim != 0 or slide.dtype.kind != "U" or not str(slide):
            raise ValueError(f"{where}: slide must be a non-empty string (the slide's path)")
        for name, arr in (("coords", coords), ("probs", probs), ("levels", levels)):
            arr.setflags(write=False)
            object.__setattr__(self, name, arr)
        object.__setattr__(self, "window", window)
        object.__setattr__(self, "center", center)
        object.__setattr__(self, "stride", stride)
        object.__setattr__(self, "grid_shape", (int(shape[0]), int(shape[1])))
        object.__setattr__(self, "slide", str(slide))

    def __len__(self) -> int:
        return len(self.probs)

    def __repr__(self) -> str:
        return f"Heatmap({self.slide!r}, {len(self)} windows, grid {self.grid_shape}, levels {self.levels.tolist()})"

    @property
    def name(self) -> str:
        """What error messages call this heatmap: its file, else its slide."""
        return self.path or f"heatmap of {self.slide}"

    @classmethod
    def from_grid(cls, grid, probs: np.ndarray) -> Heatmap:  # noqa: ANN001 - wsitile.grid.Grid
        """The heatmap of a ``wsitile.grid.Grid`` with one probability per window (grid order)."""
        return cls(
            coords=grid.coords,
            probs=np.asarray(probs, dtype=np.float32),
            levels=np.asarray(grid.levels, dtype=np.int64),
            window=grid.window,
            center=grid.center,
            stride=grid.stride,
            grid_shape=tuple(grid.grid_shape),
            slide=str(grid.slide),
        )

    def arrays(self) -> dict[str, np.ndarray]:
        """The arrays of the .npz file, with the contract's dtypes."""
        return {
            "coords": self.coords,
            "probs": self.probs,
            "levels": self.levels,
            "window": np.asarray(self.window, dtype=np.int64),
            "center": np.asarray(self.center, dtype=np.int64),
            "stride": np.asarray(self.stride, dtype=np.int64),
            "grid_shape": np.asarray(self.grid_shape, dtype=np.int64),
            "slide": np.asarray(self.slide),
        }


def save_heatmap(path: str | os.PathLike[str], heatmap: Heatmap | None = None, **fields: Any) -> Heatmap:
    """Write ``heatmap.npz`` atomically (temporary file beside it, then rename); return the Heatmap.

    Give either a ``Heatmap`` or its fields as keywords (``coords``, ``probs``, ``levels``, ``window``,
    ``center``, ``stride``, ``grid_shape``, ``slide``); they are validated before anything is written.
    """
    path = Path(path)
    if heatmap is None:
        missing = [k for k in HEATMAP_KEYS if k not in fields]
        unknown = sorted(set(fields) - set(HEATMAP_KEYS))
        if missing or unknown:
            raise TypeError(f"save_heatmap: missing fields {missing}, unknown fields {unknown}")
        heatmap = Heatmap(**{k: fields[k] for k in HEATMAP_KEYS}, path=str(path))
    elif fields:
        raise TypeError("save_heatmap: give a Heatmap or its fields, not both")
    if path.suffix != ".npz":
        raise ValueError(f"{path}: a heatmap file must end in .npz")
    arrays = heatmap.arrays()
    atomic_write(path, lambda fh: np.savez(fh, allow_pickle=False, **arrays))
    return heatmap


def load_heatmap(path: str | os.PathLike[str]) -> Heatmap:
    """Read and validate a heatmap.npz; ValueError naming the file for anything wrong with it.

    No pickles are loaded (``allow_pickle=False``): a heatmap is plain arrays.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such heatmap file")
    try:
        data = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise ValueError(f"{path}: not a readable .npz file ({exc})") from None
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise ValueError(f"{path}: not a heatmap .npz archive (a single array)")
    with data:
        missing = [k for k in HEATMAP_KEYS if k not in data.files]
        if missing:
            raise ValueError(f"{path}: not a heatmap: missing {', '.join(missing)}")
        try:
            arrays: dict[str, Any] = {k: data[k] for k in HEATMAP_KEYS}  # Heatmap() converts them
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
            raise ValueError(f"{path}: cannot read the heatmap's arrays ({exc})") from None
    return Heatmap(
        coords=arrays["coords"],
        probs=arrays["probs"],
        levels=arrays["levels"],
        window=arrays["window"],
        center=arrays["center"],
        stride=arrays["stride"],
        grid_shape=arrays["grid_shape"],
        slide=arrays["slide"],
        path=str(path),
    )


def _downsample_from_coords(heatmap: Heatmap) -> float:
    """d0 fitted to the coordinates alone (see the module notes); ValueError when they allow none.

    Every coordinate c = round(k * stride * d0) bounds d0 to [(c - 1/2) / (k * stride),
    (c + 1/2) / (k * stride)]; the answer is the middle of the intersection of these intervals. The
    smallest step between distinct values gives a first interval (a difference of two rounded values
    is off by at most 1); coordinates are then taken in increasing order, each one's k predicted from
    the interval so far (exact, since the interval narrows as k grows).
    """
    s = float(heatmap.stride)
    values = np.unique(heatmap.coords)
    steps = np.concatenate([np.diff(np.unique(heatmap.coords[:, axis])) for axis in (0, 1)])
    steps = steps[steps > 0]
    if steps.size == 0:  # one distinct x and one distinct y: nothing to measure
        if not values.any():
            return float(2 ** int(heatmap.levels[0]))  # a single window at the origin: any d0 fits
        raise ValueError(
            f"{heatmap.name}: cannot tell the slide's downsample from a single window and the slide "
            f"{heatmap.slide} cannot be opened"
        )
    g = float(steps.min())
    lo, hi = max(g - 1, 0.5) / s, (g + 1) / s
    for c in values[values > 0].tolist():
        k = round(c / (s * (lo + hi) / 2))
        if k < 1:
            break
        lo, hi = max(lo, (c - 0.5) / (k * s)), min(hi, (c + 0.5) / (k * s))
        if lo > hi:
            break
    if lo > hi or k < 1:
        raise ValueError(
            f"{heatmap.name}: the coordinates do not lie on one grid of stride {heatmap.stride} "
            f"(and the slide {heatmap.slide} cannot be opened to say which)"
        )
    # The value with the fewest decimals inside the interval (4 rather than 4 - 1e-16, 4.0003 rather
    # than 4.00030506): what the slide most likely says, and exact where the slide's value is.
    for digits in range(16):
        d0 = round((lo + hi) / 2, digits)
        if lo <= d0 <= hi:
            return d0
    return (lo + hi) / 2


def base_downsample(heatmap: Heatmap) -> float:
    """The slide's downsample of the base level ``levels[0]``: from the slide file when it opens,
    else fitted to the coordinates (module notes). Either way it is checked against the coordinates
    by ``grid_cells``."""
    from .slide import Slide

    try:
        slide = Slide(heatmap.slide)
    except (OSError, RuntimeError, ValueError):
        return _downsample_from_coords(heatmap)
    level = int(heatmap.levels[0])
    if level >= slide.level_count:
        raise ValueError(
            f"{heatmap.name}: base level {level} does not exist in slide {heatmap.slide} "
            f"(levels 0..{slide.level_count - 1})"
        )
    return float(slide.level_downsamples[level])


def grid_cells(heatmap: Heatmap, downsample: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(row, col) int64 grid indices of the heatmap's windows: rint(coords / d0 / stride).

    Raises ValueError (naming the heatmap) when a coordinate is not exactly round(index * stride * d0),
    falls outside ``grid_shape`` or two windows share a cell: the heatmap is not of this slide's grid.
    """
    d0 = base_downsample(heatmap) if downsample is None else float(downsample)
    step = heatmap.stride * d0
    k = np.rint(heatmap.coords / step).astype(np.int64)  # (N, 2) as (col, row)
    rebuilt = np.rint(k * heatmap.stride * d0).astype(np.int64)
    bad = np.flatnonzero(np.any(rebuilt != heatmap.coords, axis=1))
    if bad.size:
        x, y = heatmap.coords[bad[0]]
        raise ValueError(
            f"{heatmap.name}: window at level-0 ({x}, {y}) is not on the grid of slide {heatmap.slide} "
            f"(stride {heatmap.stride} at downsample {d0:g}); heatmap and slide do not match"
        )
    rows, cols = heatmap.grid_shape
    col, row = k[:, 0], k[:, 1]
    if len(k) and (row.max() >= rows or col.max() >= cols):
        raise ValueError(
            f"{heatmap.name}: windows fall outside the {rows}x{cols} grid_shape of slide {heatmap.slide}"
        )
    flat = row * max(cols, 1) + col
    if np.unique(flat).size != flat.size:
        raise ValueError(f"{heatmap.name}: two windows share one grid cell")
    return row, col


def grid_image(heatmap: Heatmap, downsample: float | None = None) -> np.ndarray:
    """The heatmap as a float32 (rows, cols) image of the full grid; NaN where no window was predicted.

    Cell (r, c) is the window whose level-Lb top-left is (c * stride, r * stride).
    """
    row, col = grid_cells(heatmap, downsample)
    image = np.full(heatmap.grid_shape, np.nan, dtype=np.float32)
    image[row, col] = heatmap.probs
    return image
