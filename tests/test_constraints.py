"""Weight constraints (MaxNorm, MinMaxNorm, UnitNorm, NonNeg) against an independent re-typing of Keras'.

The reference below is Keras' ``keras/src/constraints/constraints.py`` re-typed in numpy, applied to
each weight in the layout Keras stores it (a ``Dense`` kernel is ``(in, out)``, a ``Conv2D`` kernel
``(kh, kw, in, out)``, ...), with Keras' own ``axis``; torchreg's result, in torch's layout, must be the
transposed Keras result.
"""

from __future__ import annotations

import copy
import functools
import pickle

import numpy as np
import pytest
import torch
from torch import nn

from torchreg.constraints import Constraint, MaxNorm, MinMaxNorm, NonNeg, UnitNorm

# -- Keras' formulas, re-typed in numpy -------------------------------------------------------------
KERAS_EPSILON = 1e-7  # keras.backend.epsilon()


def _keras_norms(w, axis):
    return np.sqrt(np.sum(np.square(w), axis=axis, keepdims=True))


def keras_max_norm(w, max_value=2, axis=0):
    norms = _keras_norms(w, axis)
    desired = np.clip(norms, 0, max_value)
    return w * (desired / (KERAS_EPSILON + norms))


def keras_unit_norm(w, axis=0):
    return w / (KERAS_EPSILON + _keras_norms(w, axis))


def keras_min_max_norm(w, min_value=0.0, max_value=1.0, rate=1.0, axis=0):
    norms = _keras_norms(w, axis)
    desired = rate * np.clip(norms, min_value, max_value) + (1 - rate) * norms
    return w * (desired / (KERAS_EPSILON + norms))


def keras_non_neg(w):
    return np.maximum(w, 0)  # Keras 3; Keras 2 wrote w * cast(w >= 0)


# -- torch's layout -> Keras' layout, and the Keras axis that equals the default dim=0 ---------------
# (torch weight -> Keras kernel, Keras kernel -> torch weight, Keras axis for torch dim=0)
LAYOUTS = {
    # Dense kernel (in, out); torch Linear (out, in)
    "linear": (lambda w: w.T, lambda k: k.T, 0),
    # Conv1D kernel (k, in, out); torch Conv1d (out, in, k)
    "conv1d": (lambda w: w.transpose(2, 1, 0), lambda k: k.transpose(2, 1, 0), (0, 1)),
    # Conv2D kernel (kh, kw, in, out); torch Conv2d (out, in, kh, kw)
    "conv2d": (lambda w: w.transpose(2, 3, 1, 0), lambda k: k.transpose(3, 2, 0, 1), (0, 1, 2)),
    # Embedding embeddings (input_dim, output_dim): torch's layout; dim=0 (one norm per token) = axis 1
    "embedding": (lambda w: w, lambda k: k, 1),
    # LSTM kernel (in, 4 units) and recurrent_kernel (units, 4 units), gates i, f, c, o as torch's
    "lstm_ih": (lambda w: w.T, lambda k: k.T, 0),
    "lstm_hh": (lambda w: w.T, lambda k: k.T, 0),
}


@functools.lru_cache(maxsize=None)
def _weights():
    torch.manual_seed(0)
    lstm = nn.LSTM(3, 4)
    return {
        "linear": nn.Linear(5, 3).weight,
        "conv1d": nn.Conv1d(2, 3, 4).weight,
        "conv2d": nn.Conv2d(2, 3, (2, 3)).weight,
        "embedding": nn.Embedding(6, 4).weight,
        "lstm_ih": lstm.weight_ih_l0,
        "lstm_hh": lstm.weight_hh_l0,
    }


# scale: 1 keeps the initial weights; 50 makes every group infeasible for max_value=1 (norms > 1);
# 1e-3 puts every group below min_value; "zero" sets one group (one output unit) to 0.
STARTS = ["init", "large", "small", "zero_group"]


def _start(w: torch.Tensor, start: str) -> torch.Tensor:
    w = w.detach().clone().double()
    if start == "large":
        w *= 50
    elif start == "small":
        w *= 1e-3
    elif start == "zero_group":
        w[1] = 0
    return w


