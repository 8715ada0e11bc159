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
from hypothesis import given, settings
from hypothesis import strategies as st
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


@settings(max_examples=40, deadline=None)
@given(shape=st.lists(st.integers(1, 4), min_size=1, max_size=4), data=st.data())
def test_random_shapes_dims_and_options_equal_keras(shape, data):
    ndim = len(shape)
    dim = data.draw(st.one_of(st.none(), st.integers(-ndim, ndim - 1)), label="dim")
    low = data.draw(st.floats(0, 3), label="min_value")
    high = low + data.draw(st.floats(0, 3), label="width")
    rate = data.draw(st.floats(0, 1), label="rate")
    scale = data.draw(st.sampled_from([0.0, 1e-3, 1.0, 50.0]), label="scale")
    w = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(len(shape))) * scale
    axis = None if dim is None else tuple(d for d in range(ndim) if d != dim % ndim)
    for rule, keras in [
        (MaxNorm(high, dim=dim), lambda k: keras_max_norm(k, high, axis)),
        (UnitNorm(dim=dim), lambda k: keras_unit_norm(k, axis)),
        (MinMaxNorm(low, high, rate=rate, dim=dim), lambda k: keras_min_max_norm(k, low, high, rate, axis)),
        (NonNeg(), keras_non_neg),
    ]:
        got = w.clone()
        rule.project_(got)
        want = keras(w.numpy())  # (a vector with dim=0: axis=(), numpy reduces nothing: one element per group)
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-12, atol=1e-300, err_msg=repr(rule))


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
        "NonNeg(params=['a*', 'b'])",
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


# == applied after every optimizer step ==============================================================
import torchreg  # noqa: E402
from torchreg import _constraint_unit  # noqa: E402

STEPS = 3


class SignSGD(torch.optim.Optimizer):
    """A user's own optimizer (a torch.optim.Optimizer subclass torchreg knows nothing about)."""

    def __init__(self, params, lr=0.05):
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(torch.sign(p.grad), alpha=-group["lr"])


OPTIMIZERS = {
    "sgd-momentum": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
    "adam": lambda p: torch.optim.Adam(p, lr=0.1),
    "adamw": lambda p: torch.optim.AdamW(p, lr=0.1, weight_decay=0.1),
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=0.05),
    "adagrad": lambda p: torch.optim.Adagrad(p, lr=0.5),
    "lbfgs": lambda p: torch.optim.LBFGS(p, lr=0.5, max_iter=3),
    "user-subclass": lambda p: SignSGD(p),
}

# layer factory, input factory, the default-selected weights -> their LAYOUTS key
LAYERS = {
    "linear": (lambda: nn.Linear(5, 3), lambda: torch.randn(4, 5), {"weight": "linear"}),
    "conv1d": (lambda: nn.Conv1d(2, 3, 3), lambda: torch.randn(4, 2, 6), {"weight": "conv1d"}),
    "conv2d": (lambda: nn.Conv2d(2, 3, (2, 3)), lambda: torch.randn(2, 2, 5, 5), {"weight": "conv2d"}),
    "embedding": (lambda: nn.Embedding(7, 4), lambda: torch.randint(0, 7, (3, 5)), {"weight": "embedding"}),
    "lstm": (lambda: nn.LSTM(3, 4), lambda: torch.randn(5, 2, 3),
             {"weight_ih_l0": "lstm_ih", "weight_hh_l0": "lstm_hh"}),
}

CONSTRAINTS = {
    "MaxNorm": (lambda: torchreg.MaxNorm(1.0), lambda k, axis: keras_max_norm(k, 1.0, axis)),
    "MinMaxNorm": (lambda: torchreg.MinMaxNorm(0.5, 1.0, rate=0.7),
                   lambda k, axis: keras_min_max_norm(k, 0.5, 1.0, 0.7, axis)),
    "UnitNorm": (lambda: torchreg.UnitNorm(), lambda k, axis: keras_unit_norm(k, axis)),
    "NonNeg": (lambda: torchreg.NonNeg(), lambda k, axis: keras_non_neg(k)),
}


def _output(layer, x):
    out = layer(x)
    return out[0] if isinstance(out, tuple) else out


