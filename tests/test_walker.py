"""Rule-based regularization: ``apply_regularization``, ``remove_regularization`` and ``summary``.

Every gradient is compared against a bare deep copy of the model, taken *before* torchreg is applied,
trained with the same penalty added to its loss explicitly (``tests/reference.py``). The parameters a
rule set should cover are written out by hand in each case, from the documented semantics (first
matching rule wins; a module's own parameters; weights by default, no biases, no norm layers), so
that the walker is never its own reference.
"""

from __future__ import annotations

import collections
import functools
import re
from typing import Callable, Dict, List, NamedTuple, Sequence, Tuple

import warnings

import pytest
import torch
from torch import Tensor, nn

import torchreg
from reference import assert_same_grads, bare_copy, explicit_penalty

# A torchreg warning in these tests is a bug of the test or of the library, except where a test
# asks for one with pytest.warns.
pytestmark = [
    pytest.mark.filterwarnings("error:torchreg"),
    pytest.mark.filterwarnings("error:apply_regularization"),
    pytest.mark.filterwarnings("ignore:Lazy modules are a new feature"),
]

ATTR = "_torchreg_unit"  # the one attribute torchreg documents setting on a module


# ================================================================================================
# Models
# ================================================================================================
class Block(nn.Module):
    """A ResNet basic block; ``drop=True`` drops the residual branch (stochastic depth)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor, drop: bool = False) -> Tensor:
        shortcut = x if self.down is None else self.down(x)
        if drop:
            return shortcut
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + shortcut)


class TinyResNet(nn.Module):
    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = Block(8, 8, 1)
        self.layer2 = Block(8, 16, 2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, classes)

    def forward(self, x: Tensor, drop: Sequence[str] = ()) -> Tensor:
        x = self.relu(self.bn(self.stem(x)))
        x = self.layer1(x, drop="layer1" in drop)
        x = self.layer2(x, drop="layer2" in drop)
        return self.fc(self.pool(x).flatten(1))


class TinyLM(nn.Module):
    """A causal transformer language model whose output projection is tied to the embedding."""

    vocab = 23

    def __init__(self, d: int = 16, layers: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(self.vocab, d)
        layer = nn.TransformerEncoderLayer(d, nhead=2, dim_feedforward=32, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, self.vocab)
        self.head.weight = self.embed.weight  # tied

    def forward(self, tokens: Tensor) -> Tensor:
        mask = nn.Transformer.generate_square_subsequent_mask(tokens.shape[1])
        return self.head(self.norm(self.encoder(self.embed(tokens), mask=mask, is_causal=True)))


class LSTMTagger(nn.Module):
    vocab, tags = 30, 5

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(self.vocab, 12)
        self.lstm = nn.LSTM(12, 16, num_layers=2, batch_first=True, bidirectional=True)
        self.fc = nn.Linear(32, self.tags)

    def forward(self, tokens: Tensor) -> Tensor:
        out, _ = self.lstm(self.embed(tokens))
        return self.fc(out)


class MixtureOfExperts(nn.Module):
    """Top-1 routing: one expert runs per forward, the others are not part of the graph."""

    def __init__(self, d: int = 8, experts: int = 3, classes: int = 3) -> None:
        super().__init__()
        self.gate = nn.Linear(d, experts)
        self.experts = nn.ModuleList(
            nn.Sequential(nn.Linear(d, 16), nn.ReLU(), nn.Linear(16, d)) for _ in range(experts)
        )
        self.head = nn.Linear(d, classes)

    def forward(self, x: Tensor, expert: int) -> Tensor:
        weight = self.gate(x).softmax(-1)[:, expert : expert + 1]
        return self.head(x + weight * self.experts[expert](x))


class ScaledConv(nn.Conv2d):
    """A user subclass: a class rule for nn.Conv2d must match it."""

    def forward(self, x: Tensor) -> Tensor:
        return 0.5 * super().forward(x)


def _seeded(factory: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    @functools.wraps(factory)
    def build() -> nn.Module:
        torch.manual_seed(0)
        return factory()

    return build


def _data(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class Task(NamedTuple):
    """A model and how to train it: ``loss(model, batch)`` over ``batches()``."""

    build: Callable[[], nn.Module]
    batches: Callable[[], List[Tuple[Tensor, ...]]]
    loss: Callable[[nn.Module, Tuple[Tensor, ...]], Tensor]


def _image_batches(classes: int = 5) -> List[Tuple[Tensor, ...]]:
    g = _data(1)
    return [(torch.randn(4, 3, 8, 8, generator=g), torch.randint(0, classes, (4,), generator=g)) for _ in range(2)]


def _token_batches(vocab: int, tags: int = 0) -> List[Tuple[Tensor, ...]]:
    g = _data(2)
    out = []
    for _ in range(2):
        tokens = torch.randint(0, vocab, (3, 7), generator=g)
        out.append((tokens, torch.randint(0, tags, (3, 7), generator=g)) if tags else (tokens,))
    return out


def _classify(model: nn.Module, batch: Tuple[Tensor, ...]) -> Tensor:
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def _next_token(model: nn.Module, batch: Tuple[Tensor, ...]) -> Tensor:
    (tokens,) = batch
    logits = model(tokens)[:, :-1]
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))


def _tagging(model: nn.Module, batch: Tuple[Tensor, ...]) -> Tensor:
    tokens, tags = batch
    return nn.functional.cross_entropy(model(tokens).reshape(-1, LSTMTagger.tags), tags.reshape(-1))


TASKS: Dict[str, Task] = {
    "resnet": Task(_seeded(TinyResNet), _image_batches, _classify),
    "lm": Task(_seeded(TinyLM), lambda: _token_batches(TinyLM.vocab), _next_token),
    "lstm": Task(_seeded(LSTMTagger), lambda: _token_batches(LSTMTagger.vocab, LSTMTagger.tags), _tagging),
}

# ================================================================================================
# Expected penalties, written out by hand: (parameter name, l1, l2) as in reference.explicit_penalty
# ================================================================================================
Terms = List[Tuple[str, float, float]]


def l1(lam: float, *names: str) -> Terms:
    return [(n, lam, 0.0) for n in names]


def l2(lam: float, *names: str) -> Terms:
    return [(n, 0.0, lam) for n in names]


def enet(a: float, b: float, *names: str) -> Terms:
    return [(n, a, b) for n in names]


RESNET_STEM = ("stem.weight",)
RESNET_LAYER1 = ("layer1.conv1.weight", "layer1.conv2.weight")
RESNET_LAYER2 = ("layer2.conv1.weight", "layer2.conv2.weight", "layer2.down.0.weight")
RESNET_CONVS = RESNET_STEM + RESNET_LAYER1 + RESNET_LAYER2
RESNET_BN_WEIGHTS = ("bn.weight", "layer1.bn1.weight", "layer1.bn2.weight", "layer2.bn1.weight",
                     "layer2.bn2.weight", "layer2.down.1.weight")


def lm_layers(*leaves: str, layers: Sequence[int] = (0, 1)) -> Tuple[str, ...]:
    return tuple(f"encoder.layers.{i}.{leaf}" for i in layers for leaf in leaves)


LM_LINEARS = lm_layers("self_attn.out_proj.weight", "linear1.weight", "linear2.weight")
LSTM_WEIGHTS = tuple(f"lstm.weight_{kind}_l{layer}{suffix}" for layer in (0, 1) for suffix in ("", "_reverse")
                     for kind in ("ih", "hh"))
LSTM_ALL = LSTM_WEIGHTS + tuple(w.replace("weight", "bias") for w in LSTM_WEIGHTS)


def rules_of(*pairs) -> Callable[[], dict]:
    """Rules are built afresh for every test (a rule object is mutable: ``rule.lam = ...``)."""
    return lambda: {key: value() for key, value in pairs}


L1, L2, EN = torchreg.L1, torchreg.L2, torchreg.ElasticNet
P = functools.partial

# (task, rules, expected terms): every rule table the gradient is checked on.
CASES = [
    pytest.param(
        "resnet", rules_of((nn.Conv2d, lambda: L2(5e-3)), (nn.Linear, lambda: L1(1e-3))),
        l2(5e-3, *RESNET_CONVS) + l1(1e-3, "fc.weight"),
        id="resnet-class-rules",
    ),
    pytest.param(
        "resnet", rules_of((nn.Module, lambda: EN(1e-3, 1e-2))),
        enet(1e-3, 1e-2, *RESNET_CONVS, "fc.weight"),
        id="resnet-catch-all-skips-norm-layers",
    ),
    pytest.param(
        "resnet", rules_of(("layer2.*", lambda: L1(1e-2)), (nn.Conv2d, lambda: L2(1e-2)),
                           (nn.Linear, lambda: P(L2, lam=1e-3))),
        l1(1e-2, *RESNET_LAYER2) + l2(1e-2, *RESNET_STEM, *RESNET_LAYER1) + l2(1e-3, "fc.weight"),
        id="resnet-first-match-wins-pattern-first",
    ),
    pytest.param(
        "resnet", rules_of((nn.Conv2d, lambda: L2(1e-2)), ("layer2.*", lambda: L1(1e-2)),
                           (nn.Linear, lambda: P(L2, lam=1e-3))),
        l2(1e-2, *RESNET_CONVS) + l2(1e-3, "fc.weight"),
        id="resnet-first-match-wins-class-first",
    ),
    pytest.param(
        "resnet", rules_of(("layer1.*", lambda: None), ("stem", lambda: None), (nn.Conv2d, lambda: L1(1e-2)),
                           (nn.Module, lambda: L2(1e-3))),
        l1(1e-2, *RESNET_LAYER2) + l2(1e-3, "fc.weight"),
        id="resnet-none-excludes-before-later-rules",
    ),
    pytest.param(
        "resnet", rules_of((nn.BatchNorm2d, lambda: L1(1e-3, params="weight")),
                           (nn.Linear, lambda: L2(1e-2, params=["weight", "bias"]))),
        l1(1e-3, *RESNET_BN_WEIGHTS) + l2(1e-2, "fc.weight", "fc.bias"),
        id="resnet-explicit-selection-includes-norm-and-bias",
    ),
    pytest.param(
        "resnet", rules_of(((nn.Conv2d, nn.Linear), lambda: L2(1e-2, params=lambda name, p: p.dim() > 1))),
        l2(1e-2, *RESNET_CONVS, "fc.weight"),
        id="resnet-tuple-key-predicate-selection",
    ),
    pytest.param(
        "lm", rules_of((nn.Embedding, lambda: L2(1e-2)), (nn.Linear, lambda: L1(1e-3))),
        l2(1e-2, "embed.weight") + l1(1e-3, *LM_LINEARS),  # out_proj is a Linear subclass; tied once
        id="lm-tied-embedding-and-linear-subclass",
    ),
    pytest.param(
        "lm", rules_of((nn.Linear, lambda: L1(1e-3)), (nn.Embedding, lambda: L2(1e-2))),
        l2(1e-2, "embed.weight") + l1(1e-3, *LM_LINEARS),  # embed comes first in the walk
        id="lm-tied-weight-goes-to-first-module-walked",
    ),
    pytest.param(
        "lm", rules_of(("encoder.layers.*.linear1", lambda: L1(1e-2)), ("encoder.layers.1.*", lambda: L2(1e-2)),
                       (nn.MultiheadAttention, lambda: L2(1e-3))),
        l1(1e-2, *lm_layers("linear1.weight"))
        + l2(1e-2, *lm_layers("self_attn.in_proj_weight", "self_attn.out_proj.weight", "linear2.weight", layers=[1]))
        + l2(1e-3, *lm_layers("self_attn.in_proj_weight", layers=[0])),
        id="lm-glob-patterns-then-class",
    ),
    pytest.param(
        "lm", rules_of(("head", lambda: EN(1e-3, 1e-2))),
        enet(1e-3, 1e-2, "head.weight"),
        id="lm-tied-weight-through-head-only",
    ),
    pytest.param(
        "lm", rules_of(("*norm*", lambda: None), ("encoder.*", lambda: L2(1e-2, params="*")),
                       ("embed", lambda: L1(1e-3))),
        l2(1e-2, *lm_layers("self_attn.in_proj_weight", "self_attn.in_proj_bias", "self_attn.out_proj.weight",
                            "self_attn.out_proj.bias", "linear1.weight", "linear1.bias", "linear2.weight",
                            "linear2.bias"))
        + l1(1e-3, "embed.weight"),
        id="lm-exclude-norms-then-all-params",
    ),
    pytest.param(
        "lstm", rules_of((nn.Embedding, lambda: L1(1e-3)), (nn.LSTM, lambda: L2(1e-2)),
                         (nn.Linear, lambda: EN(1e-3, 1e-2))),
        l1(1e-3, "embed.weight") + l2(1e-2, *LSTM_WEIGHTS) + enet(1e-3, 1e-2, "fc.weight"),
        id="lstm-class-rules",
    ),
    pytest.param(
        "lstm", rules_of((nn.LSTM, lambda: L2(1e-2, params="*")), (nn.Module, lambda: P(L1, lam=1e-4))),
        l2(1e-2, *LSTM_ALL) + l1(1e-4, "embed.weight", "fc.weight"),
        id="lstm-all-params-then-catch-all",
    ),
    pytest.param(
        "lstm", rules_of(("lstm", lambda: L2(1e-2, params="weight_hh_*")), ("fc", lambda: None)),
        l2(1e-2, *(n for n in LSTM_WEIGHTS if "_hh_" in n)),
        id="lstm-name-rule-recurrent-weights-only",
    ),
]


# ================================================================================================
# Helpers
# ================================================================================================
def regularized_names(model: nn.Module) -> List[str]:
    """Qualified names of the covered parameters, read from the summary."""
    names = []
    for r in torchreg.summary(model).records:
        if r["regularizer"] is not None:
            names += [f"{r['module']}.{leaf}" if r["module"] else leaf for leaf in r["parameters"]]
    return sorted(names)


def train_and_compare(model: nn.Module, ref: nn.Module, terms: Terms, task: Task) -> None:
    """Train ``model`` (regularized) and ``ref`` (bare, explicit penalty) side by side; equal grads."""
    params = dict(ref.named_parameters(remove_duplicate=False))
    assert terms and all(name in params for name, _, _ in terms), "bad expected terms"
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.05)
    for batch in task.batches():
        opt.zero_grad()
        ref_opt.zero_grad()
        task.loss(model, batch).backward()
        penalty = explicit_penalty([(params[name], a, b) for name, a, b in terms])
        (task.loss(ref, batch) + penalty).backward()
        assert_same_grads(model, ref)
        torch.testing.assert_close(torchreg.penalty(model), penalty.detach())
        opt.step()
        ref_opt.step()


def apply_allowing_empty_rules(model, rules):
    """apply_regularization where a rule may lose every module with parameters to an earlier one, or a
    tied parameter to the rule of the first module walked (tests/test_ties.py checks those warnings)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*selected no parameter")
        warnings.filterwarnings("ignore", message=r".*shared by modules whose rules disagree")
        return torchreg.apply_regularization(model, rules)


