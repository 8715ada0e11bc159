"""Activity regularization (``ActivityL1`` / ``ActivityL2``) against the loss reference.

The reference is always the same bare model (a deep copy taken before torchreg is applied) whose
forward hooks add, for each call of the regularized module, the penalty computed on a *clone* of that
call's output to a list that is added to the loss; autograd computes the penalty's gradient. The clone
is the "saved output": an in-place change of the output afterwards changes neither its value nor its
gradient path. Penalties are written out here, not taken from torchreg.
"""

from __future__ import annotations

import copy
import datetime
import gc
import os
import pickle
import traceback
import weakref
from typing import Any, Callable, Dict, List, Tuple

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import torchreg
from reference import assert_same_grads, bare_copy, grads
from torchreg import _activity_engine


# ---------------------------------------------------------------------------------------------------
# The reference
# ---------------------------------------------------------------------------------------------------
def ref_penalty(kind: str, lam: float, out: torch.Tensor, batch: int) -> torch.Tensor:
    if kind == "l1":
        return lam * out.abs().sum() / batch
    return lam / 2 * out.pow(2).sum() / batch


class Recorder:
    """Forward hooks on the reference model: each call's penalty, on a clone of its output."""

    def __init__(self) -> None:
        self.terms: List[torch.Tensor] = []

    def watch(self, module: nn.Module, kind: str, lam: float, batch_dim: int = 0) -> None:
        def hook(m: nn.Module, args: Any, out: Any) -> None:
            o = out[0] if isinstance(out, tuple) else out
            if torch.is_grad_enabled() and o.requires_grad:
                self.terms.append(ref_penalty(kind, lam, o.clone(), o.shape[batch_dim]))

        module.register_forward_hook(hook)

    def take(self) -> torch.Tensor:
        total = sum(self.terms, torch.zeros(()))
        self.terms = []
        return total


RULES = {"l1": torchreg.ActivityL1, "l2": torchreg.ActivityL2}


def pair(build: Callable[[], nn.Module], where: Callable[[nn.Module], nn.Module], kind: str, lam: float,
         batch_dim: int = 0) -> Tuple[nn.Module, nn.Module, Recorder]:
    torch.manual_seed(0)
    model = build()
    reference = bare_copy(model)
    rec = Recorder()
    rec.watch(where(reference), kind, lam, batch_dim)
    RULES[kind](where(model), lam)
    return model, reference, rec


def mse(out: Any, y: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(out[0] if isinstance(out, tuple) else out, y)


# ---------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------
class AddOneInPlace(nn.Module):
    """``out = layer(x); out += 1``: the regularized output is changed in place after the forward."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(5, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layer(x)
        out += 1
        return self.head(torch.tanh(out))


class Reused(nn.Module):
    """One layer called three times in a forward (each call penalized)."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(5, 6)
        self.shared = nn.Linear(6, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inp(x))
        for _ in range(3):
            h = torch.tanh(self.shared(h))
        return self.head(h)


class LSTMNet(nn.Module):
    def __init__(self, batch_first: bool) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.lstm = nn.LSTM(5, 6, batch_first=batch_first)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.batch_first:
            x = x.transpose(0, 1)  # x is (batch, time, 5) for both
        out, (h, c) = self.lstm(x)
        return self.head(h[-1] + out.mean(0 if not self.batch_first else 1))


def mlp_inplace() -> nn.Module:
    return nn.Sequential(nn.Linear(5, 6), nn.ReLU(inplace=True), nn.Linear(6, 3))


def conv() -> nn.Module:
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 5 * 5, 3))


CASES = {  # id: (build, regularized module, input shape, batch dim of the output)
    "linear": (lambda: nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)), lambda m: m[0], (8, 5), 0),
    "linear-odd-numel": (lambda: nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)), lambda m: m[0], (3, 5), 0),
    "conv2d": (conv, lambda m: m[0], (8, 2, 5, 5), 0),
    "lstm-batch_first=False": (lambda: LSTMNet(False), lambda m: m.lstm, (8, 4, 5), 1),
    "lstm-batch_first=True": (lambda: LSTMNet(True), lambda m: m.lstm, (8, 4, 5), 0),
    "relu-inplace-after": (mlp_inplace, lambda m: m[0], (8, 5), 0),
    "out+=1-after": (AddOneInPlace, lambda m: m.layer, (8, 5), 0),
    "called-3-times": (Reused, lambda m: m.shared, (8, 5), 0),
    "relu-output": (lambda: nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 3)), lambda m: m[1], (8, 5), 0),
}


