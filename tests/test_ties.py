"""Tied parameters follow the rule of the first module walked that owns them, a ``None`` rule included.

GPT-2's ``lm_head.weight`` *is* ``transformer.wte.weight`` and BERT's MLM decoder weight *is* the word
embedding: excluding the embedding must keep that tensor unregularized through the head too. Every
outcome is checked against autograd's gradient of ``loss + explicit penalty`` on a copy without
torchreg; the warnings and summary notes by their text.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import Tensor, nn

import torchreg
from reference import assert_same_grads, explicit_penalty
from test_coverage import CONV1D_NAMES, TOKENS, Conv1D, TinyGPT2

pytestmark = [
    pytest.mark.filterwarnings("error:torchreg"),
    pytest.mark.filterwarnings("error:apply_regularization"),
]

DISAGREE = "is shared by modules whose rules disagree"


def build() -> TinyGPT2:
    torch.manual_seed(0)
    return TinyGPT2()


def grads_match(model: nn.Module, ref: nn.Module, loss_of, terms) -> None:
    """``model``'s gradients (torchreg) equal ``ref``'s for ``loss + sum of (name, l1, l2) terms``."""
    loss_of(model).backward()
    params = dict(ref.named_parameters())
    loss = loss_of(ref)
    if terms:
        loss = loss + explicit_penalty((params[n], l1, l2) for n, l1, l2 in terms)
    loss.backward()
    assert_same_grads(model, ref)


def gpt2_loss(model: nn.Module) -> Tensor:
    return model(TOKENS).logsumexp(-1).mean()


def hooked(model: nn.Module) -> set:
    return {n for n, p in model.named_parameters() if torchreg._engine.owner_of(p) is not None}


def rows(model: nn.Module) -> dict:
    return {r["module"]: r for r in torchreg.summary(model).records}


# -- a local GPT-2 layout --------------------------------------------------------------------------
def test_excluded_embedding_keeps_its_tied_head_unregularized_and_warns():
    model = build()
    ref = copy.deepcopy(model)
    with pytest.warns(UserWarning) as caught:
        torchreg.apply_regularization(model, {nn.Embedding: None, (nn.Linear, Conv1D): torchreg.L2(0.1)})
    assert [str(w.message) for w in caught] == [
        "apply_regularization on TinyGPT2: wte.weight is shared by modules whose rules disagree: wte (rule #1 "
        "Embedding: None, excluded) and lm_head (as lm_head.weight) (rule #2 (Linear, Conv1D): L2(lam=0.1)); a "
        "tied parameter follows the first module walked that owns it, so it is not regularized (give wte the "
        "rule you want for it)"
    ]
    assert hooked(model) == set(CONV1D_NAMES)
    assert not model.wte.weight._post_accumulate_grad_hooks
    grads_match(model, ref, gpt2_loss, [(n, 0.0, 0.1) for n in CONV1D_NAMES])


def test_excluded_embedding_summary_shows_the_tie_on_both_rows():
    model = build()
    with pytest.warns(UserWarning, match=DISAGREE):
        torchreg.apply_regularization(model, {nn.Embedding: None, (nn.Linear, Conv1D): torchreg.L2(0.1)})
    r = rows(model)
    assert r["wte"]["note"] == "excluded, with its submodules; weight tied to lm_head.weight"
    assert r["wte"]["tied"] == {"weight": ["lm_head.weight"]}
    assert r["wpe"]["note"] == "excluded, with its submodules" and r["wpe"]["tied"] == {}
    assert r["lm_head"]["note"] == "weight tied to wte.weight, excluded there"
    assert r["lm_head"]["tied"] == {"weight": ["wte.weight"]}
    assert r["lm_head"]["regularizer"] is None and r["lm_head"]["numel"] == 0
    assert r["h.0.c_attn"]["tied"] == {} and r["h.0.c_attn"]["note"] == ""
    text = str(torchreg.summary(model))
    assert "weight tied to wte.weight, excluded there" in text
    assert "not covered: none" in text  # the tied weight is excluded, not missed


def test_strict_raises_on_disagreeing_rules_and_changes_nothing():
    model = build()
    with pytest.raises(ValueError, match=r"wte\.weight is shared by modules whose rules disagree: wte \(rule #1"):
        torchreg.apply_regularization(model, {nn.Embedding: None, (nn.Linear, Conv1D): torchreg.L2(0.1)},
                                      strict=True)
    assert not hasattr(model, "_torchreg_unit")
    assert hooked(model) == set()


def test_regularized_embedding_wins_over_the_head_and_the_warning_names_the_winner():
    model = build()
    ref = copy.deepcopy(model)
    with pytest.warns(UserWarning, match=DISAGREE + r".*so it is regularized by L1\(lam=0\.01\) \(give wte"):
        torchreg.apply_regularization(model, {nn.Embedding: torchreg.L1(1e-2), (nn.Linear, Conv1D): torchreg.L2(0.1)})
    r = rows(model)
    assert r["wte"]["note"] == "weight tied to lm_head.weight" and r["wte"]["parameters"] == ["weight"]
    assert r["lm_head"]["note"] == "weight tied to wte.weight, regularized once, there"
    grads_match(model, ref, gpt2_loss,
                [("wte.weight", 1e-2, 0.0), ("wpe.weight", 1e-2, 0.0)] + [(n, 0.0, 0.1) for n in CONV1D_NAMES])


@pytest.mark.parametrize("same", ["one-object", "equal-repr"])
def test_agreeing_rules_do_not_warn(same):
    model = build()
    ref = copy.deepcopy(model)
    rule = torchreg.L2(0.1)
    other = rule if same == "one-object" else torchreg.L2(0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torchreg.apply_regularization(model, {nn.Embedding: rule, (nn.Linear, Conv1D): other})
    assert rows(model)["lm_head"]["note"] == "weight tied to wte.weight, regularized once, there"
    names = ["wte.weight", "wpe.weight"] + CONV1D_NAMES
    grads_match(model, ref, gpt2_loss, [(n, 0.0, 0.1) for n in names])


def test_a_module_no_rule_matched_makes_no_claim():
    """{Linear: ...} alone: wte matches nothing, so lm_head's rule regularizes the tied weight."""
    model = build()
    ref = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torchreg.apply_regularization(model, {nn.Linear: torchreg.L2(0.1)})
    r = rows(model)
    assert list(r) == ["lm_head"] and r["lm_head"]["note"] == "weight tied to wte.weight"
    assert r["lm_head"]["tied"] == {"weight": ["wte.weight"]}
    grads_match(model, ref, gpt2_loss, [("wte.weight", 0.0, 0.1)])


