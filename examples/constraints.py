"""Keras-style weight constraints after every optimizer step: MaxNorm, UnitNorm, MinMaxNorm, NonNeg.

A small MLP with dropout (the setting of max-norm regularization, Srivastava et al. 2014) is trained
with Adam at a high learning rate on a synthetic 10-class problem, once per variant; only the rules
applied to its ``nn.Linear`` layers differ. After training it prints, per variant, the largest and
smallest norm of a hidden unit's incoming weights (one norm per row of the first layer's weight, the
default ``dim=0``), the fraction of negative weights, and the test accuracy:

* ``MaxNorm(1.5)``: no row norm above 1.5;
* ``UnitNorm()``: every row norm 1 (to Keras' epsilon);
* ``MinMaxNorm(0.5, 2.0)``: every row norm in [0.5, 2];
* ``NonNeg()``: no negative weight;
* ``L2 + MaxNorm``: a penalty and a constraint on the same weights, as a tuple of rules.

Run: python examples/constraints.py   (a few seconds; --steps N for a shorter run)
"""

import argparse

import torch
from torch import nn

import torchreg

VARIANTS = {
    "none": None,
    "MaxNorm(1.5)": torchreg.MaxNorm(1.5),
    "UnitNorm()": torchreg.UnitNorm(),
    "MinMaxNorm(0.5, 2.0)": torchreg.MinMaxNorm(0.5, 2.0),
    "NonNeg()": torchreg.NonNeg(),
    "L2 + MaxNorm": (torchreg.L2(1e-3), torchreg.MaxNorm(1.5)),
}


def make_data(n: int, generator: torch.Generator):
    centers = torch.randn(10, 20, generator=torch.Generator().manual_seed(0)) * 2
    y = torch.randint(0, 10, (n,), generator=generator)
    return centers[y] + torch.randn(n, 20, generator=generator) * 2, y


def train(rules, steps: int):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 10))
    if rules is not None:
        torchreg.apply_regularization(model, {nn.Linear: rules})
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x, y = make_data(64, generator)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()  # the optimizer's update, then the projection (torchreg's optimizer step hook)
    model.eval()
    x, y = make_data(1000, torch.Generator().manual_seed(2))
    with torch.no_grad():
        accuracy = (model(x).argmax(1) == y).float().mean().item()
    return model, accuracy


def main() -> None:
    torch.set_num_threads(1)  # tiny matrices: threads cost more than they give
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    args = parser.parse_args()
    print(f"{'constraint':<22}{'max norm':>10}{'min norm':>10}{'negative':>10}{'accuracy':>10}")
    for name, rules in VARIANTS.items():
        model, accuracy = train(rules, args.steps)
        norms = torch.linalg.vector_norm(model[0].weight.detach(), dim=1)
        negative = torch.cat([model[0].weight.flatten(), model[3].weight.flatten()]).lt(0).float().mean()
        print(f"{name:<22}{norms.max().item():>10.4f}{norms.min().item():>10.4f}"
              f"{100 * negative.item():>9.1f}%{accuracy:>10.3f}")
    print()
    print(torchreg.summary(model))


if __name__ == "__main__":
    main()
