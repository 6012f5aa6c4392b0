"""wsitile.Loader: multi-scale pixels against openslide-python, order, determinism, state, ownership, errors."""

from __future__ import annotations

import math
import os
import re
import shutil
import time

import numpy as np
import openslide
import pytest
import tifffile

import wsitile

KEYS = ("images", "labels", "coords", "slide_index", "sample_index")


# ---- helpers ------------------------------------------------------------------------------------


def openslide_rgb(osr: openslide.OpenSlide, location, level: int, size) -> np.ndarray:
    """OpenSlide's RGBA as RGB: opaque pixels as they are, transparent (outside the slide) white."""
    rgba = np.asarray(osr.read_region((int(location[0]), int(location[1])), int(level), (int(size[0]), int(size[1]))))
    alpha = rgba[..., 3]
    assert np.isin(alpha, (0, 255)).all()
    return np.where((alpha == 255)[..., None], rgba[..., :3], np.uint8(255)).astype(np.uint8)


def tower_placement(x: int, y: int, window: int, d0: float, dt: float) -> tuple[int, int, int, int]:
    """(level-t top-left x, y, level-0 location x, y) of a tower, by the issue's formula."""
    cx, cy = (x + window / 2) * d0, (y + window / 2) * d0
    lx, ly = math.floor(cx / dt - window / 2), math.floor(cy / dt - window / 2)
    return lx, ly, round(lx * dt), round(ly * dt)


def expected_towers(osr: openslide.OpenSlide, x: int, y: int, levels, window: int) -> np.ndarray:
    d = osr.level_downsamples
    out = []
    for lvl in levels:
        _, _, x0, y0 = tower_placement(x, y, window, d[levels[0]], d[lvl])
        out.append(openslide_rgb(osr, (x0, y0), lvl, (window, window)))
    return np.stack(out)


def take(loader: wsitile.Loader, n: int | None = None) -> list[dict[str, np.ndarray]]:
    """The next `n` batches (or the rest of the epoch)."""
    out = []
    for batch in loader:
        out.append(batch)
        if n is not None and len(out) == n:
            break
    return out


def concat(batches, key):
    return np.concatenate([b[key] for b in batches])


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert set(x) == set(KEYS) == set(y)
        for k in KEYS:
            assert x[k].dtype == y[k].dtype
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def check_against_grid(loader: wsitile.Loader, batch) -> None:
    """labels / coords / slide_index of a batch are the grid's for its sample_index."""
    offsets = np.cumsum([0] + [len(g) for g in loader.grids])
    for k, i in enumerate(batch["sample_index"]):
        s = int(np.searchsorted(offsets, i, side="right") - 1)
        g, r = loader.grids[s], int(i - offsets[s])
        assert batch["slide_index"][k] == s
        assert batch["labels"][k] == g.labels[r]
        np.testing.assert_array_equal(batch["coords"][k], g.coords[r])


def check_pixels(loader: wsitile.Loader, batches, osrs, rows) -> int:
    """Compare the images of the (batch, row) pairs `rows` with openslide-python; returns the count."""
    offsets = np.cumsum([0] + [len(g) for g in loader.grids])
    n = 0
    for bi, k in rows:
        b = batches[bi]
        i = int(b["sample_index"][k])
        s = int(b["slide_index"][k])
        x, y = loader.grids[s].xy[i - offsets[s]]
        want = expected_towers(osrs[s], int(x), int(y), loader.levels, loader.window)
        np.testing.assert_array_equal(b["images"][k], want, err_msg=f"sample {i} of slide {s} at level-Lb ({x}, {y})")
        n += 1
    return n


@pytest.fixture(scope="module")
def tumour(tumour_slide):
    return str(tumour_slide["slide"]), str(tumour_slide["mask"])


@pytest.fixture(scope="module")
def osr_tumour(tumour_slide):
    o = openslide.OpenSlide(str(tumour_slide["slide"]))
    yield o
    o.close()


@pytest.fixture(scope="module")
def osr_normal(normal_slide):
    o = openslide.OpenSlide(str(normal_slide))
    yield o
    o.close()


# ---- the placement formula itself ---------------------------------------------------------------


