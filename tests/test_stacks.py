"""torchreg inside real training stacks: the corner cases of *when* a term is added (issue 9).

Each gradient is compared with the plain-PyTorch reference (a bare deep copy trained with the penalty
in the loss, ``tests/reference.py``) or with autograd's own behaviour:

* activation checkpointing, reentrant (a backward nested in the outer one) and not, of a middle
  segment, of the first layer and of every block of a small transformer, with and without gradient
  accumulation and a ``GradScaler``; the accumulation guard stays quiet (warnings are errors here);
* ``backward(inputs=[...])``: the terms go to the listed leaves only;
* a layer, or a backbone matched by a rule, wholly frozen when regularized and unfrozen later;
* a reparametrization applied after torchreg (``weight_norm``, ``parametrizations``) warns;
* two threads running backward through the same model at once raise a clear error;
* a ``GradScaler`` that steps the model but was not declared warns once;
* a model unpickled in a process where torchreg was never applied keeps the accumulation guard quiet.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from typing import Callable, Dict, List, Optional, Sequence

import pytest
import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

import torchreg
from reference import assert_same_grads, bare_copy, explicit_penalty

pytestmark = pytest.mark.filterwarnings("error")  # the accumulation guard must stay quiet, too

L1, L2 = 0.05, 0.1  # ElasticNet strengths: a missing or doubled term moves a gradient by >= 1e-2


def penalty(model: nn.Module, names: Optional[Sequence[str]] = None) -> Tensor:
    params = dict(model.named_parameters())
    return explicit_penalty((params[n], L1, L2) for n in (names if names is not None else params))


# -- activation checkpointing ------------------------------------------------------------------------
class Stack(nn.Module):
    """Four Linear+Tanh layers; ``segments`` says which runs of layers are checkpointed."""

    def __init__(self, segments: Sequence[Sequence[int]], reentrant: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList(nn.Linear(5, 5) for _ in range(4))
        self.segments = [list(s) for s in segments]
        self.reentrant = reentrant

    def run(self, indices: Sequence[int], x: Tensor) -> Tensor:
        for i in indices:
            x = torch.tanh(self.layers[i](x))
        return x

    def forward(self, x: Tensor) -> Tensor:
        i = 0
        while i < len(self.layers):
            segment = next((s for s in self.segments if s[0] == i), None)
            if segment is None:
                x = self.run([i], x)
                i += 1
            else:
                x = checkpoint(self.run, segment, x, use_reentrant=self.reentrant)
                i = segment[-1] + 1
        return x.pow(2).sum()


SEGMENTS = {
    "middle": [[1, 2]],
    "first": [[0]],
    "last": [[3]],  # the first layer the backward reaches is in a nested backward
    "every": [[0], [1], [2], [3]],
}


def regularize(model: nn.Module, units: str) -> None:
    rule = torchreg.ElasticNet(l1=L1, l2=L2, params="*")
    if units == "whole":
        torchreg.apply_regularization(model, {nn.Module: rule})
    else:  # one unit per layer: a checkpointed layer's unit is reached by the nested backward only
        for layer in model.layers:
            torchreg.ElasticNet(layer, l1=L1, l2=L2, params="*")


def train_both(model: nn.Module, ref: nn.Module, *, steps: int, micro: int, scale: Optional[float],
               input_grad: bool = True) -> None:
    """``steps`` optimizer steps of ``micro`` micro-batches each, on ``model`` (torchreg) and ``ref``
    (penalty in the loss, once per step); gradients compared before each step (after ``unscale_``)."""
    torchreg.configure(model, accumulation_steps=micro)
    scaler = torch.amp.GradScaler("cpu", init_scale=scale) if scale else None
    if scaler is not None:
        torchreg.configure(model, grad_scaler=scaler)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(3)
    for _ in range(steps):
        opt.zero_grad()
        opt_ref.zero_grad()
        for m in range(micro):
            x = torch.randn(4, 5, generator=g).requires_grad_(input_grad)
            loss = model(x) / micro
            (scaler.scale(loss) if scaler is not None else loss).backward()
            ref_loss = ref(x.detach().requires_grad_(input_grad)) / micro
            (ref_loss + (penalty(ref) if m == 0 else 0.0)).backward()
        if scaler is not None:
            scaler.unscale_(opt)
        assert_same_grads(model, ref)
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        opt_ref.step()


@pytest.mark.parametrize("scale", [None, 2.0**6], ids=["unscaled", "scaler"])
@pytest.mark.parametrize("micro", [1, 3], ids=["k1", "k3"])
@pytest.mark.parametrize("units", ["whole", "per-layer"])
@pytest.mark.parametrize("segments", SEGMENTS)
@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non-reentrant"])
def test_checkpointed_segments_get_one_term(reentrant: bool, segments: str, units: str, micro: int,
                                            scale: Optional[float]) -> None:
    model = Stack(SEGMENTS[segments], reentrant)
    ref = bare_copy(model)
    regularize(model, units)
    train_both(model, ref, steps=2, micro=micro, scale=scale)


@pytest.mark.parametrize("units", ["whole", "per-layer"])
def test_reentrant_first_layer_fed_raw_data(units: str) -> None:
    """Reentrant checkpointing of a first layer whose input needs no grad gives that layer no data
    gradient (PyTorch's own behaviour); a unit reached elsewhere still gives it its term, as the
    loss penalty does; a unit reached nowhere is left alone, as ever."""
    model = Stack([[0]], True)
    ref = bare_copy(model)
    regularize(model, units)
    x = torch.randn(4, 5)
    names = None if units == "whole" else [n for n in dict(ref.named_parameters()) if not n.startswith("layers.0.")]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "None of the inputs have requires_grad=True")
        model(x).backward()
        (ref(x) + penalty(ref, names)).backward()
    assert_same_grads(model, ref)


class Transformer(nn.Module):
    def __init__(self, reentrant: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Linear(6, 8)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True) for _ in range(2))
        self.head = nn.Linear(8, 1)
        self.reentrant = reentrant

    def forward(self, x: Tensor) -> Tensor:
        h = self.embed(x)
        for block in self.blocks:
            h = checkpoint(block, h, use_reentrant=self.reentrant)
        return self.head(h).pow(2).mean()


@pytest.mark.parametrize("scale", [None, 2.0**5], ids=["unscaled", "scaler"])
@pytest.mark.parametrize("micro", [1, 2], ids=["k1", "k2"])
@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non-reentrant"])
def test_transformer_with_every_block_checkpointed(reentrant: bool, micro: int, scale: Optional[float]) -> None:
    model = Transformer(reentrant)
    ref = bare_copy(model)
    torchreg.apply_regularization(model, {nn.Module: torchreg.ElasticNet(l1=L1, l2=L2, params="*")})
    torchreg.configure(model, accumulation_steps=micro)
    scaler = torch.amp.GradScaler("cpu", init_scale=scale) if scale else None
    if scaler is not None:
        torchreg.configure(model, grad_scaler=scaler)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(5)
    for _ in range(2):
        opt.zero_grad()
        ref.zero_grad()
        for m in range(micro):
            x = torch.randn(2, 3, 6, generator=g)
            loss = model(x) / micro
            (scaler.scale(loss) if scaler is not None else loss).backward()
            (ref(x) / micro + (penalty(ref) if m == 0 else 0.0)).backward()
        if scaler is not None:
            scaler.unscale_(opt)
        assert_same_grads(model, ref, rtol=1e-5, atol=1e-6)
        with torch.no_grad():  # the same update on both (the scaler's step would skip nothing here)
            for p, q in zip(model.parameters(), ref.parameters()):
                p -= 0.05 * p.grad
                q -= 0.05 * q.grad
        if scaler is not None:
            scaler.update()


def test_nested_checkpoints() -> None:
    """A reentrant checkpoint inside another one: still one term per parameter."""
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.inner = nn.Sequential(nn.Linear(4, 4), nn.Tanh())
            self.outer_layer, self.last = nn.Linear(4, 4), nn.Linear(4, 1)

        def block(self, x: Tensor) -> Tensor:
            return checkpoint(self.inner, torch.tanh(self.outer_layer(x)), use_reentrant=True)

        def forward(self, x: Tensor) -> Tensor:
            return self.last(checkpoint(self.block, x, use_reentrant=True)).pow(2).sum()

    warnings.filterwarnings("ignore", "None of the inputs have requires_grad=True")  # (the inner
    # checkpoint's first, no-grad run, inside the outer one's forward; reset by pytest after the test)
    for units in ("whole", "inner-only"):
        model = Net()
        ref = bare_copy(model)
        if units == "whole":
            torchreg.apply_regularization(model, {nn.Module: torchreg.ElasticNet(l1=L1, l2=L2, params="*")})
            names = None
        else:
            torchreg.ElasticNet(model.inner, l1=L1, l2=L2, params="*")
            names = ["inner.0.weight", "inner.0.bias"]
        for _ in range(2):  # two backward passes, each followed by a step: the guard stays quiet
            model.zero_grad()
            ref.zero_grad()
            x = torch.randn(3, 4, requires_grad=True)
            model(x).backward()
            (ref(x) + penalty(ref, names)).backward()
            assert_same_grads(model, ref)
            torch.optim.SGD(model.parameters(), lr=0.0).step()


# -- backward(inputs=...) --------------------------------------------------------------------------------
class TwoBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.head = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 1)

    def forward(self, x: Tensor, use_b: bool = True) -> Tensor:
        h = torch.tanh(self.a(x)) + (torch.tanh(self.b(x)) if use_b else 0.0)
        return self.head(h).pow(2).sum()


@pytest.mark.parametrize("listed,use_b", [
    (["head.weight"], True),
    (["a.weight", "a.bias"], True),
    (["a.weight", "b.weight"], False),  # b.weight listed but skipped by the forward: the penalty still reaches it
])
def test_backward_inputs_adds_to_listed_leaves_only(listed: List[str], use_b: bool) -> None:
    model = TwoBranch()
    ref = bare_copy(model)
    torchreg.apply_regularization(model, {nn.Module: torchreg.ElasticNet(l1=L1, l2=L2, params="*")})
    x = torch.randn(3, 4)
    params, ref_params = dict(model.named_parameters()), dict(ref.named_parameters())
    model(x, use_b).backward(inputs=[params[n] for n in listed])
    (ref(x, use_b) + penalty(ref)).backward(inputs=[ref_params[n] for n in listed])
    assert_same_grads(model, ref)
    assert all(params[n].grad is None for n in params if n not in listed)


def test_backward_inputs_given_as_gradient_edges() -> None:
    from torch.autograd.graph import get_gradient_edge

    model = TwoBranch()
    ref = bare_copy(model)
    torchreg.apply_regularization(model, {nn.Module: torchreg.ElasticNet(l1=L1, l2=L2, params="*")})
    x = torch.randn(3, 4)
    model(x).backward(inputs=[get_gradient_edge(model.a.weight), model.head.bias])
    (ref(x) + penalty(ref)).backward(inputs=[get_gradient_edge(ref.a.weight), ref.head.bias])
    assert_same_grads(model, ref)


def test_backward_inputs_then_plain_backward() -> None:
    model = TwoBranch()
    ref = bare_copy(model)
    torchreg.apply_regularization(model, {nn.Module: torchreg.ElasticNet(l1=L1, l2=L2, params="*")})
    torchreg.configure(model, accumulation_steps=2)
    x = torch.randn(3, 4)
    model(x).backward(inputs=[model.a.weight])
    model(x).backward()
    (ref(x) + penalty(ref) / 2).backward(inputs=[ref.a.weight])
    (ref(x) + penalty(ref) / 2).backward()
    assert_same_grads(model, ref)


# -- frozen when regularized, unfrozen later -------------------------------------------------------------
def test_wholly_frozen_layer_unfrozen_later() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 1))
    model[0].requires_grad_(False)
    ref = bare_copy(model)
    torchreg.ElasticNet(model[0], l1=L1, l2=L2, params="*")
    opt, opt_ref = (torch.optim.SGD(m.parameters(), lr=0.1) for m in (model, ref))
    x = torch.randn(3, 4)
    model(x).sum().backward()  # frozen: nothing to do
    ref(x).sum().backward()
    assert_same_grads(model, ref)
    opt.step()
    opt_ref.step()
    for m in (model, ref):
        m.zero_grad()
        m[0].requires_grad_(True)
    model(x).sum().backward()  # the first backward after unfreezing is exact
    (ref(x).sum() + penalty(ref, ["0.weight", "0.bias"])).backward()
    assert_same_grads(model, ref)


def test_frozen_backbone_matched_by_a_rule_unfrozen_for_fine_tuning() -> None:
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("backbone", nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 6)))
    model.add_module("head", nn.Linear(6, 2))
    model.backbone.requires_grad_(False)
    ref = bare_copy(model)
    torchreg.apply_regularization(model, {"backbone.*": torchreg.L2(L2), "head": None})
    x = torch.randn(3, 4)
    for step in range(3):
        if step == 1:  # unfreeze for fine-tuning
            model.backbone.requires_grad_(True)
            ref.backbone.requires_grad_(True)
        model.zero_grad()
        ref.zero_grad()
        model(x).pow(2).sum().backward()
        terms = [(p, 0.0, L2) for n, p in ref.named_parameters() if n.endswith("weight") and "backbone" in n
                 and p.requires_grad]
        (ref(x).pow(2).sum() + (explicit_penalty(terms) if terms else 0.0)).backward()
        assert_same_grads(model, ref)


# -- reparametrization after torchreg ----------------------------------------------------------------------
REPARAMETRIZATIONS: Dict[str, Callable[[nn.Module], object]] = {  # those that put new parameters in place
    "weight_norm": lambda m: torch.nn.utils.weight_norm(m),
    "parametrizations.weight_norm": lambda m: torch.nn.utils.parametrizations.weight_norm(m),
}
KEEPING: Dict[str, Callable[[nn.Module], object]] = {  # those that keep the parameter, renamed
    "spectral_norm": lambda m: torch.nn.utils.spectral_norm(m),
    "parametrizations.orthogonal": lambda m: torch.nn.utils.parametrizations.orthogonal(m),
    "parametrizations.spectral_norm": lambda m: torch.nn.utils.parametrizations.spectral_norm(m),
}


@pytest.mark.parametrize("name", REPARAMETRIZATIONS)
def test_reparametrization_after_torchreg_warns(name: str) -> None:
    """weight_norm (both APIs) puts new parameters in place of the regularized one: a warning."""
    torch.manual_seed(0)
    layer = torchreg.L1(nn.Linear(4, 4), L1)
    assert float(torchreg.penalty(layer)) > 0
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "`torch.nn.utils.weight_norm` is deprecated", FutureWarning)
        REPARAMETRIZATIONS[name](layer)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    layer(torch.randn(2, 4)).sum().backward()
    with pytest.warns(UserWarning, match=r"no longer parameters of the model.*reparametrization"):
        opt.step()
    assert float(torchreg.penalty(layer)) == 0.0  # (what the warning said)
    opt.step()  # once


@pytest.mark.parametrize("name", KEEPING)
def test_reparametrization_keeping_the_parameter_keeps_it_regularized(name: str) -> None:
    """The parameter object moved (``weight_orig``, ``parametrizations.weight.original``): still the
    one the optimizer trains and the hook's, so it stays regularized, without a warning."""
    torch.manual_seed(0)
    layer = nn.Linear(4, 4)
    ref = bare_copy(layer)
    torchreg.L1(layer, L1)
    weight = layer.weight
    for m in (layer, ref):
        torch.manual_seed(1)  # (spectral_norm's random start)
        KEEPING[name](m)
    ref_weight = next(p for n, p in ref.named_parameters() if n != "bias")
    assert any(p is weight for p in layer.parameters())
    opt = torch.optim.SGD(layer.parameters(), lr=0.0)
    x = torch.randn(2, 4)
    layer(x).sum().backward()
    (ref(x).sum() + explicit_penalty([(ref_weight, L1, 0.0)])).backward()
    assert_same_grads(layer, ref)
    opt.step()  # no warning
    torch.testing.assert_close(torchreg.penalty(layer), L1 * weight.detach().abs().sum())


def test_parametrized_original_can_be_regularized_after() -> None:
    """The warning's advice: apply torchreg after the reparametrization, to the original."""
    torch.manual_seed(0)
    layer = torch.nn.utils.parametrizations.weight_norm(nn.Linear(4, 4))
    ref = bare_copy(layer)
    torchreg.L1(layer, L1, params="parametrizations.weight.original*")
    x = torch.randn(2, 4)
    layer(x).sum().backward()
    originals = [p for n, p in ref.named_parameters() if n.startswith("parametrizations.weight.original")]
    (ref(x).sum() + explicit_penalty((p, L1, 0.0) for p in originals)).backward()
    assert_same_grads(layer, ref)
    torch.optim.SGD(layer.parameters(), lr=0.1).step()  # no warning


# -- two threads -----------------------------------------------------------------------------------------
class Wait(torch.autograd.Function):
    """Identity whose backward, in the thread named ``slow``, waits until ``event`` is set."""

    event = threading.Event()

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        if threading.current_thread().name == "slow":
            Wait.event.wait(timeout=30)
        return grad


def test_concurrent_backwards_from_two_threads_raise() -> None:
    torch.manual_seed(0)
    first, last = nn.Linear(4, 4), nn.Linear(4, 1)
    model = torchreg.apply_regularization(nn.ModuleDict({"first": first, "last": last}),
                                          {nn.Linear: torchreg.L2(L2)})
    Wait.event.clear()
    errors: Dict[str, BaseException] = {}
    barrier = threading.Barrier(2)

    def run() -> None:
        name = threading.current_thread().name
        try:
            loss = last(Wait.apply(torch.tanh(first(torch.randn(3, 4))))).sum()
            barrier.wait(timeout=30)
            if name == "fast":  # wait until the slow one is inside its backward (its first hook ran)
                while getattr(model, "_torchreg_unit").sessions.current() is None:
                    time.sleep(0.001)
            loss.backward()
        except BaseException as error:  # noqa: BLE001 - reported below
            errors[name] = error
        finally:
            if name == "fast":
                Wait.event.set()

    threads = [threading.Thread(target=run, name=n) for n in ("slow", "fast")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert set(errors) == {"fast"}, errors
    assert isinstance(errors["fast"], RuntimeError)
    assert "two backward passes" in str(errors["fast"]) and "at the same time" in str(errors["fast"])
    # Afterwards a backward is exact again.
    ref = nn.ModuleDict({"first": bare_copy(first), "last": bare_copy(last)})
    model.zero_grad()
    x = torch.randn(3, 4)
    last(torch.tanh(first(x))).sum().backward()
    (ref["last"](torch.tanh(ref["first"](x))).sum()
     + explicit_penalty([(ref["first"].weight, 0.0, L2), (ref["last"].weight, 0.0, L2)])).backward()
    assert_same_grads(model, ref)


def test_sequential_backwards_from_two_threads_are_exact() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 1))
    ref = bare_copy(model)
    torchreg.apply_regularization(model, {nn.Linear: torchreg.L2(L2)})
    torchreg.configure(model, accumulation_steps=2)
    lock = threading.Lock()
    x = torch.randn(3, 4)

    def run() -> None:
        with lock:
            model(x).sum().backward()

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for _ in range(2):
        (ref(x).sum() + explicit_penalty([(ref[0].weight, 0.0, L2 / 2), (ref[2].weight, 0.0, L2 / 2)])).backward()
    assert_same_grads(model, ref)


