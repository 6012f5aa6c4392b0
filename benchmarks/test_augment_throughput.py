"""Augmentation throughput (issue 3): wsitile's fused C++ kernel against dm-pix under jax.jit (vmap
over the batch, CPU) and a NumPy implementation, on random window pairs (N, 2, H, W, 3) of 80 and
299 px, with the seed's random parameters (orientation + brightness, saturation, hue, contrast).

All three produce float32 in [0, 1] from uint8 input, colour then orientation, per-tower contrast
means. dm-pix runs in this process (XLA uses every core) and, for the per-core figure the issue asks
for, in a child process pinned to one core (os.sched_setaffinity, the same as `taskset -c 0`).

    pytest benchmarks/test_augment_throughput.py --benchmark-only
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np
import pytest

import wsitile
from wsitile.augment import AugmentConfig, draw_params

from .conftest import RATES, RATIOS, record

SIDES = (80, 299)
BATCH = {80: 256, 299: 24}  # pairs per call
ROUNDS = 5
CORES = len(os.sched_getaffinity(0))


def _name(impl: str, side: int, how: str) -> str:
    return f"augment {side}px {impl} {how}"


for _side in SIDES:
    RATIOS.extend([
        (_name("wsitile", _side, "1 thread"), _name("dm-pix jit", _side, "1 core (pinned)")),
        (_name("wsitile", _side, f"{CORES} threads"), _name("dm-pix jit", _side, f"{CORES} cores")),
        (_name("wsitile", _side, "1 thread"), _name("numpy", _side, "1 thread")),
        (_name("wsitile", _side, f"{CORES} threads"), _name("wsitile", _side, "1 thread")),
        (_name("wsitile", _side, "1 thread, uint8 out"), _name("wsitile", _side, "1 thread")),
    ])


def make_batch(side: int, n: int | None = None):
    n = BATCH[side] if n is None else n
    rng = np.random.default_rng(side)
    images = rng.integers(0, 256, (n, 2, side, side, 3), dtype=np.uint8)
    return images, draw_params(AugmentConfig(), seed=0, epoch=0, sample_indices=np.arange(n))


# --- dm-pix under jax.jit --------------------------------------------------------------------------


def dm_pix_fn():
    import dm_pix as pix
    import jax
    import jax.numpy as jnp

    def orient(x, k):  # the 8 dihedral transforms; vmapped, lax.switch becomes a select
        branches = [lambda y, r=r, f=f: jnp.rot90(jnp.flip(y, axis=-2) if f else y, r, axes=(-3, -2))
                    for f in (False, True) for r in range(4)]
        return jax.lax.switch(k, branches, x)

    def one(x, k, b, s, h, c):  # x: (2, H, W, 3) uint8, one pair
        x = x.astype(jnp.float32) / 255.0
        x = pix.adjust_brightness(x, b)
        x = pix.adjust_saturation(x, s)
        x = pix.adjust_hue(x, h)
        x = pix.adjust_contrast(x, c)  # per tower: spatial axes (-3, -2)
        return orient(jnp.clip(x, 0.0, 1.0), k)

    f = jax.jit(jax.vmap(one))

    def run(images, p):
        return f(images, p["rot90"] + 4 * p["flip"].astype(np.int32), p["brightness"], p["saturation"], p["hue"],
                 p["contrast"]).block_until_ready()

    def prepare(images, p):
        return jax.device_put(images), {k: jax.device_put(v) for k, v in p.items()}

    return run, prepare


def pinned_dm_pix_rate(side: int) -> float:
    """Pairs/s of dm-pix jit in this process (call it in a child pinned to one core)."""
    run, prepare = dm_pix_fn()
    images, p = prepare(*make_batch(side))
    run(images, p)  # compile
    times = []
    for _ in range(ROUNDS):
        t = time.perf_counter()
        run(images, p)
        times.append(time.perf_counter() - t)
    return BATCH[side] / float(np.median(times))


# --- NumPy ----------------------------------------------------------------------------------------


def numpy_augment(images: np.ndarray, p: dict) -> np.ndarray:
    """The same semantics in vectorised NumPy (one HSV round trip for saturation + hue)."""
    col = lambda a: np.asarray(a, np.float32)[:, None, None, None]  # noqa: E731  (N, 1, 1, 1) per pair
    x = images.astype(np.float32) / np.float32(255) + col(p["brightness"])[..., None]
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    v = np.maximum(np.maximum(r, g), b)
    rng = v - np.minimum(np.minimum(r, g), b)
    s = np.where(v > 0, rng / np.where(v > 0, v, 1), 0)
    norm = 1 / (6 * np.where(rng > 0, rng, 1))
    h = np.where(v == g, norm * (b - r) + 2 / 6, norm * (r - g) + 4 / 6)
    h = np.where(v == r, norm * (g - b), h)
    h = np.where(rng > 0, h, 0) + (h < 0)
    s = np.clip(s * col(p["saturation"]), 0, 1)
    dh = ((h + col(p["hue"])) % 1) * 6
    chans = [np.clip(np.abs(dh - 3) - 1, 0, 1), np.clip(2 - np.abs(dh - 2), 0, 1), np.clip(2 - np.abs(dh - 4), 0, 1)]
    x = np.stack([v * (1 - s + s * d) for d in chans], axis=-1)
    m = x.mean(axis=(2, 3), keepdims=True)
    x = np.clip((x - m) * col(p["contrast"])[..., None] + m, 0, 1)
    return np.stack([np.rot90(np.flip(t, axis=-2) if f else t, k, axes=(-3, -2))
                     for t, k, f in zip(x, p["rot90"], p["flip"])])


# --- benchmarks -----------------------------------------------------------------------------------


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("threads", [1, CORES])
def test_wsitile(benchmark, side, threads):
    images, p = make_batch(side)
    out = benchmark.pedantic(lambda: wsitile.augment_batch(images, **p, threads=threads), rounds=ROUNDS,
                             iterations=1, warmup_rounds=1)
    assert out.shape == images.shape and out.dtype == np.float32
    record(benchmark, _name("wsitile", side, "1 thread" if threads == 1 else f"{threads} threads"), len(images))


@pytest.mark.parametrize("side", SIDES)
def test_wsitile_uint8(benchmark, side):
    images, p = make_batch(side)
    benchmark.pedantic(lambda: wsitile.augment_batch(images, **p, out_dtype="uint8", threads=1), rounds=ROUNDS,
                       iterations=1, warmup_rounds=1)
    record(benchmark, _name("wsitile", side, "1 thread, uint8 out"), len(images))


@pytest.mark.parametrize("side", SIDES)
def test_dm_pix_jit(benchmark, side):
    pytest.importorskip("dm_pix")
    run, prepare = dm_pix_fn()
    images, p = make_batch(side)
    dev_images, dev_p = prepare(images, p)
    out = np.asarray(run(dev_images, dev_p))  # compile outside the timing
    np.testing.assert_allclose(out, wsitile.augment_batch(images, **p), atol=1e-4)  # same work
    benchmark.pedantic(run, args=(dev_images, dev_p), rounds=ROUNDS, iterations=1, warmup_rounds=1)
    record(benchmark, _name("dm-pix jit", side, f"{CORES} cores"), len(images))


@pytest.mark.parametrize("side", SIDES)
def test_dm_pix_jit_pinned(benchmark, side):
    """dm-pix in a child process pinned to one core (= `taskset -c 0`); its own timing is recorded."""
    pytest.importorskip("dm_pix")
    root = Path(__file__).resolve().parents[1]
    cpu = min(os.sched_getaffinity(0))
    code = (f"import os; os.sched_setaffinity(0, {{{cpu}}}); "
            f"from benchmarks.test_augment_throughput import pinned_dm_pix_rate; "
            f"import json; print(json.dumps(pinned_dm_pix_rate({side})))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root / "python"), str(root),
                                                         os.environ.get("PYTHONPATH", "")])}
    result = {}

    def child():
        out = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True,
                             check=True)
        result["rate"] = json.loads(out.stdout.strip().splitlines()[-1])

    benchmark.pedantic(child, rounds=1, iterations=1)
    RATES[_name("dm-pix jit", side, "1 core (pinned)")] = result["rate"]
    benchmark.extra_info["samples_per_s"] = result["rate"]


@pytest.mark.parametrize("side", SIDES)
def test_numpy(benchmark, side):
    images, p = make_batch(side)
    out = numpy_augment(images, p)
    np.testing.assert_allclose(out, wsitile.augment_batch(images, **p), atol=1e-4)
    benchmark.pedantic(numpy_augment, args=(images, p), rounds=ROUNDS, iterations=1)
    record(benchmark, _name("numpy", side, "1 thread"), len(images))