def test_tower_placement_examples():
    # tower 0 is its own window
    assert tower_placement(40, 80, 80, 4.0, 4.0)[:2] == (40, 80)
    # (2, 3): centre (0 + 40) * 4 = 160 level-0 -> level 3: 20 - 40 = -20
    assert tower_placement(0, 0, 80, 4.0, 8.0) == (-20, -20, -160, -160)
    # window 299 at levels (1, 2): (149.5 * 2) / 4 - 149.5 = -74.75 -> floor -75
    assert tower_placement(0, 128, 299, 2.0, 4.0)[:2] == (-75, -11)
    # the engine's own placement agrees
    from wsitile import _core

    for x, y, w, d0, dt in [(0, 0, 80, 4.0, 8.0), (0, 128, 299, 2.0, 4.0), (1920, 1920, 80, 4.0, 8.0), (7, 3, 33, 2.0, 16.0)]:
        assert tuple(_core.place_tower(x, y, w, d0, dt, False)) == tower_placement(x, y, w, d0, dt)


# ---- pixels ------------------------------------------------------------------------------------


def _border_rows(loader, batches):
    """(batch, row) of windows on the slide border (tower 1 sticks out) plus a random sample."""
    offsets = np.cumsum([0] + [len(g) for g in loader.grids])
    rows, rng = [], np.random.default_rng(5)
    for bi, b in enumerate(batches):
        for k, i in enumerate(b["sample_index"]):
            s = int(b["slide_index"][k])
            g = loader.grids[s]
            x, y = g.xy[i - offsets[s]]
            w_l, h_l = loader.grids[s].grid_shape[1], loader.grids[s].grid_shape[0]
            on_border = x == 0 or y == 0 or x == (w_l - 1) * g.stride or y == (h_l - 1) * g.stride
            if on_border or rng.random() < 0.1:
                rows.append((bi, k))
    return rows


@pytest.mark.parametrize("shuffle", [False, True], ids=["grid-order", "shuffled"])
def test_pixels_match_openslide(tumour, osr_tumour, shuffle):
    """Both towers of every border window and of a random tenth of the rest, (2, 3) / 80."""
    loader = wsitile.Loader([tumour], tissue_threshold=None, shuffle=shuffle, batch_size=64, threads=2, seed=3)
    batches = take(loader)
    assert len(batches) == len(loader) == math.ceil(625 / 64)
    for b in batches:
        assert b["images"].shape == (len(b["labels"]), 2, 80, 80, 3) and b["images"].dtype == np.uint8
        check_against_grid(loader, b)
    rows = _border_rows(loader, batches)
    assert check_pixels(loader, batches, [osr_tumour], rows) >= 96 + 40
    # Not vacuous: tower 1 of the corner window really sticks out of the slide (white) and holds pixels.
    first = next(b for b in batches if 0 in b["sample_index"])
    k = int(np.flatnonzero(first["sample_index"] == 0)[0])
    np.testing.assert_array_equal(first["images"][k, 1, :20, :, :], 255)
    assert loader.labels.sum() > 0


@pytest.mark.parametrize("shuffle", [False, True], ids=["grid-order", "shuffled"])
def test_pixels_window_299_levels_1_2(tumour, osr_tumour, shuffle):
    loader = wsitile.Loader(
        [tumour], levels=(1, 2), window=299, center=128, stride=128, tissue_threshold=None,
        shuffle=shuffle, batch_size=16, threads=2, seed=1,
    )
    assert loader.num_samples == 30 * 30
    batches = take(loader, 3)
    rows = [(bi, k) for bi in range(3) for k in range(0, 16, 3)]
    # and the last row of the grid (bottom border), reached through set_state
    loader.set_state({"seed": 1, "epoch": 0, "index": 900 - 32})
    tail = take(loader)
    assert len(tail) == 2 and sum(len(b["labels"]) for b in tail) == 32
    rows += [(3 + bi, k) for bi in range(2) for k in range(0, 16, 2)]
    assert check_pixels(loader, batches + tail, [osr_tumour], rows) == 18 + 16
    for b in batches + tail:
        assert b["images"].shape[1:] == (2, 299, 299, 3)
        check_against_grid(loader, b)
    if not shuffle:  # grid order: the first batch is row 0, whose tower 1 sticks out at the top
        assert (batches[0]["images"][:, 1, :11] == 255).all()
        np.testing.assert_array_equal(tail[-1]["sample_index"], np.arange(884, 900))


@pytest.mark.parametrize("shuffle", [False, True], ids=["grid-order", "shuffled"])
def test_pixels_two_slides_and_single_tower(tumour, normal_slide, osr_tumour, osr_normal, shuffle):
    """Tissue-filtered grids (rows with gaps: strips must break there), two slides, one tower."""
    loader = wsitile.Loader(
        [tumour, (normal_slide, None)], levels=(2,), window=64, center=17, stride=40, batch_size=50, threads=2,
        shuffle=shuffle,
    )
    batches = take(loader)
    assert {0, 1} <= set(concat(batches, "slide_index").tolist())
    assert (concat(batches, "labels")[concat(batches, "slide_index") == 1] == 0).all()
    for b in batches:
        assert b["images"].shape[1:] == (1, 64, 64, 3)
        check_against_grid(loader, b)
    rows = [(bi, k) for bi, b in enumerate(batches) for k in range(0, len(b["labels"]), 7)]
    assert check_pixels(loader, batches, [osr_tumour, osr_normal], rows) > 50


