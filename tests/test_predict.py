"""`wsitile predict`: the heatmap contract, test-time augmentation, bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

jax = pytest.importorskip("jax")

from wsitile import train  # noqa: E402
from wsitile.cli import main  # noqa: E402
from wsitile.train import TrainConfig  # noqa: E402
from wsitile.predict import predict_slide  # noqa: E402

CFG = TrainConfig(width=0.125, batch_size=8, tissue_threshold=None, stride=160, learning_rate=0.01)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Slides and a run folder holding the checkpoint of step 2, saved as `fit` saves it. Its weights
    are the model's initial ones times seeded noise (1 + N(0, 1)) and the head's times 10, so that the
    windows' probabilities differ (0.65-0.94 over a batch of tumor_001's, against 0.50028-0.50040 for
    the initial weights) and predicting without reading the checkpoint would show. These tests are
    about reading a checkpoint and predicting; compiling the train step for two real steps cost ~50 s
    (`fit`'s checkpoints are test_train's and, read by `predict`, test_demo's)."""
    import dataclasses

    from wsitile.synth import write_slide

    root = tmp_path_factory.mktemp("predict")
    write_slide(root / "tumor_001.tif", 4096, seed=3, tumour=True)
    write_slide(root / "normal_001.tif", 2048, seed=5, tumour=False)
    variables = train.init_variables(CFG)
    rng = np.random.default_rng(0)
    noisy = {k: np.asarray(x) * (10 if k == "head/kernel" else 1 + rng.normal(size=np.shape(x)).astype(np.float32))
             for k, x in train.flat(variables["params"]).items()}
    state = train.create_state(CFG, {"params": train.nested(noisy), "batch_stats": variables["batch_stats"]})
    state = train.steps_for(CFG).place_state(dataclasses.replace(state, step=jax.numpy.asarray(2, jax.numpy.int32)))
    mngr = train.checkpoint_manager(root / "run")
    try:
        train.save_checkpoint(mngr, state, CFG, {"seed": CFG.seed, "epoch": 0, "index": 2 * CFG.batch_size})
    finally:
        mngr.close()
    return root


