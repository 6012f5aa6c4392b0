"""The `wsitile` command line: synth, extract, train, predict, evaluate, froc, demo.

Library code raises; this module turns an error into one line on stderr and a non-zero exit, and
writes every output file through a temporary file and a rename, so a failed run leaves none behind.
"""

from __future__ import annotations

import argparse
import gc
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
import typing
from typing import Sequence

import numpy as np

from . import __version__
from .grid import DEFAULT_CENTER, DEFAULT_LEVELS, DEFAULT_STRIDE, DEFAULT_TISSUE_THRESHOLD, DEFAULT_WINDOW, MAX_THREADS


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not >= 1")
    return value


def _threads(text: str) -> int:
    value = _positive_int(text)
    if value > MAX_THREADS:
        raise argparse.ArgumentTypeError(f"{value} is not <= {MAX_THREADS}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text} is not a positive number")
    return value


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad argument is one line on stderr (exit 2), as every other error here, not the
    usage block: `wsitile CMD --help` shows that."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see {self.prog} --help)\n")


def _add_grid_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--levels", type=int, nargs="+", default=list(DEFAULT_LEVELS), help="tower levels, finest first")
    p.add_argument("--window", type=int, default=DEFAULT_WINDOW, help="window side in pixels")
    p.add_argument("--center", type=int, default=DEFAULT_CENTER, help="centre square side used for labels")
    p.add_argument("--stride", type=int, default=DEFAULT_STRIDE, help="grid step in base-level pixels")
    p.add_argument("--threads", type=_threads, default=None, help="worker threads (default: available cores)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="wsitile", description="Sliding-window extraction from whole-slide images.")
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

    p = sub.add_parser("train", help="train the two-tower InceptionV3 on slides and tumour masks")
    p.add_argument("data", type=Path, nargs="+", help="a `wsitile synth` folder (its manifest.csv), or slide files")
    p.add_argument("--masks-dir", type=Path, default=None, help="<stem>_mask.tif / <stem>.xml (default: beside each slide)")
    p.add_argument("--out", type=Path, required=True, help="run directory (checkpoints, history, plots)")
    _add_grid_args(p)
    p.add_argument("--tissue-threshold", type=float, default=DEFAULT_TISSUE_THRESHOLD)
    p.add_argument("--weights", type=Path, default=None, help="Keras ImageNet HDF5 (..._notop.h5); default: random init")
    p.add_argument("--width", type=_positive_float, default=1.0, help="InceptionV3 width multiplier (0.25: small CPU model)")
    p.add_argument("--fine-tune-from", type=int, default=None, help="Keras layer index from which layers train "
                   "(default: 150 with --weights, else 0)")
    p.add_argument("--optimizer", choices=("rmsprop", "adam"), default="rmsprop")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: 0.002 with --weights, else 0.05)")
    p.add_argument("--batch-size", type=_positive_int, default=32)
    p.add_argument("--steps", type=_positive_int, default=None, help="stop at this optimiser step")
    p.add_argument("--epochs", type=_positive_int, default=None)
    p.add_argument("--time-limit", type=_positive_float, default=None, help="stop after this many seconds")
    p.add_argument("--val-fraction", type=float, default=0.25, help="share of slides held out for validation")
    p.add_argument("--no-augment", action="store_true")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from the run directory's latest checkpoint")
    p.add_argument("--distributed", action="store_true", help="multi-host: jax.distributed.initialize() (cluster "
                   "auto-detection); each process reads its share of the slides")

    p = sub.add_parser("predict", help="tumour-probability heatmaps of slides from a trained checkpoint")
    p.add_argument("slide", type=Path, nargs="+", help="one or more slides (the model is read and compiled once)")
    p.add_argument("--checkpoint", type=Path, required=True, help="a `wsitile train` run directory")
    p.add_argument("--out", type=Path, required=True,
                   help="folder for heatmap.npz and heatmap.png; with several slides, OUT/<slide name>/ for each")
    p.add_argument("--stride", type=_positive_int, default=None, help="grid step (default: the window)")
    p.add_argument("--tta", action="store_true", help="average the 8 dihedral orientations")
    p.add_argument("--batch-size", type=_positive_int, default=None,
                   help="windows per model call (default: 512 on a GPU, 256 for windows over 128 px, "
                        "64 on a CPU; an eighth of that with --tta)")
    p.add_argument("--threads", type=_threads, default=None)

    p = sub.add_parser("evaluate", help="window-level metrics of a heatmap against its tumour mask (seed table)")
    p.add_argument("heatmap", type=Path, help="heatmap.npz written by `wsitile predict`")
    p.add_argument("--mask", type=Path, required=True, help="tumour mask TIFF or ASAP XML of the heatmap's slide")
    p.add_argument("--out", type=Path, required=True, help="folder for metrics.json, roc.png, heatmap_vs_truth.png")
    p.add_argument("--threads", type=_threads, default=None, help="labelling threads (default: available cores)")

    p = sub.add_parser("froc", help="Camelyon16 lesion FROC and slide AUC of heatmaps, with the challenge's CSVs")
    p.add_argument("heatmaps", type=Path, nargs="+", metavar="HEATMAP", help="heatmap.npz files, one per slide")
    p.add_argument("--masks-dir", type=Path, required=True,
                   help="folder of <slide stem>_mask.tif or <slide stem>.xml (a slide without one is normal)")
    p.add_argument("--out", type=Path, required=True, help="folder for <slide stem>.csv, metrics.json, froc.png")
    p.add_argument("--nms-radius", type=_non_negative_float, default=2.0, metavar="CELLS",
                   help="non-maximum suppression radius in grid cells (default 2)")

    p = sub.add_parser("demo", help="synthetic slides -> training -> heatmaps -> evaluation -> report")
    p.add_argument("--out", type=Path, default=Path("wsitile-demo"))
    p.add_argument("--slides", type=int, default=6)
    p.add_argument("--size", type=int, default=8192)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-seconds", type=_positive_float, default=240.0)
    p.add_argument("--full", action="store_true", help="the full-width InceptionV3 (for a GPU)")
    p.add_argument("--threads", type=_threads, default=None)
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
) -> dict[str, float]:
    """Write OUT.npz with coords, labels, levels (and images); return counts for the summary."""
    from tqdm import tqdm

    from .loader import Loader
    from .masks import atomic_write, require_memory

    if out.suffix != ".npz":
        raise ValueError(f"{out}: the output must be a .npz file")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"{out.parent}: output folder does not exist")
    for given in (slide, mask):
        if given is not None and out.exists() and Path(given).exists() and os.path.samefile(out, given):
            raise ValueError(f"{out}: the output is an input file ({given}); choose another --out")
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
        "window": np.asarray(window, dtype=np.int64),
        "center": np.asarray(center, dtype=np.int64),
        "stride": np.asarray(stride, dtype=np.int64),
        "grid_shape": np.asarray(grid.grid_shape, dtype=np.int64),
    }
    if save_images:
        shape = (len(grid), len(grid.levels), window, window, 3)
        try:
            require_memory(float(np.prod(shape, dtype=np.float64)), f"--save-images: the {len(grid):,} windows' images",
                           "; use a larger --stride, fewer --levels, or wsitile.Loader to stream them")
        except MemoryError:
            loader.close()
            raise
        images = np.empty(shape, dtype=np.uint8)
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
    atomic_write(out, lambda fh: np.savez(fh, allow_pickle=False, **arrays))
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