def test_strips_with_overlapping_windows(tumour, osr_tumour):
    """Stride < window in grid order (adjacent windows share pixels in one strip read)."""
    loader = wsitile.Loader([(tumour[0], None)], levels=(2, 4), window=80, center=50, stride=30, batch_size=100,
                            shuffle=False, tissue_threshold=None, threads=2)
    batches = take(loader, 2)
    rows = [(bi, k) for bi in range(2) for k in range(0, 100, 3)]
    assert check_pixels(loader, batches, [osr_tumour], rows) == 68


@pytest.mark.parametrize("shuffle", [False, True], ids=["grid-order", "shuffled"])
def test_cache_size_does_not_change_pixels(tumour, normal_slide, osr_tumour, osr_normal, shuffle):
    """No block cache (0), a tiny one that thrashes and evicts blocks in use (1 MB; in shuffled order
    it is too small, so windows are read one by one) and the default: identical batches, any thread
    count, and the pixels are OpenSlide's."""
    slides = [tumour, (normal_slide, None)]
    kwargs = dict(levels=(2, 3), window=80, center=50, stride=60, tissue_threshold=None, shuffle=shuffle,
                  batch_size=64, seed=8)
    reference = take(wsitile.Loader(slides, threads=1, **kwargs), 6)
    for cache_mb, threads in ((0, 2), (1, 1), (1, 3)):
        loader = wsitile.Loader(slides, threads=threads, cache_mb=cache_mb, **kwargs)
        got = take(loader, 6)
        assert_batches_equal(got, reference)
    rows = [(bi, k) for bi in range(6) for k in range(0, 64, 8)]
    assert check_pixels(loader, got, [osr_tumour, osr_normal], rows) == 48


# ---- epochs, order, shuffling -------------------------------------------------------------------


@pytest.mark.parametrize("batch_size, drop_last", [(64, False), (64, True), (25, False), (25, True), (1000, False), (1000, True)])
def test_len_and_number_of_batches(tumour, batch_size, drop_last):
    loader = wsitile.Loader([tumour], tissue_threshold=None, batch_size=batch_size, drop_last=drop_last, threads=2)
    n = loader.num_samples
    assert n == 625
    expected = n // batch_size if drop_last else math.ceil(n / batch_size)
    assert len(loader) == expected
    batches = take(loader)
    assert len(batches) == expected
    sizes = [len(b["labels"]) for b in batches]
    if drop_last:
        assert all(s == batch_size for s in sizes)
    else:
        assert sum(sizes) == n and all(s == batch_size for s in sizes[:-1])


def test_grid_order_epoch_visits_every_window_once(tumour):
    loader = wsitile.Loader([tumour], shuffle=False, batch_size=37, threads=2)
    batches = take(loader)
    n = loader.num_samples
    assert n == len(loader.grids[0])
    np.testing.assert_array_equal(concat(batches, "sample_index"), np.arange(n))
    np.testing.assert_array_equal(concat(batches, "coords"), loader.grids[0].coords)
    np.testing.assert_array_equal(concat(batches, "labels"), loader.grids[0].labels)
    assert concat(batches, "labels").sum() > 0
    for b in batches:
        assert b["labels"].dtype == np.uint8 and b["coords"].dtype == np.int64
        assert b["slide_index"].dtype == np.int32 and b["sample_index"].dtype == np.int64
        assert b["coords"].shape == (len(b["labels"]), 2)


def test_shuffle_is_a_permutation_per_epoch_and_seeded(tumour):
    def epochs(seed, count=2):
        loader = wsitile.Loader([tumour], shuffle=True, seed=seed, batch_size=64, threads=2)
        out = []
        for _ in range(count):
            batches = take(loader)
            for b in batches:
                check_against_grid(loader, b)
            out.append(concat(batches, "sample_index"))
        return loader.num_samples, out

    n, (e0, e1) = epochs(0)
    for e in (e0, e1):
        np.testing.assert_array_equal(np.sort(e), np.arange(n))
    assert not np.array_equal(e0, np.arange(n))
    assert not np.array_equal(e0, e1)
    _, (f0, f1) = epochs(0)
    np.testing.assert_array_equal(e0, f0)
    np.testing.assert_array_equal(e1, f1)
    _, (g0, _) = epochs(12345)
    assert not np.array_equal(e0, g0)


