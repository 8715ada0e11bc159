"""Anchored penalties under DistributedDataParallel and FSDP2: 2 gloo processes, one spawn.

Each rank runs every case (its own half of each batch). The ranks must agree bit for bit, and match
one process training on the concatenated data with the same rules and anchors. A rule with
``center="init"`` applied after ``DDP(model)`` anchors every rank at rank 0's weights (DDP broadcasts
them when it wraps), also when each rank built its model from another seed. Applied after
``fully_shard``, each rank's anchor is its local shard (checked against the slice of the full one).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, List

import pytest
import torch
from torch import nn

import torchreg
from test_training_loops import WORLD, _full, _fully_shard, spawn_cases

STEPS = 4
ROWS = 8  # per rank and step


def build(seed: int = 5) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))  # 3 rows: uneven shards


def pretrained() -> nn.Module:
    return build(seed=6)


def importance() -> Dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return {n: torch.rand(p.shape, generator=g) * 2 for n, p in pretrained().named_parameters()}


def l2sp_ewc_and_sparse_deltas(model: nn.Module) -> None:
    torchreg.apply_regularization(model, {
        "0": torchreg.L2(0.5, center=pretrained(), importance=importance()),
        "2": torchreg.L1(0.05, center=pretrained().state_dict(), proximal=True),
    })


def elastic_init(model: nn.Module) -> None:
    torchreg.ElasticNet(model, 0.05, 0.1, center="init", proximal=True)


def l2_init_gradient(model: nn.Module) -> None:
    torchreg.L2(model, 0.5, center="init")


@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    regularize: Callable[[nn.Module], None]
    optimizer: Callable[[Any], torch.optim.Optimizer]
    fsdp: bool = False
    after_wrap: bool = False  # built from a different seed on each rank, regularized after DDP(model)


CASES = [
    Case("ddp-sgd", l2sp_ewc_and_sparse_deltas, lambda p: torch.optim.SGD(p, lr=0.2, momentum=0.5)),
    Case("ddp-adam-init", elastic_init, lambda p: torch.optim.Adam(p, lr=0.05)),
    Case("ddp-init-after-wrap", l2_init_gradient, lambda p: torch.optim.SGD(p, lr=0.2), after_wrap=True),
    Case("fsdp2-sgd", l2sp_ewc_and_sparse_deltas, lambda p: torch.optim.SGD(p, lr=0.2, momentum=0.5), fsdp=True),
    Case("fsdp2-adam-init", elastic_init, lambda p: torch.optim.Adam(p, lr=0.05), fsdp=True),
    Case("fsdp2-l2-init-gradient", l2_init_gradient, lambda p: torch.optim.SGD(p, lr=0.2), fsdp=True),
]


def batch(step: int) -> Any:
    g = torch.Generator().manual_seed(50 + step)
    return torch.randn(WORLD * ROWS, 6, generator=g), torch.randn(WORLD * ROWS, 3, generator=g)


def loss_of(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((model(x) - y) ** 2).mean()


def local_anchors(model: nn.Module) -> Dict[str, Any]:
    """Per anchored parameter: (local parameter shape, anchor shape, the anchor)."""
    from torchreg import _registry

    out = {}
    for unit in _registry.units_in(model):
        for entry in unit.entries:
            if entry.state is not None:
                p = entry.param
                local = p.to_local() if hasattr(p, "to_local") else p
                out[entry.name] = (tuple(local.shape), tuple(entry.state["center"].shape),
                                   entry.state["center"].clone())
    return out


def run_case(case: Case, rank: int) -> Dict[str, Any]:
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = build(seed=5 + 10 * rank) if case.after_wrap else build()
    if case.fsdp:
        wrapped = _fully_shard(model)
        case.regularize(model)
    elif case.after_wrap:  # DDP broadcasts rank 0's weights when it wraps: "init" is taken after that
        wrapped = DDP(model)
        case.regularize(model)
    else:
        case.regularize(model)
        wrapped = DDP(model)
    record: Dict[str, Any] = {"params": [], "anchors": local_anchors(model)}
    opt = case.optimizer(wrapped.parameters())
    for step in range(STEPS):
        x, y = batch(step)
        opt.zero_grad()
        loss_of(wrapped, x.chunk(WORLD)[rank], y.chunk(WORLD)[rank]).backward()
        opt.step()
        record["params"].append({n: _full(p) for n, p in model.named_parameters()})
    return record


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> List[Dict[str, Any]]:
    return spawn_cases(__name__, tmp_path_factory.mktemp("anchors_ddp"))


def reference(case: Case) -> List[Dict[str, torch.Tensor]]:
    model = build()
    case.regularize(model)
    opt = case.optimizer(model.parameters())
    out = []
    for step in range(STEPS):
        opt.zero_grad()
        loss_of(model, *batch(step)).backward()
        opt.step()
        out.append({n: p.detach().clone() for n, p in model.named_parameters()})
    return out


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_ranks_agree_bitwise_and_match_one_process(case: Case, results: List[Dict[str, Any]]) -> None:
    per_rank = [r[case.id] for r in results]
    for rank, record in enumerate(per_rank):
        assert "crash" not in record, f"rank {rank}:\n{record['crash']}"
    want = reference(case)
    centers = {name: c for name, (_, _, c) in per_rank[0]["anchors"].items()}
    for step, expected in enumerate(want):
        p0, p1 = (record["params"][step] for record in per_rank)
        for name, value in expected.items():
            assert torch.equal(p0[name], p1[name]), f"step {step} {name}: ranks differ"
            torch.testing.assert_close(p0[name], value, rtol=1e-5, atol=1e-6,
                                       msg=lambda m: f"step {step} {name}: {m}")
    # the anchors: one per covered parameter, this rank's part of the full one
    full = {"ddp-sgd": pretrained(), "fsdp2-sgd": pretrained()}.get(case.id.replace("-init", ""), build())
    full_params = dict(full.named_parameters())
    for rank, record in enumerate(per_rank):
        assert record["anchors"], "no anchored parameter"
        for name, (local_shape, anchor_shape, anchor) in record["anchors"].items():
            assert local_shape == anchor_shape, (name, local_shape, anchor_shape)
            whole = full_params[name].detach()
            part = whole.chunk(WORLD)[rank] if case.fsdp else whole
            assert torch.equal(anchor, part), f"rank {rank} {name}: the anchor is not the local part"
    if case.regularize is not l2_init_gradient:  # a proximal rule: some weights end exactly at their anchor
        last = per_rank[0]["params"][-1]
        at_center = sum(int((last[n] == full_params[n].detach()).sum()) for n in centers)
        assert at_center > 0, "the prox left no weight exactly at its center: the case tests nothing"
