#!/usr/bin/env python
"""Step-time overhead of torchreg against the other ways of getting the same gradient.

One training step = ``zero_grad(set_to_none=True)``, forward, loss, backward, ``SGD.step()``. Every
variant trains its own identical copy of the model (same seed, same weights, same batch) and the
variants are interleaved round-robin (in a fresh random order each round), so that drift in the
machine's speed hits all of them alike. After the warm-up rounds, each variant's step time is the
median over the timed rounds, and its overhead is the median over rounds of (its step - the
unregularized step of the same round).

Variants (all regularize the same parameter set, see ``--params``):

* ``none``           the unregularized step: the reference of every ratio.
* ``floor``          the unregularized step plus one ``torch._foreach_add_(grads, params, alpha=lam)``
                     after backward: 12 bytes per float32 parameter (read grad, read param, write
                     grad), which no L1/L2 gradient update can undercut.
* ``SGD wd (L2)``    ``torch.optim.SGD(weight_decay=lam)``: L2's built-in baseline.
* ``torchreg L2/L1/ElasticNet``  the regularizers of this library (post-accumulate-grad hooks).
* ``penalty L2/L1``  ``lam/2 * sum(p.pow(2).sum())`` / ``lam * sum(p.abs().sum())`` added to the loss.
* ``none again (A/A)`` a second, identical unregularized copy: its overhead should be 0, and what it
                     shows is the measurement noise of an overhead (read the ratios with it in mind).

Memory: on CUDA, each timed step's peak (``max_memory_allocated`` minus the memory allocated when the
step starts); on CPU, after the timed rounds, one step per variant under torch.profiler's memory
profile, whose peak is the most memory held at once by the tensors that step creates. Either way the
``peak - none`` column is a variant's extra, compared with the largest regularized tensor.

Run ``python benchmarks/step_overhead.py --help``; see benchmarks/README.md for results.
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import platform
import random
import statistics
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

import torchreg

LAM = 1e-4  # every strength (L1, L2, ElasticNet's l1 and l2, weight_decay, floor alpha)
LR = 1e-4  # small, so that the weights do not drift far over the run


# -- models ----------------------------------------------------------------------------------------
class Workload:
    """A model with its fixed batch and loss."""

    def __init__(self, name: str, description: str, model: nn.Module, inputs: torch.Tensor,
                 target: torch.Tensor, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
        self.name = name
        self.description = description
        self.model = model
        self.inputs = inputs
        self.target = target
        self.loss_fn = loss_fn


def _mlp(width: int, depth: int, d_in: int, d_out: int) -> nn.Sequential:
    layers: List[nn.Module] = []
    d = d_in
    for _ in range(depth - 1):
        layers += [nn.Linear(d, width), nn.ReLU()]
        d = width
    layers.append(nn.Linear(d, d_out))
    return nn.Sequential(*layers)


def wide_mlp(batch: int = 64) -> Workload:
    model = _mlp(1024, 10, 1024, 1024)  # 10 Linear layers: 10.5M parameters in 20 tensors
    return Workload("wide_mlp", "MLP 10 x Linear(1024, 1024), ReLU", model,
                    torch.randn(batch, 1024), torch.randn(batch, 1024), nn.functional.mse_loss)


def deep_mlp(batch: int = 64) -> Workload:
    model = _mlp(64, 150, 64, 64)  # 150 Linear layers: 0.62M parameters in 300 tensors
    return Workload("deep_mlp", "MLP 150 x Linear(64, 64), ReLU", model,
                    torch.randn(batch, 64), torch.randn(batch, 64), nn.functional.mse_loss)


def convnet(batch: int = 8) -> Workload:
    def block(c_in: int, c_out: int) -> List[nn.Module]:
        return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]

    # small images and batch, wide channels: 1.15M parameters, so that the floor is measurable
    model = nn.Sequential(
        *block(3, 64), *block(64, 64), nn.MaxPool2d(2),
        *block(64, 128), *block(128, 128), nn.MaxPool2d(2),
        *block(128, 256), *block(256, 256), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(256, 10),
    )
    return Workload("convnet", "6 x (Conv2d 3x3 no bias, BatchNorm2d, ReLU), channels 64-128-256, + Linear; "
                    "16x16 RGB", model, torch.randn(batch, 3, 16, 16), torch.randint(0, 10, (batch,)),
                    nn.functional.cross_entropy)


class _Encoder(nn.Module):
    def __init__(self, d_model: int = 256, nhead: int = 4, layers: int = 4, vocab_out: int = 256) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(d_model, nhead, dim_feedforward=4 * d_model, dropout=0.0,
                                           batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, vocab_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x)).flatten(0, 1)


def transformer(batch: int = 8, seq: int = 32) -> Workload:
    model = _Encoder()
    return Workload("transformer", "TransformerEncoder 4 layers, d_model 256, 4 heads, ff 1024, seq 32",
                    model, torch.randn(batch, seq, 256), torch.randint(0, 256, (batch * seq,)),
                    nn.functional.cross_entropy)


MODELS: Dict[str, Callable[[], Workload]] = {
    "wide_mlp": wide_mlp,
    "deep_mlp": deep_mlp,
    "convnet": convnet,
    "transformer": transformer,
}


# -- variants --------------------------------------------------------------------------------------
class Variant:
    """One way of training: its own copy of the model, its optimizer and its extra work."""

    def __init__(self, name: str, model: nn.Module, optimizer: torch.optim.Optimizer,
                 penalty: Optional[Callable[[], torch.Tensor]] = None,
                 after_backward: Optional[Callable[[], None]] = None) -> None:
        self.name = name
        self.model = model
        self.optimizer = optimizer
        self.penalty = penalty
        self.after_backward = after_backward
        self.times: List[float] = []
        self.peaks: List[int] = []


def selected_names(model: nn.Module, params: str) -> List[str]:
    """Names of the parameters that torchreg regularizes with the chosen selection (public API only)."""
    probe = copy.deepcopy(model)
    torchreg.L2(probe, LAM, params="*" if params == "all" else None)
    names = [f"{r['module']}.{leaf}" if r["module"] else leaf
             for r in torchreg.summary(probe).records for leaf in r["parameters"]]
    torchreg.remove_regularization(probe)
    return names


def make_variants(base: nn.Module, names: Sequence[str], params: str, device: torch.device,
                  which: Optional[Sequence[str]] = None) -> List[Variant]:
    """A fresh identical copy of ``base`` per variant; the regularized set is ``names``."""
    selection = "*" if params == "all" else None
    names = set(names)

    def copy_of() -> Tuple[nn.Module, List[nn.Parameter], List[nn.Parameter]]:
        m = copy.deepcopy(base).to(device)
        chosen = [p for n, p in m.named_parameters() if n in names]
        rest = [p for n, p in m.named_parameters() if n not in names]
        return m, chosen, rest

    def sgd(chosen: List[nn.Parameter], rest: List[nn.Parameter], weight_decay: float = 0.0) -> torch.optim.SGD:
        groups = [{"params": chosen, "weight_decay": weight_decay}]
        if rest:
            groups.append({"params": rest, "weight_decay": 0.0})
        return torch.optim.SGD(groups, lr=LR)

    builders: Dict[str, Callable[[], Variant]] = {}

    def none() -> Variant:
        m, chosen, rest = copy_of()
        return Variant("none", m, sgd(chosen, rest))

    def floor() -> Variant:
        m, chosen, rest = copy_of()

        def after_backward() -> None:
            torch._foreach_add_([p.grad for p in chosen], chosen, alpha=LAM)

        return Variant("floor (foreach add)", m, sgd(chosen, rest), after_backward=after_backward)

    def weight_decay() -> Variant:
        m, chosen, rest = copy_of()
        return Variant("SGD wd (L2)", m, sgd(chosen, rest, LAM))

    def reg(name: str, apply: Callable[[nn.Module], nn.Module]) -> Callable[[], Variant]:
        def build() -> Variant:
            m, chosen, rest = copy_of()
            apply(m)
            return Variant(name, m, sgd(chosen, rest))
        return build

    def penalty(kind: str) -> Callable[[], Variant]:
        def build() -> Variant:
            m, chosen, rest = copy_of()
            if kind == "L1":
                def pen() -> torch.Tensor:
                    return LAM * sum(p.abs().sum() for p in chosen)
            else:
                def pen() -> torch.Tensor:
                    return LAM / 2 * sum(p.pow(2).sum() for p in chosen)
            return Variant(f"penalty {kind}", m, sgd(chosen, rest), penalty=pen)
        return build

    def none_again() -> Variant:  # an identical second unregularized copy: its "overhead" is the noise
        v = none()
        v.name = "none again (A/A)"
        return v

    builders["none"] = none
    builders["aa"] = none_again
    builders["floor"] = floor
    builders["wd"] = weight_decay
    builders["L2"] = reg("torchreg L2", lambda m: torchreg.L2(m, LAM, params=selection))
    builders["L1"] = reg("torchreg L1", lambda m: torchreg.L1(m, LAM, params=selection))
    builders["EN"] = reg("torchreg ElasticNet", lambda m: torchreg.ElasticNet(m, LAM, LAM, params=selection))
    builders["pen_L2"] = penalty("L2")
    builders["pen_L1"] = penalty("L1")
    keys = [k for k in builders if k != "aa"] + ["aa"] if which is None else list(which)
    return [builders[k]() for k in keys]


# -- stepping and timing -----------------------------------------------------------------------------
def forward_backward(v: Variant, w: Workload) -> torch.Tensor:
    v.optimizer.zero_grad(set_to_none=True)
    loss = w.loss_fn(v.model(w.inputs), w.target)
    if v.penalty is not None:
        loss = loss + v.penalty()
    loss.backward()
    if v.after_backward is not None:
        v.after_backward()
    return loss


def train_step(v: Variant, w: Workload) -> None:
    forward_backward(v, w)
    v.optimizer.step()


def check_gradients(variants: Sequence[Variant], w: Workload, names: Sequence[str]) -> str:
    """On the identical initial weights: torchreg's gradients must equal the reference ones."""
    grads: Dict[str, List[Optional[torch.Tensor]]] = {}
    for v in variants:
        forward_backward(v, w)
        grads[v.name] = [None if p.grad is None else p.grad.detach().clone() for p in v.model.parameters()]
        v.optimizer.zero_grad(set_to_none=True)
    by = {v.name: v for v in variants}
    if "penalty L1" in by:  # ElasticNet's reference: the L1 penalty's gradient + lam * w
        chosen = set(names)
        grads["penalty L1 + lam w"] = [
            g if g is None or n not in chosen else g + LAM * p.detach()
            for g, (n, p) in zip(grads["penalty L1"], by["penalty L1"].model.named_parameters())]
    pairs = [("torchreg L1", "penalty L1"), ("torchreg L2", "penalty L2"), ("torchreg L2", "floor (foreach add)"),
             ("torchreg ElasticNet", "penalty L1 + lam w")]
    worst = 0.0
    checked = []
    for a, b in pairs:
        if a in grads and b in grads:
            checked.append(f"{a} = {b}")
            for ga, gb in zip(grads[a], grads[b]):
                if ga is None or gb is None:
                    continue
                err = (ga - gb).abs().max().item() / (gb.abs().max().item() + 1e-12)
                worst = max(worst, err)
                if err > 1e-4:
                    raise AssertionError(f"{w.name}: gradients of {a!r} and {b!r} differ (rel. err {err:.2e})")
    return f"gradient check on the initial weights ({'; '.join(checked)}): worst rel. difference {worst:.1e}"


