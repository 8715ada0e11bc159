"""Proximal regularization (``proximal=True``) and GroupLasso, against independent references.

* scikit-learn's coordinate-descent solvers (Lasso, ElasticNet, MultiTaskLasso, tight ``tol``): the
  trained weights reach their solution within 1e-4 with exactly the same zero set, for SGD, momentum
  (with and without dampening), Nesterov, Adam, AdamW and learning-rate schedules;
* one optimizer step against torch's own optimizer on a bare copy followed by the proximal operator
  written out here (checks the step formula of each optimizer variant directly);
* autograd's gradient of the explicit group-lasso penalty (gradient mode).
"""

from __future__ import annotations

import copy
import gc
import warnings
import weakref
from typing import Any, Callable, Dict, Optional

import numpy as np
import pytest
import torch
from torch import nn

import torchreg
from torchreg import _after_step, _engine

sklearn_lm = pytest.importorskip("sklearn.linear_model")

N, D, T = 100, 20, 3
TOL = 1e-4


# ------------------------------------------------------------------------------------------------
# data and training
# ------------------------------------------------------------------------------------------------
def regression(tasks: int = 1, seed: int = 0):
    """A sparse-truth regression in float64: X (N x D), Y (N x tasks); truth on the first 5 features."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g, dtype=torch.float64)
    truth = torch.zeros(D, tasks, dtype=torch.float64)
    truth[:5] = torch.tensor([2.0, -1.5, 1.0, -0.5, 0.3], dtype=torch.float64)[:, None] * (
        1 + 0.3 * torch.arange(tasks, dtype=torch.float64))
    y = x @ truth + 0.3 * torch.randn(N, tasks, generator=g, dtype=torch.float64)
    return x, y


def loss_of(layer: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``0.5 * mean_n sum_t (y - x W^T)^2``: scikit-learn's data term (1 / (2n)) ||Y - X W^T||^2."""
    return 0.5 * ((y - layer(x)) ** 2).sum(1).mean()


# name -> (optimizer factory, scheduler factory or None, steps)
OPTIMIZERS: Dict[str, Any] = {
    "sgd": (lambda p: torch.optim.SGD(p, lr=0.3), None, 400),
    "sgd-steplr": (lambda p: torch.optim.SGD(p, lr=0.35), lambda o: torch.optim.lr_scheduler.StepLR(o, 100, 0.8), 500),
    "momentum": (lambda p: torch.optim.SGD(p, lr=0.03, momentum=0.9), None, 600),
    "momentum-dampening": (lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.8, dampening=0.5), None, 700),
    "nesterov": (lambda p: torch.optim.SGD(p, lr=0.03, momentum=0.9, nesterov=True), None, 600),
    "adam": (lambda p: torch.optim.Adam(p, lr=0.02), None, 1500),
    "adamw-wd0-explr": (lambda p: torch.optim.AdamW(p, lr=0.02, weight_decay=0.0),
                        lambda o: torch.optim.lr_scheduler.ExponentialLR(o, 0.9995), 1500),
}


def train(layer: nn.Module, name: str, x: torch.Tensor, y: torch.Tensor, steps: Optional[int] = None) -> Any:
    make_opt, make_sched, default_steps = OPTIMIZERS[name]
    opt = make_opt(layer.parameters())
    sched = make_sched(opt) if make_sched else None
    for _ in range(steps or default_steps):
        opt.zero_grad()
        loss_of(layer, x, y).backward()
        opt.step()
        if sched is not None:
            sched.step()
    return opt


def linear(tasks: int = 1, seed: int = 1) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(D, tasks, bias=False).double()


def assert_matches(w: torch.Tensor, ref: np.ndarray) -> None:
    got = w.detach().numpy()
    assert ((got == 0) == (ref == 0)).all(), f"zero sets differ:\n{(got == 0).astype(int)}\n{(ref == 0).astype(int)}"
    assert np.abs(got - ref).max() < TOL, np.abs(got - ref).max()
    assert 0 < (ref == 0).sum() < ref.size  # the problem has zeros and non-zeros


# ------------------------------------------------------------------------------------------------
# scikit-learn: Lasso, ElasticNet, MultiTaskLasso
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def data1():
    return regression(1)


@pytest.mark.parametrize("opt", list(OPTIMIZERS))
def test_lasso_matches_sklearn(opt: str, data1) -> None:
    x, y = data1
    alpha = 0.05
    ref = sklearn_lm.Lasso(alpha=alpha, fit_intercept=False, tol=1e-12, max_iter=100_000).fit(x, y[:, 0]).coef_
    layer = torchreg.L1(linear(), alpha, proximal=True)
    train(layer, opt, x, y)
    assert_matches(layer.weight[0], ref)


