"""Exactness: after ``loss.backward()`` every ``.grad`` equals autograd's gradient of
``loss + explicit_penalty(...)`` on a bare deep copy of the model, taken before torchreg was applied.

Conventions checked (see ``tests/reference.py``): L1 penalizes ``l1 * sum|w|``, L2 penalizes
``l2 / 2 * sum w**2`` (``torch.optim`` weight decay), ElasticNet both. Each test names, independently
of torchreg's selection code, which parameters the reference penalizes.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import torchreg
from reference import assert_same_grads, bare_copy, explicit_penalty, grads

KINDS = ("L1", "L2", "ElasticNet")

# More backwards than declared between optimizer steps make torchreg warn (by design); the tests
# that do so on purpose compare gradients and ignore that warning.
ignore_accumulation_warning = pytest.mark.filterwarnings("ignore:torchreg.*backward passes:UserWarning")
pytestmark = pytest.mark.filterwarnings("ignore:LSTM with projections is not supported with oneDNN")


# -- regularizers and their reference penalty ----------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Reg:
    """A regularizer kind with its strengths: the torchreg rule and the reference penalty."""

    kind: str
    l1: float = 0.0
    l2: float = 0.0

    @classmethod
    def of(cls, kind: str, l1: float = 0.1, l2: float = 0.2) -> "Reg":
        """``kind`` with the strengths it uses; the other one is 0."""
        return cls(kind, l1 if kind != "L2" else 0.0, l2 if kind != "L1" else 0.0)

    def rule(self, params: Any = None) -> torchreg.Regularizer:
        if self.kind == "L1":
            return torchreg.L1(self.l1, params=params)
        if self.kind == "L2":
            return torchreg.L2(self.l2, params=params)
        return torchreg.ElasticNet(self.l1, self.l2, params=params)

    def penalty(self, model: nn.Module, names: Sequence[str]) -> Tensor:
        """The explicit penalty on ``model``'s parameters ``names`` (with graph; 0 if none)."""
        if not names:
            return torch.zeros(())
        params = dict(model.named_parameters())
        return explicit_penalty((params[name], self.l1, self.l2) for name in names)


def backward_both(net: nn.Module, ref: nn.Module, loss_fn: Callable[[nn.Module], Tensor], reg: Reg,
                  names: Sequence[str]) -> None:
    """``loss.backward()`` on the regularized ``net``; ``(loss + penalty).backward()`` on ``ref``."""
    loss_fn(net).backward()
    (loss_fn(ref) + reg.penalty(ref, names)).backward()


def assert_identical_grads(model: nn.Module, expected: Dict[str, Optional[Tensor]]) -> None:
    """Every ``.grad`` of ``model`` bitwise equal to ``expected`` (same layout; ``None`` stays ``None``)."""
    got = grads(model)
    assert got.keys() == expected.keys()
    for name, want in expected.items():
        if want is None or got[name] is None:
            assert got[name] is None and want is None, f"{name}: grad {got[name]} vs {want}"
        else:
            assert got[name].layout == want.layout, f"{name}: layout {got[name].layout} vs {want.layout}"
            assert torch.equal(got[name].to_dense(), want.to_dense()), name


def readout(y: Tensor) -> Tensor:
    """A scalar loss with non-trivial gradients for every layer type (BatchNorm included)."""
    return y.pow(2).mean() + y.mean()


# -- the layer table ---------------------------------------------------------------------------------
def rnn_weights(kinds: Sequence[str], layers: int, bidirectional: bool) -> Tuple[str, ...]:
    suffixes = ("", "_reverse") if bidirectional else ("",)
    return tuple(f"weight_{k}_l{i}{s}" for i in range(layers) for s in suffixes for k in kinds)


@dataclasses.dataclass(frozen=True)
class Case:
    """A layer type: how to build and call it, and which parameters the default selection covers."""

    id: str
    make: Callable[[], nn.Module]
    input_shape: Tuple[int, ...]
    regularized: Tuple[str, ...]  # names under the layer, per the documented default selection
    call: Callable[[nn.Module, Tensor], Tensor] = lambda layer, x: layer(x)
    vocab: int = 0  # > 0: the input is a tensor of indices below ``vocab``

    def inputs(self) -> Tensor:
        g = torch.Generator().manual_seed(1)
        if self.vocab:
            return torch.randint(self.vocab, self.input_shape, generator=g)
        return torch.randn(self.input_shape, generator=g)


