"""Shared fixtures for the throughput benchmarks and a summary table of rates and ratios."""

from __future__ import annotations

from pathlib import Path

import pytest

from wsitile.synth import write_slide

# name -> samples/s, filled by the benchmarks, printed with ratios at the end of the run.
RATES: dict[str, float] = {}
# (figure, baseline) pairs whose ratio the summary prints.
RATIOS = [
    ("wsitile grid 1 thread (cold cache)", "python grid"),
    ("wsitile grid 1 thread (warm cache)", "python grid"),
    ("wsitile shuffled 1 thread (cold cache)", "python shuffled"),
    ("wsitile shuffled 1 thread (warm cache)", "python shuffled"),
    ("wsitile shuffled 1 thread (no block cache)", "python shuffled"),
    ("wsitile shuffled 1 thread (no block cache)", "wsitile shuffled 1 thread (no block cache, OpenSlide decoder)"),
    ("wsitile grid 2 threads (cold cache)", "wsitile grid 1 thread (cold cache)"),
    ("wsitile grid 2 threads (cold, interleaved)", "wsitile grid 1 thread (cold, interleaved)"),
    ("wsitile shuffled 2 threads (cold, interleaved)", "wsitile shuffled 1 thread (cold, interleaved)"),
    ("wsitile shuffled 2 threads (no block cache)", "wsitile shuffled 1 thread (no block cache)"),
    ("wsitile shuffled 2 threads (warm cache)", "wsitile shuffled 1 thread (warm cache)"),
    ("wsitile grid 1 thread augmented (cold cache)", "wsitile grid 1 thread (cold cache)"),
    ("wsitile grid 1 thread augmented (warm cache)", "wsitile grid 1 thread (warm cache)"),
    ("wsitile grid 2 threads augmented (warm cache)", "wsitile grid 1 thread augmented (warm cache)"),
    ("wsitile grid 1 thread (cold, OpenSlide decoder)", "python grid"),
    ("wsitile shuffled 1 thread (cold, OpenSlide decoder)", "python shuffled"),
    ("wsitile grid 1 thread (cold cache)", "wsitile grid 1 thread (cold, OpenSlide decoder)"),
    ("wsitile grid 1 thread (cold cache)", "JPEG decode ceiling, 1 core"),
    ("python grid", "OpenSlide read_region ceiling, 1 core"),
    ("wsitile shuffled 1 thread (16 MB cache)", "wsitile shuffled 1 thread (16 MB cache, OpenSlide decoder)"),
    ("wsitile shuffled 1 thread (16 MB cache)", "python shuffled"),
    ("wsitile shuffled 1 thread (16 MB cache)", "wsitile shuffled 1 thread (16 MB cache, whole tiles)"),
    ("wsitile 299 px shuffled 1 thread (64 MB cache)", "wsitile 299 px shuffled 1 thread (64 MB cache, whole tiles)"),
    ("wsitile 299 px shuffled 2 threads (64 MB cache)", "wsitile 299 px shuffled 2 threads (64 MB cache, whole tiles)"),
    ("wsitile 299 px shuffled 2 threads (64 MB cache)", "wsitile 299 px shuffled 1 thread (64 MB cache)"),
    ("wsitile shuffled 1 thread (24 MB cache, regions (True, False))", "wsitile shuffled 1 thread (24 MB cache, whole tiles)"),
    ("wsitile shuffled 1 thread (40 MB cache, regions (True, False))", "wsitile shuffled 1 thread (40 MB cache, whole tiles)"),
    ("wsitile shuffled 1 thread (48 MB cache, regions (False, False))", "wsitile shuffled 1 thread (48 MB cache, whole tiles)"),
    ("labels from mask tiles, 1 thread", "labels through OpenSlide, 1 thread"),
    ("labels from mask tiles, 1 thread", "labels with NumPy on the whole level-0 mask"),
    ("labels from mask tiles, 2 threads", "labels from mask tiles, 1 thread"),
]


def record(benchmark, name: str, n: int, **extra: object) -> None:
    """RATES[name] = n samples over the benchmark's median round, also kept in its extra_info. With
    --benchmark-disable (each benchmark body run once, as a smoke test) there are no timings: nothing
    is recorded."""
    if benchmark.stats is None:
        return
    RATES[name] = n / benchmark.stats.stats.median
    benchmark.extra_info.update(samples_per_s=RATES[name], **extra)


@pytest.fixture(scope="session")
def bench_slide(tmp_path_factory) -> dict[str, Path]:
    """The issue's benchmark slide: a 16,384 x 16,384 px synthetic tumour slide with its mask."""
    root = tmp_path_factory.mktemp("bench")
    paths = {"slide": root / "tumor_001.tif", "mask": root / "tumor_001_mask.tif"}
    write_slide(paths["slide"], 16384, seed=1, tumour=True, mask_path=paths["mask"])
    for path in paths.values():  # into the OS page cache
        path.read_bytes()
    return paths


def pytest_terminal_summary(terminalreporter) -> None:
    if not RATES:
        return
    tr = terminalreporter
    tr.section("wsitile throughput (samples/s = window pairs per second)")
    for name, rate in RATES.items():
        tr.write_line(f"{name:<48}{rate:>12,.0f}")
    tr.write_line("")
    for figure, baseline in RATIOS:
        if figure in RATES and baseline in RATES:
            tr.write_line(f"{figure:<48} / {baseline:<44} = {RATES[figure] / RATES[baseline]:6.2f}x")