CASES = [
    ("MaxNorm", lambda: MaxNorm(1.0), lambda k, axis: keras_max_norm(k, 1.0, axis)),
    ("MaxNorm_default", lambda: MaxNorm(), lambda k, axis: keras_max_norm(k, axis=axis)),
    ("UnitNorm", lambda: UnitNorm(), lambda k, axis: keras_unit_norm(k, axis)),
    ("MinMaxNorm", lambda: MinMaxNorm(0.5, 1.5), lambda k, axis: keras_min_max_norm(k, 0.5, 1.5, 1.0, axis)),
    ("MinMaxNorm_rate", lambda: MinMaxNorm(0.5, 1.5, rate=0.3),
     lambda k, axis: keras_min_max_norm(k, 0.5, 1.5, 0.3, axis)),
    ("NonNeg", lambda: NonNeg(), lambda k, axis: keras_non_neg(k)),
]


@pytest.mark.parametrize("start", STARTS)
@pytest.mark.parametrize("layer", list(LAYOUTS))
@pytest.mark.parametrize("name,make,keras", CASES, ids=[c[0] for c in CASES])
def test_project_equals_keras_on_keras_layout(name, make, keras, layer, start):
    w = _start(_weights()[layer], start)
    to_keras, to_torch, axis = LAYOUTS[layer]
    want = to_torch(keras(to_keras(w.numpy()), axis))
    got = w.clone()
    make().project_(got)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-12, atol=1e-300)
    if start == "zero_group" and name != "NonNeg":
        assert (got[1] == 0).all()  # a group of norm 0 stays 0, no NaN


@pytest.mark.parametrize("start", STARTS)
@pytest.mark.parametrize("name,make,keras", CASES, ids=[c[0] for c in CASES])
def test_project_float32_equals_keras_in_float32(name, make, keras, start):
    w = _start(_weights()["conv2d"], start).float()
    to_keras, to_torch, axis = LAYOUTS["conv2d"]
    want = to_torch(keras(to_keras(w.numpy()), axis))
    assert want.dtype == np.float32
    got = w.clone()
    make().project_(got)
    np.testing.assert_allclose(got.numpy(), want, rtol=2e-6, atol=1e-30)


def test_embedding_dim1_is_keras_default_axis0():
    w = _start(_weights()["embedding"], "large")
    got = w.clone()
    MaxNorm(3.0, dim=1).project_(got)
    np.testing.assert_allclose(got.numpy(), keras_max_norm(w.numpy(), 3.0, axis=0), rtol=1e-12)
    # and dim=0 is one norm per token, torch.nn.Embedding(max_norm=)'s grouping
    per_token = w.clone()
    MaxNorm(3.0).project_(per_token)
    assert torch.linalg.vector_norm(per_token, dim=1).max() <= 3.0 + 1e-12
    assert not torch.allclose(per_token, got)


@pytest.mark.parametrize("shape", [(4, 5), (3, 2, 4), (2, 3, 2, 3)])
def test_every_dim_equals_keras_axis_of_the_other_dims(shape):
    torch.manual_seed(1)
    w = torch.randn(shape, dtype=torch.float64) * 3
    for dim in range(-len(shape), len(shape)):
        axis = tuple(d for d in range(len(shape)) if d != dim % len(shape))
        for rule, keras in [
            (MaxNorm(1.5, dim=dim), lambda k: keras_max_norm(k, 1.5, axis)),
            (UnitNorm(dim=dim), lambda k: keras_unit_norm(k, axis)),
            (MinMaxNorm(2.0, 4.0, rate=0.7, dim=dim), lambda k: keras_min_max_norm(k, 2.0, 4.0, 0.7, axis)),
        ]:
            got = w.clone()
            rule.project_(got)
            np.testing.assert_allclose(got.numpy(), keras(w.numpy()), rtol=1e-12, err_msg=f"{rule!r}")


@pytest.mark.parametrize("rule,keras", [
    (MaxNorm(1.0, dim=None), lambda b: keras_max_norm(b, 1.0, axis=0)),
    (UnitNorm(dim=None), lambda b: keras_unit_norm(b, axis=0)),
    (MinMaxNorm(2.0, 3.0, dim=None), lambda b: keras_min_max_norm(b, 2.0, 3.0, axis=0)),
    (MaxNorm(1.0), lambda b: keras_max_norm(b[:, None], 1.0, axis=1)[:, 0]),  # dim=0: one norm per element
    (NonNeg(), keras_non_neg),
])
def test_bias_constraint(rule, keras):
    b = torch.tensor([3.0, -4.0, 0.5, 0.0, -0.2], dtype=torch.float64)
    got = b.clone()
    rule.project_(got)
    np.testing.assert_allclose(got.numpy(), keras(b.numpy()), rtol=1e-12)