def _train_step(model, opt, x):
    def closure():
        opt.zero_grad()
        loss = (_output(model, x) - 0.3).pow(2).mean()
        loss.backward()
        return loss

    if isinstance(opt, torch.optim.LBFGS):
        opt.step(closure)
    else:
        closure()
        opt.step()


def _keras_project_(model, names, keras):
    """The reference: after the bare model's step, each weight replaced by Keras' constraint of it."""
    with torch.no_grad():
        for name, layout in names.items():
            to_keras, to_torch, axis = LAYOUTS[layout]
            p = model.get_parameter(name)
            p.copy_(torch.from_numpy(np.ascontiguousarray(to_torch(keras(to_keras(p.numpy()), axis)))))


@pytest.mark.parametrize("constraint", list(CONSTRAINTS))
@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
@pytest.mark.parametrize("layer", list(LAYERS))
def test_training_equals_bare_training_with_keras_projection(layer, optimizer, constraint):
    make_layer, make_input, names = LAYERS[layer]
    make_rule, keras = CONSTRAINTS[constraint]
    torch.manual_seed(0)
    model = make_layer().double()
    with torch.no_grad():
        for name in names:
            model.get_parameter(name).mul_(5)  # an infeasible start: norms far above 1
    x = make_input()
    x = x.double() if x.is_floating_point() else x
    reference = copy.deepcopy(model)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert make_rule().apply(model) is model
    assert all(torch.equal(p, start[n]) for n, p in model.named_parameters())  # projected after steps only
    opt, ref_opt = OPTIMIZERS[optimizer](model.parameters()), OPTIMIZERS[optimizer](reference.parameters())
    for step in range(STEPS):
        _train_step(model, opt, x)
        _train_step(reference, ref_opt, x)
        _keras_project_(reference, names, keras)
        for name, p in reference.named_parameters():
            torch.testing.assert_close(model.get_parameter(name), p, rtol=1e-10, atol=1e-12,
                                       msg=lambda m: f"step {step} {name}: {m}")
    for name in names:
        w = model.get_parameter(name).detach()
        if constraint == "NonNeg":
            assert (w >= 0).all()
        elif constraint != "MinMaxNorm":  # (rate=0.7 moves the norms 70% of the way only)
            norms = torch.linalg.vector_norm(w.reshape(w.shape[0], -1) if layer != "embedding" else w, dim=1)
            assert (norms <= 1.0).all(), norms


class Counting(torchreg.Constraint):
    """A user's own constraint (clip to [-c, c]) that counts its projections."""

    _options = _positional = ("c",)

    def __init__(self, c=1.0, *, params=None):
        self.c = float(c)
        self.calls = 0
        self._init_selection(params)

    def project_(self, param):
        self.calls += 1
        param.clamp_(-self.c, self.c)


def _linear(scale=5.0):
    torch.manual_seed(1)
    layer = nn.Linear(4, 3)
    with torch.no_grad():
        layer.weight.mul_(scale)
    return layer


def test_once_per_step_under_accumulation():
    layer = _linear()
    rule = Counting(0.5)
    rule.apply(layer)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        for _ in range(3):  # three micro-batches, one step
            layer(torch.randn(2, 4)).sum().backward()
        opt.step()
    assert rule.calls == 2
    assert layer.weight.abs().max() <= 0.5
    # and the exact value: MaxNorm applied twice differs from once by Keras' epsilon
    a, b = _linear().double(), _linear().double()
    torchreg.MaxNorm(a, 1.0)
    opt_a, opt_b = torch.optim.SGD(a.parameters(), lr=0.1), torch.optim.SGD(b.parameters(), lr=0.1)
    x = torch.randn(2, 4, dtype=torch.float64)
    for model, opt in ((a, opt_a), (b, opt_b)):
        for _ in range(3):
            model(x).sum().backward()
        opt.step()
    _keras_project_(b, {"weight": "linear"}, lambda k, axis: keras_max_norm(k, 1.0, axis))
    torch.testing.assert_close(a.weight, b.weight, rtol=1e-13, atol=0)


