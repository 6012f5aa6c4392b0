"""The Flax InceptionV3 against Keras's application, and the legacy-HDF5 ImageNet-weight import."""

from __future__ import annotations

import functools
import os
import re
import subprocess
import sys

import numpy as np
import pytest

jax = pytest.importorskip("jax")
pytest.importorskip("flax")
h5py = pytest.importorskip("h5py")
os.environ.setdefault("KERAS_BACKEND", "jax")  # before keras is imported; there is no TensorFlow here
keras = pytest.importorskip("keras")
# Keras's own variables trip NumPy 2's __array__(copy=...) deprecation; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
if keras.backend.backend() != "jax":
    pytest.skip("the Keras oracle runs on the JAX backend", allow_module_level=True)

import jax.numpy as jnp  # noqa: E402

from wsitile.models import (  # noqa: E402
    KERAS_LAYER_COUNT,
    InceptionV3,
    inception_v3_features,
    init_variables,
    keras_kernel_shapes,
    keras_layer_index,
    load_keras_h5,
    trainable_mask,
)


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@functools.partial(jax.jit, static_argnames=("model", "train"))
def run(model, variables, x, train=False):
    """model.apply under jit (compiling beats op-by-op dispatch here; Flax modules are hashable, so equal
    models share the compiled code); with train, also returns the updated batch statistics."""
    if train:
        return model.apply(variables, x, train=True, mutable=["batch_stats"])
    return model.apply(variables, x, train=False)


def creation_index(layer) -> int:
    """Keras auto-names layers `conv2d`, `conv2d_1`, ... in creation order."""
    match = re.fullmatch(r"(?:conv2d|batch_normalization)(?:_(\d+))?", layer.name)
    return int(match.group(1) or 0)


# ---------------------------------------------------------------------------------------------------
# Fixtures: one Keras model with random weights (every BN statistic too), saved once in the legacy layout.


def random_kernel(rng, shape):
    """He-scaled, so activations stay O(1) through 94 conv + BN + ReLU layers."""
    return rng.normal(0, np.sqrt(2 / np.prod(shape[:3])), shape).astype(np.float32)


def random_bn(rng, n):
    """beta, moving_mean, moving_variance: small offsets, variances around 1."""
    return [rng.uniform(lo, hi, n).astype(np.float32) for lo, hi in ((-0.1, 0.1), (-0.2, 0.2), (0.5, 1.5))]


@pytest.fixture(scope="module")
def keras_model():
    """keras.applications.InceptionV3(include_top=False, pooling='avg'), weights and BN statistics random."""
    keras.backend.clear_session()  # names restart at conv2d, conv2d_1, ...
    from keras.src.initializers.random_initializers import VarianceScaling

    with pytest.MonkeyPatch.context() as mp:
        # Every value is overwritten below; Keras's own eager draws cost ~15 s of XLA compiles on 2 cores.
        mp.setattr(VarianceScaling, "__call__", lambda self, shape, dtype=None: keras.ops.zeros(shape, dtype))
        model = keras.applications.InceptionV3(
            weights=None, include_top=False, input_shape=(None, None, 3), pooling="avg"
        )
    rng = np.random.default_rng(0)
    for layer in model.layers:
        if isinstance(layer, keras.layers.Conv2D):
            layer.set_weights([random_kernel(rng, layer.kernel.shape)])
        elif isinstance(layer, keras.layers.BatchNormalization):
            layer.set_weights(random_bn(rng, layer.moving_mean.shape[0]))  # order: beta, mean, variance
    return model


@pytest.fixture(scope="module")
def keras_forward(keras_model):
    """x -> (Keras output, {variable path: new non-trainable value}), jitted and stateless."""
    trainable = [v.value for v in keras_model.trainable_variables]
    non_trainable = [v.value for v in keras_model.non_trainable_variables]
    paths = [v.path for v in keras_model.non_trainable_variables]
    steps = {}
    for training in (False, True):
        steps[training] = jax.jit(functools.partial(keras_model.stateless_call, training=training))

    def forward(x, training=False):
        y, stats = steps[training](trainable, non_trainable, x)
        return np.asarray(y), dict(zip(paths, stats))

    return forward


