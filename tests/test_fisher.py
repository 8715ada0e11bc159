"""torchreg.fisher_diagonal against a per-sample loop of plain autograd (one sample, one backward)."""

from __future__ import annotations

import copy
from typing import Callable, Dict, List, Tuple

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import torchreg


def loop_fisher(model: nn.Module, batches: List[Tuple[Tensor, Tensor]], loss_fn: Callable) -> Dict[str, Tensor]:
    """The reference: for every sample alone, autograd's gradient of its loss, squared; the mean."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = [p for n, p in model.named_parameters() if p.requires_grad]
    total = [torch.zeros_like(p) for p in params]
    count = 0
    for x, y in batches:
        for i in range(y.shape[0]):
            xi = tuple(t[i : i + 1] for t in x) if isinstance(x, tuple) else (x[i : i + 1],)
            loss = loss_fn(model(*xi), y[i : i + 1])
            for t, g in zip(total, torch.autograd.grad(loss, params)):
                t += g.square()
            count += 1
    return {n: t / count for n, t in zip(names, total)}


def assert_same(got: Dict[str, Tensor], want: Dict[str, Tensor], **tol) -> None:
    assert list(got) == list(want)
    for name in want:
        assert got[name].shape == want[name].shape and got[name].dtype == want[name].dtype, name
        torch.testing.assert_close(got[name], want[name], msg=lambda m: f"{name}: {m}", **tol)


def classification(n: int, d: int, classes: int, seed: int) -> Tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64), torch.randint(classes, (n,), generator=g)


def test_mlp_cross_entropy_matches_per_sample_loop() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    data = classification(23, 5, 3, seed=1)
    batches = [(data[0][:8], data[1][:8]), (data[0][8:11], data[1][8:11]), (data[0][11:], data[1][11:])]
    got = torchreg.fisher_diagonal(model, batches, F.cross_entropy)
    want = loop_fisher(model, batches, F.cross_entropy)
    assert_same(got, want)
    # not the squared mean gradient of a batch (the usual mistake): that is much smaller here
    loss = F.cross_entropy(model(data[0]), data[1])
    squared_mean = torch.autograd.grad(loss, model[0].weight)[0].square()
    assert (squared_mean.sum() < 0.5 * got["0.weight"].sum()), (squared_mean.sum(), got["0.weight"].sum())


def test_batching_does_not_matter() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2)).double()
    x, y = classification(12, 4, 2, seed=2)
    one = torchreg.fisher_diagonal(model, [(x, y)], F.cross_entropy)
    many = torchreg.fisher_diagonal(model, [(x[i : i + 5], y[i : i + 5]) for i in range(0, 12, 5)], F.cross_entropy)
    assert_same(many, one)


def test_conv_batchnorm_eval_frozen_and_buffers() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 5 * 5, 4)
    ).double()
    model[1].running_mean.uniform_(-1, 1)
    model[1].running_var.uniform_(0.5, 2)
    model[0].bias.requires_grad_(False)  # frozen: not in the result, still used by the forward
    model.eval()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(9, 2, 5, 5, generator=g, dtype=torch.float64)
    y = torch.randint(4, (9,), generator=g)
    got = torchreg.fisher_diagonal(model, [(x[:4], y[:4]), (x[4:], y[4:])], F.cross_entropy)
    want = loop_fisher(model, [(x[:4], y[:4]), (x[4:], y[4:])], F.cross_entropy)
    assert "0.bias" not in got
    assert_same(got, want)


def test_tied_weights_tuple_inputs_and_regression_loss() -> None:
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(10, 4)
            self.mix = nn.Linear(4, 4)
            self.out = nn.Linear(4, 10, bias=False)
            self.out.weight = self.emb.weight  # tied: one parameter, named once

        def forward(self, tokens: Tensor, scale: Tensor) -> Tensor:
            return self.out(torch.tanh(self.mix(self.emb(tokens) * scale[:, None])))

    torch.manual_seed(0)
    model = Tied().double()
    g = torch.Generator().manual_seed(4)
    tokens = torch.randint(10, (7,), generator=g)
    scale = torch.rand(7, generator=g, dtype=torch.float64)
    target = torch.randn(7, 10, generator=g, dtype=torch.float64)
    mse = lambda out, t: F.mse_loss(out, t, reduction="sum")  # noqa: E731
    got = torchreg.fisher_diagonal(model, [((tokens, scale), target)], mse)
    want = loop_fisher(model, [((tokens, scale), target)], mse)
    assert list(got) == ["emb.weight", "mix.weight", "mix.bias"]
    assert_same(got, want)


def test_model_left_unchanged_and_hooks_of_torchreg_do_not_interfere() -> None:
    torch.manual_seed(0)
    bare = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    model = torchreg.L2(copy.deepcopy(bare), 0.5)
    before = copy.deepcopy(model.state_dict())
    x, y = classification(6, 3, 2, seed=5)
    got = torchreg.fisher_diagonal(model, [(x, y)], F.cross_entropy)
    assert_same(got, loop_fisher(bare, [(x, y)], F.cross_entropy))  # the penalty is no part of the Fisher
    assert all(p.grad is None for p in model.parameters())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_float32_float16_dtypes_and_nonnegative() -> None:
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    x, y = torch.randn(5, 3), torch.randint(2, (5,))
    got = torchreg.fisher_diagonal(model, [(x, y)], F.cross_entropy)
    assert_same(got, loop_fisher(model, [(x, y)], F.cross_entropy), rtol=1e-5, atol=1e-7)
    assert all((t >= 0).all() for t in got.values())
    half = torchreg.fisher_diagonal(copy.deepcopy(model).half(), [(x.half(), y)], F.cross_entropy)
    assert all(t.dtype == torch.float16 for t in half.values())
    assert_same({k: v.float() for k, v in half.items()}, got, rtol=2e-2, atol=1e-3)


def test_errors_name_the_value() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    x, y = torch.randn(4, 2), torch.randint(2, (4,))
    with pytest.raises(ValueError, match=r"BatchNorm1d '1' is in training mode.*model.eval\(\)"):
        torchreg.fisher_diagonal(model, [(x, y)], F.cross_entropy)
    model.eval()
    with pytest.raises(TypeError, match="nn.Module as model, got str"):
        torchreg.fisher_diagonal("model", [(x, y)], F.cross_entropy)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="callable loss_fn"):
        torchreg.fisher_diagonal(model, [(x, y)], "ce")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="held no sample"):
        torchreg.fisher_diagonal(model, [], F.cross_entropy)
    with pytest.raises(TypeError, match="batch 0 is tuple of length 3"):
        torchreg.fisher_diagonal(model, [(x, y, y)], F.cross_entropy)
    with pytest.raises(ValueError, match=r"batch 0: .*first \(sample\) dimension.*\(4, 2\), \(3,\)"):
        torchreg.fisher_diagonal(model, [(x, y[:3])], F.cross_entropy)
    with pytest.raises(ValueError, match=r"shape \(1,\) for one sample"):
        torchreg.fisher_diagonal(model, [(x, y)], lambda o, t: F.cross_entropy(o, t, reduction="none"))
    active = nn.Sequential(torchreg.ActivityL1(nn.Linear(2, 2), 0.1))
    with pytest.raises(ValueError, match=r"carries activity regularization \(on '0'\).*remove_regularization"):
        torchreg.fisher_diagonal(active, [(x, y)], F.cross_entropy)
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameter"):
        torchreg.fisher_diagonal(model, [(x, y)], F.cross_entropy)