def hooks_per_param(model: nn.Module) -> Dict[str, int]:
    return {n: len(p._post_accumulate_grad_hooks or {}) for n, p in model.named_parameters(remove_duplicate=False)}


def module_hooks(model: nn.Module) -> Dict[str, int]:
    kinds = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    return {n: sum(len(getattr(m, k)) for k in kinds) for n, m in model.named_modules()}


def torchreg_attributes(model: nn.Module) -> List[str]:
    found = [f"{n}.{a}" for n, m in model.named_modules() for a in vars(m) if a.startswith("_torchreg")]
    found += [f"{n}.{a}" for n, p in model.named_parameters() for a in vars(p) if "torchreg" in a]
    return found


class Snapshot(NamedTuple):
    state: Dict[str, Tensor]
    identities: List[Tuple[str, int]]
    param_hooks: Dict[str, int]
    module_hooks: Dict[str, int]
    attributes: List[str]


def snapshot(model: nn.Module) -> Snapshot:
    return Snapshot(
        {k: v.detach().clone() for k, v in model.state_dict().items()},
        [(n, id(p)) for n, p in model.named_parameters(remove_duplicate=False)],
        hooks_per_param(model),
        module_hooks(model),
        torchreg_attributes(model),
    )


def assert_state_unchanged(model: nn.Module, before: Snapshot) -> None:
    now = snapshot(model)
    assert list(now.state) == list(before.state)
    for key in before.state:
        assert torch.equal(now.state[key], before.state[key]), key
    assert now.identities == before.identities


