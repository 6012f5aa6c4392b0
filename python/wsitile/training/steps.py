"""The optimiser, the train state and the jitted steps.

One jitted step over a `Mesh` of every local device: the batch is sharded on the ``data`` axis,
parameters and optimiser state are replicated, the state is donated. Parameters are float32; compute
is bfloat16 on GPU and float32 on CPU. Partial fine-tuning splits the parameters into a trainable and
a frozen dict keyed by path, so gradients and optimiser state exist only for the trainable part and
backpropagation stops at the boundary.
"""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any, Callable, Sequence, cast

import numpy as np

import flax
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from .config import TrainConfig, build_model
from .params import flat, init_variables, nested, trainable_paths


def dihedral(images: jax.Array) -> jax.Array:
    """(N, T, H, W, 3) -> (8N, T, H, W, 3): the 8 orientations (4 rotations, with and without a flip)
    of every sample, both towers turned together, orientation-major."""
    out: list[jax.Array] = []
    for flipped in (images, images[:, :, :, ::-1]):
        out.extend(jnp.rot90(flipped, k, axes=(2, 3)) for k in range(4))
    return jnp.concatenate(out)


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
        # Test-time augmentation: the mean over the 8 dihedral orientations of each window pair.
        self.tta_step = jax.jit(
            self._tta_step,
            in_shardings=(self.replicated, self.batch_sharding),
            out_shardings=self.batch_sharding,
        )
        self._compiled: dict[tuple, jax.stages.Compiled] = {}  # compile_predict's, by shapes

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

    def _tta_step(self, variables: dict[str, Any], images: jax.Array) -> jax.Array:
        return self.model_probs(variables, dihedral(images)).reshape(8, -1).mean(axis=0)

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
        return np.asarray(self.predict_async(variables, images, step, pad_to))[: len(images)]

    def _padded(self, size: int) -> int:
        """The batch size a predict batch of `size` runs at: a multiple of the device count (the shape
        compile_predict compiles and predict_async calls must agree, or the call compiles again)."""
        return size + (-size) % self.num_devices

    def compile_predict(self, variables: dict[str, Any], batch_size: int, tta: bool = False) -> jax.stages.Compiled:
        """`predict_step` (`tta_step` with `tta`) compiled for batches padded to `batch_size`: pass it
        as `step` to `predict_async`. `variables` may be abstract (`inference_target`), so this can run
        while the checkpoint is still being read. With JAX's persistent compilation cache on, the step
        is traced once per machine (kept as a `jax.export` artifact: `exported.compile_step`) and
        compiled once (the compilation cache). Kept for the process: the next slide's call with the
        same shapes returns the same executable at once."""
        from .exported import compile_step

        images = jax.ShapeDtypeStruct((self._padded(batch_size), len(self.cfg.levels), self.cfg.window, self.cfg.window, 3), np.uint8,
                                      sharding=self.batch_sharding)
        leaves, tree = jax.tree.flatten(variables)
        key = (tta, images.shape, tree, tuple((x.shape, str(x.dtype)) for x in leaves))
        if key in self._compiled:
            return self._compiled[key]
        step = self.tta_step if tta else self.predict_step
        identity = json.dumps({"step": "tta" if tta else "predict", "config": self.cfg.to_json()}, sort_keys=True)
        self._compiled[key] = compile_step(step, (variables, images), identity,
                                           in_shardings=(self.replicated, self.batch_sharding),
                                           out_shardings=self.batch_sharding)
        return self._compiled[key]

    def predict_async(
        self, variables: dict[str, Any], images: np.ndarray, step: Callable | None = None, pad_to: int = 0
    ) -> jax.Array:
        """`predict` without waiting: the padded batch's probabilities, still being computed on the
        device (the first len(images) are the batch's). The caller reads them after dispatching the
        next batch, so the device does not idle while the host hands it the next one."""
        n = len(images)
        pad = self._padded(max(n, pad_to)) - n
        if pad:
            images = np.concatenate([images, np.zeros((pad,) + images.shape[1:], images.dtype)])
        return cast(jax.Array, (step or self.predict_step)(variables, self.place_batch(images)))


_STEPS: dict[tuple[TrainConfig, tuple[Any, ...]], Steps] = {}


def steps_for(cfg: TrainConfig, devices: Sequence[Any] | None = None) -> Steps:
    """A `Steps` per (config, devices), kept for the process: a second run with the same settings
    (resuming, validating, predicting) reuses the compiled steps."""
    key = (cfg, tuple(jax.devices() if devices is None else devices))
    if not key[1] or not all(isinstance(d, jax.Device) for d in key[1]):
        raise ValueError(f"devices {devices!r}: give JAX devices (e.g. jax.devices()[:2]), or None for all")
    if key not in _STEPS:
        _STEPS[key] = Steps(cfg, key[1])
    return _STEPS[key]
