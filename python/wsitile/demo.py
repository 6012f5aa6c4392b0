"""`wsitile demo`: synthetic slides -> training -> heatmaps -> evaluation -> report, in one folder.

Sized for a 2-core CPU in under 10 minutes with the small (width 0.25) model; `full=True` trains the
real full-width model (for a GPU).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from .grid import check_threads
from .masks import atomic_write, written_together

SEED_KEYS = ("auc", "threshold", "sensitivity", "specificity", "recall", "precision")


@dataclass(frozen=True)
class DemoConfig:
    out: Path = Path("wsitile-demo")
    slides: int = 6  # 4 tumour + 2 normal: one of each held out for testing, one tumour slide validates
    size: int = 8192  # level-0 side of the synthetic slides
    seed: int = 0
    full: bool = False  # full-width InceptionV3 (GPU) instead of the small variant
    train_seconds: float = 240.0
    batch_size: int = 32
    threads: int | None = None

    def __post_init__(self) -> None:
        # Checked before the slides are made, so a typo costs no minutes and leaves no slides/ behind.
        if not 0 < self.train_seconds < float("inf"):
            raise ValueError(f"train_seconds {self.train_seconds}: must be a positive number of seconds")
        if self.threads is not None:
            check_threads(self.threads)
        if self.slides < 4:
            raise ValueError(f"slides {self.slides}: the demo needs a held-out tumour slide (use --slides >= 4)")
        from .synth import level_shapes

        if len(level_shapes(self.size, self.size)) < 4:
            raise ValueError(f"size {self.size}: the model's towers read levels 2 and 3, which synthetic slides "
                             "of this size do not have (4096 px and larger do)")


def run_demo(cfg: DemoConfig, log=print) -> dict[str, float | None]:  # noqa: ANN001 - log(str)
    from .evaluate import evaluate_heatmap
    from .froc import run_froc
    from .predict import predict_slides
    from .synth import synth_dataset
    from .train import TrainConfig, checkpoint_manager, fit, read_manifest, split_by_slide

    t0 = time.monotonic()
    out = cfg.out
    # Refuse a folder that holds a finished run before any work (training would refuse it only after
    # the slides are made, and with `wsitile train`'s advice: demo has no --resume).
    if (out / "checkpoints").is_dir():
        mngr = checkpoint_manager(out)
        try:
            held = mngr.latest_step() is not None
        finally:
            mngr.close()
        if held:
            raise ValueError(f"{out}: already holds a run (checkpoints/); use another --out or delete it")
    # The demo writes slides/, predictions/, report.md, ... into its folder: another folder's files of
    # those names would be replaced (or, a file where a folder goes, fail it after training).
    # Empty folders are no one's files: those a failed demo left (slides/, on a full disk) do not block
    # its rerun.
    if out.exists() and (not out.is_dir() or any(not p.is_dir() or p.is_symlink() for p in out.rglob("*"))):
        raise ValueError(f"{out}: exists and is not an empty folder; the demo needs a new or empty --out")
    # The demo folder is the run directory: checkpoints/, config.json, history.json and training.png
    # from training, then the evaluation's pictures and metrics.json beside them.
    slides_dir, run_dir, pred_dir = out / "slides", out, out / "predictions"

    log(f"[1/5] synthetic slides -> {slides_dir}")
    manifest = synth_dataset(slides_dir, cfg.slides, seed=cfg.seed, size=cfg.size, normal_fraction=1 / 3)
    train_items, test_items = read_manifest(manifest.parent)
    slides = split_by_slide(train_items, val_fraction=0.34)
    if not test_items or not any(mask for _, mask in test_items):
        raise ValueError(f"{manifest}: the demo needs a held-out tumour slide (use --slides >= 4)")

    train_cfg = TrainConfig(width=1.0 if cfg.full else 0.25, batch_size=cfg.batch_size, seed=cfg.seed)
    log(
        f"[2/5] training the {'full' if cfg.full else 'small'} two-tower InceptionV3 on "
        f"{len(slides.train)} slides (validation: {len(slides.val)}) for {cfg.train_seconds:.0f} s -> {run_dir}"
    )
    fit(train_cfg, slides, run_dir, time_limit=cfg.train_seconds, threads=cfg.threads, resume=False)

    # The model of the best validation AUC (training stops at its time limit wherever it is).
    model_dir = run_dir / "best" if (run_dir / "best" / "checkpoints").is_dir() else run_dir
    log(f"[3/5] heatmaps of the {len(test_items)} held-out slides -> {pred_dir} (model: {model_dir})")
    targets = [pred_dir / Path(slide).stem for slide, _ in test_items]
    predict_slides([slide for slide, _ in test_items], model_dir, targets, threads=cfg.threads)
    heatmaps = [target / "heatmap.npz" for target in targets]

    log("[4/5] window-level metrics on the held-out tumour slide, FROC and slide AUC over all held-out slides")
    tumour_slide, tumour_mask = next((s, m) for s, m in test_items if m)
    # Both write their own metrics.json into `out`; the combined one below replaces them.
    window = evaluate_heatmap(pred_dir / Path(tumour_slide).stem / "heatmap.npz", tumour_mask, out)
    froc_report = run_froc(heatmaps, slides_dir, out)
    challenge = froc_report.metrics
    notes: list[str] = []
    if froc_report.result is not None and len(froc_report.result.fps) == 1:
        # Evaluation_FROC.py uses every distinct probability but the smallest as a threshold; when all
        # detections score the same (a saturated sigmoid gives exactly 1.0) its curve is the lone (0, 0).
        notes.append(
            "FROC: every detection scored the same probability and no lesion was missed, so the "
            "organisers' Evaluation_FROC.py (which skips the smallest probability as a threshold) has no "
            "threshold left and returns 0; read it with the per-slide detection CSVs."
        )

    metrics: dict[str, float | None] = {k: float(window[k]) for k in SEED_KEYS}
    metrics.update(
        froc=_maybe(challenge["froc"]),  # None: no lesion outside ITC regions among the held-out slides
        slide_auc=_maybe(challenge["slide_auc"]),
        n_windows=int(window["n_windows"]),
        n_tumour=int(window["n_tumour"]),
        seconds=round(time.monotonic() - t0, 1),
    )
    _write_results(out, metrics, tumour_slide, [s for s, _ in test_items], notes)
    for note in notes:
        log(f"note: {note}")
    log(f"[5/5] report -> {out / 'report.md'}")
    return metrics


def _maybe(value: float | None) -> float | None:
    return None if value is None else float(value)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.5f}"


def seed_table(metrics: dict[str, float | None]) -> str:
    rows = [(k.upper() if k == "auc" else k.capitalize(), metrics[k]) for k in SEED_KEYS]
    rows += [("FROC", metrics["froc"]), ("Slide AUC", metrics["slide_auc"])]
    return "\n".join(f"{name:<12} {_fmt(value)}" for name, value in rows)


def _write_results(
    out: Path, metrics: dict[str, float | None], tumour_slide: str, test_slides: list[str], notes: list[str]
) -> None:
    """metrics.json and report.md, which shows them: both or (a failed write) neither."""
    with written_together():
        atomic_write(out / "metrics.json", lambda fh: fh.write(json.dumps(metrics, indent=2).encode()))
        _write_report(out, metrics, tumour_slide, test_slides, notes)


def _write_report(
    out: Path, metrics: dict[str, float | None], tumour_slide: str, test_slides: list[str], notes: list[str]
) -> None:
    stem = Path(tumour_slide).stem
    lines = [
        "# wsitile demo",
        "",
        f"Held-out slides: {', '.join(Path(s).name for s in test_slides)}. Window-level metrics on {Path(tumour_slide).name}"
        f" ({metrics['n_windows']} tissue windows, {metrics['n_tumour']} tumour); FROC and slide AUC over all held-out slides.",
        "",
        "| metric | value |",
        "|---|---|",
        *[f"| {k} | {_fmt(metrics[k])} |" for k in (*SEED_KEYS, "froc", "slide_auc")],
        "",
        *[f"Note: {n}\n" for n in notes],
        f"Finished in {metrics['seconds']:.0f} s.",
        "",
        "## Pictures",
        "",
        "![truth, heatmap, overlay](heatmap_vs_truth.png)",
        "",
        f"![heatmap](predictions/{stem}/heatmap.png)",
        "",
        "![ROC](roc.png)",
        "",
        "![FROC](froc.png)",
        "",
        "![training loss and validation AUC](training.png)",
        "",
    ]
    atomic_write(out / "report.md", lambda fh: fh.write("\n".join(lines).encode()))