CASES = [
    Case("Linear", lambda: nn.Linear(5, 3), (4, 5), ("weight",)),
    Case("Conv1d", lambda: nn.Conv1d(3, 4, 3), (2, 3, 7), ("weight",)),
    Case("Conv2d", lambda: nn.Conv2d(2, 3, 3, padding=1), (2, 2, 5, 5), ("weight",)),
    Case("ConvTranspose2d", lambda: nn.ConvTranspose2d(2, 3, 3, stride=2), (2, 2, 4, 4), ("weight",)),
    Case("Embedding", lambda: nn.Embedding(10, 4), (3, 5), ("weight",), vocab=10),
    Case("Embedding-sparse", lambda: nn.Embedding(10, 4, sparse=True), (3, 5), ("weight",), vocab=10),
    Case("LSTM", lambda: nn.LSTM(4, 6, num_layers=2, bidirectional=True, proj_size=3, batch_first=True),
         (2, 5, 4), rnn_weights(("ih", "hh", "hr"), 2, True), call=lambda m, x: m(x)[0]),
    Case("GRU", lambda: nn.GRU(4, 5, num_layers=2, batch_first=True), (2, 5, 4),
         rnn_weights(("ih", "hh"), 2, False), call=lambda m, x: m(x)[0]),
    Case("MultiheadAttention", lambda: nn.MultiheadAttention(8, 2, batch_first=True), (2, 5, 8),
         ("in_proj_weight", "out_proj.weight"), call=lambda m, x: m(x, x, x, need_weights=False)[0]),
    Case("MultiheadAttention-kdim-vdim",
         lambda: nn.MultiheadAttention(8, 2, batch_first=True, kdim=6, vdim=5, add_bias_kv=True), (2, 5, 8),
         ("q_proj_weight", "k_proj_weight", "v_proj_weight", "out_proj.weight"),
         call=lambda m, x: m(x, x[..., :6], x[..., :5])[0]),
    Case("TransformerEncoderLayer",
         lambda: nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True), (2, 5, 8),
         ("self_attn.in_proj_weight", "self_attn.out_proj.weight", "linear1.weight", "linear2.weight")),
    # Normalization layers are excluded by default: only the layer before them is penalized.
    Case("BatchNorm2d", lambda: nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3)), (4, 2, 5, 5),
         ("0.weight",)),
    Case("LayerNorm", lambda: nn.Sequential(nn.Linear(5, 6), nn.LayerNorm(6)), (4, 5), ("0.weight",)),
]
CASE_IDS = [case.id for case in CASES]


class Harness(nn.Module):
    """``layer`` (the regularized unit) and an unregularized elementwise ``gain`` to put before it."""

    def __init__(self, case: Case) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layer = case.make()
        if not case.vocab:
            self.gain = nn.Parameter(1 + 0.1 * torch.randn(case.input_shape))

    def names(self, case: Case) -> Tuple[str, ...]:
        return tuple(f"layer.{name}" for name in case.regularized)


# -- situations: how the layer is used in the forward ------------------------------------------------
def fed_raw_input(case: Case, net: Harness, x: Tensor) -> Tensor:
    """A first layer: its input does not require grad."""
    return readout(case.call(net.layer, x))


def fed_input_requiring_grad(case: Case, net: Harness, x: Tensor) -> Tensor:
    """A middle layer: its input comes from a parameter."""
    return readout(case.call(net.layer, x * net.gain))


def followed_by_inplace_ops(case: Case, net: Harness, x: Tensor) -> Tensor:
    y = case.call(net.layer, x)
    y += 0.5
    return readout(nn.ReLU(inplace=True)(y))


def called_three_times(case: Case, net: Harness, x: Tensor) -> Tensor:
    """Weight sharing within one forward: the penalty still counts once."""
    return sum(readout(case.call(net.layer, xi)) for xi in (x, x.flip(0), x.roll(1, 0)))


SITUATIONS = (fed_raw_input, fed_input_requiring_grad, followed_by_inplace_ops, called_three_times)
LAYER_SITUATIONS = [
    pytest.param(case, situation, id=f"{case.id}-{situation.__name__}")
    for case in CASES
    for situation in SITUATIONS
    if not (case.vocab and situation is fed_input_requiring_grad)  # indices cannot require grad
]


