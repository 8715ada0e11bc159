"""Every row of the regularizer table, on Linear, Conv2d, Embedding and LSTM, against plain autograd.

Gradient and activity rows: after each backward every ``.grad`` equals autograd's gradient of
``loss + penalty`` on a bare copy (the penalty typed in ``regularizer_table.py``). After-step rows
(proximal): the gradients are the bare ones, and after each step of every optimizer the row is exact
for, the weights equal a plain step followed by the operator applied by hand. Both forms: the wrapper
(``cls(layer, ...)``) and a rule given to ``apply_regularization``. Every strength 0 (at construction,
or set later on a live rule) trains exactly as the bare model, bit for bit.
"""

from __future__ import annotations

import pytest
import torch

import torchreg
from reference import assert_same_grads
from regularizer_table import (  # noqa: F401
    LAYERS, OPTIMIZERS, TARGETS, Reference, Row, assert_same_params, batch, make_net, params, readout,
)

pytestmark = pytest.mark.filterwarnings("ignore:LSTM with projections is not supported with oneDNN")

STEPS = 2


@pytest.mark.parametrize("row, layer, form",
                         params("exactness", ("layer", list(LAYERS)), ("form", ["wrapper", "rule"])))
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
            want = row.ref_penalty(ref.model, {"": []}, ref.snapshot).detach()
            torch.testing.assert_close(torchreg.penalty(model), want)
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


@pytest.mark.parametrize("row, how", params("exactness", ("how", ["built-with-zero", "set-to-zero"])))
def test_zero_strength_gives_bare_training_bitwise(row: Row, how: str) -> None:
    names = getattr(row.cls, "_strengths", ())
    if not names:
        pytest.skip(f"{row.cls.__name__} has no strength")
    model, bare = make_net(), make_net()
    zeros = {name: 0.0 for name in names}
    if how == "built-with-zero":
        for target in TARGETS:
            row.cls(model.get_submodule(target), **{**row.kwargs, **zeros})
    else:  # a schedule that reaches 0 on a live rule
        rule = row.rule()
        torchreg.apply_regularization(model, {target: rule for target in TARGETS})
        for name, value in zeros.items():
            setattr(rule, name, value)
    opt, bare_opt = OPTIMIZERS["SGD"](model.parameters()), OPTIMIZERS["SGD"](bare.parameters())
    for step in range(2):
        x = batch(12, seed=step)
        readout(model(x)).backward()
        readout(bare(x)).backward()
        opt.step()
        bare_opt.step()
        for (name, p), q in zip(model.named_parameters(), bare.parameters()):
            assert torch.equal(p.grad, q.grad) and torch.equal(p, q), f"step {step}: {name} differs from the bare model"
