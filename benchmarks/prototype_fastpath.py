#!/usr/bin/env python
"""PROTOTYPE (scratch, not part of torchreg): cheaper hook paths, timed against the current one.

Nothing in torchreg/ is changed. Each prototype is a subclass of ``torchreg._engine.Unit``; a model
regularized by torchreg as usual is switched to a prototype by swapping its units' class and
re-registering their hooks, so that all paths run side by side in one process, interleaved
round-robin with the same protocol as step_overhead.py (identical copies, random order each round,
medians, overhead = median paired difference to the unregularized step of the same round).

Prototypes (each includes the previous one)
  current   torchreg as it is: hook = functools.partial(unit._on_grad, i) -> _add -> rule.grad_ ->
            add_scaled_ -> sgn.
  fast      each hook is a closure that does the common case inline: no _add / grad_ / add_scaled_ /
            sgn / property calls; the strengths x 1/accumulation_steps are read once per backward and
            rule. Uncommon cases (no grad yet, a grad scaler, a sparse grad, create_graph, distributed,
            a user-defined rule) take the unchanged ``Unit._add``. Same semantics as current.
  chunked   fast + for CPU parameters of more than 32 MiB, L1's sign goes chunk by chunk (--chunk
            elements, default 2**20 = 4 MB) into a reused per-thread buffer instead of a full-size
            temporary: glibc serves allocations above 32 MiB with fresh mmap'ed pages that are faulted
            in and zeroed on every call. Smaller tensors keep the plain temporary (measured: cheaper
            there). Same semantics (elementwise ops: bitwise the same result, checked).
  batched   chunked + parameters of at most --small elements only record in the hook that they were
            reached; their terms are added by one ``torch._foreach_add_`` per rule (``_foreach_sign``
            for L1) in the end-of-backward callback the unit queues anyway. NOT the same semantics:
            another post-accumulate-grad hook on such a parameter (optimizer-in-backward) would see the
            gradient without the term.

Every prototype's gradients are checked against the loss-penalty reference before timing.

Run: python benchmarks/prototype_fastpath.py [--models wide_mlp,deep_mlp,big_mlp] [--steps N]
"""

from __future__ import annotations

import argparse
import copy
import os
import random
import statistics
import sys
import threading
import time
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import step_overhead as so  # noqa: E402

import torchreg  # noqa: E402
from torchreg import _engine  # noqa: E402
from torchreg.regularizers import ElasticNet, L1, L2  # noqa: E402

_strided = torch.strided
_grad_enabled = torch.is_grad_enabled
_sgn = torch.sgn
_current_task = _engine._current_task
CHUNK = 1 << 20
# glibc serves every allocation above 32 MiB (its largest mmap threshold) with fresh mmap'ed pages, which
# are faulted in and zeroed on first touch; below that the temporary comes from its heap and is cheap.
CHUNK_MIN_BYTES = 32 << 20
SMALL = 1 << 16


def _terms(rule: Any, alpha: float) -> Optional[Tuple[float, float]]:
    """(l1, l2) coefficients of a built-in rule, times alpha; None for a user subclass."""
    d = rule.__dict__
    t = type(rule)
    if t is L1:
        return d["lam"] * alpha, 0.0
    if t is L2:
        return 0.0, d["lam"] * alpha
    if t is ElasticNet:
        return d["l1"] * alpha, d["l2"] * alpha
    return None


class FastUnit(_engine.Unit):
    """Hooks are closures doing the common case inline; anything else goes through Unit._add."""

    chunked = False
    batched = False

    def _init_transient(self) -> None:
        super()._init_transient()
        self._fast = False
        self._coefs: Dict[int, Any] = {}
        self._pending: List[int] = []
        self._small: Optional[List[bool]] = None

    def _register_ready(self) -> None:
        for i, entry in enumerate(self.entries):
            p = entry.param
            if i not in self._handles and p.requires_grad and not _engine._is_lazy(p):
                self._handles[i] = p.register_post_accumulate_grad_hook(_make_hook(self, i, entry.rule))
        if self._lazy_handle is not None and not any(_engine._is_lazy(e.param) for e in self.entries):
            self._lazy_handle.remove()
            self._lazy_handle = None

    def _begin(self) -> None:
        super()._begin()
        self._fast = not self._deferred and self._scale is None
        self._coefs = {}
        self._pending = []
        if self.batched and self._small is None:
            self._small = [e.param.numel() <= SMALL and not e.param.is_complex() for e in self.entries]

    def _finish(self) -> None:
        pending, self._pending = self._pending, []
        if pending:
            groups: Dict[Tuple[float, float], Tuple[list, list]] = {}
            for i in pending:
                p = self.entries[i].param
                gs, ps = groups.setdefault(self._coefs[id(self.entries[i].rule)], ([], []))
                gs.append(p.grad)
                ps.append(p)
            for (l1, l2), (gs, ps) in groups.items():
                if l2:
                    torch._foreach_add_(gs, ps, alpha=l2)
                if l1:
                    torch._foreach_add_(gs, torch._foreach_sign(ps), alpha=l1)
        super()._finish()


