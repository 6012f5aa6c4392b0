"""`training.exported`: jitted steps kept as jax.export artifacts, so a later process skips the trace."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

jax = pytest.importorskip("jax")
pytest.importorskip("flatbuffers")  # jax.export's serialization

from wsitile.training import exported  # noqa: E402

X = np.arange(12, dtype=np.float32).reshape(4, 3)
TREE = {"b": np.ones(3, np.float32)}
EXPECTED = (X * 2.0 + 1.0).sum(axis=1)


def _step():
    return jax.jit(lambda x, tree: (x * 2.0 + tree["b"]).sum(axis=1))


def _args(n: int = 4) -> tuple:
    return (jax.ShapeDtypeStruct((n, 3), np.float32), {"b": jax.ShapeDtypeStruct((3,), np.float32)})


def _run(compiled, n: int = 4) -> np.ndarray:
    return np.asarray(compiled(np.arange(n * 3, dtype=np.float32).reshape(n, 3), TREE))


@pytest.fixture
def folder(tmp_path, monkeypatch) -> Path:
    monkeypatch.setattr(exported, "cache_folder", lambda: tmp_path)
    return tmp_path


def test_saved_then_read_without_tracing(folder, monkeypatch):
    np.testing.assert_allclose(_run(exported.compile_step(_step(), _args(), "double")), EXPECTED)
    (path,) = folder.glob("*.exported")

    def no_trace(fn):  # the second call must come from the file
        raise AssertionError("traced again")

    monkeypatch.setattr(jax.export, "export", no_trace)
    np.testing.assert_allclose(_run(exported.compile_step(_step(), _args(), "double")), EXPECTED)
    assert sorted(folder.glob("*.exported")) == [path]


def test_other_shapes_or_identity_are_other_entries(folder):
    exported.compile_step(_step(), _args(4), "double")
    exported.compile_step(_step(), _args(8), "double")
    exported.compile_step(_step(), _args(4), "double, another config")
    assert len(list(folder.glob("*.exported"))) == 3
    assert _run(exported.compile_step(_step(), _args(8), "double"), 8).shape == (8,)


def test_jax_settings_that_change_the_trace_are_in_the_key(folder):
    exported.compile_step(_step(), _args(), "double")
    with jax.default_matmul_precision("highest"):
        exported.compile_step(_step(), _args(), "double")
    assert len(list(folder.glob("*.exported"))) == 2


@pytest.mark.parametrize("damage", ["torn file", "damaged module"])
def test_bad_entry_is_traced_again_and_replaced(folder, caplog, damage):
    exported.compile_step(_step(), _args(), "double")
    (path,) = folder.glob("*.exported")
    whole = path.read_bytes()
    if damage == "torn file":
        bad = whole[:-100]
        message = "unreadable exported step"
    else:  # the flatbuffer reads, the StableHLO module inside it does not
        start = whole.index(b"ML\xefR")  # MLIR bytecode's magic
        bad = whole[: start + 40] + bytes(40) + whole[start + 80:]
        message = "exported step does not compile"
    path.write_bytes(bad)
    with caplog.at_level(logging.WARNING):
        np.testing.assert_allclose(_run(exported.compile_step(_step(), _args(), "double")), EXPECTED)
    assert message in caplog.text and str(path) in caplog.text
    rewritten = path.read_bytes()  # whole again (serialization is not byte-for-byte stable)
    assert rewritten != bad and jax.export.deserialize(bytearray(rewritten)).in_avals
    assert not list(folder.glob(".*.tmp"))


def test_what_export_refuses_falls_back_to_the_plain_step(folder, monkeypatch):
    def refuse(fn):
        def traced(*args):
            raise ValueError("custom call not on the allow list")
        return traced

    monkeypatch.setattr(jax.export, "export", refuse)
    np.testing.assert_allclose(_run(exported.compile_step(_step(), _args(), "double")), EXPECTED)
    assert not list(folder.glob("*.exported"))


def test_trace_errors_are_the_plain_steps(folder):
    bad = jax.jit(lambda x, tree: x @ tree["b"].reshape(1, 3))  # (4, 3) @ (1, 3): shapes do not fit
    with pytest.raises(TypeError, match="dot_general"):
        exported.compile_step(bad, _args(), "bad")


def test_oldest_entries_are_removed(folder, monkeypatch):
    monkeypatch.setattr(exported, "KEEP", 2)
    for n in (1, 2, 3):
        exported.compile_step(_step(), _args(n), "double")
    assert len(list(folder.glob("*.exported"))) == 2


def test_no_cache_folder_or_unwritable(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(exported, "cache_folder", lambda: None)
    np.testing.assert_allclose(_run(exported.compile_step(_step(), _args(), "double")), EXPECTED)
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setattr(exported, "cache_folder", lambda: blocker / "exported")
    with caplog.at_level(logging.WARNING):
        np.testing.assert_allclose(_run(exported.compile_step(_step(), _args(), "double")), EXPECTED)
    assert "cannot keep the exported step" in caplog.text


def test_cache_folder_follows_jax_settings(tmp_path):
    saved = {name: getattr(jax.config, name) for name in ("jax_compilation_cache_dir", "jax_enable_compilation_cache")}
    try:  # nothing compiles in between, so JAX's own cache is not switched on by this
        jax.config.update("jax_compilation_cache_dir", str(tmp_path))
        assert exported.cache_folder() == tmp_path / "wsitile-exported"
        jax.config.update("jax_compilation_cache_dir", "gs://bucket/cache")
        assert exported.cache_folder() is None  # remote: JAX's own cache only
        jax.config.update("jax_compilation_cache_dir", str(tmp_path))
        jax.config.update("jax_enable_compilation_cache", False)
        assert exported.cache_folder() is None
        jax.config.update("jax_enable_compilation_cache", True)
        jax.config.update("jax_compilation_cache_dir", None)
        assert exported.cache_folder() is None
    finally:
        for name, value in saved.items():
            jax.config.update(name, value)


def test_key_covers_the_model_sources():
    """A changed model file must be another key, in a wheel and in an editable install alike."""
    import wsitile.models.inception_v3
    import wsitile.training.steps

    files = {path for _, path in exported.source_files()}
    for module in (wsitile.models.inception_v3, wsitile.training.steps, exported):
        assert Path(module.__file__).resolve() in files


def test_a_folder_it_cannot_change_is_still_read_around(folder, monkeypatch, caplog):
    """An entry it cannot read nor delete (a shared, read-only cache): the step still compiles."""
    exported.compile_step(_step(), _args(), "double")

    def refuse(self, missing_ok=False):  # noqa: ANN001
        raise PermissionError(13, "Permission denied", str(self))

    def garbled(blob):  # noqa: ANN001
        raise ValueError("not an exported step")

    monkeypatch.setattr(Path, "unlink", refuse)
    monkeypatch.setattr(jax.export, "deserialize", garbled)
    with caplog.at_level(logging.WARNING):
        np.testing.assert_allclose(_run(exported.compile_step(_step(), _args(), "double")), EXPECTED)
    assert "unreadable exported step" in caplog.text
