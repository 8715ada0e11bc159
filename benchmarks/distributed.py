"""Step overhead of torchreg under DDP and FSDP2, against the same penalty added to the loss.

Two gloo processes on CPU (127.0.0.1), one run: each rank trains the same MLP on its own batch with
plain SGD, wrapped in DistributedDataParallel or sharded with FSDP2 (``fully_shard`` on every Linear
and the root), with

* ``none``: no regularization (the baseline),
* ``loss-L2`` / ``loss-L1``: the penalty of every Linear weight added to the loss (under FSDP2 the
  weights are sharded outside the forward: the per-rank partial sums are added and gathered once),
* ``torchreg-L2`` / ``torchreg-L1``: ``torchreg.L2(model, lam)`` / ``torchreg.L1(model, lam)``.

A step is zero_grad, forward, backward, optimizer step. The variants run interleaved, a few steps each
per round, so that a change of load on the machine hits all of them alike; the table gives the median
step time of each and its ratio to ``none`` and, for torchreg, to the loss penalty it replaces.

    python3 benchmarks/distributed.py [--layers 8] [--width 512] [--batch 64] [--rounds 15] [--steps 4]
"""

from __future__ import annotations

import argparse
import datetime
import os
import socket
import statistics
import sys
import time
from typing import Any, Callable, Dict, List

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torchreg  # noqa: E402

WORLD = 2
LAM = 1e-4
VARIANTS = ["none", "loss-L2", "torchreg-L2", "loss-L1", "torchreg-L1"]


def build(layers: int, width: int) -> nn.Sequential:
    torch.manual_seed(0)
    mods: List[nn.Module] = []
    for _ in range(layers):
        mods += [nn.Linear(width, width), nn.Tanh()]
    return nn.Sequential(*mods, nn.Linear(width, WORLD))  # (FSDP2: shards of equal size)


def penalty(model: nn.Module, kind: str) -> torch.Tensor:
    total: Any = None
    for m in model.modules():
        if isinstance(m, nn.Linear):
            w = m.weight
            term = LAM * w.abs().sum() if kind == "L1" else LAM / 2 * (w * w).sum()
            total = term if total is None else total + term
    return total.full_tensor() if hasattr(total, "full_tensor") else total  # FSDP2: one all-reduce


def setup(wrapper: str, variant: str, args: argparse.Namespace) -> Callable[[torch.Tensor, torch.Tensor], None]:
    model = build(args.layers, args.width)
    if wrapper == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (WORLD,))
        for layer in model:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        wrapped = fully_shard(model, mesh=mesh)
    if variant.startswith("torchreg-"):
        (torchreg.L1 if variant.endswith("L1") else torchreg.L2)(model, LAM)
    if wrapper == "ddp":
        wrapped = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(wrapped.parameters(), lr=1e-3)
    kind = variant.split("-")[1] if variant.startswith("loss-") else None

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        opt.zero_grad()
        loss = ((wrapped(x) - y) ** 2).mean()
        if kind is not None:
            loss = loss + penalty(model, kind)
        loss.backward()
        opt.step()

    return step


def worker(rank: int, port: int, args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=120))
    g = torch.Generator().manual_seed(rank)
    x, y = torch.randn(args.batch, args.width, generator=g), torch.randn(args.batch, WORLD, generator=g)
    rows = []
    for wrapper in ("ddp", "fsdp2"):
        steps = {v: setup(wrapper, v, args) for v in VARIANTS}
        times: Dict[str, List[float]] = {v: [] for v in VARIANTS}
        for v in VARIANTS:  # warm up
            for _ in range(2):
                steps[v](x, y)
        for _ in range(args.rounds):
            for v in VARIANTS:
                for _ in range(args.steps):
                    dist.barrier()
                    t0 = time.perf_counter()
                    steps[v](x, y)
                    times[v].append(time.perf_counter() - t0)
        # a step's time is the slower rank's (the ranks wait for each other in the collectives)
        mine = torch.tensor([statistics.median(times[v]) for v in VARIANTS], dtype=torch.float64)
        dist.all_reduce(mine, op=dist.ReduceOp.MAX)
        rows.append((wrapper, dict(zip(VARIANTS, mine.tolist()))))
    if rank == 0:
        params = sum(p.numel() for p in build(args.layers, args.width).parameters())
        print(f"{WORLD} gloo processes on CPU, {params / 1e6:.2f}M parameters ({args.layers + 1} Linear), batch "
              f"{args.batch} per rank, {args.rounds} rounds x {args.steps} steps per variant; torch {torch.__version__}; "
              f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
        print(f"{'wrapper':8} {'variant':12} {'median ms':>10} {'vs none':>8} {'vs loss':>8}")
        for wrapper, med in rows:
            for v in VARIANTS:
                vs_loss = f"{med[v] / med['loss-' + v.split('-')[1]]:8.3f}" if v.startswith("torchreg") else " " * 8
                print(f"{wrapper:8} {v:12} {med[v] * 1e3:10.2f} {med[v] / med['none']:8.3f} {vs_loss}")
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(port, args), nprocs=WORLD, join=True)


if __name__ == "__main__":
    main()
