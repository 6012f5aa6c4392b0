"""Two-tower InceptionV3 training steps on random input already on the device, shared by the pytest
benchmark (benchmarks/test_train_step.py) and the GPU suite (benchmarks/gpu/steps.py).

Each builder compiles nothing itself; it returns `run(n)`, which takes n optimiser steps and waits for
the device, so a caller times `run` after a first warm-up call (the compile).
"""

from __future__ import annotations

import os
from typing import Callable

os.environ.setdefault("KERAS_BACKEND", "jax")  # before anything imports keras

import numpy as np


def random_pairs(side: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (n, 2, side, side, 3), labels uint8 (n,)), fixed per side; never zeros."""
    rng = np.random.default_rng(side)
    return rng.integers(0, 256, (n, 2, side, side, 3), dtype=np.uint8), (np.arange(n) % 2).astype(np.uint8)


def wsitile_step(side: int, batch: int, *, width: float = 1.0, fine_tune_from: int = 0) -> Callable[[int], None]:
    """The project's jitted step (wsitile.train.Steps): bfloat16 compute on a GPU, float32 on a CPU;
    fine_tune_from=0 trains every layer, 150 is the seed's partial fine-tuning."""
    import jax

    from wsitile.train import Steps, TrainConfig, create_state

    cfg = TrainConfig(window=side, width=width, batch_size=batch, fine_tune_from=fine_tune_from, learning_rate=1e-4)
    steps = Steps(cfg)
    images, labels = random_pairs(side, batch)
    x, y = steps.place_batch(images), steps.place_batch(labels)
    holder = {"state": steps.place_state(create_state(cfg))}

    def run(n: int) -> None:
        s = holder["state"]
        for _ in range(n):
            s, metrics = steps.train_step(s, x, y)  # the state is donated: keep only the newest
        jax.block_until_ready(metrics["loss"])
        holder["state"] = s

    # For analysis (benchmarks/gpu/steps.py's study): the step lowered for this state and batch.
    run.lower = lambda: steps.train_step.lower(holder["state"], x, y)  # type: ignore[attr-defined]
    return run


def keras_step(side: int, batch: int, *, bf16: bool) -> Callable[[int], None]:
    """The seed's own stack: Keras 3 on JAX, two keras.applications.InceptionV3 towers (pooled
    features concatenated, one dense logit), RMSprop, jit_compile, `train_on_batch` on device arrays
    already scaled to [-1, 1]. bf16: the `mixed_bfloat16` policy (what a GPU user sets)."""
    import jax.numpy as jnp
    import keras

    if keras.backend.backend() != "jax":
        raise RuntimeError(f"Keras runs on {keras.backend.backend()}: set KERAS_BACKEND=jax before importing it")
    keras.mixed_precision.set_global_policy("mixed_bfloat16" if bf16 else "float32")
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
    images, labels = random_pairs(side, batch)
    x = [jnp.asarray(images[:, t].astype(np.float32) / 127.5 - 1) for t in range(2)]
    y = jnp.asarray(labels.astype(np.float32))

    def run(n: int) -> None:
        for _ in range(n):
            loss = model.train_on_batch(x, y)
        float(np.asarray(loss))  # waits for the device

    return run
