"""Window-level evaluation of a slide heatmap, as the seed reports it (``wsitile evaluate``).

The heatmap's windows (the tissue windows that were predicted) are labelled from the tumour mask
(TIFF or ASAP XML) by the engine's centre rule - ``grid.centre_rects`` + ``grid.label_windows``, the
very code that labelled the training windows - and scored with scikit-learn:

- ``auc``: ROC AUC (``roc_auc_score``);
- ``threshold``: the ROC threshold (``roc_curve``) maximising Youden's J = TPR - FPR; among equal J
  the first, i.e. the highest threshold. When J is largest at sklearn's extra "nothing is tumour"
  point (threshold +inf, only for a model no better than chance) the threshold reported is the
  smallest float above the largest probability, which predicts the same and stays valid JSON;
- ``sensitivity`` / ``specificity``: at that threshold, a window being predicted tumour when its
  probability >= the threshold (sklearn's convention, so the sensitivity is the TPR at that point);
- ``recall`` / ``precision``: at 0.5 (precision 0 when nothing is predicted tumour); the seed's recall
  0.97277 below its sensitivity 0.97478 at threshold 0.484 is exactly this;
- ``n_windows``, ``n_tumour``.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np

from .heatmap import Heatmap, grid_cells, load_heatmap
from .masks import atomic_write, written_together

__all__ = [
    "METRIC_KEYS",
    "SEED_KEYS",
    "evaluate_heatmap",
    "format_table",
    "window_labels",
    "window_metrics",
    "write_json",
]

#: The seed's six numbers, in its order.
SEED_KEYS = ("auc", "threshold", "sensitivity", "specificity", "recall", "precision")
#: Exactly the keys of metrics.json.
METRIC_KEYS = (*SEED_KEYS, "n_windows", "n_tumour")


def window_metrics(labels: np.ndarray, probs: np.ndarray) -> dict:
    """The seed's window metrics (module notes) of binary ``labels`` and probabilities ``probs``.

    ValueError when the windows are all of one class (AUC undefined) or the inputs are malformed.
    """
    from sklearn.metrics import precision_score, recall_score, roc_auc_score, roc_curve

    labels = np.asarray(labels)
    probs = np.asarray(probs)
    if labels.ndim != 1 or probs.shape != labels.shape:
        raise ValueError(f"labels {labels.shape} and probs {probs.shape} must be 1-D of one length")
    if labels.size and not np.isin(labels, (0, 1)).all():
        raise ValueError("labels must be 0 (normal) or 1 (tumour)")
    probs = probs.astype(np.float64)
    if not np.isfinite(probs).all():
        raise ValueError("probabilities must be finite")
    truth = labels.astype(bool)
    n, n_tumour = int(truth.size), int(truth.sum())
    if n_tumour == 0 or n_tumour == n:
        kind = "normal" if n_tumour == 0 else "tumour"
        raise ValueError(f"AUC is undefined: all {n} windows are {kind}")
    auc = float(roc_auc_score(truth, probs))
    fpr, tpr, thresholds = roc_curve(truth, probs)
    best = int(np.argmax(tpr - fpr))  # the first maximum: the highest threshold among ties
    threshold = float(thresholds[best])
    if not math.isfinite(threshold):  # sklearn's "nothing predicted tumour" point
        threshold = float(np.nextafter(probs.max(), np.inf))
    predicted = probs >= threshold
    at_half = probs >= 0.5
    return {
        "auc": auc,
        "threshold": threshold,
        "sensitivity": float(predicted[truth].mean()),
        "specificity": float((~predicted[~truth]).mean()),
        "recall": float(recall_score(truth, at_half)),
        "precision": float(precision_score(truth, at_half, zero_division=0)),
        "n_windows": n,
        "n_tumour": n_tumour,
    }


def window_labels(heatmap: Heatmap, mask_path: str | os.PathLike[str], threads: int | None = None) -> np.ndarray:
    """Centre-rule labels (uint8) of the heatmap's windows from a mask TIFF or ASAP XML.

    Needs the heatmap's slide (its downsamples and size). A mask TIFF of another level-0 size, or an
    XML whose tumour polygons all lie wholly outside the slide, is a ValueError naming both files
    (``grid.label_windows``; some outside: a warning).
    """
    from .grid import centre_rects, default_threads, label_windows
    from .slide import Slide

    try:
        slide = Slide(heatmap.slide)
    except (OSError, RuntimeError, ValueError) as exc:
        raise ValueError(f"{heatmap.name}: cannot open its slide {heatmap.slide} ({exc})") from None
    level = int(heatmap.levels[0])
    if level >= slide.level_count:
        raise ValueError(
            f"{heatmap.name}: base level {level} does not exist in slide {heatmap.slide} "
            f"(levels 0..{slide.level_count - 1})"
        )
    d0 = float(slide.level_downsamples[level])
    row, col = grid_cells(heatmap, d0)
    xy = np.stack([col, row], axis=1) * heatmap.stride
    mask_path = Path(mask_path)
    if not mask_path.is_file():
        raise FileNotFoundError(f"{mask_path}: no such mask file")
    threads = default_threads() if threads is None else int(threads)
    return label_windows(slide, mask_path, centre_rects(xy, heatmap.window, heatmap.center, d0), threads)


def write_json(path: str | os.PathLike[str], obj: object) -> None:
    """Write ``obj`` as indented JSON (finite numbers only), atomically."""
    text = json.dumps(obj, indent=2, allow_nan=False) + "\n"
    atomic_write(Path(path), lambda fh: fh.write(text.encode()))


def format_table(metrics: dict) -> str:
    """The seed-style table: one metric a line, values to five decimals, counts as integers."""
    lines = [f"{'metric':<14}{'value':>10}"]
    for key in METRIC_KEYS:
        if key not in metrics:
            continue
        value = metrics[key]
        text = f"{value:d}" if isinstance(value, (int, np.integer)) else f"{value:.5f}"
        lines.append(f"{key:<14}{text:>10}")
    return "\n".join(lines)


def evaluate_heatmap(
    heatmap_path: str | os.PathLike[str],
    mask_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    threads: int | None = None,
) -> dict:
    """Window metrics of a heatmap against a tumour mask; writes ``out_dir/metrics.json`` (exactly
    ``METRIC_KEYS``), ``roc.png`` and ``heatmap_vs_truth.png``; returns the metrics."""
    from .plots import save_heatmap_vs_truth, save_roc

    heatmap = load_heatmap(heatmap_path)
    if len(heatmap) == 0:
        raise ValueError(
            f"{heatmap_path}: heatmap has no windows (the slide's tissue grid is empty): nothing to evaluate"
        )
    labels = window_labels(heatmap, mask_path, threads)
    try:
        metrics = window_metrics(labels, heatmap.probs)
    except ValueError as exc:
        raise ValueError(f"{heatmap_path} (mask {mask_path}): {exc}") from None
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with written_together():  # all three or, on a failure, the previous ones as they were
        save_heatmap_vs_truth(heatmap, mask_path, out_dir / "heatmap_vs_truth.png")
        save_roc(labels, heatmap.probs, out_dir / "roc.png", threshold=metrics["threshold"])
        write_json(out_dir / "metrics.json", metrics)
    return metrics
