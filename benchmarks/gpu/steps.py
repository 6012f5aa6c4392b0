"""GPU call 1 (issue 6, deliverable 1): the two-tower InceptionV3 training step, wsitile against
PyTorch (eager and torch.compile) and Keras 3 on JAX, at 80 px (batch 512) and 299 px (batch 128),
all on random input already on the device, every layer trainable; the seed's partially frozen step
(layers past Keras index 150) as an extra row. One table, printed last.

    python -m benchmarks.gpu.steps [--budget 440] [--groups wsitile keras ...]
    python -m benchmarks.gpu.steps --smoke        # CPU: small batches, small wsitile model, minutes

Each framework group runs in its own process: JAX preallocates most of the GPU's memory, PyTorch
keeps a caching allocator, and a group that crashes or overruns the budget must not take the others'
numbers with it. Groups run in order of importance (the issue's ratios first, then the extras), each
killed at the budget's end; what did not run is marked in the table.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .common import Budget, Row, card, has_gpu, measure, save, table

GROUPS = ("torch-eager", "wsitile", "keras", "wsitile-frozen", "torch-compile", "wsitile-study")
LABEL = {
    "torch-eager": "PyTorch eager",
    "wsitile": "wsitile JAX",
    "keras": "Keras 3 JAX",
    "wsitile-frozen": "wsitile JAX, layers < 150 frozen",
    "torch-compile": "PyTorch torch.compile",
    "wsitile-study": "wsitile JAX, where the time goes",
}
# Dense bf16 tensor-core peak (NVIDIA's data sheets; H100 SXM and H200 share the chip), HBM bandwidth.
PEAK = {"H100": (989e12, 3.35e12), "H200": (989e12, 4.8e12)}
GPU_BATCH = {80: 512, 299: 128}  # the issue's
SMOKE_BATCH = {80: 2, 299: 1}


def build(group: str, side: int, batch: int, smoke: bool):
    if group.startswith("wsitile"):
        from benchmarks.train_steps import wsitile_step

        return wsitile_step(side, batch, width=0.25 if smoke else 1.0,
                            fine_tune_from=150 if group == "wsitile-frozen" else 0)
    if group == "keras":
        from benchmarks.train_steps import keras_step

        return keras_step(side, batch, bf16=has_gpu())
    from .torch_baseline import build as torch_build

    # On a CPU inductor spends minutes generating C++ for InceptionV3; aot_eager still checks that
    # dynamo captures the model and its backward.
    return torch_build(side, batch, compiled=group == "torch-compile", backend="aot_eager" if smoke else "inductor")


def study(run, side: int, batch: int, smoke: bool, rate: float) -> dict:
    """Where the step's time goes, for the train step `run` (benchmarks.train_steps.wsitile_step)
    measured at `rate` pairs/s: XLA's cost analysis of the compiled step (FLOPs and bytes per step)
    against the card's peaks, and the optimised HLO's op mix (cuDNN convolutions, fusions, layout
    transposes and copies). Run at twice the issue's batch: a step that speeds up with a bigger batch
    was bound by per-kernel overheads, not by the math."""
    import re

    t0 = time.perf_counter()
    compiled = run.lower().compile()  # the computation timed (JAX may serve it from its cache)
    print(f"[study {side}px b{batch}] compiled for analysis in {time.perf_counter() - t0:.1f} s", flush=True)
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops, moved = float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))
    hlo = compiled.as_text()
    ops = {name: len(re.findall(pattern, hlo)) for name, pattern in (
        ("convolutions", r"custom_call_target=\"__cudnn\$conv"), ("fusions", r"= \S+ fusion\("),
        ("transposes", r"= \S+ transpose\("), ("copies", r"= \S+ copy\("),
        ("all convolution ops", r"convolution\("))}
    steps_per_s = rate / batch
    out = {"flops_per_step": flops, "bytes_per_step": moved, "tflops": flops * steps_per_s / 1e12,
           "hbm_gbs": moved * steps_per_s / 1e9, "ops": ops}
    name = card()
    for chip, (tflops, hbm) in PEAK.items():
        if chip in name:
            out.update(mfu=flops * steps_per_s / tflops, hbm_share=moved * steps_per_s / hbm)
    print(f"[study {side}px b{batch}] {flops / 1e9:,.1f} GFLOP and {moved / 1e9:.2f} GB per step (XLA's estimate); "
          f"{out['tflops']:.3g} TFLOP/s, {out['hbm_gbs']:.0f} GB/s at {rate:,.0f} pairs/s"
          + (f" = {out['mfu']:.0%} of bf16 peak, {out['hbm_share']:.0%} of HBM" if "mfu" in out else "")
          + f"; optimised HLO: {ops}", flush=True)
    return out


def trace_steps(run, side: int, batch: int) -> dict:
    """A profiler trace of 3 steps (benchmarks/gpu/profile.py): device busy time, kernels, time by kind
    of work. The trace itself goes to $OUT when it is small enough to come back."""
    import shutil

    from .profile import format_summary, profile

    try:
        s = profile(run, 3, Path(tempfile.mkdtemp(prefix=f"wsitile-trace-{side}-")))
    except Exception as exc:  # noqa: BLE001 - the figures above stand without it
        return {"note": f"profile failed: {type(exc).__name__}: {exc}"}
    out = os.environ.get("OUT")
    trace = Path(s["trace"])
    if out and trace.stat().st_size < 24 << 20:
        shutil.copy(trace, Path(out, f"trace_{side}px_b{batch}.json.gz"))
    print(format_summary(s, f"wsitile JAX {side}px b{batch}"), flush=True)
    return s


def child(args: argparse.Namespace) -> None:
    """Run one group at each side; append a JSON line per side to args.result as soon as it is done."""
    batch = SMOKE_BATCH if args.smoke else GPU_BATCH
    steps, rounds, warm = (1, 2, 1) if args.smoke else (10, 5, 3)
    for side in args.sides:
        result = {"group": args.child, "side": side, "batch": batch[side]}
        if args.deadline - time.time() < args.need:
            result["note"] = "skipped: budget"
        else:
            try:
                t0 = time.perf_counter()
                if args.child == "wsitile-study":  # the plain step at twice the batch, then its analysis
                    result["batch"] = 2 * batch[side]
                    run = build("wsitile", side, 2 * batch[side], args.smoke)
                else:
                    run = build(args.child, side, batch[side], args.smoke)
                run(1)  # compile (XLA, Keras jit, torch.compile) or cudnn autotuning
                result["warmup_s"] = time.perf_counter() - t0
                run(warm)  # allocator and autotuner settle
                rate, rates = measure(run, steps, result["batch"], rounds)
                result.update(rate=rate, rates=rates)
                if args.child == "wsitile-study":
                    result["study"] = study(run, side, result["batch"], args.smoke, rate)
                    result["profile"] = trace_steps(run, side, result["batch"])
                print(f"[{args.child} {side}px] {rate:,.0f} pairs/s, rounds "
                      + ", ".join(f"{r:,.0f}" for r in rates) + f"; warm-up {result['warmup_s']:.0f} s", flush=True)
                del run
                gc.collect()
            except Exception as exc:  # noqa: BLE001 - the table says what broke; the log has the trace
                import traceback

                traceback.print_exc()
                result["note"] = f"error: {type(exc).__name__}: {' '.join(str(exc).split())[:120]}"
        with open(args.result, "a") as fh:
            fh.write(json.dumps(result) + "\n")


def parent(args: argparse.Namespace) -> None:
    budget = Budget(args.budget)
    print(f"steps: {card()}; budget {args.budget:.0f} s; groups {' '.join(args.groups)}", flush=True)
    results: dict[tuple[str, int], dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp, "results.jsonl")
        for group in args.groups:
            left = budget.left() - args.reserve
            if left < args.need:
                print(f"[{group}] skipped: {budget.left():.0f} s left", flush=True)
                continue
            cmd = [sys.executable, "-m", "benchmarks.gpu.steps", "--child", group, "--result", str(path),
                   "--deadline", str(time.time() + left), "--need", str(args.need),
                   "--sides", *map(str, args.sides)] + (["--smoke"] if args.smoke else [])
            t0 = time.monotonic()
            try:
                proc = subprocess.run(cmd, timeout=left, env={**os.environ, "KERAS_BACKEND": "jax"})
                status = f"exit {proc.returncode}"
            except subprocess.TimeoutExpired:
                status = "killed at the budget's end"
            print(f"[{group}] {status} after {time.monotonic() - t0:.0f} s", flush=True)
        if path.exists():
            for line in path.read_text().splitlines():
                r = json.loads(line)
                results[(r["group"], r["side"])] = r

    def get(group: str, side: int) -> tuple[float | None, str]:
        r = results.get((group, side))
        if r is None:
            return None, "not run (budget or crash)" if group in args.groups else "not asked for"
        note = r.get("note", "")
        if "warmup_s" in r:
            note = (note + f" warm-up {r['warmup_s']:.0f} s").strip()
        return r.get("rate"), note

    rows: list[Row] = []
    for side in args.sides:
        b = (SMOKE_BATCH if args.smoke else GPU_BATCH)[side]
        ws, ws_note = get("wsitile", side)
        st, st_note = get("wsitile-study", side)
        te, te_note = get("torch-eager", side)
        ke, ke_note = get("keras", side)
        fr, fr_note = get("wsitile-frozen", side)
        tc, tc_note = get("torch-compile", side)
        at = f"{side}px b{b}"
        rows += [
            Row(f"{LABEL['wsitile']} {at}", ws, f"{LABEL['torch-eager']} {at}", te, 1.5, ws_note),
            Row(f"{LABEL['wsitile']} {at}", ws, f"{LABEL['keras']} {at}", ke, 1.2, ""),
            Row(f"{LABEL['wsitile-frozen']} {at}", fr, f"{LABEL['wsitile']} {at}", ws, None, fr_note),
            Row(f"{LABEL['keras']} {at}", ke, f"{LABEL['torch-eager']} {at}", te, None, ke_note),
            Row(f"{LABEL['torch-compile']} {at}", tc, f"{LABEL['torch-eager']} {at}", te, None, tc_note),
            Row(f"{LABEL['torch-eager']} {at}", te, "", None, None, te_note),
            Row(f"{LABEL['wsitile']} {side}px b{2 * b}", st, f"{LABEL['wsitile']} {at}", ws, None,
                _study_note(results.get(("wsitile-study", side)), st_note)),
        ]
    save(rows, "steps.json")
    from .profile import format_summary

    for side in args.sides:  # the profiles before the table, which stays the last thing printed
        prof = results.get(("wsitile-study", side), {}).get("profile")
        if prof and "wall_ms_per_step" in prof:
            print("\n" + format_summary(prof, f"wsitile JAX {side}px b{2 * (SMOKE_BATCH if args.smoke else GPU_BATCH)[side]}"
                                        + (" (SMOKE)" if args.smoke else "")), flush=True)
        elif prof:
            print(f"\n[profile {side}px] {prof.get('note')}", flush=True)
    smoke = " (SMOKE: small wsitile model, CPU; not comparable)" if args.smoke else ""
    print("\n" + table(f"Train step, pairs/s, input on the device{smoke}", "pairs/s", rows), flush=True)


def _study_note(r: dict | None, note: str) -> str:
    if not r or "study" not in r:
        return note
    st = r["study"]
    share = f" = {st['mfu']:.0%} of bf16 peak, {st['hbm_share']:.0%} of HBM" if "mfu" in st else ""
    return (f"{st['flops_per_step'] / 1e9:,.1f} GFLOP, {st['bytes_per_step'] / 1e9:.1f} GB per step; "
            f"{st['tflops']:.3g} TFLOP/s, {st['hbm_gbs']:.0f} GB/s{share}; HLO {st['ops']}; {note}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="CPU check: batch 2/1, wsitile width 0.25, 1-step rounds")
    p.add_argument("--budget", type=float, default=440.0, help="seconds for the whole script (default 440)")
    p.add_argument("--groups", nargs="+", choices=GROUPS, default=list(GROUPS), help="which groups, in order")
    p.add_argument("--sides", nargs="+", type=int, default=[80, 299], choices=[80, 299])
    p.add_argument("--need", type=float, default=None,
                   help="seconds a group needs to be worth starting (default 60 on a GPU, 0 with --smoke)")
    p.add_argument("--reserve", type=float, default=5.0, help="seconds kept for the table")
    p.add_argument("--child", choices=GROUPS, help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.need is None:
        args.need = 0.0 if args.smoke else 60.0
    child(args) if args.child else parent(args)


if __name__ == "__main__":
    main()
