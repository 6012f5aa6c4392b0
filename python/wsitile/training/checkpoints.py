"""Orbax checkpoints of a run: the train state, the config and the loader state, saved with
interrupts held; finding, reading and restoring them, and loading one for inference."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import shutil
import signal
import socket
import threading
from pathlib import Path
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from .config import TrainConfig
from .orbax_noise import orbax_noise_held
from .params import check_same_shapes, flat, nested, trainable_paths, variable_shapes
from .steps import Steps, TrainState, create_state, steps_for

log = logging.getLogger(__name__)


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
    meta = {"config": cfg.to_json(), "loader": {k: int(v) for k, v in loader_state.items()}, "step": step,
            "variables": _shapes(state.variables())}
    with _interrupts_deferred(), orbax_noise_held():
        try:
            mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))
            mngr.wait_until_finished()
        except Exception as exc:
            if step in ocp.utils.checkpoint_steps(Path(str(mngr.directory))):
                # Committed: what failed came after it (removing an older checkpoint, e.g. an NFS
                # folder kept busy by a .nfsXXXX file). The run goes on from a good checkpoint.
                log.warning("%s: checkpoint %d saved, but removing an older one failed: %s", mngr.directory, step,
                            " ".join(str(exc).split())[:300])
                return step
            # A failed save's temporary folder goes rather than fill the disk, once orbax's writer
            # threads have stopped (TensorStore's writes in flight can still leave a few small files:
            # the run's next `fit` removes those).
            with contextlib.suppress(Exception):
                mngr.close()
            remove_unfinished_saves(mngr)
            # TensorStore's message is two paths inside orbax's temporary folder and the OS error's
            # code; what a user needs is the checkpoint and the reason.
            code = re.search(r"os_error_code='?(\d+)", str(exc))
            errno = exc.errno if isinstance(exc, OSError) else int(code[1]) if code else None
            if errno:
                raise OSError(errno, f"cannot save checkpoint {step} in {mngr.directory}: {os.strerror(errno)}") from exc
            raise
    return step


def remove_unfinished_saves(mngr: ocp.CheckpointManager) -> None:
    """Removes orbax's STEP.orbax-checkpoint-tmp* folders under the manager's directory: saves that
    never completed (a full disk, a killed run), never a checkpoint (orbax renames a save's folder
    only when it is complete). For the run's writer only: to anyone else one may be a save in progress."""
    for tmp in Path(str(mngr.directory)).glob("*.orbax-checkpoint-tmp*"):
        shutil.rmtree(tmp, ignore_errors=True)


#: The file a training process holds locked in its run directory while it runs (flock: freed when
#: the process ends, however it ends; removed by the holder when it is done).
RUN_LOCK = ".wsitile-train.lock"


class _RunLock:
    """flock on RUN/RUN_LOCK, which names its holder ("pid N on HOST")."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir, self.path, self.fd = run_dir, run_dir / RUN_LOCK, -1

    def acquire(self) -> None:
        while True:
            fd = self._open()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip()
                os.close(fd)
                who = f" ({holder})" if holder.startswith("pid ") and holder.isprintable() else ""
                raise ValueError(f"{self.run_dir}: another training process{who} is writing this run; "
                                 "wait for it to end or use another --out") from None
            except OSError as exc:  # ENOLCK: a filesystem without locks (some network mounts)
                os.close(fd)
                log.warning("%s: cannot be locked (%s); another process training into it would not be refused",
                            self.run_dir, exc.strerror or exc)
                return
            try:  # the file locked must still be the one at the path: a holder removes it as it lets go
                now, held = os.lstat(self.path), os.fstat(fd)
                if (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino):
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        self.fd = fd
        with contextlib.suppress(OSError):  # read-only: another user's stale file, still a lock
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)

    def _open(self) -> int:
        flags = os.O_NOFOLLOW | os.O_CLOEXEC  # a link planted as the lock file is refused, not written through
        try:
            try:
                return os.open(self.path, os.O_RDWR | os.O_CREAT | flags, 0o644)
            except PermissionError:  # another user's file left by a killed run: flock needs no write access
                return os.open(self.path, os.O_RDONLY | flags)
        except OSError as exc:  # a folder, a link, unreadable
            raise ValueError(f"{self.path}: cannot be used as this run's lock ({exc.strerror}); "
                             "remove it if no training process is running") from None

    def release(self) -> None:
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.unlink(self.path)  # while still locked: a waiting process finds it gone and opens anew
            os.close(self.fd)
            self.fd = -1


@contextlib.contextmanager
def run_dir_locked(run_dir: Path) -> Iterator[None]:
    """Hold `run_dir` for this training run inside the block; ValueError naming the holder when
    another process holds it. Two runs writing one folder would each remove the other's save in
    progress as unfinished, and interleave their checkpoints. JAX's process 0 locks (the others of a
    multi-host run write the same folder, coordinated by orbax) and tells the others whether it could,
    so every process fails, not only the first; a filesystem that cannot lock (ENOLCK) runs without
    the lock, with a warning."""
    lock = _RunLock(run_dir) if jax.process_index() == 0 else None
    error: ValueError | None = None
    if lock is not None:
        try:
            lock.acquire()
        except ValueError as exc:
            error = exc
    try:
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            locked = bool(multihost_utils.broadcast_one_to_all(np.int32(error is None)))
            if not locked and error is None:
                error = ValueError(f"{run_dir}: process 0 could not lock this run (its error says why)")
        if error is not None:
            raise error
        yield
    finally:
        if lock is not None:
            lock.release()


def find_checkpoint(path: str | os.PathLike[str]) -> tuple[Path, int]:
    """(run dir, step) of the latest checkpoint under `path` (a run dir or its checkpoints/ folder)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such checkpoint or run directory")
    run_dir = path.parent if path.name == "checkpoints" else path
    if not (run_dir / "checkpoints").is_dir():
        raise ValueError(f"{path}: not a wsitile run directory (no checkpoints/ folder)")
    # orbax's listing of finalized steps, as CheckpointManager.latest_step, but without a manager:
    # that would start JAX's backend (its multi-host checks), which `predict` starts in parallel
    # with the slide's grid instead (CUDA's start: a second or more on a GPU).
    steps = ocp.utils.checkpoint_steps((run_dir / "checkpoints").absolute())
    if not steps:
        raise ValueError(f"{path}: holds no complete checkpoint")
    return run_dir, int(max(steps))


