"""torchreg inside real training loops, each compared with the plain-PyTorch reference.

The reference is always a bare deep copy of the model taken *before* torchreg is applied, trained with
the same penalty added to the loss explicitly (``tests/reference.py``), so autograd computes the
penalty's gradient. Every test runs the loop a user would write with torchreg next to that reference:

* gradient accumulation (``(loss_i / k).backward()`` over k micro-batches) against the full batch;
* ``torch.amp.GradScaler`` on CPU: unscaled grads, skipped inf/NaN steps, scale growth, fused Adam,
  and no host synchronization added to the backward;
* ``torch.autocast("cpu", dtype=torch.bfloat16)``;
* ``DistributedDataParallel`` over 2 gloo processes (one spawn runs every case; see ``ddp_results``);
* ``torch.compile`` (inductor and aot_eager), ``torch._dynamo.explain``, compiled autograd;
* ``clip_grad_norm_`` after backward and ``torch.autograd.grad``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import functools
import os
import socket
import traceback
import warnings
from typing import Any, Callable, Dict, List, Optional, Tuple

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import torchreg
from reference import assert_same_grads, bare_copy, explicit_penalty, grads

# ---------------------------------------------------------------------------------------------------
# The model used by most tests: three Linear layers, each with a different rule, so that a factor
# applied to the wrong regularizer (or to none) shows up. Strengths are large on purpose: a missing,
# doubled or mis-scaled penalty term moves gradients by ~1e-2, far above fp32 tolerances.
# ---------------------------------------------------------------------------------------------------
TERMS = {  # parameter -> (l1, l2) of the explicit reference penalty l1*sum|w| + l2/2*sum w^2
    "0.weight": (0.05, 0.0),
    "2.weight": (0.02, 0.1),
    "4.weight": (0.0, 0.1),
}


def rules() -> Dict[Any, Any]:
    return {
        "0": torchreg.L1(lam=0.05),
        "2": torchreg.ElasticNet(l1=0.02, l2=0.1),
        nn.Linear: torchreg.L2(lam=0.1),
    }


def make_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 12), nn.Tanh(), nn.Linear(12, 3))


def regularized_pair(seed: int = 0) -> Tuple[nn.Module, nn.Module]:
    """(model regularized by torchreg, bare reference copy taken before torchreg was applied)."""
    model = make_mlp(seed)
    reference = bare_copy(model)
    torchreg.apply_regularization(model, rules())
    return model, reference


class Branchy(nn.Module):
    """A trunk and two heads; head ``b`` is used only when ``use_b``: a branch some forwards skip."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Linear(6, 8)
        self.a = nn.Linear(8, 3)
        self.b = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor, use_b: bool = True) -> torch.Tensor:
        h = torch.tanh(self.trunk(x))
        return self.a(h) + self.b(h) if use_b else self.a(h)


def make_branchy() -> nn.Module:
    torch.manual_seed(4)
    return Branchy()


def regularize_branchy(model: nn.Module) -> None:
    torchreg.apply_regularization(model, {nn.Linear: torchreg.ElasticNet(l1=0.05, l2=0.1)})


BRANCHY_TERMS = {name: (0.05, 0.1) for name in ("trunk.weight", "a.weight", "b.weight")}


def penalty_of(model: nn.Module, terms: Dict[str, Tuple[float, float]] = TERMS) -> torch.Tensor:
    return explicit_penalty((model.get_parameter(name), l1, l2) for name, (l1, l2) in terms.items())


def batch(n: int, seed: int, n_in: int = 6, n_out: int = 3) -> Tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + seed)
    return torch.randn(n, n_in, generator=g), torch.randn(n, n_out, generator=g)