def test_dim_none_on_a_matrix_is_keras_axis_none():
    w = torch.randn(3, 4, dtype=torch.float64) * 5
    got = w.clone()
    MaxNorm(2.0, dim=None).project_(got)
    np.testing.assert_allclose(got.numpy(), keras_max_norm(w.numpy(), 2.0, axis=None), rtol=1e-12)


def test_formulas_by_hand():
    # one group of norm 5 for each case, worked out without any norm code
    w = torch.tensor([[3.0, 4.0]], dtype=torch.float64)
    cases = [(MaxNorm(1.0), 1.0), (UnitNorm(), 1.0), (MinMaxNorm(6.0, 8.0), 6.0), (MinMaxNorm(6.0, 8.0, rate=0.5), 5.5),
             (MaxNorm(10.0), 5.0), (MinMaxNorm(0.0, 4.0, rate=0.25), 4.75)]
    for rule, norm in cases:
        got = w.clone()
        rule.project_(got)
        torch.testing.assert_close(got, w * (norm / (5 + 1e-7)), rtol=1e-15, atol=0, msg=repr(rule))


def test_after_projection_the_constraint_holds():
    torch.manual_seed(2)
    w = torch.randn(20, 7) * torch.logspace(-3, 2, 20)[:, None]
    for rule, check in [
        (MaxNorm(1.0), lambda n: (n <= 1.0).all()),
        (UnitNorm(), lambda n: torch.allclose(n, torch.ones(20), atol=1e-4)),  # 1 - 1e-7 / n_0: n_0 >= 1e-3
        (MinMaxNorm(0.5, 2.0), lambda n: ((n >= 0.5 - 1e-4) & (n <= 2.0)).all()),
    ]:
        got = w.clone()
        rule.project_(got)
        assert check(torch.linalg.vector_norm(got, dim=1)), rule
    got = w.clone()
    NonNeg().project_(got)
    assert (got >= 0).all() and torch.equal(got, torch.where(w >= 0, w, 0))
    assert not torch.signbit(got).any()  # +0.0, as Keras 3's maximum(w, 0)


def test_feasible_weight_moves_by_keras_epsilon_only():
    w = torch.tensor([[0.6, 0.8]], dtype=torch.float64)  # norm 1 <= 2
    got = w.clone()
    MaxNorm(2.0).project_(got)
    torch.testing.assert_close(got, w / (1 + 1e-7), rtol=1e-15, atol=0)
    assert not torch.equal(got, w)  # Keras' epsilon is in the denominator, feasible or not


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16bit_parameters_use_float32_norms(dtype):
    torch.manual_seed(3)
    w = (torch.randn(6, 50) * 40).to(dtype)  # sum of squares beyond float16's range
    want = torch.from_numpy(keras_max_norm(w.float().numpy().T, 1.0, axis=0).T)
    got = w.clone()
    MaxNorm(1.0).project_(got)
    assert got.dtype == dtype and torch.isfinite(got).all()
    torch.testing.assert_close(got.float(), want, rtol=1e-2, atol=1e-3)


def test_complex_norm_constraints_use_the_modulus():
    w = torch.tensor([[3 + 4j, 0j]], dtype=torch.complex128)
    MaxNorm(1.0).project_(w)
    torch.testing.assert_close(w, torch.tensor([[0.6 + 0.8j, 0j]], dtype=torch.complex128) * (5 / (5 + 1e-7)))
    with pytest.raises(TypeError, match="complex"):
        NonNeg()._check_param("w", w)


def test_coupled_dims():
    w = torch.zeros(3, 4, 5)
    assert MaxNorm(1.0)._coupled_dims(w) == (1, 2)
    assert UnitNorm(dim=-1)._coupled_dims(w) == (0, 1)
    assert MinMaxNorm(dim=None)._coupled_dims(w) == (0, 1, 2)
    assert NonNeg()._coupled_dims(w) == ()