def test_two_epochs_with_for_loops(tumour):
    loader = wsitile.Loader([tumour], shuffle=False, batch_size=100, threads=2)
    n = loader.num_samples
    first = [b["sample_index"] for b in loader]
    assert loader.get_state()["epoch"] == 1 and loader.get_state()["index"] == 0
    second = [b["sample_index"] for b in loader]
    assert loader.get_state()["epoch"] == 2
    np.testing.assert_array_equal(np.concatenate(first), np.arange(n))
    np.testing.assert_array_equal(np.concatenate(second), np.arange(n))


def test_break_then_iterate_continues_the_epoch(tumour):
    loader = wsitile.Loader([tumour], shuffle=True, batch_size=50, seed=4, threads=2)
    full = concat(take(wsitile.Loader([tumour], shuffle=True, batch_size=50, seed=4, threads=2)), "sample_index")
    head = concat(take(loader, 2), "sample_index")
    rest = concat(take(loader), "sample_index")
    np.testing.assert_array_equal(np.concatenate([head, rest]), full)


# ---- determinism and balance --------------------------------------------------------------------


@pytest.mark.parametrize(
    "shuffle, balanced", [(False, False), (True, False), (True, True), (False, True)],
    ids=["grid-order", "shuffled", "balanced", "balanced-noshuffle"],
)
def test_identical_batches_for_any_thread_count(tumour, normal_slide, shuffle, balanced):
    runs = []
    for threads in (1, 2, 3):
        loader = wsitile.Loader(
            [tumour, (normal_slide, None)], shuffle=shuffle, balanced=balanced, seed=77, batch_size=48, threads=threads
        )
        runs.append(take(loader) + take(loader, 2))  # epoch 0 and the start of epoch 1
    assert_batches_equal(runs[0], runs[1])
    assert_batches_equal(runs[0], runs[2])


def test_balanced_is_about_half_tumour(tumour, normal_slide):
    loader = wsitile.Loader([tumour, (normal_slide, None)], balanced=True, seed=9, batch_size=64, threads=2)
    assert 0 < loader.labels.mean() < 0.1  # tumour windows are rare in the grid
    batches = take(loader) + take(loader)  # two epochs
    labels = concat(batches, "labels")
    assert len(labels) == 2 * loader.num_samples and len(labels) > 700
    assert abs(labels.mean() - 0.5) < 0.08, labels.mean()
    for b in batches:
        check_against_grid(loader, b)
    # every tumour window can be drawn: the tumour draws cover several distinct windows
    si = concat(batches, "sample_index")
    assert len(np.unique(si[labels == 1])) == int(loader.labels.sum())


def test_balanced_without_tumour_raises(normal_slide, tumour):
    with pytest.raises(ValueError, match="tumour"):
        wsitile.Loader([(normal_slide, None)], balanced=True)
    with pytest.raises(ValueError, match="tumour"):
        wsitile.Loader([(tumour[0], None)], balanced=True)


# ---- state --------------------------------------------------------------------------------------


@pytest.mark.parametrize("balanced", [False, True])
def test_state_round_trip_into_new_loader(tumour, normal_slide, balanced):
    kwargs = dict(shuffle=True, balanced=balanced, seed=21, batch_size=40, threads=2)
    a = wsitile.Loader([tumour, (normal_slide, None)], **kwargs)
    take(a, 3)
    state = a.get_state()
    assert state == {"seed": 21, "epoch": 0, "index": 120}
    following = take(a, 4)
    b = wsitile.Loader([tumour, (normal_slide, None)], **{**kwargs, "seed": 0})
    take(b, 1)  # wherever it was
    b.set_state(state)
    assert b.get_state() == state
    assert_batches_equal(take(b, 4), following)


def test_state_across_epoch_boundary(tumour):
    a = wsitile.Loader([tumour], shuffle=True, seed=5, batch_size=64, threads=2)
    take(a)
    take(a, 2)  # two batches into epoch 1
    state = a.get_state()
    assert state["epoch"] == 1 and state["index"] == 128
    rest = take(a)
    nxt = take(a, 1)
    b = wsitile.Loader([tumour], shuffle=True, seed=99, batch_size=64, threads=1)
    b.set_state(state)
    assert_batches_equal(take(b), rest)
    assert_batches_equal(take(b, 1), nxt)


