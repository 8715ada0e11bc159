"""Plain-PyTorch references the tests compare torchreg against.

The reference for a regularized model is always the same model *without* torchreg, trained with the
same penalty added to the loss explicitly, so that autograd computes the penalty's gradient.
"""

from __future__ import annotations

import copy
from typing import Dict, Iterable, Optional, Tuple

import torch
from torch import Tensor, nn


def explicit_penalty(terms: Iterable[Tuple[Tensor, float, float]]) -> Tensor:
    """``sum(l1 * |p| + l2 / 2 * |p|**2)`` over ``(param, l1, l2)`` triples, with autograd graph."""
    total: Optional[Tensor] = None
    for p, l1, l2 in terms:
        a = p.abs()
        term = l1 * a.sum() + l2 / 2 * a.pow(2).sum()
        total = term if total is None else total + term
    assert total is not None, "no penalty term"
    return total


def bare_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` taken *before* torchreg is applied to it: the reference model."""
    return copy.deepcopy(model)


def grads(model: nn.Module) -> Dict[str, Optional[Tensor]]:
    return {n: (None if p.grad is None else p.grad.detach().clone()) for n, p in model.named_parameters()}


def assert_same_grads(actual: nn.Module, expected: nn.Module, **tolerances) -> None:
    """Every parameter's ``.grad`` equal (``assert_close``), or ``None`` on both sides."""
    got, want = grads(actual), grads(expected)
    assert got.keys() == want.keys(), (sorted(got), sorted(want))
    for name in want:
        if want[name] is None or got[name] is None:
            assert got[name] is None and want[name] is None, f"{name}: grad {got[name]} vs {want[name]}"
        else:
            torch.testing.assert_close(got[name], want[name], msg=lambda m: f"{name}: {m}", **tolerances)