@pytest.fixture(scope="module")
def keras_h5(keras_model, tmp_path_factory):
    """The Keras model's weights, written by Keras's own legacy HDF5 writer."""
    from keras.src.legacy.saving import legacy_h5_format

    path = tmp_path_factory.mktemp("keras") / "inception_v3_notop.h5"
    with h5py.File(path, "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, keras_model)
    return path


@pytest.fixture(scope="module")
def features(keras_h5):
    return inception_v3_features(keras_h5)


def text(names) -> list[str]:
    """An HDF5 list-of-names attribute as str (h5py gives bytes or str depending on how it was written)."""
    return [n.decode() if isinstance(n, bytes) else str(n) for n in names]


def copy_weight_file(src, dst, *, rename=None, drop=None, replace=None):
    """Rewrite a legacy weight file: `rename(name, k)` renames layers (and their weight paths), `drop`
    is a layer name to leave out, `replace` maps a layer name to new weight arrays."""
    rename = rename or (lambda name, k: name)
    with h5py.File(src, "r") as fin, h5py.File(dst, "w") as fout:
        names = [n for n in text(fin.attrs["layer_names"]) if n != drop]
        new_names = [rename(n, k) for k, n in enumerate(names)]
        fout.attrs["layer_names"] = [n.encode() for n in new_names]
        for old, new in zip(names, new_names):
            group = fin[old]
            weight_names = text(group.attrs["weight_names"])
            arrays = [group[w][()] for w in weight_names]
            if replace and old in replace:
                arrays = replace[old]
            out = fout.create_group(new)
            new_weight_names = [new + "/" + w.split("/", 1)[1] + ":0" for w in weight_names]  # Keras 2 style
            new_weight_names += [f"{new}/extra_{j}:0" for j in range(len(arrays) - len(weight_names))]
            out.attrs["weight_names"] = [w.encode() for w in new_weight_names]
            for w, a in zip(new_weight_names, arrays):
                out.create_dataset(w, data=a)


# ---------------------------------------------------------------------------------------------------
# The layer table.


def test_layer_index_matches_keras_model_layers(keras_model):
    layers = keras_model.layers[:-1]  # drop the pooling layer: InceptionV3(include_top=False) has 311
    assert len(layers) == KERAS_LAYER_COUNT == 311
    index = keras_layer_index()
    assert len(index) == 188
    kinds = {"conv2d": keras.layers.Conv2D, "batch_normalization": keras.layers.BatchNormalization}
    # Every Conv2D/BatchNormalization of model.layers is in the table, under its creation-order name.
    for k, layer in enumerate(layers):
        if isinstance(layer, tuple(kinds.values())):
            prefix = "conv2d" if isinstance(layer, keras.layers.Conv2D) else "batch_normalization"
            assert index[f"{prefix}_{creation_index(layer)}"] == k, layer.name
    for name, k in index.items():
        assert isinstance(layers[k], kinds[name.rsplit("_", 1)[0]])
    shapes = keras_kernel_shapes()
    for name, k in index.items():
        if name.startswith("conv2d"):
            assert tuple(layers[k].kernel.shape) == shapes[name], name
    # The Keras recipe's boundary falls inside mixed5, as the seed relies on.
    names = [layer.name for layer in layers]
    assert names.index("mixed4") < 150 < names.index("mixed5")


def test_trainable_mask_matches_keras_recipe(keras_model):
    frozen_keras = [layer.name for layer in keras_model.layers[:150] if layer.weights]
    weighted = [layer.name for layer in keras_model.layers if layer.weights]
    index = keras_layer_index()
    flax_by_order = sorted(index, key=index.get)  # the same layers, in model.layers order
    frozen_flax = {flax_by_order[weighted.index(name)] for name in frozen_keras}

    params = jax.eval_shape(lambda: init_variables(InceptionV3(width=0.25), jax.random.key(0)))["params"]
    mask = trainable_mask(params)
    assert jax.tree.structure(mask) == jax.tree.structure(params)
    for module, leaves in mask.items():
        for leaf in leaves.values():
            assert leaf is (module not in frozen_flax), module
    assert 0 < len(frozen_flax) < 188
    assert all(jax.tree.leaves(trainable_mask(params, boundary=0)))
    # A larger tree (two towers and a head): towers masked layer by layer, the head trainable.
    both = trainable_mask({"tower_a": params, "tower_b": params, "head": {"kernel": 0, "bias": 0}})
    assert both["tower_a"] == mask and both["tower_b"] == mask and all(jax.tree.leaves(both["head"]))


# ---------------------------------------------------------------------------------------------------
# Equality with Keras.


@pytest.mark.parametrize("size, batch", [(80, 4), (299, 1)])
def test_features_match_keras(keras_forward, features, size, batch):
    x = np.random.default_rng(size).uniform(-1, 1, (batch, size, size, 3)).astype(np.float32)
    want, _ = keras_forward(x)
    got = features(x)
    assert got.shape == (batch, 2048) and got.dtype == jnp.float32
    err = rel_err(got, want)
    print(f"relative error at {size}x{size}: {err:.2e}")
    assert err <= 1e-4


def test_training_step_matches_keras(keras_model, keras_forward, keras_h5):
    """train=True: batch statistics normalise (biased variance, epsilon 1e-3) and the moving statistics
    move by momentum 0.99, as Keras's BatchNormalization(training=True) does."""
    x = np.random.default_rng(5).uniform(-1, 1, (4, 80, 80, 3)).astype(np.float32)
    want, keras_stats = keras_forward(x, training=True)
    got, updates = run(InceptionV3(), load_keras_h5(keras_h5), jnp.asarray(x), train=True)
    # Loose on purpose: at 80 px mixed9/10 are 1x1, so each BN there normalises 4 numbers, and Keras's
    # own output moves by ~7e-4 when the input moves by 1e-6. The statistics below are the tight check.
    assert rel_err(got, want) <= 1e-2
    for layer in keras_model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            ours = updates["batch_stats"][f"batch_normalization_{creation_index(layer)}"]
            for key, var in (("mean", layer.moving_mean), ("var", layer.moving_variance)):
                np.testing.assert_allclose(ours[key], keras_stats[var.path], rtol=1e-4, atol=1e-5)


def test_import_ignores_layer_names(keras_forward, keras_h5, features, tmp_path):
    """The same file with Keras 2 names (conv2d_1, ... and `.../kernel:0`), which collide with the Keras 3
    names of *other* layers, imports to the same variables."""

    def keras2_name(name, _k):
        base, _, number = name.rpartition("_")
        if number.isdigit() and base in {"conv2d", "batch_normalization", "activation"}:
            return f"{base}_{int(number) + 1}"
        return f"{name}_1" if name in {"conv2d", "batch_normalization", "activation"} else name

    renamed = tmp_path / "keras2_names.h5"
    copy_weight_file(keras_h5, renamed, rename=keras2_name)
    with h5py.File(renamed) as f:
        assert "conv2d_94" in f and "conv2d" not in f
    a, b = load_keras_h5(keras_h5), load_keras_h5(renamed)
    assert jax.tree.all(jax.tree.map(lambda u, v: np.array_equal(u, v), a, b))
    x = np.random.default_rng(1).uniform(-1, 1, (4, 80, 80, 3)).astype(np.float32)  # as above: no recompile
    got = inception_v3_features(renamed)(x)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(features(x)))
    assert rel_err(got, keras_forward(x)[0]) <= 1e-4