# -- an undeclared GradScaler ---------------------------------------------------------------------------
def lightning_like_loop(model: nn.Module, scaler: Optional[torch.amp.GradScaler], steps: int = 3) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(steps):
        opt.zero_grad()
        loss = model(torch.randn(4, 4)).pow(2).mean()
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return torchreg.L2(nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 1)), L2)


def test_undeclared_grad_scaler_warns_once() -> None:
    model = small_model()
    with pytest.warns(UserWarning, match=r"GradScaler.*not declared.*configure\(model, grad_scaler=scaler\)") as seen:
        lightning_like_loop(model, torch.amp.GradScaler("cpu", init_scale=2.0**8))
    assert len([w for w in seen if "GradScaler" in str(w.message)]) == 1


@pytest.mark.parametrize("case", ["declared", "no scaler", "disabled scaler"])
def test_no_scaler_warning_when_declared_or_absent(case: str) -> None:
    model = small_model()
    scaler = None
    if case == "declared":
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
        torchreg.configure(model, grad_scaler=scaler)
    elif case == "disabled scaler":
        scaler = torch.amp.GradScaler("cpu", enabled=False)
    lightning_like_loop(model, scaler)  # warnings are errors


def test_scaler_warning_waits_for_the_model_s_own_optimizer() -> None:
    """Another model's optimizer stepping first (a GAN) does not use up the check."""
    model, other = small_model(), nn.Linear(2, 2)
    torch.optim.SGD(other.parameters(), lr=0.1).step()
    with pytest.warns(UserWarning, match="GradScaler"):
        lightning_like_loop(model, torch.amp.GradScaler("cpu", init_scale=2.0**8), steps=1)


