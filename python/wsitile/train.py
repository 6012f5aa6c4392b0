"""Training the two-tower InceptionV3 on window pairs from the engine (`wsitile train`).

One jitted step over a `Mesh` of every local device: the batch is sharded on the ``data`` axis,
parameters and optimiser state are replicated, the state is donated. Parameters are float32; compute
is bfloat16 on GPU and float32 on CPU. Partial fine-tuning (the seed's "layers past 150") splits the
parameters into a trainable and a frozen dict keyed by path, so gradients and optimiser state exist
only for the trainable part and backpropagation stops at the boundary.

Needs the `wsitile[train]` extra (jax, flax, optax, orbax-checkpoint, h5py).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import threading
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence, cast

import numpy as np

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from .grid import DEFAULT_CENTER, DEFAULT_LEVELS, DEFAULT_STRIDE, DEFAULT_TISSUE_THRESHOLD, DEFAULT_WINDOW
from .loader import Loader
from .manifest import manifest_slides, mask_for  # noqa: F401 - mask_for is part of this module's API
from .masks import atomic_write
from .models import TwoTower, load_keras_h5

SEED_BOUNDARY = 150  # the seed: `for layer in model.layers[:150]: layer.trainable = False`
SEP = "/"  # path separator of the flat parameter dicts (orbax wants string keys)


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a run; saved as config.json beside the checkpoints (predict reads it)."""

    levels: tuple[int, ...] = DEFAULT_LEVELS
    window: int = DEFAULT_WINDOW
    center: int = DEFAULT_CENTER
    stride: int = DEFAULT_STRIDE
    tissue_threshold: float | None = DEFAULT_TISSUE_THRESHOLD
    width: float = 1.0  # InceptionV3 width multiplier (0.25: the small CPU variant)
    weights: str | None = None  # Keras ImageNet HDF5 (notop); None: random initialisation
    fine_tune_from: int | None = None  # Keras layer index boundary; None: 150 with weights, else 0
    optimizer: str = "rmsprop"  # "rmsprop" (Liu et al., TF1 semantics) or "adam"
    learning_rate: float | None = None  # None: 0.002 with weights, 0.05 from scratch (Liu et al.)
    halve_every: int = 2_000_000  # examples per learning-rate halving (Liu et al.)
    batch_size: int = 32
    seed: int = 0
    augment: bool = True
    balanced: bool = True  # tumour/normal sampled 1:1
    dtype: str = "auto"  # compute: "auto" (bfloat16 on GPU, float32 elsewhere), "float32", "bfloat16", "float64" (checks; needs jax_enable_x64)

    def __post_init__(self) -> None:
        object.__setattr__(self, "levels", tuple(int(v) for v in self.levels))
        if self.optimizer not in ("rmsprop", "adam"):
            raise ValueError(f"optimizer {self.optimizer!r}: expected 'rmsprop' or 'adam'")
        if self.dtype not in ("auto", "float32", "bfloat16", "float64"):
            raise ValueError(f"dtype {self.dtype!r}: expected 'auto', 'float32', 'bfloat16' or 'float64'")
        if not self.width > 0:
            raise ValueError(f"width {self.width}: must be > 0")
        if self.weights is not None and self.width != 1.0:
            raise ValueError(f"width {self.width}: ImageNet weights ({self.weights}) need width 1.0")
        if self.batch_size < 1:
            raise ValueError(f"batch_size {self.batch_size}: must be >= 1")
        if self.learning_rate is not None and not self.learning_rate > 0:
            raise ValueError(f"learning_rate {self.learning_rate}: must be > 0")

    @property
    def boundary(self) -> int:
        if self.fine_tune_from is not None:
            return int(self.fine_tune_from)
        return SEED_BOUNDARY if self.weights else 0

    @property
    def lr(self) -> float:
        if self.learning_rate is not None:
            return float(self.learning_rate)
        return 0.002 if self.weights else 0.05

    def compute_dtype(self) -> Any:
        if self.dtype == "auto":
            return jnp.bfloat16 if jax.default_backend() == "gpu" else jnp.float32
        return jnp.dtype(self.dtype)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["levels"] = list(self.levels)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any], source: str = "config") -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"{source}: unknown training settings {sorted(unknown)}")
        return cls(**d)