def test_loaded_variables_fit_the_model(keras_h5):
    loaded = load_keras_h5(keras_h5)
    shapes = jax.eval_shape(lambda: init_variables(InceptionV3(), jax.random.key(0)))
    assert jax.tree.structure(loaded) == jax.tree.structure(shapes)
    fits = jax.tree.map(lambda a, s: a.shape == s.shape and a.dtype == jnp.float32, loaded, shapes)
    assert jax.tree.all(fits)


# ---------------------------------------------------------------------------------------------------
# Bad files.


def test_bad_weight_files(keras_h5, tmp_path):
    missing = tmp_path / "nope.h5"
    with pytest.raises(FileNotFoundError, match="nope.h5"):
        load_keras_h5(missing)

    not_h5 = tmp_path / "weights.h5"
    not_h5.write_text("not hdf5")
    with pytest.raises(ValueError, match="weights.h5.*not an HDF5"):
        load_keras_h5(not_h5)

    with pytest.raises(ValueError, match="width"):
        load_keras_h5(keras_h5, width=0.25)

    with h5py.File(keras_h5) as f:
        names = text(f.attrs["layer_names"])
        weighted = [n for n in names if len(f[n].attrs["weight_names"])]

    short = tmp_path / "short.h5"
    copy_weight_file(keras_h5, short, drop=weighted[40])
    with pytest.raises(ValueError, match="short.h5: 187 layers carry weights.*188"):
        load_keras_h5(short)

    # The 17th conv in file order gets a kernel with twice the filters: the error names it.
    conv = [n for n in weighted if n.startswith("conv2d")][17]
    with h5py.File(keras_h5) as f:
        kernel = f[conv][text(f[conv].attrs["weight_names"])[0]][()]
    wide = np.concatenate([kernel, kernel], axis=-1)
    bad = tmp_path / "bad_shape.h5"
    copy_weight_file(keras_h5, bad, replace={conv: [wide]})
    layer = f"layer {names.index(conv)} ({conv})"
    expected = re.escape(f"{layer}: kernel shape {wide.shape} != expected {kernel.shape}")
    with pytest.raises(ValueError, match="bad_shape.h5: " + expected):
        load_keras_h5(bad)

    # A BatchNormalization with a scale (4 weights) is not this network's layer.
    bn = [n for n in weighted if n.startswith("batch_normalization")][3]
    with h5py.File(keras_h5) as f:
        arrays = [f[bn][w][()] for w in text(f[bn].attrs["weight_names"])]
    scaled = tmp_path / "scaled_bn.h5"
    copy_weight_file(keras_h5, scaled, replace={bn: [np.ones_like(arrays[0])] + arrays})
    with pytest.raises(ValueError, match=re.escape(f"layer {names.index(bn)} ({bn}): 4 weights")):
        load_keras_h5(scaled)


