"""Jitted steps as `jax.export` artifacts, kept beside JAX's persistent compilation cache: a process
that finds one skips tracing the model (InceptionV3 at full width: ~1.3 s of `wsitile predict`'s
start on the development CPU) and goes straight to the compile, which that cache then serves.

JAX has no persistent trace cache; its compilation cache is keyed by the lowered module, so every
process traces again to find its key. An `Exported` is that lowered module, serialized. Its key here
is everything the module depends on: the step's name and model config, the arguments' tree, shapes,
dtypes and shardings, the devices, the versions of JAX and Flax, the JAX settings that change what a
trace gives, and the bytes of wsitile's own Python sources (a changed model file is another key).
An entry that cannot be read, or whose module does not compile, is a miss: it is deleted and the step
traced again. Anything `jax.export` refuses falls back to the plain jitted step. Nothing is kept when
the compilation cache is off, and at most `KEEP` entries are (the oldest are removed).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import jax

from ..masks import atomic_write

log = logging.getLogger(__name__)

_SUBDIR = "wsitile-exported"  # JAX's cache only touches its own *-cache / *-atime files
KEEP = 64  # entries (~0.4 MB each at full width)
# Settings that change the traced module for the same code and shapes.
_CONFIG = ("jax_default_matmul_precision", "jax_enable_x64", "jax_default_prng_impl", "jax_numpy_rank_promotion",
           "jax_numpy_dtype_promotion")


def cache_folder() -> Path | None:
    """Where exported steps are kept: under JAX's compilation cache folder when that cache is on and
    local, else None."""
    if not getattr(jax.config, "jax_enable_compilation_cache", True):
        return None
    folder = getattr(jax.config, "jax_compilation_cache_dir", None)  # set by cli._compile_cache or the user
    if not folder or "://" in str(folder):  # JAX also takes gs:// and the like; this module does not
        return None
    return Path(folder) / _SUBDIR


def compile_step(step: jax.stages.Wrapped, args: tuple, identity: str, **jit_kwargs: Any) -> jax.stages.Compiled:
    """`step` compiled for `args` (abstract: `jax.ShapeDtypeStruct` with shardings), through its cached
    export when there is one (`identity`: what `step` computes, its name and model config;
    `jit_kwargs`: `step`'s shardings, for the jit of the exported call). Errors in the trace (a
    model that does not fit the shapes) come from the plain step, as without a cache."""
    folder = cache_folder()
    if folder is None:
        return step.lower(*args).compile()
    path = folder / f"{_key(args, identity)}.exported"
    exported = _read(path, args)
    if exported is not None:
        try:
            return jax.jit(exported.call, **jit_kwargs).lower(*args).compile()
        except Exception as exc:  # noqa: BLE001 - e.g. a damaged module inside a readable file
            log.warning("%s: exported step does not compile, tracing again (%s)", path, str(exc)[:200])
            _forget(path)
    try:
        exported = jax.export.export(step)(*args)
    except Exception as exc:  # noqa: BLE001 - the plain step below raises the trace's own errors
        log.info("%s: not exported (%s)", identity[:80], str(exc)[:200])
        return step.lower(*args).compile()
    _write(path, exported)
    return jax.jit(exported.call, **jit_kwargs).lower(*args).compile()


def _read(path: Path, args: tuple) -> jax.export.Exported | None:
    try:
        if not path.is_file():
            return None
        exported = jax.export.deserialize(bytearray(path.read_bytes()))
    except ImportError:  # no flatbuffers: nothing was written either
        return None
    except Exception as exc:  # noqa: BLE001 - a torn or foreign file is a miss, not an error
        log.warning("%s: unreadable exported step, tracing again (%s)", path, str(exc)[:200])
        _forget(path)
        return None
    if _avals(exported.in_avals) != _avals(jax.tree.leaves(args)):  # a hash collision, in principle
        return None
    return exported


def _write(path: Path, exported: jax.export.Exported) -> None:
    try:
        blob = exported.serialize()
    except ImportError:  # flatbuffers, which serialization needs, is missing
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda fh: fh.write(blob))  # a reader sees the whole file or none
        entries = sorted(path.parent.glob("*.exported"), key=lambda p: p.stat().st_mtime)
        for old in entries[:-KEEP]:
            old.unlink(missing_ok=True)
    except OSError as exc:
        log.warning("%s: cannot keep the exported step (%s)", path, exc)


def _forget(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError:  # a folder this process may read but not change: the rewrite will say so
        pass


def _avals(avals: Any) -> list[tuple[tuple[int, ...], str]]:
    return [(tuple(a.shape), str(a.dtype)) for a in avals]


def _key(args: tuple, identity: str) -> str:
    leaves, tree = jax.tree.flatten(args)
    devices = jax.devices()
    parts = {
        "identity": identity,
        "tree": str(tree),
        "leaves": [[list(x.shape), str(x.dtype), str(getattr(x, "sharding", None))] for x in leaves],
        "devices": [len(devices), devices[0].platform, devices[0].device_kind],
        "config": {name: str(getattr(jax.config, name, None)) for name in _CONFIG},
        "versions": _versions(),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def source_files() -> list[tuple[str, Path]]:
    """(name, path) of wsitile's Python sources, the model's included: one tree in a wheel, two
    folders in an editable install (python/wsitile and models/), where the first alone would miss a
    changed model. Names are relative, so two environments with the same sources share entries."""
    from .. import models

    roots = {Path(__file__).resolve().parent.parent, Path(models.__file__).resolve().parent}
    return sorted({(f"{root.name}/{file.relative_to(root).as_posix()}", file)
                   for root in roots for file in root.rglob("*.py")})


@functools.cache
def _versions() -> dict[str, str]:
    import flax
    import jaxlib

    sources = hashlib.sha256()
    for name, file in source_files():
        sources.update(name.encode())
        sources.update(file.read_bytes())
    return {"jax": jax.__version__, "jaxlib": jaxlib.__version__, "flax": flax.__version__,
            "wsitile": sources.hexdigest()}