@pytest.mark.parametrize("opt", ["sgd", "momentum-dampening", "nesterov", "adam", "adamw-wd0-explr"])
def test_elasticnet_matches_sklearn(opt: str, data1) -> None:
    # scikit-learn: 1/(2n)||y - Xw||^2 + alpha * l1_ratio * ||w||_1 + 0.5 * alpha * (1 - l1_ratio) * ||w||^2;
    # torchreg: l1 * ||w||_1 + l2 / 2 * ||w||^2, so l1 = alpha * l1_ratio and l2 = alpha * (1 - l1_ratio).
    x, y = data1
    alpha, ratio = 0.08, 0.6
    ref = sklearn_lm.ElasticNet(alpha=alpha, l1_ratio=ratio, fit_intercept=False, tol=1e-12,
                                max_iter=100_000).fit(x, y[:, 0]).coef_
    layer = torchreg.ElasticNet(linear(), l1=alpha * ratio, l2=alpha * (1 - ratio), proximal=True)
    train(layer, opt, x, y)
    assert_matches(layer.weight[0], ref)


@pytest.mark.parametrize("opt", ["sgd", "momentum", "nesterov", "adam", "adamw-wd0-explr"])
def test_group_lasso_matches_multitask_lasso(opt: str) -> None:
    # MultiTaskLasso: 1/(2n)||Y - XW||_Fro^2 + alpha * sum_j ||W[:, j]||: groups are input features,
    # i.e. columns of nn.Linear's weight (T x D): dim=1.
    x, y = regression(T, seed=2)
    alpha = 0.15
    ref = sklearn_lm.MultiTaskLasso(alpha=alpha, fit_intercept=False, tol=1e-12, max_iter=100_000).fit(x, y).coef_
    layer = torchreg.GroupLasso(linear(T), alpha, dim=1, proximal=True)
    train(layer, opt, x, y)
    assert_matches(layer.weight, ref)
    zero_cols = (ref == 0).all(0)
    assert 0 < zero_cols.sum() < D and ((ref == 0) == zero_cols[None, :]).all()  # whole columns


def test_plain_lr_threshold_under_momentum_misses_the_optimum(monkeypatch: pytest.MonkeyPatch, data1) -> None:
    """The derivation matters: thresholding with the bare lr under momentum 0.9 solves the lasso with a
    penalty 10x weaker, so it misses scikit-learn's solution (the exact step above reaches it)."""
    x, y = data1
    alpha = 0.05
    ref = sklearn_lm.Lasso(alpha=alpha, fit_intercept=False, tol=1e-12, max_iter=100_000).fit(x, y[:, 0]).coef_
    weak = sklearn_lm.Lasso(alpha=alpha * 0.1, fit_intercept=False, tol=1e-12, max_iter=100_000).fit(x, y[:, 0]).coef_
    monkeypatch.setattr(_after_step, "_step_size", lambda opt, group, p: group["lr"])
    layer = torchreg.L1(linear(), alpha, proximal=True)
    train(layer, "momentum", x, y)
    got = layer.weight[0].detach().numpy()
    assert np.abs(got - ref).max() > 1e-2
    assert np.abs(got - weak).max() < TOL  # it is the minimizer of loss + (1 - m) * penalty


def test_adamw_weight_decay_fixed_point(data1) -> None:
    """AdamW(weight_decay=wd > 0): the fixed point satisfies -(g + wd * D * w) in lam * d|w|, D being Adam's
    denominator there (see _after_step.py); it is not the plain lasso solution."""
    x, y = data1
    lam, wd, lr, beta2 = 0.05, 0.5, 0.02, 0.99  # (beta2 0.999: v lags, the same point but slower)
    layer = torchreg.L1(linear(), lam, proximal=True)
    opt = torch.optim.AdamW(layer.parameters(), lr=lr, weight_decay=wd, betas=(0.9, beta2))
    for _ in range(3000):
        opt.zero_grad()
        loss_of(layer, x, y).backward()
        opt.step()
    opt.zero_grad()
    loss_of(layer, x, y).backward()
    w, g = layer.weight.detach()[0], layer.weight.grad[0]
    state = opt.state[layer.weight]
    denom = (state["exp_avg_sq"][0].sqrt() / (1 - beta2 ** state["step"].item()) ** 0.5) + 1e-8
    smooth = g + wd * denom * w
    nz = w != 0
    assert 0 < nz.sum() < D
    torch.testing.assert_close(smooth[nz], -lam * w[nz].sign(), atol=1e-5, rtol=0)
    assert (smooth[~nz].abs() <= lam).all()
    lasso = sklearn_lm.Lasso(alpha=lam, fit_intercept=False, tol=1e-12, max_iter=100_000).fit(x, y[:, 0]).coef_
    assert np.abs(w.numpy() - lasso).max() > 1e-3


# ------------------------------------------------------------------------------------------------
# one step against torch's own optimizer, then the operator written out
# ------------------------------------------------------------------------------------------------
def soft(w: torch.Tensor, t: Any) -> torch.Tensor:
    return torch.sign(w) * torch.clamp(w.abs() - t, min=0)


