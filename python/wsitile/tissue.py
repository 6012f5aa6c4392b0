"""Tissue detection: Otsu's threshold on HSV saturation of a low-resolution level.

Glass is white or grey (saturation near 0); H&E-stained tissue is pink and purple (clearly saturated),
so one global threshold on saturation separates them well, and a small opening/closing removes
specks and fills pinholes.
"""

from __future__ import annotations

import functools

import numpy as np
from scipy import ndimage
from skimage.color import rgb2hsv
from skimage.filters import threshold_otsu

from .slide import Slide

# Below this saturation nothing is tissue, whatever Otsu says: on a blank slide Otsu would otherwise
# split the background's noise in two.
MIN_SATURATION = 0.05
# The tissue image is at most this many pixels (bounded memory for 100,000 x 200,000 px slides).
MAX_TISSUE_PIXELS = 32 * 1024 * 1024


def tissue_level(slide: Slide, base_level: int, window: int) -> int:
    """The coarsest level on which a window still spans about 8 pixels, within MAX_TISSUE_PIXELS."""
    downsamples = slide.level_downsamples
    target = downsamples[base_level] * window / 8.0
    fine_enough = [lvl for lvl, d in enumerate(downsamples) if d <= target] or [base_level]
    level = max(fine_enough, key=lambda lvl: downsamples[lvl])
    while level + 1 < slide.level_count and np.prod(slide.level_dimensions[level]) > MAX_TISSUE_PIXELS:
        level += 1
    return level


@functools.cache
def _saturation_table() -> np.ndarray:
    """HSV saturation by (max, min) of a pixel's uint8 channels: (max - min) / max, the value
    skimage's rgb2hsv gives (computed by it, on one pixel per pair), so masks match it exactly."""
    hi, lo = np.meshgrid(np.arange(256), np.arange(256), indexing="ij")
    pixels = np.stack([hi, lo, lo], axis=-1).astype(np.uint8)
    return rgb2hsv(pixels)[..., 1].astype(np.float64)


def saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation of a uint8 RGB image as float64, equal to ``rgb2hsv(rgb)[..., 1]``, through the
    (max, min) table."""
    rgb = np.asarray(rgb)
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[-1] != 3:
        return rgb2hsv(rgb)[..., 1]
    return np.take(_saturation_table().ravel(), _max_min_index(rgb))


def _max_min_index(rgb: np.ndarray) -> np.ndarray:
    """(max << 8) | min of each uint8 RGB pixel: its row in the saturation table."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]  # elementwise: a reduce over an axis of 3 is slow
    hi = np.maximum(np.maximum(r, g), b).astype(np.uint16)
    return (hi << 8) | np.minimum(np.minimum(r, g), b)


def saturation_mask(rgb: np.ndarray) -> np.ndarray:
    """``sat > max(threshold_otsu(sat), MIN_SATURATION)`` for ``sat = rgb2hsv(rgb)[..., 1]`` of a uint8
    RGB image (all False when no saturation exceeds MIN_SATURATION), without the float image.

    Why: a pixel's saturation depends on its (max, min) channels alone, so the 65,536-entry histogram
    of (max, min) gives the saturation image's values and counts; Otsu's threshold comes from the same
    256-bin histogram skimage makes of the image (same range, same bin edges, each value in the same
    bin), and the mask is one lookup per pixel in a boolean table. rgb2hsv took ~8 s on the 19 Mpx
    tissue level of a Camelyon-size slide, a float64 table lookup ~1 s; this ~0.3 s."""
    index = _max_min_index(rgb)
    counts = np.bincount(index.ravel(), minlength=1 << 16)
    table = _saturation_table().ravel()
    present = np.flatnonzero(counts)
    values, weights = table[present], counts[present]
    low, high = float(values.min()), float(values.max())
    if high <= MIN_SATURATION:
        return np.zeros(index.shape, dtype=bool)
    if low == high:
        threshold = low  # threshold_otsu's answer for a single value
    else:
        hist, edges = np.histogram(values, bins=256, range=(low, high), weights=weights)
        threshold = float(threshold_otsu(hist=(hist, (edges[:-1] + edges[1:]) / 2.0)))
    return np.take(table > max(threshold, MIN_SATURATION), index)


def tissue_mask(slide: Slide, level: int) -> np.ndarray:
    """Boolean (h, w) tissue mask of `level` (True = tissue)."""
    mask = saturation_mask(slide.read_level(level))
    return clean_mask(mask) if mask.any() else mask


def clean_mask(mask: np.ndarray) -> np.ndarray:
    """The thresholded mask with specks removed (opening), pinholes closed and holes filled: scipy's
    binary_opening, binary_closing(iterations=2) and binary_fill_holes with the 4-neighbour cross."""
    disk = ndimage.generate_binary_structure(2, 1)
    mask = dilate(erode(mask))
    mask = erode(erode(dilate(dilate(mask))))
    return fill_holes(mask, disk)


# Erosion and dilation by the 4-neighbour cross as four shifted in-place ANDs / ORs of the bool image,
# with outside pixels False (scipy's border_value=0): the same images as ndimage.binary_erosion and
# binary_dilation with that structure, ~10x faster on a tissue level (0.05 s against 0.5 s for the
# opening and the closing of a Camelyon-size slide's 6,144 x 3,072 px).
def erode(mask: np.ndarray) -> np.ndarray:
    out = np.array(mask, dtype=bool)
    out[1:] &= mask[:-1]
    out[:-1] &= mask[1:]
    out[:, 1:] &= mask[:, :-1]
    out[:, :-1] &= mask[:, 1:]
    out[[0, -1]] = False  # a neighbour outside the image is False
    out[:, [0, -1]] = False
    return out


def dilate(mask: np.ndarray) -> np.ndarray:
    out = np.array(mask, dtype=bool)
    out[1:] |= mask[:-1]
    out[:-1] |= mask[1:]
    out[:, 1:] |= mask[:, :-1]
    out[:, :-1] |= mask[:, 1:]
    return out


def fill_holes(mask: np.ndarray, structure: np.ndarray) -> np.ndarray:
    """ndimage.binary_fill_holes(mask, structure), exactly, in one labelling pass: the holes are the
    background components that do not touch the border. (binary_fill_holes dilates the border's
    background until nothing changes: 0.39 s against 0.13 s on a 6,144 x 3,072 tissue level.)"""
    labels, count = ndimage.label(~mask, structure=structure)
    outside = np.zeros(count + 1, dtype=bool)
    outside[np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])] = True
    outside[0] = False  # label 0: the mask itself
    return ~outside[labels]