def regularized_harness(case: Case, reg: Reg) -> Tuple[Harness, Harness]:
    """(harness whose layer is regularized by ``reg``, its bare reference copy)."""
    net = Harness(case)
    ref = bare_copy(net)
    reg.rule().apply(net.layer)
    return net, ref


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case, situation", LAYER_SITUATIONS)
def test_layer_gradients_equal_reference(case: Case, situation: Callable, kind: str) -> None:
    reg = Reg.of(kind)
    net, ref = regularized_harness(case, reg)
    x = case.inputs()
    backward_both(net, ref, lambda m: situation(case, m, x), reg, net.names(case))
    assert_same_grads(net, ref)


@pytest.mark.parametrize("set_to_none", [True, False], ids=["set_to_none", "zeroed"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_several_sgd_steps_with_zero_grad(case: Case, set_to_none: bool) -> None:
    reg = Reg.of("ElasticNet")
    net, ref = regularized_harness(case, reg)
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (net, ref)]
    x = case.inputs()
    situation = fed_raw_input if case.vocab else fed_input_requiring_grad
    for _ in range(3):
        for opt in optimizers:
            opt.zero_grad(set_to_none=set_to_none)
        backward_both(net, ref, lambda m: situation(case, m, x), reg, net.names(case))
        assert_same_grads(net, ref)
        for opt in optimizers:
            opt.step()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_zero_strength_gives_exactly_the_bare_gradient(case: Case, kind: str) -> None:
    net, ref = regularized_harness(case, Reg(kind, 0.0, 0.0))
    x = case.inputs()
    for model in (net, ref):
        fed_raw_input(case, model, x).backward()
    assert_identical_grads(net, grads(ref))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_penalty_equals_explicit_formula(case: Case, kind: str) -> None:
    reg = Reg.of(kind)
    net, ref = regularized_harness(case, reg)
    value = torchreg.penalty(net)
    assert value.dim() == 0 and not value.requires_grad
    torch.testing.assert_close(value, reg.penalty(ref, net.names(case)).detach())


def test_penalty_sums_every_regularization_in_the_model() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2))
    ref = bare_copy(net)
    first, second = Reg.of("L1"), Reg.of("ElasticNet", l1=0.3, l2=0.7)
    first.rule().apply(net[0])
    second.rule().apply(net[2])
    torch.testing.assert_close(torchreg.penalty(net),
                               (first.penalty(ref, ["0.weight"]) + second.penalty(ref, ["2.weight"])).detach())


# -- whole-model scenarios: sharing, freezing, skipped parameters, explicit selections --------------
class TwoBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 3)
        self.b = nn.Linear(4, 3)

    def forward(self, x: Tensor, use_b: bool) -> Tensor:
        y = self.a(x)
        return y + self.b(x) if use_b else y


class BiasOnly(nn.Module):
    """Owns a weight its forward never uses."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(3, 3))  # 2-D: a 1-D "weight" is a scale, not selected by default
        self.bias = nn.Parameter(torch.randn(3))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.bias


class ComplexGain(nn.Module):
    """A complex parameter used in a real-valued output."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 4, dtype=torch.complex64))  # 2-D, as a default weight

    def forward(self, x: Tensor) -> Tensor:
        return (x.to(self.weight.dtype) @ self.weight).abs()


class TiedEmbedding(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, idx: Tensor) -> Tensor:
        return self.head(torch.tanh(self.embed(idx)))


def mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))


def reused_in_sequential() -> nn.Sequential:
    shared = nn.Linear(4, 4)
    return nn.Sequential(shared, nn.Tanh(), shared)


def freeze(model: nn.Module, *names: str, requires_grad: bool = False) -> nn.Module:
    for name in names:
        model.get_parameter(name).requires_grad_(requires_grad)
    return model


def unfreeze(model: nn.Module, *names: str) -> nn.Module:
    return freeze(model, *names, requires_grad=True)


def rnn_loop(cell: nn.Module, x: Tensor) -> Tensor:
    h = x
    for _ in range(4):
        h = torch.tanh(cell(h) + x)
    return readout(h)


X4 = torch.randn(3, 4, generator=torch.Generator().manual_seed(2))
IDX = torch.randint(10, (3, 5), generator=torch.Generator().manual_seed(3))
IMAGES = torch.randn(4, 3, 2, 2, generator=torch.Generator().manual_seed(4))


