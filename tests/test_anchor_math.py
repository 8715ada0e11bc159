"""The centered maths of torchreg/_anchor.py on its own, against independent references.

* penalties and gradient terms against autograd of the explicit penalty written here;
* the shifted proximal operator against its closed form, and, in a plain training loop (SGD and
  Adam, the step re-typed here from torch's update), against scikit-learn's Lasso on the shifted
  problem ``w = c + d``: Lasso on ``(X, y - X c)``;
* where the anchors come from (``lookup``): copies, shapes, layouts, dtypes, and the errors.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest
import torch
from torch import nn

from torchreg import _anchor

sklearn_lm = pytest.importorskip("sklearn.linear_model")


def _tensors(dtype=torch.float64, seed=0, shape=(4, 5)):
    g = torch.Generator().manual_seed(seed)
    real = torch.float64 if dtype == torch.complex128 else dtype
    w = torch.randn(shape, generator=g, dtype=real)
    c = torch.randn(shape, generator=g, dtype=real)
    if dtype == torch.complex128:
        w = torch.complex(w, torch.randn(shape, generator=g, dtype=real))
        c = torch.complex(c, torch.randn(shape, generator=g, dtype=real))
    c.view(-1)[::3] = w.view(-1)[::3]  # ties: w == c, where |.| has autograd's derivative 0
    f = torch.rand(shape, generator=g, dtype=real) * 3
    f.view(-1)[1::4] = 0.0
    return w, c, f


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128])
@pytest.mark.parametrize("scaled", [False, True])
def test_gradient_terms_equal_autograd_of_the_explicit_penalty(dtype, scaled) -> None:
    w, c, f = _tensors(dtype)
    lam, alpha = 0.7, 0.25
    scale = torch.tensor(1024.0, dtype=torch.float64) if scaled else None
    factor = alpha * (1024.0 if scaled else 1.0)
    cases = {
        "l1": (lambda p: lam * (p - c).abs().sum(),
               lambda g, p: _anchor.add_l1_(g, p, c, lam * alpha, scale)),
        "l2": (lambda p: lam / 2 * ((p - c).abs() ** 2).sum(),
               lambda g, p: _anchor.add_l2_(g, p, c, None, lam * alpha, scale)),
        "ewc": (lambda p: lam / 2 * (f * (p - c).abs() ** 2).sum(),
                lambda g, p: _anchor.add_l2_(g, p, c, f, lam * alpha, scale)),
        "l2-zero-center": (lambda p: lam / 2 * (p.abs() ** 2).sum(),
                           lambda g, p: _anchor.add_l2_(g, p, None, None, lam * alpha, scale)),
    }
    for name, (explicit, add) in cases.items():
        p = w.clone().requires_grad_(True)
        (want,) = torch.autograd.grad(explicit(p) * factor, p)
        got = torch.zeros_like(w)
        add(got, w)
        torch.testing.assert_close(got, want, msg=lambda m: f"{name}: {m}")


def test_gradient_terms_with_create_graph_are_differentiable() -> None:
    w, c, f = _tensors()
    p = w.clone().requires_grad_(True)
    got = torch.zeros_like(w)
    _anchor.add_l2_(got, p, c, f, 0.5, None)  # under create_graph the term joins .grad's graph
    (hess,) = torch.autograd.grad(got.sum(), p)
    torch.testing.assert_close(hess, 0.5 * f)


def test_penalties() -> None:
    w, c, f = _tensors()
    torch.testing.assert_close(_anchor.l1_penalty(w, c), (w - c).abs().sum())
    torch.testing.assert_close(_anchor.l1_penalty(w, None), w.abs().sum())
    torch.testing.assert_close(_anchor.l2_penalty(w, c), ((w - c) ** 2).sum())
    torch.testing.assert_close(_anchor.l2_penalty(w, c, f), (f * (w - c) ** 2).sum())
    assert _anchor.l1_penalty(c.clone(), c) == 0 and _anchor.l2_penalty(c.clone(), c, f) == 0


def _soft(d: torch.Tensor, t) -> torch.Tensor:
    return torch.sign(d) * (d.abs() - t).clamp(min=0)


@pytest.mark.parametrize("tensor_step", [False, True])
def test_shifted_prox_is_c_plus_soft_of_the_offset(tensor_step) -> None:
    w, c, _ = _tensors(shape=(50,))
    step = torch.rand(50, dtype=torch.float64) if tensor_step else 0.4
    want = c + _soft(w - c, step * 0.9)
    got = w.clone()
    _anchor.shifted_(got, c, lambda d: d.copy_(_soft(d, step * 0.9)))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-15)
    at_center = _soft(w - c, step * 0.9) == 0
    assert at_center.any() and not at_center.all()
    assert torch.equal(got[at_center], c[at_center])  # exactly the center, not within rounding


# ------------------------------------------------------------------------------------------------
# the shifted Lasso: scikit-learn on (X, y - X c) against a plain training loop with the shifted prox
# ------------------------------------------------------------------------------------------------
N, D, TOL = 100, 20, 1e-4


def shifted_problem(seed: int = 0):
    """A fine-tuning problem: pretrained weights ``c``, the truth ``c`` plus a sparse change."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g, dtype=torch.float64)
    c = torch.randn(D, generator=g, dtype=torch.float64)
    delta = torch.zeros(D, dtype=torch.float64)
    delta[:5] = torch.tensor([2.0, -1.5, 1.0, -0.5, 0.3], dtype=torch.float64)
    y = x @ (c + delta) + 0.3 * torch.randn(N, generator=g, dtype=torch.float64)
    return x, y, c