def reference_backward(reference: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    loss = F.mse_loss(reference(x), y) + penalty_of(reference)
    loss.backward()
    return loss


def assert_same_params(actual: nn.Module, expected: nn.Module, **tolerances: Any) -> None:
    for (name, p), q in zip(actual.named_parameters(), expected.parameters()):
        torch.testing.assert_close(p, q, msg=lambda m: f"{name}: {m}", **tolerances)


def torchreg_warnings(caught: List[warnings.WarningMessage]) -> List[str]:
    return [str(w.message) for w in caught if "torchreg" in str(w.message)]


# ===================================================================================================
# Gradient accumulation
# ===================================================================================================
@pytest.mark.parametrize("set_to_none", [True, False], ids=["set_to_none", "zeroed"])
@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_accumulation_matches_full_batch(k: int, set_to_none: bool) -> None:
    model, reference = regularized_pair()
    torchreg.configure(model, accumulation_steps=k)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(3):
            x, y = batch(16, seed=step)
            opt.zero_grad(set_to_none=set_to_none)
            ref_opt.zero_grad(set_to_none=set_to_none)
            for xi, yi in zip(x.chunk(k), y.chunk(k)):  # k equal micro-batches: mean of means
                (F.mse_loss(model(xi), yi) / k).backward()
            reference_backward(reference, x, y)  # full batch, penalty once
            assert_same_grads(model, reference)
            opt.step()
            ref_opt.step()
            assert_same_params(model, reference)
    assert torchreg_warnings(caught) == [], "declared accumulation must not warn"


@pytest.mark.parametrize(
    "declared, backwards", [(None, 2), (2, 4)], ids=["undeclared-2-backwards", "declared-2-ran-4"]
)
def test_accumulation_mismatch_warns_once(declared: Optional[int], backwards: int) -> None:
    model, _ = regularized_pair()
    if declared is not None:
        torchreg.configure(model, accumulation_steps=declared)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.warns(UserWarning, match="accumulation_steps") as record:
        for step in range(3):
            x, y = batch(16, seed=step)
            opt.zero_grad()
            for xi, yi in zip(x.chunk(backwards), y.chunk(backwards)):
                (F.mse_loss(model(xi), yi) / backwards).backward()
            opt.step()
    assert len(torchreg_warnings(list(record))) == 1, "the warning is given once, not every step"


def test_one_backward_per_step_without_configure_does_not_warn() -> None:
    model, _ = regularized_pair()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(4):
            x, y = batch(8, seed=step)
            opt.zero_grad(set_to_none=step % 2 == 0)
            F.mse_loss(model(x), y).backward()
            opt.step()
    assert torchreg_warnings(caught) == []


# ===================================================================================================
# GradScaler on CPU, fused optimizer, no host sync
# ===================================================================================================
SCHEDULE = ["ok", "ok", "inf", "ok", "ok"]  # step 2 gets an inf in its data: the scaler skips it


def test_grad_scaler_unscale_skip_growth_and_clip() -> None:
    """The AMP recipe: scale(loss).backward(); unscale_; clip; step; update, against fp32 + penalty."""
    model, reference = regularized_pair()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1)  # grows every good step
    torchreg.configure(model, grad_scaler=scaler)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    scales = [scaler.get_scale()]
    for step, kind in enumerate(SCHEDULE):
        x, y = batch(16, seed=step)
        if kind == "inf":
            x[3, 2] = float("inf")
        opt.zero_grad()
        scaler.scale(F.mse_loss(model(x), y)).backward()
        scaler.unscale_(opt)
        finite = all(torch.isfinite(p.grad).all() for p in model.parameters())
        before = [p.detach().clone() for p in model.parameters()]
        if kind == "ok":
            assert finite
            ref_opt.zero_grad()
            reference_backward(reference, x, y)
            assert_same_grads(model, reference)  # exactly the fp32 gradient, whatever the scale
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=0.5)
            ref_norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), max_norm=0.5)
            torch.testing.assert_close(norm, ref_norm)
            assert_same_grads(model, reference)
        else:
            assert not finite, "the injected inf must reach the gradients"
        scaler.step(opt)
        scaler.update()
        scales.append(scaler.get_scale())
        if kind == "ok":
            ref_opt.step()
            assert scales[-1] == 2 * scales[-2], scales
        else:
            for p, b in zip(model.parameters(), before):
                assert torch.equal(p, b), "a skipped step must not change the parameters"
            assert scales[-1] == scales[-2] / 2, scales
        assert_same_params(model, reference)
    assert scales == [1024.0, 2048.0, 4096.0, 2048.0, 4096.0, 8192.0]