def _make_hook(unit: FastUnit, index: int, rule: Any) -> Any:
    key = id(rule)
    chunked, batched = unit.chunked, unit.batched

    def hook(param: torch.Tensor) -> None:
        if unit._task != _current_task():
            unit._begin()
        unit._seen.add(index)
        if unit._fast:
            g = param.grad
            if g is not None and g.layout is _strided and not _grad_enabled():
                c = unit._coefs.get(key)
                if c is None:
                    c = unit._coefs[key] = _terms(rule, unit._alpha) or False
                if c:
                    if batched and unit._small[index]:
                        unit._pending.append(index)
                        return
                    l1, l2 = c
                    if l2:
                        g.add_(param, alpha=l2)
                    if l1:
                        if chunked:
                            _add_sign_chunked(g, param, l1)
                        else:
                            g.add_(_sgn(param), alpha=l1)
                    return
        if not unit._deferred:
            unit._add(unit.entries[index], param)

    return hook


class ChunkedUnit(FastUnit):
    chunked = True


class BatchedUnit(ChunkedUnit):
    batched = True


PROTOTYPES = {"fast": FastUnit, "chunked": ChunkedUnit, "batched": BatchedUnit}
_tls = threading.local()


def _add_sign_chunked(g: torch.Tensor, p: torch.Tensor, coef: float) -> None:
    n = p.numel()
    if n * p.element_size() <= CHUNK_MIN_BYTES or p.device.type != "cpu" or p.is_complex() or not (p.is_contiguous() and g.is_contiguous()):
        g.add_(_sgn(p), alpha=coef)
        return
    buf = getattr(_tls, "buf", None)
    if buf is None or buf.dtype != p.dtype or buf.numel() != CHUNK:
        buf = _tls.buf = torch.empty(CHUNK, dtype=p.dtype)
    fp, fg = p.view(-1), g.view(-1)
    for s in range(0, n, CHUNK):
        e = min(n, s + CHUNK)
        b = buf[: e - s]
        _sgn(fp[s:e], out=b)
        fg[s:e].add_(b, alpha=coef)


def convert(model: nn.Module, cls: type) -> None:
    """Switch every torchreg unit in ``model`` to the prototype ``cls`` (hooks re-registered)."""
    for unit in _engine.units_in(model):
        for handle in unit._handles.values():
            handle.remove()
        unit._handles.clear()
        unit.__class__ = cls
        unit._init_transient()
        unit._register_ready()


def build(w: so.Workload, prototypes: List[str]) -> List[so.Variant]:
    names = so.selected_names(w.model, "all")
    dev = torch.device("cpu")
    variants = so.make_variants(w.model, names, "all", dev, which=["none", "floor", "L2", "L1", "EN", "pen_L1",
                                                                     "pen_L2"])
    for v in variants:
        if v.name.startswith("torchreg"):
            v.name = v.name.replace("torchreg", "current")
    for proto in prototypes:
        for v in so.make_variants(w.model, names, "all", dev, which=["L2", "L1", "EN"]):
            convert(v.model, PROTOTYPES[proto])
            v.name = v.name.replace("torchreg", proto)
            variants.append(v)
    return variants


def check(variants: List[so.Variant], w: so.Workload) -> str:
    """Every L1/L2/EN variant against the loss-penalty references, on the identical initial weights."""
    grads = {}
    for v in variants:
        so.forward_backward(v, w)
        grads[v.name] = [p.grad.detach().clone() for p in v.model.parameters()]
        v.optimizer.zero_grad(set_to_none=True)
    params = [p.detach() for p in variants[0].model.parameters()]
    ref = {"L1": grads["penalty L1"], "L2": grads["penalty L2"],
           "ElasticNet": [g + so.LAM * p for g, p in zip(grads["penalty L1"], params)]}
    worst = 0.0
    for name, gs in grads.items():
        kind = name.split(" ", 1)[-1]
        if name.startswith("penalty") or kind not in ref:
            continue
        for a, b in zip(gs, ref[kind]):
            err = (a - b).abs().max().item() / (b.abs().max().item() + 1e-12)
            worst = max(worst, err)
            if err > 1e-4:
                raise AssertionError(f"{w.name}: {name} differs from the penalty reference ({err:.1e})")
    return f"all prototypes' gradients equal the penalty references (worst rel. diff {worst:.1e})"


