"""Keras ImageNet weights (legacy HDF5, e.g. inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5).

Layout: the root (or a full-model file's `model_weights` group) has attr `layer_names`; each layer group
has attr `weight_names` naming its datasets. Layer names are auto-generated and differ between Keras
versions (`conv2d_1/kernel:0` vs `conv2d/kernel`), so, like Keras's own loader, we match the layers that
carry weights by order against `model.layers`, never by name. Only h5py reads the file.
"""

from __future__ import annotations

import errno
import functools
import os
from pathlib import Path
from typing import Callable

import h5py
import jax
import jax.numpy as jnp
import numpy as np

from .inception_v3 import InceptionV3, keras_kernel_shapes, keras_weighted_layers


def _names_attr(group, name: str) -> list[str]:
    """A list-of-strings attribute; Keras splits big ones into `name0`, `name1`, ..."""
    if name in group.attrs:
        chunks = [group.attrs[name]]
    else:
        chunks, i = [], 0
        while f"{name}{i}" in group.attrs:
            chunks.append(group.attrs[f"{name}{i}"])
            i += 1
    names = [n for chunk in chunks for n in np.atleast_1d(chunk)]
    return [n.decode("utf8") if isinstance(n, bytes) else str(n) for n in names]


def _read_layers(path: Path, root) -> list[tuple[int, str, list[np.ndarray]]]:
    """(index in layer_names, name, weight arrays) of every layer in the file that carries weights."""
    names = _names_attr(root, "layer_names")
    if not names:
        raise ValueError(f"{path}: no 'layer_names' attribute; not a Keras legacy HDF5 weight file")
    layers = []
    for index, name in enumerate(names):
        group = root.get(name)
        if not isinstance(group, h5py.Group):
            raise ValueError(f"{path}: layer {index} ({name}) is listed in layer_names but has no group")
        weight_names = _names_attr(group, "weight_names")
        if not weight_names:
            continue
        arrays = []
        for weight_name in weight_names:
            data = group.get(weight_name)
            if not isinstance(data, h5py.Dataset):
                raise ValueError(f"{path}: layer {index} ({name}): weight {weight_name!r} is missing")
            arrays.append(np.asarray(data[()]))
        layers.append((index, name, arrays))
    return layers


def load_keras_h5(path, width: float = 1.0) -> dict:
    """{'params', 'batch_stats'} for `InceptionV3(width=1.0)` from a Keras legacy HDF5 weight file.

    Raises FileNotFoundError if `path` does not exist, ValueError (naming the file and the layer) if it
    is not HDF5 or does not hold exactly InceptionV3's 94 conv + 94 BatchNorm(scale=False) layers.
    """
    if width != 1.0:
        raise ValueError(f"Keras ImageNet weights fit InceptionV3 at width 1.0 only, not width={width}")
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(errno.ENOENT, "Keras weight file not found", os.fspath(path))
    if not path.is_file() or not h5py.is_hdf5(path):
        raise ValueError(f"{path}: not an HDF5 file")

    try:
        with h5py.File(path, "r") as f:
            root = f["model_weights"] if "layer_names" not in f.attrs and "model_weights" in f else f
            layers = _read_layers(path, root)
    except (OSError, KeyError, TypeError) as e:  # a damaged file: h5py's own errors name no path
        raise ValueError(f"{path}: unreadable Keras weight file ({e})") from e

    expected = keras_weighted_layers()
    if len(layers) != len(expected):
        raise ValueError(
            f"{path}: {len(layers)} layers carry weights, InceptionV3 has {len(expected)} "
            "(94 Conv2D + 94 BatchNormalization; the include_top=False 'notop' file)"
        )

    kernels = keras_kernel_shapes()
    params, batch_stats = {}, {}
    for (index, name, arrays), (module, kind) in zip(layers, expected):
        where = f"{path}: layer {index} ({name})"
        if kind == "Conv2D":
            want = kernels[module]
            if len(arrays) != 1:
                raise ValueError(f"{where}: {len(arrays)} weights where the Conv2D {module} has 1 (kernel)")
            if arrays[0].shape != want:
                raise ValueError(f"{where}: kernel shape {arrays[0].shape} != expected {want}")
            params[module] = {"kernel": arrays[0]}
        else:
            channels = kernels[module.replace("batch_normalization_", "conv2d_")][3]
            if len(arrays) != 3:
                raise ValueError(
                    f"{where}: {len(arrays)} weights where the BatchNormalization {module} has 3 "
                    "(beta, moving_mean, moving_variance; scale=False)"
                )
            for what, array in zip(("beta", "moving_mean", "moving_variance"), arrays):
                if array.shape != (channels,):
                    raise ValueError(f"{where}: {what} shape {array.shape} != expected ({channels},)")
            beta, mean, var = arrays
            if np.any(var < 0):
                raise ValueError(f"{where}: negative moving_variance")
            params[module] = {"bias": beta}
            batch_stats[module] = {"mean": mean, "var": var}
        for array in arrays:
            if not np.all(np.isfinite(array)):
                raise ValueError(f"{where}: non-finite weights")

    as_f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    return {"params": jax.tree.map(as_f32, params), "batch_stats": jax.tree.map(as_f32, batch_stats)}


@functools.partial(jax.jit, static_argnums=0)
def _apply_inference(model, variables, x):
    return model.apply(variables, x.astype(jnp.float32), train=False)


def inception_v3_features(h5_path) -> Callable[[jax.Array], jax.Array]:
    """A jitted function: float32 (N, H, W, 3) in [-1, 1] -> float32 (N, 2048) pooled features.

    Equal to Keras `InceptionV3(include_top=False, pooling="avg")` carrying the weights in `h5_path`,
    in inference mode. The weights are a jit argument, not baked-in constants.
    """
    variables = load_keras_h5(h5_path)
    model = InceptionV3()
    return lambda x: _apply_inference(model, variables, jnp.asarray(x))
