"""wsitile: fast, deterministic sliding-window extraction from whole-slide images.

A C++17 engine (the `_core` extension) reads slides through libopenslide without the GIL, cuts
concentric multi-scale windows, labels them from tumour masks and hands zero-copy NumPy batches to
training code. Nothing here imports JAX: the model lives in `wsitile.models` (extra `wsitile[train]`).
"""

from importlib.metadata import PackageNotFoundError, version

from .augment import AugmentConfig, augment_batch
from .grid import Grid, build_grid
from .loader import Loader, SlideChangedError
from .slide import Slide

try:
    __version__ = version("wsitile")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "AugmentConfig",
    "Grid",
    "Loader",
    "Slide",
    "SlideChangedError",
    "__version__",
    "augment_batch",
    "build_grid",
]
