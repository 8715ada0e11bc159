"""DistributedDataParallel with torchreg, with gradient accumulation over ``no_sync()``.

Regularize the model *before* wrapping it in DDP, and declare the accumulation as without DDP:

    torchreg.apply_regularization(model, {nn.Linear: torchreg.L1(lam=...)})
    torchreg.configure(model, accumulation_steps=K)
    ddp_model = DistributedDataParallel(model)

Under an initialized process group torchreg adds the regularization gradient at the very end of
backward, after DDP has averaged the data gradients over the ranks, so every rank gets the same
gradient: the full-batch gradient of ``loss + penalty``, with the penalty counted once (not once
per rank, and not divided by the world size).

Each of the 2 ranks gets its own shard of every batch. Rank 0 also keeps a reference (a bare copy of
the model taken before torchreg, given the whole batch with the penalty added to the loss) and prints
how far the DDP gradients are from it, and how far the ranks are from each other.

Run (CPU, gloo; under a minute on 2 cores):
    torchrun --nproc_per_node 2 examples/ddp.py
    python examples/ddp.py                      # spawns the 2 processes itself
"""

import contextlib
import copy
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import torchreg

ACCUMULATION_STEPS = 2  # micro-batches per rank per optimizer step
BATCH = 64  # global rows per optimizer step, split over ranks, then over micro-batches
STEPS = 30
L1 = 1e-3


def train(rank: int, world_size: int) -> None:
    torch.manual_seed(0)  # same initial weights on every rank (DDP broadcasts rank 0's anyway)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 1))
    reference = copy.deepcopy(model) if rank == 0 else None  # for the check only

    torchreg.apply_regularization(model, {nn.Linear: torchreg.L1(lam=L1)})  # 1. regularize
    torchreg.configure(model, accumulation_steps=ACCUMULATION_STEPS)  # 2. declare accumulation
    ddp_model = DDP(model)  # 3. then wrap

    opt = torch.optim.SGD(ddp_model.parameters(), lr=0.05)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.05) if reference is not None else None
    g = torch.Generator().manual_seed(1)  # every rank draws the same global batch, keeps its shard
    true_w = torch.randn(16, 1, generator=g)
    worst, worst_between_ranks = 0.0, 0.0
    if rank == 0:
        print(f"world size {world_size}, {ACCUMULATION_STEPS} micro-batches per rank per step", flush=True)
    for step in range(STEPS):
        x = torch.randn(BATCH, 16, generator=g)
        y = x @ true_w + 0.1 * torch.randn(BATCH, 1, generator=g)
        x_rank, y_rank = x.chunk(world_size)[rank], y.chunk(world_size)[rank]

        # --- the training step a user writes ---
        opt.zero_grad(set_to_none=True)
        micro_batches = list(zip(x_rank.chunk(ACCUMULATION_STEPS), y_rank.chunk(ACCUMULATION_STEPS)))
        loss = torch.zeros(())
        for i, (xm, ym) in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            # no_sync() skips the all-reduce on all but the last micro-batch
            with contextlib.nullcontext() if last else ddp_model.no_sync():
                micro_loss = F.mse_loss(ddp_model(xm), ym) / ACCUMULATION_STEPS
                micro_loss.backward()
            loss += micro_loss.detach()
        dist.all_reduce(loss)  # for printing: the mean loss over ranks

        # --- check 1: every rank has the same gradient as rank 0 ---
        flat = torch.cat([p.grad.flatten() for p in model.parameters()])
        flat0 = flat.clone()
        dist.broadcast(flat0, src=0)
        between = (flat - flat0).abs().max()
        dist.all_reduce(between, op=dist.ReduceOp.MAX)
        worst_between_ranks = max(worst_between_ranks, between.item())

        # --- check 2 (rank 0): the whole batch on the bare reference, penalty in the loss ---
        if reference is not None:
            ref_opt.zero_grad(set_to_none=True)
            weights = [p for name, p in reference.named_parameters() if name.endswith("weight")]
            (F.mse_loss(reference(x), y) + L1 * sum(w.abs().sum() for w in weights)).backward()
            diff = max((p.grad - q.grad).abs().max().item() for p, q in zip(model.parameters(), reference.parameters()))
            worst = max(worst, diff)
            ref_opt.step()
            if step % 5 == 0 or step == STEPS - 1:
                print(f"step {step:3d}  loss {loss.item() / world_size:.4f}  "
                      f"max |grad - reference grad| {diff:.2e}  max |grad - rank 0 grad| {between.item():.1e}",
                      flush=True)
        opt.step()

    if rank == 0:
        print(f"max |grad - reference grad| over all steps: {worst:.2e}", flush=True)
        print(f"max |grad - rank 0 grad| over all steps: {worst_between_ranks:.1e}", flush=True)


def _spawned(rank: int, world_size: int) -> None:
    dist.init_process_group("gloo", rank=rank, world_size=world_size)  # MASTER_ADDR/PORT from the parent
    try:
        train(rank, world_size)
    finally:
        dist.destroy_process_group()


def main() -> None:
    if "RANK" in os.environ:  # started by torchrun, which sets RANK, WORLD_SIZE, MASTER_ADDR/PORT
        dist.init_process_group("gloo")  # "nccl" for GPUs, with the model and data on cuda:LOCAL_RANK
        try:
            train(dist.get_rank(), dist.get_world_size())
        finally:
            dist.destroy_process_group()
    else:  # plain `python examples/ddp.py`: start 2 processes on this machine
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        mp.spawn(_spawned, args=(2,), nprocs=2, join=True)


if __name__ == "__main__":
    main()
