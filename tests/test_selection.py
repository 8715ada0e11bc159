"""The default selection (``params=None``): kernels only; no bias, no scale or shift, nothing of a
normalization layer, whether torch knows the layer or not.

References: the documented rule, written out by hand for each layer below; torch's own list of
normalization layers (every ``torch.nn`` class named like one must be in the table); the names and
shapes of timm's and Hugging Face's normalization layers (local copies of their ``__init__``s, and the
real classes when transformers is importable); timm's ``param_groups_weight_decay`` rule, reimplemented
as it is in timm's source, compared model family by model family; and autograd's gradient of
``loss + penalty`` over the expected parameters for a model built of unknown norm layers.
"""

from __future__ import annotations

import copy
import importlib
from typing import Callable, Dict, Iterable, List, Sequence, Set, Tuple

import pytest
import torch
from torch import Tensor, nn

import torchreg
from torchreg._select import is_norm_layer, select
from reference import assert_same_grads, explicit_penalty

pytestmark = [
    pytest.mark.filterwarnings("error:torchreg"),
    pytest.mark.filterwarnings("error:apply_regularization"),
    pytest.mark.filterwarnings("ignore:Lazy modules are a new feature"),
]

C = 8  # channels of the local norm layers


def default_names(module: nn.Module) -> List[str]:
    return [name for name, _ in select(module, None, recurse=True)]


# ================================================================================================
# Local copies of timm's and Hugging Face's normalization layers: class names, parameter names and
# shapes as in their sources (timm/layers/{evo_norm,norm,norm_act,filter_response_norm}.py, timm 0.4's
# timm/models/layers/evo_norm.py, transformers' modeling_{mamba2,llama,t5,convnextv2}.py). The forward
# is a plain per-channel affine map: enough for gradients to flow through every parameter.
# ================================================================================================
def per_channel(x: Tensor, p: Tensor) -> Tensor:
    return x * p.reshape(1, -1, 1, 1)


class _ChannelAffine(nn.Module):
    """weight, bias of shape ``(C,)`` (timm's EvoNorm*, RmsNorm2d, SimpleNorm2d, FRN, GRN...)."""

    def __init__(self, channels: int = C, extra: Sequence[str] = (), shape: Tuple[int, ...] = ()) -> None:
        super().__init__()
        shape = shape or (channels,)
        self.weight = nn.Parameter(torch.rand(shape) + 0.5)
        self.bias = nn.Parameter(torch.randn(shape) * 0.1)
        for name in extra:
            setattr(self, name, nn.Parameter(torch.rand(shape) + 0.5))

    def forward(self, x: Tensor) -> Tensor:
        y = x * self.weight.reshape(1, -1, 1, 1) + self.bias.reshape(1, -1, 1, 1)
        for name in ("v", "tau"):
            if hasattr(self, name):
                y = y + per_channel(x, getattr(self, name)).sigmoid()
        return y


class EvoNorm2dB0(_ChannelAffine):  # timm: weight, bias, v: (C,)
    def __init__(self, channels: int = C) -> None:
        super().__init__(channels, extra=("v",))


class EvoNorm2dS0(_ChannelAffine):  # timm: weight, bias, v: (C,), groups
    def __init__(self, channels: int = C) -> None:
        super().__init__(channels, extra=("v",))


class EvoNormBatch2d(_ChannelAffine):  # timm 0.4: weight, bias, v: (1, C, 1, 1)
    def __init__(self, channels: int = C) -> None:
        super().__init__(channels, extra=("v",), shape=(1, channels, 1, 1))


class EvoNormSample2d(_ChannelAffine):  # timm 0.4: weight, bias, v: (1, C, 1, 1)
    def __init__(self, channels: int = C) -> None:
        super().__init__(channels, extra=("v",), shape=(1, channels, 1, 1))


class RmsNorm2d(_ChannelAffine):  # timm: weight (C,)
    pass


class RmsNormFp32(_ChannelAffine):  # timm: weight (C,)
    pass