@dataclasses.dataclass(frozen=True)
class Scenario:
    id: str
    make: Callable[[], nn.Module]
    loss: Callable[[nn.Module], Tensor]
    penalized: Tuple[str, ...]  # parameters the reference penalizes
    unit: str = ""  # submodule given to torchreg
    params: Any = None  # torchreg selection
    after_apply: Optional[Callable[[nn.Module], Any]] = None  # done to both models after applying


SCENARIOS = [
    # (4) called several times in one forward: the penalty counts once.
    Scenario("rnn-style-loop", lambda: nn.Linear(4, 4), lambda m: rnn_loop(m, X4), ("weight",)),
    Scenario("module-reused-in-sequential", reused_in_sequential, lambda m: readout(m(X4)), ("0.weight",)),
    Scenario("tied-embedding-and-head", TiedEmbedding, lambda m: readout(m(IDX)), ("embed.weight",)),
    # (5) frozen parameters are left alone; parameters the forward skipped still get the penalty.
    Scenario("frozen-before-apply", lambda: freeze(mlp(), "0.weight"), lambda m: readout(m(X4)),
             ("0.weight", "2.weight")),
    Scenario("frozen-after-apply", mlp, lambda m: readout(m(X4)), ("0.weight", "2.weight"),
             after_apply=lambda m: freeze(m, "0.weight", "2.bias")),
    Scenario("unfrozen-after-apply", lambda: freeze(mlp(), "0.weight"), lambda m: readout(m(X4)),
             ("0.weight", "2.weight"), after_apply=lambda m: unfreeze(m, "0.weight")),
    Scenario("skipped-branch-of-unit", TwoBranch, lambda m: readout(m(X4, use_b=False)),
             ("a.weight", "b.weight")),
    Scenario("skipped-branch-of-unit-frozen", lambda: freeze(TwoBranch(), "b.weight"),
             lambda m: readout(m(X4, use_b=False)), ("a.weight", "b.weight")),
    Scenario("unit-not-in-backward", TwoBranch, lambda m: readout(m(X4, use_b=False)), (), unit="b"),
    Scenario("only-unregularized-param-in-backward", BiasOnly, lambda m: readout(m(X4[:, :3])), ()),
    # Parameters of other kinds.
    Scenario("complex-parameter", ComplexGain, lambda m: readout(m(X4)), ("weight",)),
    Scenario("embedding-sparse-reused", lambda: nn.Embedding(10, 4, sparse=True),
             lambda m: readout(m(IDX)) + readout(m(IDX[:1])), ("weight",)),
    # Normalization layers selected explicitly with params=.
    Scenario("BatchNorm2d-params-star", lambda: nn.BatchNorm2d(3),
             lambda m: readout(m(IMAGES)), ("weight", "bias"), params="*"),
    Scenario("LayerNorm-params-predicate", lambda: nn.LayerNorm(4), lambda m: readout(m(X4)), ("weight",),
             params=lambda name, p: name == "weight"),
    Scenario("norm-in-sequential-params-pattern", lambda: nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)),
             lambda m: readout(m(X4)), ("1.weight",), params="1.weight"),
]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.id for s in SCENARIOS])
def test_scenario_gradients_equal_reference(scenario: Scenario, kind: str) -> None:
    reg = Reg.of(kind)
    torch.manual_seed(0)
    net = scenario.make()
    ref = bare_copy(net)
    reg.rule(params=scenario.params).apply(net.get_submodule(scenario.unit))
    if scenario.after_apply is not None:
        scenario.after_apply(net)
        scenario.after_apply(ref)
    backward_both(net, ref, scenario.loss, reg, scenario.penalized)
    assert_same_grads(net, ref)


def test_frozen_parameters_keep_grad_none() -> None:
    net = freeze(mlp(), "0.weight", "2.bias")
    torchreg.L1(net, 0.1)
    readout(net(X4)).backward()
    assert net[0].weight.grad is None and net[2].bias.grad is None


def test_unit_not_in_backward_keeps_earlier_gradient() -> None:
    """A unit the backward does not reach is left alone: a zeroed gradient stays zero."""
    reg = Reg.of("ElasticNet")
    torch.manual_seed(0)
    net = TwoBranch()
    ref = bare_copy(net)
    reg.rule().apply(net.b)
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (net, ref)]
    for use_b, penalized in ((True, ["b.weight"]), (False, [])):
        for opt in optimizers:
            opt.zero_grad(set_to_none=False)
        backward_both(net, ref, lambda m: readout(m(X4, use_b=use_b)), reg, penalized)
        assert_same_grads(net, ref)
        for opt in optimizers:
            opt.step()
    assert torch.equal(net.b.weight.grad, torch.zeros(3, 4))


