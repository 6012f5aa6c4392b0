"""Tumour annotations in the ASAP XML format (Camelyon16) and their rasterisation.

A Camelyon16 annotation file lists polygons in level-0 pixel coordinates (floats). Each polygon
belongs to a group: ``_0`` and ``_1`` (and anything else, e.g. ``Tumor``) mark tumour, ``_2`` and
``Exclusion`` mark non-tumour regions inside tumour that must be cut out.

Pixel rule (DESIGN.md section 4): a level-0 pixel (x, y) is tumour when its centre (x + 0.5, y + 0.5)
lies inside some tumour polygon and inside no exclusion polygon. "Inside" is the even-odd
(crossing-number) test of ``skimage.draw.polygon``: rasterising a polygon here gives exactly the pixels
``skimage.draw.polygon(Y - 0.5, X - 0.5)`` gives on a full-size image, whatever window is asked for.

Why not call skimage directly: its ``polygon`` tests every pixel of the polygon's bounding box against
every edge (cost area x vertices), which is hopeless for Camelyon16 annotations (tens of thousands of
pixels across, thousands of vertices). ``_fill_polygon`` below does the same test as a vectorised
scanline: it computes each row's edge crossings once (cost: rows spanned by the edges) and turns them
into pixels with one cumulative sum (cost: window area). The tests check it against skimage.

Everything else (the slide generator's mask TIFF, the grid's labels) must go through ``rasterize`` /
``any_tumour`` so that XML and TIFF masks label pixels identically.

Input files are hostile until parsed (DESIGN.md section 8): defusedxml with DTDs, entities and external
references forbidden, bounded coordinate counts and magnitudes, finite numbers only. Every problem with
a file is a ``ValueError`` naming the path (a missing file is ``FileNotFoundError``).
"""

from __future__ import annotations

import contextlib
import math
import os
import secrets
import stat
import threading
import xml.etree.ElementTree as ET
from array import array
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from defusedxml import DefusedXmlException
from defusedxml.ElementTree import iterparse as _defused_iterparse

__all__ = [
    "EXCLUSION_GROUPS",
    "MAX_ABS_COORDINATE",
    "MAX_COORDINATES",
    "Annotations",
    "any_tumour",
    "rasterize",
    "read_asap_xml",
    "write_asap_xml",
]

#: Group names (compared case-insensitively) whose polygons are cut out of tumour.
EXCLUSION_GROUPS = frozenset({"_2", "exclusion"})
#: Most coordinates accepted in one file (Camelyon16's largest file holds well under a million).
MAX_COORDINATES = 10_000_000
#: Largest coordinate magnitude accepted (far beyond any slide; keeps int64/float64 math exact).
MAX_ABS_COORDINATE = float(2**40)
#: Largest annotation file accepted, in bytes (10M coordinates at ~60 bytes each, with room to spare).
MAX_FILE_BYTES = 2 * 1024**3

# ASAP annotation types without an area: skipped when reading (they mark points or lengths).
_POINT_TYPES = frozenset({"dot", "pointset", "measurement"})
# Tile edge used by any_tumour: one rasterised tile holds at most _QUERY_TILE**2 pixels.
_QUERY_TILE = 2048


# --------------------------------------------------------------------------------------------------
# The annotation container


def _as_polygon(vertices: object, what: str) -> np.ndarray:
    """Validate one polygon and return it as a read-only C-contiguous float64 (K, 2) array."""
    arr = np.array(vertices, dtype=np.float64, copy=True)
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise ValueError(f"{what}: expected a (K, 2) array of (x, y) vertices, got shape {arr.shape}")
    if arr.shape[0] < 3:
        raise ValueError(f"{what}: a polygon needs at least 3 vertices, got {arr.shape[0]}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{what}: non-finite vertex coordinate")
    if np.abs(arr).max() > MAX_ABS_COORDINATE:
        raise ValueError(f"{what}: vertex coordinate beyond +-2^40")
    arr.setflags(write=False)
    return arr