def build_model(cfg: TrainConfig) -> TwoTower:
    return TwoTower(towers=len(cfg.levels), width=cfg.width, dtype=cfg.compute_dtype(), frozen_below=cfg.boundary)


# --- parameters ------------------------------------------------------------------------------------


def flat(tree: Any) -> dict[str, Any]:
    return flax.traverse_util.flatten_dict(flax.core.unfreeze(tree), sep=SEP)


def nested(d: dict[str, Any]) -> dict[str, Any]:
    return flax.traverse_util.unflatten_dict(d, sep=SEP)


def init_variables(cfg: TrainConfig) -> dict[str, Any]:
    """Random initialisation, then (with `cfg.weights`) every tower's backbone from the Keras file.

    The random values are drawn with NumPy from the shapes `model.init` would produce, with Keras's
    initialisers (Glorot uniform kernels, zero biases, BatchNorm mean 0 / variance 1): compiling
    `model.init` for 188 convolutions costs tens of seconds on a CPU, drawing the arrays milliseconds.
    """
    model = build_model(cfg)
    dummy = jnp.zeros((1, len(cfg.levels), cfg.window, cfg.window, 3), jnp.uint8)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), dummy, train=False))
    rng = np.random.default_rng(cfg.seed)
    variables = nested({k: jnp.asarray(_init_leaf(k, v.shape, rng)) for k, v in flat(shapes).items()})
    if cfg.weights:
        imported = load_keras_h5(cfg.weights, width=cfg.width)
        for t in range(len(cfg.levels)):
            for col in ("params", "batch_stats"):
                _check_same_shapes(variables[col][f"tower_{t}"], imported[col], cfg.weights)
                variables[col][f"tower_{t}"] = jax.tree.map(jnp.asarray, imported[col])
    return variables


