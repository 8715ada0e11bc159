"""``torchreg.lambda_max``: the strength from which an L1 / group-lasso parameter is all zero.

References: scikit-learn's ``alpha_max`` (the first alpha of ``lasso_path`` / ``enet_path`` and of
``LassoCV``'s grid) for Lasso, ElasticNet and MultiTaskLasso, autograd's gradient at zero for a
non-linear model, and training with proximal mode just above (all zero) and just below (not all zero),
against scikit-learn's solution there. And the model, its gradients and the optimizer are unchanged.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import torchreg

sklearn_linear = pytest.importorskip("sklearn.linear_model")

pytestmark = [pytest.mark.filterwarnings("error:torchreg")]

N, D, T = 60, 8, 3


def data(targets: int = 1, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((N, D))
    w = np.zeros((D, targets))
    w[:3] = rng.standard_normal((3, targets)) * 2
    y = x @ w + 0.5 * rng.standard_normal((N, targets)) + 1.5
    return x, (y[:, 0] if targets == 1 else y)


def linear(rule, targets: int = 1, bias: bool = False) -> nn.Linear:
    torch.manual_seed(0)
    layer = nn.Linear(D, targets, bias=bias).double()
    return rule.apply(layer)


def lasso_closure(model: nn.Module, x: np.ndarray, y: np.ndarray, backward: bool = False):
    """scikit-learn's loss ``||y - X w||^2 / (2 n)`` (Frobenius for several targets)."""
    xt = torch.from_numpy(x)
    yt = torch.from_numpy(y).reshape(len(y), -1)

    def closure():
        loss = ((model(xt) - yt) ** 2).sum() / (2 * len(xt))
        if backward:
            loss.backward()
        return loss

    return closure


@pytest.mark.parametrize("backward", [False, True], ids=["returns-loss", "lbfgs-style-backward"])
def test_lasso_matches_sklearn_alpha_max(backward):
    x, y = data()
    y = y - y.mean()  # lasso_path fits no intercept
    model = linear(torchreg.L1(lam=0.1, proximal=True))
    ours = torchreg.lambda_max(model, lasso_closure(model, x, y, backward))
    alphas, _, _ = sklearn_linear.lasso_path(x, y, alphas=3)
    assert list(ours) == ["weight"]
    assert ours["weight"] == pytest.approx(alphas[0], rel=1e-12)
    assert alphas[0] == pytest.approx(np.abs(x.T @ y).max() / N)


def test_with_an_intercept_the_bias_as_it_is_gives_sklearn_centered_alpha_max():
    """The other parameters stay as they are: with the bias at its optimum for w = 0 (the mean of y),
    the answer is LassoCV's alpha_max with fit_intercept=True (centered data)."""
    x, y = data()
    model = linear(torchreg.L1(lam=0.1), bias=True)
    with torch.no_grad():
        model.bias.fill_(y.mean())
    ours = torchreg.lambda_max(model, lasso_closure(model, x, y))
    grid = sklearn_linear.LassoCV(fit_intercept=True, alphas=3, cv=2).fit(x, y).alphas_
    assert ours == {"weight": pytest.approx(grid.max(), rel=1e-10)}


def test_elastic_net_l1_matches_sklearn_alpha_max_times_l1_ratio():
    x, y = data()
    y = y - y.mean()
    model = linear(torchreg.ElasticNet(l1=0.1, l2=0.3))
    ours = torchreg.lambda_max(model, lasso_closure(model, x, y))
    alphas, _, _ = sklearn_linear.enet_path(x, y, l1_ratio=0.25, alphas=3)
    # sklearn: alpha * l1_ratio * |w|_1 + alpha * (1 - l1_ratio) / 2 * |w|^2, so l1 = alpha * l1_ratio
    assert ours["weight"] == pytest.approx(alphas[0] * 0.25, rel=1e-12)