class SimpleNorm2d(_ChannelAffine):  # timm: weight (C,)
    pass


class FilterResponseNormAct2d(_ChannelAffine):  # timm: weight, bias (C,), an activation submodule
    def __init__(self, channels: int = C) -> None:
        super().__init__(channels)
        self.act = nn.ReLU()


class FilterResponseNormTlu2d(_ChannelAffine):  # timm: weight, bias, tau (C,)
    def __init__(self, channels: int = C) -> None:
        super().__init__(channels, extra=("tau",))


class GlobalResponseNorm(_ChannelAffine):  # timm: weight, bias (C,)
    pass


class RmsNorm(nn.Module):  # timm's RmsNorm with a tuple ``channels``: a 2-D weight, kept out by the name
    def __init__(self, channels: Tuple[int, ...] = (4, 6)) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))


class LayerNormalization(nn.Module):  # a Keras port: gamma/beta named weight/bias, normalized over (H, W)
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(4, 6))
        self.bias = nn.Parameter(torch.zeros(4, 6))


class MambaRMSNormGated(nn.Module):  # transformers' Mamba2: weight (hidden,)
    def __init__(self, hidden_size: int = C, group_size: int = 4) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.group_size = group_size


class LlamaRMSNorm(MambaRMSNormGated):  # weight (hidden,)
    pass


class T5LayerNorm(MambaRMSNormGated):  # weight (hidden,)
    pass


class RMSnorm(MambaRMSNormGated):  # lower-case "norm" at the end
    pass


class FancyLayerNorm(nn.LayerNorm):  # a torch norm subclass, by isinstance
    pass


class GatedRMSNormBase(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(3, 4))  # 2-D: excluded by the base class's name


class Gate(GatedRMSNormBase):  # its own name says nothing; a base class's does
    pass


class ConvNextV2GRN(_ChannelAffine):  # transformers: weight, bias (1, 1, 1, C); not named Norm
    def __init__(self, channels: int = C) -> None:
        super().__init__(channels, shape=(1, 1, 1, channels))

    def forward(self, x: Tensor) -> Tensor:  # channels last, as in ConvNeXt-V2
        x = x.permute(0, 2, 3, 1)
        return (x * self.weight + self.bias).permute(0, 3, 1, 2)


LOCAL_NORMS: List[Callable[[], nn.Module]] = [
    EvoNorm2dB0, EvoNorm2dS0, EvoNormBatch2d, EvoNormSample2d, RmsNorm2d, RmsNormFp32, SimpleNorm2d,
    FilterResponseNormAct2d, FilterResponseNormTlu2d, GlobalResponseNorm, RmsNorm, LayerNormalization,
    MambaRMSNormGated, LlamaRMSNorm, T5LayerNorm, RMSnorm, lambda: FancyLayerNorm([4, 6]), Gate, ConvNextV2GRN,
]


# ================================================================================================
# torch's normalization layers: every one of them, with its affine parameters on
# ================================================================================================
TORCH_NORMS: Dict[str, Callable[[], nn.Module]] = {
    "BatchNorm1d": lambda: nn.BatchNorm1d(C),
    "BatchNorm2d": lambda: nn.BatchNorm2d(C),
    "BatchNorm3d": lambda: nn.BatchNorm3d(C),
    "SyncBatchNorm": lambda: nn.SyncBatchNorm(C),
    "LazyBatchNorm1d": lambda: nn.LazyBatchNorm1d(),
    "LazyBatchNorm2d": lambda: nn.LazyBatchNorm2d(),
    "LazyBatchNorm3d": lambda: nn.LazyBatchNorm3d(),
    "InstanceNorm1d": lambda: nn.InstanceNorm1d(C, affine=True),
    "InstanceNorm2d": lambda: nn.InstanceNorm2d(C, affine=True),
    "InstanceNorm3d": lambda: nn.InstanceNorm3d(C, affine=True),
    "LazyInstanceNorm1d": lambda: nn.LazyInstanceNorm1d(affine=True),
    "LazyInstanceNorm2d": lambda: nn.LazyInstanceNorm2d(affine=True),
    "LazyInstanceNorm3d": lambda: nn.LazyInstanceNorm3d(affine=True),
    "LayerNorm": lambda: nn.LayerNorm(C),
    "GroupNorm": lambda: nn.GroupNorm(2, C),
    "LocalResponseNorm": lambda: nn.LocalResponseNorm(2),
    "CrossMapLRN2d": lambda: nn.CrossMapLRN2d(3),
    "RMSNorm": lambda: nn.RMSNorm(C),
}
# multi-dimensional affine parameters: a 3-D LayerNorm weight, a 2-D RMSNorm one
TORCH_NORM_VARIANTS: Dict[str, Callable[[], nn.Module]] = {
    "LayerNorm-3d-shape": lambda: nn.LayerNorm([C, 4, 4]),
    "RMSNorm-2d-shape": lambda: nn.RMSNorm([4, C]),
}


