"""torchreg.param_groups: hand-built groups, timm's convention, torchreg's own selection, blocks."""

from __future__ import annotations

import copy
import fnmatch
import functools
import warnings

import pytest
import torch
from torch import nn

import torchreg
from torchreg import _engine
from torchreg._select import select


# -- models ---------------------------------------------------------------------------------------
class TinyTransformer(nn.Module):
    def __init__(self, vocab=11, d=8):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.encoder = nn.TransformerEncoder(
            nn.TransformerEncoderLayer(d, nhead=2, dim_feedforward=16, batch_first=True, dropout=0.0),
            num_layers=2, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.embed.weight                 # tied

    def forward(self, x):
        return self.head(self.norm(self.encoder(self.embed(x))))


def convnet():
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 4, 3, bias=False), nn.GroupNorm(2, 4), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3),
    )


def by_name(model, names):
    params = dict(model.named_parameters())
    return [params[n] for n in names]


def ids(params):
    return [id(p) for p in params]


def group_ids(groups):
    return [(ids(g["params"]), g["weight_decay"]) for g in groups]


# -- hand-built groups ----------------------------------------------------------------------------
def test_transformer_matches_hand_built_groups():
    model = TinyTransformer()
    decay, no_decay = ["embed.weight"], []
    for i in range(2):
        layer = f"encoder.layers.{i}."
        decay += [layer + n for n in ("self_attn.in_proj_weight", "self_attn.out_proj.weight",
                                      "linear1.weight", "linear2.weight")]
        no_decay += [layer + n for n in ("self_attn.in_proj_bias", "self_attn.out_proj.bias", "linear1.bias",
                                         "linear2.bias", "norm1.weight", "norm1.bias", "norm2.weight",
                                         "norm2.bias")]
    no_decay += ["norm.weight", "norm.bias"]
    got = torchreg.param_groups(model, 0.1)
    names = [n for n, _ in model.named_parameters()]
    want = [(ids(by_name(model, [n for n in names if n in decay])), 0.1),
            (ids(by_name(model, [n for n in names if n in no_decay])), 0.0)]
    assert len(decay) + len(no_decay) == len(names)          # the tied head.weight is embed.weight, once
    assert group_ids(got) == want


def test_convnet_matches_hand_built_groups_and_leaves_frozen_out():
    model = convnet()
    model[0].bias.requires_grad_(False)
    got = torchreg.param_groups(model, 5e-4)
    want = [(ids(by_name(model, ["0.weight", "3.weight", "8.weight"])), 5e-4),
            (ids(by_name(model, ["1.weight", "1.bias", "4.weight", "4.bias", "8.bias"])), 0.0)]
    assert group_ids(got) == want


def test_groups_are_the_params_torchreg_regularizes_by_default():
    for model in (TinyTransformer(), convnet()):
        groups = torchreg.param_groups(model, 0.1)
        regularized = copy.deepcopy(model)
        torchreg.L2(regularized, lam=0.1)
        names = {id(p): n for n, p in model.named_parameters()}
        copies = dict(regularized.named_parameters())
        decayed = {names[id(p)] for p in groups[0]["params"]}
        assert decayed == {n for n, p in copies.items() if _engine.owner_of(p) is not None}


RULES = [
    {nn.Linear: torchreg.L2(lam=1.0)},
    {"encoder.layers.0": None, nn.Module: torchreg.L1(lam=1.0)},
    {nn.MultiheadAttention: torchreg.L2(lam=1.0, params="*"), nn.Linear: functools.partial(torchreg.L1, lam=1.0)},
    {nn.LayerNorm: torchreg.L2(lam=1.0, params="*"), "embed": torchreg.L2(lam=1.0)},
    {nn.Conv2d: torchreg.L2(lam=1.0), (nn.BatchNorm2d, nn.GroupNorm): torchreg.L1(lam=1.0, params="bias")},
    # an activity rule first: it selects no parameter, and the weight rule after it still applies
    {nn.Module: torchreg.ActivityL1(lam=1.0), (nn.Linear, nn.Conv2d): torchreg.L2(lam=1.0)},
]


@pytest.mark.parametrize("rules", RULES, ids=lambda r: ",".join(map(str, r)))
@pytest.mark.parametrize("build", [TinyTransformer, convnet])
def test_with_rules_decay_is_what_apply_regularization_regularizes(build, rules):
    model = build()
    regularized = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                      # rules that match nothing in this model
        torchreg.apply_regularization(regularized, rules)
    groups = torchreg.param_groups(model, 0.1, rules)
    names = {id(p): n for n, p in model.named_parameters()}
    want = {n for n, p in regularized.named_parameters() if _engine.owner_of(p) is not None}
    decayed = {names[id(p)] for g in groups if g["weight_decay"] for p in g["params"]}
    assert decayed == want
    every = [id(p) for g in groups for p in g["params"]]
    assert sorted(every) == sorted(id(p) for p in model.parameters())    # each exactly once
    assert _engine.owner_of(next(model.parameters())) is None              # model not changed