def test_group_lasso_matches_sklearn_multitask_alpha_max():
    x, y = data(T)
    y = y - y.mean(0)
    model = linear(torchreg.GroupLasso(lam=0.1, dim=1, proximal=True), targets=T)
    ours = torchreg.lambda_max(model, lasso_closure(model, x, y))
    alphas, _, _ = sklearn_linear.lasso_path(x, y, alphas=3)  # 2-D y: the MultiTaskLasso path
    grid = sklearn_linear.MultiTaskLassoCV(fit_intercept=False, alphas=3, cv=2).fit(x, y).alphas_
    assert ours["weight"] == pytest.approx(alphas[0], rel=1e-12) == pytest.approx(grid.max(), rel=1e-12)
    assert alphas[0] == pytest.approx(np.linalg.norm(x.T @ y, axis=1).max() / N)


@pytest.mark.parametrize("kind", ["lasso", "multitask"])
def test_training_just_above_gives_all_zero_and_just_below_does_not(kind):
    targets = 1 if kind == "lasso" else T
    x, y = data(targets)
    y = y - y.mean(0)
    make = ((lambda lam: torchreg.L1(lam=lam, proximal=True)) if kind == "lasso"
            else (lambda lam: torchreg.GroupLasso(lam=lam, dim=1, proximal=True)))
    probe = linear(make(0.1), targets)
    lam_max = torchreg.lambda_max(probe, lasso_closure(probe, x, y))["weight"]
    lr = 1.0 / np.linalg.eigvalsh(x.T @ x / N).max()  # 1 / Lipschitz constant: proximal gradient converges
    results = {}
    for factor in (1.02, 0.98):
        model = linear(make(factor * lam_max), targets)
        closure = lasso_closure(model, x, y)
        opt = torch.optim.SGD(model.parameters(), lr=lr)
        for _ in range(2000):
            opt.zero_grad()
            closure().backward()
            opt.step()
        results[factor] = model.weight.detach().numpy().copy()
    assert not results[1.02].any()  # exactly zero above lambda_max
    below = results[0.98]
    assert below.any()
    # ... and the solution below is scikit-learn's, with the same support
    cls = sklearn_linear.Lasso if kind == "lasso" else sklearn_linear.MultiTaskLasso
    ref = cls(alpha=0.98 * lam_max, fit_intercept=False, tol=1e-12, max_iter=100000).fit(x, y).coef_
    np.testing.assert_allclose(below.reshape(ref.shape), ref, atol=1e-6)
    assert ((below.reshape(ref.shape) != 0) == (ref != 0)).all()


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 1))

    def forward(self, x):
        return self.net(x)


X = torch.randn(32, 5, generator=torch.Generator().manual_seed(1))
Y = torch.randn(32, 1, generator=torch.Generator().manual_seed(2))


def regularized_mlp() -> MLP:
    torch.manual_seed(0)
    model = MLP()
    torchreg.apply_regularization(model, {"net.0": torchreg.GroupLasso(lam=0.1, dim=1, proximal=True),
                                          "net.2": torchreg.L1(lam=0.1), "net.4": torchreg.L2(lam=0.1)})
    return model


def test_nonlinear_model_each_parameter_zeroed_alone_against_autograd():
    model = regularized_mlp()
    ours = torchreg.lambda_max(model, lambda: nn.functional.mse_loss(model(X), Y))
    assert list(ours) == ["net.0.weight", "net.2.weight"]  # L2 has no lambda_max
    expected = {}
    for name in ours:
        ref = copy.deepcopy(model)
        torchreg.remove_regularization(ref)
        with torch.no_grad():
            ref.get_parameter(name).zero_()
        (g,) = torch.autograd.grad(nn.functional.mse_loss(ref(X), Y), ref.get_parameter(name))
        expected[name] = g.norm(dim=0).max().item() if name == "net.0.weight" else g.abs().max().item()
    assert ours == pytest.approx(expected, rel=1e-6)


def snapshot(model: nn.Module, opt: torch.optim.Optimizer):
    return dict(
        values={n: p.detach().clone() for n, p in model.named_parameters()},
        grads={n: (p.grad, None if p.grad is None else p.grad.clone()) for n, p in model.named_parameters()},
        state=copy.deepcopy(opt.state_dict()),
    )


