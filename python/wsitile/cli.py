"""The `wsitile` command line: synth, extract, demo.

Library code raises; this module turns an error into one line on stderr and a non-zero exit, and
writes every output file through a temporary file and a rename, so a failed run leaves none behind.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from . import __version__
from .grid import DEFAULT_CENTER, DEFAULT_LEVELS, DEFAULT_STRIDE, DEFAULT_TISSUE_THRESHOLD, DEFAULT_WINDOW


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not >= 1")
    return value


def _add_grid_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--levels", type=int, nargs="+", default=list(DEFAULT_LEVELS), help="tower levels, finest first")
    p.add_argument("--window", type=int, default=DEFAULT_WINDOW, help="window side in pixels")
    p.add_argument("--center", type=int, default=DEFAULT_CENTER, help="centre square side used for labels")
    p.add_argument("--stride", type=int, default=DEFAULT_STRIDE, help="grid step in base-level pixels")
    p.add_argument("--threads", type=int, default=None, help="worker threads (default: available cores)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wsitile", description="Sliding-window extraction from whole-slide images.")
    parser.add_argument("--version", action="version", version=f"wsitile {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("synth", help="write Camelyon16-style synthetic slides, masks and ASAP XML")
    p.add_argument("outdir", type=Path)
    p.add_argument("--slides", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=8192, help="level-0 side in pixels")
    p.add_argument("--normal-fraction", type=float, default=1 / 3)
    p.add_argument("--sparse-gigapixel", action="store_true", help="also write sparse_001.tif (> 2^31 px)")

    p = sub.add_parser("extract", help="grid, labels and (optionally) window pairs of one slide, as .npz")
    p.add_argument("slide", type=Path)
    p.add_argument("--mask", type=Path, default=None, help="tumour mask TIFF or ASAP XML (none: normal slide)")
    _add_grid_args(p)
    p.add_argument("--no-tissue-filter", action="store_true", help="keep windows over glass too")
    p.add_argument("--tissue-threshold", type=float, default=DEFAULT_TISSUE_THRESHOLD)
    p.add_argument("--save-images", action="store_true", help="also store the window pairs")
    p.add_argument("--batch-size", type=_positive_int, default=256)
    p.add_argument("--out", type=Path, required=True, help="output .npz")

    p = sub.add_parser("demo", help="the end-to-end run on synthetic slides (for now: synth + extract)")
    p.add_argument("--out", type=Path, default=Path("wsitile-demo"))
    p.add_argument("--slides", type=int, default=3)
    p.add_argument("--size", type=int, default=8192)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    return parser


def cmd_synth(args: argparse.Namespace) -> None:
    from .synth import synth_dataset

    manifest = synth_dataset(
        args.outdir,
        args.slides,
        seed=args.seed,
        size=args.size,
        normal_fraction=args.normal_fraction,
        sparse_gigapixel=args.sparse_gigapixel,
    )
    print(f"wrote {manifest.parent} ({args.slides} slides, manifest {manifest.name})")


def extract(
    slide: Path,
    mask: Path | None,
    out: Path,
    *,
    levels: Sequence[int],
    window: int,
    center: int,
    stride: int,
    tissue_threshold: float | None,
    save_images: bool,
    threads: int | None,
    batch_size: int = 256,
    quiet: bool = False,
) -> dict[str, int]:
    """Write OUT.npz with coords, labels, levels (and images); return counts for the summary."""
    from tqdm import tqdm

    from .loader import Loader
    from .masks import atomic_write

    if out.suffix != ".npz":
        raise ValueError(f"{out}: the output must be a .npz file")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"{out.parent}: output folder does not exist")
    loader = Loader(
        [(slide, mask)],
        levels=levels,
        window=window,
        center=center,
        stride=stride,
        batch_size=batch_size,
        threads=threads,
        shuffle=False,
        tissue_threshold=tissue_threshold,
    )
    grid = loader.grids[0]
    arrays: dict[str, np.ndarray] = {
        "coords": grid.coords,
        "labels": grid.labels,
        "levels": np.asarray(grid.levels, dtype=np.int64),
        "window": np.int64(window),
        "center": np.int64(center),
        "stride": np.int64(stride),
        "grid_shape": np.asarray(grid.grid_shape, dtype=np.int64),
    }
    if save_images:
        images = np.empty((len(grid), len(grid.levels), window, window, 3), dtype=np.uint8)
        start = time.perf_counter()
        with loader, tqdm(total=len(grid), unit="win", desc="extract", disable=quiet or None) as bar:
            pos = 0
            for batch in loader:  # grid order: sample_index runs 0..N-1
                n = len(batch["labels"])
                images[pos : pos + n] = batch["images"]
                pos += n
                bar.update(n)
        arrays["images"] = images
        rate = len(grid) / max(time.perf_counter() - start, 1e-9)
    else:
        loader.close()
        rate = float("nan")
    atomic_write(out, lambda fh: np.savez(fh, **arrays))
    return {"windows": len(grid), "tumour": int(grid.labels.sum()), "rate": rate}


def cmd_extract(args: argparse.Namespace) -> None:
    counts = extract(
        args.slide,
        args.mask,
        args.out,
        levels=args.levels,
        window=args.window,
        center=args.center,
        stride=args.stride,
        tissue_threshold=None if args.no_tissue_filter else args.tissue_threshold,
        save_images=args.save_images,
        threads=args.threads,
        batch_size=args.batch_size,
    )
    rate = "" if np.isnan(counts["rate"]) else f", {counts['rate']:.0f} windows/s"
    print(f"wrote {args.out}: {counts['windows']} windows, {counts['tumour']} tumour{rate}")


def read_manifest(path: Path) -> list[dict[str, str]]:
    """Rows of a manifest.csv (slide, label, split). A slide name is used to build paths to read and
    write, so it must be a plain file name inside the manifest's folder: no separators, no '..'."""
    import csv

    rows = []
    with open(path, newline="") as fh:
        try:
            reader = csv.DictReader(fh)
            missing = {"slide", "label", "split"} - set(reader.fieldnames or ())
            if missing:
                raise ValueError(f"{path}: manifest lacks columns {sorted(missing)}")
            table = list(reader)
        except (csv.Error, UnicodeDecodeError) as exc:
            raise ValueError(f"{path}: not a readable manifest ({exc})") from None
        for n, row in enumerate(table, start=2):
            name = row["slide"] or ""
            if (
                name in ("", ".", "..")
                or any(c in name for c in "/\\\0")
                or Path(name).name != name
                or Path(name).is_absolute()
            ):
                raise ValueError(f"{path}: line {n}: slide {name!r} is not a plain file name")
            if row["label"] not in ("tumor", "normal"):
                raise ValueError(f"{path}: line {n}: label {row['label']!r} is not 'tumor' or 'normal'")
            rows.append(row)
    return rows