def test_no_projection_without_a_gradient_or_outside_the_optimizer():
    layer = _linear()
    rule = Counting(0.5)
    rule.apply(layer)
    other = nn.Linear(2, 2)
    torch.optim.SGD(other.parameters(), lr=0.1).step()  # an optimizer that does not hold the layer
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    opt.step()  # no .grad: torch.optim skipped it, so does the constraint (Keras skips a None gradient)
    assert rule.calls == 0 and layer.weight.abs().max() > 0.5


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
@pytest.mark.parametrize("fused", [False, True])
def test_none_on_a_step_the_grad_scaler_skips(fused, device):
    layer = _linear().to(device)
    rule = Counting(0.5)
    rule.apply(layer)
    opt = torch.optim.Adam(layer.parameters(), lr=0.01, fused=fused)
    scaler = torch.amp.GradScaler(device, init_scale=2.0 ** 8)
    torchreg.configure(layer, grad_scaler=scaler)
    before = layer.weight.detach().clone()
    x = torch.randn(2, 4, device=device)
    x[0, 0] = float("inf")
    scaler.scale(layer(x).sum()).backward()
    scaler.step(opt)  # inf gradients: skipped (non-fused: step() not called; fused: found_inf)
    scaler.update()
    assert rule.calls == 0 and torch.equal(layer.weight, before)
    opt.zero_grad()
    scaler.scale(layer(torch.randn(2, 4, device=device)).sum()).backward()
    scaler.step(opt)
    scaler.update()
    assert rule.calls == 1 and layer.weight.abs().max() <= 0.5


def test_prox_first_then_projection():
    a, b = _linear(1.0).double(), _linear(1.0).double()
    torchreg.MaxNorm(torchreg.L1(a, 0.3, proximal=True), 0.3)
    opt_a, opt_b = torch.optim.SGD(a.parameters(), lr=0.5), torch.optim.SGD(b.parameters(), lr=0.5)
    x = torch.randn(3, 4, dtype=torch.float64) * 0.1
    for _ in range(3):
        for model, opt in ((a, opt_a), (b, opt_b)):
            opt.zero_grad()
            model(x).pow(2).sum().backward()
            opt.step()
        with torch.no_grad():  # prox of L1 with step lr, then Keras' MaxNorm
            b.weight.copy_(torch.sign(b.weight) * (b.weight.abs() - 0.5 * 0.3).clamp(min=0))
        _keras_project_(b, {"weight": "linear"}, lambda k, axis: keras_max_norm(k, 0.3, axis))
        torch.testing.assert_close(a.weight, b.weight, rtol=1e-12, atol=1e-15)
    assert (a.weight == 0).any()  # the prox's exact zeros survive the projection


def test_a_penalty_and_a_constraint_on_one_parameter():
    a, b = _linear().double(), _linear().double()
    assert torchreg.MaxNorm(torchreg.L2(a, 1e-2), 1.0) is a
    opt_a, opt_b = torch.optim.Adam(a.parameters(), lr=0.1), torch.optim.Adam(b.parameters(), lr=0.1)
    x = torch.randn(3, 4, dtype=torch.float64)
    for _ in range(3):
        opt_a.zero_grad()
        a(x).pow(2).sum().backward()
        opt_a.step()
        opt_b.zero_grad()
        (b(x).pow(2).sum() + 1e-2 / 2 * b.weight.pow(2).sum()).backward()
        opt_b.step()
        _keras_project_(b, {"weight": "linear"}, lambda k, axis: keras_max_norm(k, 1.0, axis))
        torch.testing.assert_close(a.weight, b.weight, rtol=1e-10, atol=1e-13)
    # the other order, and through apply_regularization with a tuple
    c = torchreg.L2(torchreg.MaxNorm(_linear(), 1.0), 1e-2)
    d = torchreg.apply_regularization(nn.Sequential(_linear()), {nn.Linear: [torchreg.L2(1e-2), torchreg.MaxNorm(1.0)]})
    for m in (c, d):
        assert torchreg.is_regularized(m)
        assert {type(u).__name__ for u in torchreg._registry.units_in(m)} == {"Unit", "ConstraintUnit"}


def test_apply_regularization_first_rule_of_each_kind():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    torchreg.apply_regularization(model, {
        "2": torchreg.MaxNorm(2.0),                                # constraint only, for module 2
        nn.Linear: (torchreg.L2(1e-3), torchreg.UnitNorm()),      # penalty for both, constraint for 0
        nn.ReLU: torchreg.ActivityL2(1e-3),
    })
    rows = [(r["module"], r["regularizer"]) for r in torchreg.summary(model).records]
    assert rows == [("0", "L2(lam=0.001)"), ("0", "UnitNorm(dim=0)"), ("1", "ActivityL2(lam=0.001)"),
                    ("2", "L2(lam=0.001)"), ("2", "MaxNorm(max_value=2.0, dim=0)")]
    # a None rule excludes every kind when it comes first
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    torchreg.apply_regularization(model, {"0": None, nn.Linear: (torchreg.L2(1e-3), torchreg.NonNeg())})
    assert _constraint_unit.owner_of(model[0].weight) is None and _constraint_unit.owner_of(model[1].weight)


