"""Which parameters a regularizer covers.

The default follows Keras' ``kernel_regularizer`` and the weight-decay convention of timm, Hugging Face
and the optimizers' no-decay groups: a layer's *kernels* are regularized; its biases, its scales and
shifts, and every parameter of a normalization layer are not. A parameter is a default weight when all
three hold:

1. its own name (the part after the last dot) is ``weight``, starts with ``weight_`` (``weight_ih_l0``
   in LSTM/GRU) or ends with ``_weight`` (``in_proj_weight`` in MultiheadAttention);
2. the module that owns it is not a normalization layer (:func:`is_norm_layer`);
3. it is a kernel, not a per-channel scale: the owner is one of torch's layers with kernels
   (:data:`KERNEL_LAYERS`: Linear, Bilinear, the convolutions, Embedding, EmbeddingBag, the recurrent
   layers and cells, MultiheadAttention), whose weights are kernels whatever their shape
   (``nn.Linear(64, 1)``'s ``(1, 64)`` too); or, for any other owner, the parameter has at least two
   dimensions of size > 1. A 1-D or 0-D parameter (``nn.PReLU``'s slopes, a norm's gain) and a
   broadcastable vector such as ``(1, C, 1, 1)`` or ``(1, 1, 1, C)`` (ConvNeXt-V2's global response
   norm) are scales. An uninitialized (lazy) parameter of another owner counts as a kernel: its shape
   is not known yet.

A normalization layer is an instance of one of :data:`NORM_LAYERS`, or of a class whose name, or the
name of one of its base classes, contains ``Norm`` as a word: ``Norm`` at the end or followed by a
capital letter, a digit, ``_`` or ``alis``/``aliz`` (``RMSNorm``, ``LlamaRMSNorm``, ``RmsNorm2d``,
``EvoNorm2dB0``, ``FilterResponseNormAct2d``, ``MambaRMSNormGated``, ``LayerNormalization``), or
ending in ``norm`` in any case (``RMSnorm``); not ``Normal``, ``Normed``, and not a reparametrization's
``WeightNorm``/``SpectralNorm`` inside a name (``WeightNormLinear``).

An explicit selection replaces the default entirely: a glob pattern or a list of them, matched
against the parameter names that ``module.named_parameters()`` gives (``"*bias"``, ``"weight"``), or a
predicate ``fn(name, parameter) -> bool``.
"""

from __future__ import annotations

import fnmatch
import re
from typing import Callable, Iterator, Sequence, Tuple, Union

from torch import nn
from torch.nn.parameter import UninitializedParameter

__all__ = [
    "EXCLUDED", "KERNEL_LAYERS", "NORM_LAYERS", "Selection", "check_selection", "default_weights",
    "describe_selection", "is_default_weight", "is_norm_layer", "select",
]

NORM_LAYERS: Tuple[type, ...] = (
    nn.modules.batchnorm._NormBase,  # BatchNorm*d, InstanceNorm*d, SyncBatchNorm, lazy variants
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    nn.CrossMapLRN2d,
    nn.RMSNorm,
)

#: torch's layers whose weights are kernels whatever their shape (subclasses included).
KERNEL_LAYERS: Tuple[type, ...] = (
    nn.Linear,  # LazyLinear, NonDynamicallyQuantizableLinear (MultiheadAttention's out_proj)
    nn.Bilinear,
    nn.modules.conv._ConvNd,  # Conv*d, ConvTranspose*d, lazy variants
    nn.Embedding,
    nn.EmbeddingBag,
    nn.RNNBase,  # RNN, LSTM, GRU
    nn.modules.rnn.RNNCellBase,  # RNNCell, LSTMCell, GRUCell
    nn.MultiheadAttention,
)

#: The summary note of a module a ``None`` rule excluded (with its submodules).
EXCLUDED = "excluded, with its submodules"

_NORM_NAME = re.compile(r"(?<!Weight)(?<!Spectral)Norm(?=$|[A-Z0-9_]|ali[sz])|(?i:norm)$")

Selection = Union[None, str, Sequence[str], Callable[[str, nn.Parameter], bool]]


def check_selection(params: Selection) -> Selection:
    """Validate a selection; return it in canonical form (a tuple of patterns, a callable or None)."""
    if params is None or callable(params):
        return params
    if isinstance(params, str):
        return (params,)
    if isinstance(params, (list, tuple)) and params and all(isinstance(p, str) for p in params):
        return tuple(params)
    raise TypeError(
        "params must be None (the default: weights, no biases, no normalization layers), a glob "
        "pattern, a non-empty list of patterns, or a predicate fn(name, parameter) -> bool; "
        f"got {params!r} ({type(params).__name__})"
    )


def is_norm_layer(module: nn.Module) -> bool:
    """True for torch's normalization layers and for classes named like one (see the module doc)."""
    if isinstance(module, NORM_LAYERS):
        return True
    return any(_NORM_NAME.search(c.__name__) for c in type(module).__mro__ if c not in (nn.Module, object))


def is_weight_name(name: str) -> bool:
    leaf = name.rsplit(".", 1)[-1]
    return leaf == "weight" or leaf.startswith("weight_") or leaf.endswith("_weight")


def is_kernel_shape(p: nn.Parameter) -> bool:
    """At least two dimensions of size > 1, or not materialized yet (a lazy parameter)."""
    return isinstance(p, UninitializedParameter) or sum(size > 1 for size in p.shape) >= 2


def is_default_weight(name: str, owner: nn.Module, p: nn.Parameter) -> bool:
    """Whether the default selection (``params=None``) takes parameter ``name`` of ``owner``."""
    if not is_weight_name(name):
        return False
    if isinstance(owner, KERNEL_LAYERS):  # first: a ``WeightNormLinear(nn.Linear)`` has a kernel
        return True
    return not is_norm_layer(owner) and is_kernel_shape(p)


def _owned(module: nn.Module, recurse: bool) -> Iterator[Tuple[str, nn.Module, nn.Parameter]]:
    """(name, owner, parameter) for each parameter, shared ones once, in registration order."""
    seen = set()
    modules = module.named_modules() if recurse else [("", module)]
    for prefix, owner in modules:
        for leaf, p in owner._parameters.items():
            if p is None or id(p) in seen:
                continue
            seen.add(id(p))
            yield (f"{prefix}.{leaf}" if prefix else leaf), owner, p


def select(
    module: nn.Module, params: Selection, recurse: bool
) -> list:
    """The (name, parameter) pairs of ``module`` that ``params`` selects.

    With ``recurse=False`` only the parameters ``module`` owns directly are considered.
    """
    chosen = []
    for name, owner, p in _owned(module, recurse):
        if params is None:
            keep = is_default_weight(name, owner, p)
        elif callable(params):
            keep = bool(params(name, p))
        else:
            keep = any(fnmatch.fnmatchcase(name, pattern) for pattern in params)
        if keep:
            chosen.append((name, p))
    return chosen


def default_weights(module: nn.Module) -> Iterator[Tuple[str, nn.Module, nn.Parameter]]:
    """(qualified name, owner, parameter) of each parameter of ``module`` the default selection takes."""
    for name, owner, p in _owned(module, recurse=True):
        if is_default_weight(name, owner, p):
            yield name, owner, p


def describe_selection(params: Selection) -> str:
    if params is None:
        return "weights"
    if callable(params):
        return getattr(params, "__name__", repr(params))
    return ",".join(params)
