"""Penalties toward an anchor (``center=``, ``importance=``) through the whole library.

References: autograd of the explicit penalty added to the loss of a bare copy (gradients, with and
without gradient accumulation and a GradScaler); scikit-learn's Lasso and ElasticNet on the shifted
problem ``w = c + d`` (proximal mode, SGD and Adam). Then the anchors' life: one copy per parameter,
nothing kept of the user's mapping or module, following ``.to()`` / ``.half()``, ``deepcopy``,
``torch.save``, never in ``state_dict``; sparsity; errors before anything changes; config.
"""

from __future__ import annotations

import copy
import gc
import io
import weakref
from collections import OrderedDict
from typing import Any, Dict

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import torchreg
from reference import assert_same_grads
from test_anchor_math import D, assert_matches_shifted, shifted_lasso_reference, shifted_problem

sklearn_lm = pytest.importorskip("sklearn.linear_model")

WEIGHTS = ("0.weight", "2.weight")  # the default selection of make_model(): the two Linear weights


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def batch(n: int = 12, seed: int = 0):
    g = torch.Generator().manual_seed(100 + seed)
    return torch.randn(n, 4, generator=g, dtype=torch.float64), torch.randn(n, 3, generator=g, dtype=torch.float64)


def importance_of(model: nn.Module, seed: int = 7) -> Dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {name: torch.rand(p.shape, generator=g, dtype=p.dtype) * 2 for name, p in model.named_parameters()}
    out["0.weight"][0] = 0.0  # zero importance: no pull at all
    return out


# name -> (rule from (center, importance), explicit penalty from (weights, centers, importance))
CASES: Dict[str, Any] = {
    "L1": (lambda c, f: torchreg.L1(0.3, center=c),
           lambda w, c, f: sum(0.3 * (w[k] - c[k]).abs().sum() for k in WEIGHTS)),
    "L2": (lambda c, f: torchreg.L2(0.7, center=c),
           lambda w, c, f: sum(0.7 / 2 * ((w[k] - c[k]) ** 2).sum() for k in WEIGHTS)),
    "ElasticNet": (lambda c, f: torchreg.ElasticNet(0.2, 0.9, center=c),
                   lambda w, c, f: sum(0.2 * (w[k] - c[k]).abs().sum() + 0.9 / 2 * ((w[k] - c[k]) ** 2).sum()
                                       for k in WEIGHTS)),
    "EWC": (lambda c, f: torchreg.L2(1.3, center=c, importance=f),
            lambda w, c, f: sum(1.3 / 2 * (f[k] * (w[k] - c[k]) ** 2).sum() for k in WEIGHTS)),
}
CENTERS = ("init", "state_dict", "module")


def setup(case: str, center_kind: str):
    """``(model, reference, explicit penalty of the reference)``: the reference is a bare copy."""
    model = make_model()
    pretrained = make_model(seed=1)
    with torch.no_grad():  # ties: a few weights start exactly at their anchor
        pretrained[0].weight[1, :2] = model[0].weight[1, :2]
    center = {"init": "init", "state_dict": pretrained.state_dict(), "module": pretrained}[center_kind]
    anchors = {k: (model if center_kind == "init" else pretrained).get_parameter(k).detach().clone() for k in WEIGHTS}
    importance = importance_of(model)
    make_rule, explicit = CASES[case]
    reference = copy.deepcopy(model)
    make_rule(center, importance if case == "EWC" else None).apply(model)
    return model, reference, lambda: explicit(dict(reference.named_parameters()), anchors, importance)


