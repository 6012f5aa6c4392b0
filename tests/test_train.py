"""Training: TF1 RMSProp, partial fine-tuning, the sharded step, checkpoints and resume, bad input."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

jax = pytest.importorskip("jax")
pytest.importorskip("flax")
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

from wsitile import train  # noqa: E402
from wsitile.train import SlideSet, Steps, TrainConfig, create_state, fit, make_optimizer  # noqa: E402

# One configuration for every run below, so the compiled steps are shared (train.steps_for).
SMALL = dict(width=0.125, batch_size=8, tissue_threshold=None, stride=160, learning_rate=0.01)


def test_rmsprop_is_tensorflow1_rmsprop():
    """Independent reference: TF1's RMSPropOptimizer update written out in NumPy."""
    cfg = TrainConfig(learning_rate=0.01, halve_every=10**9)
    tx = make_optimizer(cfg)
    rng = np.random.default_rng(0)
    w = rng.normal(size=5).astype(np.float32)
    params = {"w": jnp.asarray(w)}
    state = tx.init(params)
    ms, mom = np.ones(5, np.float32), np.zeros(5, np.float32)  # TF1: accumulator starts at 1
    for _ in range(5):
        g = rng.normal(size=5).astype(np.float32) * 3
        ms = 0.9 * ms + 0.1 * g * g
        mom = 0.9 * mom + 0.01 * g / np.sqrt(ms + 1.0)  # epsilon 1.0 inside the square root
        w = w - mom
        updates, state = tx.update({"w": jnp.asarray(g)}, state, params)
        params = optax.apply_updates(params, updates)
    np.testing.assert_allclose(np.asarray(params["w"]), w, rtol=1e-5, atol=1e-6)


def test_learning_rate_halves_every_2m_examples():
    schedule = train.learning_rate_schedule(TrainConfig(learning_rate=0.002, batch_size=32))
    per_halving = 2_000_000 // 32
    assert float(schedule(0)) == pytest.approx(0.002)
    assert float(schedule(per_halving - 1)) == pytest.approx(0.002)
    assert float(schedule(per_halving)) == pytest.approx(0.001)
    assert float(schedule(3 * per_halving)) == pytest.approx(0.00025)


def test_defaults_follow_liu_et_al():
    assert TrainConfig(weights="x.h5").lr == 0.002 and TrainConfig().lr == 0.05
    assert TrainConfig(weights="x.h5").boundary == 150 and TrainConfig().boundary == 0
    assert TrainConfig(weights="x.h5", fine_tune_from=200).boundary == 200


@pytest.mark.parametrize("bad, error, needle", [
    (dict(window=0), ValueError, "window 0"), (dict(center=81), ValueError, "center 81"),
    (dict(stride=2.5), TypeError, "stride 2.5"), (dict(levels=(3, 2)), ValueError, "must increase"),
    (dict(levels=()), ValueError, "at least one"), (dict(levels=(-1, 2)), ValueError, "levels"),
    (dict(tissue_threshold=-0.1), ValueError, "tissue_threshold -0.1"),
    (dict(tissue_threshold=float("nan")), ValueError, "tissue_threshold nan"),
    (dict(halve_every=0), ValueError, "halve_every 0"), (dict(fine_tune_from=-3), ValueError, "fine_tune_from -3"),
    (dict(batch_size=8.5), TypeError, "batch_size 8.5"), (dict(seed="0"), TypeError, "seed '0'"),
    (dict(levels=(2.5, 3)), TypeError, "levels 2.5"), (dict(width=True), TypeError, "width True"),
    (dict(augment="no"), TypeError, "augment 'no'"), (dict(learning_rate="0.1"), TypeError, "learning_rate '0.1'"),
])
def test_config_refuses_settings_no_grid_or_run_could_use(bad, error, needle):
    """Checked when the config is made (before any slide is read), not first when a grid is built;
    from a saved config.json the same errors name the file's folder."""
    with pytest.raises(error, match=re.escape(needle)):
        TrainConfig(**bad)
    saved = {**TrainConfig().to_json(), **{k: list(v) if isinstance(v, tuple) else v for k, v in bad.items()}}
    with pytest.raises(ValueError, match=re.escape("run/checkpoints/3: its saved settings do not parse") + ".*" + re.escape(needle)):
        TrainConfig.from_json(saved, source="run/checkpoints/3")


