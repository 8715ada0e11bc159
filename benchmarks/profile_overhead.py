#!/usr/bin/env python
"""Where torchreg's step overhead goes, against the floor: torch.profiler op times and a hook-cost ladder.

1. torch.profiler (CPU activities, profile_memory) on training steps of the wide and the deep MLP of
   step_overhead.py, for ``none``, ``floor``, ``torchreg L2`` and ``torchreg L1``, one profiled step
   per variant per round, interleaved: per step (medians over the rounds), the self CPU time and call
   count of the ops that the regularization adds (``aten::add_``, ``aten::sgn``, the ``aten::empty*``
   allocations, ``aten::_foreach_add_``), the memory ``aten::sgn`` allocates (its temporary) and the
   total self CPU time of all ops.
   The profiler adds a little time per op, which inflates ops on tiny tensors; it is used for the
   split by op, the wall-clock step times come from step_overhead.py.
2. The L1 update of one tensor with and without the full-size sign temporary (kernel level), and
   ElasticNet's update of a 64 MB tensor as two passes or both terms chunk by chunk.
3. A hook-cost ladder on N tiny tensors (no profiler: plain timing of ``loss.backward()``, medians):
   no hook; a no-op Python post-accumulate-grad hook; the minimal hook ``p.grad.add_(p)`` /
   ``p.grad.add_(torch.sgn(p))``; torchreg L2 / L1. The differences split the per-tensor cost into
   calling a Python hook, torchreg's bookkeeping, and the kernels' dispatch.
4. The same split at model level: full training steps of the deep MLP (300 tensors of 64 x 64 / 64
   floats), step_overhead.py's protocol, with hooks that do less than torchreg (a no-op hook; the
   minimal ``add_`` / ``add_(sgn)`` hook) and the same ``add_`` run as a Python loop after backward:
   what one in-place pass per tensor costs there however it is issued, against ``SGD(weight_decay)``.
5. cProfile of the deep MLP's backward with torchreg L1: Python functions by own time per call.

Run: python benchmarks/profile_overhead.py [--steps K]
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import functools
import os
import pstats
import random
import statistics
import sys
import time
from typing import Dict, List

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import step_overhead as so  # noqa: E402
from scale import ManyTiny, time_backwards  # noqa: E402

import torchreg  # noqa: E402

OPS = ["aten::add_", "aten::sgn", "aten::sign", "aten::empty", "aten::empty_like", "aten::empty_strided",
       "aten::_foreach_add_", "aten::add", "aten::zeros_like"]


def profile_model(name: str, rounds: int, warmup: int) -> None:
    torch.manual_seed(0)
    w = so.MODELS[name]()
    names = so.selected_names(w.model, "all")
    variants = so.make_variants(w.model, names, "all", torch.device("cpu"), which=["none", "floor", "L2", "L1"])
    n, e = so.count(w.model)
    for v in variants:
        for _ in range(warmup):
            so.train_step(v, w)
    # per variant and round: {op: (calls, self CPU ms)}, total self CPU ms, MB allocated by aten::sgn
    per_round: Dict[str, List[Dict[str, tuple]]] = {v.name: [] for v in variants}
    totals: Dict[str, List[float]] = {v.name: [] for v in variants}
    allocs: Dict[str, List[float]] = {v.name: [] for v in variants}
    rng = random.Random(0)
    order = list(variants)
    for _ in range(rounds):  # one profiled step per variant per round, interleaved in a random order
        rng.shuffle(order)
        for v in order:
            with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                so.train_step(v, w)
            ops: Dict[str, tuple] = {}
            total = 0.0
            mb = 0.0
            for evt in prof.key_averages():
                total += evt.self_cpu_time_total
                if evt.key in OPS:
                    ops[evt.key] = (evt.count, evt.self_cpu_time_total / 1e3)
                if evt.key == "aten::sgn":
                    mb = evt.self_cpu_memory_usage / 2**20
            per_round[v.name].append(ops)
            totals[v.name].append(total / 1e3)
            allocs[v.name].append(mb)
    med = statistics.median
    print()
    print(f"== torch.profiler, {name}: {so.fmt_numel(e)} parameters in {n} tensors, all regularized; "
          f"{rounds} rounds of one profiled step per variant, interleaved; per step, medians: calls / self CPU ms")
    cols = [v.name for v in variants]
    print(f"{'op':<22}" + "".join(f"{c:>22}" for c in cols))
    for op in OPS:
        if not any(op in r for c in cols for r in per_round[c]):
            continue
        row = f"{op:<22}"
        for c in cols:
            cnt = med([r.get(op, (0, 0.0))[0] for r in per_round[c]])
            ms = med([r.get(op, (0, 0.0))[1] for r in per_round[c]])
            row += f"{f'{cnt:.0f} / {ms:.3f}':>22}"
        print(row)
    reg_ops = ("aten::add_", "aten::sgn", "aten::_foreach_add_", "aten::add")

    def reg_ms(c: str) -> float:
        return med([sum(r.get(op, (0, 0.0))[1] for op in reg_ops) for r in per_round[c]])

    base = reg_ms(cols[0])
    print(f"{'regularization ms *':<22}" + "".join(f"{reg_ms(c) - base:>22.3f}" for c in cols))
    print(f"{'sgn allocates MB':<22}" + "".join(f"{med(allocs[c]):>22.1f}" for c in cols))
    print(f"{'all ops, self CPU ms':<22}" + "".join(f"{med(totals[c]):>22.3f}" for c in cols))
    print("* self CPU ms of add_ + sgn + _foreach_add_ minus none's (SGD's own add_): the regularization's "
          "kernels. On CPU _foreach_add_ has no fused kernel: the floor's extra add_ calls are its per-tensor "
          "kernels.")


def ladder(n: int, rounds: int, warmup: int) -> None:
    lam = so.LAM
    torch.manual_seed(0)
    base = ManyTiny(n)
    x = torch.randn(4 * n)

    def l2_hook(p: torch.Tensor) -> None:
        p.grad.add_(p, alpha=lam)

    def l1_hook(p: torch.Tensor) -> None:
        p.grad.add_(torch.sgn(p), alpha=lam)

    def noop_hook(p: torch.Tensor) -> None:
        return None

    def make(kind: str) -> ManyTiny:
        m = copy.deepcopy(base)
        hook = {"no-op hook": noop_hook, "minimal L2 hook": l2_hook, "minimal L1 hook": l1_hook}.get(kind)
        if hook is not None:
            for p in m.ps:
                p.register_post_accumulate_grad_hook(hook)
        elif kind == "torchreg L2":
            torchreg.L2(m, lam, params="*")
        elif kind == "torchreg L1":
            torchreg.L1(m, lam, params="*")
        return m

    kinds = ["none", "no-op hook", "minimal L2 hook", "minimal L1 hook", "torchreg L2", "torchreg L1", "floor"]
    medians = time_backwards({k: make(k) for k in kinds}, x, warmup, rounds, 0, torch.device("cpu"))
    print()
    print(f"== hook-cost ladder: {n} tensors of 4 floats, loss.backward() timed, median of {rounds} rounds")
    print(f"{'variant':<18}{'backward ms':>13}{'per tensor us over none':>26}")
    t_none = medians["none"]
    for k in kinds:
        t = medians[k]
        print(f"{k:<18}{t * 1e3:>13.3f}{(t - t_none) / n * 1e6:>26.2f}")


def deep_decomposition(rounds: int, warmup: int) -> None:
    lam = so.LAM
    torch.manual_seed(0)
    w = so.deep_mlp()
    names = so.selected_names(w.model, "all")
    dev = torch.device("cpu")
    variants = so.make_variants(w.model, names, "all", dev, which=["none", "wd", "floor", "L2", "L1"])
    add = functools.partial(torch.Tensor.add_, alpha=lam)

    def noop_hook(p: torch.Tensor) -> None:
        return None

    def l2_hook(p: torch.Tensor) -> None:
        add(p.grad, p)

    def l1_hook(p: torch.Tensor) -> None:
        add(p.grad, torch.sgn(p))

    for name, hook in (("no-op hook", noop_hook), ("minimal L2 hook", l2_hook), ("minimal L1 hook", l1_hook)):
        (v,) = so.make_variants(w.model, names, "all", dev, which=["none"])
        v.name = name
        for p in v.model.parameters():
            p.register_post_accumulate_grad_hook(hook)
        variants.append(v)
    (v,) = so.make_variants(w.model, names, "all", dev, which=["none"])
    params = list(v.model.parameters())

    def loop_after() -> None:
        for p in params:
            add(p.grad, p)

    v.name, v.after_backward = "L2 add_ loop after bw", loop_after
    variants.append(v)
    so.run_rounds(variants, w, warmup, rounds, dev, seed=0)
    none = variants[0]
    n = len(params)
    print()
    print(f"== model level, deep_mlp ({n} tensors, all regularized): full steps, {warmup} warm-up + {rounds} "
          "rounds interleaved; overhead = median paired difference to none")
    print(f"{'variant':<26}{'step ms':>10}{'overhead ms':>13}{'us per tensor':>15}")
    for v in variants:
        ovh = so.paired_overhead(v, none)
        print(f"{v.name:<26}{so.median(v.times) * 1e3:>10.3f}{ovh * 1e3:>13.3f}{ovh / n * 1e6:>15.2f}")


def sign_temporary(rounds: int) -> None:
    """Kernel-level: the L1 update of one tensor with and without a full-size sign temporary."""
    lam = so.LAM
    chunk = 1 << 20
    buf_small = torch.empty(chunk)
    print()
    print("== the L1 update of one float32 tensor (grad and param not in cache unless small), median of "
          f"{rounds} calls, ms; the floor update add_(p) for comparison")
    head = f"{'elements':>10}{'MB':>6}{'add_(p)':>10}{'add_(sgn(p))':>14}{'sgn(p)':>9}{'sgn out=buf':>13}" \
           f"{'+add_':>8}{'chunked 1M':>12}"
    print(head)
    for numel in (1 << 16, 1 << 20, 1 << 22, 1 << 24):
        p, g = torch.randn(numel), torch.randn(numel)
        buf = torch.empty(numel)

        def chunked() -> None:
            fp, fg = p.view(-1), g.view(-1)
            for s in range(0, numel, chunk):
                e = min(numel, s + chunk)
                b = buf_small[: e - s]
                torch.sgn(fp[s:e], out=b)
                fg[s:e].add_(b, alpha=lam)

        fns = [lambda: g.add_(p, alpha=lam), lambda: g.add_(torch.sgn(p), alpha=lam), lambda: torch.sgn(p),
               lambda: torch.sgn(p, out=buf), lambda: g.add_(torch.sgn(p, out=buf), alpha=lam), chunked]
        times: List[List[float]] = [[] for _ in fns]
        for r in range(rounds + 3):
            for i, f in enumerate(fns):
                t0 = time.perf_counter()
                f()
                if r >= 3:
                    times[i].append(time.perf_counter() - t0)
        med = [statistics.median(t) * 1e3 for t in times]
        print(f"{numel:>10}{numel * 4 / 2**20:>6.0f}{med[0]:>10.3f}{med[1]:>14.3f}{med[2]:>9.3f}{med[3]:>13.3f}"
              f"{med[4]:>8.3f}{med[5]:>12.3f}")
    print("(columns: add_(p) = floor kernel; add_(sgn(p)) = torchreg L1 now; sgn(p) alone; sgn into a reused "
          "full-size buffer; + add_ = both with the reused buffer; chunked 1M = sgn and add_ per 2**20-element "
          "chunk through one reused 4 MB buffer)")


def elastic_large(rounds: int) -> None:
    """Kernel-level: ElasticNet's update of one 64 MB tensor, as two passes or chunk by chunk."""
    from torchreg import _ops

    lam = so.LAM
    numel = 1 << 24
    p, g = torch.randn(numel), torch.randn(numel)

    def two_passes() -> None:  # the L2 pass over the whole tensor, then the chunked sign pass
        _ops.add_scaled_(g, p, lam, None)
        _ops.add_elastic_(g, p, lam, 0.0, None)

    fns = {"floor add_(p)": lambda: g.add_(p, alpha=lam), "two passes": two_passes,
           "per chunk (torchreg)": lambda: _ops.add_elastic_(g, p, lam, lam, None)}
    times: Dict[str, List[float]] = {k: [] for k in fns}
    for r in range(rounds + 3):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            if r >= 3:
                times[k].append(time.perf_counter() - t0)
    print()
    print(f"== ElasticNet's update of one float32 tensor of {numel} elements (64 MB), median of {rounds} calls")
    for k in fns:
        print(f"{k:<24}{statistics.median(times[k]) * 1e3:>9.3f} ms")


