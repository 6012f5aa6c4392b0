"""Where a jitted step's device time goes (issue 6, deliverable 1): a `jax.profiler` trace of a few
steps, summarised from the Perfetto JSON that JAX writes beside the XPlane file, so the device call
needs no TensorBoard/xprof wheels.

    summary = profile(run, steps=3, out_dir=Path("/tmp/trace"))   # run(n): n steps, waits for the device
    print(format_summary(summary))

What it reports per step: wall time, the union of the GPU streams' kernel intervals (busy time; the
rest is the device waiting for the host: launch overhead, Python, synchronisation), kernel count and
how much of the time is in short kernels (< 10 us: a launch-bound step), the time by kind of work
(cuDNN convolutions, layout transposes, GEMMs, reduction fusions such as BatchNorm's statistics,
elementwise fusions, copies), and the longest kernels and XLA ops by name. On a CPU there are no device
tracks; the summary says so (the smoke run checks that the trace is taken and read).
"""

from __future__ import annotations

import collections
import gzip
import json
import re
from pathlib import Path
from typing import Callable

ANNOTATION = "wsitile-profiled-steps"
SHORT_US = 10.0
# First match wins, on lower-cased kernel names (GPU stream lines) or XLA op names ("XLA Ops" line).
CATEGORIES = (
    ("layout transposes", r"nchwtonhwc|nhwctonchw|transpose|copy_|^copy"),
    ("convolutions (cuDNN)", r"conv(?!ert)|xmma|implicit_gemm|dgrad|wgrad|fprop|cudnn|custom-call"),
    ("GEMMs", r"gemm|cublas|cutlass|matmul|dot"),
    ("reduction fusions (BN statistics, pooling, loss)", r"reduc|input_|scatter"),
    ("elementwise fusions", r"fusion|loop_|elementwise|convert|select|add|multiply"),
    ("memcpy/memset", r"memcpy|memset"),
)


def category(name: str) -> str:
    low = name.lower()
    for label, pattern in CATEGORIES:
        if re.search(pattern, low):
            return label
    return "other"


def _merged_length(intervals: list[tuple[float, float]]) -> float:
    """Total length of the union of [start, end) intervals."""
    total, end = 0.0, float("-inf")
    for s, e in sorted(intervals):
        if s > end:
            total += e - s
            end = e
        elif e > end:
            total += e - end
            end = e
    return total