def data(shape: Tuple[int, ...], seed: int) -> Tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g), torch.randn(shape[0], 3, generator=g)


@pytest.mark.parametrize("kind", ["l1", "l2"])
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_matches_loss_reference(case: str, kind: str) -> None:
    """Three SGD steps; every gradient equal to the reference's (input without requires_grad)."""
    build, where, shape, batch_dim = CASES[case]
    model, reference, rec = pair(build, where, kind, lam=0.3, batch_dim=batch_dim)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    for step in range(3):
        x, y = data(shape, step)
        opt.zero_grad()
        ref_opt.zero_grad()
        mse(model(x), y).backward()
        (mse(reference(x), y) + rec.take()).backward()
        assert_same_grads(model, reference)
        opt.step()
        ref_opt.step()
    if case == "called-3-times":  # the term of each call counts: one call penalized would differ
        model.zero_grad()
        reference.zero_grad()
        x, y = data(shape, 9)
        mse(model(x), y).backward()
        mse(reference(x), y).backward()
        terms = rec.take()
        assert len(rec.terms) == 0 and terms.requires_grad
        with pytest.raises(AssertionError):
            assert_same_grads(model, reference)


def test_first_layer_raw_input_and_frozen_first_layer() -> None:
    """A first layer fed data without requires_grad: its output requires grad through its parameters,
    so it is penalized. Frozen, its output requires no grad: nothing to regularize, nothing kept."""
    model, reference, rec = pair(lambda: nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)),
                                 lambda m: m[0], "l1", 0.5)
    x, y = data((8, 5), 0)
    assert not x.requires_grad
    mse(model(x), y).backward()
    (mse(reference(x), y) + rec.take()).backward()
    assert_same_grads(model, reference)
    for m in (model, reference):
        m[0].requires_grad_(False)
        m.zero_grad()
    out = model(x)
    assert not model[0](x).requires_grad
    mse(out, y).backward()
    mse(reference(x), y).backward()
    assert rec.terms == []  # the reference penalty would be a constant: no gradient
    assert_same_grads(model, reference)


# ---------------------------------------------------------------------------------------------------
# Batch size: Keras' first dimension, the batch for batch_first=False, PackedSequence
# ---------------------------------------------------------------------------------------------------
def test_batch_size_rules() -> None:
    lstm_tf, lstm_bf = nn.LSTM(3, 4), nn.LSTM(3, 4, batch_first=True)
    mha = nn.MultiheadAttention(4, 2)
    x = torch.randn(7, 5, 3)  # (time, batch, features) for lstm_tf
    assert _activity_engine.pick_output(lstm_tf, lstm_tf(x))[1] == 5
    assert _activity_engine.pick_output(lstm_bf, lstm_bf(x))[1] == 7
    assert _activity_engine.pick_output(lstm_tf, lstm_tf(torch.randn(7, 3)))[1] == 1  # unbatched
    q = torch.randn(6, 2, 4)
    assert _activity_engine.pick_output(mha, mha(q, q, q))[1] == 2
    out, batch = _activity_engine.pick_output(nn.Linear(1, 1), (torch.ones(4, 2), torch.ones(9)))
    assert batch == 4 and out.shape == (4, 2)
    packed = pack_padded_sequence(torch.randn(7, 5, 3), [7, 6, 4, 2, 1])
    out, batch = _activity_engine.pick_output(lstm_tf, lstm_tf(packed))
    assert batch == 5 and out.shape == (7 + 6 + 4 + 2 + 1, 4)
    with pytest.raises(TypeError, match="returned dict"):
        _activity_engine.pick_output(nn.Linear(1, 1), {"a": torch.ones(1)})