def test_set_state_rejects_bad_state(tumour):
    loader = wsitile.Loader([tumour], batch_size=64, threads=1)
    with pytest.raises(ValueError, match="index"):
        loader.set_state({"seed": 0, "epoch": 0, "index": loader.num_samples + 1})
    with pytest.raises(ValueError, match="epoch"):
        loader.set_state({"seed": 0, "epoch": -1, "index": 0})
    with pytest.raises(ValueError, match="epoch"):
        loader.set_state({"seed": 0, "index": 0})
    with pytest.raises(ValueError, match=r"epoch 1180591620717411303424: out of range"):  # was pybind11's cast error
        loader.set_state({"seed": 0, "epoch": 2**70, "index": 0})
    with pytest.raises(ValueError, match="seed -1"):
        loader.set_state({"seed": -1, "epoch": 0, "index": 0})


def test_path_with_a_nul_byte_is_refused(tumour):
    """C APIs stop at a NUL: 'slide.tif\\0junk' used to open slide.tif."""
    with pytest.raises(ValueError, match="NUL"):
        wsitile.Slide(tumour[0] + "\0junk")


# ---- memory ownership ---------------------------------------------------------------------------


def test_arrays_own_their_memory(tumour):
    loader = wsitile.Loader([tumour], tissue_threshold=None, shuffle=True, batch_size=32, threads=2)
    kept = take(loader, 4)
    copies = [{k: v.copy() for k, v in b.items()} for b in kept]
    for b in kept:
        for k, v in b.items():
            assert not isinstance(v.base, np.ndarray), k
    arrays = [v for b in kept for v in b.values()]
    for i, u in enumerate(arrays):
        for v in arrays[i + 1 :]:
            assert not np.shares_memory(u, v)
    # many later batches (more than the prefetch ring), over two epochs
    later = 0
    for _ in range(2):
        for b in loader:
            later += 1
            for v in b.values():
                for u in arrays:
                    assert not np.shares_memory(u, v)
    assert later > 20
    for b, c in zip(kept, copies):
        for k in KEYS:
            np.testing.assert_array_equal(b[k], c[k], err_msg=k)


def test_batch_survives_loader(tumour):
    loader = wsitile.Loader([tumour], batch_size=16, threads=2)
    batch = take(loader, 1)[0]
    copy = {k: v.copy() for k, v in batch.items()}
    loader.close()
    del loader
    for k in KEYS:
        np.testing.assert_array_equal(batch[k], copy[k])


def test_recycled_memory_shows_no_stale_pixels(tumour, normal_slide, osr_tumour):
    """Closed loaders' block memory (block_cache.cpp's chunk pool) and freed batches (batch_buffers.cpp)
    are recycled without zeroing: a later loader over another slide, with the same batch size, must
    still hand out exactly OpenSlide's pixels in every window, white borders included."""
    for _ in range(2):
        with wsitile.Loader([(normal_slide, None)], tissue_threshold=None, shuffle=False, batch_size=64,
                            threads=2) as other:
            assert sum(len(b["labels"]) for b in other) == other.num_samples
    loader = wsitile.Loader([tumour], tissue_threshold=None, shuffle=False, batch_size=64, threads=2)
    batches = take(loader)
    rows = [(bi, k) for bi, b in enumerate(batches) for k in range(len(b["labels"]))]
    assert check_pixels(loader, batches, [osr_tumour], rows) == loader.num_samples == 625


# ---- close ----------------------------------------------------------------------------------------


def test_close_then_use_raises(tumour):
    loader = wsitile.Loader([tumour], batch_size=16, threads=2)
    take(loader, 2)
    loader.close()
    loader.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        next(iter(loader))
    with wsitile.Loader([tumour], batch_size=16, threads=2) as other:
        take(other, 1)
    with pytest.raises(RuntimeError, match="closed"):
        take(other, 1)


def test_close_mid_epoch_with_pending_work(tumour):
    loader = wsitile.Loader([tumour], levels=(1, 2), window=299, center=128, stride=128, batch_size=64, threads=3)
    it = iter(loader)
    next(it)
    loader.close()  # prefetched batches are being cut: must stop, not hang or crash
    with pytest.raises(RuntimeError):
        next(it)


# ---- several consumers, fork -------------------------------------------------------------------