def shifted_lasso_reference(x, y, c, alpha: float) -> np.ndarray:
    """``c + Lasso(alpha).fit(X, y - X c).coef_``: the minimizer of ``1/(2n)||y - Xw||^2 + alpha ||w - c||_1``."""
    d = sklearn_lm.Lasso(alpha=alpha, fit_intercept=False, tol=1e-12, max_iter=100_000)
    d = d.fit(x.numpy(), (y - x @ c).numpy()).coef_
    return c.numpy() + d, d


def assert_matches_shifted(w: torch.Tensor, c: torch.Tensor, ref: np.ndarray, delta: np.ndarray) -> None:
    got = w.detach().numpy()
    at_center = got == c.numpy()
    assert (at_center == (delta == 0)).all(), f"coordinates at the center differ:\n{at_center}\n{delta == 0}"
    distance = np.abs(got - ref).max()
    assert distance < TOL, f"max distance to scikit-learn's solution of the shifted problem: {distance:.3g}"
    assert 0 < at_center.sum() < at_center.size  # the problem has both kinds of coordinates


def _loss(w, x, y):
    return 0.5 * ((y - x @ w) ** 2).mean()


@pytest.mark.parametrize("opt", ["sgd", "adam"])
def test_shifted_prox_loop_reaches_sklearn_shifted_lasso(opt: str) -> None:
    x, y, c = shifted_problem()
    alpha = 0.05
    ref, delta = shifted_lasso_reference(x, y, c, alpha)
    torch.manual_seed(1)
    w = nn.Parameter(torch.randn(D, dtype=torch.float64))
    if opt == "sgd":
        o = torch.optim.SGD([w], lr=0.3)
        steps = 400
    else:
        o = torch.optim.Adam([w], lr=0.02)
        steps = 1500
    for _ in range(steps):
        o.zero_grad()
        _loss(w, x, y).backward()
        o.step()
        with torch.no_grad():
            if opt == "sgd":
                t = 0.3
            else:  # torch's Adam: w -= lr * m_hat / (sqrt(v) / sqrt(1 - b2^k) + eps): the metric's step
                state = o.state[w]
                k = float(state["step"])
                t = 0.02 / (state["exp_avg_sq"].sqrt() / (1 - 0.999**k) ** 0.5 + 1e-8)
            _anchor.shifted_(w, c, lambda d: d.copy_(_soft(d, t * alpha)))
    assert_matches_shifted(w, c, ref, delta)