def loss_fn(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    return F.mse_loss(model(x), y)


@pytest.mark.parametrize("center_kind", CENTERS)
@pytest.mark.parametrize("case", list(CASES))
def test_gradients_equal_autograd_of_the_explicit_penalty(case: str, center_kind: str) -> None:
    model, reference, penalty = setup(case, center_kind)
    opt, ref_opt = torch.optim.SGD(model.parameters(), lr=0.2), torch.optim.SGD(reference.parameters(), lr=0.2)
    for step in range(3):
        opt.zero_grad()
        ref_opt.zero_grad()
        loss_fn(model, *batch(seed=step)).backward()
        (loss_fn(reference, *batch(seed=step)) + penalty()).backward()
        assert_same_grads(model, reference)
        torch.testing.assert_close(torchreg.penalty(model), penalty().detach())
        opt.step()
        ref_opt.step()


@pytest.mark.parametrize("case", list(CASES))
def test_gradient_accumulation(case: str) -> None:
    k = 3
    model, reference, penalty = setup(case, "state_dict")
    torchreg.configure(model, accumulation_steps=k)
    opt, ref_opt = torch.optim.SGD(model.parameters(), lr=0.2), torch.optim.SGD(reference.parameters(), lr=0.2)
    for step in range(2):
        x, y = batch(12, seed=step)
        opt.zero_grad()
        ref_opt.zero_grad()
        for xi, yi in zip(x.chunk(k), y.chunk(k)):
            (loss_fn(model, xi, yi) / k).backward()
        (loss_fn(reference, x, y) + penalty()).backward()
        assert_same_grads(model, reference)
        opt.step()
        ref_opt.step()


@pytest.mark.parametrize("case", list(CASES))
def test_grad_scaler(case: str) -> None:
    model, reference, penalty = setup(case, "module")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1)
    torchreg.configure(model, grad_scaler=scaler)
    opt, ref_opt = torch.optim.SGD(model.parameters(), lr=0.2), torch.optim.SGD(reference.parameters(), lr=0.2)
    for step in range(3):
        opt.zero_grad()
        ref_opt.zero_grad()
        scaler.scale(loss_fn(model, *batch(seed=step))).backward()
        scaler.unscale_(opt)
        (loss_fn(reference, *batch(seed=step)) + penalty()).backward()
        assert_same_grads(model, reference)
        scaler.step(opt)
        scaler.update()
        ref_opt.step()
    assert scaler.get_scale() == 2.0**13


def test_center_none_is_todays_penalty() -> None:
    a, b = make_model(), make_model()
    torchreg.L2(a, 0.5, center=None)
    torchreg.L2(b, 0.5)
    for m in (a, b):
        loss_fn(m, *batch()).backward()
    assert_same_grads(a, b)
    assert repr(torchreg.L2(0.5, center=None)) == "L2(lam=0.5)"


# ------------------------------------------------------------------------------------------------
# proximal mode: scikit-learn on the shifted problem
# ------------------------------------------------------------------------------------------------
OPTIMIZERS = {
    "sgd": (lambda p: torch.optim.SGD(p, lr=0.3), 400),
    "adam": (lambda p: torch.optim.Adam(p, lr=0.02), 1500),
}


def fit(layer: nn.Module, opt_name: str, x: Tensor, y: Tensor) -> None:
    make, steps = OPTIMIZERS[opt_name]
    opt = make(layer.parameters())
    for _ in range(steps):
        opt.zero_grad()
        (0.5 * ((y - layer(x)) ** 2).sum(1).mean()).backward()
        opt.step()


@pytest.mark.parametrize("opt", list(OPTIMIZERS))
def test_proximal_l1_with_center_reaches_sklearn_shifted_lasso(opt: str) -> None:
    x, y, c = shifted_problem()
    alpha = 0.05
    ref, delta = shifted_lasso_reference(x, y, c, alpha)
    torch.manual_seed(1)
    layer = torchreg.L1(nn.Linear(D, 1, bias=False).double(), alpha, center={"weight": c[None]}, proximal=True)
    fit(layer, opt, x, y[:, None])
    assert_matches_shifted(layer.weight[0], c, ref, delta)
    # sparsity() counts the weights exactly at their center
    record = torchreg.sparsity(layer).records[0]
    assert record["zeros"] == int((delta == 0).sum()) and record["numel"] == D