def test_two_threads_iterating_one_loader_share_its_batches(tumour):
    """Each batch goes to exactly one consumer thread: over 6 epochs every window arrives 6 times,
    with the pixels the single-consumer loader gives it (this crashed: both threads popped one batch)."""
    import threading

    ref = {int(i): img for b in take(wsitile.Loader([tumour], shuffle=False, batch_size=3, threads=2))
           for i, img in zip(b["sample_index"], b["images"])}
    loader = wsitile.Loader([tumour], shuffle=True, batch_size=3, threads=2)
    got: list[list[dict]] = [[], []]
    errors: list[BaseException] = []

    def consume(k: int) -> None:
        try:
            for _ in range(3):
                got[k].extend(loader)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=consume, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads) and not errors, errors
    batches = got[0] + got[1]
    seen = np.concatenate([b["sample_index"] for b in batches])
    np.testing.assert_array_equal(np.bincount(seen, minlength=len(ref)), np.full(len(ref), 6))
    for b in batches:
        for i, img in zip(b["sample_index"], b["images"]):
            np.testing.assert_array_equal(img, ref[int(i)])
    loader.close()


def _child_exit_code(pid: int, timeout: float = 60) -> int | None:
    """The forked child's exit code, or None (and the child killed) if it has not exited in time."""
    deadline = time.monotonic() + timeout
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0:
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            return None
        time.sleep(0.05)
    return os.waitstatus_to_exitcode(done[1])


# ThreadSanitizer does not support starting threads in a child forked from a threaded process.
_TSAN = "libtsan" in os.environ.get("LD_PRELOAD", "")


# The fork is the point of these tests: JAX's warning that forking a process with threads is unsafe
# (another test imported it) is expected here.
_FORK_EXPECTED = pytest.mark.filterwarnings(r"ignore:os\.fork\(\) was called:RuntimeWarning")


@_FORK_EXPECTED
def test_loader_in_a_forked_child_raises_instead_of_hanging(tumour):
    """The worker threads do not survive fork(): the child's next() and close() must not wait for them,
    and a loader made in the child works. (The parent forks between epochs, its workers idle: a fork
    while one holds a library's lock, e.g. OpenSlide's, could hang the child's own new loader.)"""
    loader = wsitile.Loader([tumour], batch_size=64, threads=2)
    take(loader)  # the whole epoch: nothing is scheduled until the next one starts
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report and leave without running the parent's pytest teardown
        code = 1
        try:
            try:
                next(iter(loader))
                msg = "no error"
            except RuntimeError as e:
                msg = str(e)
            loader.close()  # nothing to join here: must return
            del loader
            if not _TSAN:
                other = wsitile.Loader([tumour], batch_size=4, threads=2)  # one made here works
                take(other, 1)
                other.close()
            os.write(w, msg.encode())
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    assert _child_exit_code(pid) == 0, "the child hung or crashed"
    msg = os.read(r, 4096).decode()
    os.close(r)
    assert f"made in process {os.getpid()}" in msg and "forked" in msg, msg
    assert len(take(loader, 1)[0]["labels"]) == 64  # the parent's loader still works
    loader.close()


@_FORK_EXPECTED
def test_loader_collected_in_a_forked_child_without_close(tumour):
    """A child that only drops its copy of the loader (garbage collection, not close()) exits at once."""
    import gc

    loader = wsitile.Loader([tumour], batch_size=64, threads=2)
    take(loader)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            del loader
            gc.collect()
            code = 0
        finally:
            os._exit(code)
    assert _child_exit_code(pid) == 0, "the child hung or crashed"
    loader.close()


# ---- bad input --------------------------------------------------------------------------------


def test_missing_slide_file(tmp_path, tumour):
    path = tmp_path / "missing.tif"
    with pytest.raises(FileNotFoundError, match=re.escape(str(path))):
        wsitile.Loader([tumour, (path, None)])
    # Slides are prepared in parallel with threads > 1: the missing one is still the one named.
    with pytest.raises(FileNotFoundError, match=re.escape(str(path))):
        wsitile.Loader([tumour, (path, None), tumour], threads=3)


def test_slides_prepared_in_parallel_give_each_slides_grid(tumour, normal_slide):
    """With several threads the slides' grids are built concurrently: each is still build_grid's
    grid of its own slide (labels from its mask), in the order given."""
    specs = [tumour, (normal_slide, None), tumour, (normal_slide, None)]
    loader = wsitile.Loader(specs, threads=3)
    for (path, mask), grid in zip(specs, loader.grids):
        expected = wsitile.build_grid(path, mask)
        assert grid.slide == os.fspath(path)
        np.testing.assert_array_equal(grid.xy, expected.xy)
        np.testing.assert_array_equal(grid.labels, expected.labels)
    assert loader.grids[0].labels.sum() > 0


def test_missing_mask_file(tmp_path, tumour):
    path = tmp_path / "missing_mask.tif"
    with pytest.raises(FileNotFoundError, match=re.escape(str(path))):
        wsitile.Loader([(tumour[0], path)])


