"""GPU call 2 (issue 6, deliverables 2 and 3): the loader from JPEG pyramids on the machine's cores,
and the JAX train step fed by it.

1. Synthetic JPEG-compressed pyramidal slides are generated on the machine (`wsitile.synth`, half
   tumour), enough that the tower levels' pixels are several times the block cache: every epoch
   decodes, as with a real Camelyon16 training set (about a terabyte of pixels at level 2).
2. Loader scaling: augmented window pairs/s of `wsitile.Loader` (shuffled and augmented, as
   `wsitile train` uses it; unlabelled, see `open_loader`) at 1, 2, 4, 8, 16 threads, 80 px (levels 2, 3) and 299 px (levels 0, 1),
   beside the loader a user writes: openslide-python `read_region` per window and tower in a
   `concurrent.futures` thread pool (ctypes releases the GIL), same slides, same windows, no
   augmentation (the issue's anchor), 1 to 16 threads.
3. End to end: the full-width JAX step fed by the Loader on all cores through a device prefetch
   (a thread that `device_put`s batches `--depth` ahead while the step runs), against the same
   step on a batch already on the device.

    python -m benchmarks.gpu.loader [--budget 440] [--slides 16 --size 16384]
    python -m benchmarks.gpu.loader --smoke       # CPU: 2 small slides, 1-2 threads, small model
"""

from __future__ import annotations

import argparse
import itertools
import os
import queue
import resource
import threading
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from .common import Budget, Row, card, measure, save, table

SETTINGS: dict[int, dict[str, Any]] = {  # the seed's towers at 80 px; Liu et al.'s at 299 px
    80: dict(levels=(2, 3), window=80, center=50, stride=80),
    299: dict(levels=(0, 1), window=299, center=128, stride=299),
}
STEP_BATCH = {80: 512, 299: 128}  # the train step's (issue 6)


# --- slides ----------------------------------------------------------------------------------------


def _write(args: tuple[str, int, int, bool]) -> None:
    from wsitile.synth import write_slide

    path, size, seed, tumour = args
    write_slide(path, size, seed=seed, tumour=tumour)


