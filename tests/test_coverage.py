"""``summary(model)`` says which weights no rule covers, by module type, and a rule whose every selected
parameter is tied to one covered earlier warns.

The GPT-2 situation: transformers' GPT-2 uses its own ``Conv1D`` for attention and MLP, and ties
``lm_head`` to the token embedding, so ``{nn.Linear: L2, nn.Embedding: L1}`` regularizes the embeddings
only. What the summary claims is checked against the gradients: every weight it lists as not covered
gets autograd's bare gradient, every covered one autograd's gradient of ``loss + penalty``.
"""

from __future__ import annotations

import copy
import re
import warnings
from typing import Dict, List

import pytest
import torch
from torch import Tensor, nn

import torchreg
from reference import assert_same_grads, explicit_penalty

pytestmark = [
    pytest.mark.filterwarnings("error:torchreg"),
    pytest.mark.filterwarnings("error:apply_regularization"),
    pytest.mark.filterwarnings("ignore:Lazy modules are a new feature"),
]

TIED = r"rule #1 Linear matched 1 module\(s\) but every parameter it selected is tied"


class Conv1D(nn.Module):
    """transformers.pytorch_utils.Conv1D: weight (in, out), bias (out,)."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.1)
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x: Tensor) -> Tensor:
        return torch.addmm(self.bias, x.reshape(-1, x.size(-1)), self.weight).reshape(*x.shape[:-1], self.nf)


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(d)
        self.c_attn = Conv1D(3 * d, d)
        self.c_proj = Conv1D(d, d)
        self.ln_2 = nn.LayerNorm(d)
        self.c_fc = Conv1D(4 * d, d)
        self.mlp_proj = Conv1D(d, 4 * d)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self.c_attn(self.ln_1(x)).chunk(3, dim=-1)
        att = torch.softmax(q @ k.transpose(-1, -2) / q.size(-1) ** 0.5, dim=-1)
        x = x + self.c_proj(att @ v)
        return x + self.mlp_proj(torch.tanh(self.c_fc(self.ln_2(x))))


class TinyGPT2(nn.Module):
    """GPT-2's layout: wte, wpe, blocks of Conv1D, ln_f, an lm_head tied to wte."""

    def __init__(self, vocab: int = 30, d: int = 8, layers: int = 2, positions: int = 6) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(positions, d)
        self.h = nn.ModuleList(Block(d) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, tokens: Tensor) -> Tensor:
        x = self.wte(tokens) + self.wpe(torch.arange(tokens.size(1)))
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))


TOKENS = torch.randint(0, 30, (2, 6), generator=torch.Generator().manual_seed(0))
CONV1D_NAMES = [f"h.{i}.{n}.weight" for i in range(2) for n in ("c_attn", "c_proj", "c_fc", "mlp_proj")]


def build() -> TinyGPT2:
    torch.manual_seed(0)
    return TinyGPT2()


def loss_of(model: nn.Module) -> Tensor:
    return model(TOKENS).logsumexp(-1).mean()


def test_gpt2_layout_summary_says_conv1d_weights_are_not_covered_and_gradients_agree():
    model = build()
    ref = copy.deepcopy(model)
    with pytest.warns(UserWarning, match=TIED + r".*\(lm_head\.weight is wte\.weight\), so it regularizes nothing"):
        torchreg.apply_regularization(model, {nn.Linear: torchreg.L2(1e-1), nn.Embedding: torchreg.L1(1e-2)})
    s = torchreg.summary(model)
    numel = sum(dict(model.named_parameters())[n].numel() for n in CONV1D_NAMES)
    assert s.uncovered == [dict(type="Conv1D", count=8, numel=numel, frozen=0, parameters=CONV1D_NAMES)]
    assert f"not covered: 8 weights of Conv1D ({numel:,} elements)" in str(s).splitlines()
    # the claim, against autograd: the Conv1D weights get the bare gradient, the embeddings L1's
    loss_of(model).backward()
    params = dict(ref.named_parameters())
    (loss_of(ref) + explicit_penalty((params[n], 1e-2, 0.0) for n in ("wte.weight", "wpe.weight"))).backward()
    assert_same_grads(model, ref)


def test_covering_the_missed_type_empties_the_list():
    model = build()
    torchreg.apply_regularization(model, {Conv1D: torchreg.L2(1e-1), nn.Embedding: torchreg.L1(1e-2)})
    s = torchreg.summary(model)
    assert s.uncovered == []
    assert str(s).splitlines()[-1] == "not covered: none"


def test_strict_raises_for_a_rule_that_only_reaches_tied_parameters_and_changes_nothing():
    model = build()
    with pytest.raises(ValueError, match=TIED):
        torchreg.apply_regularization(model, {nn.Linear: torchreg.L2(1e-1), nn.Embedding: torchreg.L1(1e-2)},
                                      strict=True)
    assert not hasattr(model, "_torchreg_unit")
    assert not model.wte.weight._post_accumulate_grad_hooks