def test_constraint_only_rules_attach_no_penalty_unit():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    torchreg.apply_regularization(model, {"0": None, nn.Linear: torchreg.MaxNorm(1.0)})
    assert [type(u).__name__ for u in _units(model)] == ["ConstraintUnit"]
    records = torchreg.summary(model).records
    assert [(r["module"], r["note"]) for r in records] == [("0", "excluded, with its submodules"),
                                                            ("2", _constraint_unit.NOTE)]
    assert "not covered: none" in str(torchreg.summary(model))  # the excluded one is not "uncovered"
    assert torchreg.configure(model, accumulation_steps=2) is model  # nothing to scale: accepted
    torchreg.L2(model, 1e-3)  # a penalty may still be applied to the same model
    assert len(_units(model)) == 2


def test_summary_remove_and_is_regularized():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    torchreg.NonNeg(model[2], params=["weight", "bias"])
    assert torchreg.is_regularized(model) and torchreg.is_regularized(model[2])
    assert not torchreg.is_regularized(model[0])
    text = str(torchreg.summary(model))
    assert "NonNeg(params=['weight', 'bias'])" in text and _constraint_unit.NOTE in text
    assert "10 constrained elements" in text and "not covered: 1 weight of Linear" in text
    record = torchreg.summary(model).records[0]
    assert record["parameters"] == ["weight", "bias"] and record["penalty"] is None and record["numel"] == 10
    with torch.no_grad():
        model[2].weight.fill_(-1.0)
    assert torchreg.remove_regularization(model) is model
    assert not torchreg.is_regularized(model) and "_torchreg_constraints" not in model[2].__dict__
    model(torch.randn(2, 4)).sum().backward()
    torch.optim.SGD(model.parameters(), lr=0.0).step()
    assert (model[2].weight == -1).all()  # removed: no projection
    with pytest.raises(ValueError, match="no torchreg regularization found"):
        torchreg.remove_regularization(model)


def test_state_dict_deepcopy_and_pickle_are_transparent():
    bare = _linear()
    layer = torchreg.MaxNorm(copy.deepcopy(bare), 0.5)
    assert list(layer.state_dict()) == list(bare.state_dict())
    for copied in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert _constraint_unit.owner_of(copied.weight) is not None
        assert _constraint_unit.owner_of(copied.weight) is not _constraint_unit.owner_of(layer.weight)
        copied(torch.randn(2, 4)).sum().backward()
        torch.optim.SGD(copied.parameters(), lr=0.0).step()
        assert torch.linalg.vector_norm(copied.weight, dim=1).max() <= 0.5 + 1e-6
        assert torch.linalg.vector_norm(layer.weight, dim=1).max() > 0.5  # the original is not stepped
        assert str(torchreg.summary(copied)) == str(torchreg.summary(layer))
    fresh = _linear(1.0)
    fresh.load_state_dict(layer.state_dict())  # a checkpoint loads into a bare model
    saved = {k: v.clone() for k, v in layer.state_dict().items()}
    layer.load_state_dict({k: v * 2 for k, v in saved.items()}, assign=True)  # new parameter objects
    layer(torch.randn(2, 4)).sum().backward()
    torch.optim.SGD(layer.parameters(), lr=0.0).step()
    assert torch.linalg.vector_norm(layer.weight, dim=1).max() <= 0.5 + 1e-6  # the constraint followed them