def test_scaler_check_gives_up_on_a_model_never_stepped() -> None:
    """An EMA copy, never stepped by an optimizer: after SCALER_CHECK_STEPS steps of another optimizer
    it is no longer looked at (no cost per step for the rest of training)."""
    from torchreg._guards import StepCounter

    ema = small_model()
    unit = getattr(ema, "_torchreg_unit")
    other = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)
    for _ in range(StepCounter.SCALER_CHECK_STEPS - 1):
        other.step()
    assert unit in StepCounter.scaler_unchecked
    other.step()
    assert unit not in StepCounter.scaler_unchecked


# -- unpickled in a fresh process ---------------------------------------------------------------------------
def test_unpickled_model_in_a_fresh_process_counts_steps(tmp_path) -> None:
    model = small_model()
    torchreg.configure(model, accumulation_steps=1)
    path = tmp_path / "model.pt"
    torch.save(model, path)
    script = textwrap.dedent(f"""
        import warnings, torch
        warnings.simplefilter("error")
        model = torch.load({str(path)!r}, weights_only=False)   # imports torchreg, applies nothing
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        for _ in range(3):
            opt.zero_grad(set_to_none=False)                        # (the guard then relies on the steps)
            model(torch.randn(4, 4)).sum().backward()
            opt.step()
        assert float(model[0].weight.grad.abs().sum()) > 0
        print("ok")
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (os.getcwd(), os.environ.get("PYTHONPATH")) if p),
               OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-2000:]


def test_pickled_model_loads_in_process() -> None:
    model = small_model()
    copy = pickle.loads(pickle.dumps(model))
    lightning_like_loop(copy, None)


# -- CUDA: the hooks run on the device's autograd thread (no Python frames of the caller there) ----------
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("units", ["whole", "per-layer"])
def test_cuda_reentrant_checkpointing_and_inputs(units: str) -> None:
    model = Stack(SEGMENTS["every"], True).cuda()
    ref = bare_copy(model)
    regularize(model, units)
    x = torch.randn(4, 5, device="cuda", requires_grad=True)
    model(x).backward()
    (ref(x) + penalty(ref)).backward()
    assert_same_grads(model, ref)
    for m in (model, ref):
        m.zero_grad()
    plain = Stack([], True).cuda()  # inputs= (checkpointing does not support it)
    plain_ref = bare_copy(plain)
    regularize(plain, units)
    plain(x).backward(inputs=[plain.layers[1].weight])
    (plain_ref(x) + penalty(plain_ref)).backward(inputs=[plain_ref.layers[1].weight])
    assert_same_grads(plain, plain_ref)
