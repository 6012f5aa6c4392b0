"""The pictures people look at: heatmap over a thumbnail, truth | heatmap | overlay, ROC, FROC and
training curves.

Figures are built on ``matplotlib.figure.Figure`` with the Agg canvas, never through pyplot: no global
backend or figure state, safe to call from any thread and on a machine without a display. Every PNG
is written to a temporary file beside its target and renamed (``masks.atomic_write``).

Heatmaps are drawn in level-0 pixel axes: the grid cell of the window with level-Lb top-left x spans
level-0 [(x + (window - stride) / 2) * d0, (x + (window + stride) / 2) * d0), i.e. a stride-wide square
centred on the window's centre, so cells tile the plane whatever the stride.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .heatmap import Heatmap, base_downsample, grid_image
from .masks import atomic_write

if TYPE_CHECKING:
    from .slide import Slide

__all__ = [
    "Backdrop",
    "heatmap_backdrop",
    "save_froc",
    "save_heatmap_png",
    "save_heatmap_vs_truth",
    "save_roc",
    "save_training_curves",
]

_CMAP = "inferno"
# Largest side of the pictures of a slide, in pixels.
_THUMB_SIDE = 1024


def _figure(width: float, height: float):  # noqa: ANN202 - matplotlib Figure
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, out_png: str | os.PathLike[str]) -> None:  # noqa: ANN001
    path = Path(out_png)
    if path.suffix.lower() != ".png":
        raise ValueError(f"{path}: a figure is written as .png")
    atomic_write(path, lambda fh: fig.savefig(fh, format="png", dpi=fig.dpi))  # the dpi _pool_to_pixels sized for


def _cmap(name: str = _CMAP):  # noqa: ANN202
    import matplotlib

    return matplotlib.colormaps[name].with_extremes(bad=(0.0, 0.0, 0.0, 0.0))  # NaN (no window): clear


def _grid_extent(heatmap: Heatmap, d0: float) -> tuple[float, float, float, float]:
    """imshow extent (left, right, bottom, top) of the grid image in level-0 pixels."""
    rows, cols = heatmap.grid_shape
    off = (heatmap.window - heatmap.stride) / 2 * d0
    step = heatmap.stride * d0
    return (off, off + cols * step, off + rows * step, off)


#: Grid and mask images are drawn over the axes' frame (spines: 2.5), so a window at the slide's edge
#: is not hidden under it.
_OVER_FRAME = 3


def _pool_to_pixels(fig, axes, min_px: float = 1.5) -> None:  # noqa: ANN001 - matplotlib Figure, Axes
    """Max-pool every single-channel image in `axes` so that each of its cells spans at least
    `min_px` of the saved picture's pixels (NaN ignored; a block without a value stays NaN). imshow
    resamples an image larger than its axes by nearest neighbour, which drops whole rows and columns:
    on a Camelyon-size slide's grid (~600 x 300 windows in a ~430 px wide axes) a lone tumour window,
    a micrometastasis, vanished from heatmap.png 8 times in 12 (and a small tumour from the truth
    panel). Pooled by max, the hottest window of each pixel shows. Call once the limits are set."""
    fig.draw_without_rendering()  # constrained layout: the axes' final sizes
    for ax in axes:
        box = ax.get_window_extent()
        (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
        for artist in ax.images:
            shown = artist.get_array()
            if shown is None or shown.ndim != 2 or artist.origin != "upper":  # the RGB thumbnail: not pooled
                continue
            fill = np.nan if np.issubdtype(shown.dtype, np.floating) else 0
            image = np.ma.filled(shown, fill)  # masked cells (matplotlib masks NaN) as the fill, not the data under them
            left, right, bottom, top = artist.get_extent()
            rows, cols = image.shape
            cell_x = abs(right - left) / cols * box.width / max(abs(x1 - x0), 1e-12)
            cell_y = abs(bottom - top) / rows * box.height / max(abs(y1 - y0), 1e-12)
            f = math.ceil(min_px / max(min(cell_x, cell_y), 1e-12))
            if f <= 1:
                continue
            padded = np.full((-(-rows // f) * f, -(-cols // f) * f), fill, dtype=image.dtype)
            padded[:rows, :cols] = image
            blocks = padded.reshape(padded.shape[0] // f, f, padded.shape[1] // f, f)
            pooled = np.fmax.reduce(np.fmax.reduce(blocks, axis=3), axis=1)  # fmax: NaN only where all are
            sx, sy = (right - left) / cols * f, (bottom - top) / rows * f
            artist.set_data(pooled)
            artist.set_extent((left, left + pooled.shape[1] * sx, top + pooled.shape[0] * sy, top))


def _figsize(width: int, height: int, panels: int = 1, side: float = 5.0) -> tuple[float, float]:
    aspect = min(max(height / max(width, 1), 0.25), 4.0)
    return (side * panels + 1.0, side * aspect + 0.8)


def _thumbnail(slide) -> np.ndarray:  # noqa: ANN001 - wsitile.Slide
    """RGB of the finest level whose larger side is <= _THUMB_SIDE * 2 (else the coarsest level)."""
    dims = slide.level_dimensions
    level = next((lvl for lvl, (w, h) in enumerate(dims) if max(w, h) <= 2 * _THUMB_SIDE), len(dims) - 1)
    # One thread: a few dozen tiles, and predict reads it while the loader's threads have the cores.
    return slide.read_level(level, threads=1)


@dataclass(frozen=True)
class Backdrop:
    """What `save_heatmap_png` draws the heatmap over: the opened slide and its thumbnail."""

    slide: Slide
    thumbnail: np.ndarray

    @property
    def dimensions(self) -> tuple[int, int]:
        return self.slide.dimensions


def heatmap_backdrop(slide_path: str | os.PathLike[str]) -> Backdrop:
    """The slide's part of `save_heatmap_png`, with matplotlib imported: `predict` prepares it in a
    thread while the windows are predicted (import and thumbnail ~0.7 s of the ~1.1 s its files took
    after the loop on the development machine)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: F401 - imported here, off the critical path
    from matplotlib.figure import Figure  # noqa: F401

    from .slide import Slide

    slide = Slide(slide_path)
    return Backdrop(slide, _thumbnail(slide))