def test_l1_sign_record_round_trip() -> None:
    """ActivityL1 keeps sign(out) as int8; the term it gives back is coef * sign (times the scale)."""
    rule = torchreg.ActivityL1(lam=1.0)
    for n in [1, 7, 8, 9, 15, 16, 17, 1000]:
        out = torch.randn(n)
        out[::3] = 0.0
        saved = rule._save(out.view(1, n))
        assert saved.dtype == torch.int8 and saved.numel() == n
        term = rule._term(torch.zeros(1, n), saved, 0.5, None)
        torch.testing.assert_close(term, 0.5 * torch.sign(out).view(1, n), rtol=0, atol=0)
        scaled = rule._term(torch.ones(1, n), saved, 0.5, torch.tensor(4.0))
        torch.testing.assert_close(scaled, 1 + 2 * torch.sign(out).view(1, n), rtol=0, atol=0)


def test_packed_sequence_lstm_matches_reference() -> None:
    torch.manual_seed(0)
    lstm = nn.LSTM(3, 4)
    reference = bare_copy(lstm)
    torchreg.ActivityL2(lstm, 0.7)
    packed = pack_padded_sequence(torch.randn(7, 5, 3), [7, 6, 4, 2, 1])
    lstm(packed)[0].data.sum().backward()
    out = reference(packed)[0].data
    (out.sum() + 0.7 / 2 * out.pow(2).sum() / 5).backward()
    assert_same_grads(lstm, reference)


# ---------------------------------------------------------------------------------------------------
# What adds nothing and keeps nothing
# ---------------------------------------------------------------------------------------------------
class SaveSpy:
    """Wraps ``rule._save`` to keep a weak reference to each record it makes."""

    def __init__(self, rule: Any) -> None:
        self.refs: List[weakref.ref] = []
        original = rule._save

        def spy(out: torch.Tensor) -> torch.Tensor:
            saved = original(out)
            self.refs.append(weakref.ref(saved))
            return saved

        rule._save = spy

    def alive(self) -> int:
        gc.collect()
        return sum(r() is not None for r in self.refs)


def spied_mlp(kind: str = "l1") -> Tuple[nn.Module, SaveSpy]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 3))
    rule = RULES[kind](lam=0.5)
    torchreg.apply_regularization(model, {nn.ReLU: rule})
    return model, SaveSpy(rule)


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_no_grad_forward_registers_and_keeps_nothing(mode: str) -> None:
    model, spy = spied_mlp()
    x, _ = data((4, 5), 0)
    with getattr(torch, mode)():
        model(x)
    assert spy.refs == []


@pytest.mark.parametrize("kind", ["l1", "l2"])
def test_records_freed_after_backward_and_with_dropped_graph(kind: str) -> None:
    model, spy = spied_mlp(kind)
    reference = bare_copy(model)
    torchreg.remove_regularization(reference)
    x, y = data((4, 5), 0)
    _ = model(x)  # thrown away: no term, and its record goes with its graph
    del _
    assert spy.alive() == 0
    loss = mse(model(x), y)
    assert spy.alive() == 1
    loss.backward(retain_graph=True)
    assert spy.alive() == 0  # used: dropped at once although the graph is kept
    # the thrown-away output added nothing: only the second call's term is in the gradients
    h = reference[1](reference[0](x))
    (mse(reference[2](h), y) + ref_penalty(kind, 0.5, h, 4)).backward()
    assert_same_grads(model, reference)
    # A second backward through the retained graph adds the term no more (it was added once).
    model.zero_grad()
    reference.zero_grad()
    loss.backward()
    mse(reference(x), y).backward()
    assert_same_grads(model, reference)


@pytest.mark.parametrize("backward", [True, False])
def test_dropped_model_is_freed(backward: bool) -> None:
    m = torchreg.ActivityL1(nn.Linear(8, 8), 1e-3)
    out = m(torch.randn(2, 8))
    if backward:
        out.sum().backward()
    del out
    w = weakref.ref(m.weight)
    unit = weakref.ref(m._torchreg_activity)
    del m
    gc.collect()
    assert w() is None and unit() is None