@pytest.mark.parametrize("opt", list(OPTIMIZERS))
def test_proximal_elasticnet_with_center_reaches_sklearn_shifted_elasticnet(opt: str) -> None:
    x, y, c = shifted_problem(seed=1)
    alpha, ratio = 0.08, 0.6
    delta = sklearn_lm.ElasticNet(alpha=alpha, l1_ratio=ratio, fit_intercept=False, tol=1e-12,
                                  max_iter=100_000).fit(x.numpy(), (y - x @ c).numpy()).coef_
    torch.manual_seed(1)
    pretrained = nn.Linear(D, 1, bias=False).double()
    with torch.no_grad():
        pretrained.weight.copy_(c[None])
    layer = torchreg.ElasticNet(nn.Linear(D, 1, bias=False).double(), alpha * ratio, alpha * (1 - ratio),
                                center=pretrained, proximal=True)
    fit(layer, opt, x, y[:, None])
    assert_matches_shifted(layer.weight[0], c, c.numpy() + delta, delta)


# ------------------------------------------------------------------------------------------------
# EWC on two tasks, and the examples
# ------------------------------------------------------------------------------------------------
def _example(name: str):
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"example_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ewc_keeps_task_a_better_than_plain_fine_tuning() -> None:
    results = _example("ewc").run(steps=200, quiet=True)
    plain, ewc = results["plain"], results["EWC"]
    message = (f"task A test loss after learning B: EWC {ewc['A loss']:.3f}, plain fine-tuning "
               f"{plain['A loss']:.3f}; task B: EWC {ewc['B loss']:.3f}, plain {plain['B loss']:.3f}")
    assert ewc["A loss"] < 0.7 * plain["A loss"], message
    assert ewc["B acc"] > 0.85, message  # and it still learns B


def test_finetune_example_smoke() -> None:
    results = _example("finetune").run(steps=150, quiet=True)
    assert set(results) == {"scratch", "plain", "L2 toward 0", "L2-SP", "sparse deltas"}
    assert results["L2-SP"]["distance"] < results["plain"]["distance"], results
    assert results["L2-SP"]["test MSE"] < 0.7 * results["plain"]["test MSE"], (
        f"target test MSE: L2-SP {results['L2-SP']['test MSE']:.3f}, plain fine-tuning "
        f"{results['plain']['test MSE']:.3f}")
    assert results["sparse deltas"]["unchanged"] > 0.3, results
    assert results["plain"]["unchanged"] == 0.0, results


# ------------------------------------------------------------------------------------------------
# the anchors' life: memory, dtype and device, copies, checkpoints
# ------------------------------------------------------------------------------------------------
def states(model: nn.Module) -> Dict[str, Dict[str, Tensor]]:
    """``{parameter name: its state}`` of every covered parameter that has one."""
    from torchreg import _registry

    out = {}
    for unit in _registry.units_in(model):
        for entry in unit.entries:
            if entry.state is not None:
                out[entry.name] = entry.state
    return out


def test_one_copy_per_parameter_and_nothing_of_the_users_objects_is_kept() -> None:
    model = make_model()
    pretrained = make_model(seed=1)
    sd = pretrained.state_dict()
    fisher = OrderedDict((k, torch.rand_like(v)) for k, v in sd.items())
    refs = [weakref.ref(pretrained), weakref.ref(sd), weakref.ref(fisher)]
    rule = torchreg.L2(0.5, center=sd, importance=fisher)
    model = torchreg.apply_regularization(model, {nn.Linear: rule})
    by_name = states(model)
    assert sorted(by_name) == sorted(WEIGHTS)
    params = dict(model.named_parameters())
    for name, state in by_name.items():
        assert sorted(state) == ["center", "importance"]
        for key, t in state.items():
            assert t.shape == params[name].shape and t.dtype == params[name].dtype
            assert t.data_ptr() not in (params[name].data_ptr(), sd[name].data_ptr(), fisher[name].data_ptr())
            assert t.untyped_storage().nbytes() == params[name].numel() * params[name].element_size()
        torch.testing.assert_close(state["center"], sd[name], rtol=0, atol=0)
    expected = {k: (sd[k].clone(), fisher[k].clone()) for k in WEIGHTS}
    del pretrained, sd, fisher
    gc.collect()
    assert [r() for r in refs] == [None, None, None], "the rule keeps the user's module or mapping alive"
    for name, (c, f) in expected.items():  # the anchors live on, as copies
        assert torch.equal(by_name[name]["center"], c) and torch.equal(by_name[name]["importance"], f)
    assert "copied when applied" in repr(rule)
    # a module as center, called form
    pretrained = make_model(seed=1)
    ref = weakref.ref(pretrained)
    layer = torchreg.L1(make_model(), 0.1, center=pretrained)
    del pretrained
    gc.collect()
    assert ref() is None
    assert sorted(states(layer)) == sorted(WEIGHTS)