def save_heatmap_png(
    heatmap: Heatmap,
    slide_path: str | os.PathLike[str],
    out_png: str | os.PathLike[str],
    *,
    backdrop: Backdrop | None = None,
) -> None:
    """Tumour probabilities over a thumbnail of the slide (windows without a prediction: clear).
    `backdrop`: `heatmap_backdrop(slide_path)`, when the caller prepared it."""
    backdrop = heatmap_backdrop(slide_path) if backdrop is None else backdrop
    level = int(heatmap.levels[0])
    backdrop.slide.check_level(level)
    d0 = float(backdrop.slide.level_downsamples[level])
    image = grid_image(heatmap, d0)
    width, height = backdrop.dimensions
    fig = _figure(*_figsize(width, height))
    ax = fig.add_subplot()
    ax.imshow(backdrop.thumbnail, extent=(0, width, height, 0), interpolation="antialiased")
    im = ax.imshow(image, cmap=_cmap(), vmin=0.0, vmax=1.0, alpha=0.6, extent=_grid_extent(heatmap, d0),
                   interpolation="nearest", zorder=_OVER_FRAME)
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    ax.set_title(f"{Path(str(slide_path)).name}: tumour probability ({len(heatmap)} windows)")
    ax.set_xlabel("x (level-0 px)")
    ax.set_ylabel("y (level-0 px)")
    fig.colorbar(im, ax=ax, shrink=0.8, label="probability")
    _pool_to_pixels(fig, [ax])
    _save(fig, out_png)