def run_rounds(variants: Sequence[Variant], w: Workload, warmup: int, rounds: int, device: torch.device,
               seed: int, step: Callable[[Variant, Workload], None] = train_step) -> None:
    """Interleave the variants round-robin, each round in a new random order; record step times."""
    cuda = device.type == "cuda"
    rng = random.Random(seed)
    order = list(variants)
    gc.collect()
    for r in range(warmup + rounds):
        rng.shuffle(order)
        for v in order:
            if cuda:
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
                start_mem = torch.cuda.memory_allocated(device)
            t0 = time.perf_counter()
            step(v, w)
            if cuda:
                torch.cuda.synchronize(device)
            dt = time.perf_counter() - t0
            if r >= warmup:
                v.times.append(dt)
                if cuda:
                    v.peaks.append(torch.cuda.max_memory_allocated(device) - start_mem)


def _peak_of_new_tensors(prof: Any) -> int:
    """Bytes: the most memory held at once, during the profiled step, by tensors created in it."""
    from torch.profiler._memory_profiler import Action  # private: the data behind export_memory_timeline

    live: Dict[Any, int] = {}
    current = peak = 0
    for _, action, (key, _version), size in prof._memory_profile().timeline:
        if action == Action.CREATE:
            live[key] = size
            current += size
        elif action == Action.DESTROY and key in live:
            current -= live.pop(key)
        peak = max(peak, current)
    return peak