# ---------------------------------------------------------------------------------------------------
# Training loops: accumulation, GradScaler, torch.compile, autograd.grad
# ---------------------------------------------------------------------------------------------------
def mixed_pair(seed: int = 0) -> Tuple[nn.Module, nn.Module, Recorder]:
    """Activity L1 on the ReLU and L2 on the last Linear's output, L2 weights on every Linear."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 3))
    reference = bare_copy(model)
    rec = Recorder()
    rec.watch(reference[1], "l1", 0.2)
    rec.watch(reference[4], "l2", 0.3)
    torchreg.apply_regularization(model, {
        nn.ReLU: torchreg.ActivityL1(lam=0.2),
        nn.Linear: torchreg.L2(lam=0.1),
        "4": torchreg.ActivityL2(lam=0.3),
    })
    return model, reference, rec


def weight_penalty(reference: nn.Module) -> torch.Tensor:
    return sum(0.1 / 2 * m.weight.pow(2).sum() for m in reference if isinstance(m, nn.Linear))


@pytest.mark.parametrize("k", [2, 4])
def test_accumulation_matches_full_batch(k: int) -> None:
    model, reference, rec = mixed_pair()
    torchreg.configure(model, accumulation_steps=k)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    for step in range(2):
        x, y = data((8, 5), step)
        opt.zero_grad()
        ref_opt.zero_grad()
        for xi, yi in zip(x.chunk(k), y.chunk(k)):
            (mse(model(xi), yi) / k).backward()
        (mse(reference(x), y) + rec.take() + weight_penalty(reference)).backward()
        assert_same_grads(model, reference)
        opt.step()
        ref_opt.step()


def test_grad_scaler_matches_after_unscale() -> None:
    model, reference, rec = mixed_pair()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1)
    torchreg.configure(model, grad_scaler=scaler)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    for step in range(3):
        x, y = data((8, 5), step)
        opt.zero_grad()
        ref_opt.zero_grad()
        scaler.scale(mse(model(x), y)).backward()
        scaler.unscale_(opt)
        (mse(reference(x), y) + rec.take() + weight_penalty(reference)).backward()
        assert_same_grads(model, reference)
        scaler.step(opt)
        scaler.update()
        ref_opt.step()
    assert scaler.get_scale() > 2.0**10  # the scale changed between steps: read at each backward


@pytest.fixture
def dynamo_reset():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_matches_reference(backend: str, dynamo_reset: None) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(inplace=True), nn.Linear(8, 3))
    reference = bare_copy(model)
    rec = Recorder()
    rec.watch(reference[0], "l1", 0.2)
    torchreg.ActivityL1(model[0], 0.2)
    torchreg.L2(model[2], 0.1)
    compiled = torch.compile(model, backend=backend)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    for step in range(3):
        x, y = data((8, 5), step)
        opt.zero_grad()
        ref_opt.zero_grad()
        mse(compiled(x), y).backward()
        (mse(reference(x), y) + rec.take() + 0.1 / 2 * reference[2].weight.pow(2).sum()).backward()
        assert_same_grads(model, reference)
        opt.step()
        ref_opt.step()
    # the factors are read at backward, also for hooks registered by the compiled forward
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    torchreg.configure(model, accumulation_steps=2, grad_scaler=scaler)
    opt.zero_grad()
    ref_opt.zero_grad()
    x, y = data((8, 5), 7)
    for xi, yi in zip(x.chunk(2), y.chunk(2)):
        scaler.scale(mse(compiled(xi), yi) / 2).backward()
    scaler.unscale_(opt)
    (mse(reference(x), y) + rec.take() + 0.1 / 2 * reference[2].weight.pow(2).sum()).backward()
    assert_same_grads(model, reference)


def test_torch_compile_no_graph_break(dynamo_reset: None) -> None:
    model, _, _ = mixed_pair()
    explained = torch._dynamo.explain(model)(torch.randn(4, 5))
    assert explained.graph_break_count == 0, explained.break_reasons


def test_autograd_grad_includes_the_term_and_leaves_dot_grad_alone() -> None:
    """``autograd.grad`` through a regularized output includes its term, as autograd.grad of the loss
    reference does (the term is part of the graph's backward); no ``.grad`` changes."""
    model, reference, rec = mixed_pair()
    x, y = data((8, 5), 0)
    params = list(model.parameters())
    got = torch.autograd.grad(mse(model(x), y), params)
    want = torch.autograd.grad(mse(reference(x), y) + rec.take(), list(reference.parameters()))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    assert all(p.grad is None for p in params)


# ---------------------------------------------------------------------------------------------------
# remove_regularization, rules, combination with weight regularizers, summary, configure
# ---------------------------------------------------------------------------------------------------
def test_remove_restores_bare_gradients_also_for_pending_outputs() -> None:
    model, reference, rec = mixed_pair()
    x, y = data((8, 5), 0)
    pending = mse(model(x), y)  # computed before the removal: its backward adds no term either
    torchreg.remove_regularization(model)
    assert not any(isinstance(h, _activity_engine._OutputHook) for m in model.modules()
                   for h in m._forward_hooks.values())
    assert "_torchreg_activity" not in model.__dict__
    pending.backward()
    mse(reference(x), y).backward()
    rec.take()
    assert_same_grads(model, reference)
    model.zero_grad()
    reference.zero_grad()
    mse(model(x), y).backward()
    mse(reference(x), y).backward()
    rec.take()
    assert_same_grads(model, reference)


def test_activity_only_model_summary_configure_remove() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))
    reference = bare_copy(model)
    rec = Recorder()
    rec.watch(reference[1], "l1", 0.2)
    assert torchreg.apply_regularization(model, {nn.ReLU: torchreg.ActivityL1(lam=0.2)}) is model
    assert "_torchreg_unit" not in model.__dict__  # no weight unit for an activity-only rule set
    records = torchreg.summary(model).records
    assert [(r["module"], r["type"], r["regularizer"], r["penalty"]) for r in records] == [
        ("1", "ReLU", "ActivityL1(lam=0.2)", None)]
    assert "ActivityL1(lam=0.2)" in str(torchreg.summary(model))
    assert torchreg.penalty(model).item() == 0.0  # activity terms are not in penalty()
    assert torchreg.configure(model, accumulation_steps=2) is model
    x, y = data((8, 5), 0)
    for xi, yi in zip(x.chunk(2), y.chunk(2)):
        (mse(model(xi), yi) / 2).backward()
    (mse(reference(x), y) + rec.take()).backward()
    assert_same_grads(model, reference)
    assert torchreg.remove_regularization(model) is model
    with pytest.raises(ValueError, match="no torchreg regularization"):
        torchreg.remove_regularization(model)
    with pytest.raises(ValueError, match="nothing in Sequential is regularized"):
        torchreg.configure(model, accumulation_steps=2)


