"""torchreg.hf.attach inside the real transformers Trainer (CPU), against the penalty in the loss.

Each case trains twice with the same TrainingArguments: with ``torchreg.hf.attach(trainer, rules)``,
and with a Trainer subclass whose ``compute_loss`` adds ``explicit_penalty`` of the same parameters.
24 samples in batches of 4 with accumulation 4 give optimizer steps of 4 and 2 micro-batches per
epoch, so the short last step (``current_gradient_accumulation_steps = 2``) is covered.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
import torchreg  # noqa: E402
import torchreg.hf  # noqa: E402
from tests.reference import explicit_penalty  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments  # noqa: E402
from transformers.pytorch_utils import Conv1D  # noqa: E402

L1, L2 = 1e-2, 1e-1


class Regression(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, 16), nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, 1))

    def forward(self, x, labels=None):
        out = self.net(x).float()
        return {"loss": nn.functional.mse_loss(out, labels), "logits": out}


class Rows(torch.utils.data.Dataset):
    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def regression_data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(24, 6, generator=g)
    return Rows([{"x": x[i], "labels": x[i].sum(0, keepdim=True) + 0.1} for i in range(24)])


def gpt2_model():
    torch.manual_seed(0)
    config = GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64, n_positions=16,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(config)


def gpt2_data():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 64, (24, 8), generator=g)
    return Rows([{"input_ids": ids[i], "labels": ids[i]} for i in range(24)])


def regularized_weights(model):
    """The weights {LINEAR_LAYERS: ...} regularizes, each once (GPT-2's lm_head is tied to wte)."""
    found = {id(m.weight): m.weight for m in model.modules() if isinstance(m, torchreg.hf.LINEAR_LAYERS)}
    return list(found.values())


class PenaltyInLoss(Trainer):
    """The reference: the same Trainer with the penalty added to each micro-batch's loss."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = super().compute_loss(model, inputs, return_outputs=False, num_items_in_batch=num_items_in_batch)
        penalty = explicit_penalty((w, L1, L2) for w in regularized_weights(model))
        if self.model_accepts_loss_kwargs and num_items_in_batch is not None:
            # the Trainer then does not divide the loss by the step's micro-batch count: do it here
            penalty = penalty / self.current_gradient_accumulation_steps
        return loss + penalty


def train(build, data, reference, tmp_path, optimizer="adamw", **arguments):
    settings = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, gradient_accumulation_steps=4,
                    max_grad_norm=0.5, num_train_epochs=2, learning_rate=1e-2, use_cpu=True, report_to=[],
                    save_strategy="no", logging_strategy="no", disable_tqdm=True, seed=0,
                    dataloader_num_workers=0)
    settings.update(arguments)
    model = build()
    optimizers = (None, None)
    if optimizer == "sgd":
        optimizers = (torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cls = PenaltyInLoss if reference else Trainer
        trainer = cls(model=model, args=TrainingArguments(**settings), train_dataset=data(),
                      optimizers=optimizers)
        if not reference:
            torchreg.hf.attach(trainer, {torchreg.hf.LINEAR_LAYERS: torchreg.ElasticNet(l1=L1, l2=L2)})
        trainer.train()
    return trainer, model


def assert_same_params(a, b, **tol):
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, msg=lambda m: f"{name}: {m}", **tol)


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_accumulation_and_clipping_match_penalty_in_loss(tmp_path, optimizer):
    trainer, ours = train(Regression, regression_data, False, tmp_path, optimizer)
    _, reference = train(Regression, regression_data, True, tmp_path, optimizer)
    assert trainer.state.global_step == 4                    # per epoch: a step of 4, a step of 2
    assert_same_params(ours, reference)
    moved = max((p - q).abs().max().item() for p, q in zip(ours.parameters(), Regression().parameters()))
    assert moved > 1e-2


def test_gpt2_conv1d_bf16(tmp_path):
    """GPT-2's Conv1D and tied lm_head, bf16 autocast on CPU, loss normalized by token count."""
    trainer, ours = train(gpt2_model, gpt2_data, False, tmp_path, "sgd", bf16=True)
    assert trainer.model_accepts_loss_kwargs
    assert trainer.accelerator.mixed_precision == "bf16"
    _, reference = train(gpt2_model, gpt2_data, True, tmp_path, "sgd", bf16=True)
    names = {name for name, p in ours.named_parameters() if torchreg._engine.owner_of(p) is not None}
    assert names == {"transformer.wte.weight", "transformer.h.0.attn.c_attn.weight", "transformer.h.0.attn.c_proj.weight",
                     "transformer.h.0.mlp.c_fc.weight", "transformer.h.0.mlp.c_proj.weight"}
    # SGD: with AdamW the last-bit differences (the penalty gradient summed in another order) that
    # bf16 rounding amplifies are normalized by Adam's second moment on near-zero gradients, which
    # moves one bias by 1.3e-4 after 4 steps; SGD keeps them at 4e-9.
    assert_same_params(ours, reference)


def test_fp16_on_cpu(tmp_path):
    """fp16 autocast on CPU: accelerate makes no GradScaler there, so nothing is declared."""
    trainer, ours = train(Regression, regression_data, False, tmp_path, "sgd", fp16=True, num_train_epochs=1)
    assert trainer.accelerator.mixed_precision == "fp16" and torchreg.hf._scaler_of(trainer) is None
    _, reference = train(Regression, regression_data, True, tmp_path, "sgd", fp16=True, num_train_epochs=1)
    assert_same_params(ours, reference)


def test_gpt2_fp32_exact(tmp_path):
    _, ours = train(gpt2_model, gpt2_data, False, tmp_path, num_train_epochs=1)
    _, reference = train(gpt2_model, gpt2_data, True, tmp_path, num_train_epochs=1)
    assert_same_params(ours, reference)


def test_short_last_step_is_declared(tmp_path):
    """What the callback declares follows the trainer's micro-batch count of each step: 4, then 2."""
    seen = []

    class Spy(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            seen.append([u.accumulation_steps for u in torchreg._engine.units_in(model)])

    model = Regression()
    trainer = Trainer(model=model, args=TrainingArguments(str(tmp_path), per_device_train_batch_size=4,
                                                          gradient_accumulation_steps=4, num_train_epochs=1,
                                                          use_cpu=True, report_to=[], disable_tqdm=True),
                      train_dataset=regression_data(), callbacks=[Spy()])
    torchreg.hf.attach(trainer, {nn.Linear: torchreg.L2(lam=0.1)})
    trainer.train()
    assert seen == [[4], [2]]


def test_scaler_found_on_accelerator_or_optimizer():
    """fp16 needs a GPU in transformers; where the scaler is looked up is checked directly."""
    scaler = torch.amp.GradScaler("cpu")

    class Holder:
        pass

    trainer, optimizer = Holder(), Holder()
    trainer.accelerator = Holder()
    trainer.accelerator.scaler = None
    optimizer.scaler = scaler                                  # accelerate's AcceleratedOptimizer.scaler
    assert torchreg.hf._scaler_of(trainer, optimizer) is scaler
    trainer.accelerator.scaler = torch.amp.GradScaler("cpu")
    assert torchreg.hf._scaler_of(trainer, optimizer) is trainer.accelerator.scaler
    assert torchreg.hf._scaler_of(Holder(), None) is None


def test_default_selection_covers_conv1d():
    model = gpt2_model()
    regularized = {name for name, _ in torchreg._select.select(model, None, recurse=True)}
    assert "transformer.h.0.attn.c_attn.weight" in regularized and "transformer.h.0.mlp.c_fc.weight" in regularized
    assert not any("ln_" in n or n.endswith("bias") for n in regularized)
    groups = torchreg.param_groups(model, 0.1)
    assert {id(p) for p in groups[0]["params"]} == {id(p) for _, p in torchreg._select.select(model, None, True)}
    assert not isinstance(model.transformer.h[0].attn.c_attn, nn.Linear)
    assert isinstance(model.transformer.h[0].attn.c_attn, Conv1D)


def test_errors(tmp_path):
    args = TrainingArguments(str(tmp_path), use_cpu=True, report_to=[])
    with pytest.raises(TypeError, match="attach expects a transformers.Trainer"):
        torchreg.hf.attach(Regression(), {nn.Linear: torchreg.L2(lam=0.1)})
    trainer = Trainer(model=Regression(), args=args)
    with pytest.raises(ValueError, match="nothing in Regression is regularized"):
        torchreg.hf.attach(trainer)
    with pytest.raises(TypeError, match="a value must be a torchreg regularizer"):
        torchreg.hf.attach(trainer, {nn.Linear: 0.1})
    assert not any(isinstance(c, torchreg.hf.RegularizationCallback) for c in trainer.callback_handler.callbacks)
    assert not list(torchreg._engine.units_in(trainer.model))


def test_callback_keeps_no_trainer_alive(tmp_path):
    import gc
    import weakref

    trainer, model = train(Regression, regression_data, False, tmp_path, num_train_epochs=1)
    callback = next(c for c in trainer.callback_handler.callbacks if isinstance(c, torchreg.hf.RegularizationCallback))
    weight, trainer_ref = weakref.ref(model.net[0].weight), weakref.ref(trainer)
    del trainer, model
    gc.collect()
    assert weight() is None and trainer_ref() is None and callback._trainer() is None