def test_grad_scaler_with_accumulation() -> None:
    k = 4
    model, reference = regularized_pair()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**6, growth_interval=1)
    torchreg.configure(model, accumulation_steps=k, grad_scaler=scaler)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    for step in range(3):
        x, y = batch(16, seed=step)
        opt.zero_grad()
        ref_opt.zero_grad()
        for xi, yi in zip(x.chunk(k), y.chunk(k)):
            scaler.scale(F.mse_loss(model(xi), yi) / k).backward()
        scaler.unscale_(opt)
        reference_backward(reference, x, y)
        assert_same_grads(model, reference)
        scaler.step(opt)
        scaler.update()
        ref_opt.step()
    assert scaler.get_scale() == 2.0**9


def test_grad_scaler_fused_adam_trajectory() -> None:
    """``scaler.step`` on a fused Adam unscales inside the kernel: the trajectory equals the reference's."""
    model, reference = regularized_pair()
    try:
        opt = torch.optim.Adam(model.parameters(), lr=1e-2, fused=True)
        ref_opt = torch.optim.Adam(reference.parameters(), lr=1e-2, fused=True)
    except (RuntimeError, ValueError) as error:  # pragma: no cover - depends on the build
        pytest.skip(f"fused Adam is not supported on CPU by this torch build: {error}")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=2)
    torchreg.configure(model, grad_scaler=scaler)
    for step, kind in enumerate(SCHEDULE):
        x, y = batch(16, seed=step)
        if kind == "inf":
            x[0, 0] = float("nan")
        before = [p.detach().clone() for p in model.parameters()]
        opt.zero_grad()
        scaler.scale(F.mse_loss(model(x), y)).backward()
        scaler.step(opt)  # no unscale_: the fused kernel divides by the scale (optimizer.grad_scale)
        scaler.update()
        if kind == "ok":
            ref_opt.zero_grad()
            reference_backward(reference, x, y)
            ref_opt.step()
        else:
            assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
        assert_same_params(model, reference)
    assert scaler.get_scale() == 2.0**13  # 4096 -> 8192 (2 good steps) -> 4096 (skip) -> 8192 (2 good)
    assert max((p - b).abs().max() for p, b in zip(model.parameters(), before)) > 1e-4  # it did train