def _weights_then_activity(model: nn.Module) -> None:
    torchreg.apply_regularization(model, {nn.Linear: torchreg.L2(lam=0.1)})
    torchreg.apply_regularization(model, {nn.ReLU: torchreg.ActivityL1(lam=0.2), "4": torchreg.ActivityL2(0.3)})


def _activity_then_weights(model: nn.Module) -> None:
    torchreg.ActivityL2(model[4], 0.3)
    torchreg.ActivityL1(model[1], lam=0.2)
    for i in (0, 2, 4):
        torchreg.L2(model[i], 0.1)


def _same_module_both_orders(model: nn.Module) -> None:
    torchreg.L2(model[0], 0.1)
    torchreg.ActivityL1(model[1], 0.2)
    torchreg.L2(model[2], 0.1)
    torchreg.ActivityL2(model[4], 0.3)  # activity first, then weights, on the same Linear
    torchreg.L2(model[4], 0.1)


def _one_rules_dict_activity_first(model: nn.Module) -> None:
    torchreg.apply_regularization(model, {
        "4": torchreg.ActivityL2(lam=0.3),  # an activity rule does not hide the weight rule below
        nn.ReLU: torchreg.ActivityL1(lam=0.2),
        nn.Linear: torchreg.L2(lam=0.1),
    })


@pytest.mark.parametrize("how", [_weights_then_activity, _activity_then_weights, _same_module_both_orders,
                                 _one_rules_dict_activity_first], ids=lambda f: f.__name__.strip("_"))