def test_anchors_follow_dtype_and_device() -> None:
    model, reference, penalty = setup("EWC", "state_dict")
    want = float(penalty().detach())
    model.half()  # the anchors follow at their first use (the engine converts them once)
    assert torchreg.penalty(model).dtype == torch.float16
    torch.testing.assert_close(float(torchreg.penalty(model)), want, rtol=2e-2, atol=1e-3)
    for state in states(model).values():  # converted, not kept twice
        assert all(t.dtype == torch.float16 for t in state.values())
    x, y = batch()
    loss_fn(model, x.half(), y.half()).backward()
    grad = model[0].weight.grad.clone()
    model.double()
    for p in model.parameters():
        p.grad = None
    loss_fn(model, x, y).backward()
    for state in states(model).values():
        assert all(t.dtype == torch.float64 for t in state.values())
    torch.testing.assert_close(model[0].weight.grad.half(), grad, rtol=2e-2, atol=2e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_anchors_follow_the_model_to_the_gpu() -> None:
    model, reference, penalty = setup("EWC", "module")
    model.cuda()
    assert all(t.is_cuda for s in states(model).values() for t in s.values())
    x, y = batch()
    loss_fn(model, x.cuda(), y.cuda()).backward()
    (loss_fn(reference, x, y) + penalty()).backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad.cpu(), q.grad, msg=name)


def test_deepcopy_and_torch_save_keep_the_anchors() -> None:
    model, reference, penalty = setup("L2", "state_dict")
    twin = copy.deepcopy(model)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    originals = states(model)
    for other in (twin, loaded):
        for name, state in states(other).items():
            assert torch.equal(state["center"], originals[name]["center"])
            assert state["center"].data_ptr() != originals[name]["center"].data_ptr()
        for m in (other, reference):
            for p in m.parameters():
                p.grad = None
        loss_fn(other, *batch()).backward()
        (loss_fn(reference, *batch()) + penalty()).backward()
        assert_same_grads(other, reference)


def test_state_dict_has_the_bare_keys_and_a_checkpoint_resumes() -> None:
    pretrained = make_model(seed=1)
    model = torchreg.L2(make_model(), 0.5, center=pretrained)
    assert list(model.state_dict()) == list(make_model().state_dict())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # "training"
    checkpoint = copy.deepcopy(model.state_dict())
    bare = make_model(seed=3)
    bare.load_state_dict(checkpoint)  # a checkpoint loads into a bare model
    # resume: a fresh model, the checkpoint, and center= the pretrained weights again
    resumed = make_model(seed=3)
    resumed.load_state_dict(checkpoint)
    torchreg.L2(resumed, 0.5, center=pretrained.state_dict())
    torch.testing.assert_close(torchreg.penalty(resumed), torchreg.penalty(model))
    # loading a checkpoint into a regularized model changes the weights, never the anchors
    model.load_state_dict(make_model(seed=4).state_dict())
    for name, state in states(model).items():
        assert torch.equal(state["center"], pretrained.get_parameter(name))


def test_sparsity_counts_weights_at_their_center() -> None:
    pretrained = make_model(seed=1)
    model = copy.deepcopy(pretrained)
    torchreg.apply_regularization(model, {nn.Linear: torchreg.L1(0.1, center=pretrained)})
    with torch.no_grad():
        model[0].weight[0].add_(1.0)  # 4 of 24 moved
        model[2].weight.zero_()  # zeros, but not the anchors (pretrained weights are nonzero)
    records = {r["parameter"]: r for r in torchreg.sparsity(model).records}
    assert records["0.weight"]["zeros"] == 20 and records["2.weight"]["zeros"] == 0


