"""Every row of the regularizer table inside the training loops users write, against the reference.

The reference (``regularizer_table.Reference``) is a bare copy of the model trained with the row's
penalty added to the loss (or, for after-step rows, its operator applied by hand after a plain step):

* gradient accumulation over k=3 micro-batches, declared with ``torchreg.configure``, against the full batch;
* ``torch.amp.GradScaler`` on CPU, declared with ``configure``; gradients compared after ``unscale_``; a
  step the scaler skips (inf in the data) changes nothing;
* ``torch.compile`` of the model (aot_eager backend, ``fullgraph=True``: no graph break);
* activation checkpointing of the middle layer, reentrant and not;
* ``backward(inputs=[...])``: the terms go to the listed parameters only;
* ``backward(create_graph=True)``: the term joins ``.grad``'s graph, so a Hessian-vector product through
  ``.grad`` equals the reference's;
* two backwards through one retained graph (``accumulation_steps=2``): each adds half the term;
* ``torch.autograd.grad``: no ``.grad`` changes, the returned gradients are the data's (activity terms,
  part of the graph's backward, included), and the next backward is exact.
"""

from __future__ import annotations

import warnings
from typing import Iterator, List

import pytest
import torch

import torchreg
from reference import assert_same_grads
from regularizer_table import (  # noqa: F401
    OPTIMIZERS, TABLE, Row, assert_same_params, batch, pair, params, readout, train,
)

FORMS = ("form", ["wrapper", "rule"])


@pytest.mark.parametrize("row, form", params("accumulation", FORMS))
def test_accumulation_k3_matches_full_batch(row: Row, form: str) -> None:
    model, ref = pair(row, form)
    torchreg.configure(model, accumulation_steps=3)
    train(model, ref, k=3)


@pytest.mark.parametrize("row", params("grad_scaler"))
def test_grad_scaler_unscaled_gradients_match(row: Row) -> None:
    model, ref = pair(row)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1)  # the scale changes each step
    torchreg.configure(model, grad_scaler=scaler)
    train(model, ref, scaler=scaler, steps=3)
    assert scaler.get_scale() == 2.0**13, "no step was skipped: the comparison covered three scales"
    # An inf in the data: the scaler skips the step, so nothing changes (no after-step operator either) ...
    before = [p.detach().clone() for p in model.parameters()]
    opt = OPTIMIZERS["SGD"](model.parameters())
    x = batch(12, seed=7)
    x[3, 2] = float("inf")
    scaler.scale(readout(model(x))).backward()
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() == 2.0**12
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before)), "a skipped step changed weights"
    # ... and the next steps are exact again.
    train(model, ref, scaler=scaler, steps=1, seed=8)


@pytest.fixture
def dynamo_reset() -> Iterator[None]:
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("row", params("compile"))
def test_compiled_model_matches(row: Row, dynamo_reset: None) -> None:
    model, ref = pair(row)
    train(model, ref, forward=torch.compile(model, backend="aot_eager", fullgraph=True))


@pytest.mark.parametrize("row, kind", params("checkpoint-reentrant", ("kind", ["reentrant"])) +
                         params("checkpoint", ("kind", ["non-reentrant"])))
def test_checkpointed_middle_layer_matches(row: Row, kind: str) -> None:
    model, ref = pair(row)
    train(model, ref, forward=lambda x: model(x, ckpt=kind == "reentrant"))


@pytest.mark.parametrize("row", params("inputs"))
def test_backward_inputs_reaches_listed_parameters_only(row: Row) -> None:
    model, ref = pair(row)
    listed = ("b.weight", "c.bias")
    opt, ref_opt = OPTIMIZERS["SGD"](model.parameters()), OPTIMIZERS["SGD"](ref.model.parameters())
    for step in range(2):
        x = batch(12, seed=step)
        opt.zero_grad()
        ref_opt.zero_grad()
        readout(model(x)).backward(inputs=[model.get_parameter(n) for n in listed])
        (readout(ref.model(x)) + ref.penalty()).backward(inputs=[ref.model.get_parameter(n) for n in listed])
        assert_same_grads(model, ref.model)
        assert [n for n, p in model.named_parameters() if p.grad is not None] == list(listed)
        opt.step()
        ref.step(ref_opt)
        assert_same_params(model, ref.model)


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True:UserWarning")
@pytest.mark.parametrize("row", params("create_graph"))
def test_create_graph_second_derivatives_match(row: Row) -> None:
    model, ref = pair(row)
    x = batch(12, seed=0)
    readout(model(x)).backward(create_graph=True)
    (readout(ref.model(x)) + ref.penalty()).backward(create_graph=True)
    assert_same_grads(model, ref.model)
    g = torch.Generator().manual_seed(3)
    vectors = [torch.randn(p.shape, generator=g) for p in model.parameters()]

    def hvp(net: torch.nn.Module) -> List[torch.Tensor]:
        ps = list(net.parameters())
        return list(torch.autograd.grad(sum((p.grad * v).sum() for p, v in zip(ps, vectors)), ps))

    try:
        for (name, _), got, want in zip(model.named_parameters(), hvp(model), hvp(ref.model)):
            torch.testing.assert_close(got, want, msg=lambda m: f"Hessian-vector product, {name}: {m}")
    finally:  # .grad holds a graph back to its parameter: break the cycle
        model.zero_grad(set_to_none=True)
        ref.model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("row", params("retain_graph"))
def test_two_backwards_through_a_retained_graph(row: Row) -> None:
    model, ref = pair(row)
    torchreg.configure(model, accumulation_steps=2)
    x = batch(12, seed=0)
    loss = readout(model(x))
    loss.backward(retain_graph=True)
    loss.backward()
    (2 * readout(ref.model(x)) + ref.penalty()).backward()
    assert_same_grads(model, ref.model)


@pytest.mark.parametrize("row", params("autograd_grad"))
def test_autograd_grad_changes_no_grad(row: Row) -> None:
    model, ref = pair(row)
    x = batch(12, seed=0)
    got = torch.autograd.grad(readout(model(x)), list(model.parameters()))
    loss = readout(ref.model(x))
    penalty = ref.penalty()  # (also clears the recorded outputs) only activity terms are part of the graph
    want = torch.autograd.grad(loss + penalty if row.mode == "activity" else loss, list(ref.model.parameters()))
    for (name, p), a, b in zip(model.named_parameters(), got, want):
        assert p.grad is None, name
        torch.testing.assert_close(a, b, msg=lambda m: f"{name}: {m}")
    train(model, ref, steps=1)


def test_compiling_a_regularized_model_warns_nothing(dynamo_reset: None) -> None:
    warned = []
    for row in TABLE:
        torch._dynamo.reset()
        model, _ = pair(row)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            readout(torch.compile(model, backend="aot_eager")(batch(4, seed=0))).backward()
        warned += [f"{row.id}: {w.message}"[:120] for w in caught if "global hooks" in str(w.message)]
    assert not warned, warned