def test_text_file_named_tif(tmp_path):
    path = tmp_path / "fake.tif"
    path.write_text("hello\n")
    with pytest.raises(ValueError, match=re.escape(str(path))):
        wsitile.Loader([(path, None)])


def test_truncated_slide(tmp_path, tumour):
    path = tmp_path / "truncated.tif"
    shutil.copy(tumour[0], path)
    os.truncate(path, os.path.getsize(path) // 2)
    with pytest.raises(Exception, match=re.escape(str(path))) as info:
        loader = wsitile.Loader([(path, None)], tissue_threshold=None, threads=2)
        take(loader)
    assert isinstance(info.value, (ValueError, RuntimeError, OSError))


def test_corrupt_tiles_raise_at_batch_time(tmp_path, tumour):
    """Level 2's tiles are garbage (level 4, read by the tissue filter, is fine): the batch raises
    naming the slide, from a worker thread, and retrying raises again instead of hanging."""
    path = tmp_path / "corrupt.tif"
    shutil.copy(tumour[0], path)
    with tifffile.TiffFile(path) as tf:
        spans = list(zip(tf.pages[2].dataoffsets, tf.pages[2].databytecounts))
    rng = np.random.default_rng(0)
    with open(path, "r+b") as fh:
        for offset, count in spans:
            fh.seek(offset)
            fh.write(rng.integers(0, 256, size=count, dtype=np.uint8).tobytes())
    loader = wsitile.Loader([(path, None)], threads=2, batch_size=16)
    for _ in range(2):
        with pytest.raises(RuntimeError, match=re.escape(str(path))):
            take(loader, 1)
    loader.close()


def test_level_out_of_range(tumour):
    with pytest.raises(ValueError, match=r"level 7 out of range.*levels 0\.\.4"):
        wsitile.Loader([tumour], levels=(2, 7))


def test_window_larger_than_level(tumour):
    with pytest.raises(ValueError, match=r"window 1100.*level 3 \(1024x1024"):
        wsitile.Loader([tumour], levels=(3, 4), window=1100, center=10)


def test_mask_size_mismatch(tmp_path, tumour):
    path = tmp_path / "other_mask.tif"
    tifffile.imwrite(path, np.zeros((512, 1024), np.uint8), tile=(256, 256), compression="zlib")
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}.*1024x512.*8192x8192"):
        wsitile.Loader([(tumour[0], path)])