def assert_untouched(model: nn.Module, before: Snapshot) -> None:
    """State, parameter identities, every hook and attribute as in ``before``."""
    assert_state_unchanged(model, before)
    now = snapshot(model)
    assert now.param_hooks == before.param_hooks
    assert now.module_hooks == before.module_hooks
    assert now.attributes == before.attributes


def assert_clean(model: nn.Module) -> None:
    """Nothing of torchreg left: no parameter hook, no attribute anywhere."""
    assert not any(hooks_per_param(model).values()), hooks_per_param(model)
    assert torchreg_attributes(model) == []
    assert not any(ATTR in vars(m) for m in model.modules())


# ================================================================================================
# Gradients against the explicit-penalty reference
# ================================================================================================
@pytest.mark.parametrize("task_name, make_rules, terms", CASES)
def test_gradients_match_explicit_penalty(task_name, make_rules, terms):
    task = TASKS[task_name]
    model = task.build()
    ref = bare_copy(model)
    assert apply_allowing_empty_rules(model, make_rules()) is model
    assert regularized_names(model) == sorted(name for name, _, _ in terms)
    train_and_compare(model, ref, terms, task)


def test_tied_weight_has_one_hook_and_a_summary_note():
    model = TASKS["lm"].build()
    with pytest.warns(UserWarning, match="embed.weight is shared by modules whose rules disagree"):
        torchreg.apply_regularization(model, {nn.Embedding: L2(1e-2), nn.Linear: L1(1e-3)})
    assert model.head.weight is model.embed.weight
    assert len(model.embed.weight._post_accumulate_grad_hooks) == 1
    rows = {r["module"]: r for r in torchreg.summary(model).records}
    assert rows["embed"]["parameters"] == ["weight"] and rows["embed"]["regularizer"] == "L2(lam=0.01)"
    head = rows["head"]
    assert head["regularizer"] is None and head["parameters"] == [] and head["numel"] == 0
    assert "embed.weight" in head["note"] and "once" in head["note"], head["note"]
    assert head["penalty"] is None  # counted under embed only


