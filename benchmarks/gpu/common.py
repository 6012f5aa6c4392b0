"""Helpers shared by the three GPU-suite calls: the card's name, a time budget, timing, the table.

Every figure of a call is measured in that call, beside its baseline (DESIGN.md section 10); the
table each script prints last carries the card's name, since a call may land on an H100 or an H200.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable


@functools.cache
def card() -> str:
    """The accelerator's name and memory (nvidia-smi, which needs no framework), else the CPU."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=True).stdout.strip()
        if out:
            return out.splitlines()[0]
    except (OSError, subprocess.SubprocessError):
        pass
    return f"no GPU: CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def has_gpu() -> bool:
    return not card().startswith("no GPU")


class Budget:
    """Seconds left of a call's budget. A device call is killed at its timeout with whatever it has
    not printed yet, so each script skips work it has no time for and still prints its table."""

    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()

    def allows(self, need: float) -> bool:
        return self.left() >= need


def measure(run: Callable[[int], None], steps: int, items_per_step: int, rounds: int) -> tuple[float, list[float]]:
    """(median rate, every round's rate) of `rounds` timed calls of run(steps); `run` must wait for
    the device before it returns (block_until_ready / cuda.synchronize), so wall time is device time."""
    rates = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        run(steps)
        rates.append(steps * items_per_step / (time.perf_counter() - t0))
    return statistics.median(rates), rates


@dataclass
class Row:
    """One line of a table: a figure, its baseline from the same call, and the target ratio."""

    figure: str
    value: float | None  # None: not measured (see note)
    baseline: str = ""
    base_value: float | None = None
    target: float | None = None  # the ratio the issue asks for
    note: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def ratio(self) -> float | None:
        if self.value is None or not self.base_value:
            return None
        return self.value / self.base_value


def _num(v: float | None) -> str:
    if v is None:
        return "-"
    return format(v, ",.0f") if abs(v) >= 100 else format(v, ".3g")  # small CPU smoke rates stay readable


def table(title: str, unit: str, rows: list[Row]) -> str:
    """A Markdown table (ready for BENCHMARKS.md) with the card in its title."""
    lines = [f"### {title} -- {card()}", "",
             f"| figure | {unit} | baseline | {unit} | ratio | target | note |", "|---|---:|---|---:|---:|---:|---|"]
    for r in rows:
        ratio = "-" if r.ratio is None else f"{r.ratio:.2f}x"
        ok = "" if r.ratio is None or r.target is None else (" ok" if r.ratio >= r.target else " MISS")
        target = "" if r.target is None else f"{r.target:g}x{ok}"
        lines.append(f"| {r.figure} | {_num(r.value)} | {r.baseline} | {_num(r.base_value)} | {ratio} | {target} | {r.note} |")
    return "\n".join(lines)


def save(rows: list[Row], name: str) -> None:
    """The rows as JSON under $OUT (what comes back from a device call), when $OUT is set."""
    out = os.environ.get("OUT")
    if out:
        data = [dict(vars(r), ratio=r.ratio) for r in rows]
        Path(out, name).write_text(json.dumps({"card": card(), "rows": data}, indent=1))