def cpu_peaks(variants: Sequence[Variant], w: Workload) -> None:
    """On CPU, one profiled training step per variant (after the timed ones): ``v.peaks`` gets the peak
    memory of the tensors the step creates (torch.profiler's memory profile; the CPU has no
    ``max_memory_allocated``). Deterministic for a given step, so one step is enough."""
    from torch.profiler import ProfilerActivity, profile

    for v in variants:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                     with_stack=True) as prof:
            train_step(v, w)
        v.peaks = [_peak_of_new_tensors(prof)]


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs)


def paired_overhead(v: Variant, ref: Variant) -> float:
    """Median over rounds of (v's step - ref's step in the same round)."""
    return median([a - b for a, b in zip(v.times, ref.times)])


# -- reporting ---------------------------------------------------------------------------------------
def machine_header(args: argparse.Namespace, device: torch.device) -> List[str]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    lines = [
        f"torch {torch.__version__}, torchreg {torchreg.__version__}, python {platform.python_version()}",
        f"machine: {platform.platform()}, {cpu}, os.cpu_count()={os.cpu_count()}",
        f"torch threads: {torch.get_num_threads()} intra-op, {torch.get_num_interop_threads()} inter-op; "
        f"device: {device}" + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
    ]
    return lines


def loadavg() -> str:
    """The 1/5/15-minute load averages (other processes on the machine make every timing noisier)."""
    try:
        text = " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        text = "n/a"
    try:  # Linux pressure stall information: % of time some task waited for a CPU
        with open("/proc/pressure/cpu") as f:
            some = dict(kv.split("=") for kv in f.readline().split()[1:])
        text += f" (cpu pressure avg10 {some['avg10']}%, avg60 {some['avg60']}%)"
    except (OSError, ValueError, KeyError):
        pass
    return text


