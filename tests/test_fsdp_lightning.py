"""Lightning's ModelParallelStrategy (FSDP2) on 2 CPU processes, with the torchreg callback.

The callback applies the rules at ``setup``, before ``configure_model`` shards the layers with
``fully_shard`` (torchreg applied before sharding), and declares ``accumulate_grad_batches=2``.
Run as a script (``python tests/test_fsdp_lightning.py``), Lightning's launcher starts the second
process; each fit runs twice, with the callback and with the penalty added to the loss, and rank 0
compares the gathered parameters and prints ``FSDP2 OK``.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
L1, L2 = 2e-2, 1e-1


def main() -> None:  # pragma: no cover - runs in the launched processes
    import warnings

    import lightning.pytorch as L
    from lightning.pytorch.strategies import ModelParallelStrategy
    from torch.distributed.fsdp import fully_shard
    from torch.utils.data import DataLoader, TensorDataset

    import torchreg
    import torchreg.lightning

    class Net(L.LightningModule):
        def __init__(self, reference: bool = False) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 2))
            self.reference = reference

        def configure_model(self) -> None:
            mesh = self.device_mesh["data_parallel"]
            for layer in self.net:
                if isinstance(layer, nn.Linear):
                    fully_shard(layer, mesh=mesh)
            fully_shard(self.net, mesh=mesh)

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = nn.functional.mse_loss(self.net(x), y)
            if self.reference:  # outside forward the weights are sharded DTensors: a partial sum per rank
                for m in self.net:
                    if isinstance(m, nn.Linear):
                        penalty = L1 * m.weight.abs().sum() + L2 / 2 * (m.weight ** 2).sum()
                        loss = loss + penalty.full_tensor()
            return loss

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-2, weight_decay=0.0)

    def fit(module, callbacks):
        g = torch.Generator().manual_seed(1)
        x = torch.randn(32, 6, generator=g)
        data = DataLoader(TensorDataset(x, torch.stack([x.sum(1), x[:, 0]], 1)), batch_size=4)
        trainer = L.Trainer(accelerator="cpu", devices=2, strategy=ModelParallelStrategy(), max_epochs=1,
                            accumulate_grad_batches=2, callbacks=callbacks, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.fit(module, data)
        lost = [str(w.message) for w in caught if "torchreg" in str(w.message)]
        assert not lost, lost
        return trainer, [p.full_tensor() if hasattr(p, "full_tensor") else p for p in module.parameters()]

    ours = Net()
    trainer, got = fit(ours, [torchreg.lightning.Regularization({nn.Linear: torchreg.ElasticNet(l1=L1, l2=L2)})])
    _, want = fit(Net(reference=True), [])
    if trainer.global_rank == 0:
        assert trainer.global_step >= 2, trainer.global_step
        torch.manual_seed(0)
        start = list(nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 2)).parameters())
        for p, q, s in zip(got, want, start):
            torch.testing.assert_close(p, q)
            assert (p - s).abs().max() > 1e-3
        print("FSDP2 OK", flush=True)


def test_lightning_model_parallel_strategy_matches_the_penalty_in_the_loss() -> None:
    pytest.importorskip("lightning")
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    for _ in range(5):  # gloo's exit-time abort (see tests/test_integration_lightning.py): retried
        proc = subprocess.run([sys.executable, os.path.abspath(__file__)], capture_output=True, text=True,
                              timeout=300, cwd=ROOT, env={**env, "PYTHONPATH": ROOT})
        if proc.returncode == 0 or "terminate called without an active exception" not in proc.stderr:
            break
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "FSDP2 OK" in proc.stdout


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    main()
