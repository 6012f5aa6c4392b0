"""The sliding-window grid of a slide and its centre-mask labels (the engine's contract).

Tower 0 reads the base level Lb (the finest tower level). Window top-left positions in level-Lb
pixels are (i * stride, j * stride) with the whole window inside the level, rows ordered by y then x.
A window is tumour iff the level-Lb mask has a tumour pixel in its centre square
[x + o, x + o + center) x [y + o, y + o + center), o = (window - center) // 2, where a level-Lb pixel p
covers level-0 pixels [round(p * d), round((p + 1) * d)) and is tumour iff any of those is. The centre
square is therefore the level-0 rectangle [round((x + o) * d), round((x + o + center) * d)), queried at
level 0 of the mask whatever pyramid the mask file carries.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from . import _core
from .slide import Slide
from .mask_tiles import any_in_rects
from .tissue import tissue_level, tissue_mask

logger = logging.getLogger(__name__)

DEFAULT_LEVELS = (2, 3)
DEFAULT_WINDOW = 80
DEFAULT_CENTER = 50
DEFAULT_STRIDE = 80
DEFAULT_TISSUE_THRESHOLD = 0.25  # a window needs a quarter of its area on tissue


def default_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


@dataclass(frozen=True)
class Grid:
    """The windows of one slide: level-Lb top-lefts `xy`, level-0 `coords`, centre `labels`."""

    slide: str
    levels: tuple[int, ...]
    window: int
    center: int
    stride: int
    downsamples: tuple[float, ...]  # the slide's downsample of each tower level
    grid_shape: tuple[int, int]  # (rows, cols) of the full grid, before the tissue filter
    xy: np.ndarray  # int64 (N, 2), tower 0's top-left in level-Lb pixels
    coords: np.ndarray  # int64 (N, 2), the same in level-0 pixels: round(xy * d_0)
    labels: np.ndarray  # uint8 (N,)

    def __len__(self) -> int:
        return len(self.labels)


#: Largest window, centre or stride accepted (far beyond any slide level; keeps int64 math exact).
MAX_SIZE = 2**40


def check_int(name: str, value: object) -> int:
    """`value` as an int: TypeError for anything but an integer (bool and float included)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} {value!r}: must be an integer")
    return int(value)


#: Most worker threads anything here starts (the C++ Loader's kMaxThreads).
MAX_THREADS = 1024


def check_threads(threads: object) -> int:
    """`threads` as an int in [1, MAX_THREADS]: TypeError for a non-integer, ValueError out of range."""
    value = check_int("threads", threads)
    if not 1 <= value <= MAX_THREADS:
        raise ValueError(f"threads {value}: must be in [1, {MAX_THREADS}]")
    return value


def check_window_settings(
    levels: Sequence[int], window: int, center: int, stride: int, tissue_threshold: float | None = None
) -> tuple[tuple[int, ...], int, int, int]:
    """(levels, window, center, stride) as ints, checked without a slide (a training config checks
    them before any slide is read): TypeError for a non-integer, ValueError for a value out of range."""
    if isinstance(levels, (str, bytes)) or not isinstance(levels, Sequence):
        raise TypeError(f"levels {levels!r}: must be a sequence of integers")
    levels = tuple(check_int("levels", lvl) for lvl in levels)
    window, center, stride = check_int("window", window), check_int("center", center), check_int("stride", stride)
    if not levels:
        raise ValueError("levels: give at least one tower level")
    if any(b <= a for a, b in zip(levels, levels[1:])):
        raise ValueError(f"levels {levels}: must increase (tower 0 is the finest level)")
    if not 1 <= window <= MAX_SIZE:
        raise ValueError(f"window {window}: must be in [1, 2**40]")
    if not 1 <= center <= window:
        raise ValueError(f"center {center}: must be between 1 and the window ({window})")
    if not 1 <= stride <= MAX_SIZE:
        raise ValueError(f"stride {stride}: must be in [1, 2**40]")
    if tissue_threshold is not None:
        if isinstance(tissue_threshold, bool) or not isinstance(tissue_threshold, (int, float, np.integer, np.floating)):
            raise TypeError(f"tissue_threshold {tissue_threshold!r}: must be a number or None")
        if not 0 <= tissue_threshold <= 1:  # also NaN
            raise ValueError(f"tissue_threshold {tissue_threshold}: must be a fraction of the window's area, "
                             "in [0, 1] (0 or None: no tissue filter)")
    return levels, window, center, stride


