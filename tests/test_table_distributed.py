"""Every row of the regularizer table under DistributedDataParallel: 2 gloo processes, one spawn.

The module-scoped fixture spawns the two ranks once; each runs every row in turn (the wrapper form on
the three layers of ``regularizer_table.Net``, wrapped in DDP, 2 SGD steps on its half of each batch, in
one backward or in k=2 micro-batches, the first under ``no_sync()``, declared with ``configure``)
and saves its gradients and weights per step. Each row is then checked here against the
single-process reference on the full batch (the row's penalty added to the loss once, or its operator
applied by hand after the step), and the two ranks against each other, bit for bit.
"""

from __future__ import annotations

import datetime
import os
import traceback
from typing import Any, Dict, List

import pytest
import torch

import torchreg
from regularizer_table import (  # noqa: F401
    OPTIMIZERS, TABLE, TARGETS, Reference, Row, batch, make_net, params, readout,
)
from test_training_loops import WORLD, spawn_ranks

STEPS, N = 2, 12  # 2 steps of a global batch of 12 rows: 6 per rank
KS = (1, 2)  # micro-batches per rank per step (k > 1: declared with configure, the first under no_sync)


def _run_row(row: Row, rank: int, k: int) -> Dict[str, Any]:
    import contextlib

    from torch.nn.parallel import DistributedDataParallel as DDP

    model = row.regularize(make_net(), TARGETS)
    if k > 1:
        torchreg.configure(model, accumulation_steps=k)
    ddp = DDP(model)
    opt = OPTIMIZERS["SGD"](ddp.parameters())
    record: Dict[str, Any] = {"grads": [], "params": []}
    for step in range(STEPS):
        opt.zero_grad()
        micro = batch(N, seed=step).chunk(WORLD)[rank].chunk(k)
        for i, x in enumerate(micro):  # all but the last micro-batch under no_sync()
            with contextlib.nullcontext() if i == k - 1 else ddp.no_sync():
                (readout(ddp(x)) / k).backward()
        record["grads"].append({n: p.grad.clone() for n, p in model.named_parameters()})
        opt.step()
        record["params"].append({n: p.detach().clone() for n, p in model.named_parameters()})
    return record


def _worker(rank: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    results: Dict[str, Any] = {}
    try:
        for row in TABLE:
            if "ddp" in row.skip:
                continue
            for k in KS:
                try:
                    results[row.id, k] = _run_row(row, rank, k)
                except Exception:  # reported by the test of that row
                    results[row.id, k] = {"error": traceback.format_exc()}
                dist.barrier()
    finally:
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> List[Dict[str, Any]]:
    return spawn_ranks(_worker, tmp_path_factory.mktemp("table_ddp"))


@pytest.mark.parametrize("row, k", params("ddp", ("k", KS)))
def test_ddp_matches_full_batch_and_ranks_agree(row: Row, k: int, ranks: List[Dict[str, Any]]) -> None:
    records = [results[row.id, k] for results in ranks]
    for rank, record in enumerate(records):
        assert "error" not in record, f"rank {rank}:\n{record['error']}"
    ref = Reference(row, make_net(), TARGETS)
    ref_opt = OPTIMIZERS["SGD"](ref.model.parameters())
    for step in range(STEPS):
        ref_opt.zero_grad()
        (readout(ref.model(batch(N, seed=step))) + ref.penalty()).backward()
        ref.step(ref_opt)
        for name, p in ref.model.named_parameters():
            g0, g1 = (record["grads"][step][name] for record in records)
            w0, w1 = (record["params"][step][name] for record in records)
            assert torch.equal(g0, g1) and torch.equal(w0, w1), f"step {step} {name}: the ranks differ"
            torch.testing.assert_close(g0, p.grad, msg=lambda m: f"step {step} grad {name}: {m}")
            torch.testing.assert_close(w0, p.detach(), msg=lambda m: f"step {step} {name}: {m}")