def make_slides(folder: Path, count: int, size: int) -> list[tuple[str, str | None]]:
    """count slides of size x size px, every other one tumour (balanced sampling needs both classes),
    written by parallel processes (write_slide itself uses 4 threads). Files already there from an
    earlier run on the same machine are kept: the generator is deterministic."""
    folder.mkdir(parents=True, exist_ok=True)
    jobs, slides = [], []
    for i in range(count):
        tumour = i % 2 == 0
        path = folder / f"{'tumor' if tumour else 'normal'}_{size}_{i:03d}.tif"
        mask = path.with_name(f"{path.stem}_mask.tif") if tumour else None
        slides.append((str(path), None if mask is None else str(mask)))
        if not path.exists() or (mask is not None and not mask.exists()):
            jobs.append((str(path), size, 1000 + i, tumour))
    if jobs:
        with ProcessPoolExecutor(max(1, min(len(jobs), (os.cpu_count() or 4) // 4))) as pool:
            list(pool.map(_write, jobs))
    return slides


def tower_megabytes(slides: list[tuple[str, str | None]], levels: tuple[int, ...]) -> float:
    """Decoded RGB size of the tower levels of all slides (what would have to fit the block cache)."""
    from wsitile import Slide

    total = 0
    for path, _ in slides:
        s = Slide(path)
        total += sum(int(np.prod(s.level_dimensions[lvl])) * 3 for lvl in levels)
    return total / 2**20


# --- loader scaling --------------------------------------------------------------------------------


def forever(loader) -> Iterator[dict[str, np.ndarray]]:
    while True:
        yield from loader


def open_loader(slides, side: int, batch: int, threads: int, cache_mb: int, labels: bool = True,
                tile_regions: bool = True):
    """The Loader as `wsitile train` opens it (shuffled, balanced, augmented). labels=False drops the
    masks and the balancing for the scaling rows: a sample's label does not change what it costs to
    cut, and the rows then time cutting alone (labelling from mask tiles is ~0.05 s per 16k slide)."""
    from wsitile import Loader

    if not labels:
        slides = [(path, None) for path, _ in slides]
    return Loader(slides, **SETTINGS[side], batch_size=batch, threads=threads, shuffle=True, balanced=labels,
                  augment=True, drop_last=True, cache_mb=cache_mb, seed=0, tile_regions=tile_regions)


def busiest_mhz(cores: int) -> float | None:
    """Mean clock of the `cores` fastest-running cores now (/proc/cpuinfo), None where it is not
    given. Sampled while the loader's threads run: a clock that falls as threads are added (turbo
    bins, AVX licences) makes each pair cost more CPU time without any sharing between threads.
    (A VM may report a constant nominal clock: then equal figures say nothing.)"""
    try:
        with open("/proc/cpuinfo") as fh:
            clocks = sorted((float(line.split(":")[1]) for line in fh if line.startswith("cpu MHz")), reverse=True)
    except (OSError, ValueError, IndexError):
        return None
    return sum(clocks[:cores]) / min(cores, len(clocks)) if clocks else None


class CpuClock:
    """The process's CPU time (every thread, user + system) and context switches over a block: CPU
    time per pair that grows with the thread count means each pair costs more (memory bandwidth,
    shared cores, contended locks, a lower clock: `busiest_mhz`, sampled at the block's end while
    the threads still run); flat CPU per pair with falling efficiency means threads idle."""

    def __init__(self, threads: int = 1):
        self.threads = threads

    def __enter__(self) -> "CpuClock":
        self.r0, self.t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.mhz = busiest_mhz(self.threads)
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        self.wall = time.perf_counter() - self.t0
        self.user, self.sys = r1.ru_utime - self.r0.ru_utime, r1.ru_stime - self.r0.ru_stime
        self.switches = (r1.ru_nvcsw - self.r0.ru_nvcsw) + (r1.ru_nivcsw - self.r0.ru_nivcsw)

    def per_pair(self, pairs: int) -> str:
        cpu = self.user + self.sys
        clock = f", busiest {self.threads} cores at {self.mhz:,.0f} MHz" if self.mhz else ""
        return (f"CPU {1e3 * cpu / max(pairs, 1):.2f} ms/pair ({self.sys / max(cpu, 1e-9):.0%} system), "
                f"{self.switches / max(pairs, 1):.2f} switches/pair{clock}")


def loader_rate(slides, side: int, batch: int, threads: int, cache_mb: int, seconds: float,
                tile_regions: bool = True) -> tuple[float, str]:
    """Augmented pairs/s of a fresh loader (empty caches) after its first batch (the pipeline fill),
    and its CPU cost per pair (CpuClock)."""
    with open_loader(slides, side, batch, threads, cache_mb, labels=False, tile_regions=tile_regions) as loader:
        it = forever(loader)
        next(it)
        n = 0
        with CpuClock(threads) as clock:
            while time.perf_counter() - clock.t0 < seconds:
                n += len(next(it)["labels"])
        return n / clock.wall, clock.per_pair(n)


def window_positions(slides, side: int, cache_mb: int, threads: int) -> tuple[np.ndarray, list[int]]:
    """Every window of the loader's grids as (slide, level-0 x/y of tower 0, of tower 1), shuffled."""
    s = SETTINGS[side]
    with open_loader(slides, side, 1, threads, cache_mb, labels=False) as loader:
        rows = []
        for i, g in enumerate(loader.grids):
            d0, d1 = g.downsamples
            cx = (g.xy[:, 0] + s["window"] / 2) * d0  # the shared centre, level 0 (DESIGN.md: Towers)
            cy = (g.xy[:, 1] + s["window"] / 2) * d0
            t1x = np.round(np.floor(cx / d1 - s["window"] / 2) * d1)
            t1y = np.round(np.floor(cy / d1 - s["window"] / 2) * d1)
            rows.append(np.stack([np.full(len(g), i), g.coords[:, 0], g.coords[:, 1], t1x, t1y], 1).astype(np.int64))
    pos = np.concatenate(rows)
    return pos[np.random.default_rng(0).permutation(len(pos))], list(s["levels"])


def openslide_rate(slides, positions: np.ndarray, levels: list[int], window: int, threads: int,
                   seconds: float) -> tuple[float, str]:
    """The straightforward loader: one shared OpenSlide handle per slide, read_region per window and
    tower in a thread pool; each thread takes chunks of 32 windows from a shared counter until time."""
    import openslide

    handles = [openslide.OpenSlide(p) for p, _ in slides]
    chunks = max(1, len(positions) // 32)
    counter = itertools.count()  # next() on it is atomic under the GIL
    l0, l1 = levels
    size = (window, window)
    start = time.perf_counter()
    deadline = start + seconds

    def worker() -> int:
        n = 0
        while time.perf_counter() < deadline:
            k = next(counter) % chunks
            for s, x0, y0, x1, y1 in positions[k * 32 : (k + 1) * 32]:
                h = handles[s]
                a = np.asarray(h.read_region((int(x0), int(y0)), l0, size))[..., :3]
                b = np.asarray(h.read_region((int(x1), int(y1)), l1, size))[..., :3]
                np.stack([a, b])
                n += 1
        return n

    with CpuClock(threads) as clock, ThreadPoolExecutor(threads) as pool:
        total = sum(pool.map(lambda _: worker(), range(threads)))
    elapsed = time.perf_counter() - start
    for h in handles:
        h.close()
    return total / elapsed, clock.per_pair(total)


def scaling(slides, side: int, args, budget: Budget) -> list[Row]:
    rows: list[Row] = []
    rates: dict[int, float] = {}
    base: dict[int, float] = {}
    positions, levels = window_positions(slides, side, args.cache_mb, max(args.threads))
    with open_loader(slides, side, 1, 1, args.cache_mb, labels=False) as probe:
        regions = probe.tile_regions_used[0]
    print(f"[scaling {side}px] {len(positions):,} windows; tower levels {levels} hold "
          f"{tower_megabytes(slides, tuple(levels)):,.0f} MB decoded, block cache {args.cache_mb} MB; "
          f"windows from tile parts (uncached) per tower: {regions}", flush=True)
    for t in args.threads:
        if not budget.allows(2 * args.seconds + 10):
            print(f"[scaling {side}px] {t} threads skipped: budget", flush=True)
            continue
        rates[t], cpu = loader_rate(slides, side, args.loader_batch[side], t, args.cache_mb, args.seconds)
        base[t], base_cpu = openslide_rate(slides, positions, levels, side, t, args.seconds)
        print(f"[scaling {side}px] {t:2d} threads: wsitile {rates[t]:,.0f} pairs/s, {cpu}; "
              f"openslide pool {base[t]:,.0f} pairs/s, {base_cpu}", flush=True)
        efficiency = f"efficiency {rates[t] / (t * rates[args.threads[0]]):.0%}; " if args.threads[0] == 1 else ""
        rows.append(Row(f"wsitile Loader {side}px, augmented, {t} thr", rates[t],
                        f"openslide read_region pool, {t} thr", base[t], None, efficiency + cpu))
    if rates and base:
        top = max(rates)
        best = max(base, key=base.get)  # type: ignore[arg-type]
        rows.append(Row(f"wsitile Loader {side}px, {top} thr", rates[top], f"openslide pool best ({best} thr)",
                        base[best], 3.0 if side == 80 else None, "issue: >= 15,000 pairs/s at 80 px" if side == 80 else ""))
        if 1 in rates and top > 1:
            rows.append(Row(f"wsitile Loader {side}px, {top} thr", rates[top], f"{top} x wsitile 1 thr",
                            top * rates[1], 0.8, "parallel efficiency"))
        if any(regions) and budget.allows(args.seconds + 10):  # the same loader with whole tiles cached
            whole, cpu = loader_rate(slides, side, args.loader_batch[side], top, args.cache_mb, args.seconds,
                                     tile_regions=False)
            print(f"[scaling {side}px] {top:2d} threads, whole tiles through the cache: {whole:,.0f} pairs/s, {cpu}",
                  flush=True)
            rows.append(Row(f"wsitile Loader {side}px, {top} thr (tile parts)", rates[top],
                            f"same, tile_regions=False (whole tiles cached), {top} thr", whole, None, f"whole tiles: {cpu}"))
    return rows


# --- end to end ------------------------------------------------------------------------------------


class DevicePrefetch:
    """Batches from the loader, put on the device `depth` ahead by a thread of their own, so the
    host's work (the loader's wait, the host-to-device copy) overlaps the step on the device. The
    Loader's next() and device_put both release the GIL, so the thread does not hold up dispatch."""

    def __init__(self, loader, place: Callable[[np.ndarray], Any], depth: int):
        self._q: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._fill, args=(loader, place), daemon=True)
        self._thread.start()

    def _fill(self, loader, place) -> None:
        try:
            for batch in forever(loader):
                item = (place(batch["images"]), place(batch["labels"]))
                while not self._stop.is_set():
                    try:
                        self._q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self._stop.is_set():
                    return
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which raises it
            self._q.put(exc)

    def __next__(self):
        item = self._q.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def end_to_end(slides, side: int, args) -> list[Row]:
    import jax

    from benchmarks.train_steps import random_pairs
    from wsitile.train import Steps, TrainConfig, create_state

    s = SETTINGS[side]
    batch = args.step_batch[side]
    cfg = TrainConfig(levels=s["levels"], window=side, center=s["center"], stride=s["stride"],
                      width=args.width, batch_size=batch, fine_tune_from=0, learning_rate=1e-4)
    steps = Steps(cfg)
    holder = {"state": steps.place_state(create_state(cfg))}
    images, labels = random_pairs(side, batch)
    x, y = steps.place_batch(images), steps.place_batch(labels)

    def run(n: int, source: Callable[[], tuple[Any, Any]]) -> None:
        st = holder["state"]
        for _ in range(n):
            xb, yb = source()
            st, metrics = steps.train_step(st, xb, yb)
        jax.block_until_ready(metrics["loss"])
        holder["state"] = st

    t0 = time.perf_counter()
    run(1, lambda: (x, y))  # compile (the fed step has the same shapes and shardings)
    print(f"[e2e {side}px] compiled in {time.perf_counter() - t0:.0f} s", flush=True)
    on_device, _ = measure(lambda n: run(n, lambda: (x, y)), args.e2e_steps, batch, args.rounds)
    with open_loader(slides, side, batch, args.threads[-1], args.cache_mb) as loader:
        feed = DevicePrefetch(loader, steps.place_batch, args.depth)
        try:
            run(args.depth + 2, lambda: next(feed))  # fill the pipeline
            fed, fed_rounds = measure(lambda n: run(n, lambda: next(feed)), args.e2e_steps, batch, args.rounds)
        finally:
            feed.close()
    print(f"[e2e {side}px] on device {on_device:,.0f}, fed by the Loader {fed:,.0f} pairs/s "
          f"(rounds {', '.join(f'{r:,.0f}' for r in fed_rounds)})", flush=True)
    return [Row(f"JAX step fed by Loader ({args.threads[-1]} thr, prefetch {args.depth}) {side}px b{batch}", fed,
                "same step, input on the device", on_device, 0.9, f"width {args.width:g}")]


# --- main ------------------------------------------------------------------------------------------


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="CPU check: 2 slides of 4096 px, 1-2 threads, tiny batches")
    p.add_argument("--budget", type=float, default=440.0, help="seconds for the whole script (default 440)")
    p.add_argument("--data", type=Path, default=Path("/tmp/wsitile-gpu-slides"))
    p.add_argument("--slides", type=int, default=None, help="slides to generate (default 16; smoke 2)")
    p.add_argument("--size", type=int, default=None, help="slide side in px (default 16384; smoke 4096)")
    p.add_argument("--cache-mb", type=int, default=None, help="Loader block cache (default 512, the Loader's; smoke 1)")
    p.add_argument("--threads", type=int, nargs="+", default=None, help="thread counts (default 1 2 4 8 16)")
    p.add_argument("--seconds", type=float, default=None, help="seconds per scaling point (default 3)")
    p.add_argument("--sides", type=int, nargs="+", default=[80, 299], choices=[80, 299])
    p.add_argument("--no-e2e", action="store_true", help="loader scaling only")
    p.add_argument("--depth", type=int, default=2, help="batches the device prefetch keeps in flight")
    args = p.parse_args()
    smoke = args.smoke
    args.slides = args.slides or (2 if smoke else 16)
    args.size = args.size or (4096 if smoke else 16384)
    args.cache_mb = args.cache_mb if args.cache_mb is not None else (1 if smoke else 512)
    args.threads = args.threads or ([1, 2] if smoke else [1, 2, 4, 8, 16])
    args.seconds = args.seconds or (0.5 if smoke else 3.0)
    args.loader_batch = {80: 8, 299: 4} if smoke else {80: 256, 299: 64}
    args.step_batch = {80: 4, 299: 2} if smoke else STEP_BATCH
    args.width = 0.25 if smoke else 1.0
    args.e2e_steps, args.rounds = (2, 2) if smoke else (20, 3)
    budget = Budget(args.budget)
    print(f"loader: {card()}; {os.cpu_count()} cores; budget {args.budget:.0f} s", flush=True)

    t0 = time.perf_counter()
    slides = make_slides(args.data, args.slides, args.size)
    print(f"[slides] {args.slides} x {args.size} px in {args.data} ready after {time.perf_counter() - t0:.0f} s",
          flush=True)
    rows: list[Row] = []
    phases: list[tuple[str, Callable[[int], list[Row]], float]] = [
        ("scaling", lambda side: scaling(slides, side, args, budget), 30.0),
        ("e2e", lambda side: end_to_end(slides, side, args), 0.0 if smoke else 90.0),  # compiling: ~1 min
    ]
    for side in args.sides:  # each size's scaling, then its end to end
        for name, phase, need in phases:
            if name == "e2e" and args.no_e2e:
                continue
            if not budget.allows(need):
                rows.append(Row(f"{name} {side}px", None, note="skipped: budget"))
                continue
            try:
                rows += phase(side)
            except Exception as exc:  # noqa: BLE001 - the table names the failure; the log has the trace
                import traceback

                traceback.print_exc()
                rows.append(Row(f"{name} {side}px", None, note=f"error: {type(exc).__name__}: {str(exc)[:100]}"))
    save(rows, "loader.json")
    title = "Loader scaling and end to end, pairs/s" + (" (SMOKE: CPU, tiny slides; not comparable)" if smoke else "")
    print("\n" + table(title, "pairs/s", rows), flush=True)


if __name__ == "__main__":
    main()