@pytest.mark.parametrize(
    "make_rules, expected",
    [
        pytest.param(
            rules_of(("layer2.*", lambda: L1(1e-2)), (nn.Conv2d, lambda: L2(1e-2)), (nn.Linear, lambda: L1(1e-3))),
            {"stem": "rule #2 Conv2d", "layer1.conv1": "rule #2 Conv2d", "layer1.conv2": "rule #2 Conv2d",
             "layer2.conv1": "rule #1 'layer2.*'", "layer2.conv2": "rule #1 'layer2.*'",
             "layer2.down.0": "rule #1 'layer2.*'", "fc": "rule #3 Linear"},
            id="pattern-first",
        ),
        pytest.param(
            rules_of((nn.Conv2d, lambda: L2(1e-2)), ("layer2.*", lambda: L1(1e-2)), (nn.Linear, lambda: L1(1e-3))),
            {"stem": "rule #1 Conv2d", "layer1.conv1": "rule #1 Conv2d", "layer1.conv2": "rule #1 Conv2d",
             "layer2.conv1": "rule #1 Conv2d", "layer2.conv2": "rule #1 Conv2d",
             "layer2.down.0": "rule #1 Conv2d", "fc": "rule #3 Linear"},
            id="class-first",
        ),
    ],
)
def test_summary_shows_which_rule_matched_first(make_rules, expected):
    model = TASKS["resnet"].build()
    apply_allowing_empty_rules(model, make_rules())
    records = torchreg.summary(model).records
    assert {r["module"]: r["rule"] for r in records if r["regularizer"] is not None} == expected
    # norm layers and activations under layer2 were matched by the pattern: listed as skipped
    skipped = {r["module"]: r["note"] for r in records if r["regularizer"] is None}
    for path in ("layer2.bn1", "layer2.bn2", "layer2.relu", "layer2.down.1"):
        assert path in skipped and "selects no parameter" in skipped[path], skipped


def test_none_rule_is_listed_as_exclusion_and_overrides_later_rules():
    model = TASKS["resnet"].build()
    torchreg.apply_regularization(model, {"layer1.*": None, "fc": None, nn.Module: L2(1e-3)})
    rows = {r["module"]: r for r in torchreg.summary(model).records}
    excluded = "excluded, with its submodules"
    for path in ("layer1.conv1", "layer1.bn1", "layer1.relu", "layer1.conv2", "layer1.bn2"):
        assert (rows[path]["regularizer"], rows[path]["rule"], rows[path]["note"]) == (None, "rule #1 'layer1.*'", excluded)
    assert (rows["fc"]["regularizer"], rows["fc"]["rule"], rows["fc"]["note"]) == (None, "rule #2 'fc'", excluded)
    assert hooks_per_param(model)["fc.weight"] == 0 and hooks_per_param(model)["layer1.conv1.weight"] == 0
    assert hooks_per_param(model)["layer2.conv1.weight"] == 1


GLOBS = [
    ("encoder.layers.*.linear1", lm_layers("linear1.weight")),
    ("encoder.layers.1.linear?", lm_layers("linear1.weight", "linear2.weight", layers=[1])),
    ("*.out_proj", lm_layers("self_attn.out_proj.weight")),
    ("encoder.layers.[1].self_attn", lm_layers("self_attn.in_proj_weight", layers=[1])),
    ("encoder.layers.0.*", lm_layers("self_attn.in_proj_weight", "self_attn.out_proj.weight",  # * crosses dots
                                     "linear1.weight", "linear2.weight", layers=[0])),
    ("embed", ("embed.weight",)),
    ("Encoder.*", None),  # case-sensitive: matches nothing
]


@pytest.mark.parametrize("pattern, expected", [pytest.param(*g, id=g[0]) for g in GLOBS])
def test_glob_patterns_over_qualified_names(pattern, expected):
    model = TASKS["lm"].build()
    if expected is None:
        with pytest.warns(UserWarning, match=re.escape(repr(pattern))):
            torchreg.apply_regularization(model, {pattern: L2(1e-2)})
        assert torchreg.summary(model).records == []
        return
    torchreg.apply_regularization(model, {pattern: L2(1e-2)})
    assert regularized_names(model) == sorted(expected)