def test_combined_with_weight_regularizers(how: Callable[[nn.Module], None]) -> None:
    _, reference, rec = mixed_pair()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 3))
    how(model)
    x, y = data((8, 5), 0)
    mse(model(x), y).backward()
    (mse(reference(x), y) + rec.take() + weight_penalty(reference)).backward()
    assert_same_grads(model, reference)
    kinds = sorted(r["regularizer"] for r in torchreg.summary(model).records)
    assert kinds == ["ActivityL1(lam=0.2)", "ActivityL2(lam=0.3)", "L2(lam=0.1)", "L2(lam=0.1)", "L2(lam=0.1)"]


def test_rules_none_excludes_activity_and_first_activity_rule_wins() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Sequential(nn.ReLU(), nn.ReLU()), nn.Tanh())
    with pytest.warns(UserWarning, match="rule #3 ReLU matched no module; rule #6 Tanh matched no module"):
        torchreg.apply_regularization(model, {
            "2": None,                                  # excludes 2, 2.0 and 2.1 from both kinds
            "1": torchreg.ActivityL2(lam=0.5),          # first activity rule for 1
            nn.ReLU: torchreg.ActivityL1(lam=0.1),      # so this one is first nowhere
            "[03]": torchreg.ActivityL1(lam=0.3),
            nn.Linear: torchreg.L1(lam=0.1),            # weights of 0: the weight rules are matched apart
            nn.Tanh: torchreg.ActivityL2(lam=0.7),      # after 0's activity rule: not for 0
            "3": None,                                  # after 3's activity rule: does not exclude it
        })
    rows = sorted((r["module"], str(r["regularizer"])) for r in torchreg.summary(model).records)
    assert rows == [("0", "ActivityL1(lam=0.3)"), ("0", "L1(lam=0.1)"), ("1", "ActivityL2(lam=0.5)"),
                    ("2", "None"), ("3", "ActivityL1(lam=0.3)"), ("3", "None")]


def test_rule_matching_nothing_warns() -> None:
    with pytest.warns(UserWarning, match="matched no module"):
        torchreg.apply_regularization(nn.Sequential(nn.Linear(2, 2)), {nn.ReLU: torchreg.ActivityL1(lam=0.1)})


# ---------------------------------------------------------------------------------------------------
# Errors, repr, pickling, copies
# ---------------------------------------------------------------------------------------------------
def test_errors_raise_before_changing_anything() -> None:
    layer = torchreg.ActivityL1(nn.Linear(2, 2), 0.1)
    hooks = dict(layer._forward_hooks)
    with pytest.raises(ValueError, match="already has torchreg activity regularization"):
        torchreg.ActivityL2(layer, 0.1)
    assert dict(layer._forward_hooks) == hooks
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    torchreg.ActivityL1(model[1], 0.1)
    with pytest.raises(ValueError, match="already regularized by torchreg"):
        torchreg.apply_regularization(model, {nn.Linear: torchreg.L1(0.1), nn.ReLU: torchreg.ActivityL1(0.1)})
    assert "_torchreg_unit" not in model.__dict__  # the weight rule was not applied either
    with pytest.raises(ValueError, match="enclosing Sequential"):
        outer = torchreg.apply_regularization(nn.Sequential(nn.ReLU()), {nn.ReLU: torchreg.ActivityL1(0.1)})
        torchreg.remove_regularization(outer[0])
    with pytest.raises(ValueError, match="finite real number >= 0"):
        torchreg.ActivityL1(nn.Linear(2, 2), -1.0)
    with pytest.raises(TypeError, match="real number"):
        torchreg.ActivityL2(lam="big")
    with pytest.raises(TypeError, match="instantiate it"):
        torchreg.ActivityL1(nn.Linear, 0.1)
    with pytest.raises(TypeError, match="instantiate it"):
        torchreg.apply_regularization(nn.Linear(2, 2), {nn.Linear: torchreg.ActivityL1})

    class DictOut(nn.Module):
        def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
            return {"y": x * 2}

    with pytest.raises(TypeError, match="returned dict"):
        torchreg.ActivityL1(DictOut(), 0.1)(torch.ones(2, requires_grad=True))


