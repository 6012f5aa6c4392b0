"""The PyTorch baseline of issue 6: what a user would write for the seed's model in PyTorch.

Two torchvision InceptionV3 towers (aux logits off, no weights), pooled features concatenated, one
linear logit, BCE-with-logits, RMSprop, bfloat16 autocast, channels_last, random input already on the
device; eager or torch.compile. cudnn.benchmark is on: a user chasing speed sets it, and the baseline
should be PyTorch at its best, not at its defaults.

    python -m benchmarks.gpu.torch_baseline            # 80 px batch 512 and 299 px batch 128, eager and compiled
    python -m benchmarks.gpu.torch_baseline --smoke    # CPU-sized check that it runs

benchmarks/gpu/steps.py runs it beside wsitile and Keras in one call.
"""

from __future__ import annotations

import argparse
import time
from typing import Callable

import torch
from torch import nn
from torchvision.models import inception_v3


class TwoTower(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.towers = nn.ModuleList()
        for _ in range(2):
            # init_weights=False: torchvision's truncated-normal init runs through SciPy and takes
            # seconds; the values do not change the speed of a step.
            net = inception_v3(weights=None, aux_logits=False, init_weights=False)
            net.fc = nn.Identity()  # the 2048 pooled features
            self.towers.append(net)
        self.head = nn.Linear(2 * 2048, 1)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat([self.towers[0](a), self.towers[1](b)], dim=1))[:, 0]


def build(side: int, batch: int, *, compiled: bool = False, backend: str = "inductor",
          device: str | None = None, bf16: bool | None = None) -> Callable[[int], None]:
    """`run(n)`: n optimiser steps on one random batch already on the device, then a synchronize.
    torchvision's InceptionV3 needs at least 75 px; 80 px reaches Mixed_7 at 1x1. bf16 autocast is
    the default on a GPU only: on a CPU without bf16 units it is emulated and ~100x slower."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    bf16 = device == "cuda" if bf16 is None else bf16
    torch.backends.cudnn.benchmark = True
    model = TwoTower().to(device).to(memory_format=torch.channels_last).train()
    opt = torch.optim.RMSprop(model.parameters(), lr=1e-4, alpha=0.9, eps=1.0, momentum=0.9)
    loss_fn = nn.BCEWithLogitsLoss()
    gen = torch.Generator(device=device).manual_seed(side)
    x = [(torch.rand((batch, 3, side, side), generator=gen, device=device) * 2 - 1)
         .contiguous(memory_format=torch.channels_last) for _ in range(2)]
    y = (torch.arange(batch, device=device) % 2).float()
    forward = torch.compile(model, backend=backend) if compiled else model

    def step() -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=bf16):
            logits = forward(*x)
        loss = loss_fn(logits.float(), y)
        loss.backward()
        opt.step()
        return loss

    def run(n: int) -> None:
        for _ in range(n):
            loss = step()
        if device == "cuda":
            torch.cuda.synchronize()
        loss.item()

    return run


def main() -> None:
    from .common import card, measure

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny batches and few steps (CPU check)")
    p.add_argument("--backend", default=None, help="torch.compile backend (default inductor; --smoke: "
                   "aot_eager, since inductor's CPU code generation takes minutes for InceptionV3 there)")
    args = p.parse_args()
    backend = args.backend or ("aot_eager" if args.smoke else "inductor")
    batch = {80: 2, 299: 1} if args.smoke else {80: 512, 299: 128}
    steps, rounds = (1, 2) if args.smoke else (10, 5)
    for compiled in (False, True):
        for side in (80, 299):
            t0 = time.perf_counter()
            run = build(side, batch[side], compiled=compiled, backend=backend)
            run(1 if args.smoke else 3)  # compile / cudnn autotune
            rate, _ = measure(run, steps, batch[side], rounds)
            kind = "torch.compile" if compiled else "eager"
            print(f"{card()}: PyTorch {kind} {side}px batch {batch[side]}: {rate:,.0f} pairs/s "
                  f"(warm-up {time.perf_counter() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
