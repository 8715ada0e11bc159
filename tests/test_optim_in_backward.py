"""Optimizer-in-backward (PyTorch's tutorial pattern): one optimizer per parameter, stepped from the
parameter's post-accumulate-grad hook, its gradient freed right after.

The regularization gradient must be in ``.grad`` when that per-parameter step reads it, whichever of
the user's hooks and torchreg's was registered first, and a proximal rule must apply its operator after
that step. Compared with one process stepping one optimizer after the backward, the penalty in the loss
(proximal: the soft-threshold applied by hand after the step). Under FSDP2 the same runs in
tests/test_fsdp.py.
"""

from __future__ import annotations

from typing import Any, Dict, List

import pytest
import torch
from torch import nn

import torchreg
from test_fsdp import STEPS, batch, build, loss_of, make_optimizer, reference, regularize


def optimizer_in_backward(model: nn.Module, kind: str, seen: Dict[str, torch.Tensor]) -> List[Any]:
    """Per-parameter optimizers stepped in the parameters' hooks; ``seen`` gets each step's gradient."""
    names = {id(p): n for n, p in model.named_parameters()}
    handles = []
    for p in model.parameters():
        opt = make_optimizer(kind, [p])
        opt.register_step_pre_hook(lambda o, a, k: seen.__setitem__(
            names[id(o.param_groups[0]["params"][0])], o.param_groups[0]["params"][0].grad.clone()))

        def step(param: torch.Tensor, opt: torch.optim.Optimizer = opt) -> None:
            opt.step()
            opt.zero_grad()

        handles.append(p.register_post_accumulate_grad_hook(step))
    return handles


CASES = [pytest.param(mode, kind, order, id=f"{mode}-{kind}-{order}")
         for mode in ("l2", "l1", "l1-prox") for kind in ("sgd", "adamw") for order in ("user-hooks-first", "torchreg-first")]


@pytest.mark.parametrize("mode, kind, order", CASES)
def test_optimizer_in_backward_matches_the_penalty_in_the_loss(mode: str, kind: str, order: str) -> None:
    model = build()
    seen: Dict[str, torch.Tensor] = {}
    if order == "user-hooks-first":
        optimizer_in_backward(model, kind, seen)
        regularize(model, mode)
    else:
        regularize(model, mode)
        optimizer_in_backward(model, kind, seen)
    expected = reference(mode, kind, 1)
    for step in range(STEPS):
        x, y = batch(step, 1)
        seen.clear()
        loss_of(model, x, y).backward()
        want_grads, want_params = expected[step]
        assert seen.keys() == want_grads.keys()
        for name, p in model.named_parameters():
            assert p.grad is None, f"{name}: the user's hook freed the gradient; torchreg must not re-create it"
            torch.testing.assert_close(seen[name], want_grads[name], msg=lambda m: f"step {step} grad {name}: {m}")
            torch.testing.assert_close(p.detach(), want_params[name], msg=lambda m: f"step {step} {name}: {m}")
    if mode == "l1-prox":
        assert (model[0].weight == 0).any(), "the prox made no exact zero: the case tests nothing"
