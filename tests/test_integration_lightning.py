"""torchreg.lightning.Regularization inside the real Lightning Trainer, against the penalty in the loss.

Each case trains the same tiny model twice with the same Trainer settings: once with the callback
(rules applied at setup, accumulation and scaler declared by the callback), once without torchreg and
``explicit_penalty`` added to the training-step loss. Lightning divides both losses by
``accumulate_grad_batches``; 6 batches with accumulation 4 also cover the short last window.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

L = pytest.importorskip("lightning.pytorch")
import torchreg  # noqa: E402
import torchreg.lightning  # noqa: E402
from tests.reference import explicit_penalty  # noqa: E402

L1, L2 = 1e-2, 1e-1
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_module_class(base):
    class Net(base.LightningModule):
        def __init__(self, optimizer="adamw", reference=False):
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(6, 16), nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, 1))
            self.optimizer, self.reference = optimizer, reference

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = nn.functional.mse_loss(self.net(x).float(), y)
            if self.reference:
                linears = [m for m in self.net if isinstance(m, nn.Linear)]
                loss = loss + explicit_penalty((m.weight, L1, L2) for m in linears)
            return loss

        def configure_optimizers(self):
            if self.optimizer == "sgd":
                return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)
            return torch.optim.AdamW(self.parameters(), lr=1e-2, weight_decay=0.01)

    return Net


Net = make_module_class(L)


def loader():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(24, 6, generator=g)
    return DataLoader(TensorDataset(x, x.sum(1, keepdim=True) + 0.1), batch_size=4)


def fit(base, module, callbacks, **trainer_kwargs):
    settings = dict(accelerator="cpu", devices=1, max_epochs=2, accumulate_grad_batches=4, gradient_clip_val=0.5,
                    logger=False, enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False, num_sanity_val_steps=0)
    settings.update(trainer_kwargs)
    if callable(settings.get("plugins")):                     # a fresh plugin (and scaler) per fit
        settings["plugins"] = settings["plugins"]()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                       # Lightning's advice on num_workers etc.
        trainer = base.Trainer(callbacks=callbacks, **settings)
        trainer.fit(module, loader())
    return trainer, module


def run_pair(base=L, optimizer="adamw", extra_callbacks=(), **trainer_kwargs):
    Module = Net if base is L else make_module_class(base)
    rules = {nn.Linear: torchreg.ElasticNet(l1=L1, l2=L2)}
    trainer, ours = fit(base, Module(optimizer), [torchreg.lightning.Regularization(rules), *extra_callbacks()],
                        **trainer_kwargs)
    _, reference = fit(base, Module(optimizer, reference=True), [*extra_callbacks()], **trainer_kwargs)
    return trainer, ours, reference


def assert_same_params(a, b, **tol):
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, msg=lambda m: f"{name}: {m}", **tol)


def no_callbacks():
    return []


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_accumulation_and_clipping_match_penalty_in_loss(optimizer):
    trainer, ours, reference = run_pair(optimizer=optimizer, extra_callbacks=no_callbacks)
    assert trainer.global_step == 4                          # 2 epochs x (one window of 4 + one of 2)
    assert_same_params(ours, reference)
    units = list(torchreg._engine.units_in(ours))
    assert [u.accumulation_steps for u in units] == [4]


def test_without_the_callback_the_accumulation_would_be_wrong():
    """The pair above is sensitive: declaring nothing (k=1) moves the parameters visibly."""
    rules = {nn.Linear: torchreg.ElasticNet(l1=L1, l2=L2)}
    module = torchreg.apply_regularization(Net("sgd"), rules)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                       # torchreg's "more backwards than declared"
        fit(L, module, [])
    _, reference = fit(L, Net("sgd", reference=True), [])
    with pytest.raises(AssertionError):
        assert_same_params(module, reference)


def test_accumulation_scheduler_is_redeclared():
    from lightning.pytorch.callbacks import GradientAccumulationScheduler

    def scheduler():
        return [GradientAccumulationScheduler({0: 4, 1: 2})]

    trainer, ours, reference = run_pair(optimizer="sgd", extra_callbacks=scheduler, accumulate_grad_batches=1)
    assert trainer.global_step == 2 + 3
    assert_same_params(ours, reference)
    assert [u.accumulation_steps for u in torchreg._engine.units_in(ours)] == [2]


def test_bf16_mixed_on_cpu():
    _, ours, reference = run_pair(precision="bf16-mixed", extra_callbacks=no_callbacks)
    assert_same_params(ours, reference)


def test_fp16_mixed_declares_the_precision_plugins_scaler():
    # precision="16-mixed" means bf16 on CPU; the plugin made by hand is Lightning's fp16 AMP with its
    # GradScaler, as on a GPU.
    from lightning.pytorch.plugins import MixedPrecision

    trainer, ours, reference = run_pair(optimizer="sgd", plugins=lambda: [MixedPrecision("16-mixed", "cpu")],
                                        extra_callbacks=no_callbacks)
    scaler = trainer.precision_plugin.scaler
    assert isinstance(scaler, torch.amp.GradScaler) and scaler.get_scale() > 1
    assert [u.grad_scaler for u in torchreg._engine.units_in(ours)] == [scaler]
    assert_same_params(ours, reference)


def test_pytorch_lightning_package():
    pl = pytest.importorskip("pytorch_lightning")
    _, ours, reference = run_pair(base=pl, optimizer="sgd", extra_callbacks=no_callbacks)
    assert_same_params(ours, reference)


def test_model_regularized_in_init_and_fit_twice():
    rules = {nn.Linear: torchreg.ElasticNet(l1=L1, l2=L2)}
    module = torchreg.apply_regularization(Net("sgd"), rules)
    callback = torchreg.lightning.Regularization()
    fit(L, module, [callback], max_epochs=1)
    fit(L, module, [callback], max_epochs=1)                  # a second fit re-declares, applies nothing
    reference = Net("sgd", reference=True)
    fit(L, reference, [], max_epochs=1)
    fit(L, reference, [], max_epochs=1)
    assert_same_params(module, reference)


def test_errors():
    with pytest.raises(TypeError, match="rules must be a mapping"):
        torchreg.lightning.Regularization([nn.Linear])
    with pytest.raises(TypeError, match="a value must be a torchreg regularizer"):
        torchreg.lightning.Regularization({nn.Linear: 1e-4})
    with pytest.raises(ValueError, match="nothing in Net is regularized"):
        fit(L, Net(), [torchreg.lightning.Regularization()])
    with pytest.raises(ValueError, match="matched no module"):
        fit(L, Net(), [torchreg.lightning.Regularization({nn.Conv2d: torchreg.L2(lam=1.0)}, strict=True)])


def test_import_torchreg_does_not_import_integrations():
    code = "import sys, torchreg; print(sorted(m for m in ('lightning', 'pytorch_lightning', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": ROOT}).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("strategy", ["ddp", "ddp_spawn"])
def test_ddp_two_cpu_processes(strategy):
    """Lightning's own DDP launch with 2 gloo processes (about 10 s for ddp, 14 s on a quiet machine for
    ddp_spawn, which starts and imports fresh interpreters for each fit); the script compares in rank 0."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    for _ in range(5):  # gloo's exit-time abort, see GLOO_EXIT_ABORT in test_examples_loops.py: retried
        proc = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "lightning_ddp_check.py"), strategy],
                              capture_output=True, text=True, timeout=300, cwd=ROOT, env={**env, "PYTHONPATH": ROOT})
        if proc.returncode == 0 or "terminate called without an active exception" not in proc.stderr:
            break
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "DDP OK" in proc.stdout