def test_the_table_has_every_torch_normalization_layer():
    """A torch release adding a normalization layer makes this fail until the table has it."""
    names = {n for n, c in vars(nn).items()
             if isinstance(c, type) and issubclass(c, nn.Module) and ("Norm" in n or "LRN" in n)}
    assert names == set(TORCH_NORMS)


@pytest.mark.parametrize("make", [pytest.param(f, id=n) for n, f in {**TORCH_NORMS, **TORCH_NORM_VARIANTS}.items()])
def test_torch_normalization_layers_are_left_out(make):
    module = make()
    assert is_norm_layer(module)
    assert default_names(module) == []
    with pytest.raises(ValueError, match="selects no parameter"):
        torchreg.L1(module, 0.1)
    if any(True for _ in module.parameters()):  # LocalResponseNorm and CrossMapLRN2d have none
        assert torchreg.L2(module, 0.1, params="*") is module  # params= still reaches them
        assert len(torchreg.summary(module).records[0]["parameters"]) == len(list(module.parameters()))


@pytest.mark.parametrize("make", [pytest.param(f, id=getattr(f, "__name__", "FancyLayerNorm")) for f in LOCAL_NORMS])
def test_norm_layers_torch_does_not_know_are_left_out(make):
    module = make()
    shapes = {n: tuple(p.shape) for n, p in module.named_parameters()}
    assert any(n.endswith("weight") for n in shapes), shapes  # each has a parameter named like a weight
    assert default_names(module) == [], shapes
    with pytest.raises(ValueError, match="selects no parameter"):
        torchreg.L1(module, 0.1)
    # inside a model, under a catch-all rule: the norm is skipped, the convolution regularized
    model = nn.Sequential(nn.Conv2d(3, C, 3), module)
    torchreg.apply_regularization(model, {nn.Module: torchreg.L2(1e-2)})  # no warning: the conv is selected
    assert [e.name for e in model._torchreg_unit.entries] == ["0.weight"]


