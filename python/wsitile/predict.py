"""Tumour-probability heatmaps: the trained two-tower model over every tissue window of a slide."""

from __future__ import annotations

import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

import flax
import jax

from .grid import check_int, validate
from .loader import Loader
from .masks import require_memory, written_together
from .slide import Slide
from .training.checkpoints import (
    checkpoint_config,
    inference_target,
    mismatch_error,
    read_checkpoint_meta,
    read_model_arrays,
    saved_shapes,
)
from .training.steps import steps_for


def default_batch_size(window: int, tta: bool = False) -> int:
    """Windows per model call: on an accelerator 512 (256 for windows over 128 px), the batches the
    GPU suite measured (BENCHMARKS.md: 80 px at 512, 299 px at 256); a smaller one leaves the device
    waiting on launches. On a CPU 64: the model is the bottleneck there and memory stays small. With
    `tta` an eighth (at least 8): the model sees each window 8 times, so the device's work and memory
    per call stay the same."""
    base = 64 if jax.default_backend() == "cpu" else 512 if window <= 128 else 256
    return max(8, base // 8) if tta else base


def predict_slide(
    slide: str | os.PathLike[str],
    checkpoint: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    stride: int | None = None,
    tta: bool = False,
    batch_size: int | None = None,
    threads: int | None = None,
    progress: bool = True,
) -> dict[str, float]:
    """Write OUT_DIR/heatmap.npz and OUT_DIR/heatmap.png; return {"windows", "rate", "start", "loop",
    "write"} for the summary (rate: windows per second of the prediction loop; the others: seconds).

    Levels, window and centre come from the checkpoint's configuration; `stride` defaults to the
    window, `batch_size` to `default_batch_size`. With `tta` each window's probability is the mean
    over its 8 dihedral orientations. Memory is the model plus a few batches plus the heatmap
    (coordinates and one float per tissue window).

    For many slides call `predict_slides` once rather than this in a loop: each call reads the
    checkpoint again (~1 s at full width), and orbax/TensorStore keep a little of every read for the
    process's life (0.6 MB per read at width 0.125, ~5 MB at full width, 2026-12-01).
    """
    return predict_slides([slide], checkpoint, [out_dir], stride=stride, tta=tta, batch_size=batch_size,
                          threads=threads, progress=progress)[0]


def predict_slides(
    slides: Sequence[str | os.PathLike[str]],
    checkpoint: str | os.PathLike[str],
    out_dirs: Sequence[str | os.PathLike[str]],
    *,
    stride: int | None = None,
    tta: bool = False,
    batch_size: int | None = None,
    threads: int | None = None,
    progress: bool = True,
    on_slide: Callable[[int, dict[str, float]], None] | None = None,
) -> list[dict[str, float]]:
    """`predict_slide` for each slide into its folder (`out_dirs[i]`), with the model read and
    compiled once, and each next slide's tissue grid built while the current one's windows are
    predicted. `on_slide(i, summary)` is called as each slide's files are written. Every slide is
    opened and checked against the model's levels and window first: one that fails stops the run
    before any work; a slide that fails later (a corrupt tile) stops it with its error, after the
    earlier slides' files are complete.
    A slide's "start" is the wait for its grid and, for the first, the model's start."""
    from tqdm import tqdm

    from .heatmap import Heatmap, save_heatmap
    from .plots import heatmap_backdrop, save_heatmap_png

    t0 = time.perf_counter()
    slides, folders = list(slides), [Path(d) for d in out_dirs]
    if len(slides) != len(folders) or not slides:
        raise ValueError(f"{len(slides)} slides for {len(folders)} output folders: give one folder per slide")
    if batch_size is not None and check_int("batch_size", batch_size) < 1:
        raise ValueError(f"batch_size {batch_size}: must be >= 1")
    run_dir, ckpt_step, cfg = checkpoint_config(checkpoint)
    stride = cfg.window if stride is None else check_int("stride", stride)  # 80.7 is refused, not truncated
    batch_size = default_batch_size(cfg.window, tta) if batch_size is None else int(batch_size)
    for slide in slides:  # every slide opened and checked against the model's levels before any work
        validate(Slide(slide), cfg.levels, cfg.window, cfg.center, stride)
    # A padded batch and its copy on the host, checked before compiling for it (it failed only in the loop).
    require_memory(float(batch_size) * len(cfg.levels) * cfg.window**2 * 3 * 2,
                   f"batch_size {batch_size}: a batch of {cfg.window} px windows")

    def open_loader(slide: str | os.PathLike[str]) -> Loader:
        return Loader(
            [(slide, None)],
            levels=cfg.levels,
            window=cfg.window,
            center=cfg.center,
            stride=stride,
            tissue_threshold=cfg.tissue_threshold,
            batch_size=batch_size,
            threads=threads,
            shuffle=False,
        )

    # The slide's tissue mask and grid (seconds on a Camelyon-size slide; NumPy and scipy release the
    # GIL) and the checkpoint's arrays (as NumPy, from the shapes saved with it) are read in threads
    # while this one starts JAX's backend (CUDA: a second or more; nothing before this line starts
    # it) and compiles the model from those shapes (or loads it from the caches): no warm-up batch,
    # and a read that waits on storage (a cluster's network disk) overlaps both. From a warm local
    # disk the read and the trace are both GIL-bound Python and gain little from it (2026-12-01).
    meta = read_checkpoint_meta(run_dir, ckpt_step)
    shapes = saved_shapes(meta)
    pool = ThreadPoolExecutor(2, thread_name_prefix="wsitile-predict")
    pending_loader: Future | None = pool.submit(open_loader, slides[0])
    pending_arrays: Future | None = None
    if shapes is not None:
        pending_arrays = pool.submit(read_model_arrays, run_dir, ckpt_step, cfg, shapes)
    try:
        steps = steps_for(cfg)
        target = inference_target(cfg, steps, meta)
        if pending_arrays is None:  # a checkpoint without saved shapes: they had to be traced first
            pending_arrays = pool.submit(read_model_arrays, run_dir, ckpt_step, cfg, target)
        for pending in (pending_loader, pending_arrays):
            if pending is not None and pending.done():
                pending.result()  # a slide or checkpoint that cannot be read fails before the compile
        # Compile now, not inside the loop: the loop's rate is then the model's and the loader's.
        try:
            step = steps.compile_predict(target, batch_size, tta=tta)
        except flax.errors.FlaxError as exc:  # the saved shapes do not fit this version's model
            raise mismatch_error(run_dir, ckpt_step, cfg, exc) from None
        variables = jax.device_put(pending_arrays.result(), steps.replicated)  # one transfer

        summaries: list[dict[str, float]] = []
        for i, (slide, out_dir) in enumerate(zip(slides, folders)):
            assert pending_loader is not None
            loader, pending_loader = pending_loader.result(), None  # never empty: the Loader refuses a
            # slide without tissue windows
            grid = loader.grids[0]
            out_dir.mkdir(parents=True, exist_ok=True)
            probs = np.empty(len(grid), np.float32)
            start = time.perf_counter()
            # The next slide's grid, and this one's picture backdrop (thumbnail, matplotlib's import:
            # ~0.7 s), while the windows are predicted: the loop's host side is the loader's C++
            # threads and waits on the device, which leave the GIL free.
            if i + 1 < len(slides):
                pending_loader = pool.submit(open_loader, slides[i + 1])
            backdrop = pool.submit(heatmap_backdrop, slide)
            with loader, tqdm(total=len(grid), unit="win", desc="predict", disable=not progress or None) as bar:
                in_flight: tuple[np.ndarray, jax.Array] | None = None
                for batch in loader:  # grid order: sample_index runs 0..N-1
                    dispatched = (batch["sample_index"], steps.predict_async(variables, batch["images"], step=step,
                                                                             pad_to=batch_size))
                    if in_flight is not None:  # read the previous batch once this one is queued on the device
                        bar.update(_collect(in_flight, probs))
                    in_flight = dispatched
                if in_flight is not None:
                    bar.update(_collect(in_flight, probs))
            loop = time.perf_counter() - start

            heatmap = Heatmap(
                coords=grid.coords,
                probs=probs,
                levels=np.asarray(cfg.levels, np.int64),
                window=cfg.window,
                center=cfg.center,
                stride=stride,
                grid_shape=grid.grid_shape,
                slide=os.path.abspath(slide),
            )
            with written_together():  # the pair or nothing; a failure keeps the previous pair
                save_heatmap(out_dir / "heatmap.npz", heatmap)
                save_heatmap_png(heatmap, slide, out_dir / "heatmap.png", backdrop=backdrop.result())
            summaries.append({"windows": float(len(grid)), "rate": len(grid) / max(loop, 1e-9),
                              "start": start - t0, "loop": loop, "write": time.perf_counter() - start - loop})
            if on_slide is not None:
                on_slide(i, summaries[-1])
            t0 = time.perf_counter()  # the next slide's start: the wait for its grid
        return summaries
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        if pending_loader is not None:  # a grid opened for a slide never reached (an error before it)
            pending_loader.add_done_callback(_close_loader)


def _collect(in_flight: tuple[np.ndarray, jax.Array], probs: np.ndarray) -> int:
    idx, out = in_flight
    probs[idx] = np.asarray(out)[: len(idx)]
    return len(idx)


def _close_loader(done: Future) -> None:
    if not done.cancelled() and done.exception() is None:
        done.result().close()
