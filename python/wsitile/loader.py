"""`wsitile.Loader`: multithreaded, deterministic batches of multi-scale window pairs."""

from __future__ import annotations

import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterator, Sequence

import numpy as np

from dataclasses import astuple

from . import _core, jpeg_tiles
from .augment import AugmentConfig
from .grid import (
    DEFAULT_CENTER,
    DEFAULT_LEVELS,
    DEFAULT_STRIDE,
    DEFAULT_TISSUE_THRESHOLD,
    DEFAULT_WINDOW,
    MAX_THREADS,
    Grid,
    build_grid,
    check_threads,
    default_threads,
)
from .slide import Slide

SlideSpec = tuple["str | os.PathLike[str]", "str | os.PathLike[str] | None"]

logger = logging.getLogger(__name__)

#: Largest cache_mb / tile_cache_mb accepted (1 TiB).
MAX_CACHE_MB = 2**20

#: A slide file deleted or replaced while a loader reads it (a RuntimeError).
SlideChangedError = _core.SlideChangedError


class Loader:
    """Batches of window pairs from slides, cut by a C++ thread pool.

    `slides` is a list of (slide path, mask path or None for a normal slide); masks are TIFFs aligned
    with the slide or ASAP XML. Each batch is a dict of NumPy arrays that own their memory:

    - ``images`` uint8 (B, T, window, window, 3), one window per tower level, concentric;
    - ``labels`` uint8 (B,), the centre-square rule of `wsitile.grid`;
    - ``coords`` int64 (B, 2), level-0 (x, y) of tower 0's top-left;
    - ``slide_index`` int32 (B,), the slide's position in `slides`;
    - ``sample_index`` int64 (B,), the window's row in `samples` (the concatenated grids).

    Opening builds every slide's grid (`wsitile.build_grid`: tissue mask, centre labels) and reads
    its JPEG tile table, several slides at once when `threads` allows (about 2 s per Camelyon-size
    slide on one core).

    `augment` (True for the seed's ranges, or an `AugmentConfig`) applies the random orientation and
    colour jitter inside the workers, in the same pass that cuts the windows; a sample's parameters
    depend only on (seed, epoch, position in the epoch) and both towers share them. `out_dtype` is
    "uint8" (default, for host-to-device traffic), "float32" ([0, 1]) or "inception" ([-1, 1]).

    Iterating yields the rest of the current epoch; the next iteration starts the next epoch. Order
    and content depend only on (seed, epoch, position), not on `threads`. `get_state()` /
    `set_state()` save and restore the position for checkpoints.

    `cache_mb` bounds the RGB block cache the workers share: windows are assembled from blocks read
    once (slides with integral downsamples). With ``decoder="auto"`` (default) the blocks of a tiled
    JPEG TIFF (Camelyon16's format) are its tiles, decoded straight from the file with libjpeg-turbo,
    several times faster than OpenSlide's read_region and checked per level to give its exact pixels
    (`wsitile.jpeg_tiles`); they are used in any order, since a miss costs what OpenSlide's own tile
    cache pays on its misses. In shuffled (or balanced) epochs, a tower level whose tiles would
    mostly miss the cache (less than about half the blocks it can touch fit in what the smaller
    levels leave) skips the cache instead: each window is decoded from just its part of each tile
    (libjpeg-turbo's partial decoding, checked per level to give the whole tile's pixels), about half
    a tile decode's work; ``tile_regions=False`` keeps whole tiles cached regardless. With
    ``cache_mb=0`` (no block cache) every JPEG tower cuts its windows from tile parts, in any order
    (about 2x one OpenSlide read per window). Other slides, and
    ``decoder="openslide"``, use 256x256 blocks read
    through OpenSlide, in shuffled order only when all blocks the epoch can touch fit (else one
    OpenSlide read per window). `decoders` says which path each tower takes. `tile_cache_mb` bounds OpenSlide's
    own decoded-tile cache, one cache shared by all the loader's slides (0: no tile caching). Memory
    therefore stays within cache_mb + tile_cache_mb + the batches in flight (about 2 x threads chunks).

    Faults (RELIABILITY.md). A sample OpenSlide cannot read (a corrupt or truncated tile) is judged
    on a fresh handle of its own - OpenSlide kills a handle at its first error, and the loader then
    swaps in a new one, so one bad tile does not fail the rest of the slide. With ``on_error="raise"``
    (default) the batch raises RuntimeError naming the slide, level and level-0 coordinates (the
    position stays at that batch: iterating again retries it); with ``on_error="skip"`` the sample is
    left out of its batch, which comes out shorter (a batch whose samples all failed is not yielded),
    and a warning naming slide and coordinates goes to the ``wsitile.loader`` logger; `num_skipped`
    counts them. Which samples are skipped depends only on the files, never on threads or timing.
    Every slide file's identity (device, inode, size, mtime) is recorded at open and checked at the
    start of each epoch, after each chunk of reads and when a read fails: a file deleted or replaced
    while in use raises `SlideChangedError` (both modes) rather than mixing pixels of two files.
    """

    def __init__(
        self,
        slides: Sequence[SlideSpec],
        *,
        levels: Sequence[int] = DEFAULT_LEVELS,
        window: int = DEFAULT_WINDOW,
        center: int = DEFAULT_CENTER,
        stride: int = DEFAULT_STRIDE,
        batch_size: int = 64,
        threads: int | None = None,
        shuffle: bool = True,
        balanced: bool = False,
        seed: int = 0,
        tissue_threshold: float | None = DEFAULT_TISSUE_THRESHOLD,
        drop_last: bool = False,
        cache_mb: int = 512,
        augment: "bool | AugmentConfig" = False,
        out_dtype: str = "uint8",
        tile_cache_mb: int = 32,
        on_error: str = "raise",
        decoder: str = "auto",
        tile_regions: bool = True,
    ):
        for name, value in (
            ("batch_size", batch_size),
            ("threads", threads),
            ("seed", seed),
            ("cache_mb", cache_mb),
            ("tile_cache_mb", tile_cache_mb),
        ):
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer))):
                raise TypeError(f"{name} {value!r}: must be an integer")
        threads = min(default_threads(), MAX_THREADS) if threads is None else check_threads(threads)
        if batch_size < 1:
            raise ValueError(f"batch_size {batch_size}: must be >= 1")
        for name, value in (("cache_mb", cache_mb), ("tile_cache_mb", tile_cache_mb)):
            if not 0 <= value <= MAX_CACHE_MB:
                raise ValueError(f"{name} {value}: must be in [0, {MAX_CACHE_MB}]")
        if decoder not in ("auto", "openslide"):
            raise ValueError(f"decoder {decoder!r}: expected 'auto' or 'openslide'")
        if not isinstance(tile_regions, (bool, np.bool_)):
            raise TypeError(f"tile_regions {tile_regions!r}: must be a bool")
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error {on_error!r}: expected 'raise' or 'skip'")
        self.on_error = on_error
        self.num_skipped = 0
        self._skipped_lock = threading.Lock()
        if not 0 <= seed < 2**64:
            raise ValueError(f"seed {seed}: must be in [0, 2**64)")
        specs = [_spec(s) for s in slides]
        if not specs:
            raise ValueError("slides: the list is empty")
        use_jpeg_tiles = decoder == "auto" and jpeg_tiles.ensure_libjpeg()
        # Slides are prepared in parallel, each with its share of the threads: a Camelyon-size slide's
        # tissue mask and grid take ~2 s, mostly NumPy and scipy.ndimage, which release the GIL, so
        # 270 training slides took minutes one after the other.
        workers = max(1, min(threads, len(specs)))
        per_slide = max(1, threads // workers)

        def prepare(spec: tuple[str, str | None]) -> tuple[Grid, _core.JpegTileLayout | None]:
            path, mask = spec
            slide = Slide(path)
            grid = build_grid(slide, mask, levels=levels, window=window, center=center, stride=stride,
                              tissue_threshold=tissue_threshold, threads=per_slide)
            layout = None
            if use_jpeg_tiles:  # only the tower levels' pages (a Camelyon16 level 0 has ~80,000 tiles)
                layout = jpeg_tiles.tile_layout(path, {slide.level_dimensions[lvl] for lvl in grid.levels})
            return grid, layout

        if workers == 1:
            prepared = [prepare(spec) for spec in specs]
        else:
            pool = ThreadPoolExecutor(workers, thread_name_prefix="wsitile-slides")
            try:  # the first failing slide (in list order) raises, naming it
                prepared = list(pool.map(prepare, specs))
            finally:
                pool.shutdown(wait=True, cancel_futures=True)
        self.grids: list[Grid] = [grid for grid, _ in prepared]
        layouts = [layout for _, layout in prepared] if use_jpeg_tiles else []
        if sum(len(g) for g in self.grids) == 0:
            raise ValueError(
                f"no windows: the tissue filter (threshold {tissue_threshold}) kept none in "
                + ", ".join(os.fspath(p) for p, _ in specs)
            )
        self.slides = [os.fspath(p) for p, _ in specs]
        self.levels = tuple(int(lvl) for lvl in levels)
        self.window, self.center, self.stride = int(window), int(center), int(stride)
        self.batch_size = int(batch_size)
        if augment is True:
            augment = AugmentConfig()
        if augment is not False and augment is not None and not isinstance(augment, AugmentConfig):
            raise TypeError(f"augment {augment!r}: expected a bool or a wsitile.AugmentConfig")
        self.augment = augment or None
        if out_dtype not in ("uint8", "float32", "inception"):
            raise ValueError(f"out_dtype {out_dtype!r}: expected 'uint8', 'float32' or 'inception'")
        self.out_dtype = out_dtype
        xy = np.concatenate([g.xy for g in self.grids])
        self.slide_index = np.concatenate([np.full(len(g), i, dtype=np.int32) for i, g in enumerate(self.grids)])
        self.labels = np.concatenate([g.labels for g in self.grids])
        self.coords = np.concatenate([g.coords for g in self.grids])
        self._core = _core.Loader(
            self.slides,
            self.slide_index,
            np.ascontiguousarray(xy[:, 0]),
            np.ascontiguousarray(xy[:, 1]),
            self.labels,
            list(self.levels),
            self.window,
            min(self.batch_size, 2**62),  # any batch_size above the sample count behaves the same
            threads,
            bool(shuffle),
            bool(balanced),
            bool(drop_last),
            int(seed),
            int(cache_mb) * 1024 * 1024,
            None if self.augment is None else astuple(self.augment),
            out_dtype,
            int(tile_cache_mb) * 1024 * 1024,
            on_error,
            layouts,
            bool(tile_regions),
        )

    @property
    def num_samples(self) -> int:
        """Windows in one epoch (all slides' grids together)."""
        return int(self._core.num_samples)

    def __len__(self) -> int:
        """Batches per epoch."""
        return int(self._core.batches_per_epoch)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        while (batch := self._core.next()) is not None:
            skipped = batch.pop("skipped", None)
            if skipped:
                with self._skipped_lock:  # several threads may iterate one loader
                    self.num_skipped += len(skipped)
                for sample, slide, x0, y0, message in skipped:
                    logger.warning(
                        "skipped sample %d of %s at level-0 (%d, %d): %s", sample, self.slides[slide], x0, y0, message
                    )
                if len(batch["labels"]) == 0:
                    continue
            yield batch

    @property
    def decoders(self) -> list[tuple[str, ...]]:
        """Per slide, per tower: "libjpeg" where blocks are JPEG tiles decoded straight from the file
        (whole and cached, or each window's part of them: `tile_regions_used`), "openslide" where pixels
        come through OpenSlide's read_region."""
        return [
            tuple("libjpeg" if self._core.decodes_jpeg_tiles(s, t) else "openslide" for t in range(len(self.levels)))
            for s in range(len(self.slides))
        ]

    @property
    def tile_regions_used(self) -> list[tuple[bool, ...]]:
        """Per slide, per tower: True where each window is decoded from just its part of the JPEG tiles
        it overlaps, bypassing the block cache (shuffled levels that would thrash it, or cache_mb=0)."""
        return [
            tuple(bool(self._core.decodes_tile_regions(s, t)) for t in range(len(self.levels)))
            for s in range(len(self.slides))
        ]

    def get_state(self) -> dict[str, int]:
        return dict(self._core.get_state())

    def set_state(self, state: dict[str, Any]) -> None:
        missing = {"seed", "epoch", "index"} - set(state)
        if missing:
            raise ValueError(f"loader state lacks {sorted(missing)}")
        values = {k: int(state[k]) for k in ("seed", "epoch", "index")}
        for k, hi in (("seed", 2**64), ("epoch", 2**63), ("index", 2**63)):  # the C++ uint64/int64
            if not 0 <= values[k] < hi:
                raise ValueError(f"loader state {k} {values[k]}: out of range [0, {hi})")
        self._core.set_state(values)

    def close(self) -> None:
        """Stop the worker threads (also done when the loader is garbage-collected)."""
        self._core.close()

    def __enter__(self) -> "Loader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _spec(item: Any) -> tuple[str, str | None]:
    if isinstance(item, (str, os.PathLike)):
        return os.fspath(item), None
    try:
        path, mask = item
    except (TypeError, ValueError):
        raise ValueError(f"slides: expected (slide path, mask path or None), got {item!r}") from None
    return os.fspath(path), None if mask is None else os.fspath(mask)
