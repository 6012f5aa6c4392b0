"""Fused augmentation (issue 3): colour steps against dm-pix (= tf.image), orientation against NumPy,
counter-based parameter draws, bad input."""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # before jax is imported

import numpy as np
import pytest

import wsitile
from wsitile.augment import AugmentConfig, draw_params

jax = pytest.importorskip("jax")
pix = pytest.importorskip("dm_pix")
jnp = jax.numpy

SEED_RANGES = dict(brightness=(-64 / 255, 64 / 255), saturation=(0.75, 1.25), hue=(-0.04, 0.04),
                   contrast=(0.25, 1.75))
WIDE_RANGES = dict(brightness=(-0.5, 0.5), saturation=(0.0, 2.0), hue=(-0.5, 0.5), contrast=(0.0, 2.0))


@jax.jit
def _dm_pix_colour(x, b, s, h, c):
    """dm-pix's four steps in the seed's order, then the clip; x float32 (N, H, W, 3) in [0, 1]."""

    def one(x, b, s, h, c):
        x = pix.adjust_brightness(x, b)
        x = pix.adjust_saturation(x, s)
        x = pix.adjust_hue(x, h)
        x = pix.adjust_contrast(x, c)
        return jnp.clip(x, 0.0, 1.0)

    return jax.vmap(one)(x, b, s, h, c)


def reference(images: np.ndarray, p: dict) -> np.ndarray:
    """dm-pix colour + NumPy orientation, float32 in [0, 1]; images (N, H, W, 3) or (N, T, H, W, 3)."""
    n = images.shape[0]
    towers = images.shape[1] if images.ndim == 5 else 1
    x = images.reshape(n * towers, *images.shape[-3:]).astype(np.float32) / np.float32(255)
    rep = lambda a: np.repeat(np.asarray(a, np.float32), towers)  # noqa: E731
    y = np.asarray(_dm_pix_colour(x, rep(p["brightness"]), rep(p["saturation"]), rep(p["hue"]), rep(p["contrast"])))
    y = y.reshape(n, towers, *images.shape[-3:])
    out = np.stack([np.stack([np.rot90(np.fliplr(t) if p["flip"][i] else t, int(p["rot90"][i])) for t in y[i]])
                    for i in range(n)])
    return out if images.ndim == 5 else out[:, 0]


def random_params(rng, n: int, ranges: dict) -> dict:
    p = {k: rng.uniform(lo, hi, n).astype(np.float32) for k, (lo, hi) in ranges.items()}
    p["rot90"] = rng.integers(0, 4, n)
    p["flip"] = rng.integers(0, 2, n).astype(bool)
    return p


def identity_params(n: int) -> dict:
    return dict(rot90=np.zeros(n, np.int32), flip=np.zeros(n, bool), brightness=np.zeros(n, np.float32),
                saturation=np.ones(n, np.float32), hue=np.zeros(n, np.float32), contrast=np.ones(n, np.float32))