def adam_denominator(opt: torch.optim.Optimizer, p: torch.Tensor) -> torch.Tensor:
    group = next(g for g in opt.param_groups if any(q is p for q in g["params"]))
    state = opt.state[p]
    v = state["max_exp_avg_sq"] if group["amsgrad"] else state["exp_avg_sq"]
    step = float(state["step"])
    return v.sqrt() / (1 - group["betas"][1] ** step) ** 0.5 + group["eps"]


ONE_STEP = {
    "sgd": (lambda p: torch.optim.SGD(p, lr=0.1), lambda o, p: 0.1),
    "sgd-wd": (lambda p: torch.optim.SGD(p, lr=0.1, weight_decay=0.3), lambda o, p: 0.1),
    "momentum": (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), lambda o, p: 0.1 / 0.1),
    "dampening": (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.5, dampening=0.2), lambda o, p: 0.1 * 0.8 / 0.5),
    "nesterov": (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.75, nesterov=True), lambda o, p: 0.1 / 0.25),
    "sgd-foreach": (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, foreach=True), lambda o, p: 1.0),
    "sgd-fused": (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, fused=True), lambda o, p: 1.0),
    "adam": (lambda p: torch.optim.Adam(p, lr=0.1, foreach=False), lambda o, p: 0.1 / adam_denominator(o, p)),
    "adam-foreach": (lambda p: torch.optim.Adam(p, lr=0.1, foreach=True), lambda o, p: 0.1 / adam_denominator(o, p)),
    "adam-fused": (lambda p: torch.optim.Adam(p, lr=0.1, fused=True), lambda o, p: 0.1 / adam_denominator(o, p)),
    "adam-amsgrad": (lambda p: torch.optim.Adam(p, lr=0.1, amsgrad=True, betas=(0.5, 0.6)),
                     lambda o, p: 0.1 / adam_denominator(o, p)),
    "adam-tensor-lr": (lambda p: torch.optim.Adam(p, lr=torch.tensor(0.1), foreach=False),
                       lambda o, p: 0.1 / adam_denominator(o, p)),
    "adamw-wd": (lambda p: torch.optim.AdamW(p, lr=0.1, weight_decay=0.5), lambda o, p: 0.1 / adam_denominator(o, p)),
    "adam-l2": (lambda p: torch.optim.Adam(p, lr=0.1, weight_decay=0.5), lambda o, p: 0.1 / adam_denominator(o, p)),
}


@pytest.mark.parametrize("variant", list(ONE_STEP))
def test_each_step_is_torch_step_then_prox(variant: str) -> None:
    """Three steps: torchreg's parameter equals a bare copy stepped by the same torch optimizer and then
    soft-thresholded at lam times the step this test computes from that optimizer's own state."""
    make_opt, step_of = ONE_STEP[variant]
    lam = 0.05
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 2))
    bare = copy.deepcopy(model)
    torchreg.L1(model[0], lam, proximal=True)
    opt, bare_opt = make_opt(model.parameters()), make_opt(bare.parameters())
    for i in range(3):
        x = torch.randn(8, 6)
        for net, o in ((model, opt), (bare, bare_opt)):
            o.zero_grad()
            net(x).pow(2).mean().backward()
        if i == 0:  # nothing added at backward (later steps: weights equal to rounding only)
            assert torch.equal(model[0].weight.grad, bare[0].weight.grad)
        opt.step()
        bare_opt.step()
        with torch.no_grad():
            bare[0].weight.copy_(soft(bare[0].weight, lam * step_of(bare_opt, bare[0].weight)))
        for (name, p), q in zip(model.named_parameters(), bare.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=lambda m: f"step {i} {name}: {m}")
    assert (model[0].weight == 0).any()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kwargs", [dict(capturable=True), dict(fused=True), dict(foreach=True)],
                         ids=["capturable", "fused", "foreach"])