def _need_train_extra(command: str) -> None:
    try:
        import flax, jax, optax, orbax.checkpoint  # noqa: F401, E401
    except ImportError as exc:
        raise RuntimeError(f"`wsitile {command}` needs the model stack: pip install 'wsitile[train]' ({exc})") from None


def _compile_cache() -> None:
    """JAX's persistent compilation cache for train, predict and demo: the next process with the same
    model and batch shape loads the compiled executables instead of compiling again (seconds to
    a minute each on a GPU). WSITILE_COMPILE_CACHE names the folder (default ~/.cache/wsitile/jax;
    empty or "off": none); a JAX_COMPILATION_CACHE_DIR already set is JAX's own and left alone."""
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return
    home = os.path.expanduser("~")
    default = os.path.join(home, ".cache", "wsitile", "jax") if home not in ("", "~") else "off"  # HOME="": no cache in ./
    folder = os.path.expanduser(os.environ.get("WSITILE_COMPILE_CACHE", default))
    if folder.strip().lower() in ("", "0", "off", "none"):
        return
    # A folder that cannot be made or written (a file on the way, read-only): one line, then no cache,
    # rather than JAX's two-line warning at every compile and the exported step's own.
    try:
        if "://" not in folder:  # gs:// and the like are JAX's to reach
            os.makedirs(folder, exist_ok=True)
            with tempfile.TemporaryFile(dir=folder):
                pass
    except OSError as exc:
        print(f"wsitile: compilation cache {folder} is not usable ({exc.strerror or exc}); compiling without it",
              file=sys.stderr)
        return
    import jax

    jax.config.update("jax_compilation_cache_dir", folder)


def _training_slides(args: argparse.Namespace) -> list[tuple[str, str | None]]:
    from .manifest import manifest_slides, mask_for

    if len(args.data) == 1 and args.data[0].is_dir():
        train_items, _ = manifest_slides(args.data[0])  # the manifest's test split stays unseen
        return train_items
    items = []
    for slide in args.data:
        if not slide.is_file():
            raise FileNotFoundError(f"{slide}: no such slide")
        mask = mask_for(slide, args.masks_dir or slide.parent)
        items.append((str(slide), None if mask is None else str(mask)))
    return items


