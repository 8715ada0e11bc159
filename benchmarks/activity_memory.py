#!/usr/bin/env python
"""Extra peak memory (and step time) of activity regularization: torchreg's hooks vs the loss penalty.

For each workload, every regularized module's output is penalized, three ways:

* ``none``              the unregularized step: the reference of the ``extra`` columns.
* ``torchreg L1/L2``    ``torchreg.ActivityL1`` / ``ActivityL2`` on the modules (tensor hook per call).
* ``penalty L1/L2``     what a user writes without torchreg: a forward hook appending
                        ``lam * out.abs().sum() / batch`` (or ``lam / 2 * out.pow(2).sum() / batch``)
                        to a list that is added to the loss.

One step = ``zero_grad(set_to_none=True)``, forward, loss, backward, ``SGD.step()``. Memory: on CPU one
step per variant under torch.profiler's memory profile (the peak of the memory held at once by the
tensors the step creates: ``benchmarks/step_overhead.py``'s method); on CUDA ``max_memory_allocated``
minus the memory allocated at the step's start. ``extra`` = peak - none's peak; ``per call`` divides it
by the number of regularized calls in the step, and ``/ output`` by the bytes of one such output.
``held`` is the memory held at the end of the forward (the records kept until backward: on CPU, what
the profiled step's tensors hold when a marker allocation is made between forward and backward).
Times are medians over interleaved rounds (``--rounds``), after ``--warmup`` rounds; on 2 shared CPU
cores they are noisy (read them as rough).

Run ``python benchmarks/activity_memory.py`` (``--device cuda`` on a GPU).
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from typing import Any, Callable, Dict, List, Tuple

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torchreg  # noqa: E402
from step_overhead import _peak_of_new_tensors  # noqa: E402

LAM = 1e-4
MARKER = 777_777  # bytes


class Workload:
    def __init__(self, name: str, model: nn.Module, targets: Callable[[nn.Module], List[nn.Module]],
                 x: torch.Tensor, y: torch.Tensor, batch_dim: int = 0) -> None:
        self.name, self.model, self.targets, self.x, self.y, self.batch_dim = name, model, targets, x, y, batch_dim


class LSTMHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(256, 512, num_layers=1)
        self.head = nn.Linear(512, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(x)  # (time, batch, 512)
        return self.head(out.mean(0))


def workloads(device: torch.device) -> List[Workload]:
    torch.manual_seed(0)
    mlp = nn.Sequential(*[m for _ in range(6) for m in (nn.Linear(1024, 1024), nn.ReLU())], nn.Linear(1024, 10))
    conv = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))
    ae = nn.Sequential(nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 784))  # a sparse autoencoder's code
    relus = lambda m: [c for c in m if isinstance(c, nn.ReLU)]  # noqa: E731
    return [
        Workload("mlp 6x1024 ReLU", mlp, relus, torch.randn(256, 1024), torch.randint(0, 10, (256,))),
        Workload("convnet 2x64ch 32x32 ReLU", conv, relus, torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))),
        Workload("autoencoder code 1024", ae, relus, torch.rand(256, 784), torch.rand(256, 784)),
        Workload("LSTM 512, 32 steps", LSTMHead(), lambda m: [m.lstm], torch.randn(32, 64, 256),
                 torch.randint(0, 10, (64,)), batch_dim=1),
    ]


def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if y.dtype == torch.long:
        return nn.functional.cross_entropy(out, y)
    return nn.functional.mse_loss(out, y)


class Variant:
    def __init__(self, name: str, w: Workload, device: torch.device) -> None:
        self.name = name
        self.model = copy.deepcopy(w.model).to(device)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=1e-4)
        self.terms: List[torch.Tensor] = []
        self.times: List[float] = []
        self.calls = 0
        self.out_bytes = 0
        kind = name.split()[-1]
        for m in w.targets(self.model):
            if name.startswith("torchreg"):
                (torchreg.ActivityL1 if kind == "L1" else torchreg.ActivityL2)(m, LAM)
            elif name.startswith("penalty"):
                m.register_forward_hook(self._penalty_hook(kind, w.batch_dim))
            m.register_forward_hook(self._count)

    def _penalty_hook(self, kind: str, batch_dim: int) -> Callable[..., None]:
        def hook(m: nn.Module, args: Any, out: Any) -> None:
            o = out[0] if isinstance(out, tuple) else out
            b = o.shape[batch_dim]
            self.terms.append(LAM * o.abs().sum() / b if kind == "L1" else LAM / 2 * o.pow(2).sum() / b)
        return hook

    def _count(self, m: nn.Module, args: Any, out: Any) -> None:
        o = out[0] if isinstance(out, tuple) else out
        self.calls += 1
        self.out_bytes = o.numel() * o.element_size()

    def step(self, x: torch.Tensor, y: torch.Tensor, marker: bool = False) -> None:
        self.opt.zero_grad(set_to_none=True)
        loss = loss_fn(self.model(x), y)
        if self.terms:
            loss = loss + sum(self.terms)
            self.terms = []
        if marker:  # an allocation of a size nothing else has: the memory profile's "end of forward"
            torch.empty(MARKER, dtype=torch.uint8)
        loss.backward()
        self.opt.step()


def _held_at_marker(prof: Any) -> int:
    """Bytes held, when the marker is allocated, by the tensors created in the profiled step."""
    from torch.profiler._memory_profiler import Action

    live: Dict[Any, int] = {}
    current = 0
    for _, action, (key, _version), size in prof._memory_profile().timeline:
        if action == Action.CREATE:
            if size == MARKER:
                return current
            live[key] = size
            current += size
        elif action == Action.DESTROY and key in live:
            current -= live.pop(key)
    raise RuntimeError("marker not found")


def peak(v: Variant, w: Workload, device: torch.device) -> Tuple[int, int]:
    """(peak of the step, memory held at the end of the forward), bytes, both over the step's start."""
    v.calls = 0
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        v.step(w.x, w.y)
        torch.cuda.synchronize(device)
        top = torch.cuda.max_memory_allocated(device) - start
        v.opt.zero_grad(set_to_none=True)
        start = torch.cuda.memory_allocated(device)
        out = v.model(w.x)
        held = torch.cuda.memory_allocated(device) - start
        del out
        v.terms = []
        return top, held
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        v.step(w.x, w.y, marker=True)
    return _peak_of_new_tensors(prof), _held_at_marker(prof)


