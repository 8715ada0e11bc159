"""Bad inputs raise at the call, with a message naming the bad value or what is allowed, and leave
the model exactly as it was: no hook, no attribute, the same state_dict and the bare gradients."""

from __future__ import annotations

import math
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
