"""Optimizer parameter groups from torchreg's selection: :func:`param_groups`.

Decoupled weight decay (``AdamW``) is usually given to a model's weights but not to its biases and
normalization layers, with a hand-written loop over ``named_parameters()`` that has its own idea of
what a norm parameter is. :func:`param_groups` writes those groups from the selection torchreg's
regularizers use (``torchreg._select``), so "decay these, not those" is decided in one place and
agrees with what :func:`torchreg.summary` shows.
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

from torch import nn

from ._select import select
from ._validate import check_module, check_strength

__all__ = ["param_groups"]

Block = Tuple[Union[nn.Module, Iterable[nn.Parameter]], Mapping[str, Any]]


def _decayed_by_rules(model: nn.Module, rules: Mapping[Any, Any]) -> List[nn.Parameter]:
    """The parameters ``apply_regularization(model, rules)`` would regularize, in walk order.

    The walk of :func:`torchreg.apply_regularization` itself (first matching weight rule wins, ``None``
    excludes a module with its submodules, each matched module contributes the parameters its
    rule's selection picks among those it owns directly, a tied parameter counts once; activity rules
    select no parameter), without attaching anything.
    """
    from .walker import _compile_rules, _plan  # the walker's own rule parsing and walk

    return [entry.param for entry in _plan(model, _compile_rules(rules)).entries]


def _block_params(block: Any, index: int) -> Tuple[List[nn.Parameter], Dict[str, Any]]:
    label = f"blocks[{index}]"
    if not (isinstance(block, (tuple, list)) and len(block) == 2):
        raise TypeError(
            f"{label} must be a pair (module or iterable of parameters, dict of group options), "
            f"e.g. (model.encoder, {{'lr': 1e-4}}); got {block!r} ({type(block).__name__})"
        )
    what, options = block
    if not isinstance(options, Mapping) or not all(isinstance(k, str) for k in options):
        raise TypeError(f"{label}: the options must be a dict of optimizer options such as "
                        f"{{'lr': 1e-4}}, got {options!r} ({type(options).__name__})")
    if "params" in options:
        raise ValueError(f"{label}: the options must not contain 'params'; give the parameters as "
                         "the pair's first item")
    options = dict(options)
    if "weight_decay" in options:
        options["weight_decay"] = check_strength(options["weight_decay"], f"{label} weight_decay")
    if isinstance(what, nn.Module):
        params = list(what.parameters())
    elif isinstance(what, (nn.Parameter, str)) or not isinstance(what, Iterable):
        raise TypeError(f"{label}: the first item must be a module or an iterable of parameters, "
                        f"got {what!r} ({type(what).__name__})")
    else:
        params = list(what)
        bad = next((p for p in params if not isinstance(p, nn.Parameter)), None)
        if bad is not None or not params:
            raise TypeError(f"{label}: the first item must be a module or a non-empty iterable of "
                            f"parameters; it contains {type(bad).__name__ if params else 'nothing'}")
    return params, options


def param_groups(
    model: nn.Module,
    weight_decay: float,
    rules: Optional[Mapping[Any, Any]] = None,
    *,
    blocks: Sequence[Block] = (),
) -> List[Dict[str, Any]]:
    """``torch.optim`` parameter groups: decay on what torchreg would regularize, none elsewhere.

    The *decay* group holds the parameters torchreg's selection picks: with ``rules=None`` the
    default one (each layer's weights; no biases, nothing of a normalization layer, as
    ``torchreg.L2(model, ...)`` would regularize), with ``rules`` those that
    ``torchreg.apply_regularization(model, rules)`` would regularize (same mapping, same walk; the
    regularizers' strengths are ignored, only *which* parameters they select matters). Every other
    trainable parameter goes to the *no-decay* group (``weight_decay=0.0``). Each trainable
    parameter appears exactly once (a tied one too); frozen ones (``requires_grad=False``) are left
    out; empty groups are dropped. ``model`` is not changed.

    Different options per part of the model (a smaller ``lr`` for a pretrained backbone): give
    ``blocks``, a list of ``(module or parameters, options)`` pairs. Each block gets its own decay
    and no-decay groups carrying its options (``weight_decay`` in the options replaces the argument
    for that block's decay group); the parameters in no block come last, with no extra options, so
    the optimizer's defaults apply to them. Blocks must not share parameters.

    Args:
        model: the model whose trainable parameters are grouped.
        weight_decay: the decay group's ``weight_decay`` (a finite number >= 0).
        rules: ``None`` for the default selection, or an :func:`torchreg.apply_regularization`
            rules mapping.
        blocks: ``(module_or_parameters, options)`` pairs, as above.

    Returns:
        A list of dicts ``{"params": [...], "weight_decay": ..., **options}``: for each block in
        order, then for the rest, the decay group followed by the no-decay group.

    Raises:
        TypeError: ``model`` is not a module, ``rules`` not a valid rules mapping, a block not a
            ``(module or parameters, dict)`` pair.
        ValueError: ``weight_decay < 0`` (or not finite), a block holds a parameter that is not in
            ``model`` or that another block holds, a block's options contain ``params``.

    Example::

        >>> import torch, torchreg
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 1))
        >>> groups = torchreg.param_groups(model, weight_decay=0.05)
        >>> [(len(g["params"]), g["weight_decay"]) for g in groups]   # 2 weights; 2 biases + LayerNorm's 2
        [(2, 0.05), (4, 0.0)]
        >>> optimizer = torch.optim.AdamW(groups, lr=1e-3)
        >>> groups = torchreg.param_groups(model, 0.05, blocks=[(model[0], {"lr": 1e-4})])
        >>> [(len(g["params"]), g["weight_decay"], g.get("lr")) for g in groups]
        [(1, 0.05, 0.0001), (1, 0.0, 0.0001), (1, 0.05, None), (3, 0.0, None)]
    """
    check_module(model, "param_groups")
    weight_decay = check_strength(weight_decay, "weight_decay")
    if rules is None:
        decayed = [p for _, p in select(model, None, recurse=True)]
    elif isinstance(rules, Mapping):
        decayed = _decayed_by_rules(model, rules)
    else:
        raise TypeError("rules must be None (the default selection) or a rules mapping as for "
                        f"torchreg.apply_regularization, got {rules!r} ({type(rules).__name__})")
    if isinstance(blocks, (str, bytes)) or not isinstance(blocks, Sequence):
        raise TypeError(f"blocks must be a list of (module or parameters, options) pairs, got "
                        f"{blocks!r} ({type(blocks).__name__})")
    decayed_ids = {id(p) for p in decayed}
    names = {id(p): n for n, p in model.named_parameters(remove_duplicate=True)}
    trainable = [p for p in model.parameters() if p.requires_grad]  # (each shared parameter once)

    owner: Dict[int, int] = {}
    parsed = []
    for index, block in enumerate(blocks):
        params, options = _block_params(block, index)
        for p in params:
            if id(p) not in names:
                raise ValueError(f"blocks[{index}] holds a parameter of shape {tuple(p.shape)} that is "
                                 f"not in {type(model).__name__}")
            if owner.get(id(p), index) != index:
                raise ValueError(f"parameter {names[id(p)]!r} is in blocks[{owner[id(p)]}] and "
                                 f"blocks[{index}]; blocks must not share parameters")
            owner[id(p)] = index
        parsed.append(options)

    groups: List[Dict[str, Any]] = []
    for index, options in enumerate(parsed + [{}]):
        members = [p for p in trainable if owner.get(id(p), len(parsed)) == index]
        block_decay = options.pop("weight_decay", weight_decay)
        decay = [p for p in members if id(p) in decayed_ids]
        no_decay = [p for p in members if id(p) not in decayed_ids]
        if decay:
            groups.append({"params": decay, "weight_decay": block_decay, **options})
        if no_decay:
            groups.append({"params": no_decay, "weight_decay": 0.0, **options})
    return groups
