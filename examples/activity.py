"""A sparse autoencoder: Keras' ``activity_regularizer=l1(...)`` on the code layer, in PyTorch.

The data are made here: each 64-dimensional input is a sum of 3 atoms out of a dictionary of 48, with
random positive weights, plus a little noise. An autoencoder with a 128-unit ReLU code is trained
twice on them, from the same initial weights: once bare, once with

    torchreg.ActivityL1(model.code, lam=LAM)

which adds, at each backward, the gradient of ``LAM * sum(|code|) / batch`` w.r.t. the code the
forward produced: the penalty a Keras user gets from ``activity_regularizer``, with no change to the
loss or the training loop. The script prints, for each run, the fraction of inactive code units
(exactly 0 after the ReLU) per input and over the whole test set, and the test reconstruction error.
The L1 penalty makes the code sparse at a small cost in reconstruction. With matplotlib installed it
also writes ``--png`` (default ``activity_codes.png``): the codes of 40 test inputs, bare vs L1.

Run: ``python examples/activity.py`` (a few seconds on a laptop CPU); ``--steps 300`` for a quick run.
"""

import argparse
import copy

import torch
from torch import nn

import torchreg

LAM = 3e-3  # the L1 strength on the code: lam * sum|code| / batch


def make_data(n: int, generator: torch.Generator, dictionary: torch.Tensor) -> torch.Tensor:
    """``n`` inputs, each a positive combination of 3 of the dictionary's atoms plus noise."""
    atoms, dim = dictionary.shape
    picks = torch.rand(n, atoms, generator=generator).argsort(dim=1)[:, :3]
    weights = torch.zeros(n, atoms).scatter_(1, picks, 0.5 + torch.rand(n, 3, generator=generator))
    return weights @ dictionary + 0.01 * torch.randn(n, dim, generator=generator)


class AutoEncoder(nn.Module):
    def __init__(self, dim: int = 64, code: int = 128) -> None:
        super().__init__()
        self.encoder = nn.Linear(dim, code)
        self.code = nn.ReLU()  # the code layer: its output is what activity regularization penalizes
        self.decoder = nn.Linear(code, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.code(self.encoder(x)))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.code(self.encoder(x))


def train(model: nn.Module, data: torch.Tensor, steps: int, batch: int = 64, seed: int = 0) -> None:
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = data[torch.randint(0, len(data), (batch,), generator=g)]
        opt.zero_grad()
        nn.functional.mse_loss(model(x), x).backward()  # the loss as it is: torchreg adds the L1 term
        opt.step()


@torch.no_grad()
def report(name: str, model: AutoEncoder, test: torch.Tensor) -> torch.Tensor:
    code = model.encode(test)
    inactive = (code == 0).float().mean().item()
    dead = (code == 0).all(dim=0).float().mean().item()
    active_per_input = (code > 0).sum(dim=1).float().mean().item()
    error = nn.functional.mse_loss(model(test), test).item()
    print(f"{name:<12}{inactive:>10.1%}{active_per_input:>14.1f}{dead:>10.1%}{error:>12.5f}")
    return code


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--png", default="activity_codes.png", help="where to write the picture ('' for none)")
    args = ap.parse_args()

    g = torch.Generator().manual_seed(0)
    dictionary = torch.randn(48, 64, generator=g) / 8
    train_data, test = make_data(4096, g, dictionary), make_data(512, g, dictionary)

    torch.manual_seed(0)
    bare = AutoEncoder()
    sparse = copy.deepcopy(bare)  # the same initial weights
    torchreg.ActivityL1(sparse.code, lam=LAM)  # returns sparse.code itself, now regularized
    row = torchreg.summary(sparse).records[0]
    print(f"{row['regularizer']} on {row['module']!r} ({row['type']}): penalty lam * sum|code| / batch\n")

    for model in (bare, sparse):
        train(model, train_data, args.steps)
    print(f"{'model':<12}{'inactive':>10}{'active/input':>14}{'dead':>10}{'test MSE':>12}")
    print("-" * 58)
    codes = [report("bare", bare, test), report("ActivityL1", sparse, test)]
    print(f"\ninactive: code entries exactly 0 (over inputs and units); active/input: units > 0 per input "
          f"(of {codes[0].shape[1]}; each input is made of 3 atoms); dead: units 0 on every test input; "
          f"test MSE: reconstruction error (the data's variance is {test.var().item():.4f})")

    if args.png:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            print("(matplotlib is not installed: no picture)")
            return
        fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
        for ax, code, title in zip(axes, codes, ("bare", f"ActivityL1(lam={LAM})")):
            ax.imshow(code[:40].numpy(), aspect="auto", cmap="magma", interpolation="nearest")
            ax.set(title=title, xlabel="code unit")
        axes[0].set_ylabel("test input")
        fig.tight_layout()
        fig.savefig(args.png, dpi=120)
        print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
