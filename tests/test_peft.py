"""A PEFT (LoRA) model: rules select the adapters by name and leave the frozen base weights alone.

The frozen base weights show in the summary as not covered and frozen, and cost nothing per step: no
hook on them and no forward hook on the model. The adapters' gradients are autograd's of
``loss + penalty`` on a copy without torchreg. Skipped when ``peft`` is not installed.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import torchreg
from reference import assert_same_grads, explicit_penalty

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

pytestmark = [pytest.mark.filterwarnings("error:torchreg"), pytest.mark.filterwarnings("error:apply_regularization")]

IDS = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
ADAPTERS = "*.lora_[AB].*"  # the Linear inside lora_A / lora_B: "....c_attn.lora_A.default"


def lora_gpt2() -> nn.Module:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64, n_positions=16,
                                         bos_token_id=0, eos_token_id=0)
        model = peft.get_peft_model(transformers.GPT2LMHeadModel(config),
                                    peft.LoraConfig(r=4, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True,
                                                    lora_dropout=0.0))
    with torch.no_grad():  # lora_B starts at zero: give it values, so that its term is not 0
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.1)
    return model.eval()


def loss_of(model: nn.Module) -> torch.Tensor:
    return model(input_ids=IDS, labels=IDS).loss


def adapter_names(model: nn.Module) -> list:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def test_rules_select_the_adapters_and_the_gradients_match_autograd():
    model = lora_gpt2()
    ref = copy.deepcopy(model)
    torchreg.apply_regularization(model, {ADAPTERS: torchreg.L2(0.1)})
    adapters = adapter_names(model)
    assert len(adapters) == 6 and all(".lora_A." in n or ".lora_B." in n for n in adapters)
    hooked = [n for n, p in model.named_parameters() if torchreg._engine.owner_of(p) is not None]
    assert hooked == adapters  # the frozen base weights are not selected
    loss_of(model).backward()
    params = dict(ref.named_parameters())
    (loss_of(ref) + explicit_penalty((params[n], 0.0, 0.1) for n in adapters)).backward()
    assert_same_grads(model, ref)


def test_frozen_base_weights_show_as_frozen_and_cost_nothing_per_step():
    model = lora_gpt2()
    torchreg.apply_regularization(model, {ADAPTERS: torchreg.L2(0.1)})
    s = torchreg.summary(model)
    assert [(g["type"], g["count"], g["frozen"]) for g in s.uncovered] == [("Embedding", 2, 2), ("Conv1D", 4, 4)]
    assert "not covered: 4 weights of Conv1D (3,072 elements, frozen)" in str(s).splitlines()
    assert all("frozen" not in r["note"] for r in s.records)  # every covered weight trains
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert frozen and not any(p._post_accumulate_grad_hooks for p in frozen)  # no hook on a frozen weight
    loss_of(model).backward()  # (the first-forward watchers on the adapters' modules go at their first forward)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())  # nothing per forward


def test_a_class_rule_that_reaches_a_frozen_weight_says_so():
    """{nn.Linear: ...} also matches the frozen lm_head (tied to wte): the summary says it is frozen, and
    a forward hook waits for it to be trained; selecting the adapters by name avoids both."""
    model = lora_gpt2()
    torchreg.apply_regularization(model, {nn.Linear: torchreg.L2(0.1)})
    rows = {r["module"]: r for r in torchreg.summary(model).records}
    head = rows["base_model.model.lm_head"]
    assert head["note"] == ("weight frozen (requires_grad=False): no gradient term until it is trained; weight tied "
                            "to base_model.model.transformer.wte.weight")
    assert model._forward_hooks  # a forward hook on the model waits for lm_head.weight to be trained