def test_adam_cuda_variants_step_then_prox(kwargs: Dict[str, Any]) -> None:
    """On CUDA the step count of capturable/fused Adam is a device tensor: the threshold is computed
    without reading it on the host, and equals the written-out operator on a bare copy."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 2)).cuda()
    bare = copy.deepcopy(model)
    torchreg.GroupLasso(model[0], 0.05, dim=0, proximal=True)
    torchreg.L1(model[2], 0.05, proximal=True)
    opt, bare_opt = (torch.optim.Adam(m.parameters(), lr=0.1, **kwargs) for m in (model, bare))
    rule = torchreg.GroupLasso(lam=0.05, dim=0)
    for _ in range(3):
        x = torch.randn(8, 6, device="cuda")
        for net, o in ((model, opt), (bare, bare_opt)):
            o.zero_grad()
            net(x).pow(2).mean().backward()
            o.step()
        with torch.no_grad():
            rule.prox_(bare[0].weight, 0.1 / adam_denominator(bare_opt, bare[0].weight))
            bare[2].weight.copy_(soft(bare[2].weight, 0.05 * 0.1 / adam_denominator(bare_opt, bare[2].weight)))
        for p, q in zip(model.parameters(), bare.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_group_lasso_prox_under_adam_solves_its_subproblem() -> None:
    """The per-coordinate group prox (Newton on the group's norm) meets the optimality conditions of
    argmin_x lam ||x|| + sum_i (x_i - z_i)^2 / (2 s_i), per group, and its zero test."""
    torch.manual_seed(0)
    rule = torchreg.GroupLasso(lam=1.0, dim=0)
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        z = torch.randn(40, 6, dtype=dtype) * torch.linspace(0.05, 3, 40, dtype=dtype)[:, None]
        s = torch.rand(40, 6, dtype=dtype) * 2 + 1e-3
        x = z.clone()
        rule.prox_(x, s.clone())  # (prox_ may overwrite a step tensor)
        norms = x.norm(dim=1)
        zero = norms == 0
        assert 0 < zero.sum() < 40
        assert ((z[zero] / s[zero]).norm(dim=1) <= 1 + tol).all()
        kkt = (x - z) / s + x / norms.clamp(min=1e-30)[:, None]
        assert kkt[~zero].abs().max() < tol * 10, kkt[~zero].abs().max()
        assert ((z[~zero] / s[~zero]).norm(dim=1) > 1).all()
        same, closed = z.clone(), z.clone()  # equal steps: the closed form w_g * max(0, 1 - s * lam / ||w_g||)
        rule.prox_(same, torch.full_like(z, 0.7))
        rule.prox_(closed, 0.7)
        torch.testing.assert_close(same, closed, rtol=tol, atol=tol)
        assert torch.equal(same == 0, closed == 0)


# ------------------------------------------------------------------------------------------------
# training loops
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("opt", ["momentum", "adam"])
def test_accumulation_four_micro_batches_equals_full_batch(opt: str) -> None:
    x, y = regression(T, seed=3)
    full = torchreg.GroupLasso(linear(T), 0.1, dim=1, proximal=True)
    micro_net = torchreg.apply_regularization(nn.Sequential(linear(T)), {  # (the unit lives on micro_net)
        nn.Linear: torchreg.GroupLasso(lam=0.1, dim=1, proximal=True)})
    micro = micro_net[0]
    make_opt = OPTIMIZERS[opt][0]
    o_full, o_micro = make_opt(full.parameters()), make_opt(micro.parameters())
    for _ in range(30):
        o_full.zero_grad()
        loss_of(full, x, y).backward()
        o_full.step()
        o_micro.zero_grad()
        for xs, ys in zip(x.chunk(4), y.chunk(4)):
            (loss_of(micro, xs, ys) / 4).backward()
        o_micro.step()
        torch.testing.assert_close(micro.weight, full.weight, rtol=1e-12, atol=1e-12)
    assert (full.weight == 0).all(0).any()


def test_each_parameter_uses_its_own_groups_lr() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    torchreg.apply_regularization(net, {nn.Linear: torchreg.L1(lam=0.2, proximal=True)})
    opt = torch.optim.SGD([{"params": net[0].parameters(), "lr": 0.5}, {"params": net[1].parameters()}], lr=0.01)
    net(torch.randn(3, 4)).sum().backward()
    before = [(net[i].weight.detach().clone(), net[i].weight.grad.clone()) for i in (0, 1)]
    opt.step()
    for (w, g), layer, lr in zip(before, net, (0.5, 0.01)):
        torch.testing.assert_close(layer.weight, soft(w - lr * g, lr * 0.2), rtol=0, atol=1e-7)
    sched_opt = torch.optim.SGD(net.parameters(), lr=1.0)  # a schedule changes the threshold step by step
    sched = torch.optim.lr_scheduler.LambdaLR(sched_opt, lambda k: 0.5 ** k)
    for k in range(3):
        sched_opt.zero_grad()
        net(torch.randn(3, 4)).sum().backward()
        w, g = net[1].weight.detach().clone(), net[1].weight.grad.clone()
        sched_opt.step()
        torch.testing.assert_close(net[1].weight, soft(w - 0.5 ** k * g, 0.5 ** k * 0.2), rtol=0, atol=1e-7)
        sched.step()


def test_optimizer_not_holding_the_weight_leaves_it_alone() -> None:
    layer = torchreg.L1(nn.Linear(4, 4), lam=10.0, proximal=True)
    other = nn.Linear(4, 4)
    before = layer.weight.detach().clone()
    for params in ([layer.bias], other.parameters()):
        opt = torch.optim.SGD(params, lr=0.5)
        (layer(torch.randn(2, 4)).sum() + other(torch.randn(2, 4)).sum()).backward()
        opt.step()
        assert torch.equal(layer.weight, before)


def test_parameter_without_gradient_is_not_thresholded() -> None:
    """torch.optim skips a parameter whose .grad is None, and so does its prox; the scope sweep of a
    mixed unit creates no gradient for a proximal parameter the forward did not use."""
    net = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    torchreg.apply_regularization(net, {"0": torchreg.L2(lam=0.1), "1": torchreg.L1(lam=10.0, proximal=True)})
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    before = net[1].weight.detach().clone()
    net[0](torch.randn(2, 4)).sum().backward()  # net[1] unused
    assert net[1].weight.grad is None and net[0].weight.grad is not None
    opt.step()
    assert torch.equal(net[1].weight, before)


def test_remove_regularization_ends_the_prox() -> None:
    torch.manual_seed(0)
    layer = torchreg.L1(nn.Linear(4, 4), lam=0.3, proximal=True)
    opt = torch.optim.SGD(layer.parameters(), lr=0.5)
    unit = layer._torchreg_unit  # (kept alive here, as a traceback or a debugger could)
    torchreg.remove_regularization(layer)
    layer(torch.randn(2, 4)).sum().backward()
    expected = layer.weight.detach() - 0.5 * layer.weight.grad
    opt.step()
    assert torch.equal(layer.weight, expected)
    assert _engine.owner_of(layer.weight) is None and unit not in _after_step._live


def test_skipped_grad_scaler_step_applies_no_prox() -> None:
    torch.manual_seed(0)
    layer = torchreg.L1(nn.Linear(4, 4), lam=0.3, proximal=True)
    opt = torch.optim.SGD(layer.parameters(), lr=0.5)
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    before = layer.weight.detach().clone()
    scaler.scale(layer(torch.full((2, 4), float("inf"))).sum()).backward()
    scaler.step(opt)
    scaler.update()
    assert torch.equal(layer.weight, before), "a skipped step must not threshold"
    assert scaler.get_scale() == 2.0
    opt.zero_grad()
    scaler.scale(layer(torch.ones(2, 4)).sum()).backward()
    scaler.step(opt)
    scaler.update()
    torch.testing.assert_close(layer.weight, soft(before - 0.5 * torch.ones(4, 4) * 2, 0.5 * 0.3))


@pytest.mark.parametrize("make_opt", [lambda p: torch.optim.Adam(p, lr=0.1, fused=True),
                                      # (momentum=0: torch 2.13's fused SGD with momentum fills its
                                      # buffer from the skipped step's inf gradients, with or without torchreg)
                                      lambda p: torch.optim.SGD(p, lr=0.1, fused=True)],
                         ids=["adam-fused", "sgd-fused"])
def test_fused_optimizer_under_grad_scaler(make_opt: Callable) -> None:
    """GradScaler calls a fused optimizer's step even for inf gradients (it skips inside): no prox then;
    a good step equals the bare fused step under the same scaler, then the operator written out."""
    torch.manual_seed(0)
    layer = nn.Linear(4, 4)
    bare = copy.deepcopy(layer)
    torchreg.L1(layer, 0.3, proximal=True)
    opt, bare_opt = make_opt(layer.parameters()), make_opt(bare.parameters())
    scaler, bare_scaler = (torch.amp.GradScaler("cpu", init_scale=4.0) for _ in range(2))
    for x in (torch.full((2, 4), float("inf")), torch.randn(2, 4), torch.randn(2, 4)):
        for net, o, sc in ((layer, opt, scaler), (bare, bare_opt, bare_scaler)):
            o.zero_grad()
            sc.scale(net(x).square().sum()).backward()
            sc.step(o)
            sc.update()
        if torch.isfinite(x).all():
            step = (0.1 / adam_denominator(bare_opt, bare.weight) if isinstance(bare_opt, torch.optim.Adam)
                    else 0.1)
            with torch.no_grad():
                bare.weight.copy_(soft(bare.weight, 0.3 * step))
        torch.testing.assert_close(layer.weight, bare.weight, rtol=1e-6, atol=1e-7)
    assert scaler.get_scale() == 2.0


class MySGD(torch.optim.SGD):
    pass


@pytest.mark.parametrize("make_opt", [
    lambda p: torch.optim.RMSprop(p, lr=0.1),
    lambda p: torch.optim.Adagrad(p, lr=0.1),
    lambda p: torch.optim.LBFGS(p, lr=0.1),
    lambda p: MySGD(p, lr=0.1),
], ids=["RMSprop", "Adagrad", "LBFGS", "SGD-subclass"])
def test_unsupported_optimizer_raises_before_anything_changes(make_opt: Callable) -> None:
    layer = torchreg.L1(nn.Linear(4, 4), lam=0.3, proximal=True)
    opt = make_opt(layer.parameters())
    before = copy.deepcopy(layer.state_dict())
    state_before = copy.deepcopy(opt.state_dict()["state"])

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = layer(torch.randn(2, 4)).sum()
        loss.backward()
        return loss

    closure()
    with pytest.raises(TypeError, match=r"needs torch\.optim\.SGD, Adam or AdamW.*got .*" + type(opt).__name__):
        opt.step(closure)
    assert all(torch.equal(v, layer.state_dict()[k]) for k, v in before.items())
    state = opt.state_dict()["state"]
    assert state.keys() == state_before.keys()
    for key, values in state_before.items():
        assert all(torch.equal(torch.as_tensor(v), torch.as_tensor(state[key][k])) for k, v in values.items())


@pytest.mark.parametrize("make_opt, match", [
    (lambda p: torch.optim.SGD(p, lr=0.1, maximize=True), "maximize=False"),
    (lambda p: torch.optim.Adam(p, lr=0.1, maximize=True), "maximize=False"),
], ids=["sgd-maximize", "adam-maximize"])
def test_unsupported_options_raise_before_anything_changes(make_opt: Callable, match: str) -> None:
    layer = torchreg.L1(nn.Linear(4, 4), lam=0.3, proximal=True)
    opt = make_opt(layer.parameters())
    layer(torch.randn(2, 4)).sum().backward()
    before = layer.weight.detach().clone()
    with pytest.raises(ValueError, match=match):
        opt.step()
    assert torch.equal(layer.weight, before)


def test_complex_parameter_under_sgd() -> None:
    layer = torchreg.L1(nn.Linear(3, 3, dtype=torch.complex64), lam=0.4, proximal=True)
    opt = torch.optim.SGD(layer.parameters(), lr=0.5)
    layer(torch.randn(2, 3, dtype=torch.complex64)).abs().sum().backward()
    z = layer.weight.detach() - 0.5 * layer.weight.grad
    opt.step()
    mag = z.abs()
    expected = torch.where(mag > 0.2, z * (1 - 0.2 / mag), 0)
    torch.testing.assert_close(layer.weight, expected)


# ------------------------------------------------------------------------------------------------
# API: nothing at backward, penalty, repr, errors, copies, memory
# ------------------------------------------------------------------------------------------------
def test_nothing_added_at_backward_and_penalty_in_both_modes() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Linear(4, 3))
    bare = copy.deepcopy(model)
    torchreg.L1(model[0], 0.1, proximal=True)
    torchreg.GroupLasso(model[1], 0.2, dim=0, proximal=True)
    x = torch.randn(3, 5)
    model(x).sum().backward()
    bare(x).sum().backward()
    for p, q in zip(model.parameters(), bare.parameters()):
        assert torch.equal(p.grad, q.grad)
        assert not p._post_accumulate_grad_hooks
    with torch.no_grad():
        expected = 0.1 * model[0].weight.abs().sum() + 0.2 * model[1].weight.norm(dim=1).sum()
    torch.testing.assert_close(torchreg.penalty(model), expected)
    text = str(torchreg.summary(model))
    assert "L1(lam=0.1, proximal=True)" in text and "GroupLasso(lam=0.2, dim=0, proximal=True)" in text


def test_repr_pickle_and_rules() -> None:
    import pickle

    for rule in (torchreg.L1(lam=1e-3, proximal=True), torchreg.ElasticNet(1e-3, 1e-2, proximal=True),
                 torchreg.GroupLasso(lam=1e-3, dim=1, proximal=True, params="weight"), torchreg.GroupLasso(0.5)):
        again = pickle.loads(pickle.dumps(rule))
        assert repr(again) == repr(rule) and again.proximal == rule.proximal
    assert repr(torchreg.L1(1e-3)) == "L1(lam=0.001)"
    assert repr(torchreg.ElasticNet(l1=1e-3, l2=1e-2, proximal=True)) == "ElasticNet(l1=0.001, l2=0.01, proximal=True)"
    with pytest.raises(AttributeError):
        torchreg.L1(lam=1e-3).proximal = True  # fixed at construction


def test_deepcopy_keeps_the_prox_on_the_copy() -> None:
    layer = torchreg.L1(nn.Linear(4, 4), lam=10.0, proximal=True)
    twin = copy.deepcopy(layer)
    opt = torch.optim.SGD(twin.parameters(), lr=0.5)
    twin(torch.randn(2, 4)).sum().backward()
    opt.step()
    assert (twin.weight == 0).all()
    assert not (layer.weight == 0).all()


def test_load_state_dict_assign_and_pickle_follow_the_new_parameters() -> None:
    import io

    layer = torchreg.L1(nn.Linear(4, 4), lam=10.0, proximal=True)
    layer.load_state_dict({k: v.clone() + 1 for k, v in layer.state_dict().items()}, assign=True)
    buffer = io.BytesIO()
    torch.save(layer, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    for net in (layer, loaded):
        opt = torch.optim.SGD(net.parameters(), lr=0.5)  # holds the new parameter objects
        net(torch.randn(2, 4)).sum().backward()
        opt.step()
        assert (net.weight == 0).all() and not (net.bias == 0).any()


@pytest.mark.parametrize("build, match, error", [
    (lambda: torchreg.GroupLasso(nn.Linear(3, 3), 0.1, params="*"), r"'bias' has shape \(3,\)", ValueError),
    (lambda: torchreg.GroupLasso(nn.Linear(3, 3), 0.1, dim=2), "dim 2", ValueError),
    (lambda: torchreg.GroupLasso(nn.Linear(3, 3), 0.1, dim=-3), "dim -3", ValueError),
    (lambda: torchreg.apply_regularization(nn.Sequential(nn.Linear(3, 3)),
                                           {nn.Linear: torchreg.GroupLasso(0.1, params="bias")}), "bias", ValueError),
    (lambda: torchreg.GroupLasso(nn.Linear(3, 3), 0.1, dim="0"), "dim must be an int, got '0'", TypeError),
    (lambda: torchreg.GroupLasso(nn.Linear(3, 3), 0.1, dim=1.0), "dim must be an int", TypeError),
    (lambda: torchreg.L1(nn.Linear(3, 3), 0.1, proximal="yes"), "proximal must be True or False, got 'yes'",
     TypeError),
    (lambda: torchreg.ElasticNet(nn.Linear(3, 3), 0.1, 0.1, proximal=1), "proximal must be True or False",
     TypeError),
])
def test_bad_arguments_raise_before_anything_changes(build: Callable, match: str, error: type) -> None:
    with pytest.raises(error, match=match):
        build()


def test_bad_dim_leaves_the_model_untouched() -> None:
    layer = nn.Linear(3, 3)
    with pytest.raises(ValueError):
        torchreg.GroupLasso(layer, 0.1, params="*", proximal=True)
    assert "_torchreg_unit" not in layer.__dict__
    assert not layer.weight._post_accumulate_grad_hooks and _engine.owner_of(layer.weight) is None
    torchreg.GroupLasso(layer, 0.1, dim=-1)  # the same layer can still be regularized
    assert torchreg.summary(layer).records[0]["regularizer"] == "GroupLasso(lam=0.1, dim=-1)"


def test_proximal_parameter_cannot_be_covered_twice() -> None:
    model = nn.Sequential(nn.Linear(3, 3))
    torchreg.L1(model[0], 0.1, proximal=True)
    with pytest.raises(ValueError, match="already regularized"):
        torchreg.apply_regularization(model, {nn.Linear: torchreg.L2(0.1)})
    assert _engine.owner_of(model[0].weight) is not None
    torchreg.remove_regularization(model)
    assert _engine.owner_of(model[0].weight) is None


@pytest.mark.parametrize("make_opt", [lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
                                      lambda p: torch.optim.Adam(p, lr=0.1)], ids=["sgd", "adam"])
def test_dropped_model_and_optimizer_are_freed(make_opt: Callable) -> None:
    m = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    torchreg.L1(m[0], 1e-3, proximal=True)
    torchreg.GroupLasso(m[1], 1e-3, proximal=True)
    opt = make_opt(m.parameters())
    m(torch.randn(2, 8)).sum().backward()
    opt.step()
    w, o = weakref.ref(m[0].weight), weakref.ref(opt)
    units = [weakref.ref(layer._torchreg_unit) for layer in m]
    del m, opt
    gc.collect()
    assert w() is None and o() is None
    assert all(u() is None for u in units)
    assert o not in [weakref.ref(k) for k in _after_step._pending]


# ------------------------------------------------------------------------------------------------
# GroupLasso gradient mode against autograd
# ------------------------------------------------------------------------------------------------
def explicit_group_penalty(w: torch.Tensor, lam: float, dim: int) -> torch.Tensor:
    """``lam * sum_g ||w_g||``, written so that autograd's gradient is explicit at a zero group: groups
    whose norm is 0 are left out (their term is 0 and its minimum-norm subgradient is 0)."""
    groups = w.movedim(dim, 0).reshape(w.shape[dim], -1)
    nonzero = groups.detach().abs().sum(1) > 0
    return lam * groups[nonzero].pow(2).sum(1).sqrt().sum()


@pytest.mark.parametrize("make, dim", [
    (lambda: nn.Linear(5, 4), 0), (lambda: nn.Linear(5, 4), 1), (lambda: nn.Linear(5, 4), -1),
    (lambda: nn.Conv2d(3, 4, 3), 0), (lambda: nn.Conv2d(3, 4, 3), 1),
], ids=["linear-dim0", "linear-dim1", "linear-dim-1", "conv-filters", "conv-input-channels"])
def test_group_lasso_gradient_matches_autograd(make: Callable, dim: int) -> None:
    torch.manual_seed(0)
    model = make()
    with torch.no_grad():
        model.weight.select(dim, 1).zero_()  # a zero group
    bare = copy.deepcopy(model)
    torchreg.GroupLasso(model, 0.3, dim=dim)
    x = torch.randn(2, *((5,) if isinstance(model, nn.Linear) else (3, 6, 6)))
    model(x).square().sum().backward()
    (bare(x).square().sum() + explicit_group_penalty(bare.weight, 0.3, dim)).backward()
    torch.testing.assert_close(model.weight.grad, bare.weight.grad)
    torch.testing.assert_close(model.bias.grad, bare.bias.grad)
    # autograd's own norm gives the same 0 subgradient at the zero group
    w = bare.weight.detach().clone().requires_grad_()
    torch.linalg.vector_norm(w.select(dim, 1)).backward()
    assert torch.equal(w.grad, torch.zeros_like(w))


def test_group_lasso_gradient_with_accumulation_and_scaler() -> None:
    torch.manual_seed(0)
    model = nn.Linear(5, 4)
    bare = copy.deepcopy(model)
    torchreg.GroupLasso(model, 0.3, dim=1)
    scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
    torchreg.configure(model, accumulation_steps=2, grad_scaler=scaler)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(4, 5)
    for xs in x.chunk(2):
        scaler.scale(model(xs).square().mean() / 2).backward()
    scaler.unscale_(opt)
    (bare(x).square().mean() + explicit_group_penalty(bare.weight, 0.3, 1)).backward()
    torch.testing.assert_close(model.weight.grad, bare.weight.grad)


# ------------------------------------------------------------------------------------------------
# sparsity()
# ------------------------------------------------------------------------------------------------
def test_sparsity_counts_exact_zeros_and_groups() -> None:
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    torchreg.apply_regularization(model, {"0": torchreg.GroupLasso(lam=0.1, dim=1, proximal=True),
                                          "2": torchreg.L1(lam=0.1)})
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, 0.0, 0.0, 2.0], [0.0, 0.0, 0.0, 1e-30], [3.0, 0.0, -0.0, 0.0]]))
        model[2].weight.copy_(torch.tensor([[0.0, 1.0, 0.0], [1.0, 1.0, 1.0]]))
    report = torchreg.sparsity(model)
    first, second = report.records
    assert first == dict(parameter="0.weight", regularizer="GroupLasso(lam=0.1, dim=1, proximal=True)", numel=12,
                         zeros=8, zero_fraction=8 / 12, groups=4, zero_groups=2, zero_group_fraction=0.5,
                         zero_group_indices=[1, 2], zero_outputs=[], zero_inputs=[1, 2])
    assert second == dict(parameter="2.weight", regularizer="L1(lam=0.1)", numel=6, zeros=2, zero_fraction=2 / 6,
                          groups=None, zero_groups=None, zero_group_fraction=None, zero_group_indices=None,
                          zero_outputs=[], zero_inputs=[])
    assert report.total["numel"] == 18 and report.total["zeros"] == 10 and report.total["zero_groups"] == 2
    text = str(report)
    assert "0.weight" in text and "2 (50.0%)" in text and text.splitlines()[-1].startswith("total")
    sub = torchreg.sparsity(model[0])  # regularized by a call on the enclosing model
    assert [r["parameter"] for r in sub.records] == ["weight"] and sub.records[0]["zero_groups"] == 2
    assert torchreg.sparsity(nn.Linear(2, 2)).records == []
    with pytest.raises(TypeError):
        torchreg.sparsity("model")



def test_proximal_only_unit_keeps_no_watcher_and_needs_no_scaler():
    """A proximal rule adds nothing at backward: no forward watcher waits for hooks it will never
    take, and an undeclared GradScaler (which only scales backward terms) is not warned about."""
    layer = torchreg.L1(nn.Linear(4, 4), 0.1, proximal=True)
    unit = layer.__dict__["_torchreg_unit"]
    assert unit.tracker.lazy_handle is None
    assert [type(h).__name__ for h in layer._forward_hooks.values()] == ["_FirstForward"]  # (until a forward)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(2):
            opt.zero_grad()
            scaler.scale(layer(torch.randn(2, 4)).sum()).backward()
            scaler.step(opt)
            scaler.update()
    assert not layer._forward_hooks  # no watcher stays once training runs
    mixed = torchreg.apply_regularization(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)),
                                          {"0": torchreg.L1(0.1, proximal=True), nn.Linear: torchreg.L2(0.1)})
    opt = torch.optim.SGD(mixed.parameters(), lr=0.1)
    scaler.scale(mixed(torch.randn(2, 4)).sum()).backward()
    with pytest.warns(UserWarning, match="GradScaler"):  # the L2 term does need the scale
        scaler.step(opt)
