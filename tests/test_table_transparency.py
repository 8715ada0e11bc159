"""Every row of the regularizer table leaves the model the same model, and travels with it.

* ``state_dict``: the keys and values of the bare model; a regularized checkpoint loads into a bare
  model and a bare one into the regularized model (strict; copied, or ``assign=True``), which stays exact;
* ``copy.deepcopy``, ``pickle`` and ``torch.save``/``torch.load`` of a trained regularized model give a
  model regularized exactly as the row says (checked against its own reference), and the original
  stays exact too (the copy regularizes itself only, with a per-parameter state of its own);
* ``model.to(torch.float64)`` after training: exact in float64, per-parameter state moved along;
* ``remove_regularization`` gives back the bare gradients and updates, and leaves no hook or attribute.
"""

from __future__ import annotations

import copy
import io
import pickle
from typing import Callable, Dict, List

import pytest
import torch
from torch import nn

import torchreg
from regularizer_table import (  # noqa: F401
    Reference, Row, assert_no_torchreg_state, make_net, pair, params, train,
)

FORMS = ("form", ["wrapper", "rule"])


def _torch_save(model: nn.Module) -> nn.Module:
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


ROUND_TRIPS: Dict[str, Callable[[nn.Module], nn.Module]] = {
    "deepcopy": copy.deepcopy,
    "pickle": lambda model: pickle.loads(pickle.dumps(model)),
    "torch.save": _torch_save,
}


def _checkpoint(model: nn.Module) -> Dict[str, torch.Tensor]:
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("row, form, load", params("transparency", FORMS, ("load", ["copy", "assign"])))
def test_state_dict_is_the_bare_models_and_loads_both_ways(row: Row, form: str, load: str) -> None:
    model, ref = pair(row, form)
    bare = make_net()
    assert list(model.state_dict()) == list(bare.state_dict())
    assert all(torch.equal(v, bare.state_dict()[k]) for k, v in model.state_dict().items())
    train(model, ref, steps=1)
    target = make_net(seed=1)
    assert not target.load_state_dict(_checkpoint(model), strict=True).missing_keys
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in target.state_dict().items())
    # A bare checkpoint into the regularized model (copied into its parameters, or assign=True: new
    # parameter objects): still exact, the state (anchors) kept from when the rule was applied.
    other = make_net(seed=2)
    before = list(model.parameters())
    model.load_state_dict(_checkpoint(other), strict=True, assign=load == "assign")
    assert all((p is q) == (load == "copy") for p, q in zip(model.parameters(), before))
    train(model, Reference(row, other, snapshot=ref.snapshot), steps=2)


def state_tensors(model: nn.Module) -> List[torch.Tensor]:
    """The per-parameter state tensors (``Regularizer.init_state``) torchreg keeps for ``model``."""
    return [t for unit in torchreg._registry.units_in(model) for entry in unit.entries
            for t in (getattr(entry, "state", None) or {}).values()]


@pytest.mark.parametrize("row, form, trip", params("transparency", FORMS, ("trip", list(ROUND_TRIPS))))
def test_round_trip_keeps_the_regularization_exact(row: Row, form: str, trip: str) -> None:
    model, ref = pair(row, form)
    train(model, ref, steps=1)
    twin, twin_ref = ROUND_TRIPS[trip](model), ref.fork()
    assert list(twin.state_dict()) == list(model.state_dict())
    mine, theirs = state_tensors(model), state_tensors(twin)
    assert len(mine) == len(theirs) == (len(ref.snapshot) if row.snapshot else 0)
    assert not {t.data_ptr() for t in mine} & {t.data_ptr() for t in theirs}, "the copy shares the state"
    train(twin, twin_ref, steps=2, seed=10)
    train(model, ref, steps=1, seed=20)  # the original, after its twin trained: unaffected


@pytest.mark.parametrize("row, form", params("transparency", FORMS))
def test_model_to_float64_stays_exact(row: Row, form: str) -> None:
    model, ref = pair(row, form)
    train(model, ref, steps=1)
    assert model.to(torch.float64) is model
    train(model, ref.fork(ref.model.to(torch.float64)), steps=2, seed=10)
    assert all(p.dtype == torch.float64 and p.grad.dtype == torch.float64 for p in model.parameters())
    assert all(t.dtype == torch.float64 for t in state_tensors(model)), "the state did not follow .to()"


@pytest.mark.parametrize("row, form", params("transparency", FORMS))
def test_remove_regularization_restores_bare_training(row: Row, form: str) -> None:
    model, ref = pair(row, form)
    train(model, ref, steps=1)
    assert torchreg.remove_regularization(model) is model
    assert_no_torchreg_state(model)
    train(model, Reference(None, ref.model), steps=2, seed=5)