def ladder(n: int, rounds: int, prototypes: List[str]) -> None:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from scale import ManyTiny

    torch.manual_seed(0)
    base = ManyTiny(n)
    x = torch.randn(4 * n)
    models: Dict[str, nn.Module] = {"none": copy.deepcopy(base)}
    for proto in ["current"] + prototypes:
        for kind, fn in (("L2", torchreg.L2), ("L1", torchreg.L1)):
            m = fn(copy.deepcopy(base), so.LAM, params="*")
            if proto != "current":
                convert(m, PROTOTYPES[proto])
            models[f"{proto} {kind}"] = m
    m = copy.deepcopy(base)
    models["floor"] = m
    times: Dict[str, List[float]] = {k: [] for k in models}
    rng = random.Random(0)
    order = list(models)
    for r in range(rounds + 5):
        rng.shuffle(order)
        for k in order:
            m = models[k]
            for p in m.ps:
                p.grad = None
            loss = m(x)
            t0 = time.perf_counter()
            loss.backward()
            if k == "floor":
                ps = list(m.ps)
                torch._foreach_add_([p.grad for p in ps], ps, alpha=so.LAM)
            if r >= 5:
                times[k].append(time.perf_counter() - t0)
    t_none = statistics.median(times["none"])
    print()
    print(f"== {n} tensors of 4 floats: loss.backward() (+ the foreach pass for floor), median of {rounds} rounds")
    print(f"{'variant':<14}{'backward ms':>13}{'per tensor us over none':>26}")
    for k in models:
        t = statistics.median(times[k])
        print(f"{k:<14}{t * 1e3:>13.3f}{(t - t_none) / n * 1e6:>26.2f}")


def main() -> int:
    global CHUNK, SMALL
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="wide_mlp,deep_mlp,convnet,transformer",
                    help="comma-separated step_overhead.py models, and/or big_mlp (6 x Linear(4096, 4096))")
    ap.add_argument("--prototypes", default="fast,chunked,batched")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--small", type=int, default=SMALL, help="'batched': largest numel batched (default 65536)")
    ap.add_argument("--chunk", type=int, default=CHUNK, help="'chunked': L1 sign chunk in elements (default 2**20)")
    ap.add_argument("--ladder", type=int, default=1000, help="tiny-tensor count of the ladder (0: skip)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--quick", action="store_true", help="smoke test: 2 rounds")
    args = ap.parse_args()
    CHUNK, SMALL = args.chunk, args.small
    if args.quick:
        args.steps, args.warmup = 2, 1
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    prototypes = [p for p in args.prototypes.split(",") if p]
    print("PROTOTYPE hook paths (benchmarks/prototype_fastpath.py; torchreg/ unchanged)")
    for line in so.machine_header(args, torch.device("cpu")):
        print(line)
    print(f"command: {' '.join([os.path.basename(sys.executable), *sys.argv])}")
    print(f"load average at start: {so.loadavg()}")
    print(f"--small {SMALL} --chunk {CHUNK}; {args.warmup} warm-up + {args.steps} timed rounds; all variants of a "
          "model interleaved in one process; params='*'")
    for k, name in enumerate(args.models.split(",")):
        torch.manual_seed(0)
        if name == "big_mlp":
            from scale import big_mlp
            w = big_mlp(4096, 6, 32)
        else:
            w = so.MODELS[name]()
        variants = build(w, prototypes)
        n, e = so.count(w.model)
        print()
        print(f"== {name}: {w.description}; {so.fmt_numel(e)} parameters in {n} tensors")
        print("   " + check(variants, w))
        variants = [v for v in variants if not v.name.startswith("penalty")]
        del w.model
        so.run_rounds(variants, w, args.warmup, args.steps, torch.device("cpu"), k)
        by = {v.name: v for v in variants}
        ref = by["none"]
        fl = so.paired_overhead(by["floor (foreach add)"], ref)
        print(f"none step {so.median(ref.times) * 1e3:.2f} ms; floor overhead {fl * 1e3:.3f} ms")
        head = f"{'hook path':<10}" + "".join(f"{c + ' ovh ms':>18}{'/ floor':>9}" for c in ("L2", "L1", "EN"))
        print(head)
        print("-" * len(head))
        for proto in ["current"] + prototypes:
            row = f"{proto:<10}"
            for c in ("L2", "L1", "ElasticNet"):
                o = so.paired_overhead(by[f"{proto} {c}"], ref)
                row += f"{o * 1e3:>18.3f}{(f'{o / fl:.2f}' if fl > 0 else 'n/a'):>9}"
            print(row)
        del variants
    if args.ladder:
        ladder(args.ladder, 3 if args.quick else 60, prototypes)
    print(f"\nload average at end: {so.loadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
