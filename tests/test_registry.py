"""The one registry of what torchreg holds: ``torchreg.is_regularized`` and the rule classes by name."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

import torchreg
from torchreg import _registry


def model() -> nn.Sequential:
    return nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 1))


CASES = {
    "wrapper": lambda m: torchreg.L2(m[0], 0.1),
    "rules": lambda m: torchreg.apply_regularization(m, {nn.Linear: torchreg.L1(0.1)}),
    "proximal": lambda m: torchreg.L1(m[0], 0.1, proximal=True),
    "activity-only": lambda m: torchreg.ActivityL1(m[1], 0.1),
    "frozen": lambda m: (m[0].weight.requires_grad_(False), torchreg.L2(m[0], 0.1)),
}


@pytest.mark.parametrize("how", list(CASES))
def test_is_regularized_answers_for_every_kind_and_after_remove(how: str) -> None:
    m = model()
    assert not torchreg.is_regularized(m)
    CASES[how](m)
    assert torchreg.is_regularized(m)
    for copied in (copy.deepcopy(m), pickle.loads(pickle.dumps(m))):
        assert torchreg.is_regularized(copied)
    torchreg.remove_regularization(m)
    assert not torchreg.is_regularized(m) and not list(_registry.units_in(m))


def test_is_regularized_sees_a_part_of_a_model_regularized_as_a_whole() -> None:
    m = torchreg.apply_regularization(model(), {"0": torchreg.L2(0.1), nn.ReLU: torchreg.ActivityL2(0.1)})
    assert [torchreg.is_regularized(part) for part in m] == [True, True, False]


def test_the_owner_of_a_frozen_or_proximal_parameter_is_known() -> None:
    """The registry, not the hooks, says who covers a parameter: a frozen one (no hook yet) and a proximal
    one (no hook at all) are covered, so a second regularization of them is refused."""
    for apply in (CASES["frozen"], CASES["proximal"]):
        m = model()
        apply(m)
        with pytest.raises(ValueError, match="already regularized"):
            torchreg.apply_regularization(m, {nn.Linear: torchreg.L2(0.1)})


def test_is_regularized_rejects_a_non_module() -> None:
    with pytest.raises(TypeError, match="is_regularized expects an nn.Module instance, got 3 \\(int\\)"):
        torchreg.is_regularized(3)


def test_rule_classes_register_themselves_and_the_config_knows_them() -> None:
    assert {"L1", "L2", "ElasticNet", "GroupLasso", "Orthogonal", "ActivityL1", "ActivityL2"} <= set(
        _registry.RULES)
    assert "Regularizer" not in _registry.RULES
    with pytest.raises(ValueError, match="unknown regularizer 'L3'; known: 'ActivityL1', 'ActivityL2'"):
        torchreg.rules_from_config([{"match": {"type": "Linear"}, "regularizer": {"type": "L3", "lam": 1}}])


def test_the_base_class_cannot_be_instantiated_and_names_the_built_in_ones() -> None:
    with pytest.raises(TypeError, match="Regularizer is a base class; use torchreg's ActivityL1, .*L1, L2"):
        torchreg.Regularizer(nn.Linear(2, 2), 0.1)


def test_a_regularizer_without_prox_refuses_proximal_mode() -> None:
    class Half(torchreg.Regularizer):
        _strengths = ("lam",)
        lam = torchreg.regularizers.strength("lam")

        def __init__(self, lam, *, proximal=False):
            self.lam = lam
            self._init_selection(None)
            self._init_proximal(proximal)

    with pytest.raises(ValueError, match="Half has no proximal operator"):
        Half(0.1, proximal=True)
    assert "Half" not in _registry.RULES  # defined outside torchreg: not a config name


def test_lightning_style_check_accepts_an_activity_only_model() -> None:
    """The integrations ask is_regularized: a model regularized only by ActivityL1 counts."""
    m = model()
    torchreg.ActivityL1(m[1], 1e-3)
    assert torchreg.is_regularized(m)
    torchreg.configure(m, accumulation_steps=2)
    assert next(_registry.units_in(m)).accumulation_steps == 2
    out = m(torch.ones(2, 3))
    out.sum().backward()


@pytest.mark.parametrize("copy_of", [copy.deepcopy, lambda m: pickle.loads(pickle.dumps(m))], ids=["deepcopy", "pickle"])
def test_a_copy_knows_what_covers_its_parts(copy_of) -> None:
    """A copied model's parts are covered by the copy's units: the registry is filled for copies too."""
    m = torchreg.apply_regularization(model(), {nn.ReLU: torchreg.ActivityL1(0.1), nn.Linear: torchreg.L2(0.1)})
    c = copy_of(m)
    assert [torchreg.is_regularized(part) for part in c] == [True, True, True]
    with pytest.raises(ValueError, match="already regularized"):
        torchreg.ActivityL2(c[1], 0.1)
    with pytest.raises(ValueError, match="already regularized"):
        torchreg.L1(c[2], 0.1)


def test_a_parameter_replaced_by_loading_with_assign_is_covered() -> None:
    m = torchreg.L2(model(), 0.1)
    m.load_state_dict({k: v.clone() for k, v in m.state_dict().items()}, assign=True)
    unit = m._torchreg_unit
    assert torchreg._engine.owner_of(m[0].weight) is unit
    assert torchreg.is_regularized(m[0])
    with pytest.raises(ValueError, match="already regularized"):
        torchreg.L1(m[0], 0.1)


def test_a_model_copied_after_training_is_regularized_exactly() -> None:
    """deepcopy and pickle of a model that has run a forward and a backward (the first-forward watchers are
    gone) give copies whose gradients are the penalty's."""
    torch.manual_seed(0)
    m = nn.Sequential(torchreg.L1(nn.Linear(4, 3), lam=1e-2), nn.ReLU(), torchreg.L2(nn.Linear(3, 1), lam=1e-3))
    m(torch.randn(2, 4)).sum().backward()
    x = torch.randn(5, 4)
    for c in (copy.deepcopy(m), pickle.loads(pickle.dumps(m))):
        c.zero_grad()
        c(x).sum().backward()
        bare = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 1))
        bare.load_state_dict(c.state_dict())
        (bare(x).sum() + 1e-2 * bare[0].weight.abs().sum() + 1e-3 / 2 * bare[2].weight.pow(2).sum()).backward()
        for a, b in zip(c.parameters(), bare.parameters()):
            torch.testing.assert_close(a.grad, b.grad)
