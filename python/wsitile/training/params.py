"""Parameters as flat {path: array} dicts: random or Keras ImageNet initialisation, and the split into
the trainable part and the frozen part (the seed's "layers past 150")."""

from __future__ import annotations

from typing import Any, cast

import numpy as np

import flax
import jax
import jax.numpy as jnp

from ..models import load_keras_h5
from .config import TrainConfig, build_model

SEP = "/"  # path separator of the flat parameter dicts (orbax wants string keys)


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
    rng = np.random.default_rng(cfg.seed)
    variables = nested({k: jnp.asarray(_init_leaf(k, v.shape, rng)) for k, v in flat(variable_shapes(cfg)).items()})
    if cfg.weights:
        imported = load_keras_h5(cfg.weights, width=cfg.width)
        for t in range(len(cfg.levels)):
            for col in ("params", "batch_stats"):
                check_same_shapes(variables[col][f"tower_{t}"], imported[col], cfg.weights)
                variables[col][f"tower_{t}"] = jax.tree.map(jnp.asarray, imported[col])
    return variables


def variable_shapes(cfg: TrainConfig) -> dict[str, Any]:
    """The model's variables as jax.ShapeDtypeStruct (traced, nothing computed): what a checkpoint of
    `cfg` holds, for restoring one without drawing the random initialisation first."""
    model = build_model(cfg)
    dummy = jnp.zeros((1, len(cfg.levels), cfg.window, cfg.window, 3), jnp.uint8)
    return cast(dict[str, Any], jax.eval_shape(lambda: model.init(jax.random.key(0), dummy, train=False)))


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


def check_same_shapes(expected: Any, got: Any, source: str) -> None:
    e, g = flat(expected), flat(got)
    if set(e) != set(g):
        raise ValueError(f"{source}: parameters {sorted(set(e) ^ set(g))[:3]} do not match the model")
    for k in e:
        if e[k].shape != g[k].shape:
            raise ValueError(f"{source}: {k} has shape {g[k].shape}, the model expects {e[k].shape}")


def trainable_paths(params: dict[str, Any], boundary: int) -> set[str]:
    """Flat paths of the parameters the optimiser updates: the head, and tower layers with Keras index >= boundary."""
    from ..models import trainable_mask

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

