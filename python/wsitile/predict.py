"""Tumour-probability heatmaps: the trained two-tower model over every tissue window of a slide."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

import jax
import jax.numpy as jnp

from .loader import Loader
from .train import load_for_inference


def dihedral(images: jax.Array) -> jax.Array:
    """(N, T, H, W, 3) -> (8N, T, H, W, 3): the 8 orientations (4 rotations, with and without a flip)
    of every sample, both towers turned together, orientation-major."""
    out: list[jax.Array] = []
    for flipped in (images, images[:, :, :, ::-1]):
        out.extend(jnp.rot90(flipped, k, axes=(2, 3)) for k in range(4))
    return jnp.concatenate(out)


def predict_slide(
    slide: str | os.PathLike[str],
    checkpoint: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    stride: int | None = None,
    tta: bool = False,
    batch_size: int = 64,
    threads: int | None = None,
    progress: bool = True,
) -> dict[str, float]:
    """Write OUT_DIR/heatmap.npz and OUT_DIR/heatmap.png; return {"windows", "rate"} for the summary.

    Levels, window and centre come from the checkpoint's configuration; `stride` defaults to the
    window. With `tta` each window's probability is the mean over its 8 dihedral orientations. Memory
    is the model plus one batch plus the heatmap (coordinates and one float per tissue window).
    """
    from tqdm import tqdm

    from .heatmap import Heatmap, save_heatmap
    from .plots import save_heatmap_png

    out_dir = Path(out_dir)
    if batch_size < 1:
        raise ValueError(f"batch_size {batch_size}: must be >= 1")
    cfg, steps, variables = load_for_inference(checkpoint)
    stride = cfg.window if stride is None else int(stride)
    loader = Loader(
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
    grid = loader.grids[0]  # never empty: the Loader refuses a slide without tissue windows, naming it
    out_dir.mkdir(parents=True, exist_ok=True)

    step = None  # the model's own predict_step
    if tta:
        step = jax.jit(
            lambda v, x: steps.model_probs(v, dihedral(x)).reshape(8, -1).mean(axis=0),
            in_shardings=(steps.replicated, steps.batch_sharding),
            out_shardings=steps.batch_sharding,
        )

    probs = np.empty(len(grid), np.float32)
    start = time.perf_counter()
    with loader, tqdm(total=len(grid), unit="win", desc="predict", disable=not progress or None) as bar:
        for batch in loader:  # grid order: sample_index runs 0..N-1
            idx = batch["sample_index"]
            probs[idx] = steps.predict(variables, batch["images"], step=step, pad_to=batch_size)
            bar.update(len(idx))
    rate = len(grid) / max(time.perf_counter() - start, 1e-9)

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
    save_heatmap(out_dir / "heatmap.npz", heatmap)
    save_heatmap_png(heatmap, slide, out_dir / "heatmap.png")
    return {"windows": float(len(grid)), "rate": rate}
