"""InceptionV3 in Flax, layer for layer `keras.applications.InceptionV3(include_top=False, pooling="avg")`.

The network is written once, in `_inception_graph`, against a tiny "ops" interface. Two backends run it:
`_FlaxOps` computes (inside `InceptionV3.__call__`) and `_Recorder` records the Keras layer graph, from
which we rebuild the order of Keras's `model.layers` (needed to read the ImageNet HDF5 file, whose layers
are matched by that order, and to express the Keras recipe "freeze `model.layers[:150]`").

Submodules are named after Keras's creation order (the suffix Keras gives its auto-named layers):
`conv2d_{i}` / `batch_normalization_{i}`, i = 0..93. Keras's `model.layers` is a *different* order (by
depth from the output), so `keras_layer_index()` maps names to `model.layers` indices.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

# The Keras recipe's boundary: `for layer in model.layers[:150]: layer.trainable = False` (inside mixed5).
KERAS_FREEZE_BOUNDARY = 150


def _inception_graph(net, x):
    """Keras InceptionV3 from the input to `mixed10`, ops called in Keras's creation order.

    `net.conv_bn(x, filters, rows, cols, strides, padding)` is Keras's `conv2d_bn` (Conv2D without bias,
    BatchNormalization without scale, ReLU); filter counts are the width-1 ones.
    """
    x = net.conv_bn(x, 32, 3, 3, strides=2, padding="VALID")
    x = net.conv_bn(x, 32, 3, 3, padding="VALID")
    x = net.conv_bn(x, 64, 3, 3)
    x = net.max_pool(x)
    x = net.conv_bn(x, 80, 1, 1, padding="VALID")
    x = net.conv_bn(x, 192, 3, 3, padding="VALID")
    x = net.max_pool(x)

    # mixed0..2 (35x35 at 299 px); only the pool branch's width changes.
    for pool_filters in (32, 64, 64):
        b1 = net.conv_bn(x, 64, 1, 1)
        b5 = net.conv_bn(x, 48, 1, 1)
        b5 = net.conv_bn(b5, 64, 5, 5)
        b3 = net.conv_bn(x, 64, 1, 1)
        b3 = net.conv_bn(b3, 96, 3, 3)
        b3 = net.conv_bn(b3, 96, 3, 3)
        bp = net.conv_bn(net.avg_pool(x), pool_filters, 1, 1)
        x = net.concat([b1, b5, b3, bp])

    # mixed3: reduction to 17x17.
    b3 = net.conv_bn(x, 384, 3, 3, strides=2, padding="VALID")
    bd = net.conv_bn(x, 64, 1, 1)
    bd = net.conv_bn(bd, 96, 3, 3)
    bd = net.conv_bn(bd, 96, 3, 3, strides=2, padding="VALID")
    x = net.concat([b3, bd, net.max_pool(x)])

    # mixed4..7: factorised 7x7 branches of width c.
    for c in (128, 160, 160, 192):
        b1 = net.conv_bn(x, 192, 1, 1)
        b7 = net.conv_bn(x, c, 1, 1)
        b7 = net.conv_bn(b7, c, 1, 7)
        b7 = net.conv_bn(b7, 192, 7, 1)
        bd = net.conv_bn(x, c, 1, 1)
        bd = net.conv_bn(bd, c, 7, 1)
        bd = net.conv_bn(bd, c, 1, 7)
        bd = net.conv_bn(bd, c, 7, 1)
        bd = net.conv_bn(bd, 192, 1, 7)
        bp = net.conv_bn(net.avg_pool(x), 192, 1, 1)
        x = net.concat([b1, b7, bd, bp])

    # mixed8: reduction to 8x8.
    b3 = net.conv_bn(x, 192, 1, 1)
    b3 = net.conv_bn(b3, 320, 3, 3, strides=2, padding="VALID")
    b7 = net.conv_bn(x, 192, 1, 1)
    b7 = net.conv_bn(b7, 192, 1, 7)
    b7 = net.conv_bn(b7, 192, 7, 1)
    b7 = net.conv_bn(b7, 192, 3, 3, strides=2, padding="VALID")
    x = net.concat([b3, b7, net.max_pool(x)])

    # mixed9, mixed10: expanded filter banks (1x3 and 3x1 side by side).
    for _ in range(2):
        b1 = net.conv_bn(x, 320, 1, 1)
        b3 = net.conv_bn(x, 384, 1, 1)
        b3 = net.concat([net.conv_bn(b3, 384, 1, 3), net.conv_bn(b3, 384, 3, 1)])
        bd = net.conv_bn(x, 448, 1, 1)
        bd = net.conv_bn(bd, 384, 3, 3)
        bd = net.concat([net.conv_bn(bd, 384, 1, 3), net.conv_bn(bd, 384, 3, 1)])
        bp = net.conv_bn(net.avg_pool(x), 192, 1, 1)
        x = net.concat([b1, b3, bd, bp])
    return x


def scaled_filters(filters: int, width: float) -> int:
    """A conv's filter count at `width`: rounded half up, at least 1."""
    return max(1, int(filters * width + 0.5))