class _OpLog(TorchDispatchMode):
    """Records every aten op run while active, backward-pass ops (hooks included) too."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: List[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def _backward_ops(
    model: nn.Module, scaler: torch.amp.GradScaler, monkeypatch: pytest.MonkeyPatch
) -> Tuple[List[str], int]:
    """Ops run by ``scaler.scale(loss).backward()``, and how often ``GradScaler.get_scale`` was called."""
    x, y = batch(8, seed=0)
    scaled = scaler.scale(F.mse_loss(model(x), y))  # the scaler's lazy init happens here, outside
    calls = []
    original = torch.amp.GradScaler.get_scale
    monkeypatch.setattr(torch.amp.GradScaler, "get_scale", lambda self: calls.append(1) or original(self))
    with _OpLog() as log:
        scaled.backward()
    monkeypatch.setattr(torch.amp.GradScaler, "get_scale", original)
    return log.ops, len(calls)


def test_grad_scaler_adds_no_host_sync(monkeypatch: pytest.MonkeyPatch) -> None:
    """No device-to-host read during backward.

    A host sync is any read of a tensor's value on the host: ``item()``, ``float()``, ``bool()``,
    ``tolist()``... All of them go through the aten op ``_local_scalar_dense``, so recording the aten
    ops run during backward (a ``TorchDispatchMode`` sees the backward and the hooks' ops) and
    requiring that op to be absent catches every form, on CPU as on CUDA. ``GradScaler.get_scale``
    (which calls ``item()``) is spied on too. A control hook that does call ``item()`` proves the
    check can see a sync, and the scaled ``addcmul_`` proves it sees torchreg's own work.
    """
    model, _ = regularized_pair()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    torchreg.configure(model, grad_scaler=scaler)
    ops, get_scale_calls = _backward_ops(model, scaler, monkeypatch)
    assert get_scale_calls == 0
    assert "aten._local_scalar_dense.default" not in ops
    assert "aten.addcmul_.default" in ops  # the penalty multiplied by the device-tensor scale

    control = make_mlp()
    torchreg.L2(control, lam=0.1)
    torchreg.configure(control, grad_scaler=scaler)

    def syncing_hook(p: torch.Tensor) -> None:
        p.grad.abs().max().item()

    control[0].bias.register_post_accumulate_grad_hook(syncing_hook)
    ops, _ = _backward_ops(control, scaler, monkeypatch)
    assert "aten._local_scalar_dense.default" in ops


# ===================================================================================================
# autocast bfloat16
# ===================================================================================================
def test_autocast_bfloat16() -> None:
    """bf16 autocast: the same-precision reference to torch's bf16 tolerance, the fp32 one loosely.

    Against the reference run under the same autocast: rtol=1.6e-2, atol=1e-5 (``assert_close``'s
    bfloat16 defaults; measured difference ~1e-8, since both data gradients are computed the same way
    and torchreg adds its fp32 term to the fp32 ``.grad``). Against the fp32 reference: rtol=1.6e-2,
    atol=2e-3 (bf16 epsilon 7.8e-3 times gradients of ~0.3): a missing penalty term (0.05 on every
    element of the first layer's weight) still fails it.
    """
    model, reference = regularized_pair()
    reference32 = bare_copy(reference)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (model, reference, reference32)]
    for step in range(3):
        x, y = batch(16, seed=step)
        for opt in opts:
            opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, ref_out = model(x), reference(x)
        assert out.dtype == torch.bfloat16
        F.mse_loss(out.float(), y).backward()
        (F.mse_loss(ref_out.float(), y) + penalty_of(reference)).backward()
        assert_same_grads(model, reference, rtol=1.6e-2, atol=1e-5)
        if step == 0:
            reference_backward(reference32, x, y)
            assert_same_grads(model, reference32, rtol=1.6e-2, atol=2e-3)
        for opt in opts:
            opt.step()
        assert_same_params(model, reference, rtol=1.6e-2, atol=1e-5)


# ===================================================================================================
# clip_grad_norm_ and torch.autograd.grad
# ===================================================================================================
def test_clip_grad_norm_sees_regularized_gradient() -> None:
    model, reference = regularized_pair()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    for step in range(3):
        x, y = batch(16, seed=step)
        opt.zero_grad()
        ref_opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        reference_backward(reference, x, y)
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=0.25)
        ref_norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), max_norm=0.25)
        assert ref_norm > 0.25, "the clip must be active for this test to mean anything"
        torch.testing.assert_close(norm, ref_norm)
        assert_same_grads(model, reference)
        opt.step()
        ref_opt.step()
    assert_same_params(model, reference)


def test_autograd_grad_leaves_dot_grad_untouched() -> None:
    model, reference = regularized_pair()
    x, y = batch(8, seed=0)
    params = list(model.parameters())
    # 1. Fresh model: every .grad None, and still None afterwards.
    got = torch.autograd.grad(F.mse_loss(model(x), y), params)
    assert all(p.grad is None for p in params)
    # The returned gradients are the loss's own (torchreg acts on .grad only).
    want = torch.autograd.grad(F.mse_loss(reference(x), y), list(reference.parameters()))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    # 2. After a backward: existing values unchanged, also for a subset of inputs.
    F.mse_loss(model(x), y).backward()
    before = grads(model)
    x2, y2 = batch(8, seed=1)
    torch.autograd.grad(F.mse_loss(model(x2), y2), params)
    torch.autograd.grad(F.mse_loss(model(x2), y2), [model[2].weight])
    after = grads(model)
    assert all(torch.equal(before[n], after[n]) for n in before)
    # 3. The next backward is still exact (torchreg's per-backward state was not disturbed).
    model.zero_grad()
    F.mse_loss(model(x2), y2).backward()
    reference.zero_grad()
    reference_backward(reference, x2, y2)
    assert_same_grads(model, reference)


# ===================================================================================================
# torch.compile
# ===================================================================================================
@pytest.fixture
def dynamo_reset():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _compiled_loop(backend: str, k: int, fullgraph: bool) -> None:
    model, reference = regularized_pair()
    torchreg.configure(model, accumulation_steps=k)
    compiled = torch.compile(model, backend=backend, fullgraph=fullgraph)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    for step in range(3):
        x, y = batch(16, seed=step)
        opt.zero_grad()
        ref_opt.zero_grad()
        for xi, yi in zip(x.chunk(k), y.chunk(k)):
            (F.mse_loss(compiled(xi), yi) / k).backward()
        reference_backward(reference, x, y)
        assert_same_grads(model, reference)
        opt.step()
        ref_opt.step()
    assert_same_params(model, reference)


def test_compile_inductor_matches_reference(dynamo_reset: None) -> None:
    _compiled_loop("inductor", k=1, fullgraph=True)


def test_compile_aot_eager_with_accumulation(dynamo_reset: None) -> None:
    _compiled_loop("aot_eager", k=2, fullgraph=True)


def test_compile_explain_same_graphs_before_and_after(dynamo_reset: None) -> None:
    model, reference = regularized_pair()
    x, _ = batch(4, seed=0)
    bare = torch._dynamo.explain(reference)(x)
    torch._dynamo.reset()
    regular = torch._dynamo.explain(model)(x)
    print(f"explain: bare {bare.graph_count} graph(s), {bare.graph_break_count} break(s); "
          f"regularized {regular.graph_count} graph(s), {regular.graph_break_count} break(s)")
    assert (regular.graph_count, regular.graph_break_count) == (bare.graph_count, bare.graph_break_count)
    assert regular.graph_break_count == 0, regular.break_reasons


def _enable_compiled_autograd() -> Any:
    ca = torch._dynamo.compiled_autograd
    enable = getattr(ca, "enable", None) or ca._enable
    return enable(torch.compile(backend="eager"))


def _backward_under_compiled_autograd(how: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    def loss_of(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = model(x, False) if isinstance(model, Branchy) else model(x)  # Branchy: head b skipped
        return F.mse_loss(out, y)

    if how == "context":
        with _enable_compiled_autograd():
            loss_of(x, y).backward()
    else:  # the config flag, with backward inside a compiled training step
        @torch.compile(backend="aot_eager")
        def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            loss = loss_of(x, y)
            loss.backward()
            return loss

        with torch._dynamo.config.patch(compiled_autograd=True):
            step(x, y)


CA_CASES = [  # (how, model, warm cache)
    ("context", "mlp", False),
    ("context", "mlp", True),
    ("config", "mlp", False),
    ("config", "mlp", True),
    ("context", "skipped-branch", False),
    ("config", "skipped-branch", False),
]


@pytest.mark.parametrize("how, which, warm_cache", CA_CASES,
                         ids=[f"{h}-{m}-{'warm' if w else 'cold'}" for h, m, w in CA_CASES])
def test_compiled_autograd_raises_clearly_or_is_exact(how: str, which: str, warm_cache: bool,
                                                      dynamo_reset: None) -> None:
    """Compiled autograd must never silently drop the penalty: a clear error, or exact gradients.

    ``how``: the ``compiled_autograd`` context manager around ``backward()``, or the config flag
    with ``backward()`` inside a ``torch.compile``'d step. ``warm``: the bare model's backward was
    compiled (and cached) before torchreg was applied. ``skipped-branch``: a head this forward does not
    use, which torchreg penalizes at the end of backward (as ``loss + penalty`` would), the part an
    end-of-backward callback does and compiled autograd would skip.
    """
    if which == "mlp":
        model, terms = make_mlp(), TERMS
        regularize = lambda m: torchreg.apply_regularization(m, rules())  # noqa: E731
    else:
        model, terms, regularize = make_branchy(), BRANCHY_TERMS, regularize_branchy
    reference = bare_copy(model)
    x, y = batch(16, seed=0)
    if warm_cache:
        for _ in range(2):
            _backward_under_compiled_autograd(how, model, x, y)
        model.zero_grad(set_to_none=True)
    regularize(model)
    out = reference(x, False) if which != "mlp" else reference(x)
    (F.mse_loss(out, y) + penalty_of(reference, terms)).backward()
    for attempt in range(2):
        model.zero_grad(set_to_none=True)
        try:
            _backward_under_compiled_autograd(how, model, x, y)
        except Exception as error:  # noqa: BLE001 - Dynamo may wrap the error; judged by its text
            text = f"{type(error).__name__}: {error}"
            assert "torchreg" in text and "compiled autograd" in text, text
        else:
            assert_same_grads(model, reference)
    # Back in eager autograd the same model is exact again: nothing was left half-done.
    model.zero_grad(set_to_none=True)
    out = model(x, False) if which != "mlp" else model(x)
    F.mse_loss(out, y).backward()
    assert_same_grads(model, reference)


# ===================================================================================================
# DistributedDataParallel (and FSDP2): 2 gloo processes, one spawn for every case
#
# The module-scoped fixture ``ddp_results`` spawns the 2 ranks once; each runs every case of
# DDP_CASES in turn (3 optimizer steps each, its own shard of every batch) and saves its gradients
# and parameters after each step. Each case is then checked here against the single-process
# reference on the concatenated data, and the two ranks against each other, bit for bit.
# ===================================================================================================
WORLD = 2
DDP_STEPS = 3  # buckets are rebuilt by size after the first step
DDP_MICRO = 4  # rows per micro-batch on each rank


def make_ddp_mlp() -> nn.Module:
    return make_mlp(seed=3)


def _regularize_mlp(model: nn.Module) -> None:
    torchreg.L1(model[0], lam=0.05)  # per-layer units, as users write them
    torchreg.ElasticNet(model[2], l1=0.02, l2=0.1)
    torchreg.L2(model[4], lam=0.1)


def _regularize_branchy_layers(model: nn.Module) -> None:
    for layer in (model.trunk, model.a, model.b):
        torchreg.ElasticNet(layer, l1=0.05, l2=0.1)


@dataclasses.dataclass(frozen=True)
class DDPCase:
    id: str
    build: Callable[[], nn.Module]
    regularize: Callable[[nn.Module], None]
    terms: Dict[str, Tuple[float, float]]
    ddp: Dict[str, Any] = dataclasses.field(default_factory=dict)
    k: int = 1  # micro-batches per rank per step; the first k-1 under no_sync()
    branch: bool = False  # Branchy: head b used on rank 0 only
    fsdp: bool = False  # fully_shard (FSDP2) each Linear and the root instead of DDP
    regularize_first: bool = False  # FSDP2: torchreg applied before fully_shard

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, rank: int) -> torch.Tensor:
        out = model(x, rank == 0) if self.branch else model(x)
        return F.mse_loss(out, y)


TINY = 1e-6  # bucket_cap_mb: every parameter in a bucket of its own
DDP_CASES = [
    DDPCase("grad-copy", make_ddp_mlp, _regularize_mlp, TERMS, dict(gradient_as_bucket_view=False)),
    DDPCase("bucket-view", make_ddp_mlp, _regularize_mlp, TERMS, dict(gradient_as_bucket_view=True)),
    DDPCase("tiny-buckets", make_ddp_mlp, _regularize_mlp, TERMS, dict(bucket_cap_mb=TINY)),
    DDPCase("tiny-buckets-view", make_ddp_mlp, _regularize_mlp, TERMS,
            dict(bucket_cap_mb=TINY, gradient_as_bucket_view=True)),
    DDPCase("no-sync-k3", make_ddp_mlp, _regularize_mlp, TERMS, dict(gradient_as_bucket_view=False), k=3),
    DDPCase("no-sync-k2-view", make_ddp_mlp, _regularize_mlp, TERMS,
            dict(gradient_as_bucket_view=True, bucket_cap_mb=TINY), k=2),
    DDPCase("unused-branch-one-rank-apply_regularization", make_branchy, regularize_branchy,
            BRANCHY_TERMS, dict(find_unused_parameters=True), branch=True),
    DDPCase("fsdp2-fully_shard-then-regularize", make_ddp_mlp, _regularize_mlp, TERMS, fsdp=True),
    DDPCase("fsdp2-accumulation-k2", make_ddp_mlp, _regularize_mlp, TERMS, fsdp=True, k=2),
    # The other order: fully_shard replaces the regularized parameters; torchreg finds the sharded ones
    # at the first forward, before the first backward: exact from the first step, no warning.
    DDPCase("fsdp2-regularize-then-fully_shard", make_ddp_mlp, _regularize_mlp, TERMS, fsdp=True,
            regularize_first=True),
    # Head b is its own unit (torchreg.ElasticNet(model.b, ...)) and is used on rank 0 only: rank 1's
    # backward never reaches that unit, so only rank 0 adds its term after the averaging.
    DDPCase("unused-branch-one-rank-per-layer-units", make_branchy, _regularize_branchy_layers,
            BRANCHY_TERMS, dict(find_unused_parameters=True), branch=True),
]


def _shards(case: DDPCase, step: int) -> List[List[Tuple[torch.Tensor, torch.Tensor]]]:
    """shards[rank][i] = rank's i-th micro-batch of this step; the global batch is their concatenation."""
    x, y = batch(WORLD * case.k * DDP_MICRO, seed=100 + step)
    per_rank = zip(x.chunk(WORLD), y.chunk(WORLD))
    return [list(zip(xr.chunk(case.k), yr.chunk(case.k))) for xr, yr in per_rank]


def _fully_shard(model: nn.Module) -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (WORLD,))
    for layer in model.modules():
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def _full(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """A plain tensor: the gathered DTensor under FSDP2 (a collective: every rank calls it)."""
    if t is None:
        return None
    t = t.detach()
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).clone()


def _run_ddp_case(case: DDPCase, rank: int) -> Dict[str, Any]:
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = case.build()
    if case.fsdp:
        # fully_shard replaces the parameters by sharded DTensor parameters: regularize afterwards
        # (torchreg's hooks belong to parameter objects). FSDP2 calls post-accumulate-grad hooks on the
        # sharded parameters itself, after the reduce-scatter has averaged the gradients.
        if case.regularize_first:
            case.regularize(model)
            wrapped = _fully_shard(model)
        else:
            wrapped = _fully_shard(model)
            case.regularize(model)
    else:
        case.regularize(model)
    if case.k > 1:
        torchreg.configure(model, accumulation_steps=case.k)
    if not case.fsdp:
        wrapped = DDP(model, **case.ddp)
    opt = torch.optim.SGD(wrapped.parameters(), lr=0.1)
    record: Dict[str, Any] = {"grads": [], "params": []}
    for step in range(DDP_STEPS):
        opt.zero_grad()
        micro = _shards(case, step)[rank]
        for i, (x, y) in enumerate(micro):
            last = i == len(micro) - 1
            with contextlib.nullcontext() if last or case.fsdp else wrapped.no_sync():
                (case.loss(wrapped, x, y, rank) / case.k).backward()
        record["grads"].append({n: _full(p.grad) for n, p in model.named_parameters()})
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            opt.step()
        record.setdefault("warnings", []).append([str(w.message) for w in caught if "torchreg" in str(w.message)])
        record["params"].append({n: _full(p) for n, p in model.named_parameters()})
    if not case.fsdp:
        # Buckets are rebuilt (by size cap, in gradient-ready order) after the first synchronized step.
        record["buckets"] = len(wrapped.reducer._get_zeros_like_grad_buckets())
    return record


def _ddp_worker(rank: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message=".*find_unused_parameters=True.*")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    results: Dict[str, Any] = {}
    try:
        for case in DDP_CASES:
            try:
                results[case.id] = _run_ddp_case(case, rank)
            except Exception:  # reported by the test of that case
                results[case.id] = {"error": traceback.format_exc()}
            dist.barrier()
    finally:
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_ranks(worker: Any, out: Any, world: int = WORLD) -> List[Any]:
    """Run ``worker(rank, port, out_dir)`` in ``world`` processes (gloo on a free local port) and return
    what each saved to ``out / f"rank{rank}.pt"``, in rank order; skips where torch.distributed is absent."""
    import torch.multiprocessing as mp

    if not torch.distributed.is_available():  # pragma: no cover
        pytest.skip("torch.distributed is not available")
    mp.spawn(worker, args=(_free_port(), str(out)), nprocs=world, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world)]


