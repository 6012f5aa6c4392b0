"""Camelyon16-style synthetic slides: pyramidal JPEG TIFFs, tumour mask TIFFs and ASAP XML.

The fixtures every test and benchmark of the project is built on. A slide is an H&E-like picture:
white glass, irregular tissue blobs (pink stroma, small purple nuclei) and, on tumour slides, 1-4
irregular tumour regions drawn denser, darker and more purple (bigger nuclei, tinted stroma), so the
difference survives downsampling to levels 2 and 3. One tumour region per tumour slide is small (a few
hundred level-0 pixels across); the largest has an exclusion hole (ASAP group ``_2``) of normal tissue.

Layout of what is written (what OpenSlide's generic-TIFF reader expects):

- slide: RGB, 256x256 tiles, JPEG (quality 85, YCbCr 4:2:0 as scanners write it), one page per level
  (page 0 full resolution, each next page half the size rounded up, marked reduced-resolution),
  halving while the last level's larger side is at least 1000 px; X/YResolution in pixels per
  centimetre so that OpenSlide reports ``openslide.mpp-x`` = ``openslide.mpp-y`` = 0.243;
- mask (``*_mask.tif``): uint8, 255 = tumour, same level sizes, 256x256 tiles, deflate; each level is
  the 2x2 max-pool of the level above, so no small tumour disappears;
- XML (``*.xml``): the polygons the mask is the ``wsitile.masks.rasterize`` of (same function).

Rendering is chunked (CHUNK x CHUNK level-0 pixels) and fully vectorised. Every random quantity is
keyed by what it belongs to - the slide seed and the chunk for pixel noise, the slide seed and a
128-px cell for nuclei, lattice points for smooth noise - so a chunk's pixels never depend on which
other chunks were rendered or in what order. Level 0 is never held in memory: it is rendered one
strip of chunks at a time, encoded, streamed to tifffile as pre-encoded tiles, and 2x2-reduced into
level 1 on the way; lower levels are built from the level above. Memory is bounded by level 1.

``write_sparse_slide`` writes a slide of more than 2^31 level-0 pixels that is constant background
but for one small tissue patch; a level is then "background + one dense rectangle" and blank tiles are
encoded once and reused, so it takes seconds.

Files are written to a temporary file beside the target and renamed (DESIGN.md section 8).
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import imagecodecs
import numpy as np
import tifffile
from tqdm.auto import tqdm

from .masks import Annotations, atomic_write, fill_polygons, rasterize, write_asap_xml

__all__ = [
    "CHUNK",
    "JPEG_QUALITY",
    "MPP",
    "TILE",
    "level_shapes",
    "synth_dataset",
    "write_slide",
    "write_sparse_slide",
]

#: Level-0 microns per pixel, as Camelyon16's 40x scans.
MPP = 0.243
#: TIFF tile edge, pixels.
TILE = 256
#: Render unit, level-0 pixels (a multiple of TILE); pixel noise is keyed by chunk.
CHUNK = 1024
#: JPEG quality of slide tiles.
JPEG_QUALITY = 85
#: Pyramid rule: halve while the last level's larger side is at least this.
MIN_LEVEL_SIDE = 1000
#: Size of the gigapixel sparse slide (level 0 > 2^31 pixels).
SPARSE_SHAPE = (36864, 65536)  # (height, width)

_THREADS = max(1, min(4, os.cpu_count() or 1))

# Colours (RGB, 0-255) of the H&E look.
_GLASS = np.array([243.0, 242.0, 245.0], dtype=np.float32)
_STROMA = np.array([236.0, 168.0, 204.0], dtype=np.float32)
_STROMA_TUMOUR = np.array([198.0, 128.0, 192.0], dtype=np.float32)
_STROMA_VARIATION = np.array([10.0, 24.0, 12.0], dtype=np.float32)
_NUCLEUS = np.array([96.0, 58.0, 150.0], dtype=np.float32)
_NUCLEUS_TUMOUR = np.array([66.0, 30.0, 122.0], dtype=np.float32)

# Streams of the counter-based hash (one per kind of random quantity).
_S_NOISE, _S_SMOOTH_COARSE, _S_SMOOTH_FINE, _S_NUCLEI, _S_NUCLEI_TUMOUR = range(1, 6)


# --------------------------------------------------------------------------------------------------
# Counter-based randomness: splitmix64 over (seed, stream, keys...), vectorised in NumPy.

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MUL1 = np.uint64(0xBF58476D1CE4E5B9)
_MUL2 = np.uint64(0x94D049BB133111EB)


def _mix(z: np.ndarray) -> np.ndarray:
    z = (z ^ (z >> np.uint64(30))) * _MUL1
    z = (z ^ (z >> np.uint64(27))) * _MUL2
    return z ^ (z >> np.uint64(31))


def _hash_uniform(seed: int, stream: int, *keys: np.ndarray) -> np.ndarray:
    """Uniform [0, 1) float64 numbers, a pure function of (seed, stream, keys) element by element."""
    shape = np.broadcast_shapes(*(np.shape(k) for k in keys))
    z = _mix(np.full(shape, (seed * 0x100000001B3 + stream) % 2**64, dtype=np.uint64))
    for k in keys:
        z = _mix(z ^ (np.asarray(k).astype(np.int64).astype(np.uint64) + _GOLDEN))
    return (z >> np.uint64(11)).astype(np.float64) * (1.0 / 2**53)


# --------------------------------------------------------------------------------------------------
# Scene: the slide's geometry, drawn once from the seed.


@dataclass(frozen=True)
class _Scene:
    height: int
    width: int
    seed: int
    tissue: tuple[np.ndarray, ...]  # tissue blob polygons, level-0 (x, y)
    ann: Annotations  # tumour polygons (empty on normal slides)
    glass_noise: float  # amplitude of the background noise (0: constant glass)


def level_shapes(height: int, width: int) -> list[tuple[int, int]]:
    """(height, width) of each pyramid level: halve (rounding up) while the larger side >= 1000."""
    shapes = [(int(height), int(width))]
    while max(shapes[-1]) >= MIN_LEVEL_SIDE:
        h, w = shapes[-1]
        shapes.append(((h + 1) // 2, (w + 1) // 2))
    return shapes


def _star_polygon(rng: np.random.Generator, cx: float, cy: float, radius: float, n: int, rough: float):
    """Irregular star-shaped polygon: radius modulated by a few random low harmonics.

    Returns (vertices (n, 2), smallest vertex radius): the disc of that radius around the centre lies
    inside the polygon (up to the chords between vertices, which we keep short with enough vertices).
    """
    theta = np.sort(rng.uniform(0.0, 2 * np.pi, n)) if n < 40 else np.linspace(0, 2 * np.pi, n, endpoint=False)
    r = np.ones(n)
    for k in range(2, 8):
        r += rng.uniform(0, rough / k) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    r *= radius * (1 + rng.uniform(-0.01, 0.01, n))  # small vertex jitter
    r = np.maximum(r, 0.35 * radius)
    verts = np.stack([cx + r * np.cos(theta), cy + r * np.sin(theta)], axis=1)
    return verts, float(r.min()) * math.cos(np.pi / max(n, 3))


def _coverage(polys: list[np.ndarray], height: int, width: int) -> float:
    """Fraction of the slide inside the polygons, estimated on a coarse raster."""
    scale = max(height, width) / 256.0
    h, w = max(1, int(height / scale)), max(1, int(width / scale))
    return float(fill_polygons([p / scale for p in polys], 0, 0, w, h).mean())


def _make_tissue(rng: np.random.Generator, height: int, width: int):
    """Tissue blobs covering roughly 30-50% of the slide; returns (polygons, inner radii, centres)."""
    side = min(height, width)
    target = rng.uniform(0.33, 0.45)
    polys: list[np.ndarray] = []
    inner: list[float] = []
    centres: list[tuple[float, float]] = []
    for _ in range(40):
        if len(polys) >= 3 and _coverage(polys, height, width) >= target:
            break
        radius = rng.uniform(0.13, 0.22) * side
        cx = rng.uniform(radius, width - radius)
        cy = rng.uniform(radius, height - radius)
        verts, rmin = _star_polygon(rng, cx, cy, radius, 256, 0.6)
        verts = np.clip(verts, 1.0, [width - 1.0, height - 1.0])
        if _coverage([*polys, verts], height, width) > 0.5:
            continue
        polys.append(verts)
        inner.append(rmin)
        centres.append((cx, cy))
    return polys, inner, centres


def _make_tumours(rng: np.random.Generator, inner: list[float], centres: list[tuple[float, float]], side: int):
    """2-4 tumour polygons inside tissue discs: the first is small (an isolated-tumour-cell region by
    Camelyon16's 275 um rule), the second is placed in the roomiest blob and made as large as it allows,
    so a tumour slide of 8192 px or more usually holds a lesion the challenge's FROC counts; the largest
    has a hole."""
    count = int(rng.integers(2, 5))
    tumours: list[np.ndarray] = []
    radii: list[float] = []
    for i in range(count):
        b = int(np.argmax(inner)) if i == 1 else int(rng.integers(len(inner)))
        room = 0.75 * inner[b]  # tumour (with its roughness) must stay inside this disc
        if i == 0:
            radius = rng.uniform(60.0, 150.0)  # a few hundred pixels across
        elif i == 1:
            radius = rng.uniform(0.05, 0.08) * side
        else:
            radius = rng.uniform(0.015, 0.045) * side
        radius = min(radius, room / (1.25 if i == 1 else 1.5))
        slack = max(room - 1.5 * radius, 0.0)
        ang, dist = rng.uniform(0, 2 * np.pi), slack * math.sqrt(rng.uniform())
        cx = centres[b][0] + dist * math.cos(ang) + rng.uniform(-0.5, 0.5)
        cy = centres[b][1] + dist * math.sin(ang) + rng.uniform(-0.5, 0.5)
        verts, _ = _star_polygon(rng, cx, cy, radius, int(rng.integers(24, 72)), 0.45)
        tumours.append(verts)
        radii.append(radius)
    holes: list[np.ndarray] = []
    big = int(np.argmax(radii))
    for i, (verts, radius) in enumerate(zip(tumours, radii)):
        if i == big or (radius > 200 and rng.uniform() < 0.3):
            c = verts.mean(axis=0) + rng.uniform(-0.1, 0.1, 2) * radius
            hole, _ = _star_polygon(rng, c[0], c[1], 0.28 * radius, int(rng.integers(16, 40)), 0.3)
            holes.append(hole)
    return Annotations(tumour=tuple(tumours), exclusion=tuple(holes))


def _make_scene(height: int, width: int, seed: int, tumour: bool) -> _Scene:
    rng = np.random.default_rng([seed, 0])
    tissue, inner, centres = _make_tissue(rng, height, width)
    ann = _make_tumours(rng, inner, centres, min(height, width)) if tumour else Annotations()
    return _Scene(height, width, seed, tuple(tissue), ann, glass_noise=3.0)


# --------------------------------------------------------------------------------------------------
# Rendering one chunk


def _smooth_noise(seed: int, stream: int, spacing: int, x0: int, y0: int, w: int, h: int) -> np.ndarray:
    """Value noise in [-1, 1] on a global lattice of the given spacing, smoothstep-interpolated."""
    gx = np.arange(x0 // spacing, (x0 + w) // spacing + 2)
    gy = np.arange(y0 // spacing, (y0 + h) // spacing + 2)
    lattice = (2 * _hash_uniform(seed, stream, gy[:, None], gx[None, :]) - 1).astype(np.float32)
    xs = np.arange(x0, x0 + w)
    ys = np.arange(y0, y0 + h)
    ix, fx = xs // spacing - gx[0], (xs % spacing) / spacing
    iy, fy = ys // spacing - gy[0], (ys % spacing) / spacing
    tx = (fx * fx * (3 - 2 * fx)).astype(np.float32)
    ty = (fy * fy * (3 - 2 * fy)).astype(np.float32)[:, None]
    along_x = lattice[:, ix] * (1 - tx) + lattice[:, ix + 1] * tx  # (lattice rows, w)
    return along_x[iy] * (1 - ty) + along_x[iy + 1] * ty


def _nuclei(seed: int, stream: int, cells: tuple[np.ndarray, np.ndarray], slots: int, presence: float,
            rmin: float, rmax: float, cell: int):
    """Nuclei of the given cells: centres jittered in their 'cell' px cell, radii, darkness."""
    cy, cx = np.meshgrid(cells[0], cells[1], indexing="ij")
    cy, cx = cy.ravel()[:, None], cx.ravel()[:, None]
    k = np.arange(slots)[None, :]
    u = [_hash_uniform(seed, stream, cy, cx, k, np.full_like(k, d)).ravel() for d in range(5)]
    keep = u[0] < presence
    x = (cx + 0 * k).ravel() * cell + u[1] * cell
    y = (cy + 0 * k).ravel() * cell + u[2] * cell
    r = rmin + (rmax - rmin) * u[3]
    dark = 0.75 + 0.25 * u[4]
    return x[keep], y[keep], r[keep], dark[keep]


def _draw_nuclei(field: np.ndarray, x0: int, y0: int, x, y, r, dark) -> None:
    """Max-composite anti-aliased discs into field (h, w) float32, window origin (x0, y0)."""
    if len(x) == 0:
        return
    h, w = field.shape
    reach = int(math.ceil(float(r.max()))) + 1
    off = np.arange(-reach, reach + 1)
    px = np.floor(x).astype(np.int64)[:, None] + off  # (N, B) absolute columns
    py = np.floor(y).astype(np.int64)[:, None] + off
    dx = (px + 0.5 - x[:, None]).astype(np.float32)
    dy = (py + 0.5 - y[:, None]).astype(np.float32)
    dist = np.sqrt(dy[:, :, None] ** 2 + dx[:, None, :] ** 2)
    alpha = np.clip(r[:, None, None].astype(np.float32) - dist + 0.5, 0, 1) * dark[:, None, None].astype(np.float32)
    inside = (alpha > 0) & ((py - y0)[:, :, None] >= 0) & ((py - y0)[:, :, None] < h)
    inside &= ((px - x0)[:, None, :] >= 0) & ((px - x0)[:, None, :] < w)
    flat = (py - y0)[:, :, None] * w + (px - x0)[:, None, :]
    np.maximum.at(field.reshape(-1), flat[inside], alpha[inside])


def _cells_around(x0: int, y0: int, w: int, h: int, margin: float, cell: int):
    ys = np.arange(int((y0 - margin) // cell), int((y0 + h + margin) // cell) + 1)
    xs = np.arange(int((x0 - margin) // cell), int((x0 + w + margin) // cell) + 1)
    return ys, xs


def _render_chunk(scene: _Scene, cx: int, cy: int) -> np.ndarray:
    """RGB uint8 pixels of chunk (cx, cy): level-0 box [cx*CHUNK, ...) clipped to the slide."""
    x0, y0 = cx * CHUNK, cy * CHUNK
    w, h = min(CHUNK, scene.width - x0), min(CHUNK, scene.height - y0)
    seed = scene.seed
    tissue = fill_polygons(scene.tissue, x0, y0, w, h)
    noise_rng = np.random.default_rng([seed, _S_NOISE, cx, cy])
    grain = noise_rng.random((h, w), dtype=np.float32) - 0.5  # grey pixel noise, one per pixel
    if not tissue.any():
        img = _GLASS + (grain * (2 * scene.glass_noise))[:, :, None]
        return np.clip(img + 0.5, 0, 255).astype(np.uint8)
    tumour = rasterize(scene.ann, x0, y0, w, h)
    has_tumour = bool(tumour.any())

    # Stroma: base colour (tinted inside tumour) with two octaves of smooth variation.
    vary = 0.65 * _smooth_noise(seed, _S_SMOOTH_COARSE, 512, x0, y0, w, h)
    vary += 0.35 * _smooth_noise(seed, _S_SMOOTH_FINE, 48, x0, y0, w, h)
    img = _STROMA + vary[:, :, None] * _STROMA_VARIATION
    t = tumour.astype(np.float32)[:, :, None] if has_tumour else None
    if t is not None:  # has_tumour
        img += t * (_STROMA_TUMOUR - _STROMA)

    # Nuclei: sparse small ones in normal tissue, dense large dark ones in tumour.
    cell = 128
    nuc = np.zeros((h, w), dtype=np.float32)
    cells = _cells_around(x0, y0, w, h, 12, cell)
    _draw_nuclei(nuc, x0, y0, *_nuclei(seed, _S_NUCLEI, cells, 12, 0.8, 5.0, 9.0, cell))
    if t is not None:  # has_tumour
        nuc_t = np.zeros((h, w), dtype=np.float32)
        cells = _cells_around(x0, y0, w, h, 20, cell)
        _draw_nuclei(nuc_t, x0, y0, *_nuclei(seed, _S_NUCLEI_TUMOUR, cells, 36, 0.9, 9.0, 15.0, cell))
        nuc = np.where(tumour, nuc_t, nuc)
        colour = _NUCLEUS + t * (_NUCLEUS_TUMOUR - _NUCLEUS)
    else:
        colour = _NUCLEUS
    a = (nuc * (0.85 + 0.3 * grain))[:, :, None]  # chromatin texture
    img += a * (colour - img)

    glass = _GLASS + (grain * (2 * scene.glass_noise))[:, :, None]
    img = np.where(tissue[:, :, None], img + grain[:, :, None] * 6.0, glass)
    return np.clip(img + 0.5, 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------------
# Pyramid levels: "background + one dense rectangle", and their 2x2 reduction


@dataclass
class _Level:
    """A pyramid level: constant `background` everywhere except the `dense` block at (x0, y0)."""

    height: int
    width: int
    background: np.ndarray  # (C,) uint8
    x0: int
    y0: int
    dense: np.ndarray  # (h, w, C) uint8


def _mean2x2(a: np.ndarray) -> np.ndarray:
    s = a[0::2, 0::2].astype(np.uint16) + a[1::2, 0::2] + a[0::2, 1::2] + a[1::2, 1::2]
    return ((s + 2) >> 2).astype(np.uint8)


def _max2x2(a: np.ndarray) -> np.ndarray:
    return np.maximum(np.maximum(a[0::2, 0::2], a[1::2, 0::2]), np.maximum(a[0::2, 1::2], a[1::2, 1::2]))


def _reduce_level(lv: _Level, reduce: Callable[[np.ndarray], np.ndarray]) -> _Level:
    """The next level: ``reduce`` (2x2 mean or max) of lv, size halved rounding up.

    The dense block is grown to even coordinates; padding inside the slide takes the background (which
    is what is there), padding beyond the slide's edge repeats the edge pixel.
    """
    h, w = lv.dense.shape[:2]
    ey0, ex0 = lv.y0 - lv.y0 % 2, lv.x0 - lv.x0 % 2
    ey1, ex1 = lv.y0 + h + (lv.y0 + h) % 2, lv.x0 + w + (lv.x0 + w) % 2
    buf = lv.dense
    if (ey0, ex0, ey1, ex1) != (lv.y0, lv.x0, lv.y0 + h, lv.x0 + w):
        buf = np.empty((ey1 - ey0, ex1 - ex0, lv.dense.shape[2]), dtype=np.uint8)
        buf[...] = lv.background
        top, left = lv.y0 - ey0, lv.x0 - ex0
        buf[top : top + h, left : left + w] = lv.dense
        if ey1 > lv.height:
            buf[-1] = buf[-2]
        if ex1 > lv.width:
            buf[:, -1] = buf[:, -2]
    return _Level((lv.height + 1) // 2, (lv.width + 1) // 2, lv.background, ex0 // 2, ey0 // 2, reduce(buf))


# --------------------------------------------------------------------------------------------------
# Tile encoding and TIFF writing


@dataclass(frozen=True)
class _Codec:
    """How tiles of one file are encoded, and the matching tifffile arguments."""

    channels: int
    encode: Callable[[np.ndarray], bytes]
    tiff_args: dict


def _jpeg_codec() -> _Codec:
    # What tifffile itself does for compression='jpeg', photometric='rgb': YCbCr 4:2:0 JPEG tiles,
    # tagged Photometric=YCbCr with YCbCrSubSampling=(2, 2). We encode ourselves to reuse blank tiles.
    def encode(tile: np.ndarray) -> bytes:
        encoded = imagecodecs.jpeg_encode(
            tile, level=JPEG_QUALITY, colorspace="RGB", outcolorspace="YCBCR", subsampling=(2, 2)
        )
        return bytes(encoded)  # no copy: imagecodecs returns bytes (its stub says bytes | bytearray)

    args = {"compression": "jpeg", "photometric": "rgb", "subsampling": (2, 2)}
    return _Codec(3, encode, args)


def _deflate_codec() -> _Codec:
    def encode(tile: np.ndarray) -> bytes:
        return bytes(imagecodecs.zlib_encode(tile, level=6))  # type: ignore[arg-type]  # any buffer works

    return _Codec(1, encode, {"compression": "zlib", "photometric": "minisblack"})


class _TileEncoder:
    """Encodes tiles in a thread pool (the codecs release the GIL); caches constant tiles."""

    def __init__(self, codec: _Codec, pool: ThreadPoolExecutor):
        self.codec = codec
        self.pool = pool
        self._constant: dict[bytes, bytes] = {}

    def constant(self, value: np.ndarray) -> bytes:
        key = bytes(value)
        if key not in self._constant:
            tile = np.empty((TILE, TILE, self.codec.channels), dtype=np.uint8)
            tile[...] = value
            self._constant[key] = self.codec.encode(tile)
        return self._constant[key]

    def row(self, tiles: list[np.ndarray | bytes]) -> list[bytes]:
        """Encode one row of tiles; bytes items pass through (already encoded)."""
        return list(self.pool.map(lambda t: t if isinstance(t, bytes) else self.codec.encode(t), tiles))


def _pad_tile(tile: np.ndarray) -> np.ndarray:
    """Full TILE x TILE tile; a partial edge tile repeats its last row/column (OpenSlide crops it)."""
    h, w = tile.shape[:2]
    if h == TILE and w == TILE:
        return np.ascontiguousarray(tile)
    return np.pad(tile, ((0, TILE - h), (0, TILE - w), (0, 0)), mode="edge")


def _level_tiles(lv: _Level, enc: _TileEncoder) -> Iterator[bytes]:
    """Encoded tiles of a level in row-major order; tiles outside the dense block are constant."""
    blank = enc.constant(lv.background)
    dh, dw = lv.dense.shape[:2]
    for ty in range(0, lv.height, TILE):
        row: list[np.ndarray | bytes] = []
        th = min(TILE, lv.height - ty)
        for tx in range(0, lv.width, TILE):
            tw = min(TILE, lv.width - tx)
            iy0, ix0 = max(ty, lv.y0), max(tx, lv.x0)
            iy1, ix1 = min(ty + th, lv.y0 + dh), min(tx + tw, lv.x0 + dw)
            if iy0 >= iy1 or ix0 >= ix1:
                row.append(blank)
                continue
            if (iy0, ix0, iy1, ix1) == (ty, tx, ty + th, tx + tw):
                tile = lv.dense[ty - lv.y0 : ty - lv.y0 + th, tx - lv.x0 : tx - lv.x0 + tw]
            else:
                tile = np.empty((th, tw, lv.dense.shape[2]), dtype=np.uint8)
                tile[...] = lv.background
                tile[iy0 - ty : iy1 - ty, ix0 - tx : ix1 - tx] = lv.dense[
                    iy0 - lv.y0 : iy1 - lv.y0, ix0 - lv.x0 : ix1 - lv.x0
                ]
            row.append(_pad_tile(tile))
        yield from enc.row(row)


def _strip_tiles(strip: np.ndarray, enc: _TileEncoder, blank_value: np.ndarray | None) -> Iterator[bytes]:
    """Encoded tiles of a full-width strip (rows a multiple of TILE except the last strip)."""
    blank = enc.constant(blank_value) if blank_value is not None else None
    h, w = strip.shape[:2]
    for ty in range(0, h, TILE):
        row: list[np.ndarray | bytes] = []
        for tx in range(0, w, TILE):
            tile = strip[ty : ty + TILE, tx : tx + TILE]
            if blank is not None and not (tile != blank_value).any():
                row.append(blank)
            else:
                row.append(_pad_tile(tile))
        yield from enc.row(row)


def _write_pyramid(
    path: Path,
    shapes: list[tuple[int, int]],
    codec: _Codec,
    level0_tiles: Iterator[bytes],
    level1: Callable[[], _Level],
    reduce: Callable[[np.ndarray], np.ndarray],
    enc: _TileEncoder,
    description: str,
) -> None:
    """Write a pyramid TIFF atomically: level 0 from a tile stream, then level 1 (filled as a side
    effect of that stream) and each next level reduced from the one above."""
    h0, w0 = shapes[0]
    # Classic TIFF offsets end at 4 GiB; JPEG/deflate shrink our content far below its raw size, but
    # go BigTIFF whenever the raw level 0 alone could not fit (the gigapixel sparse slide).
    bigtiff = h0 * w0 * codec.channels > 2**32 - 2**28
    res = 1e4 / MPP  # pixels per centimetre at level 0

    def write(fh: io.BufferedWriter) -> None:
        with tifffile.TiffWriter(fh, bigtiff=bigtiff) as tw:
            common = dict(dtype=np.uint8, tile=(TILE, TILE), resolutionunit="CENTIMETER", metadata=None, **codec.tiff_args)
            shape0 = (h0, w0, codec.channels) if codec.channels > 1 else (h0, w0)
            tw.write(level0_tiles, shape=shape0, resolution=(res, res), subfiletype=0,
                     description=description, **common)
            lv = None
            for k, (h, w) in enumerate(shapes[1:], start=1):
                lv = level1() if lv is None else _reduce_level(lv, reduce)
                assert (lv.height, lv.width) == (h, w)
                ds_x, ds_y = w0 / w, h0 / h
                shape = (h, w, codec.channels) if codec.channels > 1 else (h, w)
                tw.write(_level_tiles(lv, enc), shape=shape, resolution=(res / ds_x, res / ds_y),
                         subfiletype=1, **common)

    atomic_write(path, write)


def _stream_level0(
    strips: Iterator[np.ndarray], shapes: list[tuple[int, int]], enc: _TileEncoder,
    reduce: Callable[[np.ndarray], np.ndarray], blank_value: np.ndarray | None, holder: dict,
) -> Iterator[bytes]:
    """Encoded level-0 tiles from full-width strips; reduces each strip into level 1 on the way.

    holder['level1'] is the level-1 _Level, complete once the last tile has been taken (tifffile
    takes exactly as many tiles as the page has, so nothing may wait for the generator's end).
    """
    h0, w0 = shapes[0]
    y = 0
    for strip in strips:
        if len(shapes) > 1:
            if "level1" not in holder:
                level1 = np.empty((*shapes[1], strip.shape[2]), dtype=np.uint8)
                holder["level1"] = _Level(*shapes[1], np.zeros(strip.shape[2], np.uint8), 0, 0, level1)
            part = _reduce_level(_Level(h0, w0, strip[0, 0], 0, y, strip), reduce)
            holder["level1"].dense[part.y0 : part.y0 + part.dense.shape[0]] = part.dense
        yield from _strip_tiles(strip, enc, blank_value)
        y += strip.shape[0]


# --------------------------------------------------------------------------------------------------
# Public API


def _check_int(name: str, value: object, minimum: int, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < minimum or (maximum is not None and value > maximum):
        bound = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise ValueError(f"{name} must be {bound}, got {value}")
    return int(value)


def _image_strips(scene: _Scene, pool: ThreadPoolExecutor) -> Iterator[np.ndarray]:
    """Full-width level-0 strips of one chunk row each, chunks rendered in parallel."""
    ncx = -(-scene.width // CHUNK)
    for cy in range(-(-scene.height // CHUNK)):
        chunks = list(pool.map(lambda cx: _render_chunk(scene, cx, cy), range(ncx)))
        yield np.concatenate(chunks, axis=1)


def _mask_strips(ann: Annotations, height: int, width: int) -> Iterator[np.ndarray]:
    for y in range(0, height, CHUNK):
        h = min(CHUNK, height - y)
        strip = rasterize(ann, 0, y, width, h).view(np.uint8) * np.uint8(255)
        yield strip[:, :, None]


def _write_image(path: Path, scene: _Scene, pool: ThreadPoolExecutor) -> None:
    shapes = level_shapes(scene.height, scene.width)
    enc = _TileEncoder(_jpeg_codec(), pool)
    holder: dict = {}
    tiles = _stream_level0(_image_strips(scene, pool), shapes, enc, _mean2x2, None, holder)
    desc = f"wsitile synthetic slide (seed {scene.seed}, {len(scene.ann.tumour)} tumour regions)"
    _write_pyramid(path, shapes, enc.codec, tiles, lambda: holder["level1"], _mean2x2, enc, desc)


def _write_mask(path: Path, ann: Annotations, height: int, width: int, pool: ThreadPoolExecutor) -> None:
    shapes = level_shapes(height, width)
    enc = _TileEncoder(_deflate_codec(), pool)
    holder: dict = {}
    zero = np.zeros(1, dtype=np.uint8)
    tiles = _stream_level0(_mask_strips(ann, height, width), shapes, enc, _max2x2, zero, holder)
    _write_pyramid(path, shapes, enc.codec, tiles, lambda: holder["level1"], _max2x2, enc,
                   "wsitile tumour mask (255 = tumour)")


def write_slide(
    path: str | os.PathLike[str],
    size: int,
    seed: int,
    tumour: bool,
    mask_path: str | os.PathLike[str] | None = None,
    xml_path: str | os.PathLike[str] | None = None,
) -> None:
    """Write one synthetic size x size slide; for a tumour slide also its mask TIFF and ASAP XML.

    ``mask_path`` / ``xml_path`` default, for tumour slides, to ``<stem>_mask.tif`` / ``<stem>.xml``
    beside the slide. Given for a normal slide, they receive an all-zero mask / an empty annotation
    file. The output is a pure function of (size, seed, tumour).
    """
    size = _check_int("size", size, 512, 65536)
    seed = _check_int("seed", seed, 0, 2**63 - 1)
    path = Path(path)
    if tumour:
        mask_path = path.with_name(f"{path.stem}_mask.tif") if mask_path is None else mask_path
        xml_path = path.with_name(f"{path.stem}.xml") if xml_path is None else xml_path
    scene = _make_scene(size, size, seed, bool(tumour))
    with ThreadPoolExecutor(_THREADS) as pool:
        _write_image(path, scene, pool)
        if mask_path is not None:
            _write_mask(Path(mask_path), scene.ann, size, size, pool)
    if xml_path is not None:
        write_asap_xml(xml_path, scene.ann)


def write_sparse_slide(
    path: str | os.PathLike[str], seed: int = 0, shape: tuple[int, int] = SPARSE_SHAPE
) -> tuple[int, int, int, int]:
    """Write a gigapixel slide (default 36864 x 65536, height x width: > 2^31 level-0 pixels) of
    constant glass with one 2048 x 2048 tissue patch far from the origin (bottom right corner).

    Returns the patch's level-0 box (x0, y0, x1, y1), half-open; everything outside it is glass.
    No level is ever held in full: a level is the background plus the patch's reduction.
    """
    seed = _check_int("seed", seed, 0, 2**63 - 1)
    height, width = (_check_int("shape[0]", shape[0], 4 * CHUNK), _check_int("shape[1]", shape[1], 4 * CHUNK))
    patch = 2 * CHUNK
    pcx, pcy = (width - patch - CHUNK) // CHUNK, (height - patch - CHUNK // 2) // CHUNK  # chunk indices
    rng = np.random.default_rng([seed, 0])
    cx, cy = (pcx * CHUNK + patch / 2 + rng.uniform(-50, 50), pcy * CHUNK + patch / 2 + rng.uniform(-50, 50))
    blob, _ = _star_polygon(rng, cx, cy, 0.36 * patch, 256, 0.5)
    scene = _Scene(height, width, seed, (blob,), Annotations(), glass_noise=0.0)
    with ThreadPoolExecutor(_THREADS) as pool:
        rows = [
            np.concatenate([_render_chunk(scene, pcx + i, pcy + j) for i in range(patch // CHUNK)], axis=1)
            for j in range(patch // CHUNK)
        ]
        dense = np.concatenate(rows, axis=0)
        glass = np.clip(_GLASS + 0.5, 0, 255).astype(np.uint8)
        level0 = _Level(height, width, glass, pcx * CHUNK, pcy * CHUNK, dense)
        enc = _TileEncoder(_jpeg_codec(), pool)
        shapes = level_shapes(height, width)
        _write_pyramid(Path(path), shapes, enc.codec, _level_tiles(level0, enc),
                       lambda: _reduce_level(level0, _mean2x2), _mean2x2, enc,
                       f"wsitile sparse gigapixel slide (seed {seed})")
    return (pcx * CHUNK, pcy * CHUNK, pcx * CHUNK + patch, pcy * CHUNK + patch)


def _class_counts(slides: int, normal_fraction: float) -> tuple[int, int]:
    """(tumour, normal) counts: normal = round-half-up(slides * fraction), at least one of each class
    when slides >= 2."""
    normal = int(math.floor(slides * normal_fraction + 0.5))
    if slides >= 2:
        normal = min(max(normal, 1), slides - 1)
    return slides - normal, normal


def synth_dataset(
    outdir: str | os.PathLike[str],
    slides: int,
    seed: int = 0,
    size: int = 8192,
    normal_fraction: float = 1 / 3,
    sparse_gigapixel: bool = False,
    progress: bool = True,
) -> Path:
    """Write a Camelyon16-style dataset into outdir; return the path of its manifest.csv.

    Files: ``tumor_NNN.tif`` + ``tumor_NNN_mask.tif`` + ``tumor_NNN.xml`` per tumour slide,
    ``normal_NNN.tif`` per normal slide, and ``manifest.csv`` (header ``slide,label,split``; the last
    slide of a class with at least 2 slides is ``test``, all others ``train``). With
    ``sparse_gigapixel`` the set additionally holds ``sparse_001.tif`` (see write_sparse_slide); it is a
    stress fixture for coordinates beyond 2^31 and is not listed in the manifest.
    Deterministic: the same arguments give byte-identical files.
    """
    slides = _check_int("slides", slides, 1)
    seed = _check_int("seed", seed, 0, 2**63 - 1)
    size = _check_int("size", size, 512, 65536)
    if isinstance(normal_fraction, bool) or not isinstance(normal_fraction, (int, float, np.floating)):
        raise ValueError(f"normal_fraction must be a number, got {normal_fraction!r}")
    if not (0.0 <= float(normal_fraction) <= 1.0):  # also rejects NaN
        raise ValueError(f"normal_fraction must be in [0, 1], got {normal_fraction}")
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    n_tumour, n_normal = _class_counts(slides, float(normal_fraction))

    jobs: list[tuple[str, str, int]] = []  # (file name, label, slide seed)
    for label, class_id, count in (("tumor", 1, n_tumour), ("normal", 0, n_normal)):
        for i in range(count):
            slide_seed = int(np.random.SeedSequence([seed, class_id, i]).generate_state(1, np.uint64)[0] >> 1)
            jobs.append((f"{label}_{i + 1:03d}.tif", label, slide_seed))
    counts = {"tumor": n_tumour, "normal": n_normal}
    index = {"tumor": 0, "normal": 0}
    rows = []
    for name, label, _ in jobs:
        index[label] += 1
        split = "test" if counts[label] >= 2 and index[label] == counts[label] else "train"
        rows.append((name, label, split))

    bar = tqdm(total=len(jobs) + int(sparse_gigapixel), desc="synthetic slides", unit="slide", disable=not progress)
    with bar:
        for name, label, slide_seed in jobs:
            write_slide(outdir / name, size, slide_seed, tumour=(label == "tumor"))
            bar.update()
        if sparse_gigapixel:
            write_sparse_slide(outdir / "sparse_001.tif", seed=seed)
            bar.update()

    def write_manifest(fh) -> None:  # noqa: ANN001
        text = io.StringIO()
        w = csv.writer(text, lineterminator="\n")
        w.writerow(("slide", "label", "split"))
        w.writerows(rows)
        fh.write(text.getvalue().encode())

    manifest = outdir / "manifest.csv"
    atomic_write(manifest, write_manifest)
    return manifest