# ---------------------------------------------------------------------------------------------------
# The Keras layer graph and the order of Keras's model.layers.


class _Sym(NamedTuple):
    node: int  # index into _Recorder.nodes
    channels: int


class _Recorder:
    """Backend that records one node per Keras layer (Conv2D, BatchNormalization, Activation, ...)."""

    def __init__(self):
        self.nodes: list[tuple[str, str | None, tuple[int, ...]]] = []  # (Keras class, module name, inputs)
        self.kernel_shapes: dict[str, tuple[int, int, int, int]] = {}  # conv name -> HWIO at width 1

    def _add(self, kind, name, inputs, channels):
        self.nodes.append((kind, name, tuple(s.node for s in inputs)))
        return _Sym(len(self.nodes) - 1, channels)

    def input(self):
        self.nodes.append(("InputLayer", None, ()))
        return _Sym(0, 3)

    def conv_bn(self, x, filters, rows, cols, strides=1, padding="SAME"):
        i = len(self.kernel_shapes)
        self.kernel_shapes[f"conv2d_{i}"] = (rows, cols, x.channels, filters)
        x = self._add("Conv2D", f"conv2d_{i}", [x], filters)
        x = self._add("BatchNormalization", f"batch_normalization_{i}", [x], filters)
        return self._add("Activation", None, [x], filters)

    def max_pool(self, x):
        return self._add("MaxPooling2D", None, [x], x.channels)

    def avg_pool(self, x):
        return self._add("AveragePooling2D", None, [x], x.channels)

    def concat(self, xs):
        return self._add("Concatenate", None, xs, sum(s.channels for s in xs))


def _keras_layer_order(nodes, output: int) -> list[int]:
    """Node ids in the order of Keras's `Functional.layers` (keras.src.ops.function.map_graph).

    Keras sorts layers by depth (the longest path to the output, deepest first) and breaks ties by the
    order a depth-first walk from the output, visiting each layer's inputs in order, first reaches them.
    """
    first_seen: dict[int, int] = {}
    post_order: list[int] = []
    done: set[int] = set()
    stack = [(output, False)]
    while stack:  # iterative DFS: the graph is ~300 deep, close to Python's recursion limit
        node, expanded = stack.pop()
        if expanded:
            done.add(node)
            post_order.append(node)
            continue
        if node in done:
            continue
        first_seen.setdefault(node, len(first_seen))
        stack.append((node, True))
        stack.extend((parent, False) for parent in reversed(nodes[node][2]))
    depth = {node: 0 for node in post_order}
    for node in reversed(post_order):  # consumers before producers
        for parent in nodes[node][2]:
            depth[parent] = max(depth[parent], depth[node] + 1)
    return sorted(post_order, key=lambda n: (-depth[n], first_seen[n]))


def _trace_keras_graph():
    rec = _Recorder()
    out = _inception_graph(rec, rec.input())
    order = _keras_layer_order(rec.nodes, out.node)
    return rec, order