def cases_worker(module: str, cases: str, run: str, rank: int, port: int, out_dir: str) -> None:
    """A :func:`spawn_ranks` worker for a test module's table of cases: every rank runs each case of
    ``module.<cases>`` (a list, or a function returning one) with ``module.<run>(case, rank)``, a barrier
    after each, and saves ``{case.id: result}`` (``{"crash": traceback}`` for a case that raised)."""
    import importlib

    import torch.distributed as dist

    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    table = getattr(importlib.import_module(module), cases)
    runner = getattr(importlib.import_module(module), run)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    results: Dict[str, Any] = {}
    try:
        for case in table() if callable(table) else table:
            try:
                results[case.id] = runner(case, rank)
            except Exception:
                results[case.id] = {"crash": traceback.format_exc()}
            dist.barrier()
    finally:
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.destroy_process_group()


def spawn_cases(module: str, out: Any, cases: str = "CASES", run: str = "run_case") -> List[Any]:
    """:func:`spawn_ranks` with :func:`cases_worker` over ``module``'s table of cases."""
    return spawn_ranks(functools.partial(cases_worker, module, cases, run), out)


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory: pytest.TempPathFactory) -> List[Dict[str, Any]]:
    """Spawn 2 processes once; each runs every DDP case and saves its grads and params per step."""
    return spawn_ranks(_ddp_worker, tmp_path_factory.mktemp("ddp"))