def save_heatmap_vs_truth(
    heatmap: Heatmap,
    mask_path: str | os.PathLike[str],
    out_png: str | os.PathLike[str],
    *,
    slide_size: tuple[int, int] | None = None,
    downsample: float | None = None,
) -> None:
    """Three panels side by side: the true tumour mask | the predicted heatmap | both overlaid.

    The mask is read at the power-of-two downsample that brings the slide's larger side to at most
    1024 px (any tumour pixel marks its thumbnail pixel). ``slide_size`` (level-0 width, height) and
    ``downsample`` (d0) default to the heatmap's slide.
    """
    from .froc import read_mask_level

    if slide_size is None:
        from .slide import Slide

        slide_size = Slide(heatmap.slide).dimensions
    d0 = base_downsample(heatmap) if downsample is None else float(downsample)
    width, height = int(slide_size[0]), int(slide_size[1])
    ds = 2 ** max(0, math.ceil(math.log2(max(width, height) / _THUMB_SIDE)))
    truth = read_mask_level(mask_path, ds, slide_size=(width, height), slide_path=heatmap.slide)
    image = grid_image(heatmap, d0)
    extent_truth = (0, truth.shape[1] * ds, truth.shape[0] * ds, 0)
    extent_grid = _grid_extent(heatmap, d0)
    fig = _figure(*_figsize(width, height, panels=3, side=4.0))
    axes = fig.subplots(1, 3, sharex=True, sharey=True)
    axes[0].imshow(truth, cmap="gray", vmin=0, vmax=1, extent=extent_truth, interpolation="nearest", zorder=_OVER_FRAME)
    axes[0].set_title(f"true tumour mask ({Path(str(mask_path)).name})")
    axes[1].set_facecolor("#202020")
    im = axes[1].imshow(image, cmap=_cmap(), vmin=0.0, vmax=1.0, extent=extent_grid, interpolation="nearest",
                        zorder=_OVER_FRAME)
    axes[1].set_title("predicted tumour probability")
    axes[2].imshow(truth, cmap="gray", vmin=0, vmax=1, extent=extent_truth, interpolation="nearest", zorder=_OVER_FRAME)
    axes[2].imshow(image, cmap=_cmap(), vmin=0.0, vmax=1.0, alpha=0.55, extent=extent_grid, interpolation="nearest",
                   zorder=_OVER_FRAME)
    if truth.any():
        cx = (np.arange(truth.shape[1]) + 0.5) * ds  # thumbnail pixel centres in level-0 pixels
        cy = (np.arange(truth.shape[0]) + 0.5) * ds
        axes[2].contour(cx, cy, truth.astype(np.float32), levels=[0.5], colors="cyan", linewidths=0.8,
                        zorder=_OVER_FRAME + 1)
    axes[2].set_title("overlay (truth outlined)")
    for ax in axes:
        ax.set_xlim(0, width)
        ax.set_ylim(height, 0)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(im, ax=list(axes), shrink=0.8, label="probability")
    _pool_to_pixels(fig, axes)  # small tumours and hot windows stay visible; the contour is the full mask's
    _save(fig, out_png)


def save_roc(
    labels: np.ndarray,
    probs: np.ndarray,
    out_png: str | os.PathLike[str],
    *,
    threshold: float | None = None,
    title: str | None = None,
) -> None:
    """ROC curve of window labels vs probabilities, with its AUC; ``threshold`` marked when given."""
    from sklearn.metrics import roc_auc_score, roc_curve

    labels = np.asarray(labels).astype(bool)
    probs = np.asarray(probs, dtype=np.float64)
    fpr, tpr, _ = roc_curve(labels, probs)
    auc = roc_auc_score(labels, probs)
    fig = _figure(5.0, 5.0)
    ax = fig.add_subplot()
    ax.plot(fpr, tpr, color="#c0392b", lw=1.8, label=f"ROC (AUC = {auc:.5f})")
    ax.plot([0, 1], [0, 1], color="0.6", lw=0.8, ls="--", label="chance")
    if threshold is not None:
        pred = probs >= threshold
        sens, fp = pred[labels].mean(), pred[~labels].mean()
        ax.plot([fp], [sens], "o", color="#2c3e50", label=f"threshold {threshold:.5f}")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("false positive rate (1 - specificity)")
    ax.set_ylabel("true positive rate (sensitivity)")
    ax.set_title(title or f"window ROC ({labels.size} windows, {int(labels.sum())} tumour)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    _save(fig, out_png)


def save_froc(
    fps: np.ndarray,
    sensitivity: np.ndarray,
    out_png: str | os.PathLike[str],
    *,
    score: float | None = None,
    fp_rates: Sequence[float] | None = None,
    sensitivities: Sequence[float] | None = None,
    title: str | None = None,
) -> None:
    """FROC curve (average false positives per slide vs lesion sensitivity), the score's points marked."""
    fps = np.asarray(fps, dtype=np.float64)
    sensitivity = np.asarray(sensitivity, dtype=np.float64)
    fig = _figure(6.0, 4.5)
    ax = fig.add_subplot()
    if fps.size:
        ax.plot(fps, sensitivity, "-", color="#000000", lw=1.5, label="FROC")
        rightmost = int(np.argmax(fps))  # np.interp continues the curve flat beyond its largest FP rate
        if fps[rightmost] < 8.5:
            ax.plot([fps[rightmost], 8.5], [sensitivity[rightmost]] * 2, "--", color="#000000", lw=1.0,
                    label="held flat beyond the curve (np.interp)")
    if fp_rates is not None and sensitivities is not None:
        ax.plot(fp_rates, sensitivities, "o", color="#c0392b", label="at 1/4, 1/2, 1, 2, 4, 8 FP/slide")
    ax.set_xlabel("average number of false positives per slide")
    ax.set_ylabel("metastasis detection sensitivity")
    ax.set_ylim(0, 1.02)
    ax.set_yticks(np.linspace(0, 1.0, 11))
    ax.set_xlim(0, max(8.5, float(fps.max()) * 1.02 if fps.size else 0.0))
    ax.grid(alpha=0.4)
    ax.set_title(title or ("FROC" if score is None else f"FROC (score {score:.5f})"))
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="lower right")
    _save(fig, out_png)