def cmd_train(args: argparse.Namespace) -> None:
    _need_train_extra("train")
    _compile_cache()
    from .train import TrainConfig, fit, split_by_slide

    if not 0 <= args.val_fraction < 1:
        raise ValueError(f"--val-fraction {args.val_fraction}: must be in [0, 1)")
    cfg = TrainConfig(
        levels=tuple(args.levels), window=args.window, center=args.center, stride=args.stride,
        tissue_threshold=args.tissue_threshold, width=args.width,
        weights=None if args.weights is None else str(args.weights), fine_tune_from=args.fine_tune_from,
        optimizer=args.optimizer, learning_rate=args.lr, batch_size=args.batch_size, seed=args.seed,
        augment=not args.no_augment, dtype=args.dtype,
    )
    slides = split_by_slide(_training_slides(args), args.val_fraction)
    if args.distributed:
        import jax

        jax.distributed.initialize()  # coordinator and process ids from the cluster's environment (SLURM, ...)
    history = fit(
        cfg, slides, args.out, steps=args.steps, epochs=args.epochs, time_limit=args.time_limit,
        resume=args.resume, threads=args.threads,
    )
    auc = f", validation AUC {history.val_auc[-1]:.4f}" if history.val_auc else ""
    loss = f", loss {history.loss[-1]:.4f}" if history.loss else ""
    print(f"wrote {args.out}: step {history.step[-1] if history.step else 0}{loss}{auc}")


def cmd_predict(args: argparse.Namespace) -> None:
    _need_train_extra("predict")
    _compile_cache()
    from .predict import predict_slides

    for slide in args.slide:
        if not slide.is_file():
            raise FileNotFoundError(f"{slide}: no such slide")
    if args.out.exists() and not args.out.is_dir():  # before the model is read and compiled
        raise FileExistsError(f"{args.out}: exists and is not a folder")
    if len(args.slide) == 1:
        outs = [args.out]
    else:
        names = [slide.stem for slide in args.slide]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"{args.slide[names.index(twice[0])]}: two slides named {twice[0]!r} would share "
                             f"{args.out / twice[0]}; predict them in separate runs")
        outs = [args.out / name for name in names]

    def report(i: int, counts: dict[str, float]) -> None:
        print(f"wrote {outs[i] / 'heatmap.npz'}: {counts['windows']:.0f} windows, {counts['rate']:.0f} windows/s "
              f"(start {counts['start']:.1f} s, windows {counts['loop']:.1f} s, files {counts['write']:.1f} s)",
              flush=True)

    predict_slides(args.slide, args.checkpoint, outs, stride=args.stride, tta=args.tta, batch_size=args.batch_size,
                   threads=args.threads, on_slide=report)


def cmd_demo(args: argparse.Namespace) -> None:
    _need_train_extra("demo")
    _compile_cache()
    from .demo import DemoConfig, run_demo, seed_table

    cfg = DemoConfig(out=args.out, slides=args.slides, size=args.size, seed=args.seed, full=args.full,
                     train_seconds=args.train_seconds, threads=args.threads)
    metrics = run_demo(cfg)
    print(seed_table(metrics))
    print(f"wrote {args.out} (report.md) in {metrics['seconds']:.0f} s")


COMMANDS = {
    "synth": cmd_synth,
    "extract": cmd_extract,
    "train": cmd_train,
    "predict": cmd_predict,
    "demo": cmd_demo,
}


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text} is not a number >= 0")
    return value


def cmd_evaluate(args: argparse.Namespace) -> None:
    from .evaluate import evaluate_heatmap, format_table

    metrics = evaluate_heatmap(args.heatmap, args.mask, args.out, threads=args.threads)
    print(format_table(metrics))
    print(f"wrote {args.out / 'metrics.json'}, {args.out / 'roc.png'}, {args.out / 'heatmap_vs_truth.png'}")


def cmd_froc(args: argparse.Namespace) -> None:
    from .froc import format_froc_table, run_froc

    report = run_froc(args.heatmaps, args.masks_dir, args.out, nms_radius=args.nms_radius)
    print(format_froc_table(report))
    print(f"wrote {args.out} ({len(report.slides)} CSVs, metrics.json, froc.png)")


COMMANDS.update(evaluate=cmd_evaluate, froc=cmd_froc)

def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help (0) or a bad argument (2, its one line already printed)
        return exc.code if isinstance(exc.code, int) else 2
    # SIGTERM (a cluster's scheduler, `kill`) stops like Ctrl-C: the files being written are removed
    # (atomic_write), train keeps its last complete checkpoint, and the exit says "interrupted".
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler) if in_main else None
    try:
        COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print(f"wsitile {args.command}: interrupted", file=sys.stderr)
        return 130
    except (OSError, ValueError, RuntimeError, TypeError, ArithmeticError) as exc:
        message = " ".join(str(exc).split())  # one line, whatever the library said
        print(f"wsitile {args.command}: error: {message}", file=sys.stderr)
        return 1
    except MemoryError as exc:  # NumPy's says what it could not allocate
        message = " ".join(str(exc).split()) or "an allocation failed"
        print(f"wsitile {args.command}: error: out of memory: {message}", file=sys.stderr)
        return 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return 0


def run() -> None:
    """The `wsitile` command (and `python -m wsitile`): `main`, then exit. The objects left are frozen
    out of the interpreter's last garbage collection, which would walk JAX's and Flax's ~200k once
    more (0.5 s of every `wsitile predict` on the development CPU); the files are closed by then and
    the memory goes back with the process."""
    code = main()
    gc.freeze()
    sys.exit(code)


if __name__ == "__main__":
    run()