def assert_unchanged(model: nn.Module, opt: torch.optim.Optimizer, before) -> None:
    for n, p in model.named_parameters():
        assert torch.equal(p, before["values"][n]), n
        obj, value = before["grads"][n]
        assert p.grad is obj, n  # the same tensor object, or None
        if value is not None:
            assert torch.equal(p.grad, value), n
    after = opt.state_dict()
    assert after["param_groups"] == before["state"]["param_groups"]
    for key, state in before["state"]["state"].items():
        for field, value in state.items():
            assert torch.equal(after["state"][key][field], value), (key, field)


@pytest.mark.parametrize("backward", [False, True], ids=["returns-loss", "lbfgs-style-backward"])
def test_weights_gradients_and_optimizer_state_are_unchanged(backward):
    model = regularized_mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    nn.functional.mse_loss(model(X), Y).backward()
    opt.step()
    opt.zero_grad()
    nn.functional.mse_loss(model(X), Y).backward()  # gradients present ...
    model.net[2].bias.grad = None  # ... and one None

    def closure():
        if backward:
            opt.zero_grad()
        loss = nn.functional.mse_loss(model(X), Y)
        if backward:
            loss.backward()
        return loss

    before = snapshot(model, opt)
    ours = torchreg.lambda_max(model, closure)
    assert_unchanged(model, opt, before)
    plain = regularized_mlp()
    plain.load_state_dict(model.state_dict())
    assert ours == pytest.approx(torchreg.lambda_max(plain, lambda: nn.functional.mse_loss(plain(X), Y)), rel=1e-6)
    # training goes on as before: no accumulation warning from the extra backward passes
    opt.step()
    opt.zero_grad()
    nn.functional.mse_loss(model(X), Y).backward()
    opt.step()


def test_a_closure_that_raises_leaves_everything_as_it_was():
    model = regularized_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    nn.functional.mse_loss(model(X), Y).backward()
    before = snapshot(model, opt)

    def closure():
        raise RuntimeError("data loader broke")

    with pytest.raises(RuntimeError, match="data loader broke"):
        torchreg.lambda_max(model, closure)
    assert_unchanged(model, opt, before)


def test_a_parameter_the_loss_does_not_reach_gets_zero():
    model = regularized_mlp()
    assert torchreg.lambda_max(model, lambda: model.net[4](torch.ones(1, 4)).sum()) == {
        "net.0.weight": 0.0, "net.2.weight": 0.0}


def test_bad_arguments():
    model = regularized_mlp()
    with pytest.raises(TypeError, match=r"lambda_max expects a closure that returns the loss, got 1\.0 \(float\)"):
        torchreg.lambda_max(model, 1.0)
    with pytest.raises(TypeError, match=r"closure\(\) must return the loss as a tensor, got 0\.5 \(float\)"):
        torchreg.lambda_max(model, lambda: 0.5)
    with pytest.raises(ValueError, match=r"must return a single loss value, got a tensor of shape \(32, 1\)"):
        torchreg.lambda_max(model, lambda: model(X))
    with pytest.raises(ValueError, match=r"nothing in Linear is regularized by torchreg\.L1, ElasticNet or GroupLasso"):
        torchreg.lambda_max(torchreg.L2(nn.Linear(2, 1), 0.1), lambda: torch.zeros(()))
    with pytest.raises(TypeError, match="lambda_max expects an nn.Module instance"):
        torchreg.lambda_max("model", lambda: torch.zeros(()))


class Anchored(torchreg.L1):
    """An L1 subclass with per-parameter state (as a penalty toward a center would keep)."""

    def init_state(self, name, param):
        return {"center": param.detach().clone()}


def test_a_rule_with_per_parameter_state_is_refused():
    model = torchreg.L1(nn.Linear(3, 1), 0.1)
    other = Anchored(lam=0.1).apply(nn.Linear(3, 1))
    torchreg.lambda_max(model, lambda: model(torch.ones(1, 3)).sum())  # plain L1: fine
    with pytest.raises(ValueError, match=r"lambda_max: the rule of weight keeps per-parameter state"):
        torchreg.lambda_max(other, lambda: other(torch.ones(1, 3)).sum())
