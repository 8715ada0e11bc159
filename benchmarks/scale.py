#!/usr/bin/env python
"""torchreg at scale: (a) a >=100M-parameter model, (b) the Python cost of the hooks per tensor.

(a) An MLP of a few large Linear layers (default 6 x Linear(4096, 4096): 100.7M parameters, 1.2 GB of
    float32 weights + gradients per copy). Same protocol as step_overhead.py (identical copies, variants
    interleaved round-robin, medians, overhead = median paired difference to the unregularized step),
    with fewer rounds: torchreg L1 / L2 / ElasticNet against the floor (one ``_foreach_add_`` pass),
    ``SGD(weight_decay)`` and the L1 loss penalty.

(b) N tiny parameter tensors (4 floats each; N = 100, 1,000, 3,000, 10,000), so that kernel time is
    negligible and what is left is the per-tensor cost of the hook machinery. Only ``loss.backward()``
    is timed (the graph is a single ``cat``: N AccumulateGrad nodes), with and without torchreg; the
    per-tensor cost is (median backward with torchreg - median backward without) / N. Growth is linear
    if that per-tensor cost does not grow with N.

Run ``python benchmarks/scale.py --help``; see benchmarks/README.md for results.
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import random
import statistics
import sys
import time
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import step_overhead as so  # noqa: E402  (same directory)

import torchreg  # noqa: E402


# -- (a) a large model ---------------------------------------------------------------------------------
def big_mlp(width: int, layers: int, batch: int) -> so.Workload:
    model = so._mlp(width, layers, width, width)
    return so.Workload("big_mlp", f"MLP {layers} x Linear({width}, {width}), ReLU", model,
                       torch.randn(batch, width), torch.randn(batch, width), nn.functional.mse_loss)


def part_a(args: argparse.Namespace, device: torch.device) -> List[str]:
    torch.manual_seed(args.seed)
    w = big_mlp(args.width, args.layers, args.batch)
    w.inputs, w.target = w.inputs.to(device), w.target.to(device)
    names = so.selected_names(w.model, "all")
    n, e = so.count(w.model)
    print()
    print(f"== (a) {w.name}: {w.description}; {so.fmt_numel(e)} parameters in {n} tensors, all regularized "
          f"(params='*'); batch {tuple(w.inputs.shape)}; {args.warmup} warm-up + {args.rounds} timed rounds")
    variants = so.make_variants(w.model, names, "all", device,
                                which=["none", "floor", "wd", "L2", "L1", "EN", "pen_L1", "aa"])
    del w.model
    gc.collect()
    t0 = time.perf_counter()
    so.run_rounds(variants, w, args.warmup, args.rounds, device, args.seed)
    if device.type == "cpu":
        so.cpu_peaks(variants, w)
    lines, targets = so.report(w, variants, device)
    for line in lines:
        print(line)
    bytes_floor = 12 * e
    by = {v.name: v for v in variants}
    floor_ovh = so.paired_overhead(by["floor (foreach add)"], by["none"])
    rate = f"{bytes_floor / floor_ovh / 1e9:.1f} GB/s effective" if floor_ovh > 0 else "rate n/a"
    print(f"floor pass moves {bytes_floor / 1e9:.2f} GB: {rate} ({time.perf_counter() - t0:.0f} s)")
    print("targets:")
    for line in targets:
        print(line)
    del variants
    gc.collect()
    return targets


# -- (b) many tiny tensors --------------------------------------------------------------------------------
class ManyTiny(nn.Module):
    def __init__(self, n: int, size: int = 4) -> None:
        super().__init__()
        self.ps = nn.ParameterList([nn.Parameter(torch.randn(size)) for _ in range(n)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (torch.cat(list(self.ps)) * x).sum()


def time_backwards(models: Dict[str, ManyTiny], x: torch.Tensor, warmup: int, rounds: int, seed: int,
                   device: torch.device) -> Dict[str, float]:
    """Median seconds of ``loss.backward()`` per model, interleaved in a new random order each round;
    the model named ``floor`` also runs the floor's ``_foreach_add_`` pass inside the timed span."""
    times: Dict[str, List[float]] = {k: [] for k in models}
    rng = random.Random(seed)
    order = list(models)
    cuda = device.type == "cuda"
    for r in range(warmup + rounds):
        rng.shuffle(order)
        for name in order:
            m = models[name]
            for p in m.ps:
                p.grad = None
            loss = m(x)
            params = list(m.ps) if name == "floor" else None
            if cuda:
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            loss.backward()
            if params is not None:
                torch._foreach_add_([p.grad for p in params], params, alpha=so.LAM)
            if cuda:
                torch.cuda.synchronize(device)
            if r >= warmup:
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def part_b(args: argparse.Namespace, device: torch.device) -> None:
    print()
    print(f"== (b) per-tensor cost of the hooks: N parameter tensors of 4 floats, timed: loss.backward() "
          f"only (+ the foreach pass for 'floor'); {args.tiny_warmup} warm-up + {args.tiny_rounds} timed "
          "rounds, interleaved; medians")
    head = (f"{'N tensors':>10}{'variant':>14}{'backward ms':>13}{'- none ms':>11}{'per tensor us':>15}")
    print(head)
    print("-" * len(head))
    for n in args.tiny:
        torch.manual_seed(args.seed)
        base = ManyTiny(n).to(device)
        x = torch.randn(4 * n, device=device)
        models = {}
        for name in ("none", "floor", "torchreg L2", "torchreg L1"):
            m = copy.deepcopy(base)
            if name == "torchreg L2":
                torchreg.L2(m, so.LAM, params="*")
            elif name == "torchreg L1":
                torchreg.L1(m, so.LAM, params="*")
            models[name] = m
        medians = time_backwards(models, x, args.tiny_warmup, args.tiny_rounds, args.seed, device)
        t_none = medians["none"]
        for name in models:
            t = medians[name]
            extra = "-" if name == "none" else f"{(t - t_none) / n * 1e6:.2f}"
            diff = "-" if name == "none" else f"{(t - t_none) * 1e3:.3f}"
            print(f"{n:>10}{name:>14}{t * 1e3:>13.3f}{diff:>11}{extra:>15}")
        del models, base
        gc.collect()


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda / cuda:N")
    ap.add_argument("--part", choices=("a", "b", "both"), default="both")
    ap.add_argument("--width", type=int, default=4096)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=40, help="(a) timed rounds (default 40)")
    ap.add_argument("--warmup", type=int, default=3, help="(a) warm-up rounds (default 3)")
    ap.add_argument("--tiny", default="100,1000,3000,10000", help="(b) tensor counts")
    ap.add_argument("--tiny-rounds", type=int, default=40)
    ap.add_argument("--tiny-warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: os.cpu_count())")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true",
                    help="smoke test: a 4 x Linear(512, 512) model, N = 100 and 1000, 2 rounds each")
    args = ap.parse_args(argv)
    if args.quick:
        args.width, args.layers, args.rounds, args.warmup = 512, 4, 2, 1
        args.tiny, args.tiny_rounds, args.tiny_warmup = "100,1000", 2, 1
    args.tiny = [int(t) for t in str(args.tiny).split(",") if t.strip()]
    device = so.resolve_device(args.device)
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    print("torchreg at scale (benchmarks/scale.py)")
    for line in so.machine_header(args, device):
        print(line)
    print(f"command: {' '.join([os.path.basename(sys.executable), *sys.argv])}")
    print(f"lam = {so.LAM:g}; SGD lr = {so.LR:g}; float32; seed {args.seed}; load average at start: "
          f"{so.loadavg()}")
    if args.part in ("a", "both"):
        part_a(args, device)
    if args.part in ("b", "both"):
        part_b(args, device)
    print()
    print(f"load average at end: {so.loadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