def test_a_tied_rule_that_also_covers_something_else_does_not_warn_that_it_regularizes_nothing():
    model = build()
    model.extra = nn.Linear(8, 8)  # a Linear of its own: the rule selects it
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torchreg.apply_regularization(model, {nn.Embedding: torchreg.L1(1e-2), nn.Linear: torchreg.L2(1e-1)})
    assert len(caught) == 1 and "regularizes nothing" not in str(caught[0].message)
    assert "wte.weight is shared by modules whose rules disagree" in str(caught[0].message)  # L1 vs L2
    assert torchreg.summary(model).uncovered[0]["type"] == "Conv1D"


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.body = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 4))
        self.conv = nn.Conv1d(4, 4, 1)
        self.act = nn.PReLU(4)
        self.head = nn.Linear(4, 2)


def uncovered(model: nn.Module) -> Dict[str, List[str]]:
    return {g["type"]: g["parameters"] for g in torchreg.summary(model).uncovered}


def test_a_none_rule_is_a_decision_not_a_miss():
    model = torchreg.apply_regularization(Net(), {"embed": None, nn.Linear: torchreg.L2(1e-3)})
    assert uncovered(model) == {"Conv1d": ["conv.weight"]}  # PReLU's (4,) slopes are no weight


def test_a_selection_that_leaves_the_weight_out_leaves_it_uncovered():
    model = torchreg.apply_regularization(Net(), {nn.Linear: torchreg.L2(1e-3, params="bias"),
                                                  (nn.Embedding, nn.Conv1d): torchreg.L1(1e-3)})
    assert uncovered(model) == {"Linear": ["body.0.weight", "body.2.weight", "head.weight"]}


def test_frozen_weights_are_listed_and_counted():
    model = Net()
    model.body.requires_grad_(False)
    torchreg.apply_regularization(model, {(nn.Embedding, nn.Conv1d): torchreg.L1(1e-3)})
    s = torchreg.summary(model)
    assert s.uncovered == [dict(type="Linear", count=3, numel=16 + 16 + 8, frozen=2,
                                parameters=["body.0.weight", "body.2.weight", "head.weight"])]
    assert "not covered: 3 weights of Linear (40 elements, 2 frozen)" in str(s)
    model.head.requires_grad_(False)
    assert "not covered: 3 weights of Linear (40 elements, frozen)" in str(torchreg.summary(model))


def test_one_layer_regularized_lists_the_others_and_a_bare_model_lists_all():
    model = Net()
    assert uncovered(model) == {"Embedding": ["embed.weight"], "Linear": ["body.0.weight", "body.2.weight",
                                                                          "head.weight"], "Conv1d": ["conv.weight"]}
    assert torchreg.summary(model).records == []
    torchreg.L1(model.head, 1e-3)
    assert uncovered(model)["Linear"] == ["body.0.weight", "body.2.weight"]


def test_summary_of_a_part_of_a_model_regularized_as_a_whole():
    model = torchreg.apply_regularization(Net(), {nn.Linear: torchreg.L2(1e-3)})
    assert uncovered(model.body) == {}                       # covered by the unit on the enclosing model
    assert uncovered(model) == {"Embedding": ["embed.weight"], "Conv1d": ["conv.weight"]}
    excluded = torchreg.apply_regularization(Net(), {"body": None, nn.Module: torchreg.L2(1e-3)})
    assert uncovered(excluded) == {}
    # the None rule is known to the summary of the model it was applied to; seen from the part alone
    # (none of whose parameters torchreg hooked) its weights are simply not regularized
    assert uncovered(excluded.body) == {"Linear": ["0.weight", "2.weight"]}


def test_uncovered_lazy_weight_counts_zero_elements_until_materialized():
    model = nn.Sequential(nn.LazyLinear(3), nn.ReLU(), nn.Linear(3, 1))
    torchreg.L1(model[2], 1e-3)
    assert torchreg.summary(model).uncovered == [dict(type="LazyLinear", count=1, numel=0, frozen=0,
                                                       parameters=["0.weight"])]
    model(torch.randn(2, 5))
    assert torchreg.summary(model).uncovered == [dict(type="Linear", count=1, numel=15, frozen=0,
                                                       parameters=["0.weight"])]


def test_real_gpt2_from_transformers():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=50, n_positions=16,
                                     bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config)
    with pytest.warns(UserWarning, match=TIED + r".*lm_head\.weight is transformer\.wte\.weight"):
        torchreg.apply_regularization(model, {nn.Linear: torchreg.L2(1e-3), nn.Embedding: torchreg.L1(1e-4)})
    s = torchreg.summary(model)
    assert [(g["type"], g["count"]) for g in s.uncovered] == [("Conv1D", 8)]
    line = next(line for line in str(s).splitlines() if line.startswith("not covered"))
    assert re.fullmatch(r"not covered: 8 weights of Conv1D \((\d{1,3}(,\d{3})*) elements\)", line), line
    assert int(re.search(r"\(([\d,]+)", line).group(1).replace(",", "")) == 2 * 12 * 16 * 16
