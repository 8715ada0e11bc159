"""Proximal regularization under DistributedDataParallel and FSDP2: 2 gloo processes, one spawn.

Each rank runs every case of CASES in turn (its own shard of each batch) and saves its parameters after
each optimizer step. The ranks must agree bit for bit, and match the single-process reference on the
concatenated data (the same optimizer and regularizers, one process).
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


def build() -> nn.Module:
    torch.manual_seed(5)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


def l1_and_groups(model: nn.Module) -> None:
    torchreg.L1(model[0], 0.05, proximal=True)
    torchreg.GroupLasso(model[2], 0.1, dim=1, proximal=True)  # groups: input features of the last layer


def elastic_and_rows(model: nn.Module) -> None:
    torchreg.ElasticNet(model[0], 0.05, 0.1, proximal=True)
    torchreg.GroupLasso(model[2], 0.1, dim=0, proximal=True)  # rows: within FSDP2's Shard(0)


@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    regularize: Callable[[nn.Module], None]
    optimizer: Callable[[Any], torch.optim.Optimizer]
    fsdp: bool = False
    skip_first: bool = False  # the first step's batch has an inf on rank 0: GradScaler skips it
    error: str = ""  # expected error at the first step (nothing may change)


CASES = [
    Case("ddp-sgd-nesterov", l1_and_groups, lambda p: torch.optim.SGD(p, lr=0.2, momentum=0.5, nesterov=True)),
    Case("ddp-adam-group-newton", l1_and_groups, lambda p: torch.optim.Adam(p, lr=0.05)),
    Case("ddp-adamw-grad-scaler-skip", elastic_and_rows, lambda p: torch.optim.AdamW(p, lr=0.05), skip_first=True),
    Case("fsdp2-adam", elastic_and_rows, lambda p: torch.optim.Adam(p, lr=0.05), fsdp=True),
    Case("fsdp2-sgd-l1-whole-model", lambda m: torchreg.L1(m, 0.05, proximal=True),
         lambda p: torch.optim.SGD(p, lr=0.2, momentum=0.5), fsdp=True),
    Case("fsdp2-group-across-shards", l1_and_groups, lambda p: torch.optim.SGD(p, lr=0.2), fsdp=True,
         error="sharded along dim 0"),
]


def batch(step: int) -> Any:
    g = torch.Generator().manual_seed(50 + step)
    x = torch.randn(WORLD * ROWS, 6, generator=g)
    return x, torch.randn(WORLD * ROWS, 3, generator=g)


def loss_of(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((model(x) - y) ** 2).mean()


def run_case(case: Case, rank: int) -> Dict[str, Any]:
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = build()
    if case.fsdp:
        wrapped = _fully_shard(model)
        case.regularize(model)
    else:
        case.regularize(model)
        wrapped = DDP(model)
    opt = case.optimizer(wrapped.parameters())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8) if case.skip_first else None
    record: Dict[str, Any] = {"params": [], "error": None}
    for step in range(STEPS):
        x, y = batch(step)
        x, y = x.chunk(WORLD)[rank], y.chunk(WORLD)[rank]
        if case.skip_first and step == 0 and rank == 0:
            x = x.clone()
            x[0, 0] = float("inf")
        opt.zero_grad()
        loss = loss_of(wrapped, x, y)
        before = [_full(p) for p in model.parameters()]
        try:
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
            else:
                loss.backward()
                opt.step()
        except ValueError as error:
            record["error"] = str(error)
            record["unchanged"] = all(torch.equal(b, _full(p)) for b, p in zip(before, model.parameters()))
            break
        record["params"].append({n: _full(p) for n, p in model.named_parameters()})
    return record


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> List[Dict[str, Any]]:
    return spawn_cases(__name__, tmp_path_factory.mktemp("prox_ddp"))


def reference(case: Case) -> List[Dict[str, torch.Tensor]]:
    """The same training in one process on the concatenated batch (skipped first step: no step at all)."""
    model = build()
    case.regularize(model)
    opt = case.optimizer(model.parameters())
    out = []
    for step in range(STEPS):
        if not (case.skip_first and step == 0):
            x, y = batch(step)
            opt.zero_grad()
            loss_of(model, x, y).backward()
            opt.step()
        out.append({n: p.detach().clone() for n, p in model.named_parameters()})
    return out


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_ranks_agree_bitwise_and_match_one_process(case: Case, results: List[Dict[str, Any]]) -> None:
    per_rank = [r[case.id] for r in results]
    for rank, record in enumerate(per_rank):
        assert "crash" not in record, f"rank {rank}:\n{record['crash']}"
    if case.error:
        for record in per_rank:
            assert record["error"] is not None and case.error in record["error"], record["error"]
            assert record["unchanged"] and not record["params"]
        return
    assert all(record["error"] is None for record in per_rank), [r["error"] for r in per_rank]
    want = reference(case)
    zeros = 0
    for step, expected in enumerate(want):
        p0, p1 = (record["params"][step] for record in per_rank)
        for name, value in expected.items():
            assert torch.equal(p0[name], p1[name]), f"step {step} {name}: ranks differ"
            torch.testing.assert_close(p0[name], value, rtol=1e-5, atol=1e-6, msg=lambda m: f"step {step} {name}: {m}")
            zeros += int((p0[name] == 0).sum())
    assert zeros > 0, "the prox made no exact zero: the case tests nothing"
    if case.skip_first:
        assert torch.equal(per_rank[0]["params"][0]["0.weight"], build()[0].weight.detach())