# ================================================================================================
# Layers with kernels: what the default keeps, and the scales and shifts it leaves out
# ================================================================================================
class Conv1D(nn.Module):
    """transformers.pytorch_utils.Conv1D (GPT-2): weight (in, out), bias (out,)."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.02)
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x: Tensor) -> Tensor:
        return torch.addmm(self.bias, x.reshape(-1, x.size(-1)), self.weight).reshape(*x.shape[:-1], self.nf)


class Custom(nn.Module):
    """A user layer with one parameter of the given name and shape."""

    def __init__(self, name: str, shape: Tuple[int, ...]) -> None:
        super().__init__()
        self.register_parameter(name, nn.Parameter(torch.randn(shape)))


class WeightNormLinear(nn.Linear):  # a "Norm" in the name, but a torch kernel layer
    pass


class NormedLinear(nn.Module):  # a cosine classifier's kernel: "Normed" is not "Norm"
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(5, 4))


KEPT: List[Tuple[str, Callable[[], nn.Module], List[str]]] = [
    ("Linear", lambda: nn.Linear(4, 3), ["weight"]),
    ("Linear-one-output", lambda: nn.Linear(64, 1), ["weight"]),  # (1, 64): a torch kernel layer
    ("Linear-one-input", lambda: nn.Linear(1, 8), ["weight"]),
    ("LazyLinear", lambda: nn.LazyLinear(3), ["weight"]),
    ("Bilinear", lambda: nn.Bilinear(2, 3, 4), ["weight"]),
    ("Conv1d", lambda: nn.Conv1d(2, 3, 3), ["weight"]),
    ("Conv2d", lambda: nn.Conv2d(2, 3, 3), ["weight"]),
    ("Conv3d", lambda: nn.Conv3d(2, 3, 3), ["weight"]),
    ("Conv2d-1x1-to-one-channel", lambda: nn.Conv2d(C, 1, 1), ["weight"]),  # (1, C, 1, 1)
    ("Conv2d-depthwise", lambda: nn.Conv2d(C, C, 3, groups=C), ["weight"]),  # (C, 1, 3, 3)
    ("ConvTranspose2d", lambda: nn.ConvTranspose2d(2, 3, 3), ["weight"]),
    ("LazyConv2d", lambda: nn.LazyConv2d(3, 3), ["weight"]),
    ("Embedding", lambda: nn.Embedding(10, 4), ["weight"]),
    ("Embedding-dim-1", lambda: nn.Embedding(10, 1), ["weight"]),
    ("EmbeddingBag", lambda: nn.EmbeddingBag(10, 4), ["weight"]),
    ("LSTM-2-layers-proj", lambda: nn.LSTM(4, 3, num_layers=2, proj_size=2),
     ["weight_ih_l0", "weight_hh_l0", "weight_hr_l0", "weight_ih_l1", "weight_hh_l1", "weight_hr_l1"]),
    ("GRU-bidirectional", lambda: nn.GRU(4, 3, bidirectional=True),
     ["weight_ih_l0", "weight_hh_l0", "weight_ih_l0_reverse", "weight_hh_l0_reverse"]),
    ("RNN-hidden-1", lambda: nn.RNN(4, 1), ["weight_ih_l0", "weight_hh_l0"]),  # weight_hh (1, 1)
    ("LSTMCell", lambda: nn.LSTMCell(4, 3), ["weight_ih", "weight_hh"]),
    ("MultiheadAttention", lambda: nn.MultiheadAttention(8, 2), ["in_proj_weight", "out_proj.weight"]),
    ("MultiheadAttention-kdim-vdim", lambda: nn.MultiheadAttention(8, 2, kdim=4, vdim=6),
     ["q_proj_weight", "k_proj_weight", "v_proj_weight", "out_proj.weight"]),
    ("MultiheadAttention-bias-kv", lambda: nn.MultiheadAttention(8, 2, add_bias_kv=True),
     ["in_proj_weight", "out_proj.weight"]),  # bias_k, bias_v (1, 1, 8): not weights
    ("TransformerEncoderLayer", lambda: nn.TransformerEncoderLayer(8, 2, 16),
     ["self_attn.in_proj_weight", "self_attn.out_proj.weight", "linear1.weight", "linear2.weight"]),
    ("Conv1D-GPT2", lambda: Conv1D(6, 4), ["weight"]),
    ("user-2d-weight", lambda: Custom("weight", (3, 4)), ["weight"]),
    ("user-4d-kernel", lambda: Custom("weight", (3, 2, 1, 1)), ["weight"]),
    ("user-weight_-prefix", lambda: Custom("weight_proj", (3, 4)), ["weight_proj"]),
    ("WeightNormLinear-subclass", lambda: WeightNormLinear(4, 3), ["weight"]),
    ("NormedLinear", NormedLinear, ["weight"]),
]

LEFT_OUT: List[Tuple[str, Callable[[], nn.Module]]] = [
    ("PReLU", lambda: nn.PReLU(C)),  # per-channel slopes (C,): Keras' alpha, not its kernel
    ("PReLU-single", lambda: nn.PReLU()),
    ("user-1d-weight", lambda: Custom("weight", (C,))),
    ("user-0d-weight", lambda: Custom("weight", ())),
    ("user-broadcast-scale", lambda: Custom("weight", (1, C, 1, 1))),
    ("user-channels-last-scale", lambda: Custom("weight", (1, 1, 1, C))),
    ("user-2d-bias", lambda: Custom("bias", (3, 4))),
    ("user-2d-kernel-named-otherwise", lambda: Custom("kernel", (3, 4))),
]


@pytest.mark.parametrize("make, expected", [pytest.param(f, e, id=i) for i, f, e in KEPT])
def test_kernels_are_selected(make, expected):
    assert default_names(make()) == expected


@pytest.mark.parametrize("make", [pytest.param(f, id=i) for i, f in LEFT_OUT])
def test_scales_shifts_and_other_names_are_left_out_unless_asked_for(make):
    module = make()
    assert default_names(module) == []
    name = next(n for n, _ in module.named_parameters())
    assert torchreg.L1(module, 0.1, params=name) is module  # params= overrides the default


# ================================================================================================
# The real classes, where transformers is importable
# ================================================================================================
def _transformers(name: str):
    pytest.importorskip("transformers")
    return importlib.import_module(f"transformers.models.{name}.modeling_{name}")


HF_NORMS = [
    ("mamba2", "MambaRMSNormGated", lambda cls: cls(C, group_size=4)),
    ("mamba2", "Mamba2RMSNorm", lambda cls: cls(C)),
    ("llama", "LlamaRMSNorm", lambda cls: cls(C)),
    ("t5", "T5LayerNorm", lambda cls: cls(C)),
    ("convnextv2", "ConvNextV2GRN", lambda cls: cls(C)),  # (1, 1, 1, C), not named like a norm
    ("convnext", "ConvNextLayerNorm", lambda cls: cls(C)),
]


@pytest.mark.parametrize("where, name, make", [pytest.param(*case, id=case[1]) for case in HF_NORMS])
def test_transformers_norm_layers_are_left_out(where, name, make):
    module = make(getattr(_transformers(where), name))
    assert any(n == "weight" for n, _ in module.named_parameters())
    assert default_names(module) == []


def test_transformers_mamba2_default_takes_the_kernels_only():
    mamba2 = _transformers("mamba2")
    config = mamba2.Mamba2Config(num_hidden_layers=2, hidden_size=16, num_heads=4, head_dim=8, state_size=4,
                                 vocab_size=20, n_groups=1, expand=2)
    model = mamba2.Mamba2Model(config)
    expected = ["embeddings.weight"] + [f"layers.{i}.mixer.{n}.weight" for i in range(2)
                                        for n in ("conv1d", "in_proj", "out_proj")]
    assert default_names(model) == expected
    norms = [n for n, _ in model.named_parameters() if "norm" in n]
    assert len(norms) == 5 and not set(norms) & set(expected)  # MambaRMSNormGated x2, Mamba2RMSNorm x3


# ================================================================================================
# Against timm's rule, family by family
# ================================================================================================
def timm_decay(model: nn.Module, no_weight_decay_list: Iterable[str] = ()) -> Set[str]:
    """The names timm's ``param_groups_weight_decay`` puts in the decay group (timm/optim/_param_groups.py)."""
    no_weight_decay_list = set(no_weight_decay_list)
    decay = set()
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim <= 1 or name.endswith(".bias") or name in no_weight_decay_list:
            continue  # no decay
        decay.add(name)
    return decay