def read_checkpoint_meta(run_dir: Path, step: int) -> dict[str, Any]:
    """The metadata saved with `step` (config, loader state, variable shapes); starts no JAX backend."""
    folder = (run_dir / "checkpoints" / str(step) / "meta").absolute()
    return _checked_meta(ocp.handlers.JsonCheckpointHandler().restore(folder), folder)


def _checked_meta(meta: Any, folder: Path) -> dict[str, Any]:
    """`meta` if it has the fields wsitile writes (an edited or foreign file fails here, naming it,
    rather than as a KeyError deep in restoring or resuming)."""
    def bad(why: str) -> ValueError:
        return ValueError(f"{folder}: not a wsitile checkpoint's metadata ({why})")

    if not isinstance(meta, dict):
        raise bad(f"a {type(meta).__name__}, not an object")
    if not isinstance(meta.get("config"), dict):
        raise bad("no config")
    loader = meta.get("loader")
    if loader is not None and not (isinstance(loader, dict) and all(
            isinstance(loader.get(k), int) and not isinstance(loader.get(k), bool) for k in ("seed", "epoch", "index"))):
        raise bad("the loader state needs integer seed, epoch and index")
    variables = meta.get("variables")
    if variables is not None and not (isinstance(variables, dict) and all(map(_is_shape_and_dtype, variables.values()))):
        raise bad("variables must map names to [shape, dtype]")
    return dict(meta)


def _is_shape_and_dtype(entry: Any) -> bool:
    """An entry of `_shapes`: [[non-negative ints], a NumPy dtype name]."""
    if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], list)
            and all(isinstance(d, int) and d >= 0 for d in entry[0])):
        return False
    try:
        np.dtype(entry[1])
    except (TypeError, ValueError):
        return False
    return True


def restore_checkpoint(run_dir: Path, step: int, cfg: TrainConfig, steps: Steps) -> tuple[TrainState, dict]:
    """The state saved at `step`, placed on the mesh, and its metadata. Fails naming the folder when
    the checkpoint does not fit the architecture in `cfg`."""
    restored = _restore(run_dir, step, cfg, ocp.args.Composite(
        state=ocp.args.StandardRestore(_abstract_state(cfg, steps)), meta=ocp.args.JsonRestore()))
    return restored["state"], _checked_meta(restored["meta"], run_dir / "checkpoints" / str(step) / "meta")


def _abstract_state(cfg: TrainConfig, steps: Steps) -> TrainState:
    abstract = jax.eval_shape(lambda: create_state(cfg, variable_shapes(cfg)))
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=steps.replicated), abstract)


def _shapes(variables: dict[str, Any]) -> dict[str, list]:
    """{flat path: [shape, dtype name]}: saved with each checkpoint, so inference knows what to read
    and compile without tracing the model for it."""
    return {k: [list(v.shape), str(v.dtype)] for k, v in flat(variables).items()}


# TensorStore's words for a file it could not read (truncated, deleted or damaged arrays), as against
# orbax's and Flax's for arrays of other shapes or names.
_READ_FAILURE = re.compile(r"\b(DATA_LOSS|OUT_OF_RANGE|NOT_FOUND|UNAVAILABLE)\b|Error (reading|opening|decoding)")


