"""Lightning: one callback applies torchreg's rules and keeps it in step with the Trainer.

``torchreg.lightning.Regularization(rules)`` regularizes the LightningModule at setup and declares
``accumulate_grad_batches`` and the fp16 GradScaler (``precision="16-mixed"`` on a GPU) before the
first backward, so gradients equal those of ``loss + penalty``. ``torchreg.param_groups`` gives AdamW
its decay / no-decay groups from the same selection (weights decay; biases, LayerNorm do not).

Run: ``python examples/lightning_train.py`` (synthetic data, a few seconds on CPU; needs lightning).
"""

import lightning.pytorch as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import torchreg
import torchreg.lightning


class Model(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(32, 64), nn.LayerNorm(64), nn.ReLU(), nn.Linear(64, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)            # no penalty in the loss

    def configure_optimizers(self):
        return torch.optim.AdamW(torchreg.param_groups(self, weight_decay=0.01), lr=1e-2)


if __name__ == "__main__":
    torch.manual_seed(0)
    x = torch.randn(256, 32)
    y = x[:, :4].sum(1, keepdim=True) + 0.1 * torch.randn(256, 1)  # only 4 inputs matter
    model = Model()
    trainer = L.Trainer(
        max_epochs=2, accumulate_grad_batches=4, gradient_clip_val=1.0, accelerator="cpu",
        callbacks=[torchreg.lightning.Regularization({nn.Linear: torchreg.L1(lam=1e-4)})],
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(model, DataLoader(TensorDataset(x, y), batch_size=32))
    print(torchreg.summary(model))