def test_sgd_with_groups_follows_torchreg_l2():
    """Coupled decay in the groups == torchreg.L2 on the same selection: same trajectory."""
    torch.manual_seed(0)
    model = convnet()
    reference = copy.deepcopy(model)
    torchreg.L2(reference, lam=0.05)
    opt_a = torch.optim.SGD(torchreg.param_groups(model, 0.05), lr=0.1, momentum=0.9)
    opt_b = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    for _ in range(3):
        x = torch.randn(4, 3, 8, 8)
        for m, opt in ((model, opt_a), (reference, opt_b)):
            opt.zero_grad()
            m(x).square().mean().backward()
            opt.step()
    for (n, a), b in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, msg=n)


# -- timm -----------------------------------------------------------------------------------------
def timm_param_groups_weight_decay(model, weight_decay=1e-5, no_weight_decay_list=()):
    """timm.optim._param_groups.param_groups_weight_decay (huggingface/pytorch-image-models),
    re-typed here without its ``simple_params_list`` branch: timm itself is not installable next to
    this torch (its torchvision dependency has no CPU build for it)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim <= 1 or name.endswith(".bias") or any(fnmatch.fnmatch(name, p) for p in no_weight_decay_list):
            no_decay.append(param)
        else:
            decay.append(param)
    groups = []
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay})
    return groups


class UserRMSNorm(nn.Module):                                 # a user-defined norm, found by its name
    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))


class ViTish(nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.patch = nn.Conv2d(3, d, 4, 4)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, 5, d))
        self.attn = nn.MultiheadAttention(d, 2, batch_first=True)
        self.norm = nn.LayerNorm(d)
        self.rms = UserRMSNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 16), nn.GELU(), nn.Linear(16, d))
        self.bn = nn.BatchNorm1d(d)
        self.act = nn.PReLU(d)
        self.frozen = nn.Linear(d, d)
        self.frozen.requires_grad_(False)
        self.head = nn.Linear(d, 3)


def test_against_timm_param_groups_weight_decay():
    model = ViTish()
    names = {id(p): n for n, p in model.named_parameters()}
    timm = timm_param_groups_weight_decay(model, 0.05)
    ours = torchreg.param_groups(model, 0.05)
    # Difference 1, group order: timm lists the no-decay group first, torchreg the decay group.
    assert [g["weight_decay"] for g in timm] == [0.0, 0.05]
    assert [g["weight_decay"] for g in ours] == [0.05, 0.0]
    timm_decay = {names[id(p)] for p in timm[1]["params"]}
    ours_decay = {names[id(p)] for p in ours[0]["params"]}
    # Difference 2: timm decays every trainable parameter of 2 or more dimensions that is not a bias;
    # torchreg decays what its regularizers regularize: parameters *named* weight (weight, weight_*,
    # *_weight), so free-standing tensors such as ViT's cls_token and pos_embed are not decayed.
    # timm's own ViTs take them out again through no_weight_decay_list (below), which makes the two
    # agree; to decay them with torchreg, give them a rule with params= (test below).
    only_timm = {"cls_token", "pos_embed"}
    # Difference 3: a 1-D weight outside a norm layer (PReLU's per-channel slopes): timm never decays
    # 1-D tensors; torchreg's default decays it unless the default selection requires ndim >= 2.
    prelu_in_default = bool(select(nn.PReLU(3), None, recurse=True))
    only_ours = {"act.weight"} if prelu_in_default else set()
    assert timm_decay - ours_decay == only_timm
    assert ours_decay - timm_decay == only_ours
    # Everything else agrees: biases, LayerNorm / BatchNorm / user "...Norm" weights (1-D) are not
    # decayed; conv, linear and attention projection weights are; frozen parameters are in neither.
    assert {"patch.weight", "attn.in_proj_weight", "attn.out_proj.weight", "mlp.0.weight", "head.weight"} <= ours_decay
    every = lambda groups: sorted(names[id(p)] for g in groups for p in g["params"])  # noqa: E731
    assert every(ours) == every(timm) and "frozen.weight" not in every(ours)
    # With timm ViT's no_weight_decay list, the only remaining difference is PReLU's (if any).
    timm_vit = timm_param_groups_weight_decay(model, 0.05, no_weight_decay_list=("cls_token", "pos_embed"))
    assert ours_decay ^ {names[id(p)] for p in timm_vit[1]["params"]} == only_ours


def test_rules_select_free_standing_tensors_too():
    model = ViTish()
    rules = {"": torchreg.L2(lam=0.0, params=["cls_token", "pos_embed"]), nn.Linear: torchreg.L2(lam=0.0),
             nn.MultiheadAttention: torchreg.L2(lam=0.0)}
    names = {id(p): n for n, p in model.named_parameters()}
    decay = [names[id(p)] for p in torchreg.param_groups(model, 0.05, rules)[0]["params"]]
    assert decay == ["cls_token", "pos_embed", "attn.in_proj_weight", "attn.out_proj.weight",
                     "mlp.0.weight", "mlp.2.weight", "head.weight"]


# -- blocks ---------------------------------------------------------------------------------------
def test_blocks_compose_with_per_block_learning_rates():
    torch.manual_seed(0)
    model = TinyTransformer()
    groups = torchreg.param_groups(model, 0.1, blocks=[(model.encoder.layers[0], {"lr": 1e-3}),
                                                       (list(model.norm.parameters()), {"lr": 1e-2, "betas": (0.5, 0.6)}),
                                                       (model.encoder.layers[1], {"lr": 3e-3, "weight_decay": 0.2})])
    enc0, enc1 = model.encoder.layers
    hand = [
        {"params": [enc0.self_attn.in_proj_weight, enc0.self_attn.out_proj.weight, enc0.linear1.weight,
                    enc0.linear2.weight], "weight_decay": 0.1, "lr": 1e-3},
        {"params": [enc0.self_attn.in_proj_bias, enc0.self_attn.out_proj.bias, enc0.linear1.bias, enc0.linear2.bias,
                    enc0.norm1.weight, enc0.norm1.bias, enc0.norm2.weight, enc0.norm2.bias],
         "weight_decay": 0.0, "lr": 1e-3},
        {"params": [model.norm.weight, model.norm.bias], "weight_decay": 0.0, "lr": 1e-2, "betas": (0.5, 0.6)},
        {"params": [enc1.self_attn.in_proj_weight, enc1.self_attn.out_proj.weight, enc1.linear1.weight,
                    enc1.linear2.weight], "weight_decay": 0.2, "lr": 3e-3},
        {"params": [enc1.self_attn.in_proj_bias, enc1.self_attn.out_proj.bias, enc1.linear1.bias, enc1.linear2.bias,
                    enc1.norm1.weight, enc1.norm1.bias, enc1.norm2.weight, enc1.norm2.bias],
         "weight_decay": 0.0, "lr": 3e-3},
        {"params": [model.embed.weight], "weight_decay": 0.1},
    ]
    assert [{k: v for k, v in g.items() if k != "params"} for g in groups] == \
           [{k: v for k, v in g.items() if k != "params"} for g in hand]
    assert [ids(g["params"]) for g in groups] == [ids(g["params"]) for g in hand]
    # And the optimizer built from them trains exactly as the hand-built one.
    reference = copy.deepcopy(model)
    ref_params = dict(reference.named_parameters())
    names = {id(p): n for n, p in model.named_parameters()}
    ref_groups = [{**g, "params": [ref_params[names[id(p)]] for p in g["params"]]} for g in hand]
    opt_a, opt_b = torch.optim.AdamW(groups, lr=1e-4), torch.optim.AdamW(ref_groups, lr=1e-4)
    for _ in range(3):
        x = torch.randint(0, 11, (2, 5))
        for m, opt in ((model, opt_a), (reference, opt_b)):
            opt.zero_grad()
            m(x).logsumexp(-1).mean().backward()
            opt.step()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p, ref_params[n], rtol=0, atol=0, msg=n)


# -- bad input ------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, error, match", [
    (dict(weight_decay=-1.0), ValueError, "weight_decay must be a finite"),
    (dict(weight_decay="0.1"), TypeError, "weight_decay must be a real number"),
    (dict(weight_decay=0.1, rules=[nn.Linear]), TypeError, "rules must be None"),
    (dict(weight_decay=0.1, rules={nn.Linear: 0.1}), TypeError, "a value must be a torchreg regularizer"),
    (dict(weight_decay=0.1, blocks=(nn.Linear(2, 2), {})), TypeError, r"blocks\[0\] must be a pair"),
    (dict(weight_decay=0.1, blocks=[(nn.Linear(2, 2), {})]), ValueError, r"blocks\[0\] holds a parameter of shape \(2, 2\)"),
    (dict(weight_decay=0.1, blocks=[("0", {})]), TypeError, "module or an iterable of parameters"),
    (dict(weight_decay=0.1, blocks=[([], {})]), TypeError, "non-empty iterable"),
    (dict(weight_decay=0.1, blocks=[([torch.zeros(2)], {})]), TypeError, "it contains Tensor"),
    (dict(weight_decay=0.1, blocks=[(nn.Linear(2, 2), [("lr", 1)])]), TypeError, "dict of optimizer options"),
    (dict(weight_decay=0.1, blocks="0"), TypeError, "blocks must be a list"),
])
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        torchreg.param_groups(convnet(), **kwargs)


def test_bad_blocks_that_need_the_model():
    model = convnet()
    with pytest.raises(ValueError, match=r"parameter '0.weight' is in blocks\[0\] and blocks\[1\]"):
        torchreg.param_groups(model, 0.1, blocks=[(model[0], {}), ([model[0].weight], {"lr": 1})])
    with pytest.raises(ValueError, match="must not contain 'params'"):
        torchreg.param_groups(model, 0.1, blocks=[(model[0], {"params": []})])
    with pytest.raises(ValueError, match=r"blocks\[0\] weight_decay must be a finite"):
        torchreg.param_groups(model, 0.1, blocks=[(model[0], {"weight_decay": -2})])
    with pytest.raises(TypeError, match="param_groups expects an nn.Module instance"):
        torchreg.param_groups(list(model.parameters()), 0.1)
