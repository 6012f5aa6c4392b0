"""Tissue detection: Otsu's threshold on HSV saturation of a low-resolution level.

Glass is white or grey (saturation near 0); H&E-stained tissue is pink and purple (clearly saturated),
so one global threshold on saturation separates them well, and a small opening/closing removes
specks and fills pinholes.
"""

from __future__ import annotations

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


def tissue_mask(slide: Slide, level: int) -> np.ndarray:
    """Boolean (h, w) tissue mask of `level` (True = tissue)."""
    width, height = slide.level_dimensions[level]
    rgb = slide.read_region((0, 0), level, (width, height))
    saturation = rgb2hsv(rgb)[..., 1]
    if float(saturation.max()) <= MIN_SATURATION:
        return np.zeros((height, width), dtype=bool)
    threshold = max(float(threshold_otsu(saturation)), MIN_SATURATION)
    mask = saturation > threshold
    disk = ndimage.generate_binary_structure(2, 1)
    mask = ndimage.binary_opening(mask, structure=disk)
    mask = ndimage.binary_closing(mask, structure=disk, iterations=2, border_value=0)
    return ndimage.binary_fill_holes(mask)