def test_repr_kwargs_pickle() -> None:
    for rule in (torchreg.ActivityL1(lam=0.25), torchreg.ActivityL2(1e-4)):
        assert eval(repr(rule), {"ActivityL1": torchreg.ActivityL1, "ActivityL2": torchreg.ActivityL2}).lam == rule.lam
        assert rule._kwargs() == {"lam": rule.lam}
        copy_ = pickle.loads(pickle.dumps(rule))
        assert type(copy_) is type(rule) and copy_.lam == rule.lam
    assert repr(torchreg.ActivityL1(lam=0.25)) == "ActivityL1(lam=0.25)"


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copies_are_regularized_on_their_own(how: str, tmp_path: Any) -> None:
    model, reference, rec = mixed_pair()
    if how == "deepcopy":
        twin = copy.deepcopy(model)
    else:
        torch.save(model, tmp_path / "m.pt")
        twin = torch.load(tmp_path / "m.pt", weights_only=False)
    torchreg.remove_regularization(model)  # the copy does not depend on the original
    x, y = data((8, 5), 0)
    mse(twin(x), y).backward()
    (mse(reference(x), y) + rec.take() + weight_penalty(reference)).backward()
    assert_same_grads(twin, reference)
    assert twin._torchreg_activity.root is twin


def test_strength_read_at_forward_and_zero_keeps_nothing() -> None:
    model, spy = spied_mlp()
    rule = model._torchreg_activity.entries[0].rule
    rule.lam = 0.0
    x, y = data((4, 5), 0)
    model(x)
    assert spy.refs == []  # lam = 0: nothing saved, nothing added


# ---------------------------------------------------------------------------------------------------
# DistributedDataParallel: 2 gloo processes, against the loss reference under DDP
# ---------------------------------------------------------------------------------------------------
WORLD = 2