def _x_axis(history: Mapping[str, Sequence[float]], key: str, n: int) -> tuple[np.ndarray, str]:
    """The x values of a series of length n: the first of ``<key>_step``, ``<key>_epoch``, then for each
    prefix of the key (``val_auc`` -> ``val``) ``<prefix>_step`` / ``<prefix>_epoch``, then ``step`` /
    ``epoch``, that has length n; else 1..n."""
    parts = key.split("_")
    prefixes = ["_".join(parts[:i]) for i in range(len(parts), 0, -1)]
    names = [f"{p}_{axis}" for p in prefixes for axis in ("step", "epoch")] + ["step", "epoch"]
    for name in names:
        values = history.get(name)
        if values is not None and len(values) == n:
            return np.asarray(values, dtype=np.float64), ("epoch" if name.endswith("epoch") else "step")
    return np.arange(1, n + 1, dtype=np.float64), "index"


def save_training_curves(history: Mapping[str, Sequence[float]], out_png: str | os.PathLike[str]) -> None:
    """Loss (left) and validation AUC (right) against step or epoch.

    ``history`` maps series names to lists: those whose name contains "loss" go left, "auc" right;
    x values come from ``step`` / ``epoch`` lists of the same length, or from a series' own
    ``<name>_step`` or ``<prefix>_step`` (``val_step`` for ``val_auc``), else 1..n. A panel without
    data says so (an empty history still gives a picture).
    """

    def series(word: str) -> list[str]:
        return [
            k for k, v in history.items()
            if word in k.lower() and not k.endswith(("_step", "_epoch")) and v is not None and len(v)
        ]

    losses, aucs = series("loss"), series("auc")
    fig = _figure(10.0, 4.0)
    ax_loss, ax_auc = fig.subplots(1, 2)
    for ax, keys, ylabel in ((ax_loss, losses, "loss"), (ax_auc, aucs, "AUC")):
        xlabel = "step"
        for key in keys:
            y = np.asarray(history[key], dtype=np.float64)
            x, xlabel = _x_axis(history, key, len(y))
            ax.plot(x, y, "-o" if len(y) <= 30 else "-", ms=3, lw=1.4, label=key)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if keys:
            ax.legend()
        else:
            ax.text(0.5, 0.5, f"no {ylabel} recorded", ha="center", va="center", transform=ax.transAxes)
    if aucs:
        ax_auc.set_ylim(max(0.0, ax_auc.get_ylim()[0]), 1.01)
    ax_loss.set_title("training loss")
    ax_auc.set_title("validation AUC")
    _save(fig, out_png)
