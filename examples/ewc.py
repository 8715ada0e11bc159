"""Continual learning with EWC: learn task B without forgetting task A.

Two classification tasks for one network (10 inputs, 3 classes): task A's inputs use the first five
features, task B's the last five, each with its own random teacher. The network learns A, then is
fine-tuned on B three ways:

* ``plain``: fine-tuning on B alone; it forgets part of A;
* ``L2 toward A``: ``torchreg.L2(net, lam, center="init", params="*")``, every weight pulled toward its
  value after A with the same strength (L2-SP);
* ``EWC``: ``torchreg.L2(net, lam, center="init", importance=fisher, params="*")``, each weight pulled in
  proportion to its importance for A, the diagonal empirical Fisher of A
  (``torchreg.fisher_diagonal``). Elastic weight consolidation (Kirkpatrick et al., PNAS 2017).

``center="init"`` anchors each weight at its value when the rule is applied: here, after task A. The
penalty is ``lam / 2 * sum F * (w - w_A) ** 2`` (``F = 1`` for the plain L2 toward A).

It prints task A's and task B's test loss and accuracy after each variant: EWC keeps task A's loss far
lower than plain fine-tuning while learning B about as well; the uniform L2 pull keeps A only by
learning B worse.

Run: python examples/ewc.py   (a few seconds on 2 CPU cores; --steps N to change the training length)
"""

from __future__ import annotations

import argparse
import copy
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import torchreg

D, CLASSES, HIDDEN = 10, 3, 64
EWC_LAM, L2_LAM = 1000.0, 0.1


def make_task(seed: int, first_half: bool, n: int = 600) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(x_train, y_train, x_test, y_test)``: a random linear teacher on half of the features."""
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(D, CLASSES, generator=g)
    x = torch.randn(n, D, generator=g)
    if first_half:
        x[:, D // 2:] = 0
    else:
        x[:, : D // 2] = 0
    y = (x @ teacher).argmax(1)
    return x[:400], y[:400], x[400:], y[400:]


def make_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(D, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, CLASSES))


def train(net: nn.Module, x: Tensor, y: Tensor, steps: int) -> None:
    """A plain training loop: the regularizer (if any) adds its gradient during backward."""
    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()


def evaluate(net: nn.Module, x: Tensor, y: Tensor) -> Tuple[float, float]:
    with torch.no_grad():
        out = net(x)
        return F.cross_entropy(out, y).item(), (out.argmax(1) == y).float().mean().item()


def run(steps: int = 300, quiet: bool = False) -> Dict[str, Dict[str, float]]:
    """Train A, then B three ways; returns ``{variant: {"A loss", "A acc", "B loss", "B acc"}}``."""
    task_a, task_b = make_task(1, True), make_task(2, False)
    net = make_net()
    train(net, task_a[0], task_a[1], steps)
    net.eval()
    fisher = torchreg.fisher_diagonal(net, [(task_a[0], task_a[1])], F.cross_entropy)

    variants: Dict[str, Optional[Dict]] = {
        "plain": None,
        "L2 toward A": dict(lam=L2_LAM, center="init", params="*"),
        "EWC": dict(lam=EWC_LAM, center="init", importance=fisher, params="*"),
    }
    results: Dict[str, Dict[str, float]] = {}
    after_a = dict(zip(("A loss", "A acc"), evaluate(net, *task_a[2:])))
    if not quiet:
        print(f"after task A: A loss {after_a['A loss']:.3f}, A accuracy {after_a['A acc']:.1%}")
        print(f"{'variant':<12} {'A loss':>7} {'A acc':>6} {'B loss':>7} {'B acc':>6}")
    for name, kwargs in variants.items():
        model = copy.deepcopy(net)
        if kwargs is not None:
            torchreg.L2(model, **kwargs)  # anchors: a copy of each weight now, i.e. after task A
        model.train()
        train(model, task_b[0], task_b[1], steps)
        model.eval()
        (a_loss, a_acc), (b_loss, b_acc) = evaluate(model, *task_a[2:]), evaluate(model, *task_b[2:])
        results[name] = {"A loss": a_loss, "A acc": a_acc, "B loss": b_loss, "B acc": b_acc}
        if not quiet:
            print(f"{name:<12} {a_loss:>7.3f} {a_acc:>6.1%} {b_loss:>7.3f} {b_acc:>6.1%}")
    if not quiet:
        print(f"EWC keeps task A's test loss at {results['EWC']['A loss']:.3f} against "
              f"{results['plain']['A loss']:.3f} for plain fine-tuning")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    torch.set_num_threads(1)  # a tiny model: more threads only add overhead
    run(args.steps)


if __name__ == "__main__":
    main()
