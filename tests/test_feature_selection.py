"""``sparsity()`` says *which* outputs, inputs and groups are zero, not only how many.

The indices are checked against an independent computation on the weight (``(w != 0).any(...)``) and,
on a trained tabular regression where only 3 of 8 features matter, against the features the target
does not depend on: ``GroupLasso(first_layer, lam, dim=1, proximal=True)`` drops exactly those.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import torchreg


def reference_indices(w: torch.Tensor, dim: int) -> list:
    """Indices along ``dim`` whose slice is all zero, computed another way (a loop over slices)."""
    return [i for i in range(w.shape[dim]) if not bool(w.select(dim, i).ne(0).any())]


@pytest.mark.parametrize("shape", [(3, 4), (4, 3, 2, 2), (3, 5, 3)], ids=["linear", "conv2d", "conv1d"])
def test_zero_outputs_and_inputs_match_the_slices_of_the_weight(shape):
    torch.manual_seed(0)
    w = torch.randn(shape)
    w[1] = 0.0  # an output
    w[:, 2] = 0.0  # an input
    w[0, 0] = 0.0  # a slice partly zero is not listed
    holder = nn.Module()
    holder.weight = nn.Parameter(w)
    torchreg.L1(holder, 0.1, params="weight")
    (record,) = torchreg.sparsity(holder).records
    assert record["zero_outputs"] == reference_indices(w, 0) == [1]
    assert record["zero_inputs"] == reference_indices(w, 1) == [2]
    assert record["zero_group_indices"] is None and record["groups"] is None


def test_vectors_have_no_output_or_input_indices():
    layer = torchreg.L1(nn.Linear(3, 2), 0.1, params="*")
    records = {r["parameter"]: r for r in torchreg.sparsity(layer).records}
    assert records["bias"]["zero_outputs"] is None and records["bias"]["zero_inputs"] is None
    assert records["weight"]["zero_outputs"] == [] and records["weight"]["zero_inputs"] == []


@pytest.mark.parametrize("dim", [0, 1, -1])
def test_zero_group_indices_are_the_groups_whose_norm_is_zero(dim):
    w = torch.tensor([[1.0, 0.0, 0.0, 2.0], [0.0, 0.0, 0.0, 0.0], [3.0, 0.0, -0.0, 0.0]])
    layer = torchreg.GroupLasso(nn.Linear(4, 3, bias=False), 0.1, dim=dim, proximal=True)
    with torch.no_grad():
        layer.weight.copy_(w)
    (record,) = torchreg.sparsity(layer).records
    assert record["zero_group_indices"] == reference_indices(w, dim % 2)
    assert record["zero_groups"] == len(record["zero_group_indices"])
    assert record["zero_outputs"] == [1] and record["zero_inputs"] == [1, 2]


def test_the_table_shows_the_counts_and_the_total_no_indices():
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    torchreg.apply_regularization(model, {"0": torchreg.GroupLasso(lam=0.1, dim=1, proximal=True),
                                          "2": torchreg.L1(lam=0.1, proximal=True)})
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, 0.0, 0.0, 2.0], [0.0, 0.0, 0.0, 0.0], [3.0, 0.0, 0.0, 0.0]]))
        model[2].weight.copy_(torch.tensor([[0.0, 1.0, 0.0], [1.0, 1.0, 0.0]]))
    report = torchreg.sparsity(model)
    lines = str(report).splitlines()
    assert lines[0].split() == ["parameter", "regularizer", "numel", "zeros", "zero_fraction", "groups",
                                "zero_groups", "zero_outputs", "zero_inputs"]
    assert lines[2].split()[-4:] == ["2", "(50.0%)", "1", "2"]  # row 0.weight: outputs [1], inputs [1, 2]
    assert lines[3].split()[-2:] == ["0", "1"]  # row 2.weight: input 2
    assert lines[-1].split()[-2:] == ["-", "-"]  # the total lists no indices
    assert report.total["zero_inputs"] is None and report.notes == []


def test_gradient_mode_l1_without_exact_zero_says_exact_zeros_need_proximal():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2), nn.ReLU(), nn.Linear(2, 1))
    torchreg.apply_regularization(model, {"0": torchreg.L1(lam=0.1), "2": torchreg.ElasticNet(l1=0.1, l2=0.1),
                                          "4": torchreg.L2(lam=0.1)})
    report = torchreg.sparsity(model)
    assert report.notes == [
        "note: 0.weight has no exact zero: L1(lam=0.1) adds a gradient term, around which weights oscillate; "
        "exact zeros need proximal=True (L1(..., proximal=True))",
        "note: 2.weight has no exact zero: ElasticNet(l1=0.1, l2=0.1) adds a gradient term, around which weights "
        "oscillate; exact zeros need proximal=True (ElasticNet(..., proximal=True))",
    ]  # not L2: it makes no zeros in any mode
    assert str(report).splitlines()[-2:] == report.notes
    with torch.no_grad():
        model[0].weight[0, 0] = 0.0  # one exact zero: no note for it
    assert [n.split()[1] for n in torchreg.sparsity(model).notes] == ["2.weight"]


def test_no_note_for_proximal_or_zero_strength():
    a = torchreg.L1(nn.Linear(3, 2), 0.1, proximal=True)
    b = torchreg.ElasticNet(nn.Linear(3, 2), l1=0.0, l2=0.1)
    assert torchreg.sparsity(a).notes == [] and torchreg.sparsity(b).notes == []


def test_group_lasso_on_the_first_layer_drops_exactly_the_features_the_target_ignores():
    """Tabular regression: y depends on features 0, 1, 2 of 8; zero_inputs after training is 3..7."""
    torch.manual_seed(0)
    n, d = 256, 8
    x = torch.randn(n, d)
    y = (2 * x[:, 0] - 3 * x[:, 1] + torch.sin(2 * x[:, 2]) + 0.1 * torch.randn(n)).unsqueeze(1)
    model = nn.Sequential(nn.Linear(d, 16), nn.Tanh(), nn.Linear(16, 1))
    bare = nn.Sequential(nn.Linear(d, 16), nn.Tanh(), nn.Linear(16, 1))
    bare.load_state_dict(model.state_dict())
    torchreg.GroupLasso(model[0], lam=0.2, dim=1, proximal=True)
    for net in (model, bare):
        opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
        for _ in range(500):
            opt.zero_grad()
            nn.functional.mse_loss(net(x), y).backward()
            opt.step()
    (record,) = torchreg.sparsity(model).records
    w = model[0].weight.detach()
    assert record["zero_inputs"] == [3, 4, 5, 6, 7]
    assert record["zero_inputs"] == reference_indices(w, 1) == record["zero_group_indices"]
    assert record["zero_outputs"] == reference_indices(w, 0)
    assert torchreg.sparsity(bare).records == []  # not regularized: no record
    assert bool((bare[0].weight != 0).all())  # and without the rule no input is dropped
    assert nn.functional.mse_loss(model(x), y).item() < 0.1 * y.var().item()  # the kept features still fit
