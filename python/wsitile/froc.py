"""Camelyon16 challenge metrics: lesion candidates, the lesion-level FROC and the slide-level AUC.

The FROC replicates the organisers' ``Evaluation_FROC.py`` (Camelyon16, B. Ehteshami Bejnordi), step
by step; the functions below name the original function each one follows.

- ``evaluation_mask`` (computeEvaluationMask): the ground truth at level 5; distance transform of the
  non-tumour pixels, pixels closer than 75 / (0.243 * 2^5 * 2) ~ 4.82 level-5 px to tumour become
  lesion (the original's comment says 75 um, its formula gives a 37.5 um radius: the formula is kept),
  holes filled, 8-connected labels (``skimage.measure.label(connectivity=2)``).
- ``itc_labels`` (computeITCList): labels whose ``regionprops`` major axis is below
  275 / (0.243 * 2^5) ~ 35.36 px are isolated tumour cells.
- ``slide_hits`` (compute_FP_TP_Probs): a detection (level-0 x, y) hits label
  ``mask[y // 2^5, x // 2^5]``; label 0 is a false positive, an ITC label counts for nothing, a lesion
  label keeps the highest probability that hit it in a float32 array of one entry per label (missed
  lesions and ITC labels stay 0); every detection on a normal slide is a false positive; the slide has
  ``max_label - len(ITC)`` lesions.
- ``froc_curve`` (computeFROC): thresholds are the sorted distinct values of all false-positive
  probabilities and all per-label lesion scores (zeros included), *without the smallest one*; at each
  the false positives and lesion scores >= threshold are counted; a final (0, 0) point is appended;
  false positives are divided by the number of slides, lesion counts by the total number of lesions.
- ``froc_score`` (the main block): ``np.interp`` of the reversed curve at 1/4, 1/2, 1, 2, 4 and 8
  false positives per slide, averaged. ``np.interp`` returns the last sensitivity beyond the curve's
  largest FP rate and, at an FP rate the curve repeats, the value of the last repeat.

Points where a choice had to be made (each also commented where it is made):

1. The original reads the level-5 page of a mask whose tumour value is 255 (``255 - pixel`` is zero on
   tumour). Here tumour is any value > 0 (DESIGN.md section 4), the same for a 0/255 mask. A mask TIFF
   without a level-5 page is max-pooled from its coarsest finer page; an ASAP XML is rasterised at
   level 0 with ``masks.rasterize`` (pixel-centre rule) and max-pooled to level 5 - the same
   2x2-max-pool pyramid the slide generator writes, so XML and TIFF give the same evaluation mask.
2. The original skips the smallest probability as a threshold (``all_probs[1:]``). It is replicated:
   with a missed lesion or an ITC the smallest value is 0 and nothing is lost, but a run whose every
   lesion is detected never reaches the operating point of its lowest-scored detection (a single
   detection on a single lesion scores 0). This is the organisers' number, so it is kept.
3. A tumour slide whose mask holds no tumour pixel: the original's distance transform of an image
   without zeros is meaningless; here it has no lesion and every detection is a false positive.
4. A detection outside the level-5 mask array (which the original would index out of range or wrap)
   is on background: a false positive.
5. Lesion scores are float32 as in the original; probabilities come from float32 heatmaps and are
   written to the CSV with ``repr`` of their exact value, so reading the CSV back (the original's
   ``float``) and the float32 storage change no value.
6. The FROC is undefined when the ground truth holds no lesion outside ITC regions (the original
   divides by zero); ``froc_score`` raises and ``froc_evaluate`` writes ``null``. The slide AUC is
   likewise ``null`` when all slides are of one class.
7. A slide is a tumour slide when its mask exists (``<stem>_mask.tif``, else ``<stem>.xml``), as later
   copies of the script decide (``os.path.isfile(maskDIR)``); the 2016 script tested the file name's
   ``Tumor`` prefix instead. ``regionprops``' ``major_axis_length`` is read under its current name
   ``axis_major_length`` (the same value).

Candidates (``candidates``, ``detections``): local maxima of the heatmap grid (8-neighbourhood, ties
kept) with probability >= 0.5, then greedy non-maximum suppression: in decreasing probability (ties
in grid order) a maximum is kept unless a kept one lies within ``radius`` cells (Euclidean distance
<= radius). A detection is reported at its window's centre (x + window / 2) * d0 in level-0 pixels,
rounded down to an integer (the original reads coordinates with ``int(float(text))``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage
from skimage import measure

from .heatmap import Heatmap, base_downsample, grid_image, load_heatmap
from .masks import atomic_write, rasterize, read_asap_xml, written_together

__all__ = [
    "CANDIDATE_THRESHOLD",
    "DEFAULT_NMS_RADIUS",
    "EVALUATION_LEVEL",
    "FP_RATES",
    "L0_RESOLUTION",
    "FrocReport",
    "FrocResult",
    "candidates",
    "detections",
    "distance_threshold",
    "evaluation_mask",
    "find_mask",
    "format_froc_table",
    "froc_curve",
    "froc_evaluate",
    "froc_score",
    "itc_labels",
    "itc_threshold",
    "read_detections_csv",
    "read_mask_level",
    "run_froc",
    "slide_auc",
    "slide_hits",
    "write_detections_csv",
]

#: The level of the evaluation mask (EVALUATION_MASK_LEVEL).
EVALUATION_LEVEL = 5
#: Microns per level-0 pixel the organisers assume (L0_RESOLUTION).
L0_RESOLUTION = 0.243
#: False positives per slide at which sensitivities are averaged.
FP_RATES = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
#: Lowest probability of a lesion candidate.
CANDIDATE_THRESHOLD = 0.5
#: Default non-maximum-suppression radius, in grid cells.
DEFAULT_NMS_RADIUS = 2

# Bounded memory when rasterising ASAP XML to a low level: level-0 pixels per strip.
_STRIP_PIXELS = 1 << 24


def distance_threshold(resolution: float = L0_RESOLUTION, level: int = EVALUATION_LEVEL) -> float:
    """Growth radius of the annotations, in evaluation-level pixels: 75 / (resolution * 2^level * 2)."""
    return 75 / (resolution * 2**level * 2)


def itc_threshold(resolution: float = L0_RESOLUTION, level: int = EVALUATION_LEVEL) -> float:
    """Largest major axis of an isolated-tumour-cell region (exclusive): 275 / (resolution * 2^level)."""
    return 275 / (resolution * 2**level)


# --------------------------------------------------------------------------------------------------
# Candidates


_DISC_RADIUS = 32.0  # up to this radius NMS stamps a disc of cells; beyond it, distances to the kept


def candidates(
    image: np.ndarray, *, threshold: float = CANDIDATE_THRESHOLD, radius: float = DEFAULT_NMS_RADIUS
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Lesion candidates of a heatmap grid image: (rows, cols, probs), by decreasing probability.

    A candidate is a local maximum (>= each of its 8 neighbours; NaN cells are no tissue and ignored)
    with probability >= ``threshold`` that survives greedy non-maximum suppression: taken by decreasing
    probability (ties in row-major order), a maximum is dropped when an already kept candidate lies
    within Euclidean distance ``radius`` (grid cells); radius 0 keeps every local maximum.
    """
    img = np.asarray(image, dtype=np.float64)
    if img.ndim != 2:
        raise ValueError(f"candidates: expected a 2-D grid image, got shape {img.shape}")
    radius = float(radius)
    if not radius >= 0:
        raise ValueError(f"candidates: radius must be >= 0, got {radius}")
    filled = np.where(np.isnan(img), -np.inf, img)
    if filled.size == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty.copy(), np.zeros(0, dtype=np.float64)
    peak = filled == ndimage.maximum_filter(filled, size=3, mode="constant", cval=-np.inf)
    peak &= filled >= threshold
    rows, cols = np.nonzero(peak)  # row-major order
    probs = filled[rows, cols]
    order = np.argsort(-probs, kind="stable")
    if radius > _DISC_RADIUS and order.size > 1:
        # A wide radius: each candidate against the kept ones (the same rule, distance <= radius),
        # not a (2r + 1)^2 stencil, which for radius 1e5 would be ~600 GB.
        ky, kx = np.empty(order.size, np.float64), np.empty(order.size, np.float64)
        kept: list[int] = []
        for i in order.tolist():
            n = len(kept)
            if n and bool((((ky[:n] - rows[i]) ** 2 + (kx[:n] - cols[i]) ** 2) <= radius**2).any()):
                continue
            ky[n], kx[n] = rows[i], cols[i]
            kept.append(i)
        order = np.asarray(kept, dtype=np.int64)
    elif radius > 0 and order.size > 1:
        r = int(math.floor(radius))
        dy, dx = np.mgrid[-r : r + 1, -r : r + 1]
        disc = dy**2 + dx**2 <= radius**2
        dy, dx = dy[disc], dx[disc]
        height, width = filled.shape
        suppressed = np.zeros(filled.shape, dtype=bool)
        kept = []
        for i in order.tolist():
            if suppressed[rows[i], cols[i]]:
                continue
            kept.append(i)
            yy, xx = rows[i] + dy, cols[i] + dx
            inside = (yy >= 0) & (yy < height) & (xx >= 0) & (xx < width)
            suppressed[yy[inside], xx[inside]] = True
        order = np.asarray(kept, dtype=np.int64)
    return rows[order].astype(np.int64), cols[order].astype(np.int64), probs[order]


