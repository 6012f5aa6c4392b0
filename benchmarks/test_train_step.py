"""Train-step throughput (issue 4): the jitted two-tower step on whatever device JAX sees, against the
seed's own stack, Keras 3 on its JAX backend (the same two-tower InceptionV3, `train_on_batch` on
device arrays), in the same run. Input is random uint8 already on the device; every layer trains.

    pytest benchmarks/test_train_step.py --benchmark-only                # small model; CPU-sized batches
    WSITILE_BENCH_FULL=1 pytest benchmarks/test_train_step.py --benchmark-only   # + full width and Keras

On a GPU the batches are the issue's (512 pairs at 80 px, 128 at 299 px) and compute is bfloat16
(Keras: mixed_bfloat16); on a CPU they are small and compute is float32.
"""

from __future__ import annotations

import os
import time

os.environ.setdefault("KERAS_BACKEND", "jax")

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

from wsitile.train import Steps, TrainConfig, create_state  # noqa: E402

from .conftest import RATES, RATIOS  # noqa: E402

GPU = jax.default_backend() == "gpu"
FULL = GPU or os.environ.get("WSITILE_BENCH_FULL") == "1"
BATCH = {80: 512, 299: 128} if GPU else {80: 16, 299: 4}
STEPS = 10 if GPU else 3
DEVICE = jax.devices()[0].device_kind

for _side in (80, 299):
    RATIOS.append((f"train step {_side}px full (wsitile)", f"train step {_side}px full (Keras 3 JAX)"))
    RATIOS.append((f"train step {_side}px full frozen<150 (wsitile)", f"train step {_side}px full (wsitile)"))


def _batch(side: int):
    rng = np.random.default_rng(side)
    n = BATCH[side]
    return rng.integers(0, 256, (n, 2, side, side, 3), dtype=np.uint8), (np.arange(n) % 2).astype(np.uint8)


def _record(benchmark, name: str, pairs: int) -> None:
    RATES[name] = pairs / benchmark.stats.stats.median
    benchmark.extra_info.update(pairs_per_s=RATES[name], device=DEVICE)


@pytest.mark.parametrize("side", [80, 299])
@pytest.mark.parametrize("model", ["small", "full", "full frozen<150"])
def test_wsitile_step(benchmark, side, model):
    if model != "small" and not FULL:
        pytest.skip("full width: set WSITILE_BENCH_FULL=1 (or run on a GPU)")
    cfg = TrainConfig(
        window=side, width=0.25 if model == "small" else 1.0, batch_size=BATCH[side],
        fine_tune_from=150 if "frozen" in model else 0, learning_rate=1e-4,
    )
    steps = Steps(cfg)
    state = steps.place_state(create_state(cfg))
    images, labels = _batch(side)
    x, y = steps.place_batch(images), steps.place_batch(labels)
    holder = {"state": steps.train_step(state, x, y)[0]}  # compile
    jax.block_until_ready(holder["state"])

    def run():
        s = holder["state"]
        for _ in range(STEPS):
            s, m = steps.train_step(s, x, y)
        jax.block_until_ready(m["loss"])
        holder["state"] = s

    benchmark.pedantic(run, rounds=3, iterations=1)
    _record(benchmark, f"train step {side}px {model} (wsitile)", STEPS * BATCH[side])


@pytest.mark.parametrize("side", [80, 299])
def test_keras_step(benchmark, side):
    if not FULL:
        pytest.skip("full width: set WSITILE_BENCH_FULL=1 (or run on a GPU)")
    keras = pytest.importorskip("keras")
    if keras.backend.backend() != "jax":
        pytest.skip("Keras must run on its JAX backend (KERAS_BACKEND=jax)")
    if GPU:
        keras.mixed_precision.set_global_policy("mixed_bfloat16")
    inputs, features = [], []
    for t in range(2):
        inp = keras.Input((side, side, 3))
        base = keras.applications.InceptionV3(include_top=False, weights=None, input_shape=(side, side, 3),
                                              pooling="avg", name=f"tower_{t}")
        inputs.append(inp)
        features.append(base(inp))
    out = keras.layers.Dense(1, dtype="float32")(keras.layers.Concatenate()(features))
    model = keras.Model(inputs, out)
    opt = keras.optimizers.RMSprop(learning_rate=1e-4, rho=0.9, momentum=0.9, epsilon=1.0)
    model.compile(optimizer=opt, loss=keras.losses.BinaryCrossentropy(from_logits=True), jit_compile=True)
    images, labels = _batch(side)
    x = [jnp.asarray(images[:, t].astype(np.float32) / 127.5 - 1) for t in range(2)]
    y = jnp.asarray(labels.astype(np.float32))
    model.train_on_batch(x, y)  # compile

    def run():
        for _ in range(STEPS):
            loss = model.train_on_batch(x, y)
        float(np.asarray(loss))

    benchmark.pedantic(run, rounds=3, iterations=1)
    _record(benchmark, f"train step {side}px full (Keras 3 JAX)", STEPS * BATCH[side])