# ---------------------------------------------------------------------------------------------------
# Training-time behaviour, on the small variant.


@pytest.fixture(scope="module")
def small_variables():
    """Width-0.25 variables, every value random (so running and batch statistics differ)."""
    shapes = jax.eval_shape(lambda: init_variables(InceptionV3(width=0.25), jax.random.key(0)))
    rng = np.random.default_rng(2)
    params, stats = {}, {}
    for name, leaf in shapes["params"].items():
        if "kernel" in leaf:
            params[name] = {"kernel": random_kernel(rng, leaf["kernel"].shape)}
        else:
            beta, mean, var = random_bn(rng, leaf["bias"].shape[0])
            params[name], stats[name] = {"bias": beta}, {"mean": mean, "var": var}
    return jax.tree.map(jnp.asarray, {"params": params, "batch_stats": stats})


def test_small_variant(small_variables):
    model = InceptionV3(width=0.25)
    assert model.num_features == 512
    x = jnp.asarray(np.random.default_rng(3).uniform(-1, 1, (4, 80, 80, 3)), jnp.float32)
    y = run(model, small_variables, x)
    assert y.shape == (4, 512) and y.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(y)))
    n_params = sum(a.size for a in jax.tree.leaves(small_variables["params"]))
    assert n_params < 21_768_352 / 10  # about width^2 of the full network

    # bfloat16 compute: parameters stay float32, features come back float32 and close.
    bf16 = InceptionV3(width=0.25, dtype=jnp.bfloat16)
    y16 = run(bf16, small_variables, x)
    assert y16.dtype == jnp.float32
    assert rel_err(y16, y) < 0.03  # measured 6e-3


def test_frozen_below(small_variables):
    x = jnp.asarray(np.random.default_rng(4).uniform(-1, 1, (4, 80, 80, 3)), jnp.float32)
    index = keras_layer_index()
    old = small_variables["batch_stats"]

    y, updates = run(InceptionV3(width=0.25, frozen_below=150), small_variables, x, train=True)
    new = updates["batch_stats"]
    for name in old:
        same = all(np.array_equal(old[name][k], new[name][k]) for k in ("mean", "var"))
        assert same == (index[name] < 150), name

    # Everything frozen: train=True computes the inference network and updates nothing.
    everything = InceptionV3(width=0.25, frozen_below=KERAS_LAYER_COUNT)
    y_all, updates = run(everything, small_variables, x, train=True)
    y_inf = run(InceptionV3(width=0.25), small_variables, x)
    assert rel_err(y_all, y_inf) <= 1e-6
    assert jax.tree.all(jax.tree.map(lambda a, b: np.array_equal(a, b), updates["batch_stats"], old))
    # Partly frozen is neither.
    assert rel_err(y, y_inf) > 1e-3


def test_rejects_inputs_keras_rejects():
    model = InceptionV3(width=0.25)
    with pytest.raises(ValueError, match="H, W >= 75"):
        init_variables(model, jax.random.key(0), input_size=74)
    with pytest.raises(ValueError, match="width must be > 0"):
        init_variables(InceptionV3(width=0.0), jax.random.key(0))


def test_import_wsitile_does_not_import_models():
    code = "import sys, wsitile; assert 'wsitile.models' not in sys.modules and 'jax' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
