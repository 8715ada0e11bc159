"""Bad inputs raise at the call, with a message naming the bad value or what is allowed, and leave
the model exactly as it was: no hook, no attribute, the same state_dict and the bare gradients."""

from __future__ import annotations

import copy
import functools
import math
import pickle
import warnings
from typing import Any, Callable, Dict, List, Tuple

import pytest
import torch
from torch import Tensor, nn

import torchreg
from reference import bare_copy, grads

X = torch.randn(5, 4, generator=torch.Generator().manual_seed(1))


def make_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3))


class WithIntegerWeight(nn.Module):
    """A float weight, then an integer one that the default selection also picks (``weight_*``)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 3)
        self.pick = nn.Module()
        self.pick.weight_index = nn.Parameter(torch.arange(6).view(2, 3), requires_grad=False)  # 2-D: a "kernel"

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(x)[:, self.pick.weight_index[0]]


# (id, the failing call, exception type, fragments its message must contain)
BAD_CALLS: List[Tuple[str, Callable[[nn.Module], Any], type, Tuple[str, ...]]] = [
    # strengths: a finite real number >= 0
    ("negative-lam", lambda m: torchreg.L1(m, -0.1), ValueError, ("-0.1", ">= 0")),
    ("nan-lam", lambda m: torchreg.L2(m, math.nan), ValueError, ("nan", "finite")),
    ("inf-lam", lambda m: torchreg.L1(m, lam=math.inf), ValueError, ("inf", "finite")),
    ("negative-l1", lambda m: torchreg.ElasticNet(m, -1.0, 0.1), ValueError, ("l1", "-1.0", ">= 0")),
    ("minus-inf-l2", lambda m: torchreg.ElasticNet(m, l1=0.1, l2=-math.inf), ValueError, ("l2", "-inf")),
    ("negative-rule-strength", lambda m: torchreg.L2(-1e-3).apply(m), ValueError, ("-0.001", ">= 0")),
    ("string-lam", lambda m: torchreg.L1(m, "0.1"), TypeError, ("'0.1'", "real number")),
    ("none-lam", lambda m: torchreg.L2(m, lam=None), TypeError, ("None", "real number")),
    ("bool-lam", lambda m: torchreg.L1(m, True), TypeError, ("True", "real number")),
    ("string-l2", lambda m: torchreg.ElasticNet(m, 0.1, "big"), TypeError, ("l2", "'big'")),
    # the module: an nn.Module instance
    ("non-module", lambda m: torchreg.L1("model", 0.1), TypeError, ("'model'", "nn.Module instance")),
    ("non-module-keyword", lambda m: torchreg.L2(module=[m], lam=0.1), TypeError,
     ("(list)", "nn.Module instance")),
    ("non-module-apply", lambda m: torchreg.ElasticNet(0.1, 0.2).apply(42), TypeError,
     ("42 (int)", "nn.Module instance")),
    ("module-class", lambda m: torchreg.L1(nn.Linear, 0.1), TypeError, ("Linear", "instantiate it")),
    ("module-class-apply", lambda m: torchreg.L2(0.1).apply(nn.Sequential), TypeError,
     ("Sequential", "instantiate it")),
    # the selection: must match something, and be a pattern, a list of them or a predicate
    ("pattern-matches-nothing", lambda m: torchreg.L1(m, 0.1, params="conv*"), ValueError,
     ("conv*", "selects no parameter")),
    ("patterns-match-nothing", lambda m: torchreg.L2(m, 0.1, params=["*.scale", "gain"]), ValueError,
     ("gain", "selects no parameter")),
    ("predicate-matches-nothing", lambda m: torchreg.L2(m, 0.1, params=lambda name, p: False), ValueError,
     ("<lambda>", "selects no parameter")),
    ("norm-layer-by-default", lambda m: torchreg.L1(m[1], 0.1), ValueError,
     ("LayerNorm", "selects no parameter")),
    ("params-int", lambda m: torchreg.L1(m, 0.1, params=3), TypeError, ("got 3 (int)", "glob pattern")),
    ("params-empty-list", lambda m: torchreg.L2(m, 0.1, params=[]), TypeError,
     ("got [] (list)", "non-empty list")),
    ("params-list-with-int", lambda m: torchreg.L1(m, 0.1, params=["*.weight", 1]), TypeError,
     ("['*.weight', 1]", "glob pattern")),
    ("params-bytes", lambda m: torchreg.ElasticNet(m, 0.1, 0.1, params=b"weight"), TypeError,
     ("b'weight'", "predicate")),
    # strengths the parameters' dtype cannot hold (float32 here): refused at apply, before any hook
    ("lam-beyond-float32", lambda m: torchreg.L1(m, 1e39), ValueError,
     ("lam=1e+39", "torch.float32", "3.4028234663852886e+38", "'0.weight'")),
    ("l2-beyond-float32", lambda m: torchreg.ElasticNet(m, 0.1, 1e39), ValueError, ("l2=1e+39", "float32")),
    ("rule-beyond-float32", lambda m: torchreg.L2(1e39).apply(m), ValueError, ("lam=1e+39", "float32")),
    ("rules-beyond-float32", lambda m: torchreg.apply_regularization(m, {nn.Linear: torchreg.L1(1e39)}),
     ValueError, ("lam=1e+39", "float32", "'0.weight'")),
    ("huge-int-lam", lambda m: torchreg.L1(m, 10**400), ValueError, ("401 digits", "1e400", "finite")),
    ("huge-int-rule", lambda m: torchreg.L2(10**400), ValueError, ("1e400", "largest float")),
    ("bool-tensor-lam", lambda m: torchreg.L1(m, torch.tensor(True)), TypeError, ("bool tensor", "tensor(True)")),
    ("meta-tensor-lam", lambda m: torchreg.L2(m, torch.tensor(0.1, device="meta")), TypeError,
     ("meta device", "holds no value")),
    ("vector-tensor-lam", lambda m: torchreg.L1(m, torch.ones(2)), TypeError,
     ("tensor([1., 1.])", "one-element")),
    # the module: None, a TorchScript module, two modules
    ("none-module", lambda m: torchreg.L1(None, 0.1), TypeError, ("got None", "torchreg.L1(lam)")),
    ("none-module-lam-keyword", lambda m: torchreg.L2(None, lam=0.1), TypeError, ("got None",)),
    ("none-module-keyword", lambda m: torchreg.L1(module=None, lam=0.1), TypeError, ("got None",)),
    ("none-module-elasticnet", lambda m: torchreg.ElasticNet(None, 0.1, 0.2), TypeError,
     ("got None", "torchreg.ElasticNet(l1, l2)")),
    ("script-module", lambda m: torchreg.L1(torch.jit.script(m), 0.1), TypeError,
     ("RecursiveScriptModule", "TorchScript", "then script it")),
    ("script-module-apply", lambda m: torchreg.L2(0.1).apply(torch.jit.script(m)), TypeError,
     ("RecursiveScriptModule", "load_state_dict hook")),
    ("script-module-rules", lambda m: torchreg.apply_regularization(torch.jit.script(m), {nn.Linear: torchreg.L1(0.1)}),
     TypeError, ("RecursiveScriptModule", "TorchScript")),
    ("two-modules", lambda m: torchreg.L1(m[0], 0.1, module=m[1]), TypeError,
     ("two modules", "a Linear module", "a LayerNorm module")),
    ("two-modules-rule-keywords", lambda m: torchreg.ElasticNet(m[0], l1=0.1, l2=0.2, module=m), TypeError,
     ("two modules", "a Sequential module")),
    # a rule value that would regularize a module when called: refused before it is called
    ("partial-binding-module", lambda m: torchreg.apply_regularization(
        m, {nn.Linear: functools.partial(torchreg.L1, m[0], lam=0.1)}), TypeError,
     ("rule #1 Linear", "binds a Linear module", "functools.partial(torchreg.L1, lam=1e-4)")),
    ("partial-binding-module-keyword", lambda m: torchreg.apply_regularization(
        m, {"0": functools.partial(torchreg.ElasticNet, module=m[0], l1=0.1, l2=0.1)}), TypeError,
     ("rule #1 '0'", "binds a Linear module", "ElasticNet, l1=1e-4, l2=1e-4")),
    ("partial-binding-none", lambda m: torchreg.apply_regularization(
        m, {nn.Linear: functools.partial(torchreg.L2, None, 0.1)}), TypeError, ("rule #1 Linear", "binds None")),
]


def module_hooks(model: nn.Module) -> Dict[str, int]:
    return {name: len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
            for name, m in model.named_modules()}


def assert_untouched(model: nn.Module, bare: nn.Module) -> None:
    """``model`` is exactly ``bare`` (its copy from before the failed call): same state, no trace."""
    for name, p in model.named_parameters():
        assert not getattr(p, "_post_accumulate_grad_hooks", None), f"hook left on {name}"
    for name, m in model.named_modules():
        assert not hasattr(m, "_torchreg_unit"), f"_torchreg_unit left on {name!r}"
    assert module_hooks(model) == module_hooks(bare)
    state, bare_state = model.state_dict(), bare.state_dict()
    assert list(state) == list(bare_state)
    assert all(torch.equal(state[k], bare_state[k]) for k in state)
    with pytest.raises(ValueError, match="no torchreg regularization"):
        torchreg.remove_regularization(model)
    for m in (model, bare):
        m(X).pow(2).sum().backward()
    got, want = grads(model), grads(bare)
    assert all((got[k] is None and want[k] is None) or torch.equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize("call, error, fragments", [pytest.param(*case[1:], id=case[0]) for case in BAD_CALLS])
def test_bad_call_raises_and_leaves_model_untouched(call, error: type, fragments: Tuple[str, ...]) -> None:
    model = make_model()
    bare = bare_copy(model)
    with pytest.raises(error) as info:
        call(model)
    for fragment in fragments:
        assert fragment in str(info.value), f"{fragment!r} not in {str(info.value)!r}"
    assert_untouched(model, bare)


def test_parameter_that_cannot_be_regularized_rolls_back() -> None:
    """The float weight comes first: nothing of it may stay once the integer weight is refused."""
    torch.manual_seed(0)
    model = WithIntegerWeight()
    bare = bare_copy(model)
    with pytest.raises(TypeError, match="weight_index.*int64"):
        torchreg.L1(model, 0.1)
    assert_untouched(model, bare)


@pytest.mark.parametrize(
    "rule, attribute, value, error",
    [
        pytest.param(torchreg.L1(0.1), "lam", -1.0, ValueError, id="L1-negative"),
        pytest.param(torchreg.L2(0.1), "lam", math.nan, ValueError, id="L2-nan"),
        pytest.param(torchreg.ElasticNet(0.1, 0.2), "l2", math.inf, ValueError, id="ElasticNet-inf"),
        pytest.param(torchreg.ElasticNet(0.1, 0.2), "l1", "0.5", TypeError, id="ElasticNet-string"),
        pytest.param(torchreg.L1(0.1), "lam", 1e39, ValueError, id="L1-beyond-float32"),
        pytest.param(torchreg.ElasticNet(0.1, 0.2), "l2", 3.5e38, ValueError, id="ElasticNet-beyond-float32"),
        pytest.param(torchreg.L2(0.1), "lam", 10**400, ValueError, id="L2-huge-int"),
        pytest.param(torchreg.L1(0.1), "lam", torch.tensor(False), TypeError, id="L1-bool-tensor"),
    ],
)
def test_bad_strength_assignment_keeps_the_old_strength(rule, attribute: str, value: Any, error: type) -> None:
    model = rule.apply(make_model())
    before = torchreg.penalty(model)
    old = getattr(rule, attribute)
    with pytest.raises(error, match=attribute):
        setattr(rule, attribute, value)
    assert getattr(rule, attribute) == old
    assert torch.equal(torchreg.penalty(model), before)


def test_strength_beyond_float16_is_refused_at_apply_and_at_assignment():
    torch.manual_seed(0)
    model = make_model().half()
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"lam=70000\.0 is beyond the largest torch\.float16 value \(65504\.0\)"):
        torchreg.L1(model, 7e4)
    assert not any(p._post_accumulate_grad_hooks for p in model.parameters()) and not hasattr(model, "_torchreg_unit")
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    rule = torchreg.L2(6e4)  # fits float16
    rule.apply(model)
    with pytest.raises(ValueError, match=r"lam=70000\.0 is beyond the largest torch\.float16 value"):
        rule.lam = 7e4
    assert rule.lam == 6e4
    for copied in (copy.deepcopy(rule), pickle.loads(pickle.dumps(rule))):  # the limit travels with the rule
        with pytest.raises(ValueError, match="float16"):
            copied.lam = 7e4
    rule.lam = 65504.0  # the largest float16 value itself is allowed
    ruled = torchreg.L1(1.0)
    torchreg.apply_regularization(make_model().half(), {nn.Linear: ruled})  # a rule set records it too
    with pytest.raises(ValueError, match="float16"):
        ruled.lam = 1e5
    assert torchreg.L1(1e39).lam == 1e39  # a rule applied to nothing yet has no dtype limit


@pytest.mark.parametrize("rule_cls", [torchreg.L1, torchreg.L2, torchreg.ElasticNet])
@pytest.mark.parametrize("dtype, lam", [(torch.float16, 1e5), (torch.bfloat16, 3.395e38)])
def test_strength_beyond_a_dtype_set_after_apply_gives_autograd_inf(rule_cls, dtype, lam):
    """``model.half()`` after torchreg: the strength no longer fits. The backward must not fail; the term
    is what autograd gives for the penalty in the loss (inf beyond the range), not an error."""
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    ref = copy.deepcopy(model)
    strengths = (lam, lam) if rule_cls is torchreg.ElasticNet else (lam,)
    rule_cls(model, *strengths)
    model.to(dtype)
    ref.to(dtype)
    x = torch.randn(5, 4).to(dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(x).sum().backward()
    l1 = lam if rule_cls is not torchreg.L2 else 0.0
    l2 = lam if rule_cls is not torchreg.L1 else 0.0
    w = ref.weight
    (ref(x).sum() + l1 * w.abs().sum() + l2 / 2 * (w * w).sum()).backward()
    got, want = model.weight.grad, ref.weight.grad
    assert torch.equal(got.isinf(), want.isinf()) and torch.equal(got.sign(), want.sign())
    if rule_cls is torchreg.L1:  # lam * sign(w): beyond the range, or rounded to its largest value
        assert torch.equal(got, want)
    else:  # the finite entries agree to the dtype's rounding (autograd computes lam/2 * 2w in the dtype)
        torch.testing.assert_close(got[~got.isinf()].float(), want[~want.isinf()].float(), rtol=2e-2, atol=0)
    assert torch.equal(model.bias.grad, ref.bias.grad)


def test_configure_on_a_part_of_a_model_regularized_as_a_whole_points_to_the_whole():
    model = torchreg.apply_regularization(make_model(), {nn.Linear: torchreg.L1(0.1)})
    unit = model._torchreg_unit
    with pytest.raises(ValueError, match=r"Linear is regularized as part of an enclosing Sequential.*"
                                         r"torchreg\.configure on that Sequential"):
        torchreg.configure(model[0], accumulation_steps=4)
    assert unit.accumulation_steps == 1
    with pytest.raises(ValueError, match="nothing in LayerNorm is regularized"):  # nothing of it covered
        torchreg.configure(model[1], accumulation_steps=4)
    assert torchreg.configure(model, accumulation_steps=4) is model and unit.accumulation_steps == 4