def random_images(rng, shape) -> np.ndarray:
    """Random pixels plus the awkward ones: black, white, greys, primaries, near-greys."""
    img = rng.integers(0, 256, shape, dtype=np.uint8)
    special = np.array([[0, 0, 0], [255, 255, 255], [128, 128, 128], [255, 0, 0], [0, 255, 0], [0, 0, 255],
                        [255, 255, 0], [0, 255, 255], [255, 0, 255], [200, 201, 200], [3, 2, 3], [254, 255, 255]],
                       np.uint8)
    flat = img.reshape(-1, 3)
    flat[: len(flat) // 4] = special[rng.integers(0, len(special), len(flat) // 4)]
    # a few whole images of one colour (grey or saturated) for the contrast mean / zero-range paths
    img[0] = special[rng.integers(0, len(special))]
    return img


@pytest.mark.parametrize("ranges", [SEED_RANGES, WIDE_RANGES], ids=["seed-ranges", "wide-ranges"])
@pytest.mark.parametrize("side", [24, 17])
def test_matches_dm_pix(ranges, side):
    rng = np.random.default_rng(side + len(str(ranges)))
    n = 48
    images = random_images(rng, (n, side, side, 3))
    p = random_params(rng, n, ranges)
    if ranges is WIDE_RANGES:  # the bounds themselves
        p["hue"][:4] = [-0.5, 0.5, -0.5, 0.5]
        p["saturation"][4:6] = [0.0, 2.0]
        p["contrast"][6:8] = [0.0, 2.0]
        p["brightness"][8:10] = [-0.5, 0.5]
    ref = reference(images, p)
    out = wsitile.augment_batch(images, **p)
    assert out.dtype == np.float32 and out.shape == ref.shape
    assert np.abs(out - ref).max() <= 1e-4
    assert out.min() >= 0.0 and out.max() <= 1.0

    u8 = wsitile.augment_batch(images, **p, out_dtype="uint8")
    assert u8.dtype == np.uint8
    assert np.abs(u8.astype(int) - np.round(ref * 255).astype(int)).max() <= 1

    inc = wsitile.augment_batch(images, **p, out_dtype="inception")
    assert inc.dtype == np.float32
    assert np.abs(inc - (2 * ref - 1)).max() <= 2e-4
    assert inc.min() >= -1.0 and inc.max() <= 1.0


def test_towers_each_their_own_contrast_mean():
    rng = np.random.default_rng(3)
    n, t, side = 12, 2, 20
    images = random_images(rng, (n, t, side, side, 3))
    images[:, 1] //= 3  # tower 1 much darker: a shared mean would be visibly wrong
    p = random_params(rng, n, WIDE_RANGES)
    p["contrast"][:] = rng.uniform(0.2, 0.6, n).astype(np.float32)
    out = wsitile.augment_batch(images, **p)
    assert out.shape == (n, t, side, side, 3)
    ref = reference(images, p)
    assert np.abs(out - ref).max() <= 1e-4
    for k in range(t):  # each tower alone gives the same as its slot in the pair
        alone = wsitile.augment_batch(np.ascontiguousarray(images[:, k]), **p)
        np.testing.assert_array_equal(alone, out[:, k])
    # a mean pooled over both towers would differ
    pooled = reference(images.reshape(n, t * side, side, 3), {**p, "rot90": np.zeros(n, int), "flip": np.zeros(n, bool)})
    assert np.abs(reference(images, {**p, "rot90": np.zeros(n, int), "flip": np.zeros(n, bool)})
                  - pooled.reshape(n, t, side, side, 3)).max() > 0.05


@pytest.mark.parametrize("flip", [False, True])
@pytest.mark.parametrize("rot90", [0, 1, 2, 3])
def test_orientation_matches_numpy(rot90, flip):
    rng = np.random.default_rng(rot90 + 4 * flip)
    n = 3
    images = rng.integers(0, 256, (n, 2, 13, 13, 3), dtype=np.uint8)
    p = identity_params(n)
    p["rot90"][:] = rot90
    p["flip"][:] = flip
    expected = np.rot90(images[:, :, :, ::-1] if flip else images, rot90, axes=(2, 3))
    np.testing.assert_array_equal(wsitile.augment_batch(images, **p, out_dtype="uint8"), expected)
    np.testing.assert_allclose(wsitile.augment_batch(images, **p), expected / np.float32(255), atol=1e-6)
    # and with colour on: orientation commutes with the per-pixel colour and the mean
    q = random_params(rng, n, SEED_RANGES)
    q["rot90"][:] = rot90
    q["flip"][:] = flip
    assert np.abs(wsitile.augment_batch(images, **q) - reference(images, q)).max() <= 1e-4


@pytest.mark.parametrize("side", [1, 2, 3, 5, 31])
def test_all_orientations_with_colour_small_sides(side):
    """The kernel orients u8 pixels with 4-byte moves except for the image's last pixel in memory, which
    lands in a different output row for each orientation: every orientation, uint8 and float32 out."""
    rng = np.random.default_rng(100 + side)
    n = 16
    images = random_images(rng, (n, side, side, 3))
    p = random_params(rng, n, SEED_RANGES)
    p["rot90"] = np.arange(n) % 4
    p["flip"] = (np.arange(n) // 4) % 2 == 1
    ref = reference(images, p)
    assert np.abs(wsitile.augment_batch(images, **p) - ref).max() <= 1e-4
    u8 = wsitile.augment_batch(images, **p, out_dtype="uint8")
    assert np.abs(u8.astype(int) - np.round(ref * 255).astype(int)).max() <= 1


def test_kernel_builds_and_orientation_paths_agree():
    """The kernel is built for SSE2 ("base"), AVX2 + FMA and AVX-512 and the best this CPU runs is
    picked (WSITILE_AUGMENT_ISA caps it); flips and transposes are oriented with byte shuffles in the
    AVX2/AVX-512 builds and with 4-byte moves otherwise (WSITILE_SCALAR_ORIENT forces those). Every
    build and path this machine can run, every orientation, sizes with and without 4 x 4 block
    remainders: the orientation paths give identical bytes, the builds (FMA rounding) within 1e-5 in
    float32 and one step in uint8, and each process says which build it ran."""
    import os
    import subprocess
    import sys
    import tempfile

    import wsitile._core as core

    code = (
        "import numpy as np, sys, wsitile, wsitile._core as core\n"
        "rng = np.random.default_rng(9)\n"
        "out = []\n"
        "for side in (1, 5, 8, 13, 80):\n"
        "    n = 16\n"
        "    images = rng.integers(0, 256, (n, side, side, 3), dtype=np.uint8)\n"
        "    p = dict(rot90=np.arange(n) % 4, flip=(np.arange(n) // 4) % 2 == 1, brightness=rng.uniform(-0.2, 0.2, n),\n"
        "             saturation=rng.uniform(0.7, 1.3, n), hue=rng.uniform(-0.05, 0.05, n), contrast=rng.uniform(0.3, 1.7, n))\n"
        "    p = {k: np.asarray(v, np.float32) if v.dtype.kind == 'f' else v for k, v in p.items()}\n"
        "    out.append(wsitile.augment_batch(images, **p, out_dtype='uint8', threads=1))\n"
        "    out.append(wsitile.augment_batch(images, **p, out_dtype='float32', threads=1))\n"
        "np.savez(sys.argv[1], *out)\n"
        "print(core.augment_kernel_isa())\n"
    )
    best = core.augment_kernel_isa()
    isas = {"avx512": ["avx512", "avx2", "base"], "avx2": ["avx2", "base"], "base": ["base"]}[best]
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for isa in isas:
            for scalar in (False, True):
                env = {k: v for k, v in os.environ.items() if k not in ("WSITILE_SCALAR_ORIENT", "WSITILE_AUGMENT_ISA")}
                env["WSITILE_AUGMENT_ISA"] = isa
                if scalar:
                    env["WSITILE_SCALAR_ORIENT"] = "1"
                path = os.path.join(tmp, f"{isa}{scalar}.npz")
                done = subprocess.run([sys.executable, "-c", code, path], env=env, check=True, timeout=120,
                                      capture_output=True, text=True)
                assert done.stdout.split()[-1] == isa
                with np.load(path, allow_pickle=False) as f:
                    runs[isa, scalar] = [f[k] for k in sorted(f.files, key=lambda k: int(k.split("_")[1]))]
    for (isa, scalar), arrays in runs.items():
        for a, b in zip(arrays, runs[isa, False]):  # orientation paths: the same bytes
            np.testing.assert_array_equal(a, b)
        for a, b in zip(arrays, runs["base", False]):  # builds: rounding only
            if a.dtype == np.uint8:
                assert np.abs(a.astype(int) - b.astype(int)).max() <= 1, isa
            else:
                assert np.abs(a - b).max() <= 1e-5, isa


def test_non_square_even_rotations():
    rng = np.random.default_rng(5)
    images = rng.integers(0, 256, (4, 10, 16, 3), dtype=np.uint8)
    p = random_params(rng, 4, SEED_RANGES)
    p["rot90"] = np.array([0, 2, 0, 2])
    out = wsitile.augment_batch(images, **p)
    assert out.shape == (4, 10, 16, 3)
    assert np.abs(out - reference(images, p)).max() <= 1e-4
    p["rot90"] = np.array([0, 1, 0, 2])
    with pytest.raises(ValueError, match="rot90"):
        wsitile.augment_batch(images, **p)


def test_inception_scaling_exact_on_identity():
    images = np.arange(256, dtype=np.uint8).repeat(3).reshape(1, 16, 16, 3)
    out = wsitile.augment_batch(images, **identity_params(1), out_dtype="inception")
    np.testing.assert_allclose(out, images / 127.5 - 1, atol=1e-6)
    assert out.min() == -1.0 and out.max() == 1.0


def test_threads_do_not_change_results():
    rng = np.random.default_rng(9)
    images = random_images(rng, (37, 2, 16, 16, 3))
    p = random_params(rng, 37, WIDE_RANGES)
    base = wsitile.augment_batch(images, **p, out_dtype="uint8", threads=1)
    for threads in (2, 5, 64):
        np.testing.assert_array_equal(wsitile.augment_batch(images, **p, out_dtype="uint8", threads=threads), base)


def test_output_is_a_new_array():
    images = np.zeros((2, 8, 8, 3), np.uint8)
    out = wsitile.augment_batch(images, **identity_params(2), out_dtype="uint8")
    assert not np.shares_memory(out, images)
    out[:] = 7  # writable and independent
    assert images.max() == 0


def test_non_contiguous_input():
    rng = np.random.default_rng(2)
    big = rng.integers(0, 256, (4, 20, 20, 3), dtype=np.uint8)
    view = big[:, ::2, ::2]
    p = random_params(rng, 4, SEED_RANGES)
    np.testing.assert_array_equal(wsitile.augment_batch(view, **p), wsitile.augment_batch(view.copy(), **p))


# --- random parameters -------------------------------------------------------------------------------


def test_draw_params_deterministic_and_order_free():
    cfg = AugmentConfig()
    idx = np.arange(1000)
    a = draw_params(cfg, seed=42, epoch=3, sample_indices=idx)
    b = draw_params(cfg, seed=42, epoch=3, sample_indices=idx)
    perm = np.random.default_rng(0).permutation(1000)
    c = draw_params(cfg, seed=42, epoch=3, sample_indices=perm)
    parts = [draw_params(cfg, seed=42, epoch=3, sample_indices=idx[i : i + 7]) for i in range(0, 1000, 7)]
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
        np.testing.assert_array_equal(c[k], a[k][perm])
        np.testing.assert_array_equal(np.concatenate([q[k] for q in parts]), a[k])
    other_epoch = draw_params(cfg, seed=42, epoch=4, sample_indices=idx)
    other_seed = draw_params(cfg, seed=43, epoch=3, sample_indices=idx)
    for other in (other_epoch, other_seed):
        assert np.mean(other["brightness"] == a["brightness"]) < 0.01
    assert a["rot90"].dtype == np.int32 and a["flip"].dtype == np.bool_ and a["hue"].dtype == np.float32
    # ready to feed augment_batch
    images = np.zeros((1000, 4, 4, 3), np.uint8)
    assert wsitile.augment_batch(images, **a).shape == (1000, 4, 4, 3)


def test_draw_params_cover_ranges():
    cfg = AugmentConfig()
    p = draw_params(cfg, seed=1, epoch=0, sample_indices=np.arange(10_000))
    bounds = dict(brightness=(-cfg.brightness, cfg.brightness), saturation=(cfg.saturation_lo, cfg.saturation_hi),
                  hue=(-cfg.hue, cfg.hue), contrast=(cfg.contrast_lo, cfg.contrast_hi))
    for k, (lo, hi) in bounds.items():
        v = p[k]
        tol = 0.002 * (hi - lo)
        assert lo <= v.min() <= lo + tol, k
        assert hi - tol <= v.max() <= hi, k
        assert abs(v.mean() - (lo + hi) / 2) < 0.02 * (hi - lo), k
    counts = np.bincount(p["rot90"] + 4 * p["flip"], minlength=8)
    assert counts.shape == (8,) and counts.min() > 0
    expected = 10_000 / 8
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert chi2 < 24.3, counts  # 7 degrees of freedom, p = 0.001


def test_draw_params_switches():
    idx = np.arange(500)
    off = draw_params(AugmentConfig(orientation=False, colour=False), 0, 0, idx)
    for k, v in identity_params(500).items():
        np.testing.assert_array_equal(off[k], v)
    colour_only = draw_params(AugmentConfig(orientation=False), 0, 0, idx)
    assert not colour_only["rot90"].any() and not colour_only["flip"].any()
    assert colour_only["hue"].std() > 0
    orient_only = draw_params(AugmentConfig(colour=False), 0, 0, idx)
    assert len(np.unique(orient_only["rot90"] + 4 * orient_only["flip"])) == 8
    np.testing.assert_array_equal(orient_only["contrast"], 1.0)
    # colour off: the output is the exact oriented copy
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (500, 6, 6, 3), dtype=np.uint8)
    out = wsitile.augment_batch(images, **orient_only, out_dtype="uint8")
    expected = np.stack([np.rot90(np.fliplr(x) if f else x, r)
                         for x, r, f in zip(images, orient_only["rot90"], orient_only["flip"])])
    np.testing.assert_array_equal(out, expected)


def test_config_validation():
    with pytest.raises(ValueError, match="hue"):
        AugmentConfig(hue=0.7)
    with pytest.raises(ValueError, match="saturation"):
        AugmentConfig(saturation_lo=1.5, saturation_hi=1.0)
    with pytest.raises(ValueError, match="contrast"):
        AugmentConfig(contrast_lo=-0.1)
    with pytest.raises(ValueError, match="brightness"):
        AugmentConfig(brightness=float("nan"))


# --- bad input ---------------------------------------------------------------------------------------

N = 4


def _good():
    return dict(images=np.zeros((N, 8, 8, 3), np.uint8), **identity_params(N))


def _call(**kw):
    images = kw.pop("images")
    return wsitile.augment_batch(images, **kw)


@pytest.mark.parametrize(
    "change, exc, name",
    [
        (dict(images=np.zeros((N, 8, 8, 3), np.float32)), TypeError, "images"),
        (dict(images=np.zeros((N, 8, 8, 3), np.uint16)), TypeError, "images"),
        (dict(rot90=np.zeros(N, np.float32)), TypeError, "rot90"),
        (dict(flip=np.zeros(N, np.int64)), TypeError, "flip"),
        (dict(brightness=np.zeros(N, np.int32)), TypeError, "brightness"),
        (dict(saturation=np.array(["a"] * N)), TypeError, "saturation"),
        (dict(images=np.zeros((N, 8, 8), np.uint8)), ValueError, "images"),
        (dict(images=np.zeros((N, 8, 8, 4), np.uint8)), ValueError, "images"),
        (dict(images=np.zeros((N, 1, 1, 8, 8, 3), np.uint8)), ValueError, "images"),
        (dict(images=np.zeros((0, 8, 8, 3), np.uint8)), ValueError, "images"),
        (dict(rot90=np.zeros(N + 1, np.int32)), ValueError, "rot90"),
        (dict(flip=np.zeros(N - 1, bool)), ValueError, "flip"),
        (dict(brightness=np.zeros((N, 1), np.float32)), ValueError, "brightness"),
        (dict(contrast=np.ones(2, np.float32)), ValueError, "contrast"),
        (dict(hue=np.float32(0)), ValueError, "hue"),
        (dict(rot90=np.array([0, 1, 4, 0])), ValueError, "rot90"),
        (dict(rot90=np.array([0, -1, 0, 0])), ValueError, "rot90"),
        (dict(hue=np.array([0, 0.6, 0, 0], np.float32)), ValueError, "hue"),
        (dict(hue=np.array([0, -0.51, 0, 0], np.float32)), ValueError, "hue"),
        (dict(brightness=np.array([0, np.nan, 0, 0], np.float32)), ValueError, "brightness"),
        (dict(saturation=np.array([1, np.inf, 1, 1], np.float32)), ValueError, "saturation"),
        (dict(hue=np.array([np.nan, 0, 0, 0], np.float32)), ValueError, "hue"),
        (dict(contrast=np.array([1, 1, -np.inf, 1], np.float32)), ValueError, "contrast"),
        (dict(saturation=np.array([1, -0.1, 1, 1], np.float32)), ValueError, "saturation"),
        (dict(contrast=np.array([1, 1, -0.5, 1], np.float32)), ValueError, "contrast"),
        (dict(out_dtype="float16"), ValueError, "out_dtype"),
        (dict(threads=0), ValueError, "threads"),
    ],
)
def test_bad_input(change, exc, name):
    kw = {**_good(), **change}
    with pytest.raises(exc, match=name):
        _call(**kw)


def test_good_call_baseline():
    assert _call(**_good()).shape == (N, 8, 8, 3)


def test_thread_counts_are_integers_in_range():
    """threads=2.5 or "2" were truncated or cast; 2**40 reached pybind11's multi-line cast error."""
    n = 4
    x = np.zeros((n, 8, 8, 3), np.uint8)
    kw = dict(rot90=np.zeros(n, np.int32), flip=np.zeros(n, bool), brightness=np.zeros(n, np.float32),
              saturation=np.ones(n, np.float32), hue=np.zeros(n, np.float32), contrast=np.ones(n, np.float32))
    for bad, error in ((2.5, TypeError), ("2", TypeError), (True, TypeError), (0, ValueError), (2**40, ValueError)):
        with pytest.raises(error, match="threads"):
            wsitile.augment_batch(x, threads=bad, **kw)
    assert wsitile.augment_batch(x, threads=np.int64(2), **kw).shape == x.shape


def test_draw_params_seed_and_epoch_in_range():
    """The C++ takes uint64: out-of-range values were pybind11's multi-line cast error."""
    idx = np.arange(3)
    for kw in ({"seed": 2**70, "epoch": 0}, {"seed": 0, "epoch": -1}, {"seed": 1.5, "epoch": 0}):
        with pytest.raises(ValueError, match=next(k for k, v in kw.items() if v not in (0,))):
            draw_params(AugmentConfig(), sample_indices=idx, **kw)
    assert len(draw_params(AugmentConfig(), seed=2**64 - 1, epoch=0, sample_indices=idx)["rot90"]) == 3