def cmd_demo(args: argparse.Namespace) -> None:
    # Until the model lands (issue 4/5) the demo shows the engine: synthetic slides, then extraction.
    from .synth import synth_dataset

    slides_dir = args.out / "slides"
    manifest = synth_dataset(slides_dir, args.slides, seed=args.seed, size=args.size)
    windows_dir = args.out / "windows"
    windows_dir.mkdir(parents=True, exist_ok=True)
    print(f"{'slide':<16}{'label':<8}{'split':<7}{'windows':>9}{'tumour':>8}{'windows/s':>11}")
    for row in read_manifest(manifest):
        slide = slides_dir / row["slide"]
        mask = slide.with_name(slide.stem + "_mask.tif") if row["label"] == "tumor" else None
        counts = extract(
            slide,
            mask,
            windows_dir / (slide.stem + ".npz"),
            levels=DEFAULT_LEVELS,
            window=DEFAULT_WINDOW,
            center=DEFAULT_CENTER,
            stride=DEFAULT_STRIDE,
            tissue_threshold=DEFAULT_TISSUE_THRESHOLD,
            save_images=True,
            threads=args.threads,
            quiet=True,
        )
        print(
            f"{row['slide']:<16}{row['label']:<8}{row['split']:<7}{counts['windows']:>9}"
            f"{counts['tumour']:>8}{counts['rate']:>11.0f}"
        )
    print(f"wrote {args.out}")


COMMANDS = {"synth": cmd_synth, "extract": cmd_extract, "demo": cmd_demo}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print(f"wsitile {args.command}: interrupted", file=sys.stderr)
        return 130
    except (OSError, ValueError, RuntimeError, TypeError) as exc:
        message = " ".join(str(exc).split())  # one line, whatever the library said
        print(f"wsitile {args.command}: error: {message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
