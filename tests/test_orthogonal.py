"""Orthogonal: the penalty is Keras' OrthogonalRegularizer formula and the gradient torchreg adds equals
autograd's gradient of that formula added to the loss (float64, several shapes, both modes).

Two independent references: ``keras_penalty`` follows Keras' source line by line in NumPy, on Keras'
``(in, out)`` kernel layout; ``pairwise_penalty`` loops over the pairs ``i < j`` in torch, so that
autograd gives the reference gradient.
"""

from __future__ import annotations

import copy
import gc
import pickle
import warnings
import weakref
from typing import Callable

import numpy as np
import pytest
import torch
from torch import Tensor, nn

import torchreg
from reference import grads

EPS = 1e-7  # keras.backend.epsilon()


def keras_penalty(kernel: np.ndarray, factor: float, mode: str) -> float:
    """keras.regularizers.OrthogonalRegularizer(factor, mode)(kernel), as in Keras 3's source
    (normalize = x * minimum(rsqrt(sum(x**2)), 1 / epsilon))."""
    axis = 1 if mode == "rows" else 0
    with np.errstate(divide="ignore", invalid="ignore"):
        inv_norm = np.minimum(1.0 / np.sqrt(np.sum(kernel**2, axis=axis, keepdims=True)), 1.0 / EPS)
        x = kernel * inv_norm
        product = x @ x.T if mode == "rows" else x.T @ x
        size = x.shape[0] if mode == "rows" else x.shape[1]
        no_diagonal = product * (1.0 - np.eye(size))
        num_pairs = size * (size - 1.0) / 2.0
        return float(factor * 0.5 * np.sum(np.abs(no_diagonal)) / num_pairs)


def pairwise_penalty(weight: Tensor, lam: float, mode: str) -> Tensor:
    """lam * mean over pairs i < j of |cos| between rows (columns) of weight viewed as (shape[0], -1),
    each divided by max(norm, 1e-7); 0 with fewer than two vectors. With autograd graph."""
    v = weight.reshape(weight.shape[0], -1)
    if mode == "columns":
        v = v.t()
    n = v.shape[0]
    if n < 2:
        return weight.sum() * 0.0
    u = v / torch.linalg.vector_norm(v, dim=1, keepdim=True).clamp_min(EPS)
    terms = [(u[i] * u[j]).sum().abs() for i in range(n) for j in range(i + 1, n)]
    return lam * torch.stack(terms).mean()


def loss_of(model: nn.Module, x: Tensor) -> Tensor:
    y = model(x)
    return (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).reshape(y.shape)).sum() + (y**2).sum() / 7


# id -> (module factory, input shape); float64 throughout
LAYERS = {
    "linear_5x3": (lambda: nn.Linear(5, 3), (4, 5)),
    "linear_3x7": (lambda: nn.Linear(3, 7), (4, 3)),
    "conv2d": (lambda: nn.Conv2d(4, 6, 3), (2, 4, 5, 5)),
    "conv1d_groups": (lambda: nn.Conv1d(4, 6, 2, groups=2), (2, 4, 6)),
    "conv_transpose2d": (lambda: nn.ConvTranspose2d(4, 3, 2), (2, 4, 3, 3)),
    "linear_one_row": (lambda: nn.Linear(4, 1), (3, 4)),      # rows: one row, no pair
    "linear_one_column": (lambda: nn.Linear(1, 4), (3, 1)),   # columns: one column, no pair
}


def build(layer: str, seed: int = 0):
    torch.manual_seed(seed)
    factory, shape = LAYERS[layer]
    module = factory().double()
    return module, torch.randn(shape, dtype=torch.float64)


def check_exact(module: nn.Module, x: Tensor, lam: float, mode: str) -> nn.Module:
    """Regularize ``module`` with Orthogonal and compare its gradients with the loss reference."""
    ref = copy.deepcopy(module)
    torchreg.Orthogonal(module, lam, mode=mode)
    loss_of(module, x).backward()
    (loss_of(ref, x) + pairwise_penalty(ref.weight, lam, mode)).backward()
    torch.testing.assert_close(module.weight.grad, ref.weight.grad, rtol=1e-10, atol=1e-13)
    assert module.weight.grad.grad_fn is None and not module.weight.grad.requires_grad  # no graph kept
    assert torch.equal(module.bias.grad, ref.bias.grad)  # the bias is not regularized
    torch.testing.assert_close(torchreg.penalty(module), pairwise_penalty(ref.weight, lam, mode).detach(),
                               rtol=1e-12, atol=1e-15)
    return module


