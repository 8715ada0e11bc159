"""What a new user sees: signatures, reprs, and each message that used to mislead (issue: first day).

Each case checks the message by its text and that nothing changed (the module is left as it was).
"""

from __future__ import annotations

import inspect
import pickle
import warnings
from typing import Any, Callable

import numpy as np
import pytest
import torch
from torch import nn

import torchreg


def layer() -> nn.Linear:
    return nn.Linear(3, 2)


MESSAGES = [
    pytest.param(lambda m: torchreg.L1(m, 1e-4, True), TypeError,
                 "torchreg.L1 takes lam by position after the module, and its other options as keywords; got the "
                 "extra positional argument(s) True. It takes torchreg.L1(module, lam, *, center=None, proximal=False, params=None)",
                 id="proximal-by-position"),
    pytest.param(lambda m: torchreg.L1(1e-4, True), TypeError, "got the extra positional argument(s) True",
                 id="rule-proximal-by-position"),
    pytest.param(lambda m: torchreg.L2(m, 1e-4, proximal=True), TypeError,
                 "torchreg.L2 got an unexpected keyword argument 'proximal' (L2 has no proximal mode); it takes "
                 "torchreg.L2(module, lam, *", id="L2-proximal"),
    pytest.param(lambda m: torchreg.L1(m.weight, 1e-4), TypeError,
                 "torchreg.L1 regularizes the parameters of a module: pass the module that owns this Parameter of "
                 "shape (2, 3), e.g. torchreg.L1(layer, ...), and choose among its parameters with params=",
                 id="a-parameter-instead-of-its-layer"),
    pytest.param(lambda m: torchreg.L1(1e-4)(m), TypeError,
                 "a torchreg rule is not called on a module as a Keras regularizer is: apply it with "
                 "L1(lam=0.0001).apply(module)", id="keras-style-call"),
    pytest.param(lambda m: torchreg.ElasticNet(m, lam=1e-3), TypeError,
                 "torchreg.ElasticNet got an unexpected keyword argument 'lam' (the strengths of ElasticNet are l1= "
                 "and l2=)", id="elasticnet-lam"),
    pytest.param(lambda m: torchreg.L2(torchreg.L1(m, 0.1), 0.1), ValueError,
                 "For an L1 and an L2 penalty on the same parameters use one torchreg.ElasticNet(l1=..., l2=...)",
                 id="twice-suggests-elasticnet"),
    pytest.param(lambda m: torchreg.L2(), TypeError, "torchreg.L2: missing a required argument: 'lam'",
                 id="no-strength"),
]


@pytest.mark.parametrize("call, error, text", MESSAGES)
def test_message(call: Callable[[nn.Module], Any], error: type, text: str) -> None:
    m = layer()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(error) as info:
        call(m)
    assert text in str(info.value)
    assert "_OneStrength" not in str(info.value)
    if "ElasticNet(l1=..." not in text:  # (that case regularized m once on purpose)
        assert not torchreg.is_regularized(m) and not m.weight._post_accumulate_grad_hooks
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())


@pytest.mark.parametrize("cls, text", [
    (torchreg.L1, "(module, lam, *, center=None, proximal=False, params=None)"),
    (torchreg.L2, "(module, lam, *, center=None, importance=None, params=None)"),
    (torchreg.ElasticNet, "(module, l1, l2, *, center=None, proximal=False, params=None)"),
    (torchreg.GroupLasso, "(module, lam, *, dim=0, proximal=False, params=None)"),
    (torchreg.Orthogonal, "(module, lam, *, mode='rows', params=None)"),
    (torchreg.ActivityL1, "(module, lam)"),
])
def test_real_signatures(cls: type, text: str) -> None:
    assert str(inspect.signature(cls)).startswith(text[:-1])


def test_configure_signature_has_no_object_address() -> None:
    text = str(inspect.signature(torchreg.configure))
    assert "object at 0x" not in text and "accumulation_steps" in text and "unchanged" in text


@pytest.mark.parametrize("rule, text", [
    (torchreg.L2(lam=0.1, params=["weight", "bias"]), "L2(lam=0.1, params=['weight', 'bias'])"),
    (torchreg.L2(lam=0.1, params="weight"), "L2(lam=0.1, params='weight')"),
    (torchreg.L1(torch.tensor(1e-3)), "L1(lam=0.001)"),
    (torchreg.L1(np.float32(1e-3)), "L1(lam=0.001)"),
    (torchreg.ElasticNet(np.float64(0.1), torch.tensor(0.2, dtype=torch.float64)),
     "ElasticNet(l1=0.1, l2=0.2)"),
])
def test_reprs_round_trip(rule: torchreg.Regularizer, text: str) -> None:
    assert repr(rule) == text
    rebuilt = eval(text, {"L1": torchreg.L1, "L2": torchreg.L2, "ElasticNet": torchreg.ElasticNet})
    assert repr(rebuilt) == text and rebuilt.params == rule.params
    assert rebuilt._strength_values() == rule._strength_values()


