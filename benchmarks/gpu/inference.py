"""GPU call 3 (issue 6, deliverable 4): `wsitile predict` on a Camelyon-size synthetic slide.

The slide: level 0 98,304 x 196,608 px (Camelyon16's largest are about 100,000 x 200,000), about a
quarter tissue, JPEG tiles, generated on the machine. Rendering 19 gigapixels with `wsitile.synth`
would take many minutes even on 16 cores, so the script renders one 16,384 px synthetic slide with
`write_slide` and lays it out as a 6 x 12 mosaic, tile by tile: each level-k tile of the mosaic is the
source's level-k JPEG tile, copied as bytes (the pyramids agree because every source level is whole
tiles), or a glass tile where a copy is left blank to bring tissue to about 25%; the levels below the
source's last are reduced from it and encoded. Every tile the model reads is a real JPEG tile that
the loader decodes; only their content repeats.

Runs (each a `python -m wsitile predict` process, timed from start to exit, so start-up, compiling,
the tissue mask, the grid and the heatmap files count toward seconds per slide; windows/s is the
command's own figure over its prediction loop, and it reports its start (checkpoint, compile, grid)
and files separately):

- seed settings: 80 px windows, levels 2 and 3, stride 80; first with an empty compilation cache
  (`WSITILE_COMPILE_CACHE`, the first slide on a machine), then again with it filled (every later
  slide), then with --tta (8 orientations); issue target under 10 s per slide;
- Liu et al.'s: 299 px windows, levels 0 and 1, centre 128, stride 128, no averaging; target under
  2 minutes (PFA-ScanNet, 2019: 7.2 minutes per slide on one GPU);
- last (the first a short budget drops): the seed settings over the slide under 3 names in one
  process, as a user predicting a test set would, seconds per slide being a third of the process.

    python -m benchmarks.gpu.inference [--budget 440]
    python -m benchmarks.gpu.inference --smoke     # CPU: 4,096 px mosaic, small model
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from .common import Budget, card

ENV = dict(os.environ)  # for the predict processes: the parent pins its own JAX to the CPU below

SEED: dict[str, Any] = dict(levels=(2, 3), window=80, center=50, stride=80)
LIU: dict[str, Any] = dict(levels=(0, 1), window=299, center=128, stride=128)


# --- the slide -------------------------------------------------------------------------------------


def _reduce(a: np.ndarray) -> np.ndarray:
    """2x2 mean, the size halved rounding up (edge repeated), as wsitile.synth builds its levels."""
    if a.shape[0] % 2 or a.shape[1] % 2:
        a = np.pad(a, ((0, a.shape[0] % 2), (0, a.shape[1] % 2), (0, 0)), mode="edge")
    s = a[0::2, 0::2].astype(np.uint16) + a[1::2, 0::2] + a[0::2, 1::2] + a[1::2, 1::2]
    return ((s + 2) >> 2).astype(np.uint8)


def _encode(tile: np.ndarray) -> bytes:
    import imagecodecs

    from wsitile.synth import JPEG_QUALITY, TILE

    h, w = tile.shape[:2]
    if (h, w) != (TILE, TILE):  # edge tile: repeat the last row/column, as synth does
        tile = np.pad(tile, ((0, TILE - h), (0, TILE - w), (0, 0)), mode="edge")
    return bytes(imagecodecs.jpeg_encode(np.ascontiguousarray(tile), level=JPEG_QUALITY, colorspace="RGB",
                                         outcolorspace="YCBCR", subsampling=(2, 2)))


def mosaic_slide(path: Path, source: Path, rows: int, cols: int, tissue: float) -> dict:
    """Write the rows x cols mosaic of `source` (a write_slide slide) to `path`; return its facts."""
    import tifffile

    from wsitile import Slide
    from wsitile.synth import MPP, TILE, level_shapes
    from wsitile.tissue import tissue_mask

    src = Slide(source)
    share = float(tissue_mask(src, src.level_count - 1).mean())  # the source's tissue fraction
    copies = rows * cols
    keep = int(np.clip(round(tissue * copies / max(share, 1e-6)), 1, copies))
    tissue_copies = set(np.round(np.linspace(0, copies - 1, keep)).astype(int).tolist())  # spread out

    with tifffile.TiffFile(source) as tf, open(source, "rb") as fh:
        src_tiles = []  # per source level: list of rows of tile bytes
        for page in tf.pages:
            h, w = page.shape[:2]
            if h % TILE or w % TILE:
                break  # a level that is not whole tiles cannot be copied tile by tile
            per_row = w // TILE
            tiles = []
            for off, n in zip(page.dataoffsets, page.databytecounts):
                fh.seek(off)
                tiles.append(fh.read(n))
            src_tiles.append([tiles[r * per_row : (r + 1) * per_row] for r in range(h // TILE)])
        last = len(src_tiles) - 1
        last_px = tf.pages[last].asarray()
    glass_value = np.array([243, 242, 245], np.uint8)  # synth's glass colour
    glass = _encode(np.broadcast_to(glass_value, (TILE, TILE, 3)))

    side = len(src_tiles[0]) * TILE
    shapes = level_shapes(rows * side, cols * side)
    # The last copied level as pixels, blank copies as glass: the levels below are reduced from it.
    s = last_px.shape[0]
    below = np.empty((rows * s, cols * s, 3), np.uint8)
    below[...] = glass_value
    for c in tissue_copies:
        below[(c // cols) * s : (c // cols + 1) * s, (c % cols) * s : (c % cols + 1) * s] = last_px

    def copied_tiles(k: int):
        grid = src_tiles[k]
        n = len(grid)  # source tiles per side at level k
        for ty in range(rows * n):
            for tx in range(cols * n):
                if (ty // n) * cols + tx // n in tissue_copies:
                    yield grid[ty % n][tx % n]
                else:
                    yield glass

    def encoded_tiles(a: np.ndarray):
        for ty in range(0, a.shape[0], TILE):
            for tx in range(0, a.shape[1], TILE):
                yield _encode(a[ty : ty + TILE, tx : tx + TILE])

    res = 1e4 / MPP  # pixels per centimetre at level 0
    tmp = path.with_name(path.name + ".tmp")
    with tifffile.TiffWriter(tmp, bigtiff=True) as tw:
        level = below
        for k, (h, w) in enumerate(shapes):
            if k <= last:
                tiles = copied_tiles(k)
            else:
                level = _reduce(level)
                assert level.shape[:2] == (h, w), (level.shape, h, w)
                tiles = encoded_tiles(level)
            tw.write(tiles, shape=(h, w, 3), dtype=np.uint8, tile=(TILE, TILE), compression="jpeg",
                     photometric="rgb", subsampling=(2, 2), resolution=(res * w / shapes[0][1], res * h / shapes[0][0]),
                     resolutionunit="CENTIMETER", subfiletype=0 if k == 0 else 1, metadata=None,
                     description=f"wsitile GPU-suite mosaic of {source.name}" if k == 0 else None)
    tmp.replace(path)
    return {"shape": shapes[0], "levels": len(shapes), "source_tissue": share, "tissue_copies": keep,
            "copies": copies, "bytes": path.stat().st_size}


# --- checkpoints -----------------------------------------------------------------------------------


def make_checkpoint(run_dir: Path, settings: dict, width: float) -> None:
    """A `wsitile train` run directory holding an untrained model (predict's speed does not depend
    on the weights). Made on the CPU, in this process: JAX on the GPU here would take the memory the
    predict processes need."""
    from wsitile.train import TrainConfig, checkpoint_manager, create_state, save_checkpoint

    if (run_dir / "checkpoints").is_dir():
        return
    cfg = TrainConfig(**settings, width=width, batch_size=64)
    mngr = checkpoint_manager(run_dir)
    try:
        save_checkpoint(mngr, create_state(cfg), cfg, {"seed": 0, "epoch": 0, "index": 0})
    finally:
        mngr.close()


# --- runs ------------------------------------------------------------------------------------------


def predict(slide: Path, checkpoint: Path, out: Path, batch: int, stride: int | None, tta: bool,
            timeout: float, copies: int = 1) -> dict:
    """One `wsitile predict` process; with `copies` > 1 the slide under that many names in one call
    (the per-slide figures are then the last slide's, and "wall" is the process's share per slide)."""
    slides = [slide]
    if copies > 1:
        slides = [out.parent / f"{slide.stem}_copy{i}{slide.suffix}" for i in range(copies)]
        for link in slides:
            link.unlink(missing_ok=True)
            link.symlink_to(slide)
    cmd = [sys.executable, "-m", "wsitile", "predict", *map(str, slides), "--checkpoint", str(checkpoint),
           "--out", str(out), "--batch-size", str(batch)]
    cmd += ["--stride", str(stride)] if stride else []
    cmd += ["--tta"] if tta else []
    print("+ " + " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"note": f"killed after {timeout:.0f} s (budget)"}
    wall = time.perf_counter() - t0
    sys.stdout.write(proc.stdout[-2000:])
    sys.stderr.write(proc.stderr[-4000:])
    found = re.findall(r"(\d+) windows, (\d+) windows/s", proc.stdout)
    if proc.returncode or len(found) != len(slides):
        return {"note": f"exit {proc.returncode}: {' '.join(proc.stderr.split())[-120:]}", "wall": wall}
    windows, rate = int(found[-1][0]), float(found[-1][1])
    phases = re.findall(r"start ([\d.]+) s, windows ([\d.]+) s, files ([\d.]+) s", proc.stdout)
    heatmap = out / "heatmap.npz" if copies == 1 else out / slides[-1].stem / "heatmap.npz"
    rows, cols = np.load(heatmap, allow_pickle=False)["grid_shape"]
    return {"windows": windows, "rate": rate, "wall": wall / len(slides), "tissue": windows / max(1, int(rows) * int(cols)),
            **({"start": float(phases[-1][0]), "files": float(phases[-1][2])} if phases else {})}


# Runs in the order they go (and are dropped from the end when the budget is short).
RUNS = ("cold", "warm", "liu", "tta", "three", "liu-tta")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="CPU check: 2x2 mosaic of a 2,048 px slide, width 0.25")
    p.add_argument("--budget", type=float, default=440.0, help="seconds for the whole script (default 440)")
    p.add_argument("--work", type=Path, default=Path("/tmp/wsitile-gpu-inference"))
    p.add_argument("--source-size", type=int, default=None, help="rendered slide side (default 16384; smoke 2048)")
    p.add_argument("--mosaic", type=int, nargs=2, default=None, metavar=("ROWS", "COLS"), help="default 6 12; smoke 2 2")
    p.add_argument("--tissue", type=float, default=0.25, help="tissue share to aim for (default 0.25)")
    p.add_argument("--liu-tta", action="store_true", help="also Liu et al.'s settings with --tta (8x the work)")
    p.add_argument("--runs", nargs="+", choices=RUNS, default=[r for r in RUNS if r != "liu-tta"],
                   help="which runs, always in this order (default all but liu-tta); `warm` is warm only after `cold`")
    p.add_argument("--batch", type=int, nargs=2, default=None, metavar=("SEED", "LIU"),
                   help="predict batch sizes (default 512 256; smoke 16 4)")
    args = p.parse_args()
    smoke = args.smoke
    size = args.source_size or (2048 if smoke else 16384)
    rows, cols = args.mosaic or ((2, 2) if smoke else (6, 12))
    b_seed, b_liu = args.batch or ((16, 4) if smoke else (512, 256))
    width = 0.25 if smoke else 1.0
    wanted = set(args.runs) | ({"liu-tta"} if args.liu_tta else set())
    budget = Budget(args.budget)
    print(f"inference: {card()}; budget {args.budget:.0f} s", flush=True)

    os.environ["JAX_PLATFORMS"] = "cpu"  # this process only (ENV above keeps the GPU for predict)
    # The predict processes' compilation cache, emptied: the first run is a machine's first slide.
    cache = args.work / "jax-cache"
    shutil.rmtree(cache, ignore_errors=True)
    ENV.pop("JAX_COMPILATION_CACHE_DIR", None)
    ENV["WSITILE_COMPILE_CACHE"] = str(cache)
    from wsitile.synth import write_slide

    args.work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    source = args.work / f"source_{size}.tif"
    if not source.exists():
        write_slide(source, size, seed=7, tumour=False)
    print(f"[slide] source {size} px rendered in {time.perf_counter() - t0:.0f} s", flush=True)
    slide = args.work / f"camelyon_size_{rows}x{cols}_{size}.tif"
    facts_path = slide.with_suffix(".json")
    if not slide.exists() or not facts_path.exists():
        t1 = time.perf_counter()
        facts = mosaic_slide(slide, source, rows, cols, args.tissue)
        facts["seconds"] = time.perf_counter() - t1
        facts_path.write_text(json.dumps(facts))
    facts = json.loads(facts_path.read_text())
    h, w = facts["shape"]
    desc = (f"{w:,} x {h:,} px level 0, {facts['levels']} levels, {facts['tissue_copies']}/{facts['copies']} copies "
            f"with tissue (source {facts['source_tissue']:.0%} tissue), {facts['bytes'] / 2**30:.2f} GiB")
    print(f"[slide] {slide}: {desc}; mosaic written in {facts['seconds']:.0f} s; all ready after "
          f"{time.perf_counter() - t0:.0f} s", flush=True)

    t1 = time.perf_counter()
    ck_seed, ck_liu = args.work / f"ckpt_seed_w{width:g}", args.work / f"ckpt_liu_w{width:g}"
    if wanted & {"cold", "warm", "tta", "three"}:
        make_checkpoint(ck_seed, SEED, width)
    if wanted & {"liu", "liu-tta"}:
        make_checkpoint(ck_liu, LIU, width)
    print(f"[checkpoints] ready in {time.perf_counter() - t1:.0f} s", flush=True)

    # key: name, checkpoint, batch, stride, tta, target s/slide, slides in the process
    every: dict[str, tuple[str, Path, int, int | None, bool, float | None, int]] = {
        "cold": ("seed: 80 px, levels 2+3, stride 80; compile cache empty", ck_seed, b_seed, None, False, 10.0, 1),
        "warm": ("seed, next slide: compile cache filled", ck_seed, b_seed, None, False, 10.0, 1),
        "liu": ("Liu: 299 px, levels 0+1, stride 128", ck_liu, b_liu, LIU["stride"], False, 120.0, 1),
        "tta": ("seed + 8-way TTA", ck_seed, b_seed, None, True, None, 1),
        "three": ("seed, 3 slides in one process (s/slide: its third)", ck_seed, b_seed, None, False, 10.0, 3),
        "liu-tta": ("Liu + 8-way TTA", ck_liu, b_liu, LIU["stride"], True, None, 1),
    }
    runs = [every[k] for k in RUNS if k in wanted]
    results: list[tuple[str, int, float | None, dict[str, Any]]] = []
    for i, (name, ck, batch, stride, tta, target, copies) in enumerate(runs):
        left = budget.left() - 5
        if left < 30:
            results.append((name, batch, target, {"note": "skipped: budget"}))
            continue
        r = predict(slide, ck, args.work / f"out_{i}", batch, stride, tta, timeout=left, copies=copies)
        print(f"[{name}] {r}", flush=True)
        results.append((name, batch, target, r))

    lines = [f"### wsitile predict on one Camelyon-size synthetic slide -- {card()}"
             + (" (SMOKE: CPU, small model; not comparable)" if smoke else ""), "", f"Slide: {desc}.", "",
             "| setting | batch | windows | tissue | windows/s | s start | s loop | s files | s/slide (process) | target | note |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for name, batch, target, r in results:
        if "rate" in r:
            loop = r["windows"] / r["rate"]
            verdict = "" if target is None else (
                f"< {target:g} s: loop {'ok' if loop <= target else 'MISS'}, process {'ok' if r['wall'] <= target else 'MISS'}")
            lines.append(f"| {name} | {batch} | {r['windows']:,} | {r['tissue']:.0%} | {r['rate']:,.0f} | "
                         f"{r.get('start', float('nan')):.1f} | {loop:.1f} | {r.get('files', float('nan')):.1f} | "
                         f"{r['wall']:.1f} | {verdict} | |")
        else:
            lines.append(f"| {name} | {batch} | - | - | - | - | - | - | {r.get('wall', float('nan')):.1f} | "
                         f"{'' if target is None else f'< {target:g} s'} | {r['note']} |")
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "inference.json").write_text(
            json.dumps({"card": card(), "slide": facts, "runs": [dict(name=n, batch=b, target=t, **r) for n, b, t, r in results]}, indent=1))
    print("\n" + "\n".join(lines), flush=True)


if __name__ == "__main__":
    main()