def _ddp_worker(rank: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    result: Dict[str, Any] = {}
    try:
        for view in (False, True):
            model, reference, rec = mixed_pair(seed=3)
            wrapped = DDP(model, gradient_as_bucket_view=view)
            ref_wrapped = DDP(reference, gradient_as_bucket_view=view)
            opt = torch.optim.SGD(wrapped.parameters(), lr=0.1)
            ref_opt = torch.optim.SGD(ref_wrapped.parameters(), lr=0.1)
            steps = []
            for step in range(3):
                x, y = data((8, 5), 100 + step)
                x, y = x.chunk(WORLD)[rank], y.chunk(WORLD)[rank]
                opt.zero_grad()
                ref_opt.zero_grad()
                mse(wrapped(x), y).backward()
                (mse(ref_wrapped(x), y) + rec.take() + weight_penalty(reference)).backward()
                steps.append((grads(model), grads(reference)))
                opt.step()
                ref_opt.step()
            result[f"view={view}"] = steps
    except Exception:
        result["error"] = traceback.format_exc()
    finally:
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.destroy_process_group()


def test_ddp_matches_loss_reference_under_ddp(tmp_path: Any) -> None:
    from test_training_loops import spawn_ranks

    results = spawn_ranks(_ddp_worker, tmp_path, WORLD)
    for rank, result in enumerate(results):
        assert "error" not in result, f"rank {rank}:\n{result['error']}"
    # single process on the whole batch: DDP averages each rank's loss-like term as it averages the loss
    single, single_ref, rec = mixed_pair(seed=3)
    single_opt = torch.optim.SGD(single.parameters(), lr=0.1)
    for key in ("view=False", "view=True"):
        for rank in range(WORLD):
            for step, (got, want) in enumerate(results[rank][key]):
                for name in want:
                    torch.testing.assert_close(got[name], want[name], msg=lambda m: f"{key} {step} {name}: {m}")
                    torch.testing.assert_close(got[name], results[0][key][step][0][name])
    for step in range(3):
        x, y = data((8, 5), 100 + step)
        single_opt.zero_grad()
        mse(single(x), y).backward()
        for name, g in grads(single).items():
            torch.testing.assert_close(g, results[0]["view=False"][step][0][name], msg=lambda m: f"{step} {name}: {m}")
        single_opt.step()


@pytest.mark.parametrize("reentrant", [True, False])
def test_activation_checkpointing(reentrant: bool) -> None:
    """Inside ``torch.utils.checkpoint``: the term of each call is added once (reentrant: by the
    recomputed forward, whose backward is nested in the outer one; non-reentrant: by the original)."""
    from torch.utils.checkpoint import checkpoint

    model, reference, rec = mixed_pair()
    torchreg.remove_regularization(model)  # activity only here (the weight engine's checkpointing is
    torchreg.ActivityL1(model[1], 0.2)     # tested with it)
    torchreg.ActivityL2(model[4], 0.3)
    x, y = data((8, 5), 0)
    x.requires_grad_(reentrant)  # the reentrant variant needs an input that requires grad
    h = checkpoint(lambda t: model[3](model[2](model[1](model[0](t)))), x, use_reentrant=reentrant)
    mse(model[4](h), y).backward()
    (mse(reference(x), y) + rec.take()).backward()
    assert_same_grads(model, reference)


def test_leaf_output_is_hooked_through_a_view() -> None:
    """A module returning its input as is (a leaf that requires grad): the term is added, and no hook
    is left on the leaf (one would stay there for good, with its record if never reached)."""
    model = nn.Sequential(nn.Identity(), nn.Linear(5, 3))
    torchreg.ActivityL2(model[0], 0.4)
    x = torch.randn(8, 5, requires_grad=True)
    _ = model(x)  # thrown away
    out = model(x)
    assert not x._backward_hooks
    mse(out, torch.zeros(8, 3)).backward()
    got = x.grad.clone()
    x.grad = None
    reference = bare_copy(model)
    torchreg.remove_regularization(reference)
    (mse(reference(x), torch.zeros(8, 3)) + ref_penalty("l2", 0.4, x, 8)).backward()
    torch.testing.assert_close(got, x.grad)


def test_backward_inputs_subset() -> None:
    """``backward(inputs=[...])`` accumulates the terms' gradients into the given leaves only, as the
    loss reference does."""
    model, reference, rec = mixed_pair()
    torchreg.remove_regularization(model)  # activity only (the weight engine's scope rule gives its
    torchreg.ActivityL1(model[1], 0.2)     # unit's other parameters their terms too)
    torchreg.ActivityL2(model[4], 0.3)
    x, y = data((8, 5), 0)
    chosen, ref_chosen = [model[0].weight, model[2].bias], [reference[0].weight, reference[2].bias]
    mse(model(x), y).backward(inputs=chosen)
    (mse(reference(x), y) + rec.take()).backward(inputs=ref_chosen)
    assert_same_grads(model, reference)
    assert model[4].weight.grad is None


def test_threads_each_call_its_own_term() -> None:
    """Forward/backward passes from several threads on one activity-regularized model: each call's
    record and hook are its own, so the accumulated gradient is the sum of the references'."""
    import threading

    model, reference, rec = mixed_pair()
    torchreg.remove_regularization(model)
    torchreg.ActivityL1(model[1], 0.2)
    torchreg.ActivityL2(model[4], 0.3)
    batches = [data((8, 5), seed) for seed in range(4)]
    barrier = threading.Barrier(len(batches))

    def work(x: torch.Tensor, y: torch.Tensor) -> None:
        barrier.wait()
        for _ in range(3):
            mse(model(x), y).backward()

    threads = [threading.Thread(target=work, args=b) for b in batches]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for x, y in batches:
        for _ in range(3):
            (mse(reference(x), y) + rec.take()).backward()
    assert_same_grads(model, reference)


def test_summary_total_line_counts_activity_regularizations() -> None:
    """The summary's total line says how many activity regularizations there are, not "0 elements" alone."""
    only = torchreg.ActivityL1(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), lam=0.1)
    lines = str(torchreg.summary(only)).splitlines()
    assert lines[-2] == "total: 0 regularized elements, penalty 0; 1 activity regularization (not in the penalty)"
    both = torchreg.apply_regularization(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.ReLU()),
                                         {nn.ReLU: torchreg.ActivityL2(lam=0.1), nn.Linear: torchreg.L2(0.1)})
    assert "16 regularized elements" in str(torchreg.summary(both))
    assert "; 2 activity regularizations (not in the penalty)" in str(torchreg.summary(both))
    weights = torchreg.L2(nn.Linear(4, 4), 0.1)
    assert "activity" not in str(torchreg.summary(weights))
