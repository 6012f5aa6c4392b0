"""Shared fixtures: slides made by the project's own synthetic-slide generator."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

# The CLI's persistent compilation cache (~/.cache/wsitile/jax) stays out of the tests; the one test
# of it names its own folder.
os.environ.setdefault("WSITILE_COMPILE_CACHE", "off")

from wsitile.synth import write_slide


@pytest.fixture(scope="session")
def tumour_slide(tmp_path_factory) -> dict[str, Path]:
    """An 8192 px tumour slide (levels 0..4) with its mask TIFF and ASAP XML."""
    root = tmp_path_factory.mktemp("tumour")
    paths = {"slide": root / "tumor_001.tif", "mask": root / "tumor_001_mask.tif", "xml": root / "tumor_001.xml"}
    write_slide(paths["slide"], 8192, seed=7, tumour=True, mask_path=paths["mask"], xml_path=paths["xml"])
    return paths


@pytest.fixture(scope="session")
def normal_slide(tmp_path_factory) -> Path:
    """A 4096 px normal slide (levels 0..3)."""
    path = tmp_path_factory.mktemp("normal") / "normal_001.tif"
    write_slide(path, 4096, seed=11, tumour=False)
    return path


@pytest.fixture
def disk_full():
    """A stand-in for a function that writes, failing as it would on a full disk (ENOSPC)."""
    def fail(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    return fail


@pytest.fixture
def earlier_files():
    """earlier_files(folder, names): an earlier run's outputs in `folder` (made), as placeholder bytes;
    returns {name: bytes} to compare the folder with after a failed rewrite."""
    def write(folder: Path, names) -> dict[str, bytes]:
        folder.mkdir(parents=True, exist_ok=True)
        files = {name: f"an earlier {name}".encode() for name in names}
        for name, data in files.items():
            (folder / name).write_bytes(data)
        return files

    return write
