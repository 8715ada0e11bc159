"""Which parameters a regularizer covers.

The default follows Keras' ``kernel_regularizer`` and timm's weight-decay convention: a layer's
*weights* are regularized, its biases and every parameter of a normalization layer are not.

A weight is a parameter whose own name (the part after the last dot) is ``weight``, starts with
``weight_`` (``weight_ih_l0`` in LSTM/GRU) or ends with ``_weight`` (``in_proj_weight`` in
MultiheadAttention). A normalization layer is an instance of one of :data:`NORM_LAYERS`, or of a class
whose name ends in ``Norm`` (so user-defined ``RMSNorm`` classes are excluded too).

An explicit selection replaces the default entirely: a glob pattern or a list of them, matched
against the parameter names that ``module.named_parameters()`` gives (``"*bias"``, ``"weight"``), or a
predicate ``fn(name, parameter) -> bool``.
"""

from __future__ import annotations

import fnmatch
from typing import Callable, Iterator, Sequence, Tuple, Union

from torch import nn

__all__ = ["NORM_LAYERS", "Selection", "check_selection", "select", "describe_selection"]

NORM_LAYERS: Tuple[type, ...] = (
    nn.modules.batchnorm._NormBase,  # BatchNorm*d, InstanceNorm*d, SyncBatchNorm, lazy variants
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    nn.RMSNorm,
)

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
    return isinstance(module, NORM_LAYERS) or type(module).__name__.endswith("Norm")


def is_weight_name(name: str) -> bool:
    leaf = name.rsplit(".", 1)[-1]
    return leaf == "weight" or leaf.startswith("weight_") or leaf.endswith("_weight")


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
            keep = is_weight_name(name) and not is_norm_layer(owner)
        elif callable(params):
            keep = bool(params(name, p))
        else:
            keep = any(fnmatch.fnmatchcase(name, pattern) for pattern in params)
        if keep:
            chosen.append((name, p))
    return chosen


def describe_selection(params: Selection) -> str:
    if params is None:
        return "weights"
    if callable(params):
        return getattr(params, "__name__", repr(params))
    return ",".join(params)