def detections(
    heatmap: Heatmap,
    *,
    radius: float = DEFAULT_NMS_RADIUS,
    threshold: float = CANDIDATE_THRESHOLD,
    downsample: float | None = None,
) -> np.ndarray:
    """A heatmap's lesion detections as float64 (K, 3) rows (probability, x, y), the challenge's CSV.

    x, y: the window centre in level-0 pixels, floor((top-left + window / 2) * d0), integers.
    ``downsample`` is d0, the slide's downsample of the base level (default: ``base_downsample``).
    """
    d0 = base_downsample(heatmap) if downsample is None else float(downsample)
    rows, cols, probs = candidates(grid_image(heatmap, d0), threshold=threshold, radius=radius)
    half = heatmap.window / 2
    x = np.floor((cols * heatmap.stride + half) * d0).astype(np.int64)
    y = np.floor((rows * heatmap.stride + half) * d0).astype(np.int64)
    return np.column_stack([probs, x, y]).astype(np.float64).reshape(-1, 3)


def write_detections_csv(path: str | os.PathLike[str], dets: np.ndarray) -> None:
    """Write rows ``probability,x,y`` (no header), atomically; probabilities with repr (exact)."""
    dets = np.asarray(dets, dtype=np.float64).reshape(-1, 3)
    text = "".join(f"{float(p)!r},{int(x)},{int(y)}\n" for p, x, y in dets.tolist())
    atomic_write(Path(path), lambda fh: fh.write(text.encode()))


