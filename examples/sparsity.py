"""Exact sparsity: sign-gradient L1 against proximal L1, ElasticNet and group lasso.

The same sparse regression and network as examples/quickstart.py (40 inputs, of which 5 matter). The
first layer is regularized five ways; the loss and the training loop (SGD with momentum) are the same.

* ``L1 (gradient)``: ``lam * sign(w)`` added to the gradient; weights oscillate around 0, none is 0;
* ``L1 (proximal)``: soft-thresholding after each optimizer step: exact zeros;
* ``ElasticNet (proximal)``: the same with an L2 part;
* ``GroupLasso (proximal)``: groups are the input features (``dim=1``: a column of the first layer's
  weight), so whole inputs are switched off.

It prints, per variant: the fraction of exact zeros in the first layer, the input features whose
weights are all exactly zero, the test error, how many of the 5 informative inputs are kept and of
the 35 useless ones dropped (the support), and the median time per training step. With matplotlib installed (it is not a dependency
of torchreg) it also saves a PNG of the first layer's weight magnitudes per input feature.

Run: python examples/sparsity.py   (about 15 seconds on 2 CPU cores; --steps N for a shorter run)
"""

import argparse
import pathlib
import sys
import time

import torch
from torch import nn

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from quickstart import LR, N_FEATURES, N_INFORMATIVE, STEPS, make_data, make_net  # noqa: E402

import torchreg  # noqa: E402

VARIANTS = {
    "bare": lambda layer: layer,
    "L1 (gradient)": lambda layer: torchreg.L1(layer, lam=0.1),
    "L1 (proximal)": lambda layer: torchreg.L1(layer, lam=0.1, proximal=True),
    "ElasticNet (prox.)": lambda layer: torchreg.ElasticNet(layer, l1=0.1, l2=0.05, proximal=True),
    "GroupLasso (prox.)": lambda layer: torchreg.GroupLasso(layer, lam=0.2, dim=1, proximal=True),
}


def train(net: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int) -> float:
    """Train; return the median time per step in milliseconds."""
    opt = torch.optim.SGD(net.parameters(), lr=LR, momentum=0.9)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        opt.zero_grad()
        loss = nn.functional.mse_loss(net(x).squeeze(-1), y)
        loss.backward()
        opt.step()  # a proximal regularizer thresholds here (torchreg's optimizer step hook)
        times.append(time.perf_counter() - start)
    return 1e3 * sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--png", default="sparsity.png", help="where to save the plot (needs matplotlib)")
    args = parser.parse_args()

    torch.set_num_threads(1)  # a tiny model: more threads only add overhead
    (x_train, y_train), (x_test, y_test) = make_data()
    header = (f"{'variant':<19} {'zeros W1':>8} {'zero inputs':>11} {'test MSE':>9} "
              f"{'informative kept':>16} {'useless dropped':>15} {'ms/step':>8}")
    print(header)
    print("-" * len(header))
    magnitudes = {}
    for name, regularize in VARIANTS.items():
        net = make_net()
        regularize(net[0])
        ms = train(net, x_train, y_train, args.steps)
        with torch.no_grad():
            w1 = net[0].weight
            test_mse = nn.functional.mse_loss(net(x_test).squeeze(-1), y_test).item()
            used = (w1 != 0).any(0)  # an input is used if any weight on it is not exactly 0
            kept, dropped = int(used[:N_INFORMATIVE].sum()), int((~used[N_INFORMATIVE:]).sum())
            magnitudes[name] = w1.abs().sum(0)
        print(f"{name:<19} {(w1 == 0).float().mean().item():>8.0%} {int((~used).sum()):>5} of {N_FEATURES:<3} "
              f"{test_mse:>9.3f} {kept:>10} of {N_INFORMATIVE} {dropped:>9} of {N_FEATURES - N_INFORMATIVE} "
              f"{ms:>8.3f}")
        if name == "GroupLasso (prox.)":
            report = torchreg.sparsity(net)
    print("\nzeros W1: exact zeros in the first layer's weight. zero inputs: input features whose weights are "
          f"all exactly 0\n(the support: the first {N_INFORMATIVE} inputs are informative). "
          "torchreg.sparsity(net) for the group lasso variant:\n")
    print(report)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(len(magnitudes), 1, figsize=(8, 1.6 * len(magnitudes)), sharex=True)
    for ax, (name, m) in zip(axes, magnitudes.items()):
        ax.bar(range(N_FEATURES), m.numpy(), color=["C1" if i < N_INFORMATIVE else "C0" for i in range(N_FEATURES)])
        ax.set_ylabel(name, rotation=0, ha="right", fontsize=8)
        ax.set_yscale("symlog", linthresh=1e-3)
    axes[-1].set_xlabel("input feature (orange: informative)")
    fig.suptitle("sum over neurons of |W1| per input feature")
    fig.tight_layout()
    fig.savefig(args.png, dpi=100)
    print(f"\nsaved {args.png}")


if __name__ == "__main__":
    main()