def run(w: Workload, device: torch.device, rounds: int, warmup: int) -> List[Tuple[str, float, int, int, int]]:
    w.x, w.y = w.x.to(device), w.y.to(device)
    names = ["none", "torchreg L1", "penalty L1", "torchreg L2", "penalty L2"]
    variants = [Variant(n, w, device) for n in names]
    for r in range(warmup + rounds):
        for v in variants:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t = time.perf_counter()
            v.step(w.x, w.y)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if r >= warmup:
                v.times.append(time.perf_counter() - t)
    peaks = {v.name: peak(v, w, device) for v in variants}
    return [(v.name, statistics.median(v.times), *peaks[v.name], v.calls, v.out_bytes) for v in variants]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--only", default="", help="run the workloads whose name contains this")
    args = ap.parse_args()
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}, lam {LAM}")
    summary = []
    for w in workloads(device):
        if args.only not in w.name:
            continue
        rows = run(w, device, args.rounds, args.warmup)
        base = rows[0]
        calls, out_bytes = rows[1][4], rows[1][5]
        print(f"\n{w.name}: {calls} regularized call(s) per step, one output {out_bytes / 2**20:.2f} MB")
        print(f"{'variant':<14}{'step ms':>9}{'held MB':>9}{'extra':>8}{'/call/out':>11}"
              f"{'peak MB':>9}{'extra':>8}{'/call/out':>11}")
        extra: Dict[str, Tuple[float, float, float]] = {}
        for name, t, top, held, _, _ in rows:
            e_held, e_top = held - base[3], top - base[2]
            extra[name] = (e_held, e_top, t - base[1])
            per = max(calls, 1) * max(out_bytes, 1)
            print(f"{name:<14}{t * 1e3:>9.1f}{held / 2**20:>9.2f}{e_held / 2**20:>8.2f}{e_held / per:>11.2f}"
                  f"{top / 2**20:>9.2f}{e_top / 2**20:>8.2f}{e_top / per:>11.2f}")
        for kind in ("L1", "L2"):
            mine, theirs = extra[f"torchreg {kind}"], extra[f"penalty {kind}"]
            summary.append((w.name, kind, mine, theirs, calls * out_bytes))
    print("\nsummary: extra memory over the unregularized step, in bytes per byte of regularized output "
          "(held = at the end of the forward, peak = the step's peak); ratio = torchreg / loss penalty")
    print(f"{'workload':<28}{'':<4}{'held torchreg':>14}{'penalty':>9}{'ratio':>7}"
          f"{'peak torchreg':>15}{'penalty':>9}{'ratio':>7}")

    def ratio(a: float, b: float, size: int) -> str:  # "-" where the penalty's extra is nothing (< 1 %)
        return f"{a / b:7.2f}" if b > 0.01 * size else f"{'-':>7}"

    for name, kind, mine, theirs, size in summary:
        print(f"{name:<28}{kind:<4}{mine[0] / size:>14.2f}{theirs[0] / size:>9.2f}{ratio(mine[0], theirs[0], size)}"
              f"{mine[1] / size:>15.2f}{theirs[1] / size:>9.2f}{ratio(mine[1], theirs[1], size)}")

if __name__ == "__main__":
    main()
