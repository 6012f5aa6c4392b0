"""The training configuration (saved as config.json beside the checkpoints) and the model it defines."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, fields
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ..grid import (DEFAULT_CENTER, DEFAULT_LEVELS, DEFAULT_STRIDE, DEFAULT_TISSUE_THRESHOLD, DEFAULT_WINDOW,
                    check_int, check_window_settings)
from ..models import TwoTower

SEED_BOUNDARY = 150  # the seed: `for layer in model.layers[:150]: layer.trainable = False`
MAX_WIDTH = 8.0  # width multipliers above this are typos: 8x is already ~64x the full model's parameters


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a run; saved as config.json beside the checkpoints (predict reads it)."""

    levels: tuple[int, ...] = DEFAULT_LEVELS
    window: int = DEFAULT_WINDOW
    center: int = DEFAULT_CENTER
    stride: int = DEFAULT_STRIDE
    tissue_threshold: float | None = DEFAULT_TISSUE_THRESHOLD
    width: float = 1.0  # InceptionV3 width multiplier (0.25: the small CPU variant)
    weights: str | None = None  # Keras ImageNet HDF5 (notop); None: random initialisation
    fine_tune_from: int | None = None  # Keras layer index boundary; None: 150 with weights, else 0
    optimizer: str = "rmsprop"  # "rmsprop" (Liu et al., TF1 semantics) or "adam"
    learning_rate: float | None = None  # None: 0.002 with weights, 0.05 from scratch (Liu et al.)
    halve_every: int = 2_000_000  # examples per learning-rate halving (Liu et al.)
    batch_size: int = 32
    seed: int = 0
    augment: bool = True
    balanced: bool = True  # tumour/normal sampled 1:1
    dtype: str = "auto"  # compute: "auto" (bfloat16 on GPU, float32 elsewhere), "float32", "bfloat16", "float64" (checks; needs jax_enable_x64)

    def __post_init__(self) -> None:
        # The window settings are checked here too, not only when a grid is built: a typo fails
        # `wsitile train` before any slide is read, and an edited config.json fails `predict` naming it.
        # Whole numbers are taken in any numeric type (NumPy's; 2e6 for halve_every, as older
        # configs saved it) and stored as ints; 80.5 is refused.
        given: Any = self.levels.tolist() if isinstance(self.levels, np.ndarray) else self.levels
        if isinstance(given, Sequence) and not isinstance(given, (str, bytes)):
            given = [_whole("levels", v) for v in given]
        ints = {name: _whole(name, getattr(self, name))
                for name in ("window", "center", "stride", "batch_size", "halve_every", "seed")}
        levels, *_ = check_window_settings(given, ints["window"], ints["center"], ints["stride"], self.tissue_threshold)
        if levels[0] < 0:  # the rest is checked against each slide's pyramid
            raise ValueError(f"levels {levels}: must be >= 0")
        object.__setattr__(self, "levels", levels)
        for name, value in ints.items():
            object.__setattr__(self, name, value)
        if self.fine_tune_from is not None:
            object.__setattr__(self, "fine_tune_from", _whole("fine_tune_from", self.fine_tune_from))
            if self.fine_tune_from < 0:
                raise ValueError(f"fine_tune_from {self.fine_tune_from}: must be >= 0 (a Keras layer index)")
        if self.halve_every < 1:
            raise ValueError(f"halve_every {self.halve_every}: must be >= 1 (examples per learning-rate halving)")
        for name in ("width", "learning_rate", "tissue_threshold"):  # NumPy floats stored as float: JSON takes them
            if getattr(self, name) is not None:
                object.__setattr__(self, name, _real(name, getattr(self, name)))
        for name in ("augment", "balanced"):  # "no" would be true
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise TypeError(f"{name} {getattr(self, name)!r}: must be true or false")
            object.__setattr__(self, name, bool(getattr(self, name)))
        if self.weights is not None and not isinstance(self.weights, (str, os.PathLike)):
            raise TypeError(f"weights {self.weights!r}: must be a path or None")
        if self.weights is not None:
            object.__setattr__(self, "weights", os.fspath(self.weights))
        if self.optimizer not in ("rmsprop", "adam"):
            raise ValueError(f"optimizer {self.optimizer!r}: expected 'rmsprop' or 'adam'")
        if self.dtype not in ("auto", "float32", "bfloat16", "float64"):
            raise ValueError(f"dtype {self.dtype!r}: expected 'auto', 'float32', 'bfloat16' or 'float64'")
        if not 0 < self.width <= MAX_WIDTH:
            raise ValueError(f"width {self.width}: must be > 0 and <= {MAX_WIDTH}")
        if self.weights is not None and self.width != 1.0:
            raise ValueError(f"width {self.width}: ImageNet weights ({self.weights}) need width 1.0")
        if self.batch_size < 1:
            raise ValueError(f"batch_size {self.batch_size}: must be >= 1")
        if self.learning_rate is not None and not 0 < self.learning_rate < float("inf"):
            raise ValueError(f"learning_rate {self.learning_rate}: must be a positive number")

    @property
    def boundary(self) -> int:
        if self.fine_tune_from is not None:
            return int(self.fine_tune_from)
        return SEED_BOUNDARY if self.weights else 0

    @property
    def lr(self) -> float:
        if self.learning_rate is not None:
            return float(self.learning_rate)
        return 0.002 if self.weights else 0.05

    def compute_dtype(self) -> Any:
        if self.dtype == "auto":
            return jnp.bfloat16 if jax.default_backend() == "gpu" else jnp.float32
        return jnp.dtype(self.dtype)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["levels"] = list(self.levels)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any], source: str = "config") -> "TrainConfig":
        """The config saved as `d`; ValueError naming `source` for an unknown, mistyped or out-of-range setting."""
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"{source}: unknown training settings {sorted(unknown)}")
        try:
            return cls(**d)
        except (TypeError, ValueError) as exc:  # a width as a string, a negative threshold
            raise ValueError(f"{source}: its saved settings do not parse ({exc})") from None


def _real(name: str, value: object) -> float:
    """`value` as a float: TypeError for anything but a real number (bool and strings included)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} {value!r}: must be a number")
    return float(value)


def _whole(name: str, value: object) -> int:
    """`value` as an int when it is a whole number of any numeric type; TypeError otherwise (2.5, "2", True)."""
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return int(value)
    return check_int(name, value)


def build_model(cfg: TrainConfig) -> TwoTower:
    return TwoTower(towers=len(cfg.levels), width=cfg.width, dtype=cfg.compute_dtype(), frozen_below=cfg.boundary)

