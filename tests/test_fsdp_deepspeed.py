"""DeepSpeed ZeRO is refused where torchreg's term would be lost.

ZeRO-3: its parameters are empty outside forward (gathered into the module for the forward only), and
the gradients live in DeepSpeed's own partitioned buffers; DeepSpeed marks such parameters with
``ds_id`` / ``ds_status``. ZeRO-2 (and ZeRO-1 with ``overlap_comm``): DeepSpeed registers a
post-accumulate-grad hook of its own on each parameter that moves the gradient into its buffers and
sets ``.grad`` to None, within the backward. The tests reproduce those marks on a plain model:
DeepSpeed's CPU backend compiles a C++ communication op when it initializes, so it does not run here.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import torchreg


def zero3_like(model: nn.Module) -> nn.Module:
    for i, p in enumerate(model.parameters()):
        p.ds_id = i
        p.ds_status = "NOT_AVAILABLE"
    return model


@pytest.mark.parametrize("proximal", [False, True])
def test_zero3_parameters_are_refused_at_apply(proximal: bool) -> None:
    model = zero3_like(nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 1)))
    with pytest.raises(TypeError, match=r"torchreg.*DeepSpeed ZeRO stage 3.*stage 1 without overlap_comm \(stage 2 is refused as well\)") as info:
        torchreg.L1(model, 0.1, proximal=proximal)
    assert "0.weight" in str(info.value)
    assert not list(torchreg._engine.units_in(model))  # nothing changed


def test_zero3_after_apply_is_refused_at_the_first_forward() -> None:
    """deepspeed.initialize(...) on a model regularized before: refused before the first backward."""
    model = torchreg.L2(nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 1)), 0.1)
    zero3_like(model)
    with pytest.raises(RuntimeError, match=r"torchreg.*DeepSpeed ZeRO stage 3"):
        model(torch.ones(2, 3))


def _deepspeed_like_hook(param: torch.Tensor) -> None:  # what stage_1_and_2's grad_handling_hook does
    param.grad = None


_deepspeed_like_hook.__module__ = "deepspeed.runtime.zero.stage_1_and_2"


def test_zero2_gradient_hooks_are_refused_at_apply_and_at_the_first_forward() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 1))
    handles = [p.register_post_accumulate_grad_hook(_deepspeed_like_hook) for p in model.parameters()]
    with pytest.raises(TypeError, match=r"torchreg.*DeepSpeed ZeRO.*stage 2.*FSDP2"):
        torchreg.L2(model, 0.1)
    for h in handles:
        h.remove()
    torchreg.L2(model, 0.1)  # then deepspeed.initialize(model=...) registers its hooks
    for p in model.parameters():
        p.register_post_accumulate_grad_hook(_deepspeed_like_hook)
    with pytest.raises(RuntimeError, match=r"torchreg.*DeepSpeed ZeRO.*stage 2"):
        model(torch.ones(2, 3))
