"""What torchreg holds on a module or a parameter: the one place every caller asks.

A *unit* is what one call applied (``L1(layer, ...)``, one ``apply_regularization``): a penalty unit
(``_engine.Unit``, gradient terms and proximal operators), an activity unit
(``_activity_engine.ActivityUnit``), or a unit of another kind registered with :func:`register_kind`.
Each kind keeps its unit on the module it was applied to, under its own attribute, so that one
module can carry one unit of each kind (a penalty and an activity regularizer, applied in either
order). Every unit has ``root`` (that module), ``entries`` and ``uninstall()``.

Which unit covers a parameter (or a module's output) is kept here, weakly: :func:`claim` when a unit
is installed or follows a replaced parameter, :func:`release` when it is removed. Nothing here keeps
a model alive.

The classes of rules (``torchreg.L1``, ``torchreg.MaxNorm``, ...) register themselves by name
(:func:`register_rule`), so that the config format and the messages that list them need no
hand-kept list.
"""

from __future__ import annotations

import weakref
from typing import Any, Dict, Iterable, Iterator, List, Optional

from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

__all__ = [
    "KINDS", "RULES", "claim", "covering", "enclosing_unit", "is_regularized", "owner_of", "register_kind",
    "register_rule", "release", "rule_names", "units_in",
]

#: kind -> the module attribute its units are kept under, in the order units are listed.
KINDS: Dict[str, str] = {}

#: The public rule classes by name (``"L1"``, ``"MaxNorm"``), in registration order.
RULES: Dict[str, type] = {}

#: parameter or module -> {kind: weakref to the unit covering it}
_covered: "WeakIdKeyDictionary" = WeakIdKeyDictionary()


def register_kind(kind: str, attribute: str) -> str:
    """Declare a kind of unit and the module attribute it is kept under; returns ``attribute``."""
    KINDS[kind] = attribute
    return attribute


def register_rule(cls: type) -> type:
    """Record a public rule class under its name (called by the classes themselves)."""
    if not cls.__name__.startswith("_") and cls.__module__.startswith("torchreg"):
        RULES[cls.__name__] = cls
    return cls


def rule_names(base: Optional[type] = None) -> List[str]:
    """The names of the registered rule classes (those deriving from ``base``), sorted."""
    return sorted(name for name, cls in RULES.items() if base is None or issubclass(cls, base))


# -- units on modules -------------------------------------------------------------------------------
def applied_to(module: nn.Module) -> Iterator[Any]:
    """The units applied to ``module`` itself, one per kind at most."""
    for attribute in KINDS.values():
        unit = module.__dict__.get(attribute)
        if unit is not None:
            yield unit


def units_in(module: nn.Module, kind: Optional[str] = None) -> Iterator[Any]:
    """Every unit applied to ``module`` or to one of its submodules (of ``kind`` only, if given), in
    ``modules()`` order."""
    attributes = list(KINDS.values()) if kind is None else [KINDS[kind]]
    for m in module.modules():
        for attribute in attributes:
            unit = m.__dict__.get(attribute)
            if unit is not None:
                yield unit


# -- what covers a parameter (or a module's output) ------------------------------------------------
def claim(unit: Any, kind: str, objects: Iterable[Any]) -> None:
    """Record that ``unit`` (of ``kind``) covers each of ``objects`` (parameters, or modules for activity)."""
    ref = weakref.ref(unit)
    for obj in objects:
        _covered.setdefault(obj, {})[kind] = ref


def release(unit: Any, kind: str, objects: Iterable[Any]) -> None:
    """Forget what :func:`claim` recorded for ``unit`` on ``objects``."""
    for obj in objects:
        kinds = _covered.get(obj)
        if kinds is not None and kinds.get(kind) is not None and kinds[kind]() in (unit, None):
            del kinds[kind]
            if not kinds:
                del _covered[obj]


def owner_of(obj: Any, kind: str = "penalty") -> Optional[Any]:
    """The unit of ``kind`` that covers the parameter (or, for ``"activity"``, the module) ``obj``."""
    kinds = _covered.get(obj)
    ref = kinds.get(kind) if kinds else None
    return ref() if ref is not None else None


def covering(obj: Any) -> List[Any]:
    """Every unit that covers ``obj``, of any kind."""
    kinds = _covered.get(obj) or {}
    return [unit for unit in (ref() for ref in kinds.values()) if unit is not None]


def enclosing_unit(module: nn.Module) -> Optional[Any]:
    """A unit applied to a module enclosing ``module`` that covers one of its parameters or outputs
    (``module`` is part of a model regularized as a whole), or None."""
    inside = {id(u) for u in units_in(module)}
    for obj in list(module.parameters()) + list(module.modules()):
        for unit in covering(obj):
            if id(unit) not in inside:
                return unit
    return None


def is_regularized(module: nn.Module) -> bool:
    """Whether torchreg holds anything on ``module``: a regularization, activity regularization or
    constraint applied to it or to one of its submodules, or applied to an enclosing module and covering
    one of its parameters or outputs. (As ``torch.nn.utils.parametrize.is_parametrized``.)

    Raises:
        TypeError: ``module`` is not an ``nn.Module`` instance.

    Example::

        >>> import torch, torchreg
        >>> model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU())
        >>> torchreg.is_regularized(model)
        False
        >>> _ = torchreg.L2(model, lam=1e-4)
        >>> torchreg.is_regularized(model), torchreg.is_regularized(model[0]), torchreg.is_regularized(model[1])
        (True, True, False)
    """
    from ._validate import check_module

    check_module(module, "is_regularized")
    return any(True for _ in units_in(module)) or enclosing_unit(module) is not None