# ------------------------------------------------------------------------------------------------
# errors: before anything changes
# ------------------------------------------------------------------------------------------------
def assert_untouched(model: nn.Module) -> None:
    assert not torchreg.is_regularized(model)
    assert not states(model)


def test_missing_name_or_shape_mismatch_raise_before_anything_changes() -> None:
    class Net(nn.Module):
        def __init__(self, classes: int) -> None:
            super().__init__()
            self.body = nn.Linear(4, 6)
            self.head = nn.Linear(6, classes)

    pretrained, model = Net(10), Net(3)
    with pytest.raises(ValueError, match=r"center\['head.weight'\] has shape \(10, 6\), but the parameter "
                                         r"'head.weight' has shape \(3, 6\)"):
        torchreg.apply_regularization(model, {nn.Linear: torchreg.L2(0.1, center=pretrained)})
    assert_untouched(model)
    with pytest.raises(ValueError, match=r"center has no tensor for the parameter 'body.weight'.*'weight', 'bias'"):
        torchreg.L2(model, 0.1, center=nn.Linear(4, 6))  # names are relative to the module regularized
    assert_untouched(model)
    with pytest.raises(ValueError, match=r"importance\['body.weight'\] holds negative values"):
        torchreg.L2(model, 0.1, center="init", importance={"body.weight": -torch.ones(6, 4),
                                                           "head.weight": torch.ones(3, 6)})
    assert_untouched(model)
    # the head excluded by rules: the rest is anchored
    torchreg.apply_regularization(model, {"head": None, nn.Linear: torchreg.L2(0.1, center=pretrained)})
    assert sorted(states(model)) == ["body.weight"]


def test_bad_arguments_name_the_value() -> None:
    with pytest.raises(TypeError, match=r"L2 center must be None, 'init', a mapping .* got tensor"):
        torchreg.L2(0.1, center=torch.zeros(3))
    with pytest.raises(ValueError, match=r"L1 center must be .*got the string 'pretrained'"):
        torchreg.L1(0.1, center="pretrained")
    with pytest.raises(ValueError, match="L2 importance= needs a center="):
        torchreg.L2(0.1, importance={"weight": torch.ones(1)})
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'importance'"):
        torchreg.L1(0.1, center="init", importance={"weight": torch.ones(1)})
    layer = nn.Linear(2, 2, bias=False)
    layer.weight = nn.Parameter(torch.zeros(2, 2, dtype=torch.complex64))
    with pytest.raises(TypeError, match=r"importance= supports real parameters; 'weight' is torch.complex64"):
        torchreg.L2(layer, 0.1, center="init", importance={"weight": torch.ones(2, 2)})
    assert_untouched(layer)
    model = make_model()
    with pytest.raises(TypeError, match=r"ElasticNet center must be .*got 3 \(int\)"):
        torchreg.ElasticNet(model, 0.1, 0.1, center=3)
    assert_untouched(model)


def test_an_applied_rule_keeps_no_mapping_and_says_so() -> None:
    rule = torchreg.L2(0.1, center=make_model(seed=1))
    rule.apply(make_model())
    other = make_model()
    with pytest.raises(ValueError, match=r"was applied already.*Build the rule again with center="):
        rule.apply(other)
    assert_untouched(other)
    init = torchreg.L2(0.1, center="init")  # "init" needs nothing kept: reusable
    init.apply(make_model())
    init.apply(other)
    assert sorted(states(other)) == sorted(WEIGHTS)


def test_config_carries_center_init_only() -> None:
    rules = {nn.Linear: torchreg.L2(0.1, center="init"), nn.Conv2d: torchreg.L1(0.2, center="init", proximal=True)}
    data = torchreg.rules_to_config(rules)
    assert data[0]["regularizer"] == {"type": "L2", "lam": 0.1, "center": "init"}
    assert torchreg.rules_to_config(torchreg.rules_from_config(data)) == data
    with pytest.raises(ValueError, match=r"rules\[0\].regularizer.center: .*<OrderedDict of 4>.*center='init'"):
        torchreg.rules_to_config({nn.Linear: torchreg.L2(0.1, center=make_model().state_dict())})
    with pytest.raises(ValueError, match=r"rules\[0\].regularizer.importance"):
        torchreg.rules_to_config({nn.Linear: torchreg.L2(0.1, center="init", importance={"a": torch.ones(1)})})