def test_subclass_matched_by_isinstance():
    torch.manual_seed(0)
    model = nn.Sequential(ScaledConv(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.Flatten(), nn.Linear(16, 2))
    ref = bare_copy(model)
    torchreg.apply_regularization(model, {nn.Conv2d: L2(1e-2)})
    assert torchreg.summary(model).records[0]["type"] == "ScaledConv"
    task = Task(lambda: model, lambda: [(torch.randn(2, 3, 6, 6, generator=_data(3)), torch.tensor([0, 1]))],
                _classify)
    train_and_compare(model, ref, l2(1e-2, "0.weight", "2.weight"), task)


# ================================================================================================
# Lazy modules
# ================================================================================================
LAZY = [
    pytest.param(
        lambda: nn.Sequential(nn.Flatten(), nn.LazyLinear(16), nn.ReLU(), nn.LazyLinear(5)),
        {nn.Linear: L1(1e-2)},
        l1(1e-2, "1.weight", "3.weight"),
        id="lazy-linear",
    ),
    pytest.param(
        lambda: nn.Sequential(nn.LazyConv2d(6, 3, padding=1), nn.LazyBatchNorm2d(), nn.ReLU(inplace=True),
                              nn.LazyConv2d(8, 3, stride=2), nn.ReLU(), nn.Flatten(), nn.LazyLinear(5)),
        {nn.Conv2d: L2(1e-2), nn.Linear: L1(1e-2)},
        l2(1e-2, "0.weight", "3.weight") + l1(1e-2, "6.weight"),
        id="lazy-conv2d",
    ),
]


@pytest.mark.parametrize("build, rules, terms", LAZY)
def test_lazy_modules_regularized_exactly_from_first_forward(build, rules, terms):
    torch.manual_seed(0)
    model, ref = build(), build()
    torchreg.apply_regularization(model, rules)
    before = torchreg.summary(model).records
    assert sorted(f"{r['module']}.weight" for r in before if r["regularizer"]) == sorted(n for n, _, _ in terms)
    assert all(r["numel"] == 0 and r["penalty"] is None for r in before)
    assert torchreg.penalty(model).item() == 0.0

    batches = _image_batches()
    # first forward materializes the parameters; the reference gets the same values
    loss = _classify(model, batches[0])
    with torch.no_grad():
        ref(batches[0][0])
    ref.load_state_dict(model.state_dict())
    loss.backward()
    params = dict(ref.named_parameters())
    penalty = explicit_penalty([(params[n], a, b) for n, a, b in terms])
    (_classify(ref, batches[0]) + penalty).backward()
    assert_same_grads(model, ref)
    torch.testing.assert_close(torchreg.penalty(model), penalty.detach())

    after = torchreg.summary(model).records
    assert [r["numel"] for r in after] == [params[f"{r['module']}.weight"].numel() for r in after]
    assert [r["type"] for r in after] == [type(model.get_submodule(r["module"])).__name__ for r in after]

    model.zero_grad()
    ref.zero_grad()
    train_and_compare(model, ref, terms, Task(lambda: model, lambda: batches[1:], _classify))


def test_lazy_module_removed_before_first_forward_leaves_nothing():
    model = nn.Sequential(nn.LazyLinear(4), nn.ReLU(), nn.LazyLinear(2))
    hooks = module_hooks(model)
    torchreg.apply_regularization(model, {nn.Linear: L1(1e-2)})
    torchreg.remove_regularization(model)
    assert module_hooks(model) == hooks
    model(torch.randn(3, 5)).sum().backward()
    assert_clean(model)


# ================================================================================================
# Scope: the model is one unit
# ================================================================================================
SCOPE = [
    pytest.param(
        lambda: MixtureOfExperts(), lambda m, x: m(x, expert=0),
        rules_of(("experts.*", lambda: L2(1e-2)), (nn.Linear, lambda: L1(1e-3))),
        l2(1e-2, *(f"experts.{e}.{i}.weight" for e in range(3) for i in (0, 2)))
        + l1(1e-3, "gate.weight", "head.weight"),
        id="moe-routes-to-expert-0",
    ),
    pytest.param(
        lambda: MixtureOfExperts(), lambda m, x: m(x, expert=2),
        rules_of((nn.Linear, lambda: L1(1e-2, params="*"))),
        l1(1e-2, *(f"experts.{e}.{i}.{leaf}" for e in range(3) for i in (0, 2) for leaf in ("weight", "bias")),
           "gate.weight", "gate.bias", "head.weight", "head.bias"),
        id="moe-routes-to-expert-2-with-biases",
    ),
    pytest.param(
        lambda: TinyResNet(), lambda m, x: m(x, drop=["layer2"]),
        rules_of((nn.Conv2d, lambda: EN(1e-3, 1e-2)), (nn.Linear, lambda: L2(1e-3))),
        enet(1e-3, 1e-2, *RESNET_CONVS) + l2(1e-3, "fc.weight"),
        id="resnet-drop-path-layer2",
    ),
    pytest.param(
        lambda: TinyResNet(), lambda m, x: m(x, drop=["layer1", "layer2"]),
        rules_of((nn.Conv2d, lambda: L1(1e-2))),
        l1(1e-2, *RESNET_CONVS),
        id="resnet-drop-path-both-blocks",
    ),
]


@pytest.mark.parametrize("build, forward, make_rules, terms", SCOPE)
def test_skipped_branch_still_penalized_once(build, forward, make_rules, terms):
    torch.manual_seed(0)
    model = build()
    ref = bare_copy(model)
    torchreg.apply_regularization(model, make_rules())
    classes = model.head.out_features if isinstance(model, MixtureOfExperts) else model.fc.out_features
    g = _data(4)
    shape = (6, 8) if isinstance(model, MixtureOfExperts) else (4, 3, 8, 8)
    batches = [(torch.randn(*shape, generator=g), torch.randint(0, classes, (shape[0],), generator=g))
               for _ in range(2)]

    def loss(m, batch):
        return nn.functional.cross_entropy(forward(m, batch[0]), batch[1])

    train_and_compare(model, ref, terms, Task(lambda: model, lambda: batches, loss))


def test_backward_through_another_model_touches_nothing():
    a, b = TASKS["resnet"].build(), MixtureOfExperts()
    b_ref = bare_copy(b)
    torchreg.apply_regularization(a, {nn.Module: L2(1e-2)})
    torchreg.apply_regularization(b, {nn.Linear: L1(1e-2)})
    x = torch.randn(4, 8, generator=_data(5))
    b(x, expert=1).sum().backward()
    assert all(p.grad is None for p in a.parameters())
    params = dict(b_ref.named_parameters())
    terms = [(params[n], 1e-2, 0.0) for n in params if n.endswith("weight")]
    (b_ref(x, expert=1).sum() + explicit_penalty(terms)).backward()
    assert_same_grads(b, b_ref)


def test_backward_reaching_only_unregularized_params_adds_nothing():
    model = TASKS["resnet"].build()
    torchreg.apply_regularization(model, {nn.Module: L2(1e-2)})
    (2 * model.fc.bias).sum().backward()
    torch.testing.assert_close(model.fc.bias.grad, torch.full_like(model.fc.bias, 2.0))
    assert all(p.grad is None for n, p in model.named_parameters() if n != "fc.bias")


# ================================================================================================
# Removal, state_dict, determinism
# ================================================================================================
REMOVE = [
    pytest.param("resnet", {nn.Conv2d: L2(1e-2), nn.Linear: L1(1e-2)}, id="resnet"),
    pytest.param("lm", {"*norm*": None, nn.Module: EN(1e-3, 1e-2, params="*")}, id="lm-tied"),
    pytest.param("lstm", {nn.LSTM: L2(1e-2), "fc": L1(1e-2)}, id="lstm"),
]


@pytest.mark.parametrize("task_name, rules", REMOVE)
def test_remove_restores_a_never_regularized_model(task_name, rules):
    task = TASKS[task_name]
    model = task.build()
    never = bare_copy(model)
    hooks = module_hooks(model)
    torchreg.apply_regularization(model, rules)
    batch, probe = task.batches()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    task.loss(model, batch).backward()
    opt.step()

    assert torchreg.remove_regularization(model) is model
    assert_clean(model)
    assert module_hooks(model) == hooks
    assert torchreg.summary(model).records == []
    assert torchreg.penalty(model).item() == 0.0

    never.load_state_dict(model.state_dict())
    model.zero_grad(set_to_none=True)
    torch.testing.assert_close(model(probe[0]), never(probe[0]), rtol=0, atol=0)
    task.loss(model, probe).backward()
    task.loss(never, probe).backward()
    assert_same_grads(model, never, rtol=0, atol=0)

    with pytest.raises(ValueError, match="no torchreg regularization"):
        torchreg.remove_regularization(model)


def test_remove_also_takes_off_wrapper_regularization():
    model = TASKS["resnet"].build()
    never = bare_copy(model)
    torchreg.L1(model.fc, lam=1e-2)
    torchreg.apply_regularization(model, {"fc": None, nn.Conv2d: L2(1e-2)})
    torchreg.remove_regularization(model)
    assert_clean(model)
    batch = _image_batches()[0]
    _classify(model, batch).backward()
    _classify(never, batch).backward()
    assert_same_grads(model, never, rtol=0, atol=0)


@pytest.mark.parametrize("task_name, rules", REMOVE)
def test_state_dict_and_parameter_identity_unchanged(task_name, rules):
    model = TASKS[task_name].build()
    before = snapshot(model)
    torchreg.apply_regularization(model, rules)
    assert_state_unchanged(model, before)  # no parameter or buffer added, none replaced
    torchreg.remove_regularization(model)
    assert_state_unchanged(model, before)


@pytest.mark.parametrize("task_name, make_rules, terms", CASES[::3])
def test_walk_is_deterministic(task_name, make_rules, terms):
    build = TASKS[task_name].build
    first, second = build(), build()
    apply_allowing_empty_rules(first, make_rules())
    apply_allowing_empty_rules(second, make_rules())
    assert torchreg.summary(first).records == torchreg.summary(second).records
    assert str(torchreg.summary(first)) == str(torchreg.summary(second))
    # and again on the same model after removal
    records = torchreg.summary(first).records
    torchreg.remove_regularization(first)
    apply_allowing_empty_rules(first, make_rules())
    assert torchreg.summary(first).records == records
    # rows follow named_modules() order
    order = [name for name, _ in first.named_modules()]
    paths = [r["module"] for r in records]
    assert paths == sorted(paths, key=order.index)


# ================================================================================================
# Double application
# ================================================================================================
DOUBLE = [
    pytest.param(lambda m: m, {nn.Conv2d: L2(1e-2)}, "already regularized", id="same-model-twice"),
    pytest.param(lambda m: m.layer1, {nn.Conv2d: L1(1e-2)}, "already regularized", id="submodule-after-model"),
    pytest.param(lambda m: nn.Sequential(m), {nn.Module: L1(1e-2)}, "already regularized", id="parent-after-model"),
]


@pytest.mark.parametrize("target, second_rules, message", DOUBLE)
def test_applying_twice_raises_and_never_doubles(target, second_rules, message):
    task = TASKS["resnet"]
    model = task.build()
    ref = bare_copy(model)
    torchreg.apply_regularization(model, {nn.Conv2d: L2(1e-2), nn.Linear: L1(1e-3)})
    before = snapshot(model)
    with pytest.raises(ValueError, match=message):
        torchreg.apply_regularization(target(model), second_rules)
    assert_untouched(model, before)
    train_and_compare(model, ref, l2(1e-2, *RESNET_CONVS) + l1(1e-3, "fc.weight"), task)


def test_param_regularized_by_wrapper_raises_until_excluded():
    task = TASKS["resnet"]
    model = task.build()
    ref = bare_copy(model)
    torchreg.L1(model.fc, lam=1e-2)
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"'fc\.weight' is already regularized.*L1\(lam=0\.01\)"):
        torchreg.apply_regularization(model, {nn.Module: L2(1e-2)})
    assert_untouched(model, before)
    # the way out the message gives: exclude the wrapped layer
    torchreg.apply_regularization(model, {"fc": None, nn.Module: L2(1e-2)})
    train_and_compare(model, ref, l1(1e-2, "fc.weight") + l2(1e-2, *RESNET_CONVS), task)