_RECORDER, _KERAS_ORDER = _trace_keras_graph()
# Module name -> index in keras.applications.InceptionV3(include_top=False).layers (311 layers).
_KERAS_INDEX: dict[str, int] = {
    _RECORDER.nodes[node][1]: index for index, node in enumerate(_KERAS_ORDER) if _RECORDER.nodes[node][1]
}
KERAS_LAYER_COUNT = len(_KERAS_ORDER)  # 311: include_top=False without the pooling layer


def keras_layer_index() -> dict[str, int]:
    """Flax module name (`conv2d_{i}`, `batch_normalization_{i}`) -> index in Keras's `model.layers`."""
    return dict(_KERAS_INDEX)


def keras_weighted_layers() -> list[tuple[str, str]]:
    """(module name, Keras class) of the 188 layers that carry weights, in Keras's `model.layers` order.

    This is the order of the weight-carrying layers in a Keras legacy HDF5 weight file.
    """
    nodes = [_RECORDER.nodes[n] for n in _KERAS_ORDER]
    return [(name, kind) for kind, name, _ in nodes if name is not None]


def keras_kernel_shapes() -> dict[str, tuple[int, int, int, int]]:
    """Conv module name -> kernel shape (HWIO) at width 1, as in the Keras model."""
    return dict(_RECORDER.kernel_shapes)


def trainable_mask(params, boundary: int = KERAS_FREEZE_BOUNDARY):
    """A pytree of bools shaped like `params`: True where the Keras recipe leaves the layer trainable.

    A leaf belongs to the nearest enclosing module named like an InceptionV3 layer (so `params` may also
    be a larger model's tree that holds InceptionV3 towers); it is trainable iff that layer's Keras index
    is >= `boundary`. Leaves outside any InceptionV3 layer (e.g. a classifier head) are trainable.
    """

    def is_trainable(path, _leaf):
        for key in reversed(path):
            name = getattr(key, "key", getattr(key, "name", None))
            if name in _KERAS_INDEX:
                return _KERAS_INDEX[name] >= boundary
        return True

    return jax.tree_util.tree_map_with_path(is_trainable, params)


# ---------------------------------------------------------------------------------------------------
# Flax.


def _window_counts(size: int) -> np.ndarray:
    """How many of a 3-wide, stride-1, 'same'-padded window's taps fall inside a dimension of `size`."""
    i = np.arange(size)
    return np.minimum(i + 1, size - 1) - np.maximum(i - 1, 0) + 1


class _FlaxOps:
    """Backend that builds the Flax submodules; must be used inside `InceptionV3.__call__`."""

    def __init__(self, module: "InceptionV3", train: bool):
        self.module = module
        self.train = train
        self.count = 0

    def conv_bn(self, x, filters, rows, cols, strides=1, padding="SAME"):
        m, i = self.module, self.count
        self.count += 1
        x = nn.Conv(
            scaled_filters(filters, m.width),
            (rows, cols),
            strides=strides,
            padding=padding,
            use_bias=False,
            dtype=m.dtype,
            kernel_init=nn.initializers.glorot_uniform(),  # Keras's default, for training from scratch
            name=f"conv2d_{i}",
        )(x)
        name = f"batch_normalization_{i}"
        # Below the boundary a BN is frozen the Keras 3 way: inference mode, statistics not updated.
        frozen = _KERAS_INDEX[name] < m.frozen_below
        x = nn.BatchNorm(
            use_running_average=frozen or not self.train,
            momentum=0.99,
            epsilon=1e-3,
            use_scale=False,
            use_bias=True,
            use_fast_variance=False,  # two-pass variance, as Keras (jnp.var): E[x^2]-E[x]^2 cancels
            dtype=m.dtype,
            name=name,
        )(x)
        return nn.relu(x)

    def max_pool(self, x):
        return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")

    def avg_pool(self, x):
        # Keras AveragePooling2D((3, 3), strides=1, padding="same") divides by the number of in-image
        # taps (padding not counted), unlike torchvision's port. Counts are static; dividing in x.dtype
        # keeps bfloat16 activations bfloat16 (flax's avg_pool would promote them to float32).
        # The init value must be a concrete NumPy zero: a traced one (jnp.array inside jit) hides the
        # window sum from JAX, which then cannot differentiate it.
        total = nn.pool(x, np.zeros((), x.dtype), lax.add, (3, 3), (1, 1), "SAME")
        counts = np.outer(_window_counts(x.shape[1]), _window_counts(x.shape[2]))[None, :, :, None]
        return total / jnp.asarray(counts, x.dtype)

    def concat(self, xs):
        return jnp.concatenate(xs, axis=-1)


