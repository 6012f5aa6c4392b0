"""SIGTERM during `wsitile train` (a cluster scheduler's stop): prompt exit, last checkpoint intact."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

pytest.importorskip("jax")


def test_sigterm_during_training_keeps_the_last_checkpoint(tmp_path):
    from wsitile import train
    from wsitile.synth import synth_dataset

    data = tmp_path / "data"
    synth_dataset(data, 2, seed=1, size=4096, progress=False)  # one tumour, one normal slide, both train
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "wsitile", "train", str(data), "--out", str(run), "--width", "0.125",
           "--batch-size", "8", "--stride", "160", "--val-fraction", "0", "--time-limit", "900", "--threads", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        ckpts = run / "checkpoints"
        while time.monotonic() < deadline and proc.poll() is None:
            steps = [p for p in ckpts.glob("*") if p.name.isdigit()] if ckpts.is_dir() else []
            if steps:
                break
            time.sleep(0.5)
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert steps, "no checkpoint within 5 minutes"
        time.sleep(2.0)  # into the next epoch's steps (or its checkpoint save)
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
        stopped_in = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted" in err.strip().splitlines()[-1]
    assert stopped_in < 30, stopped_in
    # The latest complete checkpoint restores; no half-written step folder is taken for one.
    run_dir, step = train.find_checkpoint(run)
    meta = train.read_checkpoint_meta(run_dir, step)
    cfg = train.TrainConfig.from_json(meta["config"])
    state, _ = train.restore_checkpoint(run_dir, step, cfg, train.steps_for(cfg))
    assert int(state.step) == step >= 1
    assert not [p for p in run.iterdir() if p.name.startswith(".") or p.suffix == ".tmp"]
    assert os.path.getsize(run / "history.json") > 0