def test_pytorch_lightning_only_and_neither():
    """With ``lightning`` not importable the callback subclasses pytorch_lightning's; with neither (nor
    transformers), importing the integration modules names what to install."""
    pytest.importorskip("pytorch_lightning")
    code = """
import sys
sys.modules["lightning"] = sys.modules["lightning.pytorch"] = None      # as if not installed
import pytorch_lightning, torchreg.lightning
assert issubclass(torchreg.lightning.Regularization, pytorch_lightning.Callback)
del sys.modules["torchreg.lightning"]
sys.modules["pytorch_lightning"] = sys.modules["transformers"] = None
for module in ("torchreg.lightning", "torchreg.hf"):
    try:
        __import__(module)
    except ImportError as error:
        print(error)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": ROOT})
    assert out.returncode == 0, out.stderr[-2000:]
    assert "torchreg.lightning needs Lightning: python3 -m pip install lightning" in out.stdout, out.stdout
    assert "torchreg.hf needs transformers: python3 -m pip install transformers accelerate" in out.stdout, out.stdout


def test_manual_optimization_declares_only_the_scaler():
    """Lightning does not divide the loss under manual optimization: the user's own declaration of
    accumulation stays (the callback must not reset it to accumulate_grad_batches = 1)."""

    class Manual(Net):
        def __init__(self, reference=False):
            super().__init__("sgd", reference)
            self.automatic_optimization = False

        def training_step(self, batch, batch_idx):
            opt = self.optimizers()
            self.manual_backward(super().training_step(batch, batch_idx) / 2)
            if batch_idx % 2 == 1:
                opt.step()
                opt.zero_grad()

    rules = {nn.Linear: torchreg.ElasticNet(l1=L1, l2=L2)}
    ours = torchreg.configure(torchreg.apply_regularization(Manual(), rules), accumulation_steps=2)
    fit(L, ours, [torchreg.lightning.Regularization()], accumulate_grad_batches=1, gradient_clip_val=None)
    assert [u.accumulation_steps for u in torchreg._engine.units_in(ours)] == [2]
    reference = Manual(reference=True)
    fit(L, reference, [], accumulate_grad_batches=1, gradient_clip_val=None)
    assert_same_params(ours, reference)


def test_callback_keeps_no_model_alive():
    import gc
    import weakref

    callback = torchreg.lightning.Regularization({nn.Linear: torchreg.L2(lam=0.1)})
    trainer, module = fit(L, Net(), [callback], max_epochs=1)
    assert isinstance(callback._applied_to, weakref.ref) and callback._applied_to() is module
    weight = weakref.ref(module.net[0].weight)
    # Lightning sets `callback.log = pl_module.log` on every callback, so the callback is dropped too;
    # what this checks is that nothing else (torchreg's hooks, a cycle through the callback, a global)
    # holds the regularized model.
    del trainer, module, callback
    gc.collect()
    assert weight() is None
