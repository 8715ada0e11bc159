"""Every row of the regularizer table, wrapper and rule forms: a dropped model is freed.

Built, regularized, trained two steps (SGD; Adam too for after-step rows, whose operator reads the
optimizer's state), deep-copied, and dropped: after ``gc.collect()`` no weak reference to the model,
its copy, their parameters or the rule is alive. Checked with weak references, never with RSS.
"""

from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch

import torchreg
from regularizer_table import Reference, Row, make_net, one_thread, params, train, TARGETS  # noqa: F401


@pytest.mark.parametrize("row, form", params("memory", ("form", ["wrapper", "rule"])))
def test_dropped_model_is_freed(row: Row, form: str) -> None:
    model = make_net()
    ref = Reference(row, model)
    rule = None
    if form == "rule":
        rule = row.rule()
        torchreg.apply_regularization(model, {name: rule for name in TARGETS})
    else:
        row.regularize(model, TARGETS)
    for optimizer in row.optimizers:
        train(model, ref, steps=2, optimizer=optimizer)
    twin = copy.deepcopy(model)
    train(twin, ref.fork(), steps=1)
    refs = [weakref.ref(o) for o in (model, twin, *model.parameters(), *twin.parameters())]
    if rule is not None:
        refs.append(weakref.ref(rule))
    del model, twin, rule
    gc.collect()
    alive = [type(r()).__name__ for r in refs if r() is not None]
    assert not alive, f"still alive after del and gc.collect(): {alive}"
