"""Every row of the regularizer table, on Linear, Conv2d, Embedding and LSTM, against plain autograd.

Gradient and activity rows: after each backward every ``.grad`` equals autograd's gradient of
``loss + penalty`` on a bare copy (the penalty typed in ``regularizer_table.py``). After-step rows
(proximal): the gradients are the bare ones, and after each step of every optimizer the row is exact
for, the weights equal a plain step followed by the operator applied by hand. Both forms: the wrapper
(``cls(layer, ...)``) and a rule given to ``apply_regularization``.
"""

from __future__ import annotations

import pytest
import torch

import torchreg
from reference import assert_same_grads
from regularizer_table import LAYERS, OPTIMIZERS, Reference, Row, assert_same_params, one_thread, params  # noqa: F401

pytestmark = pytest.mark.filterwarnings("ignore:LSTM with projections is not supported with oneDNN")

STEPS = 2


@pytest.mark.parametrize("row, layer, form", params("exactness", ("layer", list(LAYERS)), ("form", ["wrapper", "rule"])))
def test_matches_autograd_of_loss_plus_penalty(row: Row, layer: str, form: str) -> None:
    if layer not in row.layers:
        pytest.skip(f"{row.id} does not fit {layer} (Row.layers)")
    case = LAYERS[layer]
    for name in row.optimizers:
        torch.manual_seed(0)
        model = case.make()
        ref = Reference(row, model, [""])
        row.regularize(model, [""], form)
        if row.penalty is not None:  # torchreg's reading of the penalty, against the typed formula
            torch.testing.assert_close(torchreg.penalty(model), row.ref_penalty(ref.model, {"": []}, ref.snapshot).detach())
        opt, ref_opt = OPTIMIZERS[name](model.parameters()), OPTIMIZERS[name](ref.model.parameters())
        for step in range(STEPS):
            x = case.inputs(seed=step)
            opt.zero_grad()
            ref_opt.zero_grad()
            case.call(model, x).pow(2).mean().backward()
            (case.call(ref.model, x).pow(2).mean() + ref.penalty()).backward()
            assert_same_grads(model, ref.model)
            opt.step()
            ref.step(ref_opt)
            assert_same_params(model, ref.model)
