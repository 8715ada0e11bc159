"""DeepSpeed ZeRO-3 is refused: its parameters are empty outside forward (gathered into the module for
the forward only), so a hook on them adds a term to nothing, and the gradients live in DeepSpeed's own
partitioned buffers. DeepSpeed marks such parameters with ``ds_id`` / ``ds_status``; the tests set those
attributes on a plain model (DeepSpeed's CPU backend compiles a C++ op when it initializes, so it does
not run here)."""

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
    with pytest.raises(TypeError, match=r"torchreg.*DeepSpeed ZeRO stage 3.*stage 1 or 2") as info:
        torchreg.L1(model, 0.1, proximal=proximal)
    assert "0.weight" in str(info.value)
    assert not list(torchreg._engine.units_in(model))  # nothing changed


def test_zero3_after_apply_is_refused_at_the_first_forward() -> None:
    """deepspeed.initialize(...) on a model regularized before: refused before the first backward."""
    model = torchreg.L2(nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 1)), 0.1)
    zero3_like(model)
    with pytest.raises(RuntimeError, match=r"torchreg.*DeepSpeed ZeRO stage 3"):
        model(torch.ones(2, 3))