def test_a_rule_that_does_not_select_the_tied_weight_makes_no_claim():
    model = build()
    ref = copy.deepcopy(model)
    with pytest.warns(UserWarning) as caught:
        torchreg.apply_regularization(model, {nn.Embedding: torchreg.L1(1e-2, params="bias*"),
                                              nn.Linear: torchreg.L2(0.1)})
    assert [str(w.message) for w in caught] == [  # and no disagreement: the embedding's rule left it alone
        "apply_regularization on TinyGPT2: rule #1 Embedding matched 2 module(s) but selected no parameter of them"]
    assert hooked(model) == {"wte.weight"}
    grads_match(model, ref, gpt2_loss, [("wte.weight", 0.0, 0.1)])


class HeadFirst(nn.Module):
    """The head is walked before the embedding it is tied to."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(4, 10, bias=False)
        self.body = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 4))
        self.head.weight = self.body[0].weight

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(torch.tanh(self.body(tokens)))


def head_first_loss(model: nn.Module) -> Tensor:
    return model(TOKENS % 10).logsumexp(-1).mean()


def test_an_exclusion_walked_after_the_regularized_owner_loses_and_warns():
    torch.manual_seed(0)
    model = HeadFirst()
    ref = copy.deepcopy(model)
    with pytest.warns(UserWarning) as caught:
        torchreg.apply_regularization(model, {"head": torchreg.L2(0.1), "body.0": None, nn.Linear: torchreg.L1(1e-2)})
    assert len(caught) == 1
    assert str(caught[0].message).endswith(
        "head.weight is shared by modules whose rules disagree: head (rule #1 'head': L2(lam=0.1)) and body.0 (as "
        "body.0.weight) (rule #2 'body.0': None, excluded); a tied parameter follows the first module walked that "
        "owns it, so it is regularized by L2(lam=0.1) (give head the rule you want for it)")
    r = rows(model)
    assert r["body.0"]["note"] == "excluded, with its submodules; weight tied to head.weight"
    assert r["head"]["note"] == "weight tied to body.0.weight"
    grads_match(model, ref, head_first_loss, [("head.weight", 0.0, 0.1), ("body.1.weight", 1e-2, 0.0)])


class BodyFirst(nn.Module):
    """A container holding the embedding, walked before the head tied to it."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 4))
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.body[0].weight

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(torch.tanh(self.body(tokens)))


