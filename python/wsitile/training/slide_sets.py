"""The slides a run trains and validates on: read from a manifest, split by slide, shared between processes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import jax

from ..manifest import manifest_slides


@dataclass(frozen=True)
class SlideSet:
    """Slides with their masks (None: normal) and a label per slide, split by slide."""

    train: tuple[tuple[str, str | None], ...]
    val: tuple[tuple[str, str | None], ...] = ()


def read_manifest(folder: Path) -> tuple[list[tuple[str, str | None]], list[tuple[str, str | None]]]:
    """(train, test) (slide, mask) lists from a `wsitile synth` folder's manifest.csv."""
    return manifest_slides(Path(folder))


def split_by_slide(items: Sequence[tuple[str, str | None]], val_fraction: float) -> SlideSet:
    """Hold out the last `val_fraction` of the tumour slides (at least one when there are two or more)
    and of the normal slides for validation, so no slide feeds both."""
    tumour = [s for s in items if s[1] is not None]
    normal = [s for s in items if s[1] is None]
    if not tumour:
        raise ValueError("no tumour slides among the training slides: a tumour classifier needs some")
    n_t = min(len(tumour) - 1, max(1, round(val_fraction * len(tumour)))) if val_fraction > 0 else 0
    n_n = min(len(normal) - 1, round(val_fraction * len(normal))) if normal else 0
    n_n = max(n_n, 0)
    val = tumour[len(tumour) - n_t :] + normal[len(normal) - n_n :]
    train = tumour[: len(tumour) - n_t] + normal[: len(normal) - n_n]
    return SlideSet(tuple(train), tuple(val))


def shard_for_process(items: Sequence[Any]) -> list[Any]:
    """This process's share of the slides (multi-host: each process reads only its own)."""
    return list(items)[jax.process_index() :: jax.process_count()]