# ================================================================================================
# Summary
# ================================================================================================
def test_summary_records_exactly():
    torch.manual_seed(0)
    model = nn.Sequential(collections.OrderedDict(
        conv=nn.Conv2d(3, 4, 3), bn=nn.BatchNorm2d(4), act=nn.ReLU(), flat=nn.Flatten(),
        fc=nn.Linear(16, 5), out=nn.Linear(5, 2),
    ))
    torchreg.apply_regularization(model, {"out": None, nn.Conv2d: L2(0.1), nn.Module: EN(0.01, 0.02)})
    s = torchreg.summary(model)
    w_conv, w_fc = model.conv.weight.detach(), model.fc.weight.detach()
    skipped = dict(regularizer=None, parameters=[], numel=0, penalty=None, tied={})
    no_param = dict(rule="rule #3 Module", note="selects no parameter here")
    expected = [
        dict(module="conv", type="Conv2d", rule="rule #2 Conv2d", regularizer="L2(lam=0.1)",
             parameters=["weight"], numel=108, penalty=pytest.approx(0.05 * w_conv.pow(2).sum().item()), note="",
             tied={}),
        dict(module="bn", type="BatchNorm2d", **skipped, **no_param),
        dict(module="act", type="ReLU", **skipped, **no_param),
        dict(module="flat", type="Flatten", **skipped, **no_param),
        dict(module="fc", type="Linear", rule="rule #3 Module", regularizer="ElasticNet(l1=0.01, l2=0.02)",
             parameters=["weight"], numel=80,
             penalty=pytest.approx(0.01 * w_fc.abs().sum().item() + 0.01 * w_fc.pow(2).sum().item()), note="",
             tied={}),
        dict(module="out", type="Linear", **skipped, rule="rule #1 'out'", note="excluded, with its submodules"),
    ]
    assert s.records == expected
    assert len(s) == 6
    text = str(s)
    lines = text.splitlines()
    assert lines[0].split() == ["module", "type", "rule", "regularizer", "parameters", "numel", "penalty", "note"]
    for path in ("conv", "bn", "act", "flat", "fc", "out"):
        assert any(line.split()[0] == path for line in lines[2:-2]), (path, text)
    assert "total: 188 regularized elements" in lines[-2]
    assert lines[-1] == "not covered: none" and s.uncovered == []  # conv, fc regularized; "out" excluded
    assert repr(s) == text


