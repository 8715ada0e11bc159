"""Every row of the regularizer table, wrapper and rule forms: a dropped model is freed.

Built, regularized, trained two steps (SGD; Adam too for after-step rows, whose operator reads the
optimizer's state), deep-copied (the copy trained too), and dropped: after ``gc.collect()`` no weak
reference to the model, its copy, their parameters or the rule is alive. Checked with weak references,
never with RSS. Every case is built and dropped first and collected by one ``gc.collect()`` (a full
collection costs ~0.5 s with torch's compiler loaded), then each test checks its own references.
"""

from __future__ import annotations

import copy
import gc
import traceback
import weakref
from typing import Dict, List, Tuple

import pytest
import torch

import torchreg
from regularizer_table import TABLE, TARGETS, Reference, Row, make_net, params, train

FORMS = ("wrapper", "rule")


def _build_train_drop(row: Row, form: str) -> List[weakref.ref]:
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
    return refs + ([weakref.ref(rule)] if rule is not None else [])


@pytest.fixture(scope="module")
def survivors() -> Dict[Tuple[str, str], List[str]]:
    """(row id, form) -> the type names of what is still alive after the drop, or the error building it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the root conftest's fixture does for each test
    refs: Dict[Tuple[str, str], List[weakref.ref]] = {}
    errors: Dict[Tuple[str, str], List[str]] = {}
    for row in TABLE:
        if "memory" in row.skip:
            continue
        for form in FORMS:
            try:
                refs[row.id, form] = _build_train_drop(row, form)
            except Exception:  # reported by the test of that case
                errors[row.id, form] = [traceback.format_exc()]
    torch.set_num_threads(threads)
    gc.collect()
    alive = {key: [type(r()).__name__ for r in rs if r() is not None] for key, rs in refs.items()}
    return {**alive, **errors}


@pytest.mark.parametrize("row, form", params("memory", ("form", FORMS)))
def test_dropped_model_is_freed(row: Row, form: str, survivors: Dict[Tuple[str, str], List[str]]) -> None:
    assert not survivors[row.id, form], f"still alive after del and gc.collect(): {survivors[row.id, form]}"