def test_heatmap_contract_and_tta(run, tmp_path, capsys):
    slide = run / "tumor_001.tif"
    assert main(["predict", str(slide), "--checkpoint", str(run / "run"), "--out", str(tmp_path / "p"),
                 "--batch-size", "16"]) == 0
    assert main(["extract", str(slide), "--mask", str(run / "tumor_001_mask.tif"), "--no-tissue-filter",
                 "--stride", "80", "--out", str(tmp_path / "e.npz")]) == 0
    assert "windows/s" in capsys.readouterr().out
    with np.load(tmp_path / "p" / "heatmap.npz", allow_pickle=False) as h, \
         np.load(tmp_path / "e.npz", allow_pickle=False) as e:
        assert h["coords"].dtype == np.int64 and h["probs"].dtype == np.float32
        np.testing.assert_array_equal(h["coords"], e["coords"])  # stride defaults to the window
        np.testing.assert_array_equal(h["grid_shape"], e["grid_shape"])
        assert list(h["levels"]) == [2, 3] and int(h["window"]) == 80 and int(h["center"]) == 50
        assert int(h["stride"]) == 80 and str(h["slide"]).endswith("tumor_001.tif")
        probs = h["probs"]
        assert ((probs >= 0) & (probs <= 1)).all()
    assert (tmp_path / "p" / "heatmap.png").read_bytes()[:4] == b"\x89PNG"

    # --tta: each probability is the mean of the model over the window pair's 8 dihedral orientations.
    assert main(["predict", str(slide), "--checkpoint", str(run / "run"), "--out", str(tmp_path / "t"),
                 "--batch-size", "16", "--tta"]) == 0
    with np.load(tmp_path / "t" / "heatmap.npz", allow_pickle=False) as h:
        tta = h["probs"]
    cfg, steps, variables = train.load_for_inference(run / "run")
    with np.load(tmp_path / "e.npz", allow_pickle=False) as e:
        pick = np.arange(0, len(e["coords"]), max(1, len(e["coords"]) // 6))[:6]
    from wsitile.loader import Loader

    with Loader([(slide, None)], tissue_threshold=None, shuffle=False, batch_size=4096) as loader:
        images = next(iter(loader))["images"][pick]
    turned = [np.rot90(im, k, axes=(2, 3)) for im in (images, images[:, :, :, ::-1]) for k in range(4)]
    expected = np.mean([steps.predict(variables, np.ascontiguousarray(t)) for t in turned], axis=0)
    np.testing.assert_allclose(tta[pick], expected, atol=2e-5)
    # Without --tta: the model on the window itself (batches are read one behind the device: each
    # probability must still land on its own window).
    np.testing.assert_allclose(probs[pick], steps.predict(variables, images), atol=2e-5)
    assert not np.allclose(tta, probs)


def test_several_slides_in_one_run(run, tmp_path, capsys):
    """`wsitile predict A B --out OUT`: OUT/A/ and OUT/B/, each what predicting that slide alone writes;
    the model is read and compiled once."""
    from wsitile.synth import write_slide

    slides = [run / "tumor_001.tif", tmp_path / "normal_002.tif"]
    write_slide(slides[1], 4096, seed=9, tumour=False)  # the fixture's normal_001 lacks level 3
    ckpt = ["--checkpoint", str(run / "run"), "--batch-size", "16"]
    assert main(["predict", *map(str, slides), *ckpt, "--out", str(tmp_path / "all")]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("wrote ")]
    assert [Path(line.split()[1]).parent.name for line in lines] == ["tumor_001", "normal_002"]
    for slide in slides:
        assert main(["predict", str(slide), *ckpt, "--out", str(tmp_path / "one" / slide.stem)]) == 0
        with np.load(tmp_path / "all" / slide.stem / "heatmap.npz", allow_pickle=False) as a, \
             np.load(tmp_path / "one" / slide.stem / "heatmap.npz", allow_pickle=False) as b:
            assert sorted(a.files) == sorted(b.files)
            for key in a.files:
                np.testing.assert_array_equal(a[key], b[key], err_msg=key)
        assert (tmp_path / "all" / slide.stem / "heatmap.png").read_bytes()[:4] == b"\x89PNG"
    capsys.readouterr()

    # A slide that cannot be opened stops the run naming it, before any slide is predicted.
    bad = tmp_path / "broken.tif"
    bad.write_bytes(b"II*\x00" + bytes(100))
    assert main(["predict", str(slides[0]), str(bad), *ckpt, "--out", str(tmp_path / "early")]) == 1
    err = capsys.readouterr().err
    assert "broken.tif" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "early").exists()
    # One that fails while it is read (level 2's tiles are garbage): the slides before it are complete.
    import tifffile

    corrupt = tmp_path / "corrupt.tif"
    corrupt.write_bytes(slides[1].read_bytes())
    with tifffile.TiffFile(corrupt) as tf:
        spans = list(zip(tf.pages[2].dataoffsets, tf.pages[2].databytecounts))
    with open(corrupt, "r+b") as fh:
        for offset, count in spans:
            fh.seek(offset)
            fh.write(np.random.default_rng(0).integers(0, 256, size=count, dtype=np.uint8).tobytes())
    assert main(["predict", str(slides[0]), str(corrupt), *ckpt, "--out", str(tmp_path / "stopped")]) == 1
    err = capsys.readouterr().err
    assert "corrupt.tif" in err and len(err.strip().splitlines()) == 1, err
    assert (tmp_path / "stopped" / "tumor_001" / "heatmap.png").exists()
    assert not (tmp_path / "stopped" / "corrupt" / "heatmap.npz").exists()
    # Two slides of the same name would share a folder: refused before anything runs.
    twin = tmp_path / "twin"
    twin.mkdir()
    (twin / "tumor_001.tif").write_bytes(slides[0].read_bytes())
    assert main(["predict", str(slides[0]), str(twin / "tumor_001.tif"), *ckpt, "--out", str(tmp_path / "twins")]) == 1
    err = capsys.readouterr().err
    assert "two slides named 'tumor_001'" in err and not (tmp_path / "twins").exists()


def test_compiled_from_shapes_while_the_checkpoint_is_read(run, caplog):
    """`predict`'s start: the shapes saved with the checkpoint are the model's (as tracing it gives
    them); the step compiled from them is the one the restored arrays run (no second compile), and
    restoring with that target reads the same arrays as restoring without one."""
    import logging

    run_dir, step, cfg = train.checkpoint_config(run / "run")
    steps = train.steps_for(cfg)
    target = train.inference_target(cfg, steps, train.read_checkpoint_meta(run_dir, step))
    traced = train.inference_target(cfg, steps)  # a checkpoint without saved shapes (older wsitile)
    assert jax.tree.structure(target) == jax.tree.structure(traced)
    for a, b in zip(jax.tree.leaves(target), jax.tree.leaves(traced), strict=True):
        assert isinstance(a, jax.ShapeDtypeStruct) and (a.shape, a.dtype, a.sharding) == (b.shape, b.dtype, b.sharding)
    images = np.random.default_rng(0).integers(0, 256, (5, len(cfg.levels), cfg.window, cfg.window, 3), np.uint8)
    with jax.log_compiles(), caplog.at_level(logging.WARNING):
        compiled_step = steps.compile_predict(target, 7)  # a batch shape no other test compiles
        compiled = [r for r in caplog.records if "Compiling" in r.getMessage()]
        _, variables = train.restore_for_inference(run_dir, step, cfg, target)
        probs = np.asarray(steps.predict_async(variables, images, step=compiled_step, pad_to=7))[:5]
        again = [r for r in caplog.records if "Compiling" in r.getMessage()]
    assert len(compiled) == 1 and len(again) == 1, [r.getMessage()[:80] for r in again]
    _, fresh = train.restore_for_inference(run_dir, step, cfg)
    for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(fresh), strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(probs, steps.predict(fresh, images, pad_to=7), atol=1e-6)


def test_checkpoint_config_and_shapes_start_no_backend(run):
    """predict reads the config and shapes, opens the slide's grid and starts reading the arrays
    before JAX's backend starts (CUDA's start then runs beside them): orbax's CheckpointManager
    would start it. In a fresh process, since this one's backend is up."""
    import subprocess
    import sys

    code = (
        "from jax._src import xla_bridge\n"  # private, but the only way to ask
        "from wsitile.training.checkpoints import checkpoint_config, read_checkpoint_meta, saved_shapes\n"
        f"run_dir, step, cfg = checkpoint_config({str(run / 'run')!r})\n"
        "shapes = saved_shapes(read_checkpoint_meta(run_dir, step))\n"
        "assert shapes is not None and cfg.width == 0.125, (shapes, cfg)\n"
        "assert not xla_bridge.backends_are_initialized()\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    run_dir, step, cfg = train.checkpoint_config(run / "run")
    assert step == train.find_checkpoint(run / "run")[1] == 2  # the latest (the only) one
    shapes = train.saved_shapes(train.read_checkpoint_meta(run_dir, step))
    host = train.read_model_arrays(run_dir, step, cfg, shapes)
    _, placed = train.restore_for_inference(run_dir, step, cfg)
    for a, b in zip(jax.tree.leaves(host), jax.tree.leaves(placed), strict=True):
        assert isinstance(a, np.ndarray)
        np.testing.assert_array_equal(a, np.asarray(b))


def test_exported_steps_compute_what_the_steps_do(run, tmp_path, monkeypatch):
    """With the compilation cache on, `compile_predict` compiles the step's jax.export artifact (the
    plain and the 8-orientation one); read back from the cache it gives what the jitted steps give."""
    pytest.importorskip("flatbuffers")
    from wsitile.training import exported
    from wsitile.training.steps import Steps

    monkeypatch.setattr(exported, "cache_folder", lambda: tmp_path)
    cfg, steps, variables = train.load_for_inference(run / "run")
    images = np.random.default_rng(1).integers(0, 256, (3, len(cfg.levels), cfg.window, cfg.window, 3), np.uint8)
    for tta, direct in ((False, steps.predict_step), (True, steps.tta_step)):
        expected = np.asarray(steps.predict_async(variables, images, step=direct, pad_to=4))[:3]
        for owner in (Steps(cfg), Steps(cfg)):  # exported, then read back (a new Steps: nothing kept in memory)
            step = owner.compile_predict(variables, 4, tta=tta)
            assert owner.compile_predict(variables, 4, tta=tta) is step  # the next slide's call: kept
            np.testing.assert_allclose(np.asarray(owner.predict_async(variables, images, step=step, pad_to=4))[:3],
                                       expected, atol=1e-6)
    assert len(list(tmp_path.glob("*.exported"))) == 2


def test_default_batch_size_follows_the_device(monkeypatch):
    from wsitile import predict

    assert (predict.default_batch_size(80), predict.default_batch_size(80, tta=True)) == (64, 8)  # this CPU
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert [predict.default_batch_size(w) for w in (80, 128, 129, 299)] == [512, 512, 256, 256]
    assert [predict.default_batch_size(w, tta=True) for w in (80, 299)] == [64, 32]  # 8 orientations each


def test_bad_input(run, tmp_path, capsys):
    ckpt = str(run / "run")
    for args, needle in (
        (["predict", str(run / "missing.tif"), "--checkpoint", ckpt, "--out", str(tmp_path / "a")], "missing.tif"),
        (["predict", str(run / "normal_001.tif"), "--checkpoint", str(run), "--out", str(tmp_path / "b")],
         "not a wsitile run directory"),
    ):
        assert main(args) == 1
        err = capsys.readouterr().err
        assert needle in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_checkpoint_that_does_not_fit_the_model(run, tmp_path, capsys):
    """A checkpoint whose saved shapes are not this model's (here: its config edited to another
    width) fails in one line naming the checkpoint, before any file is written."""
    import json
    import shutil

    edited = tmp_path / "edited"
    shutil.copytree(run / "run" / "checkpoints", edited / "checkpoints")
    (meta_file,) = edited.glob("checkpoints/*/meta/metadata")
    meta = json.loads(meta_file.read_text())
    meta["config"]["width"] = 0.25  # the arrays are width 0.125's
    for old_style in (False, True):  # True: as written before checkpoints held their shapes
        if old_style:
            del meta["variables"]
        meta_file.write_text(json.dumps(meta))
        out = tmp_path / "p"
        assert main(["predict", str(run / "tumor_001.tif"), "--checkpoint", str(edited), "--out", str(out)]) == 1
        err = capsys.readouterr().err
        assert "does not match the model" in err and str(meta_file.parent.parent) in err, (old_style, err)
        assert len(err.strip().splitlines()) == 1 and not out.exists()


def test_damaged_checkpoint_says_so(run, tmp_path):
    """A checkpoint whose array files are truncated (a copy cut short) fails in one line that says it
    cannot be read, not that it "does not match the model", and nothing else is printed (orbax's
    thread logs and TensorStore's closed-loop callbacks print from their own threads: a real process
    shows them, pytest's capture would not)."""
    import os
    import shutil
    import subprocess
    import sys

    damaged = tmp_path / "damaged"
    shutil.copytree(run / "run" / "checkpoints", damaged / "checkpoints")
    data = [f for f in damaged.glob("checkpoints/*/state/ocdbt.process_*/d/*") if f.stat().st_size > 1000]
    assert data
    for f in data:
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    out = tmp_path / "p"
    done = subprocess.run([sys.executable, "-m", "wsitile", "predict", str(run / "tumor_001.tif"), "--checkpoint",
                           str(damaged), "--out", str(out)], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, WSITILE_COMPILE_CACHE="off"))
    err = done.stderr
    assert done.returncode == 1 and err.count("\n") == 1 and err.startswith("wsitile predict: error:"), err[-3000:]
    assert "cannot be read (a damaged or incomplete checkpoint?)" in err and str(damaged) in err, err
    assert not out.exists()


def test_a_checkpoint_that_cannot_be_written_is_one_error_naming_it(run, tmp_path):
    """A save that cannot write its files (a full disk; here the file-size limit, which fails the same
    writes with EFBIG) raises one OSError naming the checkpoints folder and the OS's reason, leaves no
    orbax temporary folder, and prints none of the tracebacks orbax logs from its writer threads (a
    full disk printed ~140 lines around the CLI's one)."""
    import subprocess
    import sys

    full = tmp_path / "full"
    script = f"""
import resource, signal
from pathlib import Path
from wsitile import train
run_dir, step = train.find_checkpoint({str(run / "run")!r})
cfg = train.TrainConfig.from_json(train.read_checkpoint_meta(run_dir, step)["config"])
state, meta = train.restore_checkpoint(run_dir, step, cfg, train.steps_for(cfg))
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of being killed
resource.setrlimit(resource.RLIMIT_FSIZE, (16 * 1024, resource.RLIM_INFINITY))
mngr = train.checkpoint_manager(Path({str(full)!r}))
try:
    train.save_checkpoint(mngr, state, cfg, meta["loader"])
except OSError as exc:
    print("raised", exc.errno, exc)
finally:
    mngr.close()
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"raised 27 [Errno 27] cannot save checkpoint 2 in {full / 'checkpoints'}: File too large" in done.stdout, \
        (done.stdout, done.stderr[-3000:])
    assert done.stderr == "", done.stderr[-3000:]
    # No checkpoint; what TensorStore's writes in flight may have left goes with the run's next fit.
    assert not [p for p in (full / "checkpoints").iterdir() if ".orbax-checkpoint-tmp" not in p.name]
    mngr = train.checkpoint_manager(full)
    train.remove_unfinished_saves(mngr)
    mngr.close()
    assert list((full / "checkpoints").iterdir()) == []


def test_orbax_errors_are_held_until_the_save_or_restore_ends(caplog, monkeypatch):
    """What orbax logs at ERROR during a save or restore is dropped if it then fails (its exception
    says it) and passed on, after the block, if it succeeds or is interrupted; lower levels pass at
    once. TensorStore's callbacks into a closed event loop (unraisable "Event loop is closed") are
    dropped inside a block and, after a failed one, for good; every other unraisable exception still
    reaches the hook there was, which a block that succeeds puts back."""
    import logging
    import sys
    from types import SimpleNamespace

    from wsitile.training import orbax_noise
    from wsitile.training.orbax_noise import orbax_noise_held

    seen: list = []
    monkeypatch.setattr(sys, "unraisablehook", seen.append)
    closed, other = SimpleNamespace(exc_value=RuntimeError("Event loop is closed")), SimpleNamespace(exc_value=ValueError())
    absl = logging.getLogger("absl")
    try:
        with caplog.at_level(logging.INFO, logger="absl"):
            with orbax_noise_held():
                absl.error("recovered")
                absl.info("progress")
                sys.unraisablehook(closed)
                sys.unraisablehook(other)
            assert sys.unraisablehook == seen.append and seen == [other]
            with pytest.raises(KeyboardInterrupt), orbax_noise_held():
                absl.error("interrupted")
                raise KeyboardInterrupt
            assert sys.unraisablehook == seen.append
            with pytest.raises(RuntimeError), orbax_noise_held():
                absl.error("a writer thread failed")
                raise RuntimeError("the save failed")
            absl.error("after")
        assert [r.getMessage() for r in caplog.records] == ["progress", "recovered", "interrupted", "after"]
        sys.unraisablehook(closed)
        sys.unraisablehook(other)
        assert seen == [other, other]
    finally:  # the filters a failure leaves for the process's life
        absl.removeFilter(orbax_noise._not_a_writer_thread_failure)
        logging.getLogger("asyncio").removeFilter(orbax_noise._not_an_abandoned_write)


def test_a_saved_checkpoint_is_not_reported_as_failed(run, tmp_path, caplog):
    """orbax failing to remove an older checkpoint (max_to_keep) after the new one is committed (an
    NFS folder kept busy by a .nfsXXXX file): the save returns its step with a warning, and the run
    goes on from it, rather than stopping on "cannot save checkpoint"."""
    import dataclasses
    import errno
    import logging

    run_dir, step = train.find_checkpoint(run / "run")
    cfg = train.TrainConfig.from_json(train.read_checkpoint_meta(run_dir, step)["config"])
    state, meta = train.restore_checkpoint(run_dir, step, cfg, train.steps_for(cfg))

    def busy(steps):
        if steps:
            raise OSError(errno.ENOTEMPTY, "Directory not empty", str(tmp_path / "nfs" / "checkpoints" / str(steps[0])))

    mngr = train.checkpoint_manager(tmp_path / "nfs")
    try:
        at = [train.save_checkpoint(mngr, dataclasses.replace(state, step=jax.numpy.asarray(n, jax.numpy.int32)), cfg,
                                    meta["loader"]) for n in (1, 2)]
        mngr._checkpoint_deleter.delete_steps = busy  # private: where orbax removes steps past max_to_keep
        with caplog.at_level(logging.WARNING, logger="wsitile.training.checkpoints"):
            at.append(train.save_checkpoint(mngr, dataclasses.replace(state, step=jax.numpy.asarray(3, jax.numpy.int32)),
                                            cfg, meta["loader"]))
    finally:
        mngr.close()
    assert at == [1, 2, 3] and train.find_checkpoint(tmp_path / "nfs") == (tmp_path / "nfs", 3)
    (warning,) = [r.getMessage() for r in caplog.records if "saved, but" in r.getMessage()]
    assert "checkpoint 3 saved, but removing an older one failed" in warning and "Directory not empty" in warning



def test_edited_checkpoint_metadata_and_bad_arguments_fail_in_one_line(run, tmp_path, capsys):
    """Metadata without its config, with a loader state or shapes of the wrong kind, with a width
    given as a string or window settings out of range: one line naming the checkpoint (were KeyError /
    AttributeError tracebacks, and a negative tissue threshold an error that did not name it).
    A fractional stride is refused, not truncated."""
    import json
    import shutil

    for name, edit in (("noconfig", lambda m: m.pop("config")), ("loader", lambda m: m.update(loader={"seed": 0})),
                       ("variables", lambda m: m.update(variables=[1])),
                       ("width", lambda m: m["config"].update(width="wide")),
                       ("threshold", lambda m: m["config"].update(tissue_threshold=-0.5)),
                       ("levels", lambda m: m["config"].update(levels=[3, 2])),
                       ("center", lambda m: m["config"].update(center=500))):
        edited = tmp_path / name
        shutil.copytree(run / "run" / "checkpoints", edited / "checkpoints")
        (meta_file,) = edited.glob("checkpoints/*/meta/metadata")
        meta = json.loads(meta_file.read_text())
        edit(meta)
        meta_file.write_text(json.dumps(meta))
        code = main(["predict", str(run / "tumor_001.tif"), "--checkpoint", str(edited), "--out", str(tmp_path / "p")])
        err = capsys.readouterr().err
        assert code == 1 and err.count("\n") == 1 and str(edited) in err, (name, err)
        assert name not in ("threshold", "levels", "center") or "saved settings do not parse" in err, (name, err)
    with pytest.raises(TypeError, match="stride 80.7: must be an integer"):
        predict_slide(run / "tumor_001.tif", run / "run", tmp_path / "q", stride=80.7)
    # A batch that cannot fit in memory: one line before compiling (it failed in the loop, after it).
    out = tmp_path / "huge"
    code = main(["predict", str(run / "tumor_001.tif"), "--checkpoint", str(run / "run"), "--out", str(out),
                 "--batch-size", str(10**8)])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "out of memory: batch_size 100000000" in err and not out.exists(), err


def test_heatmap_pair_or_nothing(run, tmp_path, monkeypatch, disk_full):
    """When the picture cannot be written, the new heatmap.npz does not land either, and the previous
    pair stays as it was (the new npz used to replace the old one and then be deleted with it)."""
    import wsitile.plots

    out = tmp_path / "p"
    predict_slide(run / "tumor_001.tif", run / "run", out, batch_size=16, progress=False)
    before = {name: (out / name).read_bytes() for name in ("heatmap.npz", "heatmap.png")}
    monkeypatch.setattr(wsitile.plots, "save_heatmap_png", disk_full)
    with pytest.raises(OSError, match="No space left"):
        predict_slide(run / "tumor_001.tif", run / "run", out, batch_size=16, stride=160, progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    with pytest.raises(OSError, match="No space left"):
        predict_slide(run / "tumor_001.tif", run / "run", tmp_path / "new", batch_size=16, progress=False)
    assert list((tmp_path / "new").iterdir()) == []


def test_compile_cache_reused_by_the_next_process(run, tmp_path):
    """WSITILE_COMPILE_CACHE: the first `wsitile predict` process writes the compiled model there and
    the traced one (a jax.export artifact), a second one with the same settings finds both and does
    not trace the model, and both write the same heatmap."""
    import os
    import subprocess
    import sys

    cache = tmp_path / "cache"
    env = dict(os.environ, WSITILE_COMPILE_CACHE=str(cache), JAX_PLATFORMS="cpu",
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_LOG_COMPILES="1")
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    heatmaps, entries, traced = [], [], []
    for i in range(2):
        out = tmp_path / f"p{i}"
        proc = subprocess.run([sys.executable, "-m", "wsitile", "predict", str(run / "tumor_001.tif"),
                               "--checkpoint", str(run / "run"), "--out", str(out), "--batch-size", "16",
                               "--stride", "160"], env=env, check=True, capture_output=True, text=True, timeout=600)
        entries.append(sorted(p.name for p in cache.rglob("*")))
        traced.append("Finished tracing _predict_step" in proc.stderr)
        with np.load(out / "heatmap.npz", allow_pickle=False) as h:
            heatmaps.append(h["probs"])
    assert entries[0], "the first process wrote nothing to the compilation cache"
    assert entries[1] == entries[0], "the second process compiled something new instead of reusing the cache"
    assert sum(name.endswith(".exported") for name in entries[0]) == 1, entries[0]
    assert traced == [True, False], "the second process traced the model again"
    np.testing.assert_array_equal(heatmaps[0], heatmaps[1])


def test_unusable_compile_cache_is_one_line_and_no_cache(tmp_path, monkeypatch, capsys):
    """WSITILE_COMPILE_CACHE under a file (or otherwise not writable): one line saying so, and JAX is
    given no cache folder (it warned in two lines at every compile, beside the exported step's warning)."""
    from wsitile import cli

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("WSITILE_COMPILE_CACHE", str(blocker / "jax"))
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    before = jax.config.jax_compilation_cache_dir
    cli._compile_cache()
    assert capsys.readouterr().err == (f"wsitile: compilation cache {blocker / 'jax'} is not usable (Not a directory); "
                                       "compiling without it\n")
    assert jax.config.jax_compilation_cache_dir == before