def test_a_predicate_repr_says_plainly_it_is_not_code() -> None:
    def biases(name: str, p: nn.Parameter) -> bool:
        return name.endswith("bias")

    assert repr(torchreg.L1(1e-3, params=biases)) == "L1(lam=0.001, params=<predicate biases>)"
    with pytest.raises(SyntaxError):
        eval(repr(torchreg.L1(1e-3, params=biases)))


def test_a_float32_strength_keeps_its_float32_value() -> None:
    rule = torchreg.L1(torch.tensor(1e-3))
    assert torch.tensor(rule.lam, dtype=torch.float32) == torch.tensor(1e-3)
    assert pickle.loads(pickle.dumps(rule)).lam == rule.lam == 1e-3


def test_summary_lists_activity_rows_in_module_order() -> None:
    model = torchreg.apply_regularization(
        nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2), nn.Tanh()),
        {(nn.ReLU, nn.Tanh): torchreg.ActivityL1(0.1), nn.Linear: torchreg.L2(0.1)})
    assert [r["module"] for r in torchreg.summary(model).records] == ["0", "1", "2", "3"]


# -- an L2 penalty and the optimizer's own weight decay ---------------------------------------------
def train_one_step(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()


@pytest.mark.parametrize("rule, make_opt, warns", [
    (torchreg.L2(0.1), lambda p: torch.optim.SGD(p, lr=0.1, weight_decay=0.01), True),
    (torchreg.L2(0.1), lambda p: torch.optim.AdamW(p, lr=0.1), True),  # AdamW's default weight_decay=0.01
    (torchreg.ElasticNet(0.1, 0.1), lambda p: torch.optim.SGD(p, lr=0.1, weight_decay=0.01), True),
    (torchreg.ElasticNet(0.1, 0.0), lambda p: torch.optim.SGD(p, lr=0.1, weight_decay=0.01), False),
    (torchreg.L1(0.1), lambda p: torch.optim.SGD(p, lr=0.1, weight_decay=0.01), False),
    (torchreg.L2(0.1), lambda p: torch.optim.SGD(p, lr=0.1), False),
], ids=["sgd-wd", "adamw-default", "elasticnet-l2", "elasticnet-l1-only", "l1", "no-wd"])
def test_l2_and_optimizer_weight_decay_warn_once(rule: Any, make_opt: Callable, warns: bool) -> None:
    model = rule.apply(nn.Sequential(nn.Linear(3, 2)))
    opt = make_opt(model.parameters())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train_one_step(model, opt)
        train_one_step(model, opt)
    texts = [str(w.message) for w in caught if "decayed twice" in str(w.message)]
    assert len(texts) == (1 if warns else 0), texts
    if warns:
        assert "1 parameter(s) of Sequential (0.weight) have an L2 penalty from torchreg and weight_decay=0.01" \
            in texts[0] and "TrainingArguments(weight_decay=...)" in texts[0]


def test_param_groups_keep_the_optimizer_decay_off_the_regularized_weights() -> None:
    model = torchreg.L2(nn.Sequential(nn.Linear(3, 2)), 0.1)
    opt = torch.optim.AdamW(torchreg.param_groups(model, 0.0), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train_one_step(model, opt)


# -- the warnings say what to do in the framework that runs the loop --------------------------------
def test_advice_is_plain_pytorch_outside_any_framework() -> None:
    from torchreg._guards import advice

    assert advice("accumulation_steps=k") == \
        "Declare it once before training: torchreg.configure(model, accumulation_steps=k)."


@pytest.mark.parametrize("module_name, text", [
    ("lightning.pytorch.loops.fit_loop", "add torchreg.lightning.Regularization() to Trainer(callbacks=[...])"),
    ("pytorch_lightning.loops", "torchreg.lightning.Regularization()"),
    ("transformers.trainer", "call torchreg.hf.attach(trainer)"),
    ("accelerate.accelerator", "accumulation_steps=accelerator.gradient_accumulation_steps"),
])
def test_advice_names_the_framework_on_the_stack(module_name: str, text: str) -> None:
    from torchreg._guards import advice

    namespace = {"__name__": module_name, "advice": advice}
    exec("def loop():\n    return advice('accumulation_steps=k')\n", namespace)
    assert text in namespace["loop"]()


def test_the_accumulation_warning_gives_the_advice() -> None:
    model = torchreg.L2(nn.Linear(3, 2), 0.1)
    with pytest.warns(UserWarning, match=r"each added the full penalty gradient\. Declare it once before "
                                         r"training: torchreg\.configure\(model, accumulation_steps=k\)"):
        for _ in range(2):
            model(torch.ones(1, 3)).sum().backward()
