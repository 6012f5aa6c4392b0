"""Jitted steps as `jax.export` artifacts, kept beside JAX's persistent compilation cache: a process
that finds one skips tracing the model (InceptionV3 at full width: ~1.3 s of `wsitile predict`'s
start on the development CPU) and goes straight to the compile, which that cache then serves.

JAX has no persistent trace cache; its compilation cache is keyed by the lowered module, so every
process traces again to find its key. An `Exported` is that lowered module, serialized. Its key here
is everything the module depends on: the step's name and model config, the arguments' tree, shapes,
dtypes and shardings, the devices, the versions of JAX and Flax, and the bytes of wsitile's own
Python sources (a changed model file is another key). A missing, unreadable or stale entry is a miss:
export again and replace it. Nothing is cached when the compilation cache is off.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import jax

log = logging.getLogger(__name__)

_SUBDIR = "wsitile-exported"  # JAX's cache only touches its own *-cache / *-atime files


def cache_folder() -> Path | None:
    """Where exported steps are kept: under JAX's compilation cache folder, None when it is off."""
    folder = getattr(jax.config, "jax_compilation_cache_dir", None)  # set by cli._compile_cache or the user
    return Path(folder) / _SUBDIR if folder else None


def exported_step(step: jax.stages.Wrapped, args: tuple, identity: str) -> jax.export.Exported | None:
    """`jax.export.export(step)(*args)` (args: abstract, `jax.ShapeDtypeStruct` with shardings), read
    from the cache when an earlier process exported the same step, else exported and saved there.
    `identity` names what `step` computes (its name and model config). None when there is no cache
    (compilation cache off, or `flatbuffers`, which serialization needs, is missing): trace as usual."""
    folder = cache_folder()
    if folder is None:
        return None
    path = folder / f"{_key(args, identity)}.exported"
    if path.is_file():
        try:
            exported = jax.export.deserialize(bytearray(path.read_bytes()))
            if _avals(exported.in_avals) == _avals(jax.tree.leaves(args)):
                return exported
        except ImportError:
            return None
        except Exception as exc:  # noqa: BLE001 - a torn or foreign file is a miss, not an error
            log.warning("%s: unreadable exported step, exporting again (%s)", path, exc)
    exported = jax.export.export(step)(*args)  # the trace: errors in it (a model mismatch) propagate
    try:
        blob = exported.serialize()
    except ImportError:  # flatbuffers
        return exported
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(blob)
        os.replace(tmp, path)  # a reader sees the whole file or none
    except OSError as exc:
        log.warning("%s: cannot keep the exported step (%s)", path, exc)
    return exported


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