def cprofile_deep(steps: int) -> None:
    torch.manual_seed(0)
    w = so.deep_mlp()
    names = so.selected_names(w.model, "all")
    (v,) = so.make_variants(w.model, names, "all", torch.device("cpu"), which=["L1"])
    for _ in range(5):
        so.train_step(v, w)
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(steps):
        so.train_step(v, w)
    pr.disable()
    st = pstats.Stats(pr)
    print()
    print(f"== cProfile, deep_mlp with torchreg L1 (300 hooked tensors), {steps} steps: functions of the hook "
          "path, own time (cProfile inflates Python time; compare the rows to each other)")
    print(f"{'function':<44}{'calls/step':>12}{'own us/call':>13}{'own ms/step':>13}")
    rows = []
    for (file, line, func), (cc, nc, tt, ct, callers) in st.stats.items():
        label = f"{os.path.basename(file)}:{func}" if file != "~" else func
        if ("torchreg" in file or func in ("<built-in method torch.sgn>", "<method 'add_' of 'torch._C.TensorBase' objects>",
                                           "<built-in method torch._C._current_graph_task_id>",
                                           "<built-in method torch.is_grad_enabled>")):
            rows.append((tt / steps, label, nc / steps, tt / max(nc, 1)))
    for tt, label, calls, per in sorted(rows, reverse=True)[:14]:
        print(f"{label[:43]:<44}{calls:>12.0f}{per * 1e6:>13.2f}{tt * 1e3:>13.3f}")


def main() -> int:
    ap = argparse.ArgumentParser(description="profile torchreg's overhead against the floor")
    ap.add_argument("--steps", type=int, default=40, help="profiled rounds (one step per variant each; default 40)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--quick", action="store_true", help="smoke test: 2 steps, small ladder")
    args = ap.parse_args()
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    if args.quick:
        args.steps = 2
    print("torchreg overhead profile (benchmarks/profile_overhead.py)")
    for line in so.machine_header(args, torch.device("cpu")):
        print(line)
    print(f"command: {' '.join([os.path.basename(sys.executable), *sys.argv])}; load average {so.loadavg()}")
    for name in ("wide_mlp", "deep_mlp"):
        profile_model(name, args.steps, warmup=1 if args.quick else 5)
    ladder(1000, rounds=3 if args.quick else 60, warmup=1 if args.quick else 5)
    sign_temporary(3 if args.quick else 30)
    elastic_large(3 if args.quick else 30)
    deep_decomposition(3 if args.quick else 150, warmup=1 if args.quick else 15)
    cprofile_deep(2 if args.quick else 20)
    print(f"\nload average at end: {so.loadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