class InceptionV3(nn.Module):
    """Keras InceptionV3 (include_top=False, pooling="avg") in Flax.

    Attributes:
      width: multiplies every conv's filter count (rounded, >= 1); 1.0 is Keras's network, 0.25 the small
        CPU variant. Only width 1.0 can take ImageNet weights.
      dtype: compute dtype (e.g. jnp.bfloat16 on GPU); parameters and statistics stay float32 and the
        pooled features are returned as float32.
      frozen_below: BatchNorm layers whose Keras layer index is below this always use (and never
        update) their running statistics, like Keras layers with `trainable = False`.

    Call: `apply(variables, x, train=..., mutable=[...])` with x (N, H, W, 3) in [-1, 1], H and W >= 75;
    returns (N, num_features) float32.
    """

    width: float = 1.0
    dtype: Any = jnp.float32
    frozen_below: int = 0

    @property
    def num_features(self) -> int:
        """Length of the pooled feature vector: the channels of mixed10 (2048 at width 1)."""
        return sum(scaled_filters(f, self.width) for f in (320, 384, 384, 384, 384, 192))

    @nn.compact
    def __call__(self, x, train: bool = False):
        if not self.width > 0:
            raise ValueError(f"InceptionV3 width must be > 0, got {self.width}")
        if x.ndim != 4 or x.shape[-1] != 3 or min(x.shape[1:3]) < 75:
            raise ValueError(f"InceptionV3 expects (N, H, W, 3) with H, W >= 75, got {x.shape}")
        x = _inception_graph(_FlaxOps(self, train), x.astype(self.dtype))
        # Global average pooling accumulated in float32.
        return jnp.mean(x.astype(jnp.float32), axis=(1, 2))


def init_variables(model: InceptionV3, rng, input_size: int = 80) -> dict:
    """Random initial {'params', 'batch_stats'} for `model`, shaped as at `input_size` px.

    Keras's initialisers, as `model.init` has them (glorot-uniform kernels, beta 0, moving mean 0,
    moving variance 1), but every kernel is cut from one random draw: XLA on a CPU takes minutes to
    compile 94 separate draws and about a second for one.
    """
    x = jax.ShapeDtypeStruct((1, input_size, input_size, 3), jnp.float32)
    shapes = jax.eval_shape(lambda r, x: model.init(r, x, train=False), jax.random.key(0), x)
    kernels = {name: leaf["kernel"].shape for name, leaf in shapes["params"].items() if "kernel" in leaf}

    @jax.jit
    def draw(rng):
        sizes = [int(np.prod(shape)) for shape in kernels.values()]
        u = jax.random.uniform(rng, (sum(sizes),), jnp.float32, -1.0, 1.0)
        out, offset = {}, 0
        for (name, (h, w, cin, cout)), size in zip(kernels.items(), sizes):
            limit = np.sqrt(6.0 / (h * w * (cin + cout)))  # glorot: fan_in + fan_out = h*w*(cin+cout)
            out[name] = u[offset : offset + size].reshape(h, w, cin, cout) * limit
            offset += size
        return out

    drawn = draw(rng)
    fill = {"bias": jnp.zeros, "mean": jnp.zeros, "var": jnp.ones}

    def initial(path, leaf):
        module, name = path[-2].key, path[-1].key
        return drawn[module] if name == "kernel" else fill[name](leaf.shape, leaf.dtype)

    return {k: jax.tree_util.tree_map_with_path(initial, dict(shapes[k])) for k in ("params", "batch_stats")}