def test_config_takes_whole_numbers_of_any_type():
    """Configs saved by earlier versions (halve_every 2e6 as 2000000.0) and NumPy values (an extract
    .npz's levels) still load, stored as ints: JSON and comparisons with a resumed run's config agree."""
    cfg = TrainConfig(levels=np.array([2, 3]), window=np.int64(80), stride=80.0, halve_every=2e6, fine_tune_from=150.0)
    assert (cfg.levels, cfg.window, cfg.stride, cfg.halve_every, cfg.fine_tune_from) == ((2, 3), 80, 80, 2_000_000, 150)
    assert all(type(v) is int for v in (*cfg.levels, cfg.window, cfg.stride, cfg.halve_every, cfg.fine_tune_from))
    small = TrainConfig(width=np.float32(0.25), learning_rate=np.float64(0.01), weights=None, balanced=np.bool_(False))
    assert json.loads(json.dumps(small.to_json()))["width"] == 0.25 and small.balanced is False
    assert TrainConfig(weights=Path("w.h5"), width=1).to_json()["weights"] == "w.h5"
    saved = json.loads(json.dumps({**TrainConfig().to_json(), "halve_every": 2000000.0}))
    assert TrainConfig.from_json(saved) == TrainConfig()


@pytest.fixture(scope="module")
def frozen_setup():
    cfg = TrainConfig(**SMALL, fine_tune_from=150)
    steps = Steps(cfg)
    state = steps.place_state(create_state(cfg))
    return cfg, steps, state


def test_fine_tuning_freezes_what_keras_freezes(frozen_setup):
    from wsitile.models import trainable_mask

    cfg, _, state = frozen_setup
    params = state.params()
    for t in range(len(cfg.levels)):
        mask = train.flat(trainable_mask(params[f"tower_{t}"], 150))
        for key, keep in mask.items():
            assert (f"tower_{t}/{key}" in state.trainable) == bool(keep), key
    assert any(k.startswith("head/") for k in state.trainable)
    assert state.frozen and state.trainable
    # The optimiser state covers only the trainable parameters.
    n_opt = sum(x.size for x in jax.tree.leaves(state.opt_state) if getattr(x, "ndim", 0) > 0)
    n_trainable = sum(x.size for x in state.trainable.values())
    assert n_opt == 2 * n_trainable  # RMSProp: the square average and the momentum


def test_step_leaves_the_frozen_part_alone(frozen_setup):
    cfg, steps, state = frozen_setup
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(8, 2, 80, 80, 3), dtype=np.uint8)
    labels = np.array([0, 1] * 4, np.uint8)
    before = jax.tree.map(np.asarray, (state.frozen, state.trainable, state.batch_stats))
    new, metrics = steps.train_step(jax.tree.map(jnp.copy, state), steps.place_batch(images), steps.place_batch(labels))
    assert np.isfinite(float(metrics["loss"]))
    for k, v in new.frozen.items():
        np.testing.assert_array_equal(np.asarray(v), before[0][k])
    assert any(not np.array_equal(np.asarray(new.trainable[k]), before[1][k]) for k in before[1])
    # BatchNorm statistics: stored ones below the boundary, updated above (Keras layer index 150).
    from wsitile.models import keras_layer_index

    index = keras_layer_index()
    old, cur = train.flat(before[2]["tower_0"]), train.flat(new.batch_stats["tower_0"])
    for key in old:
        layer = key.split("/")[0]
        changed = not np.array_equal(old[key], np.asarray(cur[key]))
        assert changed == (index[layer] >= 150), key


SHARDED = textwrap.dedent(
    """
    import os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    import jax
    dtype = sys.argv[1]
    jax.config.update("jax_enable_x64", dtype == "float64")
    import jax.numpy as jnp, numpy as np
    from wsitile.train import Steps, TrainConfig, create_state
    assert jax.device_count() == 4
    # One tower is enough for data parallelism and halves the compile time.
    cfg = TrainConfig(levels=(2,), width=0.125, batch_size=8, learning_rate=1e-3, dtype=dtype)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(8, 1, 80, 80, 3), dtype=np.uint8)
    labels = np.array([0, 1, 1, 0, 1, 0, 0, 1], np.uint8)
    initial = jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, create_state(cfg))
    out = []
    for devices in (jax.devices()[:1], jax.devices()):
        steps = Steps(cfg, devices)
        state = steps.place_state(jax.tree.map(jnp.copy, initial))
        losses = []
        for _ in range(2):
            state, m = steps.train_step(state, steps.place_batch(images), steps.place_batch(labels))
            losses.append(float(m["loss"]))
        out.append((np.array(losses), [np.asarray(x) for x in jax.tree.leaves(state)]))
    (l1, p1), (l4, p4) = out
    rel = max(np.linalg.norm(a - b) / max(np.linalg.norm(a), 1e-30) for a, b in zip(p1, p4))
    print(dtype, np.abs(l1 - l4).max(), rel)
    """
)