def validate(slide: Slide, levels: Sequence[int], window: int, center: int, stride: int,
             tissue_threshold: float | None = None) -> tuple[int, ...]:
    """`check_window_settings`, then the levels and the window against `slide`'s pyramid."""
    levels, window, _, _ = check_window_settings(levels, window, center, stride, tissue_threshold)
    for lvl in levels:
        slide.check_level(lvl)
    width, height = slide.level_dimensions[levels[0]]
    if window > min(width, height):
        raise ValueError(
            f"{slide.path}: window {window} is larger than level {levels[0]} ({width}x{height} px)"
        )
    return levels


def tissue_windows(
    slide: Slide, base_level: int, window: int, stride: int, grid_shape: tuple[int, int], threshold: float
) -> np.ndarray:
    """Level-Lb top-lefts of the windows with at least `threshold` of their area on tissue.

    The tissue mask comes from a low-resolution level; its integral image gives each window's
    tissue fraction. Only grid rows whose band holds tissue are visited, so the cost follows the
    tissue, not the slide's area.
    """
    level = tissue_level(slide, base_level, window)
    mask = tissue_mask(slide, level)
    scale = slide.level_downsamples[base_level] / slide.level_downsamples[level]  # level-Lb px -> mask px
    height, width = mask.shape
    rows, cols = grid_shape

    def span(start: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
        lo = np.floor(start * scale).astype(np.int64)
        hi = np.maximum(np.ceil((start + window) * scale).astype(np.int64), lo + 1)
        return np.clip(lo, 0, size), np.clip(hi, 0, size)

    y_lo, y_hi = span(np.arange(rows, dtype=np.int64) * stride, height)
    x_lo, x_hi = span(np.arange(cols, dtype=np.int64) * stride, width)
    integral, at = _integral_rows(mask, np.concatenate([y_lo, y_hi]))
    r_lo, r_hi = np.searchsorted(at, y_lo), np.searchsorted(at, y_hi)  # mask rows -> rows of `integral`
    band = integral[r_hi, -1] - integral[r_lo, -1]  # tissue pixels in each row's band
    kept = []
    for j in np.flatnonzero(band > 0):
        a, b = r_lo[j], r_hi[j]
        total = integral[b, x_hi] - integral[a, x_hi] - integral[b, x_lo] + integral[a, x_lo]
        area = np.maximum((x_hi - x_lo) * (y_hi[j] - y_lo[j]), 1)
        i = np.flatnonzero(total >= threshold * area)
        kept.append(np.stack([i * stride, np.full_like(i, j * stride)], axis=1))
    return np.concatenate(kept) if kept else np.zeros((0, 2), dtype=np.int64)


def _integral_rows(mask: np.ndarray, ys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(integral, at): integral[k] is row at[k] of the mask's (h + 1, w + 1) integral image (pixels
    above and to the left), for sorted rows `at` holding every row in `ys` (values in [0, h]).

    Why not the whole integral image: the windows' edges fall on a fraction of the rows (40% of a
    Camelyon-size slide's 3,072 at the seed's settings), and the two cumulative sums over all of
    them were ~0.2 s of the grid; one pass of row sums between the needed rows, then the sums over
    those rows alone, ~0.1 s. int32 holds every count of a mask under 2^31 pixels (tissue levels are
    ~32 Mpx at most) at half int64's memory traffic."""
    height, width = mask.shape
    count = np.int32 if mask.size < 2**31 else np.int64
    starts = np.unique(np.concatenate([[0], ys]))
    starts = starts[starts < height]  # reduceat: the sum of mask rows [starts[k], starts[k + 1]), the last to h
    at = np.concatenate([[0], starts[1:], [height]])
    integral = np.zeros((len(at), width + 1), dtype=count)
    if height:
        np.cumsum(np.add.reduceat(mask, starts, axis=0, dtype=count), axis=0, out=integral[1:, 1:])
        np.cumsum(integral[1:, 1:], axis=1, out=integral[1:, 1:])
    return integral, at


def centre_rects(xy: np.ndarray, window: int, center: int, d0: float) -> np.ndarray:
    """Half-open level-0 rectangles (x0, y0, x1, y1) of the windows' centre squares."""
    o = (window - center) // 2
    lo = np.rint((xy + o) * d0).astype(np.int64)
    hi = np.rint((xy + o + center) * d0).astype(np.int64)
    return np.concatenate([lo, hi], axis=1)


