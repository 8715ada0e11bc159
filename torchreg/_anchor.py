"""Penalties toward an anchor: where the anchor (``center=``) and the importance come from, and the
centered maths the regularizers use.

With a center ``c`` (and for L2 an importance ``F >= 0``), the penalties are ``lam * sum|w - c|``
(L1) and ``lam / 2 * sum F * (w - c) ** 2`` (L2; ``F = 1`` without an importance), their gradients
``lam * sgn(w - c)`` and ``lam * F * (w - c)``, and the proximal operator of a separable penalty
``h`` centered at ``c`` is the shifted one, ``prox_{h(. - c)}(w) = c + prox_h(w - c)``: the
coordinates the operator sets to zero land on their center *exactly* (``0 + c``).

Where they come from: ``center="init"`` snapshots each selected parameter when the rule is applied;
a mapping (a ``state_dict()``) or an ``nn.Module`` (its ``named_parameters()``) gives a tensor per
parameter name, names as ``named_parameters()`` of the module the rule is applied to. Either way the
regularizer keeps one copy per covered parameter, on the parameter's device and dtype, as that
parameter's state (``Regularizer.init_state``); the user's mapping or module is not kept.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable, Dict, Optional

import torch
from torch import Tensor, nn

from ._ops import add_scaled_, sum_of_squares
from ._validate import describe

__all__ = [
    "INIT", "add_l1_", "add_l2_", "at_center", "check_center", "check_importance", "describe_reference", "l1_penalty",
    "l2_penalty", "lookup", "shifted_",
]

#: ``center="init"``: the value of each parameter when the rule is applied.
INIT = "init"

_ALLOWED = "None, 'init', a mapping from parameter names to tensors (a state_dict()) or an nn.Module"


# -- arguments -----------------------------------------------------------------------------------
def check_center(value: Any, owner: str) -> Any:
    """``value`` if it is an allowed ``center=``; ``TypeError`` / ``ValueError`` naming it otherwise."""
    if value is None or isinstance(value, (Mapping, nn.Module)):
        return value
    if isinstance(value, str):
        if value == INIT:
            return value
        raise ValueError(f"{owner} center must be {_ALLOWED}; got the string {value!r}")
    hint = (
        "; a single tensor has no parameter name: give {name: tensor}, e.g. the pretrained model's state_dict()"
        if isinstance(value, Tensor) else ""
    )
    raise TypeError(f"{owner} center must be {_ALLOWED}; got {describe(value)}{hint}")


def check_importance(value: Any, center: Any, owner: str) -> Any:
    """``value`` if it is an allowed ``importance=`` given ``center``; raises otherwise."""
    if value is None:
        return value
    if not isinstance(value, Mapping):
        raise TypeError(
            f"{owner} importance must be None or a mapping from parameter names to tensors >= 0 (e.g. "
            f"torchreg.fisher_diagonal(...)); got {describe(value)}"
        )
    if center is None:
        raise ValueError(
            f"{owner} importance= needs a center=: the importance weighs the distance to an anchor (EWC: "
            "center= the previous task's weights, importance= their Fisher information)"
        )
    return value


def describe_reference(value: Any) -> str:
    """A short text for a mapping or module in a repr (their own reprs can be a whole model)."""
    if isinstance(value, nn.Module):
        return f"<{type(value).__name__}>"
    if isinstance(value, Mapping):
        return f"<{type(value).__name__} of {len(value)}>"
    return repr(value)


# -- one tensor per parameter --------------------------------------------------------------------
def lookup(source: Any, name: str, param: Tensor, what: str, owner: str,
           table: Optional[Dict[str, Tensor]] = None) -> Tensor:
    """``source``'s tensor for the parameter ``name`` as a fresh copy with ``param``'s local shape,
    layout, dtype and device (``source`` a mapping, or a module: ``table`` is then its
    ``dict(named_parameters())``, built once by the caller). ``center="init"`` snapshots ``param``.

    Raises ``ValueError`` for a missing name, another shape, a non-finite value, or a negative
    importance; ``TypeError`` for a value that is no tensor, or a complex one for a real parameter.
    """
    if isinstance(source, str) and source == INIT:
        with torch.no_grad():
            return _local(param).detach().clone(memory_format=torch.preserve_format)
    if table is None:
        table = source if isinstance(source, Mapping) else dict(source.named_parameters())
    if name not in table:
        known = list(table)
        shown = ", ".join(map(repr, known[:8])) + (", ..." if len(known) > 8 else "")
        raise ValueError(
            f"{owner}: {what} has no tensor for the parameter {name!r} (names are those of named_parameters() of "
            f"the module the rule is applied to); {what} has {len(known)} name(s): {shown}. Give a {what} with "
            "the same parameter names, or exclude this parameter (params=..., or a None rule)"
        )
    value = table[name]
    if not isinstance(value, Tensor):
        raise TypeError(f"{owner}: {what}[{name!r}] must be a tensor, got {describe(value)}")
    if tuple(value.shape) != tuple(param.shape):
        raise ValueError(
            f"{owner}: {what}[{name!r}] has shape {tuple(value.shape)}, but the parameter {name!r} has shape "
            f"{tuple(param.shape)}"
        )
    if value.is_complex() and not param.is_complex():
        raise TypeError(f"{owner}: {what}[{name!r}] is complex ({value.dtype}), the parameter {name!r} is real "
                        f"({param.dtype})")
    if value.is_meta:
        raise ValueError(f"{owner}: {what}[{name!r}] is on the meta device and holds no values")
    with torch.no_grad():
        value = _local_part(value.detach(), param)
        if value.is_floating_point() or value.is_complex():
            finite = bool(torch.isfinite(value).all())
            if not finite:
                raise ValueError(f"{owner}: {what}[{name!r}] holds NaN or infinite values")
        if what == "importance" and bool((value < 0).any()):
            raise ValueError(f"{owner}: importance[{name!r}] holds negative values; an importance is >= 0 "
                             "(e.g. torchreg.fisher_diagonal)")
        local = _local(param)
        copy = torch.empty_like(local, memory_format=torch.preserve_format)
        copy.copy_(value)
    return copy


def _is_dtensor(t: Any) -> bool:
    return hasattr(t, "placements") and hasattr(t, "to_local")


def _local(t: Tensor) -> Tensor:
    """The local shard of a DTensor (FSDP2's parameters), or ``t``."""
    return t.to_local() if _is_dtensor(t) else t


def _local_part(value: Tensor, param: Tensor) -> Tensor:
    """The part of ``value`` (the whole, unsharded tensor) that ``param``'s local shard holds."""
    if not _is_dtensor(param):
        return value.full_tensor() if _is_dtensor(value) else value
    if _is_dtensor(value):
        if value.device_mesh == param.device_mesh and tuple(value.placements) == tuple(param.placements):
            return value.to_local()
        value = value.full_tensor()
    from torch.distributed.tensor import distribute_tensor

    try:  # each rank takes its part of its own copy: no communication
        whole = distribute_tensor(value, param.device_mesh, param.placements, src_data_rank=None)
    except TypeError:  # older torch: rank 0's copy is scattered (every rank applies the rule: a collective)
        whole = distribute_tensor(value, param.device_mesh, param.placements)
    return whole.to_local()


# -- the centered maths --------------------------------------------------------------------------
def _like(t: Tensor, param: Tensor) -> Tensor:
    """``t`` (a parameter's state: its local shard under FSDP2) as a tensor that combines with ``param``:
    itself, or for a DTensor ``param`` the DTensor of which ``t`` is this rank's shard (no communication)."""
    if not _is_dtensor(param) or _is_dtensor(t):
        return t
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(t, param.device_mesh, param.placements, run_check=False, shape=param.shape,
                              stride=param.stride())


def _offset(param: Tensor, center: Optional[Tensor]) -> Tensor:
    return param if center is None else param - _like(center, param)


def at_center(param: Tensor, center: Tensor) -> int:
    """How many elements of ``param`` equal their center exactly."""
    return int((param == _like(center, param)).sum())


def l1_penalty(param: Tensor, center: Optional[Tensor]) -> Tensor:
    """``sum |w - c|`` (``sum |w|`` without a center), with autograd graph."""
    return _offset(param, center).abs().sum()


def l2_penalty(param: Tensor, center: Optional[Tensor], importance: Optional[Tensor] = None) -> Tensor:
    """``sum F * |w - c| ** 2`` (``F = 1`` without an importance), with autograd graph; no 1/2."""
    d = _offset(param, center)
    if importance is None:
        return sum_of_squares(d)
    return (_like(importance, param) * (d.abs() if d.is_complex() else d).pow(2)).sum()


def add_l1_(grad: Tensor, param: Tensor, center: Optional[Tensor], coef: float, scale: Optional[Tensor]) -> None:
    """``grad += coef * scale * sgn(w - c)`` in place."""
    if coef:
        add_scaled_(grad, torch.sgn(_offset(param, center)), coef, scale)


def add_l2_(grad: Tensor, param: Tensor, center: Optional[Tensor], importance: Optional[Tensor], coef: float,
            scale: Optional[Tensor]) -> None:
    """``grad += coef * scale * F * (w - c)`` in place (one temporary: ``w - c``)."""
    if not coef:
        return
    d = _offset(param, center)
    if importance is not None:
        importance = _like(importance, param)
        d = d * importance if d is param else d.mul_(importance)
    add_scaled_(grad, d, coef, scale)


def shifted_(param: Tensor, center: Optional[Tensor], operator: Callable[[Tensor], None]) -> None:
    """``param <- c + operator(param - c)`` in place (``operator`` acts in place): the proximal operator
    of a penalty centered at ``c`` from the one centered at 0. A coordinate the operator sets to zero
    becomes exactly ``c``."""
    if center is None:
        operator(param)
        return
    param.sub_(center)
    operator(param)
    param.add_(center)


# -- the regularizers' side ----------------------------------------------------------------------
class Given:
    """A mapping or module given as ``center=`` / ``importance=``, held by the rule until it is applied.
    Its repr is short (the repr of a state_dict or model is pages long)."""

    def __init__(self, value: Any) -> None:
        self.value = value

    def __repr__(self) -> str:
        return describe_reference(self.value)


class Released:
    """What a rule's ``center`` / ``importance`` becomes once the rule is applied: the tensors now live
    as the covered parameters' state, and the user's mapping or module is no longer referenced."""

    def __init__(self, description: str) -> None:
        self.description = description

    def __repr__(self) -> str:
        return f"<{self.description.strip('<>')}, copied when applied>"

    def __eq__(self, other: Any) -> bool:
        return isinstance(other, Released) and other.description == self.description

    def __hash__(self) -> int:
        return hash(self.description)


class Anchored:
    """``center=`` (and with ``_has_importance``, ``importance=``) for a separable penalty.

    The rule holds what it was given until it is applied; :meth:`init_state` then copies, for every
    covered parameter, its anchor (and importance) as that parameter's state, and the rule lets go of
    the mapping or module (:class:`Released`): one copy per parameter is all that is kept.
    """

    _has_importance = False

    def _init_anchor(self, center: Any, importance: Any = None) -> None:
        owner = type(self).__name__
        center = center.value if isinstance(center, Given) else center
        importance = importance.value if isinstance(importance, Given) else importance
        if not isinstance(center, Released):  # (a copy of an applied rule, by deepcopy or pickle)
            center = check_center(center, owner)
        if not isinstance(importance, Released):
            importance = check_importance(importance, center, owner)
        self.__dict__["center"] = Given(center) if isinstance(center, (Mapping, nn.Module)) else center
        self.__dict__["importance"] = Given(importance) if importance is not None and not isinstance(
            importance, Released) else importance

    @property
    def center(self) -> Any:
        """``None`` (toward 0), ``"init"``, or the mapping or module given, until the rule is applied
        (then the anchors are the covered parameters' state, and this is a placeholder)."""
        value = self.__dict__["center"]
        return value.value if isinstance(value, Given) else value

    @property
    def importance(self) -> Any:
        """``None`` or the mapping given, until the rule is applied (as :attr:`center`)."""
        value = self.__dict__["importance"]
        return value.value if isinstance(value, Given) else value

    def _with_anchor(self, kwargs: Dict[str, Any]) -> Dict[str, Any]:
        """``kwargs`` (the constructor's, without the anchor) with ``center`` and ``importance`` after the
        strengths; a mapping or module as :class:`Given` (a short repr)."""
        strengths = {k: v for k, v in kwargs.items() if k in self._strengths}  # type: ignore[attr-defined]
        anchor = {k: self.__dict__[k] for k in ("center", "importance") if self.__dict__[k] is not None}
        return {**strengths, **anchor, **{k: v for k, v in kwargs.items() if k not in strengths}}

    def _applied_to(self, params: Any) -> None:
        super()._applied_to(params)  # type: ignore[misc]
        self._release()

    def init_state(self, name: str, param: Tensor) -> Optional[Dict[str, Tensor]]:
        """``{"center": c}`` (and ``"importance": F``) for the parameter ``name``: fresh copies with the
        parameter's shape, dtype and device; ``None`` without a center. Raises before anything changes."""
        center, importance = self.center, self.importance
        if center is None:
            return None
        owner = repr(self)
        if isinstance(center, Released) or isinstance(importance, Released):
            raise ValueError(
                f"{owner} was applied already: it copied its anchors into the parameters it regularizes and keeps "
                "no reference to the mapping or module it was given. Build the rule again with center=... "
                "(and importance=...) to apply it to other parameters"
            )
        if isinstance(param, nn.parameter.UninitializedParameter):
            raise ValueError(
                f"{owner}: the parameter {name!r} is not initialized yet (a lazy module), so it has no anchor; run "
                "a forward pass (or initialize the lazy module) before applying a rule with center="
            )
        if param.is_meta:
            raise ValueError(
                f"{owner}: the parameter {name!r} is on the meta device and holds no values, so it cannot take an "
                "anchor; materialize the model first (to_empty() and its initialization, or load_state_dict), "
                "then apply a rule with center="
            )
        if importance is not None and param.is_complex():
            raise TypeError(f"{owner}: importance= supports real parameters; {name!r} is {param.dtype}")
        tables = self.__dict__.setdefault("_tables", {})
        state = {"center": lookup(center, name, param, "center", owner, _table(center, tables))}
        if importance is not None:
            state["importance"] = lookup(importance, name, param, "importance", owner, _table(importance, tables))
        return state

    def _release(self) -> None:
        """Forget the mapping or module given (after the rule is applied)."""
        self.__dict__.pop("_tables", None)
        for key in ("center", "importance"):
            value = self.__dict__[key]
            if isinstance(value, Given):
                self.__dict__[key] = Released(describe_reference(value.value))


def _table(source: Any, tables: Dict[int, Any]) -> Any:
    """``source`` itself (a mapping) or its ``dict(named_parameters())`` (a module), built once per
    application; ``None`` for ``"init"``."""
    if not isinstance(source, nn.Module):
        return None if isinstance(source, str) else source
    key = id(source)
    if key not in tables:
        tables[key] = dict(source.named_parameters())
    return tables[key]