# ------------------------------------------------------------------------------------------------
# where anchors come from
# ------------------------------------------------------------------------------------------------
def test_lookup_copies_with_the_parameters_dtype_device_and_layout() -> None:
    conv = nn.Conv2d(3, 4, 3).to(memory_format=torch.channels_last)
    source = OrderedDict(weight=torch.randn(4, 3, 3, 3, dtype=torch.float64))
    got = _anchor.lookup(source, "weight", conv.weight, "center", "L2(...)")
    assert got.dtype == conv.weight.dtype and got.device == conv.weight.device
    assert got.stride() == conv.weight.stride()
    torch.testing.assert_close(got, source["weight"].float())
    source["weight"].zero_()  # a snapshot: later changes of the source do not move the anchor
    assert got.abs().sum() > 0
    init = _anchor.lookup("init", "weight", conv.weight, "center", "L2(...)")
    assert torch.equal(init, conv.weight) and init.data_ptr() != conv.weight.data_ptr()
    pretrained = nn.Conv2d(3, 4, 3)
    got = _anchor.lookup(pretrained, "weight", conv.weight, "center", "L2(...)")
    assert torch.equal(got, pretrained.weight) and got.data_ptr() != pretrained.weight.data_ptr()
    assert not got.requires_grad


def test_lookup_errors_name_the_parameter_and_value() -> None:
    p = nn.Parameter(torch.zeros(2, 3))
    owner = "L2(lam=0.1)"
    with pytest.raises(ValueError, match=r"center has no tensor for the parameter '0.weight'.*1 name\(s\): 'weight'"):
        _anchor.lookup({"weight": torch.zeros(2, 3)}, "0.weight", p, "center", owner)
    with pytest.raises(ValueError, match=r"center\['w'\] has shape \(3, 2\), but the parameter 'w' has shape \(2, 3\)"):
        _anchor.lookup({"w": torch.zeros(3, 2)}, "w", p, "center", owner)
    with pytest.raises(TypeError, match=r"center\['w'\] must be a tensor, got \[1, 2\] \(list\)"):
        _anchor.lookup({"w": [1, 2]}, "w", p, "center", owner)
    with pytest.raises(ValueError, match=r"importance\['w'\] holds negative values"):
        _anchor.lookup({"w": -torch.ones(2, 3)}, "w", p, "importance", owner)
    with pytest.raises(ValueError, match=r"center\['w'\] holds NaN"):
        _anchor.lookup({"w": torch.full((2, 3), float("nan"))}, "w", p, "center", owner)
    with pytest.raises(TypeError, match=r"center\['w'\] is complex"):
        _anchor.lookup({"w": torch.zeros(2, 3, dtype=torch.complex64)}, "w", p, "center", owner)


def test_check_center_and_importance() -> None:
    for ok in (None, "init", {"w": torch.zeros(1)}, OrderedDict(), nn.Linear(1, 1)):
        assert _anchor.check_center(ok, "L1") is ok
    with pytest.raises(ValueError, match="got the string 'pretrained'"):
        _anchor.check_center("pretrained", "L1")
    with pytest.raises(TypeError, match=r"got tensor\(.*\(Tensor\); a single tensor has no parameter name"):
        _anchor.check_center(torch.zeros(2), "L1")
    with pytest.raises(TypeError, match=r"got 3 \(int\)"):
        _anchor.check_center(3, "L1")
    with pytest.raises(ValueError, match="importance= needs a center="):
        _anchor.check_importance({"w": torch.ones(1)}, None, "L2")
    with pytest.raises(TypeError, match=r"importance must be None or a mapping.*got 1.0 \(float\)"):
        _anchor.check_importance(1.0, "init", "L2")
