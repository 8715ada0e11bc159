"""Fine-tuning toward pretrained weights: L2-SP, and sparse fine-tuning deltas.

A network (a two-layer ``body`` and a ``head``) is pretrained on a source task with plenty of data
(8 regression outputs of 20 inputs through 8 hidden features). The target task reads one new output
from the same hidden features, with only 40 noisy samples. The pretrained network gets a new head and
is fine-tuned on them:

* ``scratch``: no pretraining (a baseline);
* ``plain``: fine-tuning with nothing else;
* ``L2 toward 0``: ``torchreg.L2(lam)`` on the body, plain weight decay;
* ``L2-SP``: the body's weights pulled toward the pretrained ones (Li et al., ICML 2018)::

      torchreg.apply_regularization(model, {
          "head": None,                                       # the new head: not regularized
          nn.Linear: torchreg.L2(1.0, center=pretrained),     # lam / 2 * sum (w - w_pretrained) ** 2
      })

  ``center=`` takes the pretrained model (or its ``state_dict()``): each weight's anchor is the
  pretrained tensor of the same name, copied once when the rule is applied;
* ``sparse deltas``: ``torchreg.L1(lam, center=pretrained, proximal=True)``, the proximal operator
  ``c + soft(w - c, t * lam)`` after each optimizer step: most weights stay *exactly* at their
  pretrained values, and the fine-tune is a sparse change (``torchreg.sparsity`` counts the weights
  equal to their center).

It prints the target test MSE, the distance of the body's weights from the pretrained ones (the
Frobenius norm of the change), and the fraction of them left exactly at their pretrained values.

Run: python examples/finetune.py   (a few seconds on 2 CPU cores; --steps N to change the length)
"""

from __future__ import annotations

import argparse
import copy
from typing import Any, Callable, Dict, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import torchreg

D, FEATURES, HIDDEN = 20, 8, 32
_MIX = torch.randn(D, FEATURES, generator=torch.Generator().manual_seed(0)) * (2 / D**0.5)


def make_data(n: int, outputs: int, seed: int, readout_seed: int, noise: float) -> Tuple[Tensor, Tensor]:
    """``y = tanh(x M) R + noise``: tasks sharing the hidden features ``tanh(x M)``, each its readout ``R``."""
    g = torch.Generator().manual_seed(seed)
    readout = torch.randn(FEATURES, outputs, generator=torch.Generator().manual_seed(readout_seed))
    x = torch.randn(n, D, generator=g)
    return x, torch.tanh(x @ _MIX) @ readout + noise * torch.randn(n, outputs, generator=g)


class Net(nn.Module):
    def __init__(self, outputs: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(D, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, HIDDEN), nn.Tanh())
        self.head = nn.Linear(HIDDEN, outputs)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


def train(model: nn.Module, x: Tensor, y: Tensor, steps: int) -> None:
    """A plain loop: the penalty's gradient is added during backward, a prox after ``opt.step()``."""
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(steps):
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        opt.step()


def pretrain(steps: int) -> nn.Module:
    torch.manual_seed(0)
    model = Net(8)
    train(model, *make_data(2000, 8, seed=1, readout_seed=10, noise=0.1), steps)
    return model


def variants(pretrained: nn.Module) -> Dict[str, Callable[[], nn.Module]]:
    def fine_tune_copy() -> nn.Module:
        model = copy.deepcopy(pretrained)
        torch.manual_seed(1)
        model.head = nn.Linear(HIDDEN, 1)  # the new task's head
        return model

    def scratch() -> nn.Module:
        torch.manual_seed(1)
        return Net(1)

    def with_rule(rule: Any) -> Callable[[], nn.Module]:
        return lambda: torchreg.apply_regularization(fine_tune_copy(), {"head": None, nn.Linear: rule})

    return {
        "scratch": scratch,
        "plain": fine_tune_copy,
        "L2 toward 0": with_rule(torchreg.L2(1.0)),
        "L2-SP": with_rule(torchreg.L2(1.0, center=pretrained)),
        "sparse deltas": with_rule(torchreg.L1(3e-3, center=pretrained, proximal=True)),
    }


def run(steps: int = 400, quiet: bool = False) -> Dict[str, Dict[str, float]]:
    """Pretrain, then fine-tune each way; ``{variant: {"test MSE", "distance", "unchanged"}}``."""
    pretrained = pretrain(steps + steps // 2)
    x, y = make_data(40, 1, seed=3, readout_seed=11, noise=0.5)
    x_test, y_test = make_data(2000, 1, seed=4, readout_seed=11, noise=0.0)
    # the body's weights: what the rules regularize (biases are not, by default)
    body = {name: p.detach().clone() for name, p in pretrained.named_parameters()
            if name.startswith("body.") and name.endswith(".weight")}
    results: Dict[str, Dict[str, float]] = {}
    if not quiet:
        print(f"{'variant':<14} {'test MSE':>8} {'distance from pretrained':>24} {'unchanged weights':>17}")
    for name, build in variants(pretrained).items():
        model = build()
        train(model, x, y, steps)
        with torch.no_grad():
            mse = F.mse_loss(model(x_test), y_test).item()
            params = dict(model.named_parameters())
            distance = sum(((params[k] - v) ** 2).sum() for k, v in body.items()).sqrt().item()
            same = sum(int((params[k] == v).sum()) for k, v in body.items()) / sum(v.numel() for v in body.values())
        results[name] = {"test MSE": mse, "distance": distance, "unchanged": same}
        if not quiet:
            print(f"{name:<14} {mse:>8.3f} {distance:>24.3f} {same:>17.1%}")
            if name == "sparse deltas":
                print(f"  torchreg.sparsity counts the weights at their center: "
                      f"{torchreg.sparsity(model).total['zero_fraction']:.1%} of the regularized ones")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400)
    args = parser.parse_args()
    torch.set_num_threads(1)  # a tiny model: more threads only add overhead
    run(args.steps)


if __name__ == "__main__":
    main()
