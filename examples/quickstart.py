"""torchreg quick start: the same small network trained bare, with L1, L2 and ElasticNet.

The data is a regression whose true coefficients are sparse: 40 inputs, of which only 5 matter.
L1 drives the first layer's weights on the 35 useless inputs towards zero; L2 shrinks every weight;
ElasticNet does a bit of both. The loss and the training loop are the same for all four: torchreg
adds the regularization gradient during ``loss.backward()``.

Run: python3 examples/quickstart.py   (about 20 seconds on 2 CPU cores shared with other work; README.md)
"""

import torch
from torch import nn

import torchreg

N_FEATURES, N_INFORMATIVE, N_TRAIN, N_TEST = 40, 5, 200, 2000
STEPS, LR = 1500, 0.02
NEAR_ZERO = 1e-2  # a weight counts as "near zero" below this magnitude


def make_data(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    true_coef = torch.zeros(N_FEATURES)
    true_coef[:N_INFORMATIVE] = torch.tensor([3.0, -2.0, 1.5, -1.0, 0.5])

    def draw(n):
        x = torch.randn(n, N_FEATURES, generator=g)
        return x, x @ true_coef + 0.5 * torch.randn(n, generator=g)

    return draw(N_TRAIN), draw(N_TEST)


def make_net(seed: int = 1) -> nn.Sequential:
    torch.manual_seed(seed)  # the same initial weights for every variant
    return nn.Sequential(nn.Linear(N_FEATURES, 16), nn.ReLU(), nn.Linear(16, 1))


def regularize(kind: str, net: nn.Sequential) -> nn.Sequential:
    """Wrap the network's layers; each call returns the same layer object, regularized."""
    if kind == "L1":
        net[0] = torchreg.L1(net[0], lam=3e-2)
    elif kind == "L2":
        net[0] = torchreg.L2(net[0], lam=3e-2)
        net[2] = torchreg.L2(net[2], lam=3e-2)
    elif kind == "ElasticNet":
        net[0] = torchreg.ElasticNet(net[0], l1=2e-2, l2=1e-2)
    return net


def train(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    opt = torch.optim.SGD(net.parameters(), lr=LR, momentum=0.9)
    for _ in range(STEPS):
        opt.zero_grad()
        loss = nn.functional.mse_loss(net(x).squeeze(-1), y)
        loss.backward()  # torchreg adds the regularization gradient here
        opt.step()


def main() -> None:
    (x_train, y_train), (x_test, y_test) = make_data()
    header = f"{'variant':<11} {'test MSE':>9} {'near-zero W1':>13} {'|W1| (L1)':>10} {'||W1||2':>8} {'penalty':>8}"
    print(header)
    print("-" * len(header))
    for kind in ("bare", "L1", "L2", "ElasticNet"):
        net = regularize(kind, make_net())
        train(net, x_train, y_train)
        with torch.no_grad():
            test_mse = nn.functional.mse_loss(net(x_test).squeeze(-1), y_test).item()
            w1 = net[0].weight
            near_zero = (w1.abs() < NEAR_ZERO).float().mean().item()
            print(
                f"{kind:<11} {test_mse:>9.3f} {near_zero:>13.0%} {w1.abs().sum().item():>10.2f} "
                f"{w1.norm().item():>8.2f} {torchreg.penalty(net).item():>8.3f}"
            )
    print("\nW1: first layer's weight. penalty: torchreg.penalty(net), the regularization term's value.")


if __name__ == "__main__":
    main()