def label_windows(slide: Slide, mask: str | os.PathLike[str] | None, rects: np.ndarray, threads: int) -> np.ndarray:
    """1 where the centre rectangle holds a tumour pixel of the level-0 mask (TIFF or ASAP XML)."""
    if mask is None:
        return np.zeros(len(rects), dtype=np.uint8)
    mask = os.fspath(mask)
    if Path(mask).suffix.lower() == ".xml":
        from .masks import any_tumour, read_asap_xml

        annotations = read_asap_xml(mask)
        _check_polygons_on_slide(annotations.tumour_boxes(), mask, slide)
        return any_tumour(annotations, rects).astype(np.uint8)
    mask_slide = Slide(mask)
    if mask_slide.dimensions != slide.dimensions:
        (mw, mh), (sw, sh) = mask_slide.dimensions, slide.dimensions
        raise ValueError(f"{mask}: mask level-0 size {mw}x{mh} does not match slide {slide.path} ({sw}x{sh})")
    # Straight from the mask's tiles where that is exact (tens of times faster), else through OpenSlide,
    # which also gives the error (naming the mask) for a tile that does not decode.
    try:
        labels = any_in_rects(mask, rects, *mask_slide.dimensions, threads=threads)
    except Exception as e:  # noqa: BLE001 - the OpenSlide path below is exact; this only costs time
        logger.warning("%s: reading mask tiles failed (%s); labelling through OpenSlide", mask, e)
        labels = None
    return _core.mask_any(mask_slide._slide, rects, threads) if labels is None else labels


def _check_polygons_on_slide(boxes: np.ndarray, mask: str, slide: Slide) -> None:
    """Every tumour polygon of an XML wholly outside the slide: the annotation of another slide (as a
    TIFF mask of another size is), which would otherwise label nothing without a word. Only some of
    them outside (a stray point, a stroke past the edge): a warning naming the first."""
    width, height = slide.dimensions
    outside = np.flatnonzero((boxes[:, 0] >= width) | (boxes[:, 1] >= height) | (boxes[:, 2] <= 0) | (boxes[:, 3] <= 0))
    if not outside.size:
        return
    x0, y0, x1, y1 = boxes[outside[0]].tolist()
    where = f"tumour polygon {outside[0]} ({x0}..{x1} x {y0}..{y1}) lies outside slide {slide.path} ({width}x{height})"
    if outside.size == len(boxes):
        raise ValueError(f"{mask}: {where}, as do all {len(boxes)}: mask and slide do not match")
    logger.warning("%s: %s (%d of %d polygons outside; they label nothing)", mask, where, outside.size, len(boxes))


def build_grid(
    slide: Slide | str | os.PathLike[str],
    mask: str | os.PathLike[str] | None = None,
    *,
    levels: Sequence[int] = DEFAULT_LEVELS,
    window: int = DEFAULT_WINDOW,
    center: int = DEFAULT_CENTER,
    stride: int = DEFAULT_STRIDE,
    tissue_threshold: float | None = DEFAULT_TISSUE_THRESHOLD,
    threads: int | None = None,
) -> Grid:
    """The windows of `slide` (optionally only those on tissue) with their centre labels from `mask`.

    With the tissue filter only rows of the grid that cross tissue are visited; pixels are read from a
    low-resolution level for tissue and from the mask only for the kept windows' centres.
    """
    if not isinstance(slide, Slide):
        slide = Slide(slide)
    threads = min(default_threads(), MAX_THREADS) if threads is None else check_threads(threads)
    levels = validate(slide, levels, window, center, stride, tissue_threshold)
    window, center, stride = int(window), int(center), int(stride)
    base = levels[0]
    width, height = slide.level_dimensions[base]
    cols, rows = (width - window) // stride + 1, (height - window) // stride + 1
    if tissue_threshold is not None and tissue_threshold > 0:
        xy = tissue_windows(slide, base, window, stride, (rows, cols), float(tissue_threshold))
    else:
        jj, ii = np.divmod(np.arange(rows * cols, dtype=np.int64), cols)  # rows by y, then x
        xy = np.stack([ii * stride, jj * stride], axis=1)
    d0 = slide.level_downsamples[base]
    labels = label_windows(slide, mask, centre_rects(xy, window, center, d0), threads)
    return Grid(
        slide=slide.path,
        levels=levels,
        window=int(window),
        center=int(center),
        stride=int(stride),
        downsamples=tuple(slide.level_downsamples[lvl] for lvl in levels),
        grid_shape=(int(rows), int(cols)),
        xy=xy,
        coords=np.rint(xy * d0).astype(np.int64),
        labels=np.ascontiguousarray(labels, dtype=np.uint8),
    )