def fmt_ratio(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def report(w: Workload, variants: Sequence[Variant], device: torch.device) -> Tuple[List[str], List[str]]:
    """The table of one model and its target lines."""
    by = {v.name: v for v in variants}
    ref = by["none"]
    t_ref = median(ref.times)
    floor = by.get("floor (foreach add)")
    floor_ovh = paired_overhead(floor, ref) if floor is not None else None
    mem = bool(ref.peaks)
    head = f"{'variant':<22}{'step ms':>9}{'x none':>8}{'overhead ms':>13}{'/ floor ovh':>13}"
    if mem:
        head += f"{'peak MB':>10}{'peak - none MB':>16}"
    lines = [head, "-" * len(head)]
    peak_ref = median(ref.peaks) if mem else 0
    for v in variants:
        t = median(v.times)
        ovh = paired_overhead(v, ref) if v is not ref else 0.0
        rel = None
        if floor_ovh is not None and floor_ovh > 0 and v is not ref:
            rel = ovh / floor_ovh
        line = (f"{v.name:<22}{t * 1e3:>9.2f}{t / t_ref:>8.3f}{ovh * 1e3:>13.3f}"
                f"{fmt_ratio(rel) if v is not ref else '-':>13}")
        if mem:
            pk = median(v.peaks)
            line += f"{pk / 2**20:>10.1f}{(pk - peak_ref) / 2**20:>16.1f}"
        lines.append(line)

    targets: List[str] = []

    def target(label: str, value: Optional[float], limit: float) -> None:
        if value is None:
            targets.append(f"  {label:<46} {'n/a':>6} (variant not run, or floor overhead <= 0)")
            return
        if value <= limit:
            verdict = f"met, {limit - value:.2f} under the limit"
        else:
            verdict = f"MISSED by {value - limit:.2f} ({(value / limit - 1) * 100:.0f}% over the limit)"
        targets.append(f"  {label:<46} {value:6.3f} (limit {limit:.2f}): {verdict}")

    def step_of(name: str) -> Optional[float]:
        return median(by[name].times) if name in by else None

    def ratio(a: str, b: str) -> Optional[float]:
        ta, tb = step_of(a), step_of(b)
        return None if ta is None or tb is None else ta / tb

    def over_floor(name: str) -> Optional[float]:
        if name not in by or floor_ovh is None or floor_ovh <= 0:
            return None
        return paired_overhead(by[name], ref) / floor_ovh

    target("torchreg L1 step / penalty L1 step", ratio("torchreg L1", "penalty L1"), 0.80)
    pen = ratio("penalty L1", "none")
    if pen is not None and "torchreg L1" in by:
        ovh_l1 = paired_overhead(by["torchreg L1"], ref)
        ovh_pen = paired_overhead(by["penalty L1"], ref)
        targets.append(f"    (info: the limit means a torchreg L1 step <= {0.8 * pen:.3f} x none; torchreg L1 overhead / "
                       f"penalty L1 overhead = {ovh_l1 / ovh_pen:.2f})" if ovh_pen > 0 else
                       f"    (info: the limit means a torchreg L1 step <= {0.8 * pen:.3f} x none)")
    target("torchreg L2 step / SGD wd step", ratio("torchreg L2", "SGD wd (L2)"), 1.05)
    target("torchreg L2 overhead / floor overhead", over_floor("torchreg L2"), 1.25)
    target("torchreg L1 overhead / floor overhead", over_floor("torchreg L1"), 1.5)
    target("torchreg ElasticNet overhead / floor overhead", over_floor("torchreg ElasticNet"), 1.5)
    if mem:
        largest = max(p.numel() * p.element_size() for p in by["torchreg L2"].model.parameters())
        for name in ("torchreg L2", "torchreg L1", "torchreg ElasticNet"):
            extra = median(by[name].peaks) - peak_ref
            target(f"{name} peak - none / largest", extra / largest, 1.0)
        pens = [f"{n} {(median(by[n].peaks) - peak_ref) / 2**20:.3g} MB" for n in ("penalty L2", "penalty L1") if n in by]
        targets.append(f"    (info: largest regularized tensor {largest / 2**20:.3g} MB; peak - none of "
                       f"{', '.join(pens) or 'the penalties: not run'})")
    return lines, targets


def count(model: nn.Module, names: Optional[Sequence[str]] = None) -> Tuple[int, int]:
    ps = [p for n, p in model.named_parameters() if names is None or n in set(names)]
    return len(ps), sum(p.numel() for p in ps)


def fmt_numel(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.1f}k"


# -- main --------------------------------------------------------------------------------------------
def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda / cuda:N")
    ap.add_argument("--models", default=",".join(MODELS),
                    help=f"comma-separated subset of {','.join(MODELS)} (default: all)")
    ap.add_argument("--steps", type=int, default=None,
                    help="timed rounds (each variant steps once per round); default 200 (cuda: 300)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed rounds first (default 15)")
    ap.add_argument("--params", choices=("all", "weights"), default="all",
                    help="the regularized set, the same for every variant: 'all' = every parameter "
                         "(torchreg with params='*'; default), 'weights' = torchreg's default selection "
                         "(weights, no biases, no norm layers; weight_decay/floor/penalty restricted to "
                         "it by parameter groups)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads (default: os.cpu_count())")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-memory", dest="memory", action="store_false",
                    help="on CPU, skip the peak-memory columns (one profiled step per variant)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke test: 3 timed rounds after 1 warm-up round (numbers are meaningless)")
    args = ap.parse_args(argv)
    if args.quick:
        args.steps = 3 if args.steps is None else args.steps
        args.warmup = 1 if args.warmup is None else args.warmup
    return args


