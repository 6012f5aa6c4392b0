"""Training the two-tower InceptionV3 on window pairs from the engine (`wsitile train`): the fit loop,
and the public training API.

The parts live in `wsitile.training` and are importable from here: `TrainConfig` (config), parameters
and their trainable split (params), the optimiser, `TrainState` and the jitted `Steps` over a device
mesh (steps), orbax checkpoints (checkpoints), slide splits (slide_sets).

Needs the `wsitile[train]` extra (jax, flax, optax, orbax-checkpoint, h5py).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

import jax
import orbax.checkpoint as ocp

from .loader import Loader
from .manifest import manifest_slides, mask_for  # noqa: F401 - mask_for is part of this module's API
from .masks import atomic_write
# The training API, re-exported: code and tests import it from `wsitile.train`.
from .training.checkpoints import (  # noqa: F401
    checkpoint_config,
    checkpoint_manager,
    find_checkpoint,
    inference_target,
    load_for_inference,
    run_dir_locked,
    read_checkpoint_meta,
    read_model_arrays,
    remove_unfinished_saves,
    restore_checkpoint,
    restore_for_inference,
    save_checkpoint,
    saved_shapes,
)
from .training.config import SEED_BOUNDARY, TrainConfig, build_model  # noqa: F401
from .training.params import SEP, flat, init_variables, nested, trainable_paths  # noqa: F401
from .training.slide_sets import SlideSet, read_manifest, shard_for_process, split_by_slide  # noqa: F401
from .training.steps import (  # noqa: F401
    Steps,
    TrainState,
    create_state,
    learning_rate_schedule,
    make_optimizer,
    steps_for,
)


# --- the training loop -----------------------------------------------------------------------------


def window_auc(labels: np.ndarray, probs: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    if labels.min() == labels.max():
        return float("nan")  # one class only: AUC undefined
    return float(roc_auc_score(labels, probs))


def predict_loader(steps: Steps, variables: dict[str, Any], loader: Loader) -> tuple[np.ndarray, np.ndarray]:
    """(labels, probabilities) over one epoch of an unshuffled loader."""
    labels, probs = [], []
    for batch in loader:
        labels.append(batch["labels"])
        probs.append(steps.predict(variables, batch["images"], pad_to=loader.batch_size))
    return np.concatenate(labels), np.concatenate(probs)


@dataclass
class History:
    step: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    val_step: list[int] = field(default_factory=list)
    val_auc: list[float] = field(default_factory=list)
    pairs_per_s: list[float] = field(default_factory=list)

    def to_json(self) -> dict[str, list]:
        return asdict(self)


def fit(
    cfg: TrainConfig,
    slides: SlideSet,
    run_dir: str | os.PathLike[str],
    *,
    steps: int | None = None,
    epochs: int | None = None,
    time_limit: float | None = None,
    resume: bool = False,
    threads: int | None = None,
    log_every: int = 10,
    progress: bool = True,
    devices: Sequence[Any] | None = None,
) -> History:
    """Train until `steps` optimiser steps, `epochs` epochs or `time_limit` seconds (whichever first;
    at least one must be given), validating and checkpointing at each epoch end and at the end.

    Writes into `run_dir`: config.json, checkpoints/ (orbax), history.json and training.png (loss and
    validation AUC); with validation slides also best/, a run directory of its own holding the
    checkpoint of the best validation AUC so far (`predict --checkpoint RUN/best`), as Keras's
    ModelCheckpoint(save_best_only=True): a time-limited run stops wherever it is. With `resume`,
    continues from the latest checkpoint there: the same batches and parameters follow as in an
    uninterrupted run. One process at a time trains into `run_dir` (it holds RUN/.wsitile-train.lock
    while it runs; a second is refused naming the first's pid).
    """
    if steps is None and epochs is None and time_limit is None:
        raise ValueError("give steps, epochs or time_limit: training needs a bound")
    if time_limit is not None and not 0 < time_limit < float("inf"):
        raise ValueError(f"time_limit {time_limit}: must be a positive number of seconds")
    for name, bound in (("steps", steps), ("epochs", epochs)):  # 0, -3 or 0.5 would train nothing, silently
        if bound is not None and (isinstance(bound, bool) or not isinstance(bound, (int, np.integer)) or bound < 1):
            raise ValueError(f"{name} {bound!r}: must be an integer >= 1")
    run_dir = Path(run_dir)
    if (run_dir / "checkpoints").exists() and not (run_dir / "checkpoints").is_dir():
        raise FileExistsError(f"{run_dir / 'checkpoints'}: exists and is not a folder")  # not after training
    shared = {path for path, _ in slides.train} & {path for path, _ in slides.val}
    if shared:
        raise ValueError(f"{sorted(shared)[0]}: both a training and a validation slide (validation would flatter)")
    ex = steps_for(cfg, devices)
    if cfg.batch_size % ex.num_devices:
        raise ValueError(f"batch_size {cfg.batch_size}: must be a multiple of the {ex.num_devices} devices")
    # A fresh run's initial state before anything is written: bad weights or settings leave no run folder.
    fresh = None if resume else ex.place_state(create_state(cfg))
    local_batch = cfg.batch_size // jax.process_count()

    train_items = shard_for_process(slides.train)
    if not train_items:
        raise ValueError("no training slides")
    with contextlib.ExitStack() as held:  # unwound in reverse: managers, locks, loaders
        # A folder that exists may be another process's run: refused before the slides' grids are
        # built (minutes on a real training set); a new folder is locked as soon as it is made.
        locked = run_dir.is_dir()
        if locked:
            held.enter_context(run_dir_locked(run_dir))
        loader = held.enter_context(Loader(
            train_items,
            levels=cfg.levels,
            window=cfg.window,
            center=cfg.center,
            stride=cfg.stride,
            tissue_threshold=cfg.tissue_threshold,
            batch_size=local_batch,
            threads=threads,
            shuffle=True,
            balanced=cfg.balanced,
            seed=cfg.seed,
            drop_last=True,
            augment=cfg.augment,
        ))
        if int(loader.labels.sum()) == 0:
            raise ValueError(
                "no tumour windows in the training slides (" + ", ".join(p for p, _ in train_items)
                + "): check the masks and the tissue threshold"
            )
        if len(loader) == 0:
            raise ValueError(f"batch_size {cfg.batch_size}: larger than the {loader.num_samples} training windows")
        val_loader = None
        if slides.val:
            val_loader = held.enter_context(Loader(
                shard_for_process(slides.val), levels=cfg.levels, window=cfg.window, center=cfg.center,
                stride=cfg.stride, tissue_threshold=cfg.tissue_threshold, batch_size=max(local_batch, 64),
                threads=threads, shuffle=False,
            ))
        run_dir.mkdir(parents=True, exist_ok=True)
        if not locked:  # before anything in the folder is read or removed
            held.enter_context(run_dir_locked(run_dir))
        mngr = checkpoint_manager(run_dir)
        held.callback(mngr.close)
        best_mngr = None
        if val_loader is not None:  # RUN/best is a run folder of its own (`predict --checkpoint RUN/best`)
            (run_dir / "best").mkdir(exist_ok=True)
            held.enter_context(run_dir_locked(run_dir / "best"))
            best_mngr = checkpoint_manager(run_dir / "best")
            held.callback(best_mngr.close)
        return _train(cfg, ex, loader, val_loader, fresh, run_dir, mngr, best_mngr, resume, steps, epochs,
                      time_limit, log_every, progress)


def _train(cfg: TrainConfig, ex: Steps, loader: Loader, val_loader: Loader | None, fresh: TrainState | None,
           run_dir: Path, mngr: ocp.CheckpointManager, best_mngr: ocp.CheckpointManager | None, resume: bool,
           steps: int | None, epochs: int | None, time_limit: float | None, log_every: int,
           progress: bool) -> History:
    """`fit` once its loaders and checkpoint managers are made and its folder is locked (`fit` closes them)."""
    from tqdm import tqdm

    for m in (mngr, best_mngr):
        if m is not None:
            remove_unfinished_saves(m)  # an earlier run's failed or killed save
    history = History()
    history_path = run_dir / "history.json"
    if resume and mngr.latest_step() is not None:
        state, meta = restore_checkpoint(run_dir, int(mngr.latest_step()), cfg, ex)
        if meta["config"] != cfg.to_json():
            raise ValueError(f"{run_dir}: its checkpoint was trained with other settings; use another --out")
        loader.set_state(meta["loader"])
        if history_path.is_file():
            history = History(**json.loads(history_path.read_text()))
    else:
        if mngr.latest_step() is not None:
            raise ValueError(f"{run_dir}: already holds checkpoints; pass --resume or use another --out")
        state = fresh if fresh is not None else ex.place_state(create_state(cfg))
    atomic_write(run_dir / "config.json", lambda fh: fh.write(json.dumps(cfg.to_json(), indent=2).encode()))

    start_step = int(state.step)
    target = None if steps is None else int(steps)  # absolute: a resumed run stops at the same step
    t_start = time.monotonic()
    last_good = mngr.latest_step()
    epochs_done = 0
    bar = tqdm(total=target, initial=start_step, unit="step", desc="train", disable=not progress or None)

    def out_of_time() -> bool:
        return time_limit is not None and time.monotonic() - t_start >= time_limit

    def done() -> bool:
        return (target is not None and int(state.step) >= target) or out_of_time() or (
            epochs is not None and epochs_done >= epochs
        )

    def checkpoint() -> None:
        nonlocal last_good
        last_good = save_checkpoint(mngr, state, cfg, loader.get_state())
        atomic_write(history_path, lambda fh: fh.write(json.dumps(history.to_json()).encode()))
        _plot_history(history, run_dir / "training.png")

    pending: list[jax.Array] = []  # losses of the last steps, not yet read back
    t_log, n_log = time.monotonic(), 0

    def flush_losses() -> None:
        # Reading the loss synchronises with the device: done every `log_every` steps, not each step.
        nonlocal t_log, n_log
        first = int(state.step) - len(pending) + 1
        for i, loss in enumerate(pending):
            value = float(loss)
            if not math.isfinite(value):
                where = f"checkpoint {last_good}" if last_good is not None else "no checkpoint yet"
                raise FloatingPointError(
                    f"loss became {value} at step {first + i}; stopped ({where} in {run_dir / 'checkpoints'} kept)"
                )
            history.step.append(first + i)
            history.loss.append(value)
        if pending:
            rate = n_log * cfg.batch_size / max(time.monotonic() - t_log, 1e-9)
            history.pairs_per_s.append(rate)
            bar.set_postfix(loss=f"{history.loss[-1]:.4f}", pairs_s=f"{rate:.0f}")
        pending.clear()
        t_log, n_log = time.monotonic(), 0

    try:
        while not done():
            for batch in loader:
                images = ex.place_batch(batch["images"])
                labels = ex.place_batch(batch["labels"])
                state, metrics = ex.train_step(state, images, labels)
                pending.append(metrics["loss"])
                n_log += 1
                bar.update(1)
                if len(pending) >= log_every:
                    flush_losses()
                if done():
                    break
            else:
                epochs_done += 1
            flush_losses()
            if val_loader is not None:
                labels_v, probs_v = predict_loader(ex, state.variables(), val_loader)
                auc = window_auc(labels_v, probs_v)
                best_so_far = max((a for a in history.val_auc if math.isfinite(a)), default=-math.inf)
                history.val_step.append(int(state.step))
                history.val_auc.append(auc)
                bar.write(f"step {int(state.step)}: validation AUC {auc:.4f} over {len(labels_v)} windows")
                if best_mngr is not None and math.isfinite(auc) and auc > best_so_far:
                    save_checkpoint(best_mngr, state, cfg, loader.get_state())
            checkpoint()
    finally:
        bar.close()
    return history


def _plot_history(history: History, path: Path) -> None:
    from .plots import save_training_curves

    save_training_curves(history.to_json(), path)
