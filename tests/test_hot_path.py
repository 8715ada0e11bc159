"""The hooks' hot path: the adders built once per backward give the same gradients as ``grad_``.

The engine builds, per backward, one function per rule (``Regularizer._adder``) and the hooks call it
on a dense gradient; everything else goes through ``Regularizer.grad_``. These tests pin the cases
where the two could part: a cached adder after a strength or factor changed, a subclass with its own
``grad_``, ``create_graph=True``, and the large-tensor sign path.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

import torchreg
from torchreg import _ops

from reference import assert_same_grads, bare_copy, explicit_penalty

X = torch.randn(16, 6, generator=torch.Generator().manual_seed(1))


def net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))


def terms(model: nn.Module, l1: float, l2: float):
    return [(m.weight, l1, l2) for m in model.modules() if isinstance(m, nn.Linear)]


def loss_of(model: nn.Module) -> Tensor:
    return model(X).pow(2).mean()


RULES = {
    "L1": (lambda: torchreg.L1(0.3), 0.3, 0.0),
    "L2": (lambda: torchreg.L2(0.2), 0.0, 0.2),
    "ElasticNet": (lambda: torchreg.ElasticNet(l1=0.3, l2=0.2), 0.3, 0.2),
}


@pytest.mark.parametrize("kind", RULES)
def test_accumulation_steps_changed_between_backwards(kind: str) -> None:
    make, l1, l2 = RULES[kind]
    model = net()
    ref = bare_copy(model)
    torchreg.apply_regularization(model, {nn.Linear: make()})
    for k in (1, 4, 1):  # the cached adders of k=1 must not survive configure(k=4), and back
        torchreg.configure(model, accumulation_steps=k)
        model.zero_grad()
        ref.zero_grad()
        loss_of(model).backward()
        (loss_of(ref) + explicit_penalty(terms(ref, l1, l2)) / k).backward()
        assert_same_grads(model, ref)


class TwoBranches(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 3)
        self.b = nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:  # b is skipped: its term comes from the end-of-backward step
        return self.a(x).tanh().pow(2).mean()


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph")
@pytest.mark.parametrize("kind", RULES)
def test_create_graph_matches_the_loss_penalty_to_second_order(kind: str) -> None:
    """With ``backward(create_graph=True)`` the term is part of ``.grad``'s graph, as the loss penalty's
    is: a Hessian-vector product through ``.grad`` includes ``l2 * v`` (L1's second derivative is 0)."""
    make, l1, l2 = RULES[kind]
    torch.manual_seed(0)
    model = TwoBranches()
    ref = bare_copy(model)
    make().apply(model)
    v = torch.randn(3, 6, generator=torch.Generator().manual_seed(2))
    for create_graph in (True, False, True):  # the hot path's adders are shared by both kinds
        for m in (model, ref):
            m.zero_grad()
        model(X).backward(create_graph=create_graph)
        (ref(X) + explicit_penalty(terms(ref, l1, l2))).backward(create_graph=create_graph)
        assert_same_grads(model, ref)
        for name in ("a.weight", "b.weight"):
            w, w_ref = model.get_parameter(name), ref.get_parameter(name)
            assert w.grad.requires_grad == w_ref.grad.requires_grad == create_graph, name
            if create_graph:
                (hvp,) = torch.autograd.grad((w.grad * v).sum(), w)
                (hvp_ref,) = torch.autograd.grad((w_ref.grad * v).sum(), w_ref)
                torch.testing.assert_close(hvp, hvp_ref, msg=lambda m: f"{name}: {m}")


class DoubledL2(torchreg.L2):
    """A user's rule with a gradient of its own: the engine must call it, not L2's adder."""

    def penalty(self, param: Tensor) -> Tensor:
        return self.lam * param.pow(2).sum()

    def grad_(self, grad, param, alpha=1.0, scale=None) -> None:
        super().grad_(grad, param, 2 * alpha, scale)


class NamedL2(torchreg.L2):
    """A subclass that keeps L2's gradient: it may use L2's adder."""


def test_subclass_with_its_own_grad_is_honoured() -> None:
    model = net()
    ref = bare_copy(model)
    DoubledL2(model[0], 0.1)
    NamedL2(model[2], 0.1)
    for _ in range(2):
        model.zero_grad()
        ref.zero_grad()
        loss_of(model).backward()
        penalty = explicit_penalty([(ref[0].weight, 0.0, 0.2), (ref[2].weight, 0.0, 0.1)])
        (loss_of(ref) + penalty).backward()
        assert_same_grads(model, ref)
    assert DoubledL2(0.1)._adder(1.0, None) is None
    assert NamedL2(0.1)._adder(1.0, None) is not None


@pytest.mark.parametrize("scaled", [False, True], ids=["unscaled", "scaled"])
@pytest.mark.parametrize("kind", ["L1", "ElasticNet"])
def test_large_parameter_sign_path_through_the_hook(kind: str, scaled: bool) -> None:
    """A parameter above 32 MiB takes the chunked sign path from the hook: bitwise the plain update."""
    n = _ops._LARGE // 4 + 4321
    layer = nn.Linear(n, 1, bias=False)
    with torch.no_grad():
        layer.weight[0, ::5] = 0.0  # sgn(0) = 0
    rule = torchreg.L1(0.25) if kind == "L1" else torchreg.ElasticNet(l1=0.25, l2=0.5)
    rule.apply(layer)
    scaler = torch.amp.GradScaler("cpu", init_scale=8.0) if scaled else None
    if scaler is not None:
        torchreg.configure(layer, grad_scaler=scaler)
    x = torch.randn(2, n, generator=torch.Generator().manual_seed(3))
    loss = layer(x).sum()
    (scaler.scale(loss) if scaler is not None else loss).backward()
    w = layer.weight.detach()
    s = 8.0 if scaled else 1.0
    expected = x.sum(0, keepdim=True) * s
    if kind == "ElasticNet":
        expected.add_(w, alpha=0.5 * s)
    expected.add_(torch.sgn(w), alpha=0.25 * s)
    assert torch.equal(layer.weight.grad, expected)