def test_lazy_module_and_a_parameter_replaced_before_the_first_step():
    lazy = torchreg.MaxNorm(nn.LazyLinear(3), 0.5)
    lazy(torch.randn(2, 6) * 100).sum().backward()
    with torch.no_grad():
        lazy.weight.mul_(100)
    torch.optim.Adam(lazy.parameters(), lr=0.1).step()
    assert torch.linalg.vector_norm(lazy.weight, dim=1).max() <= 0.5 + 1e-6
    bad = torchreg.MaxNorm(nn.LazyLinear(3), 0.5, dim=2)  # checked once the weight has its shape
    bad(torch.randn(2, 6)).sum().backward()
    with pytest.raises(ValueError, match="dim=2"):
        torch.optim.SGD(bad.parameters(), lr=0.1).step()
    # a parameter replaced (to_empty / an assignment) before the first step is followed, silently
    layer = torchreg.MaxNorm(_linear(), 0.5)
    layer.weight = nn.Parameter(layer.weight.detach() * 2)
    layer(torch.randn(2, 4)).sum().backward()
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.optim.SGD(layer.parameters(), lr=0.0).step()
    assert torch.linalg.vector_norm(layer.weight, dim=1).max() <= 0.5 + 1e-6


def _units(module):
    return list(torchreg._registry.units_in(module))


@pytest.mark.parametrize("call,exc,match", [
    (lambda m: torchreg.MaxNorm(torchreg.UnitNorm(m), 2.0), ValueError, "already constrained"),
    (lambda m: torchreg.MaxNorm(m, 2.0, dim=2), ValueError, r"dim=2 is not one of its dimensions"),
    (lambda m: torchreg.MaxNorm(m, 2.0, params="nothing*"), ValueError, "selects no parameter"),
    (lambda m: torchreg.MaxNorm(m, "2"), TypeError, "max_value"),
    (lambda m: torchreg.MaxNorm(None, 2.0), TypeError, "got None"),
    (lambda m: torchreg.MaxNorm(nn.Linear, 2.0), TypeError, "instantiate it"),
    (lambda m: torchreg.UnitNorm(m, dim=1.5), TypeError, "dim"),
    (lambda m: torchreg.Constraint(m), TypeError, "base class"),
    (lambda m: torchreg.apply_regularization(m, {nn.Linear: (torchreg.MaxNorm(1.0), torchreg.UnitNorm())}),
     ValueError, "both constraint rules"),
    (lambda m: torchreg.apply_regularization(m, {nn.Linear: (torchreg.L1(1e-3), torchreg.L2(1e-3))}),
     ValueError, "both penalty rules"),
    (lambda m: torchreg.apply_regularization(m, {nn.Linear: (torchreg.L2(1e-3), "MaxNorm")}), TypeError, "'MaxNorm'"),
    (lambda m: torchreg.apply_regularization(m, {nn.Linear: ()}), ValueError, "empty tuple"),
    (lambda m: torchreg.apply_regularization(m, {nn.Linear: (torchreg.MaxNorm,)}), TypeError, "instantiate it"),
    (lambda m: torchreg.apply_regularization(m, {nn.Linear: (torchreg.L2(1e-3), torchreg.MaxNorm(1.0, dim=5))}),
     ValueError, "dim=5"),
])
def test_bad_input_changes_nothing(call, exc, match):
    model = nn.Sequential(nn.Linear(4, 4))
    if "already constrained" in match:
        torchreg.UnitNorm(model[0])
    before = _units(model)
    with pytest.raises(exc, match=match):
        call(model[0] if "apply_regularization" not in match else model)
    assert _units(model) == before  # nothing attached


def test_a_parameter_constrained_by_an_enclosing_call_is_not_constrained_again():
    model = torchreg.MaxNorm(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)), 1.0)
    with pytest.raises(ValueError, match=r"parameter 'weight' is already constrained .*MaxNorm"):
        torchreg.UnitNorm(model[0])
    assert "_torchreg_constraints" not in model[0].__dict__
    torchreg.L2(model[0], 1e-3)  # a penalty on it is fine
    with pytest.raises(ValueError, match="already regularized"):
        torchreg.L1(model, 1e-3)  # a second penalty is not


