"""Mixed precision with torchreg: tell it about the GradScaler with ``torchreg.configure``.

``torch.amp.GradScaler`` multiplies the loss by a scale S before backward, so every gradient seen
during backward is S times too large until ``scaler.unscale_(optimizer)`` (or ``scaler.step``)
divides by S. torchreg adds the regularization gradient during backward, so it must multiply it by
S too; declare the scaler once:

    torchreg.configure(model, grad_scaler=scaler)

torchreg then reads the scale as a device tensor each backward (no host synchronization) and follows
it as the scaler grows or backs off. Without it the penalty gradient would end up divided by S.

The loop below is the standard AMP recipe: autocast forward, ``scaler.scale(loss).backward()``,
``unscale_``, ``clip_grad_norm_``, ``scaler.step``, ``scaler.update``. On CUDA it uses float16; on
CPU bfloat16 (where a scaler is optional, used here to show the wiring; GradScaler("cpu") works).
One batch is poisoned with an inf to show a skipped step. After ``unscale_`` the gradients are
compared with a reference: a bare copy of the model run under the same autocast, without a scaler,
with the penalty added to the loss explicitly.

Run: python examples/amp.py   (a few seconds on 2 CPU cores)
"""

import copy

import torch
import torch.nn.functional as F
from torch import nn

import torchreg

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.float16 if DEVICE == "cuda" else torch.bfloat16
STEPS, BATCH = 40, 64
L2 = 1e-2
OVERFLOW_STEP = 15  # demo only: this batch gets an inf, as an fp16 overflow would


def main() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 1)).to(DEVICE)
    reference = copy.deepcopy(model)  # for the check only: the same model without torchreg

    torchreg.apply_regularization(model, {nn.Linear: torchreg.L2(lam=L2)})  # L2 on every Linear weight
    scaler = torch.amp.GradScaler(DEVICE, init_scale=2.0**12, growth_interval=10)
    torchreg.configure(model, grad_scaler=scaler)  # the one line AMP needs

    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)  # decay comes from torchreg
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=1e-2, weight_decay=0.0)
    g = torch.Generator().manual_seed(1)
    true_w = torch.randn(20, 1, generator=g)
    worst = 0.0
    print(f"device {DEVICE}, autocast {DTYPE}, GradScaler init_scale {scaler.get_scale():.0f}")
    for step in range(STEPS):
        x = torch.randn(BATCH, 20, generator=g)
        y = torch.tanh(x @ true_w / 4)
        if step == OVERFLOW_STEP:
            x[0, 0] = float("inf")
        x, y = x.to(DEVICE), y.to(DEVICE)

        # --- the training step a user writes ---
        opt.zero_grad(set_to_none=True)
        with torch.autocast(DEVICE, dtype=DTYPE):
            out = model(x)
        loss = F.mse_loss(out.float(), y)
        scaler.scale(loss).backward()  # torchreg adds scale * penalty gradient here
        scaler.unscale_(opt)  # now p.grad is the true gradient of loss + penalty
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0)  # clips the regularized gradient
        scale = scaler.get_scale()
        scaler.step(opt)  # skipped if the gradients hold inf/NaN
        scaler.update()  # backs off after a skip, grows after growth_interval good steps
        skipped = scaler.get_scale() < scale

        # --- check: same autocast, no scaler, penalty in the loss ---
        note = ""
        if not skipped:
            ref_opt.zero_grad(set_to_none=True)
            with torch.autocast(DEVICE, dtype=DTYPE):
                ref_out = reference(x)
            weights = [p for name, p in reference.named_parameters() if name.endswith("weight")]
            (F.mse_loss(ref_out.float(), y) + sum(L2 / 2 * w.pow(2).sum() for w in weights)).backward()
            torch.nn.utils.clip_grad_norm_(reference.parameters(), max_norm=1.0)
            diff = max((p.grad - q.grad).abs().max().item() for p, q in zip(model.parameters(), reference.parameters()))
            worst = max(worst, diff)
            ref_opt.step()
            note = f"max |grad - reference grad| {diff:.2e}"
        else:
            note = f"step skipped (inf/NaN gradients), scale {scale:.0f} -> {scaler.get_scale():.0f}"
        if step % 5 == 0 or skipped or step == STEPS - 1:
            print(f"step {step:3d}  loss {loss.item():.4f}  scale {scale:7.0f}  {note}")

    print(f"max |grad - reference grad| over all steps: {worst:.2e}")


if __name__ == "__main__":
    main()