def test_malformed_xml_mask(tmp_path, tumour):
    path = tmp_path / "bad.xml"
    path.write_text("<ASAP_Annotations><Annotations><Annotation Name='x'>")
    with pytest.raises(ValueError, match=re.escape(str(path))):
        wsitile.Loader([(tumour[0], path)])


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        (dict(center=81), "center 81"),
        (dict(stride=0), "stride 0"),
        (dict(threads=0), "threads 0"),
        (dict(batch_size=0), "batch_size 0"),
        (dict(batch_size=-2), "batch_size -2"),
        (dict(cache_mb=-1), "cache_mb -1"),
        (dict(seed=-1), "seed -1"),
    ],
)
def test_bad_parameters(tumour, kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        wsitile.Loader([tumour], **kwargs)


def test_empty_slides_list():
    with pytest.raises(ValueError, match="slides"):
        wsitile.Loader([])


def test_bad_slide_spec(tumour):
    with pytest.raises(ValueError, match="slides"):
        wsitile.Loader([(tumour[0], tumour[1], "extra")])


def test_no_windows_after_tissue_filter(tmp_path):
    from wsitile.synth import write_slide

    # windows wholly on tissue, of a slide whose tissue has glass around it: none
    path = tmp_path / "n.tif"
    write_slide(path, 1024, seed=3, tumour=False)
    with pytest.raises(ValueError, match=re.escape(str(path))):
        wsitile.Loader([(path, None)], levels=(0,), window=512, stride=512, tissue_threshold=1.0)
    # a threshold that is not a fraction of the window's area: refused, not "keep none" or "keep all"
    for bad in (1.5, -1, float("nan")):
        with pytest.raises(ValueError, match=rf"tissue_threshold {bad}: must be a fraction of the window's area"):
            wsitile.Loader([(path, None)], levels=(0,), tissue_threshold=bad)


# ---- a slide with inexact downsamples -----------------------------------------------------------


@pytest.fixture(scope="module")
def inexact_slide(tmp_path_factory):
    """A 1500 x 1100 tiled RGB TIFF whose levels are 749 x 549 and 373 x 273 (downsamples ~2.003 and
    ~4.02, not powers of two), with a one-page mask TIFF of tumour rectangles."""
    rng = np.random.default_rng(17)
    h, w = 1100, 1500
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([(xx * 255 // w), (yy * 255 // h), ((xx + yy) % 256)], axis=-1).astype(np.uint8)
    base = (base // 2 + rng.integers(0, 128, size=base.shape, dtype=np.uint8)).astype(np.uint8)
    root = tmp_path_factory.mktemp("inexact")
    path, mask_path = root / "inexact.tif", root / "inexact_mask.tif"
    with tifffile.TiffWriter(path) as tw:
        for k, (lh, lw) in enumerate([(h, w), (549, 749), (273, 373)]):
            ys = np.arange(lh) * h // lh
            xs = np.arange(lw) * w // lw
            tw.write(base[ys][:, xs], tile=(128, 128), photometric="rgb", compression="zlib",
                     subfiletype=1 if k else 0, metadata=None)
    mask = np.zeros((h, w), np.uint8)
    mask[300:420, 500:650] = 255
    mask[900:903, 100:101] = 1
    mask[17, 1333] = 255
    tifffile.imwrite(mask_path, mask, tile=(256, 256), compression="zlib", metadata=None)
    return str(path), str(mask_path), mask > 0


def test_inexact_downsamples_grid(inexact_slide):
    path, mask_path, mask0 = inexact_slide
    slide = wsitile.Slide(path)
    osr = openslide.OpenSlide(path)
    assert slide.level_downsamples == pytest.approx(list(osr.level_downsamples), rel=0, abs=1e-12)
    d1 = slide.level_downsamples[1]
    assert d1 != 2.0
    grid = wsitile.build_grid(slide, mask_path, levels=(1, 2), window=64, center=20, stride=30, tissue_threshold=None)
    np.testing.assert_array_equal(grid.coords, np.rint(grid.xy * d1).astype(np.int64))
    assert not np.array_equal(grid.coords, grid.xy * 2)
    # level-Lb pixel p covers level-0 [round(p d), round((p + 1) d)): the centre square's level-0 rect
    o = (64 - 20) // 2
    want = []
    for x, y in grid.xy:
        x0, x1 = round((x + o) * d1), round((x + o + 20) * d1)
        y0, y1 = round((y + o) * d1), round((y + o + 20) * d1)
        want.append(mask0[y0:y1, x0:x1].any())
    assert 0 < sum(want) < len(want)
    np.testing.assert_array_equal(grid.labels, np.array(want, dtype=np.uint8))
    osr.close()


def _assert_close_to_openslide(got, osr, location, level, size):
    rgba = np.asarray(osr.read_region((int(location[0]), int(location[1])), level, size)).astype(np.int32)
    alpha = rgba[..., 3:]
    solid = (alpha[..., 0] == 0) | (alpha[..., 0] == 255)
    expected = np.where(alpha == 255, rgba[..., :3], 255)
    np.testing.assert_array_equal(got[solid], expected[solid])
    over_white = rgba[..., :3] * alpha / 255.0 + (255 - alpha)
    np.testing.assert_allclose(got[~solid], over_white[~solid], atol=2.5)


@pytest.mark.parametrize("shuffle", [False, True], ids=["grid-order", "shuffled"])
def test_inexact_downsamples_pixels(inexact_slide, shuffle):
    path, mask_path, _ = inexact_slide
    osr = openslide.OpenSlide(path)
    runs = []
    for threads in (1, 3):
        loader = wsitile.Loader([(path, mask_path)], levels=(1, 2), window=64, center=20, stride=30,
                                tissue_threshold=None, shuffle=shuffle, batch_size=32, threads=threads)
        runs.append(take(loader))
    assert_batches_equal(runs[0], runs[1])
    ds = osr.level_downsamples
    checked = 0
    for b in runs[0]:
        check_against_grid(loader, b)
        for k in range(0, len(b["labels"]), 3):
            x, y = loader.grids[0].xy[b["sample_index"][k]]
            for t, lvl in enumerate((1, 2)):
                _, _, x0, y0 = tower_placement(int(x), int(y), 64, ds[1], ds[lvl])
                _assert_close_to_openslide(b["images"][k, t], osr, (x0, y0), lvl, (64, 64))
                checked += 1
    assert checked > 100
    osr.close()


@pytest.mark.parametrize("name, value", [("batch_size", 2.5), ("threads", 1.5), ("seed", "0"), ("cache_mb", True)])
def test_non_integer_arguments_are_rejected(tumour_slide, name, value):
    with pytest.raises(TypeError, match=name):
        wsitile.Loader([(tumour_slide["slide"], None)], **{name: value})