@pytest.mark.parametrize("kind", KINDS)
def test_zero_strength_leaves_skipped_parameters_alone(kind: str) -> None:
    """A zero penalty gradient creates no gradient: a skipped parameter's ``.grad`` stays None."""
    torch.manual_seed(0)
    net = TwoBranch()
    ref = bare_copy(net)
    Reg(kind, 0.0, 0.0).rule().apply(net)
    for model in (net, ref):
        readout(model(X4, use_b=False)).backward()
    assert_identical_grads(net, grads(ref))


# -- strengths, several backwards, other models, autograd.grad ---------------------------------------
def set_strengths(rule: torchreg.Regularizer, reg: Reg) -> None:
    if reg.kind == "ElasticNet":
        rule.l1, rule.l2 = reg.l1, reg.l2
    else:
        rule.lam = reg.l1 if reg.kind == "L1" else reg.l2


@pytest.mark.parametrize("kind", KINDS)
def test_changed_strength_applies_from_the_next_backward(kind: str) -> None:
    torch.manual_seed(0)
    net = mlp()
    ref = bare_copy(net)
    first, *later = [Reg.of(kind, 0.1, 0.2), Reg.of(kind, 0.5, 0.05), Reg(kind), Reg.of(kind, 0.3, 0.3)]
    rule = first.rule()
    rule.apply(net)
    names = ("0.weight", "2.weight")

    def loss_fn(model: nn.Module) -> Tensor:
        return readout(model(X4))

    backward_both(net, ref, loss_fn, first, names)
    assert_same_grads(net, ref)
    for reg in later:
        net.zero_grad()
        ref.zero_grad()
        set_strengths(rule, reg)
        backward_both(net, ref, loss_fn, reg, names)
        assert_same_grads(net, ref)

    net.zero_grad()
    ref.zero_grad()
    loss = loss_fn(net)
    set_strengths(rule, first)  # after the forward, before its backward
    loss.backward()
    (loss_fn(ref) + first.penalty(ref, names)).backward()
    assert_same_grads(net, ref)


@ignore_accumulation_warning
@pytest.mark.parametrize("kind", KINDS)
def test_backward_through_another_model_leaves_this_one_alone(kind: str) -> None:
    reg = Reg.of(kind)
    torch.manual_seed(0)
    this, other = mlp(), mlp()
    this_ref, other_ref = bare_copy(this), bare_copy(other)
    reg.rule().apply(this)
    torchreg.L2(other, 0.3)

    readout(other(X4)).backward()
    assert all(p.grad is None for p in this.parameters())

    backward_both(this, this_ref, lambda m: readout(m(X4)), reg, ("0.weight", "2.weight"))
    before = grads(this)
    readout(other(X4)).backward()
    assert_identical_grads(this, before)

    for _ in range(2):
        (readout(other_ref(X4)) + Reg.of("L2", l2=0.3).penalty(other_ref, ["0.weight", "2.weight"])).backward()
    assert_same_grads(other, other_ref)


@ignore_accumulation_warning
@pytest.mark.parametrize("retain_graph", [False, True], ids=["two-forwards", "one-forward-retain-graph"])
@pytest.mark.parametrize("kind", KINDS)
def test_each_backward_adds_the_penalty_once(kind: str, retain_graph: bool) -> None:
    reg = Reg.of(kind)
    torch.manual_seed(0)
    net = mlp()
    ref = bare_copy(net)
    reg.rule().apply(net)
    names = ("0.weight", "2.weight")
    if retain_graph:
        losses = [readout(net(X4))] * 2
        ref_losses = [readout(ref(X4)) + reg.penalty(ref, names)] * 2
    else:
        losses = [readout(net(X4)), readout(net(X4.flip(0) * 2))]
        ref_losses = [readout(ref(x)) + reg.penalty(ref, names) for x in (X4, X4.flip(0) * 2)]
    for loss, ref_loss in zip(losses, ref_losses):
        loss.backward(retain_graph=retain_graph)
        ref_loss.backward(retain_graph=retain_graph)
        assert_same_grads(net, ref)