def summarise(trace: dict, steps: int) -> dict:
    """The summary of one Perfetto/Chrome trace (dict with traceEvents) that covers `steps` steps
    inside a host event named ANNOTATION."""
    events = trace.get("traceEvents", []) if isinstance(trace, dict) else trace
    procs = {e["pid"]: e.get("args", {}).get("name", "") for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name"}
    threads = {(e["pid"], e["tid"]): e.get("args", {}).get("name", "") for e in events
               if e.get("ph") == "M" and e.get("name") == "thread_name"}
    spans = [e for e in events if e.get("ph") == "X" and "dur" in e]
    window = [e for e in spans if e.get("name") == ANNOTATION]
    if not window:
        raise ValueError(f"the trace has no host event {ANNOTATION!r}: was it taken around the steps?")
    t0, t1 = window[0]["ts"], window[0]["ts"] + window[0]["dur"]
    wall_us = t1 - t0
    devices = {pid for pid, name in procs.items() if "gpu" in name.lower() or "device" in name.lower()}
    kernels, ops = [], []
    for e in spans:
        if e["pid"] not in devices or e["ts"] < t0 or e["ts"] > t1:
            continue
        line = threads.get((e["pid"], e["tid"]), "").lower()
        if "xla ops" in line:
            ops.append(e)
        elif "stream" in line or "memcpy" in line:
            kernels.append(e)
    out: dict = {"steps": steps, "wall_ms_per_step": wall_us / 1e3 / steps, "device_tracks": sorted(
        {threads.get((e["pid"], e["tid"]), "?") for e in spans if e["pid"] in devices})}
    if not kernels:
        out["note"] = "no GPU kernel events in the trace (a CPU run, or the profiler saw no device)"
        return out
    busy_us = _merged_length([(e["ts"], e["ts"] + e["dur"]) for e in kernels])
    total_us = sum(e["dur"] for e in kernels)
    short = [e["dur"] for e in kernels if e["dur"] < SHORT_US]
    by_cat: dict[str, float] = collections.Counter()
    by_name: dict[str, float] = collections.Counter()
    for e in kernels:
        by_cat[category(e["name"])] += e["dur"]
        by_name[e["name"]] += e["dur"]
    out.update(
        busy_ms_per_step=busy_us / 1e3 / steps, busy_share=busy_us / wall_us,
        kernels_per_step=len(kernels) / steps, kernel_ms_per_step=total_us / 1e3 / steps,
        short_kernels_share=len(short) / len(kernels), short_kernels_time_share=sum(short) / total_us,
        categories={k: (v / 1e3 / steps, v / total_us) for k, v in sorted(by_cat.items(), key=lambda kv: -kv[1])},
        top_kernels=[(k[:100], v / 1e3 / steps) for k, v in by_name.most_common(12)],
    )
    if ops:
        by_op: dict[str, float] = collections.Counter()
        for e in ops:
            by_op[re.sub(r"\.\d+$", "", e["name"])] += e["dur"]  # fusion.12 -> fusion: kinds, not instances
        op_total = sum(by_op.values())
        out["top_ops"] = [(k[:100], v / 1e3 / steps, v / op_total) for k, v in by_op.most_common(12)]
    return out


def profile(run: Callable[[int], None], steps: int, out_dir: Path) -> dict:
    """Trace run(steps) (already compiled and warm) into out_dir and summarise it."""
    import jax

    out_dir.mkdir(parents=True, exist_ok=True)
    with jax.profiler.trace(str(out_dir), create_perfetto_trace=True):
        with jax.profiler.TraceAnnotation(ANNOTATION):
            run(steps)
    paths = sorted(out_dir.rglob("perfetto_trace.json.gz"), key=lambda p: p.stat().st_mtime)
    if not paths:
        raise FileNotFoundError(f"jax.profiler wrote no perfetto_trace.json.gz under {out_dir}")
    with gzip.open(paths[-1], "rt") as fh:
        summary = summarise(json.load(fh), steps)
    summary["trace"] = str(paths[-1])
    return summary


def format_summary(s: dict, title: str) -> str:
    """A Markdown block: the per-step figures, then the time by kind and the longest kernels/ops."""
    lines = [f"#### Where the time goes: {title}", ""]
    lines.append(f"- wall {s['wall_ms_per_step']:.2f} ms per step over {s['steps']} traced steps")
    if "note" in s:
        lines.append(f"- {s['note']}; device tracks: {s['device_tracks'] or 'none'}")
        return "\n".join(lines)
    lines += [
        f"- GPU busy (union of kernel intervals) {s['busy_ms_per_step']:.2f} ms = {s['busy_share']:.0%} of wall; "
        f"the rest is the device waiting for the host",
        f"- {s['kernels_per_step']:,.0f} kernels per step, {s['kernel_ms_per_step']:.2f} ms of kernel time; "
        f"{s['short_kernels_share']:.0%} of them under {SHORT_US:g} us, holding {s['short_kernels_time_share']:.0%} "
        "of the kernel time",
        "", "| kind of work | ms/step | share |", "|---|---:|---:|"]
    lines += [f"| {k} | {ms:.2f} | {share:.0%} |" for k, (ms, share) in s["categories"].items()]
    lines += ["", "| longest kernels (total per step) | ms/step |", "|---|---:|"]
    lines += [f"| `{k}` | {ms:.3f} |" for k, ms in s["top_kernels"]]
    if s.get("top_ops"):
        lines += ["", "| XLA op kind | ms/step | share |", "|---|---:|---:|"]
        lines += [f"| `{k}` | {ms:.3f} | {share:.0%} |" for k, ms, share in s["top_ops"]]
    return "\n".join(lines)
