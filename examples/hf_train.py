"""Hugging Face Trainer: ``torchreg.hf.attach(trainer, rules)`` is the one added line.

It regularizes ``trainer.model`` and adds a callback that declares, before each optimizer step, how
many micro-batches the step accumulates and the accelerator's fp16 GradScaler, so gradients equal
those of ``loss + penalty``. ``torchreg.hf.LINEAR_LAYERS`` is ``(nn.Linear, Conv1D)``: GPT-2's
projections are transformers' ``Conv1D``, which an ``nn.Linear`` rule does not match.

Run: ``python examples/hf_train.py`` (a tiny GPT-2 built from a config, random tokens, no download;
a few seconds on CPU; needs transformers and accelerate).
"""

import tempfile

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

import torchreg
import torchreg.hf

torch.manual_seed(0)
model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=128, n_positions=32))
tokens = torch.randint(0, 128, (64, 16))
data = [{"input_ids": ids, "labels": ids} for ids in tokens]
args = TrainingArguments(
    tempfile.mkdtemp(), per_device_train_batch_size=8, gradient_accumulation_steps=4, max_grad_norm=1.0,
    num_train_epochs=2, use_cpu=True, report_to=[], save_strategy="no", disable_tqdm=True,
)
optimizer = torch.optim.AdamW(torchreg.param_groups(model, weight_decay=0.01), lr=1e-3)
trainer = Trainer(model=model, args=args, train_dataset=data, optimizers=(optimizer, None))
torchreg.hf.attach(trainer, {torchreg.hf.LINEAR_LAYERS: torchreg.L1(lam=1e-5)})
trainer.train()
print(torchreg.summary(model))