def _single_process_reference(case: DDPCase) -> List[Tuple[Dict[str, Any], Dict[str, torch.Tensor]]]:
    """Grads and params per step of the bare model on the concatenated data of both ranks, penalty once.

    The loss is the mean over all rows: for equal shards, the mean over ranks of each rank's mean
    loss, which is what DDP's averaging of gradients computes (with Branchy, rank 0's rows go through
    head b, rank 1's do not, as in the DDP run).
    """
    reference = case.build()
    opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    out = []
    for step in range(DDP_STEPS):
        opt.zero_grad()
        shards = _shards(case, step)
        if case.branch:
            loss = sum(case.loss(reference, torch.cat([x for x, _ in shard]), torch.cat([y for _, y in shard]), r)
                       for r, shard in enumerate(shards)) / WORLD
        else:
            x = torch.cat([x for shard in shards for x, _ in shard])
            y = torch.cat([y for shard in shards for _, y in shard])
            loss = case.loss(reference, x, y, 0)
        (loss + penalty_of(reference, case.terms)).backward()
        step_grads = grads(reference)
        opt.step()
        out.append((step_grads, {n: p.detach().clone() for n, p in reference.named_parameters()}))
    return out


@pytest.mark.parametrize("case", DDP_CASES, ids=[c.id for c in DDP_CASES])
def test_ddp_matches_single_process_and_ranks_agree(case: DDPCase, ddp_results: List[Dict[str, Any]]) -> None:
    per_rank = [results[case.id] for results in ddp_results]
    for rank, record in enumerate(per_rank):
        assert "error" not in record, f"rank {rank}:\n{record['error']}"
    if case.ddp.get("bucket_cap_mb") == TINY:
        assert per_rank[0]["buckets"] > 1, "the tiny cap must give several buckets"
    for rank, record in enumerate(per_rank):  # no warning: replaced parameters are found at the first forward
        assert not any(record["warnings"]), (rank, record["warnings"])
    expected = _single_process_reference(case)
    for step, (want_grads, want_params) in enumerate(expected):
        g0, g1 = (record["grads"][step] for record in per_rank)
        for name in want_grads:
            assert (g0[name] is None) == (g1[name] is None) == (want_grads[name] is None), name
            if g0[name] is None:
                continue
            assert torch.equal(g0[name], g1[name]), (
                f"step {step} {name}: ranks disagree by {(g0[name] - g1[name]).abs().max():.3g}")
            torch.testing.assert_close(g0[name], want_grads[name], msg=lambda m: f"step {step} {name}: {m}")
        p0, p1 = (record["params"][step] for record in per_rank)
        for name in want_params:
            assert torch.equal(p0[name], p1[name]), f"step {step} {name}: parameters diverged"
            torch.testing.assert_close(p0[name], want_params[name])
