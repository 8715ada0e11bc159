"""Transparency and safety: a regularized model is the same model.

Its parameters (identity included), ``state_dict``, forward, attributes and type are those of the bare
model; copies and pickles regularize themselves only; ``remove_regularization`` leaves no trace; and
regularizing twice is refused.
"""

from __future__ import annotations

import copy
import io
import warnings
from typing import Callable, Dict, List, Optional, Tuple

import pytest
import torch
from torch import Tensor, nn

import torchreg
from reference import assert_same_grads, bare_copy, explicit_penalty, grads

X = torch.randn(5, 6, generator=torch.Generator().manual_seed(1))


def make_model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.ReLU(), nn.Linear(8, 3))


# What ``regularize`` applies, as (parameter name, l1, l2) for the reference penalty.
PENALIZED = [("0.weight", 0.1, 0.0), ("3.weight", 0.05, 0.2)]


def regularize(model: nn.Sequential) -> nn.Sequential:
    torchreg.L1(model[0], 0.1)
    torchreg.ElasticNet(model[3], l1=0.05, l2=0.2)
    return model


def loss_fn(model: nn.Module) -> Tensor:
    return model(X).pow(2).mean()


def reference_penalty(ref: nn.Module, penalized=PENALIZED) -> Tensor:
    params = dict(ref.named_parameters())
    return explicit_penalty((params[name], l1, l2) for name, l1, l2 in penalized)


def assert_regularizes_exactly(model: nn.Module, ref: nn.Module, penalized=PENALIZED) -> None:
    """From zeroed gradients, one backward of ``model`` gives ``ref``'s gradient of loss + penalty."""
    model.zero_grad()
    ref.zero_grad()
    loss_fn(model).backward()
    (loss_fn(ref) + reference_penalty(ref, penalized)).backward()
    assert_same_grads(model, ref)


def assert_identical_grads(model: nn.Module, expected: Dict[str, Optional[Tensor]]) -> None:
    got = grads(model)
    assert got.keys() == expected.keys()
    for name, want in expected.items():
        assert (got[name] is None and want is None) or torch.equal(got[name], want), name


def assert_no_torchreg_state(model: nn.Module) -> None:
    """No hook on any parameter or module, and no attribute torchreg sets."""
    for name, p in model.named_parameters():
        assert not getattr(p, "_post_accumulate_grad_hooks", None), f"hook left on {name}"
    for name, m in model.named_modules():
        assert not hasattr(m, "_torchreg_unit"), f"_torchreg_unit left on {name!r}"
        assert not (m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks), name
        assert not m._load_state_dict_post_hooks, f"load_state_dict hook left on {name!r}"


def assert_same_state_dict(actual: Dict[str, Tensor], expected: Dict[str, Tensor]) -> None:
    assert list(actual) == list(expected)
    for key in expected:
        assert torch.equal(actual[key], expected[key]), key


# -- state_dict and checkpoints -----------------------------------------------------------------------
def test_state_dict_parameters_and_modules_are_those_of_the_bare_model() -> None:
    bare = make_model()
    model = regularize(make_model())
    assert_same_state_dict(model.state_dict(), bare.state_dict())
    for listing in ("named_parameters", "named_buffers", "named_modules"):
        assert [n for n, _ in getattr(model, listing)()] == [n for n, _ in getattr(bare, listing)()], listing