@pytest.mark.parametrize("mode", ["rows", "columns"])
@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_gradient_equals_autograd_of_the_formula(layer: str, mode: str) -> None:
    module, x = build(layer)
    check_exact(module, x, 0.3, mode)


@pytest.mark.parametrize("mode", ["rows", "columns"])
@pytest.mark.parametrize("block", [5, 13])
def test_blocks_of_the_cosine_matrix(monkeypatch: pytest.MonkeyPatch, block: int, mode: str) -> None:
    """Large weights go through the cosine matrix a block of rows at a time: the same result."""
    from torchreg import regularizers

    monkeypatch.setattr(regularizers, "_BLOCK", block)  # n = 6 rows: blocks of 1 and of 2 rows
    module, x = build("conv2d", seed=8)
    check_exact(module, x, 0.3, mode)


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")
@pytest.mark.parametrize("mode", ["rows", "columns"])
def test_create_graph_second_derivatives(mode: str) -> None:
    """backward(create_graph=True): the term joins .grad's graph, so Hessian-vector products include
    the penalty's, as with the penalty in the loss."""
    module, x = build("conv1d_groups", seed=9)
    ref = copy.deepcopy(module)
    torchreg.Orthogonal(module, 0.6, mode=mode)
    v = torch.randn_like(module.weight)
    loss_of(module, x).backward(create_graph=True)
    (hv,) = torch.autograd.grad((module.weight.grad * v).sum(), module.weight)
    loss = loss_of(ref, x) + pairwise_penalty(ref.weight, 0.6, mode)
    (g,) = torch.autograd.grad(loss, ref.weight, create_graph=True)
    (want,) = torch.autograd.grad((g * v).sum(), ref.weight)
    torch.testing.assert_close(module.weight.grad.detach(), g.detach(), rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(hv, want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("mode", ["rows", "columns"])
def test_zero_and_floored_vectors(mode: str) -> None:
    """A zero vector (cosines 0, term 0) and one shorter than 1e-7 (divided by 1e-7: Keras' floor)."""
    module, x = build("conv2d", seed=1)
    with torch.no_grad():
        flat = module.weight.view(6, -1)
        if mode == "rows":
            flat[0] = 0.0
            flat[3] *= 1e-9
        else:
            flat[:, 0] = 0.0
            flat[:, 5] *= 1e-9
    check_exact(module, x, 0.7, mode)
    # The zero vector's term is exactly 0: torchreg adds nothing to it.
    rule, g = torchreg.Orthogonal(lam=0.7, mode=mode), torch.zeros_like(module.weight)
    rule.grad_(g, module.weight.detach())
    zero = g.view(6, -1)[0] if mode == "rows" else g.view(6, -1)[:, 0]
    assert torch.equal(zero, torch.zeros_like(zero))
    floored = g.view(6, -1)[3] if mode == "rows" else g.view(6, -1)[:, 5]
    assert floored.abs().max() > 1.0  # the floored branch: g / 1e-7, not the projected g / |v|


@pytest.mark.parametrize("layer, mode", [("linear_one_row", "rows"), ("linear_one_column", "columns")])
def test_no_pair_gives_zero_not_nan(layer: str, mode: str) -> None:
    module, x = build(layer)
    bare = copy.deepcopy(module)
    torchreg.Orthogonal(module, 0.5, mode=mode)
    loss_of(module, x).backward()
    loss_of(bare, x).backward()
    assert torch.equal(module.weight.grad, bare.weight.grad)  # nothing added
    assert torchreg.penalty(module).item() == 0.0
    kernel = module.weight.detach().numpy().T  # Keras layout; Keras' mode is the other one
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        assert np.isnan(keras_penalty(kernel, 0.5, "columns" if mode == "rows" else "rows"))


@pytest.mark.parametrize("mode", ["rows", "columns"])
def test_vectors_contribute_nothing(mode: str) -> None:
    """A parameter with fewer than 2 dims (PReLU's weight, selected by the default) is no set of vectors."""
    torch.manual_seed(10)
    model = nn.Sequential(nn.Linear(3, 4), nn.PReLU(4)).double()
    bare = copy.deepcopy(model)
    torchreg.apply_regularization(model, {nn.Module: torchreg.Orthogonal(lam=0.5, mode=mode)})
    assert [r["module"] for r in torchreg.summary(model).records] == ["0", "1"]
    x = torch.randn(2, 3, dtype=torch.float64)
    loss_of(model, x).backward()
    loss_of(bare, x).backward()
    assert torch.equal(model[1].weight.grad, bare[1].weight.grad)
    assert torchreg.Orthogonal(lam=0.5, mode=mode).penalty(model[1].weight).item() == 0.0
    torch.testing.assert_close(torchreg.penalty(model), pairwise_penalty(model[0].weight, 0.5, mode).detach())


@pytest.mark.parametrize("shape", [(3, 5), (5, 3), (6, 4, 3, 3)])
@pytest.mark.parametrize("mode", ["rows", "columns"])
def test_penalty_is_keras_formula_with_modes_swapped(shape, mode: str) -> None:
    """torch's (out, in) is Keras' (in, out) transposed: our rows are Keras' columns and vice versa."""
    torch.manual_seed(2)
    w = torch.randn(shape, dtype=torch.float64)
    w[1] = 0.0  # a zero row: Keras' floor makes it 0, as ours
    kernel = w.reshape(shape[0], -1).numpy().T
    keras_mode = "columns" if mode == "rows" else "rows"
    got = torchreg.Orthogonal(lam=0.05, mode=mode).penalty(w).item()
    assert got == pytest.approx(keras_penalty(kernel, 0.05, keras_mode), rel=1e-12)


def test_alpha_and_scale_are_honoured() -> None:
    torch.manual_seed(3)
    w = torch.randn(5, 4, dtype=torch.float64)
    leaf = w.clone().requires_grad_()
    (want,) = torch.autograd.grad(pairwise_penalty(leaf, 0.2, "rows"), leaf)
    start = torch.randn_like(w)
    g = start.clone()
    torchreg.Orthogonal(lam=0.2).grad_(g, w, alpha=0.25, scale=torch.tensor(8.0, dtype=torch.float64))
    torch.testing.assert_close(g, start + 2.0 * want, rtol=1e-12, atol=1e-14)


def test_accumulation_steps() -> None:
    module, x = build("conv2d", seed=4)
    ref = copy.deepcopy(module)
    torchreg.configure(torchreg.Orthogonal(module, 0.4), accumulation_steps=2)
    for half in x.chunk(2):
        (loss_of(module, half) / 2).backward()
    (loss_of(ref, x[:1]) / 2 + loss_of(ref, x[1:]) / 2 + pairwise_penalty(ref.weight, 0.4, "rows")).backward()
    torch.testing.assert_close(module.weight.grad, ref.weight.grad, rtol=1e-10, atol=1e-13)


def test_grad_scaler() -> None:
    torch.manual_seed(5)
    module = nn.Linear(6, 4)
    ref = copy.deepcopy(module)
    x = torch.randn(3, 6)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    torchreg.configure(torchreg.Orthogonal(module, 0.3, mode="columns"), grad_scaler=scaler)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.0)
    scaler.scale(loss_of(module, x)).backward()
    scaler.unscale_(optimizer)
    (loss_of(ref, x) + pairwise_penalty(ref.weight, 0.3, "columns")).backward()
    torch.testing.assert_close(module.weight.grad, ref.weight.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_lower_precision(dtype: torch.dtype, tol: float) -> None:
    torch.manual_seed(6)
    w64 = torch.randn(7, 5, dtype=torch.float64)
    leaf = w64.clone().requires_grad_()
    (want,) = torch.autograd.grad(pairwise_penalty(leaf, 0.5, "rows"), leaf)
    w = w64.to(dtype)
    g = torch.zeros_like(w)
    torchreg.Orthogonal(lam=0.5).grad_(g, w)
    assert g.dtype == dtype
    torch.testing.assert_close(g.double(), want, rtol=tol, atol=tol)


def test_zero_strength_leaves_gradient_untouched() -> None:
    module, x = build("linear_5x3")
    bare = copy.deepcopy(module)
    torchreg.Orthogonal(module, 0.0)
    loss_of(module, x).backward()
    loss_of(bare, x).backward()
    assert torch.equal(module.weight.grad, bare.weight.grad)


def test_rules_in_a_model_and_live_changes() -> None:
    torch.manual_seed(7)
    model = nn.Sequential(nn.Conv2d(3, 5, 3), nn.ReLU(), nn.Flatten(), nn.Linear(5 * 4 * 4, 6)).double()
    ref = copy.deepcopy(model)
    rule = torchreg.Orthogonal(lam=0.1, mode="columns")
    torchreg.apply_regularization(model, {nn.Conv2d: torchreg.Orthogonal(lam=0.2), nn.Linear: rule})
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)

    def reference_backward(linear_mode: str) -> None:
        (loss_of(ref, x) + pairwise_penalty(ref[0].weight, 0.2, "rows")
         + pairwise_penalty(ref[3].weight, 0.1, linear_mode)).backward()

    loss_of(model, x).backward()
    reference_backward("columns")
    for name, got in grads(model).items():
        torch.testing.assert_close(got, dict(ref.named_parameters())[name].grad, rtol=1e-10, atol=1e-13)
    records = torchreg.summary(model).records
    assert [(r["module"], r["regularizer"]) for r in records] == [
        ("0", "Orthogonal(lam=0.2, mode='rows')"), ("3", "Orthogonal(lam=0.1, mode='columns')")]
    rule.mode = "rows"  # a live rule: applies from the next backward
    model.zero_grad(), ref.zero_grad()
    loss_of(model, x).backward()
    reference_backward("rows")
    torch.testing.assert_close(model[3].weight.grad, ref[3].weight.grad, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("make, error, text", [
    (lambda: torchreg.Orthogonal(lam=0.1, mode="diag"), ValueError, "'rows' or 'columns', got 'diag'"),
    (lambda: torchreg.Orthogonal(lam=0.1, mode=1), TypeError, "got 1 (int)"),
    (lambda: torchreg.Orthogonal(lam=-1.0), ValueError, "lam must be a finite real number >= 0"),
    (lambda: torchreg.Orthogonal(lam="0.1"), TypeError, "lam must be a real number"),
    (lambda: torchreg.Orthogonal(nn.Linear(2, 2), 0.1, "columns"), TypeError, "its other options as keywords; got the extra positional argument(s) 'columns'"),
    (lambda: torchreg.Orthogonal(0.1, "columns"), TypeError, "its other options as keywords; got the extra positional argument(s) 'columns'"),
    (lambda: torchreg.Orthogonal(nn.Linear, 0.1), TypeError, "instantiate it"),
    (lambda: torchreg.Orthogonal(nn.Linear(2, 2), 0.1, mode="diag"), ValueError, "got 'diag'"),
])
def test_bad_arguments(make: Callable[[], object], error: type, text: str) -> None:
    with pytest.raises(error, match=None) as info:
        make()
    assert text in str(info.value)


def test_bad_mode_leaves_the_module_untouched() -> None:
    layer = nn.Linear(3, 3)
    with pytest.raises(ValueError):
        torchreg.Orthogonal(layer, 0.1, mode="diag")
    assert not hasattr(layer, "_torchreg_unit")
    assert not layer.weight._post_accumulate_grad_hooks


@pytest.mark.filterwarnings("ignore:Complex modules are a new feature")
def test_complex_parameter_is_refused() -> None:
    layer = torchreg.Orthogonal(nn.Linear(3, 3, bias=False).to(torch.complex64), 0.1)
    with pytest.raises(TypeError, match="real parameters only"):
        layer(torch.randn(2, 3, dtype=torch.complex64)).abs().sum().backward()


def test_repr_pickle_copy_keep_the_mode() -> None:
    rule = torchreg.Orthogonal(lam=0.01, mode="columns", params="weight")
    assert repr(rule) == "Orthogonal(lam=0.01, mode='columns', params='weight')"
    for copied in (pickle.loads(pickle.dumps(rule)), copy.deepcopy(rule)):
        assert (copied.lam, copied.mode, copied.params) == (0.01, "columns", ("weight",))
    module, x = build("linear_3x7")
    torchreg.Orthogonal(module, 0.3, mode="columns")
    clone = pickle.loads(pickle.dumps(module))
    ref = copy.deepcopy(module)
    torchreg.remove_regularization(ref)
    loss_of(clone, x).backward()
    (loss_of(ref, x) + pairwise_penalty(ref.weight, 0.3, "columns")).backward()
    torch.testing.assert_close(clone.weight.grad, ref.weight.grad, rtol=1e-10, atol=1e-13)


def _survives(make: Callable[[nn.Module], nn.Module]) -> bool:
    m = make(nn.Linear(8, 8))
    m(torch.randn(2, 8)).sum().backward()
    w = weakref.ref(m.weight)
    del m
    gc.collect()
    return w() is not None


def test_dropped_model_is_freed() -> None:
    if _survives(lambda m: torchreg.L1(m, 1e-3)):
        pytest.xfail("this branch's engine keeps a dropped regularized model alive whatever the rule "
                     "(a cycle through a tensor hook); the check below applies once the engine is fixed")
    assert not _survives(lambda m: torchreg.Orthogonal(m, 1e-3))