def test_summary_of_a_nested_regularized_model_uses_full_paths():
    model = TASKS["lm"].build()
    torchreg.apply_regularization(model.encoder, {"layers.0.linear1": L1(1e-2)})
    outer = nn.Sequential(collections.OrderedDict(lm=model))
    assert [r["module"] for r in torchreg.summary(outer).records] == ["lm.encoder.layers.0.linear1"]
    assert "lm.encoder.layers.0.linear1" in str(torchreg.summary(outer))


def test_rule_matching_only_modules_with_nothing_selected_lists_them_as_skipped():
    model = TASKS["resnet"].build()
    with pytest.warns(UserWarning, match=r"rule #1 BatchNorm2d matched 6 module\(s\) but selected no parameter"):
        torchreg.apply_regularization(model, {nn.BatchNorm2d: L1(1e-3)})  # norm layers: default selects nothing
    records = torchreg.summary(model).records
    assert [r["module"] for r in records] == ["bn", "layer1.bn1", "layer1.bn2", "layer2.bn1", "layer2.bn2",
                                              "layer2.down.1"]
    assert all(r["regularizer"] is None and "selects no parameter" in r["note"] for r in records)
    assert not any(hooks_per_param(model).values())


def test_rule_selecting_nothing_raises_when_strict_and_leaves_model_alone():
    model = TASKS["resnet"].build()
    with pytest.raises(ValueError, match=r"rule #2 BatchNorm2d matched 6 module\(s\) but selected no parameter"):
        torchreg.apply_regularization(model, {nn.Conv2d: L2(1e-3), nn.BatchNorm2d: L1(1e-3)}, strict=True)
    assert not any(hooks_per_param(model).values()) and not hasattr(model, "_torchreg_unit")


def test_none_excludes_the_whole_subtree():
    model = TASKS["resnet"].build()
    torchreg.apply_regularization(model, {"layer1": None, nn.Conv2d: L2(1e-3)})
    hooks = hooks_per_param(model)
    assert hooks["layer1.conv1.weight"] == 0 and hooks["layer1.conv2.weight"] == 0
    assert hooks["layer2.conv1.weight"] == 1 and hooks["stem.weight"] == 1
    rows = [r for r in torchreg.summary(model).records if r["module"].startswith("layer1")]
    assert [(r["module"], r["note"]) for r in rows] == [("layer1", "excluded, with its submodules")]


# ================================================================================================
# Bad input: an error that names the rule, and the model exactly as it was
# ================================================================================================
BAD = [
    pytest.param({3: L1(1e-3)}, TypeError, r"rule #1 3: a key must be", id="int-key"),
    pytest.param({nn.Linear(16, 5): L1(1e-3)}, TypeError, r"rule #1 .*module instance", id="module-instance-key"),
    pytest.param({int: L1(1e-3)}, TypeError, r"rule #1 int: a key", id="non-module-class-key"),
    pytest.param({(): L1(1e-3)}, TypeError, r"rule #1 \(\): a key", id="empty-tuple-key"),
    pytest.param({(nn.Linear, "fc"): L1(1e-3)}, TypeError, r"rule #1 .*a key", id="tuple-with-a-string"),
    pytest.param({nn.Linear: lambda m: m}, TypeError, r"rule #1 Linear: a value must be", id="lambda-value"),
    pytest.param({nn.Linear: 1e-4}, TypeError, r"rule #1 Linear: a value must be", id="float-value"),
    pytest.param({nn.Linear: torchreg.L1}, TypeError, r"rule #1 Linear: .*instantiate it", id="class-value"),
    pytest.param({nn.Linear: nn.Linear}, TypeError, r"rule #1 Linear: a value must be", id="module-class-value"),
    pytest.param({nn.Linear: P(torchreg.L1, lam=-1.0)}, ValueError, r"rule #1 Linear: .*-1\.0", id="negative-partial"),
    pytest.param({nn.Linear: P(torchreg.L2)}, TypeError, r"rule #1 Linear", id="partial-missing-lam"),
    pytest.param({nn.Linear: P(nn.Linear, 2, 2)}, TypeError, r"rule #1 Linear: a value must", id="partial-of-non-rule"),
    pytest.param({nn.Conv2d: L2(1e-2), "fc": 0.1}, TypeError, r"rule #2 'fc'", id="bad-second-rule-after-good"),
    pytest.param({nn.Conv2d: L2(1e-2), 7: None}, TypeError, r"rule #2 7", id="bad-key-after-good"),
    pytest.param([(nn.Linear, L1(1e-3))], TypeError, r"rules must be a mapping", id="list-of-pairs"),
    pytest.param(L1(1e-3), TypeError, r"rules must be a mapping", id="bare-rule"),
]