def checkpoint(model: nn.Module) -> Dict[str, Tensor]:
    """``model.state_dict()`` through ``torch.save`` / ``torch.load(weights_only=True)``."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def test_regularized_checkpoint_loads_into_bare_model() -> None:
    source = regularize(make_model(seed=1))
    target = make_model()
    result = target.load_state_dict(checkpoint(source), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert_same_state_dict(target.state_dict(), source.state_dict())


def test_bare_checkpoint_loads_into_regularized_model() -> None:
    source = make_model(seed=1)
    target = regularize(make_model())
    params = list(target.parameters())
    result = target.load_state_dict(checkpoint(source), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert_same_state_dict(target.state_dict(), source.state_dict())
    assert all(p is q for p, q in zip(target.parameters(), params))
    assert_regularizes_exactly(target, bare_copy(source))


REGULARIZE_FORMS = {
    "per layer": (regularize, PENALIZED),
    "apply_regularization": (
        lambda m: torchreg.apply_regularization(m, {nn.Linear: torchreg.ElasticNet(l1=0.05, l2=0.2)}),
        [("0.weight", 0.05, 0.2), ("3.weight", 0.05, 0.2)],
    ),
}


@pytest.mark.parametrize("form", list(REGULARIZE_FORMS))
def test_checkpoint_loaded_with_assign_stays_regularized(form: str) -> None:
    """``load_state_dict(..., assign=True)`` puts new parameter objects in the model: the
    regularization follows them, and nothing is left on the old ones."""
    apply, penalized = REGULARIZE_FORMS[form]
    source = make_model(seed=1)
    target = apply(make_model())
    old = list(target.parameters())
    target.load_state_dict(checkpoint(source), strict=True, assign=True)
    assert all(p is not q for p, q in zip(target.parameters(), old))
    assert not any(getattr(q, "_post_accumulate_grad_hooks", None) for q in old)
    assert_same_state_dict(target.state_dict(), source.state_dict())
    assert_regularizes_exactly(target, bare_copy(source), penalized)
    assert torch.equal(torchreg.penalty(target), reference_penalty(source, penalized).detach())


def test_meta_device_model_regularized_then_loaded_with_assign() -> None:
    """Build on the meta device, regularize, then load real weights with ``assign=True``."""
    source = make_model(seed=1)
    with torch.device("meta"):
        target = regularize(make_model())
    target.load_state_dict(checkpoint(source), assign=True)
    assert all(p.device.type == "cpu" for p in target.parameters())
    assert_regularizes_exactly(target, bare_copy(source))


def _replace_by_assignment(model: nn.Module) -> nn.Module:
    model[0].weight = nn.Parameter(model[0].weight.detach().clone())
    return model


def _to_empty_from_meta(model: nn.Module) -> nn.Module:
    with torch.device("meta"):
        meta = regularize(make_model())
    meta.to_empty(device="cpu")
    with torch.no_grad():
        for p, q in zip(meta.parameters(), model.parameters()):
            p.copy_(q)
    return meta


@pytest.mark.parametrize("replace", [_replace_by_assignment, _to_empty_from_meta], ids=["assignment", "to_empty"])
def test_parameters_replaced_after_regularizing_are_followed_from_the_first_backward(replace) -> None:
    """Replaced before the first forward (``to_empty`` from meta, an assignment): found at that forward,
    exact from the first backward, no warning."""
    source = make_model(seed=1)
    model = replace(regularize(bare_copy(source)))
    ref = bare_copy(source)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert_regularizes_exactly(model, ref)
        opt.step()
        assert_regularizes_exactly(model, ref)


def test_parameters_replaced_after_the_first_backward_warn_at_the_first_step_then_are_followed() -> None:
    """Replaced after a backward already ran: the backward after it added no term to the new one (found
    at the first step only, with a warning), and from then on it is followed."""
    source = make_model(seed=1)
    model = regularize(bare_copy(source))
    ref = bare_copy(source)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    loss_fn(model).backward()
    _replace_by_assignment(model)
    model.zero_grad()
    loss_fn(model).backward()  # the replaced weight got no term
    with pytest.warns(UserWarning, match=r"torchreg: \d+ regularized parameter\(s\) of .* replaced by new objects"):
        opt.step()
    assert_regularizes_exactly(model, ref)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once only
        opt.step()


def test_no_replacement_no_warning_at_the_first_step() -> None:
    model = regularize(make_model())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss_fn(model).backward()
        opt.step()


# -- identity, forward, attributes, type --------------------------------------------------------------
def test_parameter_identity_kept_and_optimizer_built_before_still_works() -> None:
    model = make_model()
    ref = bare_copy(model)
    params = list(model.parameters())
    weight = model[0].weight
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)  # built before regularizing
    ref_optimizer = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    regularize(model)
    assert [id(p) for p in model.parameters()] == [id(p) for p in params]
    assert model[0].weight is weight
    for _ in range(3):
        assert_regularizes_exactly(model, ref)
        optimizer.step()
        ref_optimizer.step()
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_forward_output_identical(training: bool) -> None:
    bare = make_model().train(training)
    model = regularize(make_model()).train(training)
    assert torch.equal(model(X), bare(X))
    for name, m in model.named_modules():  # no module hook that could change the forward
        assert not (m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks), name


CALL_FORMS: List[Tuple[str, Callable[[nn.Module], nn.Module], float, float]] = [
    ("L1(layer, lam)", lambda m: torchreg.L1(m, 0.1), 0.1, 0.0),
    ("L1(layer, lam=)", lambda m: torchreg.L1(m, lam=0.1), 0.1, 0.0),
    ("L1(module=, lam=)", lambda m: torchreg.L1(module=m, lam=0.1), 0.1, 0.0),
    ("L2(layer, lam)", lambda m: torchreg.L2(m, 0.2), 0.0, 0.2),
    ("L2(layer, lam=)", lambda m: torchreg.L2(m, lam=0.2), 0.0, 0.2),
    ("ElasticNet(layer, l1, l2)", lambda m: torchreg.ElasticNet(m, 0.1, 0.2), 0.1, 0.2),
    ("ElasticNet(layer, l1=, l2=)", lambda m: torchreg.ElasticNet(m, l1=0.1, l2=0.2), 0.1, 0.2),
    ("L2(lam).apply(layer)", lambda m: torchreg.L2(0.2).apply(m), 0.0, 0.2),
    ("ElasticNet(l1=, l2=).apply(layer)", lambda m: torchreg.ElasticNet(l1=0.1, l2=0.2).apply(m), 0.1, 0.2),
]


@pytest.mark.parametrize("form, l1, l2", [pytest.param(f, a, b, id=i) for i, f, a, b in CALL_FORMS])
def test_call_returns_the_same_module_with_its_attributes(form, l1: float, l2: float) -> None:
    torch.manual_seed(0)
    layer = nn.Linear(6, 3)
    ref = bare_copy(layer)
    weight, bias = layer.weight, layer.bias
    assert form(layer) is layer
    assert type(layer) is nn.Linear and isinstance(layer, nn.Linear)
    assert layer.weight is weight and layer.bias is bias
    assert (layer.in_features, layer.out_features) == (6, 3)
    assert_regularizes_exactly(layer, ref, [("weight", l1, l2)])


def test_works_inside_sequential() -> None:
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    torch.manual_seed(0)
    model = nn.Sequential(torchreg.L1(nn.Linear(6, 8), lam=0.1), nn.ReLU(), torchreg.L2(nn.Linear(8, 3), lam=0.2))
    assert type(model[0]) is nn.Linear and type(model[2]) is nn.Linear
    assert_same_state_dict(model.state_dict(), ref.state_dict())
    assert_regularizes_exactly(model, ref, [("0.weight", 0.1, 0.0), ("2.weight", 0.0, 0.2)])


# -- copies and pickles -----------------------------------------------------------------------------
def test_deepcopy_regularizes_the_copy_only() -> None:
    model = make_model()
    ref = bare_copy(model)
    regularize(model)
    clone = copy.deepcopy(model)
    assert not any(p is q for p, q in zip(clone.parameters(), model.parameters()))

    assert_regularizes_exactly(clone, ref)
    assert all(p.grad is None for p in model.parameters())

    clone_grads = grads(clone)
    assert_regularizes_exactly(model, ref)
    assert_identical_grads(clone, clone_grads)


def test_pickled_model_round_trips_and_regularizes_exactly() -> None:
    model = make_model()
    ref = bare_copy(model)
    regularize(model)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert type(loaded) is nn.Sequential and type(loaded[0]) is nn.Linear
    assert_same_state_dict(loaded.state_dict(), model.state_dict())
    torch.testing.assert_close(torchreg.penalty(loaded), torchreg.penalty(model))

    assert_regularizes_exactly(loaded, ref)
    assert all(p.grad is None for p in model.parameters())


# -- removal ------------------------------------------------------------------------------------------
REGULARIZATIONS = {
    "layers-in-sequential": regularize,
    "whole-model": lambda m: torchreg.L2(m, 0.2),
    "apply_regularization": lambda m: torchreg.apply_regularization(m, {nn.Linear: torchreg.L1(0.1)}),
}


@pytest.mark.parametrize("apply", list(REGULARIZATIONS.values()), ids=list(REGULARIZATIONS))
def test_remove_regularization_leaves_no_trace(apply: Callable[[nn.Module], nn.Module]) -> None:
    model = make_model()
    bare = bare_copy(model)
    apply(model)
    assert torchreg.remove_regularization(model) is model
    assert_no_torchreg_state(model)
    assert torch.equal(model(X), bare(X))
    assert torch.equal(torchreg.penalty(model), torch.zeros(()))
    for m in (model, bare):
        loss_fn(m).backward()
    assert_identical_grads(model, grads(bare))


def test_removed_model_can_be_regularized_again() -> None:
    model = make_model()
    ref = bare_copy(model)
    torchreg.remove_regularization(regularize(model))
    torchreg.L2(model, 0.3)
    assert_regularizes_exactly(model, ref, [("0.weight", 0.0, 0.3), ("3.weight", 0.0, 0.3)])


def test_removing_one_layer_keeps_the_others() -> None:
    model = make_model()
    ref = bare_copy(model)
    regularize(model)
    torchreg.remove_regularization(model[0])
    assert_no_torchreg_state(model[0])
    assert_regularizes_exactly(model, ref, PENALIZED[1:])


# -- regularizing twice -------------------------------------------------------------------------------
RULE = torchreg.L2(0.3)  # one rule object, applied twice by the "same-rule-twice" case
TWICE = [
    ("same-layer", lambda m: torchreg.L1(m[0], 0.1), lambda m: torchreg.L2(m[0], 0.2), [("0.weight", 0.1, 0.0)]),
    ("same-rule-twice", lambda m: RULE.apply(m[0]), lambda m: RULE.apply(m[0]), [("0.weight", 0.0, 0.3)]),
    ("container-after-layer", lambda m: torchreg.L1(m[0], 0.1), lambda m: torchreg.L2(m, 0.2),
     [("0.weight", 0.1, 0.0)]),
    ("layer-after-container", lambda m: torchreg.L2(m, 0.2), lambda m: torchreg.L1(m[3], 0.1),
     [("0.weight", 0.0, 0.2), ("3.weight", 0.0, 0.2)]),
    ("other-selection-of-same-layer", lambda m: torchreg.L1(m[0], 0.1),
     lambda m: torchreg.L2(m[0], 0.2, params="bias"), [("0.weight", 0.1, 0.0)]),
]


@pytest.mark.parametrize("first, second, penalized", [pytest.param(*t[1:], id=t[0]) for t in TWICE])
def test_regularizing_twice_raises_and_keeps_the_first(first, second, penalized) -> None:
    model = make_model()
    ref = bare_copy(model)
    first(model)
    with pytest.raises(ValueError, match="already regularized"):
        second(model)
    assert_regularizes_exactly(model, ref, penalized)
