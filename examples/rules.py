"""Regularize a whole model with rules: one call, no change to the model or the training loop.

``torchreg.apply_regularization(model, rules)`` walks ``model.named_modules()`` and gives each module
to the FIRST rule that matches it. A rule's key is

* a module class (or a tuple of them), matched with ``isinstance`` (subclasses included), or
* a glob pattern over the module's qualified name, as ``named_modules()`` prints it
  (``"layer2.conv1"``; ``*`` also crosses dots),

and its value is a regularizer, a ``functools.partial`` of one, or ``None`` to leave the module alone
whatever later rules say. Each matched module has the parameters it owns directly regularized: by
default its weights (no biases, nothing of a normalization layer).

Conventions (the same as ``torch.optim``'s ``weight_decay``):
    L1(lam):  penalty lam * sum|w|,        gradient lam * sign(w)
    L2(lam):  penalty lam / 2 * sum w**2,  gradient lam * w

Run: ``python examples/rules.py`` (a few seconds on a laptop CPU).
"""

import functools

import torch
from torch import nn

import torchreg


# -- a small ResNet-style image classifier ---------------------------------------------------------
class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:  # 1x1 projection when the shape changes
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class SmallResNet(nn.Module):
    def __init__(self, classes: int = 4) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(inplace=True))
        self.layer1 = BasicBlock(16, 16)
        self.layer2 = BasicBlock(16, 32, stride=2)
        self.layer3 = BasicBlock(32, 64, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(self.pool(x).flatten(1))


# -- synthetic data: each class is a fixed random pattern plus noise ------------------------------------
def make_batch(templates: torch.Tensor, batch_size: int, generator: torch.Generator):
    labels = torch.randint(0, templates.shape[0], (batch_size,), generator=generator)
    images = templates[labels] + 0.8 * torch.randn(batch_size, *templates.shape[1:], generator=generator)
    return images, labels


def main() -> None:
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    templates = torch.randn(4, 3, 16, 16, generator=generator)
    model = SmallResNet(classes=4)

    # The rules, tried in this order for every module; the first one that matches wins.
    rules = {
        # An exclusion: None leaves "stem" and everything inside it alone (stem.0 is the conv fed
        # raw pixels). It comes first, so the nn.Conv2d rule below never sees stem.0.
        "stem": None,
        # A name pattern: lighter decay on the 1x1 projection convs of the shortcuts.
        "layer*.shortcut.0": torchreg.L2(lam=1e-4),
        # Class rules: every other convolution gets weight decay, the classifier a sparse L1 penalty.
        nn.Conv2d: torchreg.L2(lam=5e-4),
        nn.Linear: functools.partial(torchreg.L1, lam=1e-4),  # a partial works as well as an instance
    }
    torchreg.apply_regularization(model, rules)  # same model object, same parameters and state_dict

    # No weight_decay in the optimizer: torchreg adds the regularization gradient during backward.
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    for step in range(1, 31):
        images, labels = make_batch(templates, 32, generator)
        optimizer.zero_grad()
        loss = loss_fn(model(images), labels)  # the data loss only: do NOT add the penalty here
        loss.backward()                        # ... the penalty's gradient is added to .grad now
        optimizer.step()
        if step % 10 == 0:
            # torchreg.penalty() is the value whose gradient was added: for logging only.
            print(f"step {step:2d}  data loss {loss.item():.4f}  penalty {torchreg.penalty(model).item():.5f}")

    # What was regularized, by which rule; modules a rule matched but left alone are listed too.
    print()
    print(torchreg.summary(model))

    with torch.no_grad():
        images, labels = make_batch(templates, 256, generator)
        model.eval()
        accuracy = (model(images).argmax(1) == labels).float().mean().item()
    print(f"\naccuracy on fresh synthetic data: {accuracy:.1%}")
    print(f"penalty: {torchreg.penalty(model).item():.5f}")

    # To fine-tune or export without regularization, take it off; the model is then a plain model.
    torchreg.remove_regularization(model)


if __name__ == "__main__":
    main()