def resolve_device(spec: str) -> torch.device:
    """The torch device, or exit with a clear message when CUDA is asked for and absent."""
    try:
        device = torch.device(spec)
    except RuntimeError as e:
        sys.exit(f"error: bad --device {spec!r}: {e}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            print(f"error: --device {spec} asked for, but CUDA is not available here "
                  f"(torch {torch.__version__}, torch.version.cuda={torch.version.cuda}, "
                  f"torch.cuda.is_available()=False). Run without --device for the CPU benchmark.",
                  file=sys.stderr)
            sys.exit(2)
        if device.index is not None and device.index >= torch.cuda.device_count():
            print(f"error: --device {spec}: only {torch.cuda.device_count()} CUDA device(s)", file=sys.stderr)
            sys.exit(2)
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    elif device.type != "cpu":
        sys.exit(f"error: --device must be cpu or cuda[:N], got {spec!r}")
    return device


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    device = resolve_device(args.device)
    if args.steps is None:
        args.steps = 300 if device.type == "cuda" else 200
    if args.warmup is None:
        args.warmup = 15
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in names if m not in MODELS]
    if unknown:
        print(f"error: unknown model(s) {unknown}; choose from {list(MODELS)}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads or os.cpu_count() or 1)

    print("torchreg step-time overhead (benchmarks/step_overhead.py)")
    for line in machine_header(args, device):
        print(line)
    print(f"command: {' '.join([os.path.basename(sys.executable), *sys.argv])}")
    print(f"regularized set (--params {args.params}): "
          + ("every parameter: torchreg with params='*', weight_decay/floor/penalty on all parameters"
             if args.params == "all" else
             "torchreg's default (weights; no biases, no norm layers); weight_decay/floor/penalty "
             "restricted to the same tensors by SGD parameter groups"))
    print(f"lam = {LAM:g} for every strength; SGD lr = {LR:g}, no momentum, foreach=default "
          f"({'foreach' if device.type == 'cuda' else 'per-tensor loop'} on {device.type}); "
          f"float32; seed {args.seed}")
    print(f"rounds: {args.warmup} warm-up + {args.steps} timed, variants interleaved in a random order each "
          "round; step = zero_grad(set_to_none) + forward + backward + SGD step; times are medians; "
          "overhead = median over rounds of (variant - none) in the same round")
    print(f"load average at start: {loadavg()}")
    summary: List[str] = []
    for k, name in enumerate(names):
        torch.manual_seed(args.seed)
        w = MODELS[name]()
        w.inputs, w.target = w.inputs.to(device), w.target.to(device)
        sel = selected_names(w.model, args.params)
        variants = make_variants(w.model, sel, args.params, device)
        n_all, e_all = count(w.model)
        n_sel, e_sel = count(w.model, sel)
        print()
        print(f"== {name}: {w.description}; {fmt_numel(e_all)} parameters in {n_all} tensors, "
              f"regularized {fmt_numel(e_sel)} in {n_sel} tensors; batch {tuple(w.inputs.shape)}")
        print("   " + check_gradients(variants, w, sel))
        t0 = time.perf_counter()
        run_rounds(variants, w, args.warmup, args.steps, device, args.seed + k)
        if device.type == "cpu" and args.memory:
            cpu_peaks(variants, w)
        lines, targets = report(w, variants, device)
        for line in lines:
            print(line)
        print(f"targets ({time.perf_counter() - t0:.0f} s, load average now {loadavg()}):")
        for line in targets:
            print(line)
        summary += [f"{name}:"] + targets
        del variants, w
        gc.collect()
    print()
    print(f"load average at end: {loadavg()}")
    print("== targets, all models")
    for line in summary:
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
