"""Every row of the regularizer table refuses bad strengths and options before anything changes.

Each strength the class names (``cls._strengths``) gets each bad value below, in the wrapper form
(``cls(model, ...)``) and as a rule in ``apply_regularization`` (a ``functools.partial``, so the
refusal happens inside the call); each row's own bad options (``Row.bad``: GroupLasso's ``dim``,
Orthogonal's ``mode``, ``proximal``) likewise. The error is a ``TypeError`` (wrong type) or
``ValueError`` (bad value) whose message names the strength and the value, and the model is untouched:
the same ``state_dict``, no hook, no torchreg attribute, and the bare gradients. A bad value assigned to
a strength of an applied rule is refused too, the old value kept and the model still exact.
"""

from __future__ import annotations

import functools
import math
from typing import Any, List, Tuple

import pytest
import torch
from torch import nn

import torchreg
from regularizer_table import (  # noqa: F401
    Bad, Reference, Row, assert_no_torchreg_state, make_net, params, train,
)

BAD_STRENGTHS = [  # (value, error, how the message shows it)
    (-1.0, ValueError, "-1.0"),
    (math.nan, ValueError, "nan"),
    (math.inf, ValueError, "inf"),
    ("0.1", TypeError, "'0.1'"),
    (None, TypeError, "None"),
    (True, TypeError, "True"),
]


def _bad_inputs(row: Row) -> List[Tuple[str, Tuple[Any, ...]]]:
    """(label, (form, Bad)) for every strength x bad value, and every bad option of the row, in both forms."""
    cases = [Bad({name: value}, error, (name, shown))
             for name in getattr(row.cls, "_strengths", ()) for value, error, shown in BAD_STRENGTHS]
    cases += list(row.bad)
    if not cases:  # visible as a skip, not absent
        return [("nothing-to-refuse", (None, None))]
    return [(f"{'-'.join(f'{k}={v!r}' for k, v in bad.options.items())}-{form}", (form, bad))
            for bad in cases for form in ("wrapper", "rule")]


def _call(row: Row, form: str, model: nn.Module, options: Any) -> Any:
    kwargs = {**row.kwargs, **options}
    if form == "wrapper":
        return row.cls(model, **kwargs)
    return torchreg.apply_regularization(model, {nn.Linear: functools.partial(row.cls, **kwargs)})


@pytest.mark.parametrize("row, form, bad", params("errors", per_row=_bad_inputs))
def test_bad_input_raises_and_leaves_the_model_untouched(row: Row, form: str, bad: Bad) -> None:
    if bad is None:
        pytest.skip(f"{row.id} has no strength and no Row.bad option to refuse")
    model = make_net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(bad.error) as info:
        _call(row, form, model, bad.options)
    message = str(info.value)
    assert all(fragment in message for fragment in bad.fragments), (bad.fragments, message)
    assert list(model.state_dict()) == list(before)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert_no_torchreg_state(model)
    train(model, Reference(None, make_net()), steps=1)  # the bare gradients and updates


def _bad_assignments(row: Row) -> List[Tuple[str, Tuple[Any, ...]]]:
    names = getattr(row.cls, "_strengths", ())
    if not names:  # a constraint: visible as a skip, not absent
        return [("no-strength", (None, None, None))]
    return [(f"{name}={value!r}", (name, value, error)) for name in names for value, error, _ in BAD_STRENGTHS[::3]]


@pytest.mark.parametrize("row, name, value, error", params("errors", per_row=_bad_assignments))
def test_bad_strength_assigned_later_keeps_the_old_one(row: Row, name: str, value: Any, error: type) -> None:
    if name is None:
        pytest.skip(f"{row.cls.__name__} has no strength")
    rule = row.rule()
    model = make_net()
    ref = Reference(row, model)
    torchreg.apply_regularization(model, {nn.Linear: rule})
    old = getattr(rule, name)
    with pytest.raises(error, match=name):
        setattr(rule, name, value)
    assert getattr(rule, name) == old
    train(model, ref, steps=1)
