"""Fused augmentation: tf.image / dm-pix colour jitter and dihedral orientation in the C++ engine.

`augment_batch` applies explicit per-sample parameters; `AugmentConfig` + `draw_params` give the
random parameters the loader draws (counter-based, keyed by (seed, epoch, sample index)).

Semantics, in order, on x = images / 255 (float32), each step equal to dm-pix's / tf.image's:
brightness x + b (no clip); saturation: HSV S * s clipped to [0, 1]; hue: HSV H + h modulo 1;
contrast: (x - m) * c + m with m the per-channel spatial mean of that image (each tower its own
image); clip to [0, 1]; then ``np.rot90(np.fliplr(x) if flip else x, rot90)`` over (H, W).
"""

from __future__ import annotations

import os
from dataclasses import astuple, dataclass

import numpy as np

from . import _core
from .grid import check_threads

__all__ = ["AugmentConfig", "augment_batch", "draw_params"]

_OUT_DTYPES = ("uint8", "float32", "inception")


@dataclass(frozen=True)
class AugmentConfig:
    """Random augmentation ranges (defaults: Liu et al. 2017, the seed project)."""

    orientation: bool = True  # uniformly one of the 8 dihedral transforms
    colour: bool = True
    brightness: float = 64.0 / 255.0  # delta uniform in [-brightness, brightness]
    saturation_lo: float = 0.75
    saturation_hi: float = 1.25
    hue: float = 0.04  # delta uniform in [-hue, hue]
    contrast_lo: float = 0.25
    contrast_hi: float = 1.75

    def __post_init__(self) -> None:
        for name in ("brightness", "saturation_lo", "saturation_hi", "hue", "contrast_lo", "contrast_hi"):
            v = getattr(self, name)
            if not np.isfinite(v):
                raise ValueError(f"AugmentConfig.{name} must be finite, got {v}")
        if self.brightness < 0:
            raise ValueError(f"AugmentConfig.brightness must be >= 0, got {self.brightness}")
        if not 0 <= self.hue <= 0.5:
            raise ValueError(f"AugmentConfig.hue must be in [0, 0.5], got {self.hue}")
        if not 0 <= self.saturation_lo <= self.saturation_hi:
            raise ValueError("AugmentConfig.saturation_lo/hi must satisfy 0 <= lo <= hi, got "
                             f"{self.saturation_lo}, {self.saturation_hi}")
        if not 0 <= self.contrast_lo <= self.contrast_hi:
            raise ValueError("AugmentConfig.contrast_lo/hi must satisfy 0 <= lo <= hi, got "
                             f"{self.contrast_lo}, {self.contrast_hi}")


def draw_params(config: AugmentConfig, seed: int, epoch: int, sample_indices) -> dict[str, np.ndarray]:
    """The parameters the loader draws for these samples (the C++ draw_params, one call per index).

    Returns arrays keyed rot90 (int32), flip (bool), brightness, saturation, hue, contrast (float32),
    ready to pass to `augment_batch`. A pure function of (config, seed, epoch, sample index).
    """
    idx = np.asarray(sample_indices)
    if idx.ndim != 1 or not (np.issubdtype(idx.dtype, np.integer) or idx.size == 0):
        raise ValueError("sample_indices must be a 1-d integer array")
    if idx.size and idx.min() < 0:
        raise ValueError("sample_indices must be >= 0")
    for name, value in (("seed", seed), ("epoch", epoch)):  # the C++ takes uint64
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 0 <= int(value) < 2**64:
            raise ValueError(f"{name} {value!r}: must be an integer in [0, 2**64)")
    return _core.augment_draw_params(astuple(config), int(seed), int(epoch), idx.astype(np.uint64))


def _param(value, name: str, n: int, kind: str) -> np.ndarray:
    a = np.asarray(value)
    ok = {
        "int": np.issubdtype(a.dtype, np.integer),
        "bool": a.dtype == np.bool_,
        "float": np.issubdtype(a.dtype, np.floating),
    }[kind]
    if not ok:
        want = {"int": "an integer", "bool": "a bool", "float": "a float32"}[kind]
        raise TypeError(f"{name} must be {want} array of shape ({n},), got dtype {a.dtype}")
    if a.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},) (one value per sample), got {a.shape}")
    if kind == "float":
        a = a.astype(np.float32)
        if not np.all(np.isfinite(a)):
            raise ValueError(f"{name} must be finite (no NaN or inf)")
    return a


def augment_batch(images, *, rot90, flip, brightness, saturation, hue, contrast, out_dtype: str = "float32",
                  threads: int | None = None) -> np.ndarray:
    """Augment a batch with explicit per-sample parameters; returns a new array.

    images: uint8 (N, H, W, 3) or (N, T, H, W, 3) (every tower of a sample gets the sample's
    parameters; each tower is its own image for contrast's mean). rot90: int (N,) in 0..3; flip: bool
    (N,); brightness, saturation, hue, contrast: float32 (N,) (hue in [-0.5, 0.5], saturation and
    contrast >= 0). out_dtype: "float32" ([0, 1]), "uint8" (round(x * 255)) or "inception" (float32
    2x - 1). threads: worker threads over samples (default: all cores). Odd rot90 needs H == W.
    Output shape (N[, T], H', W', 3) with (H', W') = (W, H) for odd rot90.
    """
    img = np.asarray(images)
    if img.dtype != np.uint8:
        raise TypeError(f"images must be uint8, got dtype {img.dtype}")
    if img.ndim not in (4, 5) or img.shape[-1] != 3:
        raise ValueError(f"images must have shape (N, H, W, 3) or (N, T, H, W, 3), got {img.shape}")
    if min(img.shape) == 0:
        raise ValueError(f"images must not be empty, got shape {img.shape}")
    if out_dtype not in _OUT_DTYPES:
        raise ValueError(f"out_dtype must be one of {_OUT_DTYPES}, got {out_dtype!r}")
    n = img.shape[0]
    r = _param(rot90, "rot90", n, "int")
    f = _param(flip, "flip", n, "bool")
    b = _param(brightness, "brightness", n, "float")
    s = _param(saturation, "saturation", n, "float")
    h = _param(hue, "hue", n, "float")
    c = _param(contrast, "contrast", n, "float")
    if np.any((r < 0) | (r > 3)):
        raise ValueError(f"rot90 must be in 0..3, got values {np.unique(r[(r < 0) | (r > 3)])[:5].tolist()}")
    if np.any(np.abs(h) > 0.5):
        raise ValueError("hue must be in [-0.5, 0.5]")
    if np.any(s < 0):
        raise ValueError("saturation must be >= 0")
    if np.any(c < 0):
        raise ValueError("contrast must be >= 0")
    if img.shape[-3] != img.shape[-2] and np.any(r % 2 == 1):
        raise ValueError(f"rot90 must be even (0 or 2) for non-square images, got shape {img.shape}")
    threads = (os.cpu_count() or 1) if threads is None else check_threads(threads)
    return _core.augment_batch(np.ascontiguousarray(img), r.astype(np.int32), f.astype(np.uint8), b, s, h, c,
                               out_dtype, threads)