@ignore_accumulation_warning
@pytest.mark.parametrize("populated", [False, True], ids=["grads-none", "grads-populated"])
def test_autograd_grad_leaves_grad_untouched(populated: bool) -> None:
    reg = Reg.of("ElasticNet")
    torch.manual_seed(0)
    net = TwoBranch()  # its branch b is skipped: the end-of-backward step must not run either
    ref = bare_copy(net)
    reg.rule().apply(net)
    names = ("a.weight", "b.weight")

    def loss_fn(model: nn.Module) -> Tensor:
        return readout(model(X4, use_b=False))

    if populated:
        backward_both(net, ref, loss_fn, reg, names)
    before = grads(net)

    x = X4.clone().requires_grad_()
    torch.autograd.grad(readout(net(x, use_b=False)), [net.a.weight, net.a.bias, x])
    torch.autograd.grad(readout(net(x, use_b=True)), [x])
    assert_identical_grads(net, before)

    backward_both(net, ref, loss_fn, reg, names)  # and the next backward is still exact
    assert_same_grads(net, ref)


# -- L2 equals torch.optim weight decay over a whole trajectory ---------------------------------------
LAM = 0.05
OPTIMIZERS = {
    "SGD": lambda params, wd: torch.optim.SGD(params, lr=0.1, weight_decay=wd),
    "SGD-momentum": lambda params, wd: torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=wd),
    "SGD-nesterov": lambda params, wd: torch.optim.SGD(params, lr=0.1, momentum=0.9, nesterov=True,
                                                        weight_decay=wd),
    "Adam": lambda params, wd: torch.optim.Adam(params, lr=0.01, weight_decay=wd),
}


def decayed_groups(model: nn.Module, decayed: Sequence[str]) -> list:
    named = dict(model.named_parameters())
    return [{"params": [named[n] for n in named if n in decayed], "weight_decay": LAM},
            {"params": [named[n] for n in named if n not in decayed], "weight_decay": 0.0}]


@pytest.mark.parametrize("selection", ["all-params", "weights-vs-param-groups"])
@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_l2_trajectory_equals_optimizer_weight_decay(optimizer: str, selection: str) -> None:
    make_optimizer = OPTIMIZERS[optimizer]
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 2))
    ref = bare_copy(net)
    if selection == "all-params":
        torchreg.L2(net, LAM, params="*")
        ref_opt = make_optimizer(ref.parameters(), LAM)
    else:  # the default selection decays the Linear weights only
        torchreg.L2(net, LAM)
        ref_opt = make_optimizer(decayed_groups(ref, ("0.weight", "3.weight")), 0.0)  # groups decide
    opt = make_optimizer(net.parameters(), 0.0)
    g = torch.Generator().manual_seed(4)
    x, target = torch.randn(16, 6, generator=g), torch.randn(16, 2, generator=g)
    for _ in range(20):
        for model, o in ((net, opt), (ref, ref_opt)):
            o.zero_grad()
            nn.functional.mse_loss(model(x), target).backward()
            o.step()
        for (name, p), q in zip(net.named_parameters(), ref.parameters()):
            torch.testing.assert_close(p, q, msg=lambda m: f"{name}: {m}")


# -- random shapes and strengths ----------------------------------------------------------------------
@settings(max_examples=30, deadline=None)
@given(
    kind=st.sampled_from(KINDS),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    conv=st.booleans(),
    batch=st.integers(1, 4),
    n_in=st.integers(1, 6),
    n_out=st.integers(1, 6),
    l1=st.floats(0.0, 10.0),
    l2=st.floats(0.0, 10.0),
    seed=st.integers(0, 2**16),
)
def test_random_shapes_and_strengths(kind, dtype, conv, batch, n_in, n_out, l1, l2, seed) -> None:
    reg = Reg.of(kind, l1, l2)
    torch.manual_seed(seed)
    layer = nn.Conv1d(n_in, n_out, 2) if conv else nn.Linear(n_in, n_out)
    net = nn.Sequential(layer, nn.Tanh()).to(dtype)
    ref = bare_copy(net)
    reg.rule().apply(net[0])
    x = torch.randn((batch, n_in, 3) if conv else (batch, n_in), dtype=dtype)
    backward_both(net, ref, lambda m: readout(m(x)), reg, ["0.weight"])
    assert_same_grads(net, ref)
