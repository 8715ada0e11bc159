"""A dropped regularized model is freed: nothing torchreg adds keeps it (or its copies, or its grad
scaler) alive. Checked with weak references after ``del`` and ``gc.collect()``, never with RSS timings.

A parameter's hooks are held by C++ (invisible to Python's garbage collector), so a hook that referred to
its unit strongly (hook -> unit -> module -> parameter -> hook) made a cycle no collector could break.
"""

from __future__ import annotations

import copy
import gc
import io
import weakref
from typing import Callable, List

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import torchreg


def assert_freed(*refs: weakref.ref) -> None:
    gc.collect()
    alive = [r() for r in refs if r() is not None]
    assert not alive, f"still alive: {[type(o).__name__ for o in alive]}"


def step(model: nn.Module, scaler: "torch.amp.GradScaler | None" = None) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    loss = model(torch.randn(2, 8, requires_grad=True)).pow(2).sum()
    (scaler.scale(loss) if scaler is not None else loss).backward()
    if scaler is not None:
        scaler.step(opt)
        scaler.update()
    else:
        opt.step()


def test_the_before_stop_check() -> None:
    m = torchreg.L1(nn.Linear(8, 8), 1e-3)
    m(torch.randn(2, 8)).sum().backward()
    w = weakref.ref(m.weight)
    del m
    gc.collect()
    assert w() is None


BUILDERS = {
    "wrapper": lambda: torchreg.L1(nn.Linear(8, 8), 1e-3),
    "apply_regularization": lambda: torchreg.apply_regularization(
        nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8)), {nn.Linear: torchreg.L2(1e-3)}),
    "per-layer": lambda: nn.Sequential(torchreg.L1(nn.Linear(8, 8), 1e-3), torchreg.L2(nn.Linear(8, 8), 1e-3)),
    "lazy": lambda: torchreg.L1(nn.Sequential(nn.LazyLinear(8)), 1e-3),
    "frozen": lambda: torchreg.L1(nn.Linear(8, 8).requires_grad_(False), 1e-3, params="*"),
}


@pytest.mark.parametrize("build", BUILDERS)
def test_dropped_model_is_freed(build: str) -> None:
    model = BUILDERS[build]()
    step(model)
    refs = [weakref.ref(model)] + [weakref.ref(p) for p in model.parameters()]
    refs += [weakref.ref(u) for u in torchreg._engine.units_in(model)]
    del model
    assert_freed(*refs)


def test_copies_and_the_configured_scaler_are_freed() -> None:
    model = BUILDERS["apply_regularization"]()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4)
    torchreg.configure(model, grad_scaler=scaler)
    step(model, scaler)
    deep = copy.deepcopy(model)  # trains with the same scaler
    step(deep, scaler)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    step(loaded)
    refs = [weakref.ref(o) for o in (model, deep, loaded, scaler)]
    refs += [weakref.ref(p) for m in (model, deep, loaded) for p in m.parameters()]
    del model, deep, loaded, scaler
    assert_freed(*refs)


def test_freed_after_a_failed_backward_and_after_reentrant_checkpointing() -> None:
    class Boom(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            raise ValueError("boom")

    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8))
    torchreg.apply_regularization(model, {nn.Linear: torchreg.L1(1e-3)})
    x = torch.randn(2, 8, requires_grad=True)
    checkpoint(model, x, use_reentrant=True).sum().backward()  # sessions taken over by the outer backward
    with pytest.raises(ValueError, match="boom"):
        Boom.apply(model(x)).sum().backward()  # (the hooks of model[2] ran: a session was open)
    with pytest.raises(ValueError, match="boom"):
        model(Boom.apply(x)).sum().backward()
    refs = [weakref.ref(model)] + [weakref.ref(p) for p in model.parameters()]
    del model
    assert_freed(*refs)


def test_build_train_drop_loop_frees_every_model() -> None:
    """30 models built, regularized (rules, a copy, a scaler), trained two steps and dropped: all freed,
    and the number of live units does not grow."""
    refs: List[weakref.ref] = []

    def units() -> int:
        gc.collect()
        return sum(type(o) is torchreg._engine.Unit for o in gc.get_objects())

    before = units()
    for i in range(30):
        model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))
        torchreg.apply_regularization(model, {nn.Linear: torchreg.ElasticNet(1e-4, 1e-3)})
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4)
        torchreg.configure(model, accumulation_steps=1, grad_scaler=scaler)
        for _ in range(2):
            step(model, scaler)
        twin = copy.deepcopy(model)
        step(twin, scaler)
        refs += [weakref.ref(model), weakref.ref(twin), weakref.ref(scaler), weakref.ref(model[0].weight)]
        del model, twin, scaler
    assert_freed(*refs)
    assert units() == before


@pytest.mark.parametrize("segments", ["last layer", "middle layer"])
def test_freed_right_after_a_reentrant_checkpointed_backward(segments: str) -> None:
    """Nothing of the last backward (its enclosing checkpoint node, whose context holds the checkpointed
    function) stays referenced by torchreg once it is over: no other backward needed to free the model."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList(nn.Linear(8, 8) for _ in range(3))

        def forward(self, x):
            for i, layer in enumerate(self.layers):
                wanted = 2 if segments == "last layer" else 1
                x = checkpoint(layer, x, use_reentrant=True) if i == wanted else layer(x)
            return x.sum()

    model = torchreg.apply_regularization(Net(), {nn.Linear: torchreg.L1(1e-3)})
    model(torch.randn(2, 8, requires_grad=True)).backward()
    refs = [weakref.ref(model)] + [weakref.ref(p) for p in model.parameters()]
    del model
    assert_freed(*refs)