def test_kernel_and_bias_constraints_on_one_layer():
    # Keras' Dense(kernel_constraint=MaxNorm(1), bias_constraint=NonNeg())
    layer = torchreg.NonNeg(torchreg.MaxNorm(_linear(), 1.0), params="bias")
    assert len(_units(layer)) == 1
    with torch.no_grad():
        layer.bias.fill_(-1.0)
    for model in (layer, copy.deepcopy(layer)):
        model(torch.randn(2, 4)).sum().backward()
        torch.optim.Adam(model.parameters(), lr=0.01).step()
        assert torch.linalg.vector_norm(model.weight, dim=1).max() <= 1.0 + 1e-6 and (model.bias == 0).all()
    rows = [(r["parameters"], r["regularizer"]) for r in torchreg.summary(layer).records]
    assert rows == [(["weight"], "MaxNorm(max_value=1.0, dim=0)"), (["bias"], "NonNeg(params='bias')")]
    with pytest.raises(ValueError, match="parameter 'bias' is already constrained"):
        torchreg.UnitNorm(layer, dim=None, params="bias")
    assert len(_units(layer)[0].entries) == 2  # nothing added
    torchreg.remove_regularization(layer)
    assert not torchreg.is_regularized(layer)


def test_bad_tuple_through_apply_regularization_changes_nothing():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    torchreg.UnitNorm(model[1])
    with pytest.raises(ValueError, match="already constrained"):  # the penalty part would fit: not applied
        torchreg.apply_regularization(model, {nn.Linear: (torchreg.L2(1e-3), torchreg.MaxNorm(1.0))})
    assert not torchreg.is_regularized(model[0]) and len(_units(model)) == 1
    for value in [(torchreg.L1(1e-3), torchreg.L2(1e-3)), (torchreg.MaxNorm(1.0), torchreg.NonNeg()), (),
                  (torchreg.L2(1e-3), None), (torchreg.L2(1e-3), 3.0)]:
        with pytest.raises((TypeError, ValueError)):
            torchreg.apply_regularization(nn.Linear(2, 2), {nn.Linear: value})
    with pytest.raises(TypeError, match="complex"):
        torchreg.NonNeg(nn.Linear(2, 2, dtype=torch.complex64))


def test_config_round_trip_with_tuples():
    rules = {
        nn.Embedding: None,
        nn.Linear: (torchreg.L2(1e-4), torchreg.MaxNorm(3.0)),
        (nn.Conv1d, nn.Conv2d): [torchreg.UnitNorm(dim=None, params="bias")],
        "head": torchreg.MinMaxNorm(0.5, 2.0, rate=0.25, dim=1),
        nn.ReLU: (torchreg.ActivityL1(1e-3), torchreg.NonNeg(params="*")),
    }
    data = torchreg.rules_to_config(rules)
    assert data[1]["regularizer"] == [{"type": "L2", "lam": 0.0001}, {"type": "MaxNorm", "max_value": 3.0, "dim": 0}]
    assert data[2]["regularizer"] == [{"type": "UnitNorm", "dim": None, "params": ["bias"]}]
    assert data[3]["regularizer"] == {"type": "MinMaxNorm", "min_value": 0.5, "max_value": 2.0, "rate": 0.25,
                                      "dim": 1}
    import json
    back = torchreg.rules_from_config(json.loads(json.dumps(data)))
    assert torchreg.rules_to_config(back) == data
    assert [type(r).__name__ for r in back[nn.Linear]] == ["L2", "MaxNorm"]
    model_a = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Conv1d(4, 4, 1))
    model_b = copy.deepcopy(model_a)
    for model, r in ((model_a, rules), (model_b, back)):
        with pytest.warns(UserWarning, match="matched no module"):
            torchreg.apply_regularization(model, r)
    assert str(torchreg.summary(model_a)) == str(torchreg.summary(model_b))
    with pytest.raises(ValueError, match=r"rules\[0\]\.regularizer\[1\]: a second constraint rule"):
        torchreg.rules_from_config([{"match": {"type": "Linear"},
                                     "regularizer": [{"type": "NonNeg"}, {"type": "UnitNorm"}]}])
    with pytest.raises(ValueError, match=r"rules\[0\]\.regularizer\.max_value"):
        torchreg.rules_from_config([{"match": {"type": "Linear"}, "regularizer": {"type": "MaxNorm", "max_value": -3}}])


def test_dropped_model_is_freed():
    import gc
    import weakref
    layer = torchreg.MaxNorm(_linear(), 1.0)
    ref = weakref.ref(layer)
    del layer
    gc.collect()
    assert ref() is None


# == DDP and FSDP2 (2 gloo processes, one spawn) =====================================================
# The training of tests/test_prox_distributed.py (its model, batches, loop and one-process reference),
# with constraints on weights made infeasible first.
def _infeasible(constrain):
    def regularize(model: nn.Module) -> None:
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(5)
        constrain(model)

    return regularize