# -- options: validation, repr, copy ---------------------------------------------------------------
@pytest.mark.parametrize("make,exc,match", [
    (lambda: MaxNorm("2"), TypeError, "max_value.*'2'"),
    (lambda: MaxNorm(-1.0), ValueError, "max_value.*-1.0"),
    (lambda: MaxNorm(float("inf")), ValueError, "max_value.*inf"),
    (lambda: MaxNorm(float("nan")), ValueError, "max_value.*nan"),
    (lambda: MaxNorm(1.0, dim=1.0), TypeError, "dim.*1.0"),
    (lambda: MaxNorm(1.0, dim=True), TypeError, "dim.*True"),
    (lambda: MaxNorm(1.0, params=3), TypeError, "params.*3"),
    (lambda: UnitNorm(dim="0"), TypeError, "dim.*'0'"),
    (lambda: MinMaxNorm(2.0, 1.0), ValueError, "min_value=2.0 > max_value=1.0"),
    (lambda: MinMaxNorm(-1.0, 1.0), ValueError, "min_value.*-1.0"),
    (lambda: MinMaxNorm(0.0, None), TypeError, "max_value.*None"),
    (lambda: MinMaxNorm(rate=1.5), ValueError, r"rate.*\[0, 1\].*1.5"),
    (lambda: MinMaxNorm(rate=-0.1), ValueError, "rate.*-0.1"),
    (lambda: NonNeg(params=[]), TypeError, "params"),
])
def test_bad_options(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


def test_options_are_validated_when_changed():
    rule = MinMaxNorm(0.5, 1.0)
    with pytest.raises(ValueError, match="min_value must be at most max_value=1.0, got 2.0"):
        rule.min_value = 2.0
    with pytest.raises(ValueError, match="max_value must be at least min_value=0.5, got 0.1"):
        rule.max_value = 0.1
    with pytest.raises(ValueError, match="rate"):
        rule.rate = 2
    assert (rule.min_value, rule.max_value, rule.rate) == (0.5, 1.0, 1.0)  # nothing changed
    rule.max_value = 3.0
    rule.min_value = 2.0
    assert rule._kwargs() == MinMaxNorm(2.0, 3.0)._kwargs()
    m = MaxNorm(1.0)
    with pytest.raises(ValueError):
        m.max_value = -2
    assert m.max_value == 1.0


@pytest.mark.parametrize("rule,name,shape,match", [
    (MaxNorm(1.0, dim=2), "w", (3, 4), r"dim=2 is not one of its dimensions.*\[-2, 1\]"),
    (UnitNorm(dim=-3), "w", (3, 4), "dim=-3"),
    (MinMaxNorm(dim=0), "scale", (), "allowed: dim None"),
])
def test_dim_must_fit_the_parameter(rule, name, shape, match):
    with pytest.raises(ValueError, match=match):
        rule._check_param(name, torch.zeros(shape))
    rule._check_param(name, nn.parameter.UninitializedParameter())  # checked once materialized


def test_repr_copy_pickle():
    rules = [MaxNorm(3.0), MaxNorm(1.0, dim=None, params="*bias"), MinMaxNorm(0.1, 2.0, rate=0.5, dim=-1),
             UnitNorm(dim=1), NonNeg(), NonNeg(params=["a*", "b"])]
    assert [repr(r) for r in rules] == [
        "MaxNorm(max_value=3.0, dim=0)",
        "MaxNorm(max_value=1.0, dim=None, params='*bias')",
        "MinMaxNorm(min_value=0.1, max_value=2.0, rate=0.5, dim=-1)",
        "UnitNorm(dim=1)",
        "NonNeg()",
        "NonNeg(params='a*,b')",
    ]
    for rule in rules:
        for other in (copy.deepcopy(rule), copy.copy(rule), pickle.loads(pickle.dumps(rule))):
            assert other is not rule and type(other) is type(rule)
            assert other._kwargs() == rule._kwargs() and repr(other) == repr(rule)
        assert type(rule)(**rule._kwargs())._kwargs() == rule._kwargs()


def test_base_class_is_not_a_constraint():
    with pytest.raises(TypeError, match="base class"):
        Constraint()


def test_project_keeps_identity_and_works_under_no_grad():
    p = nn.Parameter(torch.randn(3, 4) * 10)
    ptr = p.data_ptr()
    with torch.no_grad():
        MaxNorm(1.0).project_(p)
    assert p.data_ptr() == ptr and p.requires_grad
