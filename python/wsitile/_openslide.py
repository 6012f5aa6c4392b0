"""Point the C++ engine at the libopenslide that openslide-python uses.

The extension never links OpenSlide: it dlopens the library openslide-python has already loaded
(normally the openslide-bin wheel's copy), so both read slides through one library.
"""

from __future__ import annotations

import functools
import os


@functools.cache
def library_path() -> str:
    import openslide.lowlevel as lowlevel

    name = getattr(getattr(lowlevel, "_lib", None), "_name", None)
    if name and os.path.exists(name):
        return str(name)
    # openslide-python loaded a system library by soname (no path): let dlopen resolve that name.
    if name:
        return str(name)
    raise RuntimeError("cannot locate libopenslide: install openslide-bin (pip install openslide-bin)")


def ensure_loaded() -> None:
    from . import _core

    if not _core.openslide_loaded():
        _core.load_openslide(library_path())
