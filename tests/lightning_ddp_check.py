"""Run by tests/test_integration_lightning.py: ``python tests/lightning_ddp_check.py ddp_spawn|ddp``.

Trains a tiny model with Lightning on 2 CPU processes (gloo) twice, with the torchreg callback and
with the penalty in the loss, and prints ``DDP OK`` when the final parameters agree. Not a test
module itself (pytest imports it only for doctests; everything runs under ``__main__``).
"""

import os
import sys

if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
from torch import nn

try:
    import lightning.pytorch as L
except ImportError:  # collected for doctests where Lightning is absent
    L = None

L1, L2 = 1e-2, 1e-1

if L is not None:

    class Net(L.LightningModule):
        def __init__(self, reference=False):
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 1))
            self.reference = reference

        def training_step(self, batch, batch_idx):
            from tests.reference import explicit_penalty

            x, y = batch
            loss = nn.functional.mse_loss(self.net(x), y)
            if self.reference:
                loss = loss + explicit_penalty((m.weight, L1, L2) for m in self.net if isinstance(m, nn.Linear))
            return loss

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-2)


def main(strategy):
    import warnings
    from torch.utils.data import DataLoader, TensorDataset

    import torchreg
    import torchreg.lightning

    def fit(module, callbacks):
        g = torch.Generator().manual_seed(1)
        x = torch.randn(32, 6, generator=g)
        data = DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=4)
        trainer = L.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_epochs=1,
                            accumulate_grad_batches=2, gradient_clip_val=0.5, callbacks=callbacks, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.fit(module, data)
        return trainer

    ours = Net()
    rules = {nn.Linear: torchreg.ElasticNet(l1=L1, l2=L2)}
    trainer = fit(ours, [torchreg.lightning.Regularization(rules)])
    reference = Net(reference=True)
    fit(reference, [])
    if trainer.global_rank == 0:
        if strategy == "ddp":                                    # ddp_spawn does not return the loop state
            assert trainer.global_step == 2, trainer.global_step  # 32 samples / 2 ranks / 4 per batch / 2
        for (name, p), q in zip(ours.named_parameters(), reference.parameters()):
            torch.testing.assert_close(p, q, msg=lambda m: f"{name}: {m}")
        moved = max((p - q).abs().max().item() for p, q in zip(ours.parameters(), Net().parameters()))
        assert moved > 1e-3, moved
        print("DDP OK", strategy, flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