def test_repr() -> None:
    assert repr(torchreg.L2(0.1, center="init")) == "L2(lam=0.1, center='init')"
    assert repr(torchreg.L1(0.1, center=make_model(), proximal=True)) == (
        "L1(lam=0.1, center=<Sequential>, proximal=True)")
    assert repr(torchreg.L2(0.1, center=make_model().state_dict(), importance={"a": torch.ones(1)})) == (
        "L2(lam=0.1, center=<OrderedDict of 4>, importance=<dict of 1>)")
    assert repr(torchreg.ElasticNet(0.1, 0.2, center="init", params="*")) == (
        "ElasticNet(l1=0.1, l2=0.2, center='init', params='*')")


def test_center_the_models_own_state_dict_is_a_snapshot() -> None:
    # state_dict() tensors share the parameters' storage: kept as they are, the anchor would move with
    # the weights and the penalty would stay 0. It is copied: the same as center="init".
    model = make_model()
    torchreg.L2(model, 1.0, center=model.state_dict())
    with torch.no_grad():
        model[0].weight.add_(1.0)
    torch.testing.assert_close(torchreg.penalty(model), torch.tensor(0.5 * 24, dtype=torch.float64))


def test_meta_parameters_and_meta_anchors_are_refused() -> None:
    with torch.device("meta"):
        meta = make_model()
    with pytest.raises(ValueError, match=r"parameter '0.weight' is on the meta device .*materialize the model"):
        torchreg.L2(meta, 0.1, center="init")
    assert_untouched(meta)
    model = make_model()
    with pytest.raises(ValueError, match=r"center\['0.weight'\] is on the meta device"):
        torchreg.L2(model, 0.1, center=meta)
    assert_untouched(model)


def test_lazy_parameter_has_no_anchor_yet() -> None:
    model = nn.Sequential(nn.LazyLinear(3))
    with pytest.raises(ValueError, match=r"parameter '0.weight' is not initialized yet .*run a forward pass"):
        torchreg.L2(model, 0.1, center="init")
    assert_untouched(model)
    model(torch.zeros(2, 4))
    torchreg.L2(model, 0.1, center="init")
    assert sorted(states(model)) == ["0.weight"]


@pytest.mark.parametrize("path", ["checkpoint-reentrant", "backward-inputs", "compile"])
def test_engine_paths_carry_the_state(path: str) -> None:
    """The per-parameter state reaches the gradient term on the engine's other paths too."""
    model, reference, penalty = setup("EWC", "state_dict")
    x, y = batch()
    if path == "checkpoint-reentrant":
        x = x.clone().requires_grad_(True)
        loss = F.mse_loss(torch.utils.checkpoint.checkpoint(model, x, use_reentrant=True), y)
        loss.backward()
        (loss_fn(reference, x, y) + penalty()).backward()
    elif path == "backward-inputs":
        loss_fn(model, x, y).backward(inputs=[model[2].weight])
        (loss_fn(reference, x, y) + penalty()).backward(inputs=[reference[2].weight])
        assert model[0].weight.grad is None and model[2].weight.grad is not None
    else:
        compiled = torch.compile(model, backend="aot_eager")
        loss_fn(compiled, x, y).backward()
        (loss_fn(reference, x, y) + penalty()).backward()
    assert_same_grads(model, reference)


def test_a_centered_l2_with_optimizer_weight_decay_does_not_warn() -> None:
    # the double-decay warning is about two pulls toward zero; L2-SP pulls toward the anchor
    import warnings

    model = torchreg.L2(make_model(), 0.1, center="init")
    opt = torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=1e-4)
    loss_fn(model, *batch()).backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()
    plain = torchreg.L2(make_model(), 0.1)  # (and toward zero it does)
    opt = torch.optim.SGD(plain.parameters(), lr=0.1, weight_decay=1e-4)
    loss_fn(plain, *batch()).backward()
    with pytest.warns(UserWarning, match="decayed twice"):
        opt.step()
