"""Memory of a build / train / drop loop: regularized models against bare ones (issue 9, point 2).

Builds ``--models`` models of one ``Linear(1000, 1000)`` (4 MB of weights), regularizes them
(``L1`` wrapper, ``apply_regularization``, a deep copy, a configured ``GradScaler``), runs two training
steps, drops them, and prints the resident memory growth (RSS after ``gc.collect()`` and ``malloc_trim``) and how many
of the models, their regularized layers and weights are still alive (weak references). A leak shows as growth of ~4-12 MB per model; the bare loop
is the baseline (allocator noise). RSS is only indicative; the tests check freeing with weak references.

    python benchmarks/memory_loop.py            # 30 models per variant
    python benchmarks/memory_loop.py --models 10
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import os
import weakref

import torch
from torch import nn

import torchreg


def rss_mb() -> float:
    """Resident memory after a garbage collection and glibc's malloc_trim (freed blocks returned)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc
        pass
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def train(model: nn.Module, scaler: "torch.amp.GradScaler | None") -> None:
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    for _ in range(2):
        opt.zero_grad()
        loss = model(torch.randn(8, 1000)).pow(2).mean()
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()


def build(variant: str):
    model = nn.Sequential(nn.Linear(1000, 1000))
    scaler = None
    if variant == "L1 wrapper":
        torchreg.L1(model[0], 1e-3)
    elif variant == "apply_regularization + copy + scaler":
        torchreg.apply_regularization(model, {nn.Linear: torchreg.L2(1e-3)})
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4)
        torchreg.configure(model, grad_scaler=scaler)
        twin = copy.deepcopy(model)
        train(twin, scaler)
        return [model, twin], scaler
    return [model], scaler


def run(variant: str, n: int) -> None:
    gc.collect()
    start = rss_mb()
    refs = []
    for _ in range(n):
        models, scaler = build(variant)
        for m in models:
            train(m, scaler)
        refs += [weakref.ref(o) for m in models for o in (m, m[0], m[0].weight)]
        del models, scaler, m
    gc.collect()
    alive = sum(r() is not None for r in refs)
    print(f"{variant:40s} {n:3d} models  RSS growth {rss_mb() - start:7.1f} MB  still alive {alive}/{len(refs)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    print(f"torch {torch.__version__}")
    for variant in ("bare", "L1 wrapper", "apply_regularization + copy + scaler", "bare", "L1 wrapper"):
        run(variant, args.models)


if __name__ == "__main__":
    main()