def test_excluding_an_ancestor_claims_the_tied_weights_inside_it():
    torch.manual_seed(0)
    model = BodyFirst()
    ref = copy.deepcopy(model)
    with pytest.warns(UserWarning, match=r"body\.0\.weight is shared by modules whose rules disagree: body\.0 "
                                         r"\(rule #1 'body': None, excluded\) and head"):
        torchreg.apply_regularization(model, {"body": None, nn.Linear: torchreg.L2(0.1)})
    assert hooked(model) == set()  # the only Linear outside body is the tied head
    r = rows(model)
    assert r["body"]["note"] == "excluded, with its submodules; 0.weight tied to head.weight"
    assert r["head"]["note"] == "weight tied to body.0.weight, excluded there"
    head_first_loss(model).backward()
    head_first_loss(ref).backward()
    assert_same_grads(model, ref)


# -- the real transformers models ----------------------------------------------------------------------
transformers = pytest.importorskip("transformers")


def tiny_gpt2() -> nn.Module:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64, n_positions=16,
                                         bos_token_id=0, eos_token_id=0)
        return transformers.GPT2LMHeadModel(config).eval()


def tiny_bert() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, vocab_size=50, max_position_embeddings=16)
    return transformers.BertForMaskedLM(config).eval()


IDS = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(0))


def hf_loss(model: nn.Module) -> Tensor:
    return model(input_ids=IDS, labels=IDS).loss


def test_real_gpt2_excluded_wte_is_not_regularized_through_lm_head():
    import torchreg.hf

    model = tiny_gpt2()
    assert model.lm_head.weight is model.transformer.wte.weight
    ref = copy.deepcopy(model)
    with pytest.warns(UserWarning, match=r"transformer\.wte\.weight is shared by modules whose rules disagree: "
                                         r"transformer\.wte \(rule #1 Embedding: None, excluded\) and lm_head"):
        torchreg.apply_regularization(model, {nn.Embedding: None, torchreg.hf.LINEAR_LAYERS: torchreg.L2(0.1)})
    conv1d = [n for n, m in model.named_modules() if isinstance(m, torchreg.hf.LINEAR_LAYERS) and n != "lm_head"]
    assert hooked(model) == {f"{n}.weight" for n in conv1d} and len(conv1d) == 4
    r = rows(model)
    assert r["lm_head"]["note"] == "weight tied to transformer.wte.weight, excluded there"
    assert r["transformer.wte"]["note"] == "excluded, with its submodules; weight tied to lm_head.weight"
    grads_match(model, ref, hf_loss, [(f"{n}.weight", 0.0, 0.1) for n in conv1d])


def test_real_bert_excluded_word_embeddings_are_not_regularized_through_the_decoder():
    model = tiny_bert()
    decoder = model.cls.predictions.decoder
    assert decoder.weight is model.bert.embeddings.word_embeddings.weight
    ref = copy.deepcopy(model)
    with pytest.warns(UserWarning, match=r"bert\.embeddings\.word_embeddings\.weight is shared by modules whose "
                                         r"rules disagree: .*and cls\.predictions\.decoder"):
        torchreg.apply_regularization(model, {nn.Embedding: None, nn.Linear: torchreg.L2(0.1)})
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "cls.predictions.decoder"]
    assert hooked(model) == {f"{n}.weight" for n in linears}
    assert rows(model)["cls.predictions.decoder"]["tied"] == {"weight": ["bert.embeddings.word_embeddings.weight"]}
    grads_match(model, ref, hf_loss, [(f"{n}.weight", 0.0, 0.1) for n in linears])
