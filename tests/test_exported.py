"""`training.exported`: jitted steps kept as jax.export artifacts, so a later process skips the trace."""

from __future__ import annotations

import logging

import numpy as np
import pytest

jax = pytest.importorskip("jax")
pytest.importorskip("flatbuffers")  # jax.export's serialization

from wsitile.training import exported  # noqa: E402


def _step():
    return jax.jit(lambda x, tree: (x * 2.0 + tree["b"]).sum(axis=1))


def _args(n: int = 4) -> tuple:
    return (jax.ShapeDtypeStruct((n, 3), np.float32), {"b": jax.ShapeDtypeStruct((3,), np.float32)})


def _run(exp, n: int = 4) -> np.ndarray:
    x = np.arange(n * 3, dtype=np.float32).reshape(n, 3)
    return np.asarray(jax.jit(exp.call)(x, {"b": np.ones(3, np.float32)}))


def test_saved_then_read_without_tracing(tmp_path, monkeypatch):
    monkeypatch.setattr(exported, "cache_folder", lambda: tmp_path)
    expected = np.asarray(_step()(np.arange(12, dtype=np.float32).reshape(4, 3), {"b": np.ones(3, np.float32)}))
    first = exported.exported_step(_step(), _args(), "double")
    (path,) = tmp_path.glob("*.exported")
    np.testing.assert_allclose(_run(first), expected)

    def no_trace(fn):  # the second call must come from the file
        raise AssertionError("traced again")

    monkeypatch.setattr(jax.export, "export", no_trace)
    second = exported.exported_step(_step(), _args(), "double")
    np.testing.assert_allclose(_run(second), expected)
    assert sorted(tmp_path.glob("*.exported")) == [path]


def test_other_shapes_or_identity_are_other_entries(tmp_path, monkeypatch):
    monkeypatch.setattr(exported, "cache_folder", lambda: tmp_path)
    exported.exported_step(_step(), _args(4), "double")
    exported.exported_step(_step(), _args(8), "double")
    exported.exported_step(_step(), _args(4), "double, another config")
    assert len(list(tmp_path.glob("*.exported"))) == 3
    assert _run(exported.exported_step(_step(), _args(8), "double"), 8).shape == (8,)


def test_torn_entry_is_exported_again(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(exported, "cache_folder", lambda: tmp_path)
    exported.exported_step(_step(), _args(), "double")
    (path,) = tmp_path.glob("*.exported")
    torn = path.read_bytes()[:-100]
    path.write_bytes(torn)
    with caplog.at_level(logging.WARNING):
        again = exported.exported_step(_step(), _args(), "double")
    assert "unreadable exported step" in caplog.text and str(path) in caplog.text
    rewritten = path.read_bytes()  # replaced by a whole one (serialization is not byte-for-byte stable)
    assert len(rewritten) > len(torn) and jax.export.deserialize(bytearray(rewritten)).in_avals == again.in_avals
    np.testing.assert_allclose(_run(again), np.arange(12, dtype=np.float32).reshape(4, 3).sum(axis=1) * 2 + 3)
    assert not list(tmp_path.glob(".*.tmp"))


def test_no_cache_folder_or_unwritable(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(exported, "cache_folder", lambda: None)
    assert exported.exported_step(_step(), _args(), "double") is None  # compilation cache off: trace as usual
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setattr(exported, "cache_folder", lambda: blocker / "exported")
    with caplog.at_level(logging.WARNING):
        exp = exported.exported_step(_step(), _args(), "double")
    assert "cannot keep the exported step" in caplog.text
    assert _run(exp).shape == (4,)


def test_key_covers_the_model_sources():
    """A changed model file must be another key, in a wheel and in an editable install alike."""
    from pathlib import Path

    import wsitile.models.inception_v3
    import wsitile.training.steps

    files = {path for _, path in exported.source_files()}
    for module in (wsitile.models.inception_v3, wsitile.training.steps, exported):
        assert Path(module.__file__).resolve() in files