def _init_leaf(path: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    name = path.rsplit(SEP, 1)[-1]
    if name == "kernel":  # Glorot uniform, Keras's default (HWIO / IO kernels)
        receptive = int(np.prod(shape[:-2])) if len(shape) > 2 else 1
        fan_in, fan_out = receptive * shape[-2], receptive * shape[-1]
        limit = np.sqrt(6.0 / (fan_in + fan_out))
        return rng.uniform(-limit, limit, shape).astype(np.float32)
    if name == "var":
        return np.ones(shape, np.float32)
    return np.zeros(shape, np.float32)  # biases, BatchNorm beta and mean


def _check_same_shapes(expected: Any, got: Any, source: str) -> None:
    e, g = flat(expected), flat(got)
    if set(e) != set(g):
        raise ValueError(f"{source}: parameters {sorted(set(e) ^ set(g))[:3]} do not match the model")
    for k in e:
        if e[k].shape != g[k].shape:
            raise ValueError(f"{source}: {k} has shape {g[k].shape}, the model expects {e[k].shape}")


def trainable_paths(params: dict[str, Any], boundary: int) -> set[str]:
    """Flat paths of the parameters the optimiser updates: the head, and tower layers with Keras index >= boundary."""
    from .models import trainable_mask

    out = set()
    for key, value in flat(params).items():
        if not key.startswith("tower_"):
            out.add(key)
    for name, tower in params.items():
        if name.startswith("tower_"):
            for key, keep in flat(trainable_mask(tower, boundary)).items():
                if keep:
                    out.add(f"{name}{SEP}{key}")
    return out


# --- optimiser and state ---------------------------------------------------------------------------


def learning_rate_schedule(cfg: TrainConfig) -> optax.Schedule:
    """Liu et al.: the learning rate halves every `halve_every` examples (2M)."""
    return optax.exponential_decay(
        cfg.lr, transition_steps=max(1, cfg.halve_every // cfg.batch_size), decay_rate=0.5, staircase=True
    )


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    schedule = learning_rate_schedule(cfg)
    if cfg.optimizer == "adam":
        return optax.adam(schedule)
    # TensorFlow 1's RMSProp: epsilon inside the square root, accumulator starting at 1, momentum 0.9.
    return optax.rmsprop(schedule, decay=0.9, eps=1.0, momentum=0.9, initial_scale=1.0, eps_in_sqrt=True)


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    trainable: dict[str, jax.Array]  # flat {path: array}
    frozen: dict[str, jax.Array]
    batch_stats: dict[str, Any]
    opt_state: Any

    def params(self) -> dict[str, Any]:
        return nested({**self.frozen, **self.trainable})

    def variables(self) -> dict[str, Any]:
        return {"params": self.params(), "batch_stats": self.batch_stats}


def create_state(cfg: TrainConfig, variables: dict[str, Any] | None = None) -> TrainState:
    variables = init_variables(cfg) if variables is None else variables
    params = variables["params"]
    keep = trainable_paths(params, cfg.boundary)
    every = flat(params)
    trainable = {k: v for k, v in every.items() if k in keep}
    frozen = {k: v for k, v in every.items() if k not in keep}
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        trainable=trainable,
        frozen=frozen,
        batch_stats=variables["batch_stats"],
        opt_state=make_optimizer(cfg).init(trainable),
    )


# --- steps -----------------------------------------------------------------------------------------


class Steps:
    """The jitted train and predict steps over a data-parallel mesh of `devices` (default: all)."""

    def __init__(self, cfg: TrainConfig, devices: Sequence[Any] | None = None):
        self.cfg = cfg
        self.model = build_model(cfg)
        self.tx = make_optimizer(cfg)
        devices = list(jax.devices() if devices is None else devices)
        self.mesh = Mesh(np.asarray(devices), ("data",))
        self.replicated = NamedSharding(self.mesh, PartitionSpec())
        self.batch_sharding = NamedSharding(self.mesh, PartitionSpec("data"))
        self.train_step = jax.jit(
            self._train_step,
            in_shardings=(self.replicated, self.batch_sharding, self.batch_sharding),
            out_shardings=(self.replicated, self.replicated),
            donate_argnums=(0,),
        )
        self.predict_step = jax.jit(
            self._predict_step,
            in_shardings=(self.replicated, self.batch_sharding),
            out_shardings=self.batch_sharding,
        )

    @property
    def num_devices(self) -> int:
        return int(self.mesh.devices.size)

    def _train_step(self, state: TrainState, images: jax.Array, labels: jax.Array):
        def loss_fn(trainable):
            variables = {"params": nested({**state.frozen, **trainable}), "batch_stats": state.batch_stats}
            logits, updates = self.model.apply(variables, images, train=True, mutable=["batch_stats"])
            loss = optax.sigmoid_binary_cross_entropy(logits, labels.astype(jnp.float32)).mean()
            return loss, updates["batch_stats"]

        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.trainable)
        updates, opt_state = self.tx.update(grads, state.opt_state, state.trainable)
        new = replace(  # dataclasses.replace: flax's state.replace() is invisible to mypy
            state,
            step=state.step + 1,
            trainable=optax.apply_updates(state.trainable, updates),
            batch_stats=batch_stats,
            opt_state=opt_state,
        )
        return new, {"loss": loss}

    def model_probs(self, variables: dict[str, Any], images: jax.Array) -> jax.Array:
        """Tumour probabilities in inference mode (traceable: use inside jit)."""
        logits = cast(jax.Array, self.model.apply(variables, images, train=False))  # no mutable: no state
        return jax.nn.sigmoid(logits)

    def _predict_step(self, variables: dict[str, Any], images: jax.Array) -> jax.Array:
        return self.model_probs(variables, images)

    def place_state(self, state: TrainState) -> TrainState:
        return jax.device_put(state, self.replicated)

    def place_batch(self, array: np.ndarray) -> jax.Array:
        # Each process passes its own share; single-process this is a sharded device_put.
        return jax.make_array_from_process_local_data(self.batch_sharding, array)

    def predict(
        self, variables: dict[str, Any], images: np.ndarray, step: Callable | None = None, pad_to: int = 0
    ) -> np.ndarray:
        """Probabilities for a host batch, by `predict_step` or another jitted step with the same
        shardings. The batch is padded to `pad_to` and to a multiple of the device count, so a short
        last batch does not compile the model again."""
        n = len(images)
        size = max(n, pad_to)
        pad = size + (-size) % self.num_devices - n
        if pad:
            images = np.concatenate([images, np.zeros((pad,) + images.shape[1:], images.dtype)])
        return np.asarray((step or self.predict_step)(variables, self.place_batch(images)))[:n]


