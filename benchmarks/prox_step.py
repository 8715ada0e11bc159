"""Cost of proximal regularization: training-step time, plain vs gradient-mode L1 vs proximal L1.

For each model and optimizer, times a full training step (zero_grad, forward, backward, step) of:

* ``plain``: no regularization;
* ``L1 grad``: ``torchreg.L1(model, lam)``, the gradient term added at backward;
* ``L1 prox``: ``torchreg.L1(model, lam, proximal=True)``, soft-thresholding after the optimizer step;
* ``GL prox``: ``torchreg.GroupLasso(model, lam, dim=0, proximal=True)``, the group operator (under Adam
  the exact per-coordinate root-find).

and prints the median step time and the median ratio to ``plain`` (variants interleaved round by round,
so that machine noise hits all alike). It also reports the bytes allocated during ``optimizer.step()``
(new tensors' bytes, counted by a dispatch mode; the total and the largest one), plain vs proximal: the proximal step may allocate parameter-sized temporaries one
tensor at a time, never the size of the model.

Run: python benchmarks/prox_step.py [--rounds 30] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable, Dict, List

import torch
import torch.utils._pytree as pytree
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import torchreg

LAM = 1e-4


def wide_mlp() -> nn.Module:  # 4.2M parameters in 8 tensors
    return nn.Sequential(nn.Linear(512, 1024), nn.ReLU(), nn.Linear(1024, 2048), nn.ReLU(),
                         nn.Linear(2048, 1024), nn.ReLU(), nn.Linear(1024, 16))


def deep_mlp() -> nn.Module:  # 0.2M parameters in 100 tensors
    layers: List[nn.Module] = []
    for _ in range(50):
        layers += [nn.Linear(64, 64), nn.Tanh()]
    return nn.Sequential(*layers)


MODELS = {"wide MLP (4.2M, 8 tensors)": (wide_mlp, 512), "deep MLP (0.2M, 100 tensors)": (deep_mlp, 64)}
OPTIMIZERS: Dict[str, Callable] = {
    "SGD momentum": lambda p: torch.optim.SGD(p, lr=1e-3, momentum=0.9),
    "Adam": lambda p: torch.optim.Adam(p, lr=1e-4),
}
VARIANTS: Dict[str, Callable[[nn.Module], None]] = {
    "plain": lambda m: None,
    "L1 grad": lambda m: torchreg.L1(m, LAM),
    "L1 prox": lambda m: torchreg.L1(m, LAM, proximal=True),
    "GL prox": lambda m: torchreg.GroupLasso(m, LAM, dim=0, proximal=True),
}


def make(build: Callable[[], nn.Module], variant: str, optimizer: str):
    torch.manual_seed(0)
    model = build()
    VARIANTS[variant](model)
    return model, OPTIMIZERS[optimizer](model.parameters())


def step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor) -> None:
    opt.zero_grad()
    model(x).square().mean().backward()
    opt.step()


class _Allocations(TorchDispatchMode):
    """Sums the bytes of every new tensor an op returns (outputs that share no input's storage)."""

    def __init__(self) -> None:
        super().__init__()
        self.total = 0
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in pytree.tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.total += t.untyped_storage().nbytes()
                self.largest = max(self.largest, t.untyped_storage().nbytes())
        return out


def step_allocations(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor):
    """(total, largest) bytes of the new tensors made inside optimizer.step(), its hooks included."""
    opt.zero_grad()
    model(x).square().mean().backward()
    with _Allocations() as counter:
        opt.step()
    return counter.total, counter.largest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, batch {args.batch}, {args.rounds} rounds\n")
    header = (f"{'model':<29} {'optimizer':<13} {'variant':<8} {'median ms':>9} {'x plain':>8} "
              f"{'step alloc MB':>13} {'largest MB':>10}")
    print(header)
    print("-" * len(header))
    for model_name, (build, width) in MODELS.items():
        x = torch.randn(args.batch, width)
        for opt_name in OPTIMIZERS:
            runs = {v: make(build, v, opt_name) for v in VARIANTS}
            for model, opt in runs.values():  # warm up (optimizer state, allocator)
                for _ in range(3):
                    step(model, opt, x)
            times: Dict[str, List[float]] = {v: [] for v in VARIANTS}
            for _ in range(args.rounds):
                for v, (model, opt) in runs.items():
                    start = time.perf_counter()
                    step(model, opt, x)
                    times[v].append(time.perf_counter() - start)
            ratios = {v: statistics.median(t / p for t, p in zip(times[v], times["plain"])) for v in VARIANTS}
            for v, (model, opt) in runs.items():
                total, largest = step_allocations(model, opt, x)
                print(f"{model_name:<29} {opt_name:<13} {v:<8} {1e3 * statistics.median(times[v]):>9.2f} "
                      f"{ratios[v]:>8.2f} {total / 2**20:>13.2f} {largest / 2**20:>10.2f}")
        print()
    largest = max(p.numel() for p in wide_mlp().parameters()) * 4 / 2**20
    print(f"(largest tensor of the wide MLP: {largest:.1f} MB; the whole model: "
          f"{sum(p.numel() for p in wide_mlp().parameters()) * 4 / 2**20:.1f} MB)")


if __name__ == "__main__":
    main()