@dataclass(frozen=True, eq=False)
class Annotations:
    """Tumour and exclusion polygons of one slide, level-0 (x, y) float64 vertices.

    Arrays are validated (K >= 3, finite, |coordinate| <= 2^40) and stored read-only. Equality is
    identity (``eq=False``): compare the arrays when you need value equality.
    """

    tumour: tuple[np.ndarray, ...] = ()
    exclusion: tuple[np.ndarray, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "tumour", tuple(_as_polygon(p, f"tumour polygon {i}") for i, p in enumerate(self.tumour))
        )
        object.__setattr__(
            self,
            "exclusion",
            tuple(_as_polygon(p, f"exclusion polygon {i}") for i, p in enumerate(self.exclusion)),
        )

    def __repr__(self) -> str:
        return f"Annotations(tumour={len(self.tumour)} polygons, exclusion={len(self.exclusion)} polygons)"

    def tumour_boxes(self) -> np.ndarray:
        """Pixel boxes of the tumour polygons, int64 (P, 4) as (x0, y0, x1, y1), half-open.

        A pixel outside a polygon's box can never be inside the polygon (its centre test fails).
        """
        return np.array([_pixel_box(p) for p in self.tumour], dtype=np.int64).reshape(-1, 4)

    def bbox(self) -> tuple[int, int, int, int] | None:
        """Half-open level-0 pixel box (x0, y0, x1, y1) holding every tumour pixel; None if no tumour."""
        boxes = self.tumour_boxes()
        if len(boxes) == 0:
            return None
        return (
            int(boxes[:, 0].min()),
            int(boxes[:, 1].min()),
            int(boxes[:, 2].max()),
            int(boxes[:, 3].max()),
        )


# --------------------------------------------------------------------------------------------------
# Reading and writing ASAP XML


def _is_exclusion(group: str) -> bool:
    return group.strip().lower() in EXCLUSION_GROUPS