def mismatch_error(run_dir: Path, step: int, cfg: TrainConfig, exc: Exception) -> ValueError:
    text = " ".join(str(exc).split())
    where = run_dir / "checkpoints" / str(step)
    if _READ_FAILURE.search(text):
        return ValueError(f"{where}: cannot be read (a damaged or incomplete checkpoint?): {text[:200]}")
    return ValueError(f"{where}: does not match the model (width {cfg.width}, {len(cfg.levels)} towers): {text[:200]}")


def _restore(run_dir: Path, step: int, cfg: TrainConfig, args: ocp.args.Composite) -> Any:
    mngr = checkpoint_manager(run_dir)
    try:
        with orbax_noise_held():
            return mngr.restore(step, args=args)
    except (ValueError, KeyError, TypeError) as exc:
        raise mismatch_error(run_dir, step, cfg, exc) from None
    finally:
        mngr.close()


def checkpoint_config(checkpoint: str | os.PathLike[str]) -> tuple[Path, int, TrainConfig]:
    """(run directory, step, config) of the latest checkpoint under `checkpoint`, without its arrays."""
    run_dir, step = find_checkpoint(checkpoint)
    meta = read_checkpoint_meta(run_dir, step)
    return run_dir, step, TrainConfig.from_json(meta["config"], source=str(run_dir / "checkpoints" / str(step)))


def saved_shapes(meta: dict[str, Any]) -> dict[str, Any] | None:
    """The model's variables ({"params", "batch_stats"}) as jax.ShapeDtypeStruct, from the shapes saved
    in a checkpoint's `meta` (milliseconds, no devices needed); None for a checkpoint written before
    wsitile saved them."""
    if "variables" not in meta:
        return None
    return nested({k: jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype)) for k, (shape, dtype) in meta["variables"].items()})


def inference_target(cfg: TrainConfig, steps: Steps, meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """The model's variables as jax.ShapeDtypeStruct placed like `restore_for_inference`'s: what
    `Steps.compile_predict` needs to compile before the arrays are read.

    From the shapes saved in the checkpoint's `meta` when it has them (the compile's trace of the
    model then checks that they fit it: catch flax.errors.FlaxError there), otherwise traced from
    the model (about a second at full width)."""
    shapes = saved_shapes(meta) if meta is not None else None
    if shapes is None:
        return _abstract_state(cfg, steps).variables()
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=steps.replicated), shapes)


def read_model_arrays(run_dir: Path, step: int, cfg: TrainConfig, shapes: dict[str, Any]) -> dict[str, Any]:
    """The model's variables at `step` as NumPy arrays (`shapes`: `saved_shapes` or `inference_target`).
    Only the model's arrays are read, not the optimiser's two per trainable parameter (a third of
    the arrays: about 3 s less per `wsitile predict` at full width on a CPU); as NumPy, so they can be
    read before the devices are up and placed in one transfer (orbax's per-array placement was ~40%
    of its restore: 754 arrays at full width, 1.4 -> 0.8 s on a CPU, 2026-12-01)."""
    params = flat(shapes["params"])
    trainable = trainable_paths(shapes["params"], cfg.boundary)
    wanted = {"trainable": {k: v for k, v in params.items() if k in trainable},
              "frozen": {k: v for k, v in params.items() if k not in trainable},
              "batch_stats": shapes["batch_stats"]}
    host_args = jax.tree.map(lambda s: ocp.RestoreArgs(restore_type=np.ndarray, dtype=s.dtype), wanted)
    state = _restore(run_dir, step, cfg, ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item=wanted, restore_args=host_args, partial_restore=True)))["state"]
    # Read as NumPy, the arrays keep their saved shapes: one that is not the model's fails here, naming
    # the checkpoint (a checkpoint without saved shapes whose config was edited failed in the first
    # predict call, in XLA's words).
    try:
        check_same_shapes(wanted, state, "the saved arrays")
    except ValueError as exc:
        raise mismatch_error(run_dir, step, cfg, exc) from None
    return {"params": nested({**state["frozen"], **state["trainable"]}), "batch_stats": state["batch_stats"]}


def restore_for_inference(
    run_dir: Path, step: int, cfg: TrainConfig, target: dict[str, Any] | None = None
) -> tuple[Steps, dict[str, Any]]:
    """(steps, variables on the devices) of one checkpoint, ready for `Steps.predict`. `target`:
    `inference_target(cfg, steps)`, when the caller already has it (tracing the model for it takes
    about a second)."""
    steps = steps_for(cfg)
    target = inference_target(cfg, steps) if target is None else target
    return steps, jax.device_put(read_model_arrays(run_dir, step, cfg, target), steps.replicated)


def load_for_inference(checkpoint: str | os.PathLike[str]) -> tuple[TrainConfig, Steps, dict[str, Any]]:
    """(config, steps, variables) of the latest checkpoint under `checkpoint`, ready for `Steps.predict`."""
    run_dir, step, cfg = checkpoint_config(checkpoint)
    return (cfg, *restore_for_inference(run_dir, step, cfg))
