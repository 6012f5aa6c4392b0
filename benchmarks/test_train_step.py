"""Train-step throughput (issue 4): the jitted two-tower step on whatever device JAX sees, against the
seed's own stack, Keras 3 on its JAX backend (the same two-tower InceptionV3, `train_on_batch` on
device arrays), in the same run. The step builders live in benchmarks/train_steps.py (the GPU suite,
benchmarks/gpu/, runs the same ones). Input is random uint8 already on the device; every layer trains.

    pytest benchmarks/test_train_step.py --benchmark-only                # small model; CPU-sized batches
    WSITILE_BENCH_FULL=1 pytest benchmarks/test_train_step.py --benchmark-only   # + full width and Keras

On a GPU the batches are the issue's (512 pairs at 80 px, 128 at 299 px) and compute is bfloat16
(Keras: mixed_bfloat16); on a CPU they are small and compute is float32.
"""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "jax")

import pytest

jax = pytest.importorskip("jax")

from .conftest import RATIOS, record  # noqa: E402
from .train_steps import keras_step, wsitile_step  # noqa: E402

GPU = jax.default_backend() == "gpu"
FULL = GPU or os.environ.get("WSITILE_BENCH_FULL") == "1"
BATCH = {80: 512, 299: 128} if GPU else {80: 16, 299: 4}
STEPS = 10 if GPU else 3
DEVICE = jax.devices()[0].device_kind

for _side in (80, 299):
    RATIOS.append((f"train step {_side}px full (wsitile)", f"train step {_side}px full (Keras 3 JAX)"))
    RATIOS.append((f"train step {_side}px full frozen<150 (wsitile)", f"train step {_side}px full (wsitile)"))


@pytest.mark.parametrize("side", [80, 299])
@pytest.mark.parametrize("model", ["small", "full", "full frozen<150"])
def test_wsitile_step(benchmark, side, model):
    if model != "small" and not FULL:
        pytest.skip("full width: set WSITILE_BENCH_FULL=1 (or run on a GPU)")
    run = wsitile_step(side, BATCH[side], width=0.25 if model == "small" else 1.0,
                       fine_tune_from=150 if "frozen" in model else 0)
    run(1)  # compile
    benchmark.pedantic(run, args=(STEPS,), rounds=3, iterations=1)
    record(benchmark, f"train step {side}px {model} (wsitile)", STEPS * BATCH[side], device=DEVICE)


@pytest.mark.parametrize("side", [80, 299])
def test_keras_step(benchmark, side):
    if not FULL:
        pytest.skip("full width: set WSITILE_BENCH_FULL=1 (or run on a GPU)")
    keras = pytest.importorskip("keras")
    if keras.backend.backend() != "jax":
        pytest.skip("Keras must run on its JAX backend (KERAS_BACKEND=jax)")
    run = keras_step(side, BATCH[side], bf16=GPU)
    run(1)  # compile
    benchmark.pedantic(run, args=(STEPS,), rounds=3, iterations=1)
    record(benchmark, f"train step {side}px full (Keras 3 JAX)", STEPS * BATCH[side], device=DEVICE)