def _maxnorm_nonneg(model: nn.Module) -> None:
    torchreg.MaxNorm(model[0], 1.0)
    torchreg.NonNeg(model[2], params=["weight", "bias"])


def _dist_cases():
    from test_prox_distributed import Case

    return [
        Case("ddp-adam-maxnorm-nonneg", _infeasible(_maxnorm_nonneg), lambda p: torch.optim.Adam(p, lr=0.05)),
        Case("ddp-sgd-prox-then-unitnorm", _infeasible(lambda m: torchreg.apply_regularization(
            m, {nn.Linear: (torchreg.L1(0.05, proximal=True), torchreg.UnitNorm())})),
            lambda p: torch.optim.SGD(p, lr=0.2, momentum=0.5)),
        Case("ddp-rmsprop-grad-scaler-skip", _infeasible(lambda m: torchreg.MinMaxNorm(m, 0.5, 1.0, rate=0.5)),
             lambda p: torch.optim.RMSprop(p, lr=0.01), skip_first=True),
        Case("fsdp2-adagrad-rows-within-shards", _infeasible(_maxnorm_nonneg),
             lambda p: torch.optim.Adagrad(p, lr=0.5), fsdp=True),
        # groups across FSDP2's Shard(0): the norms are reduced across the ranks
        Case("fsdp2-columns-across-shards", _infeasible(lambda m: torchreg.MaxNorm(m[0], 1.0, dim=1)),
             lambda p: torch.optim.SGD(p, lr=0.1), fsdp=True),
        Case("fsdp2-unit-and-minmax-whole-model", _infeasible(lambda m: torchreg.apply_regularization(m, {
            "0": torchreg.UnitNorm(dim=1), "2": torchreg.MinMaxNorm(0.5, 1.0, rate=0.5, dim=None)})),
            lambda p: torch.optim.Adam(p, lr=0.05), fsdp=True),
    ]


DIST_CASE_IDS = ["ddp-adam-maxnorm-nonneg", "ddp-sgd-prox-then-unitnorm", "ddp-rmsprop-grad-scaler-skip",
                 "fsdp2-adagrad-rows-within-shards", "fsdp2-columns-across-shards",
                 "fsdp2-unit-and-minmax-whole-model"]


def _run_dist_case(case, rank):
    from test_prox_distributed import run_case

    return run_case(case, rank)


@pytest.fixture(scope="module")
def dist_results(tmp_path_factory):
    from test_training_loops import spawn_cases

    return spawn_cases(__name__, tmp_path_factory.mktemp("constraints_dist"), cases="_dist_cases",
                       run="_run_dist_case")


@pytest.mark.parametrize("case_id", DIST_CASE_IDS)
def test_distributed_ranks_agree_and_match_one_process(case_id, dist_results):
    from test_prox_distributed import build, reference

    case = next(c for c in _dist_cases() if c.id == case_id)
    per_rank = [r[case_id] for r in dist_results]
    for rank, record in enumerate(per_rank):
        assert "crash" not in record, f"rank {rank}:\n{record['crash']}"
        assert record["error"] is None, record["error"]
    for a, b in zip(*(record["params"] for record in per_rank)):
        for name in a:
            assert torch.equal(a[name], b[name]), name  # the same projection on every rank, bit for bit
    for step, (got, want) in enumerate(zip(per_rank[0]["params"], reference(case))):
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6,
                                       msg=lambda m: f"step {step} {name}: {m}")
    final = per_rank[0]["params"][-1]
    if "maxnorm-nonneg" in case_id or "rows-within" in case_id:
        assert torch.linalg.vector_norm(final["0.weight"], dim=1).max() <= 1.0 + 1e-6
        assert (final["2.weight"] >= 0).all() and (final["2.bias"] >= 0).all()
    if case_id == "fsdp2-columns-across-shards":
        assert torch.linalg.vector_norm(final["0.weight"], dim=0).max() <= 1.0 + 1e-6
    if case_id == "ddp-rmsprop-grad-scaler-skip":  # the first step was skipped: no projection either
        start = build()
        _infeasible(lambda m: None)(start)
        assert torch.equal(per_rank[0]["params"][0]["0.weight"], start[0].weight.detach())