_STEPS: dict[tuple[TrainConfig, tuple[Any, ...]], Steps] = {}


def steps_for(cfg: TrainConfig, devices: Sequence[Any] | None = None) -> Steps:
    """A `Steps` per (config, devices), kept for the process: a second run with the same settings
    (resuming, validating, predicting) reuses the compiled steps."""
    key = (cfg, tuple(jax.devices() if devices is None else devices))
    if key not in _STEPS:
        _STEPS[key] = Steps(cfg, key[1])
    return _STEPS[key]


# --- checkpoints -----------------------------------------------------------------------------------


def checkpoint_manager(run_dir: Path) -> ocp.CheckpointManager:
    # Synchronous saves: orbax writes into a temporary folder and renames it when complete, so a run
    # killed at any moment leaves the previous checkpoint intact. Close it when done (its threads).
    options = ocp.CheckpointManagerOptions(max_to_keep=2, create=True, enable_async_checkpointing=False)
    return ocp.CheckpointManager((run_dir / "checkpoints").absolute(), options=options)


@contextlib.contextmanager
def _interrupts_deferred() -> Iterator[None]:
    """Hold Ctrl-C / SIGTERM until the block ends, then deliver them: a save interrupted inside orbax
    would leave its worker threads half done (the folder rename keeps the files consistent anyway)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in previous:
        signal.signal(sig, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for signum in dict.fromkeys(received):
            signal.raise_signal(signum)  # the original handler decides (KeyboardInterrupt, exit, ...)


def save_checkpoint(mngr: ocp.CheckpointManager, state: TrainState, cfg: TrainConfig, loader_state: dict) -> int:
    step = int(state.step)
    meta = {"config": cfg.to_json(), "loader": {k: int(v) for k, v in loader_state.items()}, "step": step}
    with _interrupts_deferred():
        mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))
        mngr.wait_until_finished()
    return step


def find_checkpoint(path: str | os.PathLike[str]) -> tuple[Path, int]:
    """(run dir, step) of the latest checkpoint under `path` (a run dir or its checkpoints/ folder)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such checkpoint or run directory")
    run_dir = path.parent if path.name == "checkpoints" else path
    if not (run_dir / "checkpoints").is_dir():
        raise ValueError(f"{path}: not a wsitile run directory (no checkpoints/ folder)")
    mngr = checkpoint_manager(run_dir)
    try:
        step = mngr.latest_step()
    finally:
        mngr.close()
    if step is None:
        raise ValueError(f"{path}: holds no complete checkpoint")
    return run_dir, int(step)


def read_checkpoint_meta(run_dir: Path, step: int) -> dict[str, Any]:
    mngr = checkpoint_manager(run_dir)
    try:
        restored = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    finally:
        mngr.close()
    return dict(restored["meta"])


def restore_checkpoint(run_dir: Path, step: int, cfg: TrainConfig, steps: Steps) -> tuple[TrainState, dict]:
    """The state saved at `step`, placed on the mesh, and its metadata. Fails naming the folder when
    the checkpoint does not fit the architecture in `cfg`."""
    abstract = jax.eval_shape(lambda: create_state(cfg, jax.eval_shape(lambda: init_variables(replace(cfg, weights=None)))))
    abstract = jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=steps.replicated), abstract
    )
    mngr = checkpoint_manager(run_dir)
    try:
        restored = mngr.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore())
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(
            f"{run_dir / 'checkpoints' / str(step)}: does not match the model "
            f"(width {cfg.width}, {len(cfg.levels)} towers): {' '.join(str(exc).split())[:200]}"
        ) from None
    finally:
        mngr.close()
    return restored["state"], dict(restored["meta"])


def load_for_inference(checkpoint: str | os.PathLike[str]) -> tuple[TrainConfig, Steps, dict[str, Any]]:
    """(config, steps, variables) of the latest checkpoint under `checkpoint`, ready for `Steps.predict`."""
    run_dir, step = find_checkpoint(checkpoint)
    meta = read_checkpoint_meta(run_dir, step)
    cfg = TrainConfig.from_json(meta["config"], source=str(run_dir))
    steps = steps_for(cfg)
    state, _ = restore_checkpoint(run_dir, step, cfg, steps)
    return cfg, steps, jax.device_put(state.variables(), steps.replicated)