@pytest.mark.parametrize("rules, error, message", BAD)
def test_bad_rules_raise_before_anything_changes(rules, error, message):
    model = TASKS["resnet"].build()
    before = snapshot(model)
    with pytest.raises(error, match=message):
        torchreg.apply_regularization(model, rules)
    assert_untouched(model, before)
    assert torchreg.summary(model).records == []


@pytest.mark.parametrize(
    "rules",
    [
        pytest.param({nn.LSTM: L1(1e-3)}, id="only-rule-unmatched"),
        pytest.param({nn.Conv2d: L2(1e-2), nn.LSTM: L1(1e-3)}, id="second-rule-unmatched"),
        pytest.param({nn.Conv2d: L2(1e-2), "encoder.*": L1(1e-3)}, id="pattern-unmatched"),
    ],
)
def test_strict_unmatched_rule_raises_before_anything_changes(rules):
    model = TASKS["resnet"].build()
    before = snapshot(model)
    unmatched = _key_text(list(rules)[-1])
    with pytest.raises(ValueError, match=rf"#{len(rules)} {re.escape(unmatched)} matched no module"):
        torchreg.apply_regularization(model, rules, strict=True)
    assert_untouched(model, before)


def _key_text(key) -> str:
    return key.__name__ if isinstance(key, type) else repr(key)


def test_unmatched_rule_warns_and_applies_the_others():
    model = TASKS["resnet"].build()
    with pytest.warns(UserWarning, match=r"on TinyResNet: rule #2 LSTM matched no module$"):
        torchreg.apply_regularization(model, {nn.Conv2d: L2(1e-2), nn.LSTM: L1(1e-3)})
    assert regularized_names(model) == sorted(RESNET_CONVS)


def test_only_unmatched_rules_warn_and_leave_the_model_as_it_was():
    model = TASKS["resnet"].build()
    before = snapshot(model)
    with pytest.warns(UserWarning, match=r"rule #1 LSTM matched no module; rule #2 'decoder\.\*' matched no module"):
        torchreg.apply_regularization(model, {nn.LSTM: L1(1e-3), "decoder.*": L2(1e-2)})
    assert_untouched(model, before)


@pytest.mark.parametrize(
    "model, error, message",
    [
        pytest.param(TinyResNet, TypeError, "instantiate it", id="class-not-instance"),
        pytest.param("model", TypeError, "expects an nn.Module instance", id="string"),
    ],
)
def test_bad_model_argument(model, error, message):
    with pytest.raises(error, match=message):
        torchreg.apply_regularization(model, {nn.Linear: L1(1e-3)})
    with pytest.raises(error, match=message):
        torchreg.remove_regularization(model)


def test_remove_on_unregularized_model_raises_and_changes_nothing():
    model = TASKS["resnet"].build()
    before = snapshot(model)
    with pytest.raises(ValueError, match="no torchreg regularization found on TinyResNet"):
        torchreg.remove_regularization(model)
    assert_untouched(model, before)


def test_penalty_and_remove_on_a_submodule_of_a_regularized_model():
    model = TASKS["resnet"].build()
    torchreg.apply_regularization(model, {nn.Conv2d: L2(1e-2)})
    w = model.layer1.conv1.weight.detach()
    layer1 = explicit_penalty([(model.layer1.conv1.weight, 0.0, 1e-2), (model.layer1.conv2.weight, 0.0, 1e-2)])
    torch.testing.assert_close(torchreg.penalty(model.layer1), layer1.detach())
    torch.testing.assert_close(torchreg.penalty(model.layer1.conv1), 1e-2 / 2 * w.pow(2).sum())
    with pytest.raises(ValueError, match="enclosing TinyResNet: remove it there"):
        torchreg.remove_regularization(model.layer1)


def test_an_exclusion_claims_a_tied_parameter_for_constraints_too() -> None:
    """A tied weight whose first owner is excluded gets neither the penalty nor the constraint of a later
    module that shares it, and the disagreement is reported for each kind."""

    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(5, 3)
            self.head = nn.Linear(3, 5, bias=False)
            self.head.weight = self.embed.weight

    model = Tied()
    with pytest.warns(UserWarning) as caught:
        torchreg.apply_regularization(model, {nn.Embedding: None,
                                              nn.Linear: (torchreg.L2(0.1), torchreg.MaxNorm(1.0))})
    text = " ".join(str(w.message) for w in caught)
    assert "embed.weight is shared by modules whose rules disagree" in text
    assert "so it is not regularized" in text and "so it is not constrained" in text
    assert not torchreg.is_regularized(model.embed)
    with pytest.raises(ValueError, match="disagree"):
        torchreg.apply_regularization(Tied(), {nn.Embedding: None, nn.Linear: torchreg.MaxNorm(1.0)}, strict=True)
