"""Faults while reading (RELIABILITY.md): corrupt tiles, files replaced or deleted under a loader,
worker exceptions, signals, and writes interrupted part-way."""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import tifffile

import wsitile
from wsitile import masks, synth

CORRUPT_PAGE = 2  # level 2: tower 0 of the default (2, 3) towers; the tissue filter reads level 4
CORRUPT_TILE = (3, 4)  # (tx, ty) in 256 px tiles of that level: inside tissue on the seed-7 slide
TILE = 256


def corrupt_one_tile(src, dst, page: int = CORRUPT_PAGE, tile: tuple[int, int] = CORRUPT_TILE) -> None:
    """Copy src to dst with one JPEG tile of `page` overwritten by garbage (the TIFF structure and
    every other tile intact): a bad tile deep in the pyramid."""
    shutil.copy(src, dst)
    with tifffile.TiffFile(dst) as tf:
        p = tf.pages[page]
        tiles_across = -(-p.shape[1] // TILE)
        i = tile[1] * tiles_across + tile[0]
        offset, count = p.dataoffsets[i], p.databytecounts[i]
        assert list(p.dataoffsets).count(offset) == 1  # the tile's bytes are its own
    with open(dst, "r+b") as fh:
        fh.seek(offset)
        fh.write(np.random.default_rng(0).integers(0, 256, size=count, dtype=np.uint8).tobytes())


def epoch(loader: wsitile.Loader) -> list[dict[str, np.ndarray]]:
    return list(loader)


def by_sample(batches) -> dict[int, np.ndarray]:
    return {int(i): b["images"][k] for b in batches for k, i in enumerate(b["sample_index"])}


@pytest.fixture(scope="module")
def slide_path(tumour_slide):
    return str(tumour_slide["slide"])


@pytest.fixture()
def corrupt(slide_path, tmp_path):
    path = tmp_path / "corrupt_tile.tif"
    corrupt_one_tile(slide_path, path)
    return str(path)


def hit_samples(loader: wsitile.Loader) -> set[int]:
    """Samples whose tower-0 window (level 2) overlaps the corrupt tile."""
    x0, y0 = CORRUPT_TILE[0] * TILE, CORRUPT_TILE[1] * TILE
    xy, w = loader.grids[0].xy, loader.window
    hit = (xy[:, 0] < x0 + TILE) & (xy[:, 0] + w > x0) & (xy[:, 1] < y0 + TILE) & (xy[:, 1] + w > y0)
    return set(np.flatnonzero(hit).tolist())


# ---- (a) a corrupt tile deep in the pyramid -------------------------------------------------------


def test_corrupt_tile_raises_naming_slide_and_coordinates(corrupt):
    loader = wsitile.Loader([(corrupt, None)], shuffle=False, threads=2, batch_size=32)
    first = min(hit_samples(loader))
    with pytest.raises(RuntimeError) as info:
        epoch(loader)
    message = str(info.value)
    assert corrupt in message and "level 2" in message and "Not a JPEG file" in message
    # Grid order: the first failing batch holds the first sample over the bad tile, and the message
    # gives level-0 coordinates of that sample's window.
    x, y = (int(v) for v in re.search(r"level-0 \(x, y\) = \((\d+), (\d+)\)", message).groups())
    assert (x, y) in {tuple(loader.grids[0].coords[i]) for i in hit_samples(loader)}
    assert f"sample {first}," in message or any(f"sample {i}," in message for i in hit_samples(loader))
    loader.close()


@pytest.mark.parametrize("threads, cache_mb, shuffle", [(1, 512, False), (2, 0, True), (3, 512, True)])
def test_corrupt_tile_skip_mode(slide_path, corrupt, caplog, threads, cache_mb, shuffle):
    """on_error="skip": exactly the samples over the bad tile are left out (whatever the threads,
    block cache or order), each logged with slide and coordinates; every other sample is pixel for
    pixel what the intact file gives - the slide's handle, killed by the first bad read, was replaced."""
    kwargs = dict(shuffle=shuffle, threads=threads, batch_size=16, cache_mb=cache_mb, seed=5)
    with wsitile.Loader([(slide_path, None)], **kwargs) as clean:
        want = by_sample(epoch(clean))
    loader = wsitile.Loader([(corrupt, None)], on_error="skip", **kwargs)
    hit = hit_samples(loader)
    assert 0 < len(hit) < loader.num_samples // 4
    with caplog.at_level(logging.WARNING, logger="wsitile.loader"):
        batches = epoch(loader)
    got = by_sample(batches)
    assert set(got) == set(want) - hit
    assert loader.num_skipped == len(hit)
    for i, image in got.items():
        np.testing.assert_array_equal(image, want[i], err_msg=f"sample {i}")
    assert all(len(b["labels"]) <= 16 for b in batches) and any(len(b["labels"]) < 16 for b in batches)
    for b in batches:  # the arrays of a shortened batch stay consistent
        assert len({len(b[k]) for k in ("images", "labels", "coords", "slide_index", "sample_index")}) == 1
    logged = [r.getMessage() for r in caplog.records if r.name == "wsitile.loader"]
    assert len(logged) == len(hit)
    coords = loader.grids[0].coords
    for i in hit:
        x, y = coords[i]
        assert any(f"sample {i} of {corrupt} at level-0 ({x}, {y})" in m for m in logged)
    # the next epoch skips the same samples again (the bad tile is still bad)
    assert set(by_sample(epoch(loader))) == set(want) - hit
    loader.close()


def test_skip_mode_with_every_sample_bad(slide_path, tmp_path, caplog):
    """Level 2 entirely garbage: nothing is yielded, every sample is logged, no hang."""
    path = tmp_path / "all_bad.tif"
    shutil.copy(slide_path, path)
    with tifffile.TiffFile(path) as tf:
        spans = list(zip(tf.pages[2].dataoffsets, tf.pages[2].databytecounts))
    with open(path, "r+b") as fh:
        for offset, count in spans:
            fh.seek(offset)
            fh.write(b"\0" * count)
    loader = wsitile.Loader([(path, None)], on_error="skip", threads=2, batch_size=64)
    with caplog.at_level(logging.WARNING, logger="wsitile.loader"):
        assert epoch(loader) == []
    assert loader.num_skipped == loader.num_samples
    loader.close()


def test_truncated_slide_skip_mode_raises_at_open(slide_path, tmp_path):
    """A file cut short: its later directories are gone, so it is no slide at all - even with
    on_error="skip" the loader refuses it when built, naming the file (not a per-sample fault)."""
    path = tmp_path / "truncated.tif"
    shutil.copy(slide_path, path)
    with tifffile.TiffFile(path) as tf:
        cut = tf.pages[2].dataoffsets[32]  # inside level 2's tile data
    os.truncate(path, cut)
    with pytest.raises(ValueError, match=re.escape(str(path))):
        wsitile.Loader([(path, None)], on_error="skip")


def test_on_error_is_checked():
    with pytest.raises(ValueError, match="on_error"):
        wsitile.Loader([("x.tif", None)], on_error="ignore")


# ---- (b) a slide deleted or replaced while a loader reads it -------------------------------------


@pytest.fixture()
def two_files(slide_path, normal_slide, tmp_path):
    """A copy of the tumour slide and a different slide to swap in."""
    path, other = tmp_path / "slide.tif", tmp_path / "other.tif"
    shutil.copy(slide_path, path)
    shutil.copy(normal_slide, other)
    return str(path), str(other)


@pytest.mark.parametrize("cache_mb", [512, 0])
def test_replaced_between_epochs_raises(two_files, cache_mb):
    path, other = two_files
    loader = wsitile.Loader([(path, None)], shuffle=False, threads=2, batch_size=64, cache_mb=cache_mb)
    epoch(loader)  # fills the block cache (cache_mb=512) with the old file's pixels
    os.replace(other, path)
    for _ in range(2):  # and keeps refusing
        with pytest.raises(wsitile.SlideChangedError, match=rf"{re.escape(path)}.*replaced"):
            epoch(loader)
    loader.close()


def test_modified_in_place_between_epochs_raises(two_files):
    path, _ = two_files
    loader = wsitile.Loader([(path, None)], threads=2, batch_size=64)
    epoch(loader)
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    with pytest.raises(wsitile.SlideChangedError, match=rf"{re.escape(path)}.*modified"):
        epoch(loader)
    loader.close()


@pytest.mark.parametrize("decoder", ["auto", "openslide"])  # no block cache: tile parts / read_region per window
@pytest.mark.parametrize("how", ["replace", "delete"])
def test_changed_mid_epoch_never_mixes_files(two_files, slide_path, how, decoder):
    """Batches handed out after the swap were all read before it (identical to the intact file's);
    then the loader raises SlideChangedError naming the slide - never a batch with new pixels."""
    path, other = two_files
    kwargs = dict(shuffle=True, threads=2, batch_size=8, seed=3, cache_mb=0, decoder=decoder)
    with wsitile.Loader([(slide_path, None)], **kwargs) as clean:
        want = by_sample(epoch(clean))
    loader = wsitile.Loader([(path, None)], **kwargs)
    it = iter(loader)
    first = next(it)
    if how == "replace":
        os.replace(other, path)
    else:
        os.unlink(path)
    after = []
    with pytest.raises(wsitile.SlideChangedError, match=re.escape(path)) as info:
        for batch in it:
            after.append(batch)
    assert ("deleted" in str(info.value)) == (how == "delete")
    assert len(after) <= 4  # at most the batches already in flight
    for i, image in by_sample([first, *after]).items():
        np.testing.assert_array_equal(image, want[i], err_msg=f"sample {i}")
    loader.close()


# ---- (c) a worker's exception surfaces in the consumer -------------------------------------------


def test_worker_exception_on_next_and_recovery(corrupt):
    loader = wsitile.Loader([(corrupt, None)], shuffle=False, threads=2, batch_size=32)
    bad = min(hit_samples(loader)) // 32  # first batch holding a sample over the bad tile
    it = iter(loader)
    for _ in range(bad):
        next(it)
    with pytest.raises(RuntimeError, match=re.escape(corrupt)):
        next(it)  # raised in a worker thread, rethrown here
    assert loader.get_state()["index"] == bad * 32  # the position stays at the failed batch
    with pytest.raises(RuntimeError, match=re.escape(corrupt)):
        next(iter(loader))  # a retry raises again instead of hanging
    state = loader.get_state()
    loader.set_state({**state, "index": (max(hit_samples(loader)) // 32 + 1) * 32})
    assert all(len(b["labels"]) for b in loader)  # past the bad tile the loader goes on
    loader.close()


# ---- signals -------------------------------------------------------------------------------------


def test_sigterm_with_handler_stops_iteration_promptly(slide_path):
    script = textwrap.dedent(
        f"""
        import signal, sys, wsitile
        signal.signal(signal.SIGTERM, lambda *a: sys.exit(4))
        loader = wsitile.Loader([({slide_path!r}, None)], tissue_threshold=None, batch_size=256, threads=1,
                                cache_mb=0)
        while True:
            for batch in loader:
                print("batch", flush=True)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "batch"
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)  # hang guard
    assert proc.returncode == 4


# ---- (d) writes are atomic -----------------------------------------------------------------------


def no_temp_files(folder) -> bool:
    return not [p for p in os.listdir(folder) if p.endswith(".tmp")]


def test_write_slide_failing_midway_leaves_no_file(tmp_path, monkeypatch):
    calls = {"n": 0}
    real = synth._level_tiles

    def failing(*args, **kwargs):  # level 0 is written; the writer dies inside level 1 or 2
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk full (simulated)")
        return real(*args, **kwargs)

    monkeypatch.setattr(synth, "_level_tiles", failing)
    path = tmp_path / "slide.tif"
    with pytest.raises(OSError, match="simulated"):
        synth.write_slide(path, 2048, seed=1, tumour=True)
    assert calls["n"] == 2 and os.listdir(tmp_path) == []


def test_failed_rewrite_keeps_previous_files(tmp_path, monkeypatch):
    """Slide, mask and XML already there: a rewrite that fails part-way leaves each previous file."""
    path = tmp_path / "s.tif"
    synth.write_slide(path, 1024, seed=2, tumour=True)
    names = sorted(os.listdir(tmp_path))
    assert names == ["s.tif", "s.xml", "s_mask.tif"]
    before = {n: hashlib.sha256((tmp_path / n).read_bytes()).hexdigest() for n in names}

    def tiles_then_fail(*args, **kwargs):
        yield b"\xff\xd8 partial"
        raise OSError("killed (simulated)")

    monkeypatch.setattr(synth, "_level_tiles", tiles_then_fail)
    with pytest.raises(OSError, match="simulated"):
        synth.write_slide(path, 1024, seed=3, tumour=True)
    monkeypatch.undo()

    def write_then_fail(self, fh, *args, **kwargs):
        fh.write(b"<?xml version='1.0'?><ASAP_Annot")
        raise OSError("killed (simulated)")

    monkeypatch.setattr(ET.ElementTree, "write", write_then_fail)
    with pytest.raises(OSError, match="simulated"):
        masks.write_asap_xml(tmp_path / "s.xml", masks.Annotations(tumour=[[(0, 0), (9, 0), (9, 9)]]))
    assert sorted(os.listdir(tmp_path)) == names  # no temporary file left either
    assert {n: hashlib.sha256((tmp_path / n).read_bytes()).hexdigest() for n in names} == before


def test_cli_extract_failing_write_keeps_previous_npz(tumour_slide, tmp_path, monkeypatch, capsys):
    from wsitile.cli import main

    out = tmp_path / "w.npz"
    args = ["extract", str(tumour_slide["slide"]), "--levels", "3", "4", "--out", str(out)]
    assert main(args) == 0
    before = out.read_bytes()

    def savez_then_fail(fh, **arrays):
        fh.write(b"PK\x03\x04 partial")
        raise RuntimeError("killed (simulated)")

    monkeypatch.setattr(np, "savez", savez_then_fail)
    capsys.readouterr()
    assert main(args) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "simulated" in err
    assert out.read_bytes() == before and no_temp_files(tmp_path)


def test_sigkill_during_write_leaves_old_file(tmp_path):
    """A writer killed with SIGKILL (no cleanup runs) part-way through: the target still holds the
    complete previous file; only a hidden temporary file (.NAME.PID.HEX.tmp) may remain."""
    path = tmp_path / "s.tif"
    synth.write_slide(path, 1024, seed=4, tumour=False)
    before = path.read_bytes()
    script = f"from wsitile.synth import write_slide; write_slide({str(path)!r}, 4096, seed=5, tumour=False)"
    proc = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.monotonic() + 120
    while not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]:
        assert proc.poll() is None and time.monotonic() < deadline, "the writer ended before it was killed"
        time.sleep(0.01)
    time.sleep(0.2)  # well into the temporary file
    proc.kill()
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert path.read_bytes() == before
    leftovers = [p for p in os.listdir(tmp_path) if p != "s.tif"]
    assert all(re.fullmatch(r"\.s\.tif\.\d+\.[0-9a-f]{8}\.tmp", p) for p in leftovers)
    wsitile.Slide(path)  # still a readable slide


def test_sigterm_during_a_cli_write_removes_its_temporary_file(tmp_path):
    """`wsitile synth` stopped with SIGTERM (what `kill` and schedulers send) part-way through a slide:
    it says "interrupted" in one line and exits 130, and leaves no temporary file behind (SIGTERM used
    to end the process at once, leaving .NAME.PID.HEX.tmp files)."""
    out = tmp_path / "slides"
    out.mkdir()
    cmd = [sys.executable, "-m", "wsitile", "synth", str(out), "--slides", "2", "--size", "8192"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not [p for p in os.listdir(out) if p.endswith(".tmp")]:
            assert proc.poll() is None and time.monotonic() < deadline, "synth ended before it was stopped"
            time.sleep(0.01)
        time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err[-2000:]
    assert err.strip().splitlines()[-1] == "wsitile synth: interrupted", err[-2000:]
    assert not [p for p in os.listdir(out) if p.endswith(".tmp")]


def test_fifo_inputs_are_refused_not_waited_on(tumour_slide, tmp_path):
    """A FIFO named as a slide or an annotation file blocked the open for ever: now one error line."""
    fifo = tmp_path / "f.tif"
    os.mkfifo(fifo)
    xml = tmp_path / "f.xml"
    os.mkfifo(xml)
    for args, needle in ((["extract", str(fifo)], "f.tif: not a regular file"),
                         (["extract", str(tumour_slide["slide"]), "--mask", str(xml)], "f.xml: not a regular file")):
        r = subprocess.run([sys.executable, "-m", "wsitile", *args, "--out", str(tmp_path / "o.npz")],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1 and needle in r.stderr, r.stderr


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None or shutil.which("prlimit") is None,
                    reason="needs root to run a child as another user under a thread limit (RLIMIT_NPROC spares root)")
def test_thread_limit_is_an_error_or_fewer_threads_not_an_abort(tumour_slide):
    """Under a process limit (ulimit -u, a cgroup's pids.max) thread creation fails part-way: a Loader
    says so in one error naming the thread count, and augment_batch's fork-join does the chunks it
    could not start on the calling thread (same result). Both used to end in std::terminate (exit 134)."""
    import tempfile

    root = tempfile.mkdtemp(prefix="wsitile-nproc-")
    try:
        os.chmod(root, 0o755)  # the child runs as nobody
        slide = os.path.join(root, "s.tif")
        shutil.copy(tumour_slide["slide"], slide)
        os.chmod(slide, 0o644)
        script = textwrap.dedent(
            f"""
            import numpy as np, wsitile
            from wsitile.augment import augment_batch
            try:
                wsitile.Loader([({slide!r}, None)], threads=64, tissue_threshold=None)
                print("no error")
            except RuntimeError as e:
                print(e)
            n = 100
            rng = np.random.default_rng(0)
            x = rng.integers(0, 256, (n, 40, 40, 3), dtype=np.uint8)
            kw = dict(rot90=rng.integers(0, 4, n).astype(np.int32), flip=rng.random(n) < 0.5,
                      brightness=np.full(n, 0.1, np.float32), saturation=np.full(n, 1.2, np.float32),
                      hue=np.zeros(n, np.float32), contrast=np.ones(n, np.float32))
            print(np.array_equal(augment_batch(x, threads=64, **kw), augment_batch(x, threads=1, **kw)))
            """
        )
        cmd = ["prlimit", "--nproc=20", "setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
               sys.executable, "-c", script]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if r.returncode != 0 and "Permission denied" in r.stderr:
        pytest.skip(f"the interpreter is not readable by nobody: {r.stderr[-200:]}")
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.strip().splitlines()
    assert re.fullmatch(r"cannot start loader worker thread \d+ of 64 \(.+\): use fewer threads", lines[0]), r.stdout
    assert lines[1] == "True", r.stdout


def test_a_failed_write_names_its_file(tmp_path):
    """A full disk's "[Errno 28] No space left on device" alone did not say which file; the error now
    names it, keeps its type and errno, and leaves no temporary file."""
    import errno

    from wsitile.masks import atomic_write

    def full(fh):
        raise OSError(errno.ENOSPC, "No space left on device")

    target = tmp_path / "out.npz"
    with pytest.raises(OSError, match=r"cannot write .*out\.npz: No space left on device") as info:
        atomic_write(target, full)
    assert info.value.errno == errno.ENOSPC and list(tmp_path.iterdir()) == []


def test_files_written_together_land_together_or_not_at_all(tmp_path):
    """masks.written_together: the block's atomic writes are renamed into place when it ends; when it
    fails none of them lands (the files from before stay byte for byte) and no temporary file is left.
    A nested block is settled by the outer one."""
    from wsitile.masks import atomic_write, written_together

    a, b = tmp_path / "a.json", tmp_path / "b.png"
    for path in (a, b):
        path.write_bytes(b"old " + path.name.encode())
    with pytest.raises(OSError, match="No space left"):
        with written_together():
            atomic_write(a, lambda fh: fh.write(b"new a"))
            assert a.read_bytes() == b"old a.json"  # not yet
            atomic_write(b, lambda fh: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device")))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.png"]
    assert (a.read_bytes(), b.read_bytes()) == (b"old a.json", b"old b.png")
    with written_together():
        atomic_write(a, lambda fh: fh.write(b"new a"))
        with written_together():
            atomic_write(b, lambda fh: fh.write(b"new b"))
        assert b.read_bytes() == b"old b.png"  # the outer block settles
    assert (a.read_bytes(), b.read_bytes()) == (b"new a", b"new b")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.png"]
    atomic_write(a, lambda fh: fh.write(b"alone"))  # outside a block: at once
    assert a.read_bytes() == b"alone"