# --- data ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SlideSet:
    """Slides with their masks (None: normal) and a label per slide, split by slide."""

    train: tuple[tuple[str, str | None], ...]
    val: tuple[tuple[str, str | None], ...] = ()


def read_manifest(folder: Path) -> tuple[list[tuple[str, str | None]], list[tuple[str, str | None]]]:
    """(train, test) (slide, mask) lists from a `wsitile synth` folder's manifest.csv."""
    return manifest_slides(Path(folder))


def split_by_slide(items: Sequence[tuple[str, str | None]], val_fraction: float) -> SlideSet:
    """Hold out the last `val_fraction` of the tumour slides (at least one when there are two or more)
    and of the normal slides for validation, so no slide feeds both."""
    tumour = [s for s in items if s[1] is not None]
    normal = [s for s in items if s[1] is None]
    if not tumour:
        raise ValueError("no tumour slides among the training slides: a tumour classifier needs some")
    n_t = min(len(tumour) - 1, max(1, round(val_fraction * len(tumour)))) if val_fraction > 0 else 0
    n_n = min(len(normal) - 1, round(val_fraction * len(normal))) if normal else 0
    n_n = max(n_n, 0)
    val = tumour[len(tumour) - n_t :] + normal[len(normal) - n_n :]
    train = tumour[: len(tumour) - n_t] + normal[: len(normal) - n_n]
    return SlideSet(tuple(train), tuple(val))


def shard_for_process(items: Sequence[Any]) -> list[Any]:
    """This process's share of the slides (multi-host: each process reads only its own)."""
    return list(items)[jax.process_index() :: jax.process_count()]


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
    validation AUC). With `resume`, continues from the latest checkpoint there: the same batches and
    parameters follow as in an uninterrupted run.
    """
    from tqdm import tqdm

    if steps is None and epochs is None and time_limit is None:
        raise ValueError("give steps, epochs or time_limit: training needs a bound")
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    ex = steps_for(cfg, devices)
    if cfg.batch_size % ex.num_devices:
        raise ValueError(f"batch_size {cfg.batch_size}: must be a multiple of the {ex.num_devices} devices")
    local_batch = cfg.batch_size // jax.process_count()

    train_items = shard_for_process(slides.train)
    if not train_items:
        raise ValueError("no training slides")
    loader = Loader(
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
    )
    if int(loader.labels.sum()) == 0:
        loader.close()
        raise ValueError(
            "no tumour windows in the training slides (" + ", ".join(p for p, _ in train_items)
            + "): check the masks and the tissue threshold"
        )
    if len(loader) == 0:
        loader.close()
        raise ValueError(f"batch_size {cfg.batch_size}: larger than the {loader.num_samples} training windows")
    val_loader = None
    if slides.val:
        val_loader = Loader(
            shard_for_process(slides.val), levels=cfg.levels, window=cfg.window, center=cfg.center,
            stride=cfg.stride, tissue_threshold=cfg.tissue_threshold, batch_size=max(local_batch, 64),
            threads=threads, shuffle=False,
        )

    mngr = checkpoint_manager(run_dir)
    history = History()
    history_path = run_dir / "history.json"
    if resume and mngr.latest_step() is not None:
        state, meta = restore_checkpoint(run_dir, int(mngr.latest_step()), cfg, ex)
        if meta["config"] != cfg.to_json():
            mngr.close()
            raise ValueError(f"{run_dir}: its checkpoint was trained with other settings; use another --out")
        loader.set_state(meta["loader"])
        if history_path.is_file():
            history = History(**json.loads(history_path.read_text()))
    else:
        if mngr.latest_step() is not None:
            mngr.close()
            raise ValueError(f"{run_dir}: already holds checkpoints; pass --resume or use another --out")
        state = ex.place_state(create_state(cfg))
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
                history.val_step.append(int(state.step))
                history.val_auc.append(auc)
                bar.write(f"step {int(state.step)}: validation AUC {auc:.4f} over {len(labels_v)} windows")
            checkpoint()
    finally:
        bar.close()
        mngr.close()
        loader.close()
        if val_loader is not None:
            val_loader.close()
    return history


def _plot_history(history: History, path: Path) -> None:
    from .plots import save_training_curves

    save_training_curves(history.to_json(), path)