class ResNetLike(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                                   nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))
        self.down = nn.Sequential(nn.Conv2d(8, 16, 1, stride=2, bias=False), nn.BatchNorm2d(16))
        self.fc = nn.Linear(16, 5)


class ViTLike(nn.Module):
    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(3, d, 4, stride=4)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.randn(1, 5, d) * 0.02)
        layer = nn.TransformerEncoderLayer(d, 2, 32, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, 10)

    def no_weight_decay(self) -> Set[str]:  # what timm's VisionTransformer declares
        return {"pos_embed", "cls_token"}


class LSTMModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.lstm = nn.LSTM(8, 16, num_layers=2, batch_first=True)
        self.out = nn.Linear(16, 1)


class NormZoo(nn.Module):
    """Convolutions between normalization layers torch does not know; a one-output head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, C, 3, padding=1)
        self.evo_b0 = EvoNorm2dB0()
        self.conv2 = nn.Conv2d(C, C, 3, padding=1)
        self.evo_old = EvoNormBatch2d()
        self.conv3 = nn.Conv2d(C, C, 1)
        self.grn = ConvNextV2GRN()
        self.ln_chw = nn.LayerNorm([C, 4, 4])
        self.frn = FilterResponseNormAct2d()
        self.head = nn.Linear(C, 1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.evo_b0(self.conv1(x))
        x = self.evo_old(self.conv2(x))
        x = self.ln_chw(self.grn(self.conv3(x)))
        x = self.frn(x)
        return self.head(x.mean(dim=(2, 3)))


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(8, 2, add_bias_kv=True)


FAMILIES = {
    # family: (model, timm's decay group minus torchreg's default, and why)
    "resnet": (ResNetLike, set()),
    # timm decays any >= 2-D parameter: the position embedding and class token too, unless the model
    # lists them in no_weight_decay() (timm's ViT does); torchreg takes weights by name only
    "vit": (ViTLike, {"cls_token", "pos_embed"}),
    "lstm": (LSTMModel, set()),
    # timm decays >= 2-D scales of norm layers: timm 0.4's EvoNorm (1, C, 1, 1) weight and v, the
    # channels-last GRN (1, 1, 1, C) weight, a LayerNorm over (C, H, W)
    "norm-zoo": (NormZoo, {"evo_old.weight", "evo_old.v", "grn.weight", "ln_chw.weight"}),
    # MultiheadAttention's bias_k/bias_v are (1, 1, E) and not named ".bias": timm decays them
    "attention-bias-kv": (Attention, {"mha.bias_k", "mha.bias_v"}),
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_default_against_timm_param_groups_weight_decay(family):
    make, timm_only = FAMILIES[family]
    model = make()
    ours, theirs = set(default_names(model)), timm_decay(model)
    assert ours <= theirs  # torchreg never takes what timm leaves out
    assert theirs - ours == timm_only
    if family == "vit":
        assert timm_decay(model, model.no_weight_decay()) == ours


def test_unknown_norm_layers_in_a_model_get_no_term_and_the_kernels_get_theirs():
    """The gradient of ``loss + penalty`` over the convolutions and the head only (autograd's)."""
    torch.manual_seed(0)
    model = NormZoo()
    ref = copy.deepcopy(model)
    torchreg.ElasticNet(model, l1=1e-2, l2=1e-1)
    x = torch.randn(2, 3, 4, 4)
    model(x).pow(2).sum().backward()
    kernels = ["conv1.weight", "conv2.weight", "conv3.weight", "head.weight"]
    params = dict(ref.named_parameters())
    (ref(x).pow(2).sum() + explicit_penalty((params[n], 1e-2, 1e-1) for n in kernels)).backward()
    assert_same_grads(model, ref)
    assert [e.name for e in model._torchreg_unit.entries] == kernels


def test_is_default_weight_reads_the_owner_and_the_shape():
    from torchreg._select import is_default_weight

    assert is_default_weight("weight", nn.Linear(3, 1), nn.Linear(3, 1).weight)
    assert not is_default_weight("weight", Custom("weight", (1, 3)), nn.Parameter(torch.ones(1, 3)))
    assert not is_default_weight("bias", nn.Linear(3, 3), nn.Linear(3, 3).bias)
    assert not is_default_weight("weight", nn.LayerNorm([3, 3]), nn.Parameter(torch.ones(3, 3)))