def read_detections_csv(path: str | os.PathLike[str]) -> np.ndarray:
    """Read a challenge CSV as the original readCSVContent does (float, int(float), int(float))."""
    rows = []
    with open(path) as fh:
        for n, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            elems = line.rstrip().split(",")
            try:
                rows.append((float(elems[0]), int(float(elems[1])), int(float(elems[2]))))
            except (ValueError, IndexError):
                raise ValueError(f"{path}: line {n}: expected probability,x,y, got {line.strip()[:60]!r}") from None
    return np.asarray(rows, dtype=np.float64).reshape(-1, 3)


# --------------------------------------------------------------------------------------------------
# Masks at a low level


def _pool_into(out: np.ndarray, block: np.ndarray, y0: int, x0: int, f: int) -> None:
    """out |= f x f max-pool of the boolean ``block`` whose top-left is the fine pixel (x0, y0)."""
    if not block.any():
        return
    oy0, ox0 = y0 // f, x0 // f
    py, px = y0 - oy0 * f, x0 - ox0 * f
    h, w = block.shape
    hh, ww = -(-(py + h) // f) * f, -(-(px + w) // f) * f
    if (py, px, hh, ww) != (0, 0, h, w):
        padded = np.zeros((hh, ww), dtype=bool)
        padded[py : py + h, px : px + w] = block
        block = padded
    pooled = block.reshape(hh // f, f, ww // f, f).any(axis=(1, 3))
    out[oy0 : oy0 + pooled.shape[0], ox0 : ox0 + pooled.shape[1]] |= pooled


def _tiff_pages(tif) -> list:  # noqa: ANN001 - tifffile.TiffFile
    """Every image page of the file: top-level pages and the levels of each series (SubIFDs)."""
    pages, seen = [], set()
    candidates_ = list(tif.pages)
    for series in tif.series:
        candidates_.extend(level.keyframe for level in series.levels)
    for page in candidates_:
        if page is None or not hasattr(page, "imagewidth") or page.offset in seen:
            continue
        seen.add(page.offset)
        pages.append(page)
    return pages


def _tiff_mask_level(path: Path, ds: int, slide_size: tuple[int, int] | None, slide_path: str | None) -> np.ndarray:
    import tifffile

    try:
        tif = tifffile.TiffFile(path)
    except FileNotFoundError:
        raise
    except (tifffile.TiffFileError, ValueError, OSError) as exc:
        raise ValueError(f"{path}: not a readable TIFF mask ({exc})") from None
    with tif:
        pages = _tiff_pages(tif)
        if not pages:
            raise ValueError(f"{path}: the TIFF holds no image")
        page0 = max(pages, key=lambda p: p.imagewidth * p.imagelength)
        w0, h0 = int(page0.imagewidth), int(page0.imagelength)
        if slide_size is not None and (w0, h0) != tuple(slide_size):
            sw, sh = slide_size
            raise ValueError(
                f"{path}: mask level-0 size {w0}x{h0} does not match slide {slide_path or ''} ({sw}x{sh})"
            )
        # The page at downsample ds when the file has one (f = 1), else the coarsest page at ds / f
        # (f = 2, 4, ...), max-pooled by f; page 0 (f = ds) always qualifies.
        chosen = None
        f = 1
        while chosen is None:
            d = ds / f
            for page in pages:
                if abs(page.imagewidth - w0 / d) < 1 and abs(page.imagelength - h0 / d) < 1:
                    chosen = page
                    break
            else:
                f *= 2
        h, w = int(chosen.imagelength), int(chosen.imagewidth)
        out = np.zeros((-(-h // f), -(-w // f)), dtype=bool)
        try:
            for segment, index, _shape in chosen.segments():
                if segment is None or index[0] != 0:  # empty tile, or a separate plane past channel 0
                    continue
                _, _, y0, x0, _ = index
                block = segment[0, : h - y0, : w - x0, 0] > 0  # channel 0, as the organisers read it
                _pool_into(out, block, int(y0), int(x0), f)
        except (ValueError, RuntimeError, OSError) as exc:
            raise ValueError(f"{path}: cannot decode the mask ({exc})") from None
    return out


def _xml_mask_level(path: Path, ds: int, slide_size: tuple[int, int]) -> np.ndarray:
    """Rasterise at level 0 (pixel-centre rule) strip by strip over the tumour box, max-pool by ds."""
    ann = read_asap_xml(path)
    w0, h0 = (int(v) for v in slide_size)
    out = np.zeros((-(-h0 // ds), -(-w0 // ds)), dtype=bool)
    box = ann.bbox()
    if box is None:
        return out
    bx0, by0, bx1, by1 = max(box[0], 0), max(box[1], 0), min(box[2], w0), min(box[3], h0)
    if bx0 >= bx1 or by0 >= by1:
        return out
    x0, y0 = bx0 // ds * ds, by0 // ds * ds  # aligned to the pooling blocks
    width = bx1 - x0
    strip = max(ds, _STRIP_PIXELS // max(width, 1) // ds * ds)
    for y in range(y0, by1, strip):
        block = rasterize(ann, x0, y, width, min(strip, by1 - y))
        _pool_into(out, block, y, x0, ds)
    return out


def read_mask_level(
    mask_path: str | os.PathLike[str],
    downsample: int = 2**EVALUATION_LEVEL,
    *,
    slide_size: tuple[int, int] | None = None,
    slide_path: str | None = None,
) -> np.ndarray:
    """Boolean tumour mask at a power-of-two ``downsample`` (default 32: level 5) from a mask TIFF or
    an ASAP XML.

    A pixel is tumour when any level-0 pixel it covers is (value > 0). A TIFF's own page at that
    downsample is used as it is (its size, as the original reads OpenSlide's level 5); without one the
    coarsest finer page is max-pooled (shape ceil). An XML is rasterised at level 0 and max-pooled; it
    needs ``slide_size`` (level-0 width, height). A TIFF whose level-0 size differs from ``slide_size``
    is a ValueError naming both files.
    """
    ds = int(downsample)
    if ds < 1 or ds & (ds - 1):
        raise ValueError(f"read_mask_level: downsample must be a power of two, got {downsample}")
    path = Path(mask_path)
    if path.suffix.lower() == ".xml":
        if slide_size is None:
            raise ValueError(
                f"{path}: an XML mask needs the slide's level-0 size, and slide {slide_path} cannot be opened"
            )
        return _xml_mask_level(path, ds, slide_size)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such mask file")
    return _tiff_mask_level(path, ds, slide_size, slide_path)


# --------------------------------------------------------------------------------------------------
# The organisers' evaluation


def evaluation_mask(
    tumour: np.ndarray, resolution: float = L0_RESOLUTION, level: int = EVALUATION_LEVEL
) -> np.ndarray:
    """Label image (int32) of the lesions of a level-``level`` tumour mask (computeEvaluationMask).

    ``tumour`` is tumour where > 0 (choice 1 of the module notes); an empty mask has no lesion (3).
    """
    tumour = np.asarray(tumour) > 0
    if tumour.ndim != 2:
        raise ValueError(f"evaluation_mask: expected a 2-D mask, got shape {tumour.shape}")
    if not tumour.any():
        return np.zeros(tumour.shape, dtype=np.int32)
    distance = ndimage.distance_transform_edt(~tumour)  # distance of each pixel to the nearest tumour
    binary = distance < distance_threshold(resolution, level)
    filled = ndimage.binary_fill_holes(binary)
    return measure.label(filled, connectivity=2).astype(np.int32)


def itc_labels(labels: np.ndarray, resolution: float = L0_RESOLUTION, level: int = EVALUATION_LEVEL) -> list[int]:
    """Labels of isolated-tumour-cell regions: major axis < 275 / (resolution * 2^level) (computeITCList)."""
    threshold = itc_threshold(resolution, level)
    labels = np.asarray(labels)
    return [int(p.label) for p in measure.regionprops(labels) if p.axis_major_length < threshold]


def slide_hits(
    dets: np.ndarray,
    labels: np.ndarray | None,
    itc: Sequence[int] = (),
    level: int = EVALUATION_LEVEL,
) -> tuple[np.ndarray, np.ndarray, int]:
    """(false-positive probabilities float64, per-label lesion scores float32, number of lesions) of one
    slide (compute_FP_TP_Probs). ``labels`` None: a normal slide, every detection a false positive."""
    dets = np.asarray(dets, dtype=np.float64).reshape(-1, 3)
    if not np.isfinite(dets).all():
        raise ValueError("slide_hits: detections must be finite")
    probs = dets[:, 0]
    if labels is None:
        return probs.copy(), np.zeros(0, dtype=np.float32), 0
    labels = np.asarray(labels)
    max_label = int(labels.max()) if labels.size else 0
    itc_set = {int(v) for v in itc}
    tp = np.zeros(max_label, dtype=np.float32)  # as the original: float32, one entry per label
    fp = []
    height, width = labels.shape
    scale = 2**level
    for p, x, y in dets.tolist():
        r, c = int(y) // scale, int(x) // scale
        hit = int(labels[r, c]) if 0 <= r < height and 0 <= c < width else 0  # outside: background (4)
        if hit == 0:
            fp.append(p)
        elif hit not in itc_set and np.float32(p) > tp[hit - 1]:
            tp[hit - 1] = p
    return np.asarray(fp, dtype=np.float64), tp, max_label - len(itc_set)


def froc_curve(
    fp_probs: Sequence[np.ndarray], tp_probs: Sequence[np.ndarray], n_lesions: int, n_slides: int
) -> tuple[np.ndarray, np.ndarray]:
    """(average false positives per slide, sensitivity) over the thresholds (computeFROC), in the
    original's order: thresholds increasing, so FP rates decreasing, ending with the (0, 0) point."""
    fps = np.sort(np.concatenate([np.zeros(0)] + [np.asarray(v, dtype=np.float64).reshape(-1) for v in fp_probs]))
    # Lesion scores are float32 values (the original's TP_probs array); their float64 value is exact.
    tps = np.concatenate([np.zeros(0, np.float32)] + [np.asarray(v, np.float32).ravel() for v in tp_probs])
    tps = np.sort(tps.astype(np.float64))
    all_probs = np.unique(np.concatenate([fps, tps]))  # sorted(set(FPs + TPs))
    thresholds = all_probs[1:]  # the original skips the smallest (choice 2)
    total_fps = np.append(fps.size - np.searchsorted(fps, thresholds, side="left"), 0)  # count >= threshold
    total_tps = np.append(tps.size - np.searchsorted(tps, thresholds, side="left"), 0)
    return total_fps / float(n_slides), total_tps / float(n_lesions)


@dataclass(frozen=True)
class FrocResult:
    """The FROC score, its curve (computeFROC's order) and the sensitivities at ``FP_RATES``."""

    score: float
    fps: np.ndarray
    sensitivity: np.ndarray
    sensitivities: np.ndarray  # at FP_RATES
    n_slides: int
    n_lesions: int
    n_itc: int
    fp_rates: tuple[float, ...] = field(default=FP_RATES)


def froc_score(
    dets: Sequence[np.ndarray],
    labels: Sequence[np.ndarray | None],
    *,
    resolution: float = L0_RESOLUTION,
    level: int = EVALUATION_LEVEL,
) -> FrocResult:
    """The lesion-level FROC of a set of slides.

    ``dets[i]``: (K, 3) rows (probability, x, y) of slide i in level-0 pixels; ``labels[i]``: its
    evaluation mask (``evaluation_mask``) for a tumour slide, None for a normal one. ITC regions come
    from ``itc_labels``. Raises ValueError when no slide holds a lesion outside ITC regions.
    """
    if len(dets) != len(labels):
        raise ValueError(f"froc_score: {len(dets)} detection lists for {len(labels)} slides")
    if not dets:
        raise ValueError("froc_score: no slides")
    fp_all, tp_all, n_lesions, n_itc = [], [], 0, 0
    for d, lab in zip(dets, labels):
        itc = itc_labels(lab, resolution, level) if lab is not None else []
        fp, tp, n = slide_hits(d, lab, itc, level)
        fp_all.append(fp)
        tp_all.append(tp)
        n_lesions += n
        n_itc += len(itc)
    if n_lesions == 0:
        raise ValueError("FROC undefined: the ground truth holds no lesion outside isolated-tumour-cell regions")
    fps, sens = froc_curve(fp_all, tp_all, n_lesions, len(dets))
    at = np.interp(FP_RATES, fps[::-1], sens[::-1])
    return FrocResult(float(np.mean(at)), fps, sens, at, len(dets), n_lesions, n_itc)


def slide_auc(scores: Sequence[float], is_tumour: Sequence[bool]) -> float:
    """ROC AUC of one score per slide (sklearn); ValueError when all slides are of one class."""
    from sklearn.metrics import roc_auc_score

    y = np.asarray(is_tumour, dtype=bool)
    if y.all() or not y.any():
        kind = "tumour" if y.any() else "normal"
        raise ValueError(f"slide AUC undefined: all {y.size} slides are {kind}")
    return float(roc_auc_score(y, np.asarray(scores, dtype=np.float64)))


# --------------------------------------------------------------------------------------------------
# Files in, files out


def find_mask(masks_dir: str | os.PathLike[str], stem: str) -> Path | None:
    """``<stem>_mask.tif`` (preferred) or ``<stem>.xml`` in ``masks_dir``; None: a normal slide."""
    for name in (f"{stem}_mask.tif", f"{stem}.xml"):
        path = Path(masks_dir) / name
        if path.is_file():
            return path
    return None


@dataclass
class SlideSummary:
    heatmap: str
    slide: str
    mask: str | None
    detections: int
    max_prob: float
    lesions: int = 0
    itc: int = 0


@dataclass
class FrocReport:
    """What ``run_froc`` computed: ``metrics`` (froc, slide_auc; None where undefined), the FROC
    result (None when undefined) and one summary per slide."""

    metrics: dict
    result: FrocResult | None
    slides: list[SlideSummary]
    notes: list[str]


def _slide_geometry(heatmap: Heatmap) -> tuple[tuple[int, int] | None, float]:
    """(level-0 size or None, d0): from the slide file when it opens, else d0 from the coordinates."""
    from .slide import Slide

    try:
        slide = Slide(heatmap.slide)
    except (OSError, RuntimeError, ValueError):
        return None, base_downsample(heatmap)
    level = int(heatmap.levels[0])
    if level >= slide.level_count:
        raise ValueError(f"{heatmap.name}: base level {level} does not exist in slide {heatmap.slide}")
    width, height = slide.dimensions
    return (int(width), int(height)), float(slide.level_downsamples[level])


def run_froc(
    heatmap_paths: Sequence[str | os.PathLike[str]],
    masks_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    nms_radius: float = DEFAULT_NMS_RADIUS,
) -> FrocReport:
    """``froc_evaluate`` with everything it computed (for the command line's table)."""
    from .evaluate import write_json
    from .plots import save_froc

    if not heatmap_paths:
        raise ValueError("froc: give at least one heatmap")
    masks_dir = Path(masks_dir)
    if not masks_dir.is_dir():
        raise FileNotFoundError(f"{masks_dir}: masks folder does not exist")
    heatmaps = [load_heatmap(p) for p in heatmap_paths]
    stems: dict[str, str] = {}
    for hm in heatmaps:
        stem = Path(hm.slide).stem
        if stem in stems:
            raise ValueError(f"{hm.name}: slide {stem} is also the slide of {stems[stem]} (one CSV per slide)")
        stems[stem] = hm.name
        if len(hm) == 0:
            raise ValueError(f"{hm.name}: heatmap has no windows (empty tissue grid): no slide score")
    out_dir = Path(out_dir)

    # Everything is computed before anything is written: a bad input leaves no partial output.
    all_dets, all_labels, summaries = [], [], []
    for hm in heatmaps:
        stem = Path(hm.slide).stem
        size, d0 = _slide_geometry(hm)
        dets = detections(hm, radius=nms_radius, downsample=d0)
        mask = find_mask(masks_dir, stem)
        labels = None
        summary = SlideSummary(hm.name, hm.slide, None if mask is None else str(mask), len(dets),
                               float(hm.probs.max()))
        if mask is not None:
            tumour = read_mask_level(mask, 2**EVALUATION_LEVEL, slide_size=size, slide_path=hm.slide)
            labels = evaluation_mask(tumour)
            summary.itc = len(itc_labels(labels))
            summary.lesions = int(labels.max()) - summary.itc
        all_dets.append(dets)
        all_labels.append(labels)
        summaries.append(summary)

    notes = []
    try:
        result = froc_score(all_dets, all_labels)
        froc = result.score
    except ValueError as exc:
        result, froc = None, None
        notes.append(str(exc))
    try:
        auc = slide_auc([s.max_prob for s in summaries], [lab is not None for lab in all_labels])
    except ValueError as exc:
        auc = None
        notes.append(str(exc))
    metrics = {"froc": froc, "slide_auc": auc}
    out_dir.mkdir(parents=True, exist_ok=True)
    with written_together():  # the CSVs, metrics and picture of one run, or the previous ones
        for summary, dets in zip(summaries, all_dets):
            write_detections_csv(out_dir / f"{Path(summary.slide).stem}.csv", dets)
        write_json(out_dir / "metrics.json", metrics)
        if result is None:
            save_froc(np.zeros(0), np.zeros(0), out_dir / "froc.png", title="FROC undefined (no lesion)")
        else:
            save_froc(result.fps, result.sensitivity, out_dir / "froc.png", score=result.score,
                      fp_rates=result.fp_rates, sensitivities=result.sensitivities.tolist())
    return FrocReport(metrics, result, summaries, notes)


def froc_evaluate(
    heatmap_paths: Sequence[str | os.PathLike[str]],
    masks_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    nms_radius: float = DEFAULT_NMS_RADIUS,
) -> dict:
    """Camelyon16 metrics of a set of slide heatmaps; returns and writes ``{"froc", "slide_auc"}``.

    A slide is a tumour slide when ``masks_dir`` holds ``<slide stem>_mask.tif`` or
    ``<slide stem>.xml``. Writes ``out_dir/<slide stem>.csv`` (the detections), ``metrics.json`` and
    ``froc.png``. A metric that is undefined (no lesion; slides of one class) is None.
    """
    return run_froc(heatmap_paths, masks_dir, out_dir, nms_radius).metrics


def format_froc_table(report: FrocReport) -> str:
    """The command line's summary: per-slide lines, then the sensitivities and the two metrics."""
    lines = [f"{'slide':<24}{'truth':<8}{'lesions':>8}{'itc':>5}{'detections':>12}{'max prob':>10}"]
    for s in report.slides:
        truth = "tumour" if s.mask else "normal"
        lines.append(f"{Path(s.slide).stem:<24}{truth:<8}{s.lesions:>8}{s.itc:>5}{s.detections:>12}{s.max_prob:>10.5f}")
    if report.result is not None:
        for rate, sens in zip(report.result.fp_rates, report.result.sensitivities):
            lines.append(f"sensitivity at {rate:g} FP/slide".ljust(32) + f"{sens:.5f}")
    for key, value in report.metrics.items():
        lines.append(f"{key:<32}" + ("undefined" if value is None else f"{value:.5f}"))
    lines.extend(f"note: {n}" for n in report.notes)
    return "\n".join(lines)

