#!/usr/bin/env python
"""Cost of torchreg.Orthogonal's analytic gradient against autograd of the same penalty.

For each weight shape and mode: the median time of ``Orthogonal.grad_`` (what torchreg's hook runs at
backward) and of ``torch.autograd.grad`` of ``Orthogonal.penalty`` (what the penalty in the loss costs on
top of the forward's graph), interleaved, and their ratio. Both build the n x n cosine matrix: the cost
is O(n^2 d) time for n compared vectors of length d, and the memory a block of at most ~4M cosines.

    python benchmarks/orthogonal.py [--repeat 15] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import torchreg

SHAPES = [(256, 256), (1024, 1024), (256, 128, 3, 3), (4096, 512)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {args.threads} threads, median of {args.repeat}")
    print(f"{'shape':<20} {'mode':<8} {'grad_ ms':>9} {'autograd ms':>12} {'ratio':>6}")
    for shape in SHAPES:
        for mode in ("rows", "columns"):
            w = torch.randn(shape)
            rule = torchreg.Orthogonal(lam=0.1, mode=mode)
            grad = torch.zeros_like(w)
            leaf = w.clone().requires_grad_()

            def analytic() -> None:
                rule.grad_(grad, w)

            def autograd() -> None:
                torch.autograd.grad(rule.penalty(leaf), leaf)

            times = {"analytic": [], "autograd": []}
            analytic(), autograd()
            for _ in range(args.repeat):
                for name, fn in (("analytic", analytic), ("autograd", autograd)):
                    start = time.perf_counter()
                    fn()
                    times[name].append(time.perf_counter() - start)
            a, b = statistics.median(times["analytic"]), statistics.median(times["autograd"])
            print(f"{str(shape):<20} {mode:<8} {a * 1e3:>9.2f} {b * 1e3:>12.2f} {a / b:>6.2f}")


if __name__ == "__main__":
    main()
