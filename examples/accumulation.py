"""Gradient accumulation with torchreg: tell it k with ``torchreg.configure``.

With gradient accumulation each optimizer step follows k backward passes of ``loss_i / k``. torchreg
adds the regularization gradient on every backward pass, so it must know k to add ``1/k`` of it each
time; then the accumulated gradient is exactly the full-batch gradient of ``loss + penalty``:

    torchreg.configure(model, accumulation_steps=k)   # once, after regularizing, before training

Without it, each of the k backwards adds the whole penalty gradient (k times too much), and
torchreg warns once.

This script trains a small regressor with k = 4 micro-batches per step and, at every step, compares
the accumulated gradients with a reference: a bare copy of the model given the full batch and the
penalty added to the loss explicitly.

Run: python examples/accumulation.py   (a few seconds on 2 CPU cores)
"""

import copy

import torch
import torch.nn.functional as F
from torch import nn

import torchreg

ACCUMULATION_STEPS = 4  # k micro-batches per optimizer step
BATCH = 64  # rows per optimizer step; each micro-batch has BATCH // k rows
STEPS = 60
L1, L2 = 1e-3, 1e-2


def make_data(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(STEPS * BATCH, 10, generator=g)
    true_w = torch.zeros(10)
    true_w[:3] = torch.tensor([2.0, -1.0, 0.5])
    y = (x @ true_w + 0.1 * torch.randn(len(x), generator=g)).unsqueeze(1)
    return x, y


def main() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 1))
    reference = copy.deepcopy(model)  # for the check only: the same model without torchreg

    # 1. Regularize: ElasticNet on every Linear weight (biases are left alone by default).
    torchreg.apply_regularization(model, {nn.Linear: torchreg.ElasticNet(l1=L1, l2=L2)})
    # 2. Declare the accumulation: each backward now adds 1/k of the penalty gradient.
    torchreg.configure(model, accumulation_steps=ACCUMULATION_STEPS)

    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.05)
    x, y = make_data()
    worst = 0.0
    print(f"gradient accumulation: {ACCUMULATION_STEPS} micro-batches of {BATCH // ACCUMULATION_STEPS} rows per step")
    for step in range(STEPS):
        xb, yb = x[step * BATCH:(step + 1) * BATCH], y[step * BATCH:(step + 1) * BATCH]

        # --- the training step a user writes: nothing torchreg-specific in it ---
        opt.zero_grad(set_to_none=True)
        loss = 0.0
        for xm, ym in zip(xb.chunk(ACCUMULATION_STEPS), yb.chunk(ACCUMULATION_STEPS)):
            micro_loss = F.mse_loss(model(xm), ym) / ACCUMULATION_STEPS
            micro_loss.backward()  # torchreg adds 1/k of the penalty gradient here
            loss += micro_loss.item()

        # --- check: full-batch reference with the penalty in the loss, computed by autograd ---
        ref_opt.zero_grad(set_to_none=True)
        weights = [p for name, p in reference.named_parameters() if name.endswith("weight")]
        penalty = sum(L1 * w.abs().sum() + L2 / 2 * w.pow(2).sum() for w in weights)
        (F.mse_loss(reference(xb), yb) + penalty).backward()
        diff = max((p.grad - q.grad).abs().max().item() for p, q in zip(model.parameters(), reference.parameters()))
        worst = max(worst, diff)

        opt.step()
        ref_opt.step()
        if step % 10 == 0 or step == STEPS - 1:
            # torchreg.penalty(model) is for logging only: the gradient is already added.
            print(f"step {step:3d}  loss {loss:.4f}  penalty {torchreg.penalty(model).item():.4f}  "
                  f"max |grad - reference grad| {diff:.2e}")

    print(f"max |grad - reference grad| over all steps: {worst:.2e}")


if __name__ == "__main__":
    main()