def test_sharded_step_equals_single_device_step():
    """Data parallel over 4 (forced host) devices against one device, two steps.

    In float64 the sharded step is the same computation: every parameter, BatchNorm statistic and
    optimiser slot agrees to 1e-9 (per-device BatchNorm statistics, over 2 samples instead
    of the global 8, would change the first loss by far more). float64 because in float32 the randomly
    initialised 94-layer net, whose last blocks are 1x1 at 80 px, amplifies the reordered reductions
    of the sharded step to about 1% of the gradient (measured; 2e-13 in float64), which would make a
    float32 comparison either loose or flaky.
    """
    dtype = "float64"
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    r = subprocess.run([sys.executable, "-c", SHARDED, dtype], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    _, loss_diff, param_rel = r.stdout.split()
    assert float(loss_diff) < 1e-6 and float(param_rel) < 1e-9, r.stdout  # logits come out as float32


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    from wsitile.synth import write_slide

    root = tmp_path_factory.mktemp("train_slides")
    write_slide(root / "tumor_001.tif", 4096, seed=3, tumour=True)
    write_slide(root / "tumor_002.tif", 4096, seed=4, tumour=True)
    write_slide(root / "normal_001.tif", 4096, seed=5, tumour=False)
    return root


def _slide_set(root: Path) -> SlideSet:
    return SlideSet(
        train=((str(root / "tumor_001.tif"), str(root / "tumor_001_mask.tif")), (str(root / "normal_001.tif"), None)),
        val=((str(root / "tumor_002.tif"), str(root / "tumor_002_mask.tif")),),
    )


def _params(run_dir: Path, cfg: TrainConfig):
    run, step = train.find_checkpoint(run_dir)
    state, meta = train.restore_checkpoint(run, step, cfg, Steps(cfg))
    return step, meta, jax.tree.map(np.asarray, (state.trainable, state.batch_stats, state.opt_state))


def test_resume_replays_the_same_batches_and_parameters(slides, tmp_path):
    cfg = TrainConfig(**SMALL)
    ss = _slide_set(slides)
    fit(cfg, ss, tmp_path / "straight", steps=4, threads=2, progress=False)
    fit(cfg, ss, tmp_path / "killed", steps=2, threads=2, progress=False)  # "killed" after its checkpoint
    # ... and during its next save: orbax's temporary folder, which the resumed run removes.
    unfinished = tmp_path / "killed" / "checkpoints" / "3.orbax-checkpoint-tmp-1764600000" / "state"
    unfinished.mkdir(parents=True)
    (unfinished / "part").write_bytes(b"x" * 1000)
    fit(cfg, ss, tmp_path / "killed", steps=4, threads=2, progress=False, resume=True)
    assert sorted(p.name for p in (tmp_path / "killed" / "checkpoints").iterdir()) == ["2", "4"]
    s1, m1, p1 = _params(tmp_path / "straight", cfg)
    s2, m2, p2 = _params(tmp_path / "killed", cfg)
    assert s1 == s2 == 4 and m1["loader"] == m2["loader"]
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
        np.testing.assert_array_equal(a, b)
    history = json.loads((tmp_path / "killed" / "history.json").read_text())
    assert history["step"] == [1, 2, 3, 4] and len(history["val_auc"]) == 2
    assert (tmp_path / "killed" / "training.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # A second process training into the folder (a requeued job while the first still runs) is refused
    # naming the holder, and leaves the holder's save in progress alone; once the holder ends, it is not.
    in_progress = tmp_path / "killed" / "checkpoints" / "5.orbax-checkpoint-tmp-1764600001"
    in_progress.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom pathlib import Path\nfrom wsitile.train import run_dir_locked\n"
         "with run_dir_locked(Path(sys.argv[1])):\n    print('held', flush=True)\n    time.sleep(120)", str(tmp_path / "killed")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        with pytest.raises(ValueError, match=rf"killed: another training process \(pid {holder.pid} on .+\) is writing"):
            fit(cfg, ss, tmp_path / "killed", steps=6, threads=2, progress=False, resume=True)
        assert in_progress.is_dir()
    finally:
        holder.kill()
        holder.wait()
    with train.run_dir_locked(tmp_path / "killed" / "best"):  # RUN/best is a run folder of its own, held too
        with pytest.raises(ValueError, match="killed/best: another training process"):
            fit(cfg, ss, tmp_path / "killed", steps=6, threads=2, progress=False, resume=True)
    with pytest.raises(ValueError, match="already holds checkpoints"):  # past the lock, which the holder's end freed
        fit(cfg, ss, tmp_path / "killed", steps=6, threads=2, progress=False)
    assert not in_progress.exists()
    assert not list((tmp_path / "killed").glob("**/.wsitile-train.lock"))


def test_run_lock_is_exclusive_removed_when_done_and_optional_where_locks_fail(tmp_path, monkeypatch, caplog):
    import errno
    import socket

    from jax.experimental import multihost_utils

    from wsitile.training import checkpoints

    lock = tmp_path / checkpoints.RUN_LOCK
    with train.run_dir_locked(tmp_path):
        assert lock.read_text() == f"pid {os.getpid()} on {socket.gethostname()}"
        with pytest.raises(ValueError, match=rf"another training process \(pid {os.getpid()} on "):
            with train.run_dir_locked(tmp_path):  # flock: another open of the file, as another process's
                pass
    assert list(tmp_path.iterdir()) == []  # the folder is left as it was

    # A link planted as the lock file is refused, not written through; a folder there is named.
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    lock.symlink_to(victim)
    with pytest.raises(ValueError, match=re.escape(f"{lock}: cannot be used as this run's lock")):
        with train.run_dir_locked(tmp_path):
            pass
    assert victim.read_text() == "keep me"
    lock.unlink()
    lock.mkdir()
    with pytest.raises(ValueError, match=re.escape(f"{lock}: cannot be used as this run's lock")):
        with train.run_dir_locked(tmp_path):
            pass
    lock.rmdir()

    # Multi-host: process 0 tells the others whether it holds the folder; all of them fail, not one.
    told = []
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(multihost_utils, "broadcast_one_to_all", lambda x: told.append(int(x)) or x)
    with train.run_dir_locked(tmp_path):
        with pytest.raises(ValueError, match="another training process"):
            with train.run_dir_locked(tmp_path):
                pass
    assert told == [1, 0]
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    monkeypatch.setattr(multihost_utils, "broadcast_one_to_all", lambda x: np.int32(0))
    with pytest.raises(ValueError, match="process 0 could not lock this run"):
        with train.run_dir_locked(tmp_path):
            pass
    monkeypatch.undo()

    def no_locks(*args):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(checkpoints.fcntl, "flock", no_locks)
    with caplog.at_level("WARNING"), train.run_dir_locked(tmp_path):
        pass
    assert "cannot be locked (No locks available)" in caplog.text


def test_best_validation_checkpoint_is_kept(slides, tmp_path, monkeypatch):
    """RUN/best holds the checkpoint of the best validation AUC so far, across resumed runs, and
    loads for inference (as `wsitile predict --checkpoint RUN/best`)."""
    cfg = TrainConfig(**SMALL)
    aucs = iter([0.6, 0.9, 0.7])
    monkeypatch.setattr(train, "window_auc", lambda labels, probs: next(aucs))
    for steps in (1, 2, 3):  # each run validates once, at its end
        fit(cfg, _slide_set(slides), tmp_path / "run", steps=steps, threads=2, progress=False, resume=steps > 1)
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert history["val_step"] == [1, 2, 3] and history["val_auc"] == [0.6, 0.9, 0.7]
    assert train.find_checkpoint(tmp_path / "run") == (tmp_path / "run", 3)
    assert train.find_checkpoint(tmp_path / "run" / "best") == (tmp_path / "run" / "best", 2)
    _, best, _ = _params(tmp_path / "run" / "best", cfg)
    assert best["step"] == 2
    loaded_cfg, _, variables = train.load_for_inference(tmp_path / "run" / "best")
    assert loaded_cfg == cfg and "params" in variables


def test_checkpoint_of_another_architecture_is_refused(slides, tmp_path):
    cfg = TrainConfig(**SMALL)
    fit(cfg, _slide_set(slides), tmp_path / "run", steps=1, threads=2, progress=False)
    run, step = train.find_checkpoint(tmp_path / "run")
    other = replace(cfg, width=0.25)
    with pytest.raises(ValueError, match="does not match the model"):
        train.restore_checkpoint(run, step, other, Steps(other))
    with pytest.raises(ValueError, match="not a wsitile run directory"):
        train.find_checkpoint(slides)


def test_no_tumour_windows_is_an_error(slides, tmp_path):
    """Failures before training leave no run folder behind (it used to hold an empty checkpoints/)."""
    cfg = TrainConfig(**SMALL)
    normal_only = SlideSet(train=((str(slides / "normal_001.tif"), None),))
    with pytest.raises(ValueError, match="no tumour windows"):
        fit(cfg, normal_only, tmp_path / "run", steps=1, progress=False)
    weights = tmp_path / "weights.h5"
    weights.write_text("not HDF5")
    with pytest.raises(ValueError, match="weights.h5: not an HDF5 file"):
        fit(replace(cfg, width=1.0, weights=str(weights)), _slide_set(slides), tmp_path / "run", steps=1, progress=False)
    with pytest.raises(ValueError, match="time_limit nan"):
        fit(cfg, _slide_set(slides), tmp_path / "run", time_limit=float("nan"), progress=False)
    same = SlideSet(train=_slide_set(slides).train, val=_slide_set(slides).train[:1])
    with pytest.raises(ValueError, match="both a training and a validation slide"):
        fit(cfg, same, tmp_path / "run", steps=1, progress=False)
    (tmp_path / "filed").mkdir()
    (tmp_path / "filed" / "checkpoints").write_text("a file")
    with pytest.raises(FileExistsError, match="checkpoints: exists and is not a folder"):
        fit(cfg, _slide_set(slides), tmp_path / "filed", steps=1, progress=False)
    shutil.rmtree(tmp_path / "filed")
    for devices, error in (([], ValueError), (["cpu"], ValueError)):
        with pytest.raises(error, match="devices"):
            fit(cfg, _slide_set(slides), tmp_path / "run", steps=1, progress=False, devices=devices)
    for bound in ({"steps": 0}, {"steps": -3}, {"steps": 0.5}, {"epochs": 0}):  # trained nothing, silently
        with pytest.raises(ValueError, match=f"{next(iter(bound))} .*: must be an integer >= 1"):
            fit(cfg, _slide_set(slides), tmp_path / "run", progress=False, **bound)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["weights.h5"]


def test_nan_loss_stops_and_keeps_the_last_checkpoint(slides, tmp_path, monkeypatch):
    cfg = TrainConfig(**SMALL)
    run = tmp_path / "run"
    fit(cfg, _slide_set(slides), run, steps=1, threads=2, progress=False)
    restore = train.restore_checkpoint

    def poisoned(*args, **kwargs):  # the resumed parameters hold a NaN: the next loss is NaN
        state, meta = restore(*args, **kwargs)
        trainable = dict(state.trainable)
        trainable["head/bias"] = trainable["head/bias"] * jnp.nan
        return state.replace(trainable=trainable), meta

    monkeypatch.setattr(train, "restore_checkpoint", poisoned)
    with pytest.raises(FloatingPointError, match="loss became nan at step 2.*checkpoint 1"):
        fit(cfg, _slide_set(slides), run, steps=3, threads=2, progress=False, resume=True)
    assert train.find_checkpoint(run)[1] == 1


def test_bfloat16_step_keeps_float32_parameters():
    """The GPU setting on the CPU: bfloat16 compute, float32 parameters, BatchNorm statistics and
    optimiser state; the loss is finite and close to the float32 step's."""
    images = np.random.default_rng(2).integers(0, 256, size=(8, 1, 80, 80, 3), dtype=np.uint8)
    labels = np.array([0, 1] * 4, np.uint8)
    losses = {}
    for dtype in ("bfloat16", "float32"):
        cfg = TrainConfig(levels=(2,), width=0.125, batch_size=8, dtype=dtype)
        assert cfg.compute_dtype() == jnp.dtype(dtype)
        steps = Steps(cfg)
        state, metrics = steps.train_step(steps.place_state(create_state(cfg)), steps.place_batch(images),
                                          steps.place_batch(labels))
        losses[dtype] = float(metrics["loss"])
        assert {x.dtype for x in jax.tree.leaves((state.trainable, state.batch_stats, state.opt_state))
                if jnp.issubdtype(x.dtype, jnp.floating)} == {jnp.dtype("float32")}
    assert np.isfinite(losses["bfloat16"])
    assert losses["bfloat16"] == pytest.approx(losses["float32"], rel=0.1)