def _parse_number(text: str | None, path: Path, what: str) -> float:
    if text is None:
        raise ValueError(f"{path}: {what} is missing")
    try:
        if "_" in text or not text.isascii():  # Python's float() takes "1_000" and non-ASCII digits; ASAP writes neither
            raise ValueError
        value = float(text)
    except ValueError:
        raise ValueError(f"{path}: {what} is not a number: {text[:40]!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"{path}: {what} is not finite: {text[:40]!r}")
    if abs(value) > MAX_ABS_COORDINATE:
        raise ValueError(f"{path}: {what} is beyond +-2^40: {text[:40]!r}")
    return value


class _AnnotationReader:
    """One <Annotation> being read: its coordinates are parsed as their elements end and kept in
    compact arrays (about 32 bytes each), so memory stays proportional to the coordinates even at
    the MAX_COORDINATES cap, not to the XML elements (several hundred bytes each)."""

    def __init__(self, elem: ET.Element, path: Path, index: int):
        self.path = path
        name = elem.get("Name", str(index))[:60]
        self.what = f"annotation {index} ({name!r})"
        self.points = elem.get("Type", "Polygon").strip().lower() in _POINT_TYPES
        self.group = elem.get("PartOfGroup", "")
        self.order = array("q")
        self.xy = array("d")

    def add(self, coord: ET.Element) -> None:
        pos = len(self.order)
        order_text = coord.get("Order")
        if order_text is None:
            order = pos  # files without Order attributes keep document order
        else:
            try:
                order = int(order_text)
            except ValueError:
                raise ValueError(f"{self.path}: {self.what}: Order is not an integer: {order_text[:40]!r}") from None
            if not -(2**63) <= order < 2**63:
                raise ValueError(f"{self.path}: {self.what}: Order out of range: {order_text[:40]!r}")
        self.xy.append(_parse_number(coord.get("X"), self.path, f"{self.what} coordinate {pos} X"))
        self.xy.append(_parse_number(coord.get("Y"), self.path, f"{self.what} coordinate {pos} Y"))
        self.order.append(order)

    def finish(self) -> tuple[str, np.ndarray] | None:
        """(group, vertices ordered by Order, ties in document order), or None for point types."""
        if self.points:
            return None
        if len(self.order) < 3:
            raise ValueError(f"{self.path}: {self.what} has {len(self.order)} coordinates; a polygon needs at least 3")
        xy = np.frombuffer(self.xy, dtype=np.float64).reshape(-1, 2)
        return self.group, xy[np.argsort(np.frombuffer(self.order, dtype=np.int64), kind="stable")]


def read_asap_xml(path: str | os.PathLike[str]) -> Annotations:
    """Read an ASAP / Camelyon16 annotation file.

    Polygons of groups ``_2`` and ``Exclusion`` (any case) are exclusions, all others tumour; vertices
    are ordered by their ``Order`` attribute. Annotations of point types (Dot, PointSet, Measurement)
    have no area and are skipped; Spline control points are taken as polygon vertices.

    Raises FileNotFoundError for a missing file and ValueError (naming the path) for anything wrong
    with the content: malformed XML, DTDs or entities, unparsable or non-finite numbers, polygons with
    fewer than 3 points, more than MAX_COORDINATES coordinates or coordinates beyond +-2^40.
    """
    path = Path(path)
    st = os.stat(path)  # FileNotFoundError names the path
    if not stat.S_ISREG(st.st_mode):  # a FIFO would block the open below
        raise ValueError(f"{path}: not a regular file, not an annotation file")
    size = st.st_size
    if size > MAX_FILE_BYTES:
        raise ValueError(f"{path}: annotation file too large ({size} bytes > {MAX_FILE_BYTES})")
    tumour: list[np.ndarray] = []
    exclusion: list[np.ndarray] = []
    n_coords = 0
    n_annotations = 0
    root_seen = False
    open_elements: list[ET.Element] = []  # the path from the root to the current element
    readers: list[_AnnotationReader] = []  # the <Annotation>s open there, innermost last
    try:
        with open(path, "rb") as fh:
            # iterparse lets us stop at the coordinate cap and drop every element once read.
            for event, elem in _defused_iterparse(fh, events=("start", "end"), forbid_dtd=True):
                if event == "start":
                    if not root_seen:
                        root_seen = True
                        if elem.tag != "ASAP_Annotations":
                            raise ValueError(
                                f"{path}: not an ASAP annotation file (root element {elem.tag[:60]!r})"
                            )
                    elif elem.tag == "Annotation":
                        readers.append(_AnnotationReader(elem, path, n_annotations))
                        n_annotations += 1
                    open_elements.append(elem)
                    continue
                open_elements.pop()
                if elem.tag == "Coordinate":
                    n_coords += 1
                    if n_coords > MAX_COORDINATES:
                        raise ValueError(f"{path}: more than {MAX_COORDINATES} coordinates")
                    if readers:
                        readers[-1].add(elem)
                elif elem.tag == "Annotation":
                    parsed = readers.pop().finish()
                    if parsed is not None:
                        group, vertices = parsed
                        (exclusion if _is_exclusion(group) else tumour).append(vertices)
                if open_elements:  # done with it: drop it from its parent (its last child, so O(1))
                    open_elements[-1].remove(elem)
    except DefusedXmlException as exc:
        raise ValueError(f"{path}: forbidden XML construct ({type(exc).__name__}: {exc})") from None
    except ET.ParseError as exc:
        raise ValueError(f"{path}: malformed XML ({exc})") from None
    except (UnicodeError, LookupError) as exc:  # undecodable text or an unknown declared encoding
        raise ValueError(f"{path}: cannot decode XML ({exc})") from None
    except RecursionError:
        raise ValueError(f"{path}: XML nested too deeply") from None
    if not root_seen:
        raise ValueError(f"{path}: empty XML document")
    return Annotations(tumour=tuple(tumour), exclusion=tuple(exclusion))


def _annotations_tree(ann: Annotations) -> ET.ElementTree:
    root = ET.Element("ASAP_Annotations")
    annotations = ET.SubElement(root, "Annotations")
    polys = [("_0", "#F4FA58", p) for p in ann.tumour] + [("_2", "#64FE2E", p) for p in ann.exclusion]
    for i, (group, colour, vertices) in enumerate(polys):
        a = ET.SubElement(
            annotations,
            "Annotation",
            {"Name": f"_{i}", "Type": "Polygon", "PartOfGroup": group, "Color": colour},
        )
        coords = ET.SubElement(a, "Coordinates")
        for order, (x, y) in enumerate(vertices.tolist()):
            # repr() is the shortest text that reads back as the same float: exact round trip.
            ET.SubElement(coords, "Coordinate", {"Order": str(order), "X": repr(x), "Y": repr(y)})
    groups = ET.SubElement(root, "AnnotationGroups")
    for name, colour in (("_0", "#FF0000"), ("_1", "#FF0000"), ("_2", "#00FF00")):
        g = ET.SubElement(groups, "Group", {"Name": name, "PartOfGroup": "None", "Color": colour})
        ET.SubElement(g, "Attributes")
    ET.indent(root, space="\t")
    return ET.ElementTree(root)


def write_asap_xml(path: str | os.PathLike[str], annotations: Annotations) -> None:
    """Write annotations as ASAP XML (tumour as group ``_0``, exclusions as ``_2``), atomically.

    The file is written to a temporary file in the same folder and renamed over ``path``, so a reader
    never sees a partial file. Coordinates are written with full float precision.
    """
    if not isinstance(annotations, Annotations):
        raise TypeError(f"annotations must be Annotations, got {type(annotations).__name__}")
    path = Path(path)
    tree = _annotations_tree(annotations)
    atomic_write(path, lambda fh: tree.write(fh, encoding="utf-8", xml_declaration=True))


def available_memory() -> int | None:
    """Bytes of memory the kernel says are available for a new allocation (Linux), or None."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def require_memory(need: float, what: str, advice: str = "") -> None:
    """MemoryError naming `what` when its `need` bytes exceed the memory available. For checks before
    allocating: a large np.empty succeeds, and only its first writes fail, in the OOM killer."""
    free = available_memory()
    if free is not None and need > free:
        raise MemoryError(f"{what} need {need / 2**30:,.1f} GiB, more than the {free / 2**30:,.1f} GiB of memory "
                          f"available{advice}")


_together = threading.local()  # .pending: [(temporary, path)] of the innermost written_together block


def atomic_write(path: Path, write) -> None:  # noqa: ANN001 - write(fh) callback
    """Call ``write(binary file)`` on a temporary file beside ``path``, then rename it to ``path``
    (inside a ``written_together`` block of this thread: when the block ends)."""
    path = Path(path)
    # open(..., "xb") rather than mkstemp: the file gets the usual umask permissions, not 0600.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "xb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        pending = getattr(_together, "pending", None)
        if pending is not None:
            pending.append((tmp, path))
            return
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(exc, OSError) and exc.errno is not None and str(path) not in str(exc):
            raise _naming(path, exc) from exc
        raise


def _naming(path: Path, exc: OSError) -> OSError:
    # "[Errno 28] No space left on device" alone does not say which file
    return type(exc)(exc.errno, f"cannot write {path}: {exc.strerror}")


@contextlib.contextmanager
def written_together() -> Iterator[None]:
    """Files that belong together (a heatmap and its picture; an evaluation's metrics and plots): the
    ``atomic_write`` calls of this thread inside the block keep their temporary files, which are all
    renamed into place when the block ends without error, and all removed when it fails. A failure
    then leaves the files from before as they were: not some new and some old, nor half a pair."""
    if getattr(_together, "pending", None) is not None:  # nested: the outer block settles
        yield
        return
    pending: list[tuple[Path, Path]] = []
    _together.pending = pending
    try:
        yield
        while pending:
            tmp, path = pending[0]
            try:
                os.replace(tmp, path)
            except OSError as exc:
                raise _naming(path, exc) from exc
            pending.pop(0)
    finally:
        _together.pending = None
        for tmp, _ in pending:  # a failure: what was written in the block goes
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)


# --------------------------------------------------------------------------------------------------
# Rasterisation


def _pixel_box(vertices: np.ndarray) -> tuple[int, int, int, int]:
    """Half-open pixel box outside which no pixel centre can be inside the polygon.

    With shifted vertices V' = V - 0.5, pixel p is inside only if min(V') <= p < max(V'), that is
    p in [ceil(min V'), ceil(max V')).
    """
    shifted = vertices - 0.5
    lo = np.ceil(shifted.min(axis=0))
    hi = np.ceil(shifted.max(axis=0))
    return int(lo[0]), int(lo[1]), int(hi[0]), int(hi[1])


def _polygon_spans(vertices: np.ndarray, x0: int, y0: int, w: int, h: int):
    """Spans of one polygon inside a window: lists (rows, starts, stops), window-relative, half-open.

    Pixel (x, y) (absolute level-0 integers) is inside iff an odd number of edges (xi, yi)-(xj, yj)
    of the shifted polygon (vertices - 0.5, j the previous vertex) satisfy
        min(yi, yj) <= y < max(yi, yj)  and  x < (xj - xi) * (y - yi) / (yj - yi) + xi,
    the crossing test of skimage's point_in_polygon, evaluated with the same float64 expression
    (skimage additionally counts centres exactly on an edge as inside; here a centre on a left or top
    edge is inside and one on a right or bottom edge is not, so polygons sharing an edge never share a
    pixel). The test uses absolute coordinates only, so every window agrees with every other.
    """
    v = vertices - 0.5
    xi, yi = v[:, 0], v[:, 1]
    xj, yj = np.roll(xi, 1), np.roll(yi, 1)
    # Rows y (absolute) with lo <= y < hi are y in [ceil(lo), ceil(hi)), clipped to the window.
    r_lo = np.clip(np.ceil(np.minimum(yi, yj)), y0, y0 + h).astype(np.int64)
    r_hi = np.clip(np.ceil(np.maximum(yi, yj)), y0, y0 + h).astype(np.int64)
    n = r_hi - r_lo
    live = n > 0
    if not live.any():
        return [], [], []
    xi, yi, xj, yj, r_lo, n = xi[live], yi[live], xj[live], yj[live], r_lo[live], n[live]
    # One entry per (edge, row) crossing, built without a Python loop.
    edge = np.repeat(np.arange(len(n)), n)
    starts = np.cumsum(n) - n
    rows = r_lo[edge] + (np.arange(edge.size) - starts[edge])
    xc = (xj[edge] - xi[edge]) * (rows - yi[edge]) / (yj[edge] - yi[edge]) + xi[edge]
    # The edge toggles pixels x < xc, i.e. x < ceil(xc): window columns [0, ceil(xc) - x0).
    col = np.clip(np.ceil(xc) - x0, 0, w).astype(np.int64)
    # Every row crosses an even number of edges; sorted along the row, crossings pair up into the
    # spans [c0, c1), [c2, c3), ... of pixels toggled an odd number of times.
    key = np.sort((rows - y0) * (w + 1) + col)
    a, b = key[0::2], key[1::2]
    keep = a != b
    a, b = a[keep], b[keep]
    return (a // (w + 1)).tolist(), (a % (w + 1)).tolist(), (b % (w + 1)).tolist()


def _fill_union(polys: Iterable[np.ndarray], x0: int, y0: int, w: int, h: int, out: np.ndarray, value: bool):
    """Set out[...] = value over the union of the polygons, each looked at only within its pixel box.

    Filling span by span (a slice assignment each) is far cheaper than any per-pixel prefix scan.
    """
    for p in polys:
        bx0, by0, bx1, by1 = _pixel_box(p)
        if bx0 >= x0 + w or bx1 <= x0 or by0 >= y0 + h or by1 <= y0:
            continue
        for r, a, b in zip(*_polygon_spans(p, x0, y0, w, h)):
            out[r, a:b] = value


def fill_polygons(polys: Sequence[np.ndarray], x0: int, y0: int, w: int, h: int) -> np.ndarray:
    """Union of polygons (pixel-centre rule, as ``rasterize``) over a window; bool (h, w).

    Used by the slide generator for tissue regions, so tissue and tumour share one rasteriser.
    """
    out = np.zeros((h, w), dtype=bool)
    _fill_union(polys, int(x0), int(y0), int(w), int(h), out, True)
    return out


def rasterize(ann: Annotations, x0: int, y0: int, w: int, h: int) -> np.ndarray:
    """Tumour mask of a level-0 window: bool (h, w), element [j, i] is pixel (x0 + i, y0 + j).

    A pixel is tumour when its centre lies inside a tumour polygon and inside no exclusion polygon.
    Cost: the window area plus the rows spanned by the polygons' edges inside it.
    """
    x0, y0, w, h = (int(v) for v in (x0, y0, w, h))
    if w < 0 or h < 0:
        raise ValueError(f"rasterize: negative window size {w}x{h}")
    out = np.zeros((h, w), dtype=bool)
    if w == 0 or h == 0:
        return out
    _fill_union(ann.tumour, x0, y0, w, h, out, True)
    if ann.exclusion and out.any():
        _fill_union(ann.exclusion, x0, y0, w, h, out, False)
    return out


def any_tumour(ann: Annotations, rects: np.ndarray) -> np.ndarray:
    """For each level-0 rect (x0, y0, x1, y1), half-open, whether it holds a tumour pixel; bool (N,).

    Only rects meeting some tumour polygon's box are looked at. Those are answered from rasterised
    tiles of _QUERY_TILE pixels (each clipped to the rects that need it), so the cost follows the
    tumour area and the rects near tumour, not the number of rects.
    """
    rects = np.asarray(rects)
    if rects.ndim != 2 or rects.shape[1] != 4:
        raise ValueError(f"any_tumour: rects must have shape (N, 4), got {rects.shape}")
    rects = rects.astype(np.int64, copy=False)
    result = np.zeros(len(rects), dtype=bool)
    boxes = ann.tumour_boxes()
    if len(rects) == 0 or len(boxes) == 0:
        return result
    # Clip every rect to the union box of all tumour polygons; empty ones cannot hold tumour.
    ux0, uy0 = boxes[:, 0].min(), boxes[:, 1].min()
    ux1, uy1 = boxes[:, 2].max(), boxes[:, 3].max()
    r = rects.copy()
    np.maximum(r[:, 0], ux0, out=r[:, 0])
    np.maximum(r[:, 1], uy0, out=r[:, 1])
    np.minimum(r[:, 2], ux1, out=r[:, 2])
    np.minimum(r[:, 3], uy1, out=r[:, 3])
    cand = np.flatnonzero((r[:, 0] < r[:, 2]) & (r[:, 1] < r[:, 3]))
    if cand.size:
        # Keep rects meeting at least one polygon box (chunked to bound the N x P comparison).
        keep = []
        for s in range(0, cand.size, 65536):
            c = cand[s : s + 65536]
            rc = r[c]
            hit = (
                (rc[:, None, 0] < boxes[None, :, 2])
                & (rc[:, None, 2] > boxes[None, :, 0])
                & (rc[:, None, 1] < boxes[None, :, 3])
                & (rc[:, None, 3] > boxes[None, :, 1])
            ).any(axis=1)
            keep.append(c[hit])
        cand = np.concatenate(keep)
    if cand.size == 0:
        return result
    rc = r[cand]
    # Split rects over a grid of tiles: one (rect, tile) pair for every tile a rect touches.
    t = _QUERY_TILE
    tx0, ty0 = rc[:, 0] // t, rc[:, 1] // t
    tx1, ty1 = (rc[:, 2] - 1) // t, (rc[:, 3] - 1) // t
    nx, ny = tx1 - tx0 + 1, ty1 - ty0 + 1
    counts = nx * ny
    pair_rect = np.repeat(np.arange(len(rc)), counts)
    k = np.arange(pair_rect.size) - np.repeat(np.cumsum(counts) - counts, counts)
    pair_tx = tx0[pair_rect] + k % nx[pair_rect]
    pair_ty = ty0[pair_rect] + k // nx[pair_rect]
    order = np.lexsort((pair_tx, pair_ty))
    pair_rect, pair_tx, pair_ty = pair_rect[order], pair_tx[order], pair_ty[order]
    keys = np.stack([pair_ty, pair_tx], axis=1)
    bounds = np.flatnonzero(np.any(np.diff(keys, axis=0) != 0, axis=1)) + 1
    found = np.zeros(len(rc), dtype=bool)
    for grp in np.split(np.arange(pair_rect.size), bounds):
        idx = pair_rect[grp]
        idx = idx[~found[idx]]
        if idx.size == 0:
            continue
        gx0, gy0 = int(pair_tx[grp[0]]) * t, int(pair_ty[grp[0]]) * t
        # The parts of these rects inside this tile, and the box they span (what we rasterise).
        q = rc[idx]
        qx0 = np.maximum(q[:, 0], gx0)
        qy0 = np.maximum(q[:, 1], gy0)
        qx1 = np.minimum(q[:, 2], gx0 + t)
        qy1 = np.minimum(q[:, 3], gy0 + t)
        wx0, wy0, wx1, wy1 = int(qx0.min()), int(qy0.min()), int(qx1.max()), int(qy1.max())
        mask = rasterize(ann, wx0, wy0, wx1 - wx0, wy1 - wy0)
        if not mask.any():
            continue
        boxes_in = zip((qx0 - wx0).tolist(), (qy0 - wy0).tolist(), (qx1 - wx0).tolist(), (qy1 - wy0).tolist())
        hits = [bool(mask[b0:b1, a0:a1].any()) for a0, b0, a1, b1 in boxes_in]
        found[idx[np.array(hits, dtype=bool)]] = True
    result[cand] = found
    return result
