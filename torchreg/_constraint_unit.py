"""What a constraint call holds on a module: the constraint unit.

One :class:`ConstraintUnit` is made per call that applies constraints (``MaxNorm(layer, 3.0)``, an
``apply_regularization`` with constraint rules) and kept on the module it was applied to, under its own
attribute (kind ``"constraint"`` in ``_registry``), apart from the penalty unit: one parameter may carry
one penalty and one constraint, two constraints are refused. A second call on the same module adds its
(other) parameters to the unit there: ``NonNeg(MaxNorm(layer, 3.0), params="bias")`` is Keras'
``kernel_constraint=MaxNorm(3), bias_constraint=NonNeg()``. It registers no hook of its own: the
optimizer-step hooks of ``_after_step`` apply each entry's ``rule.project_`` after every step of an
optimizer that holds and updates the parameter. ``_tracking.ParamTracker`` follows parameters that
``load_state_dict(assign=True)`` replaces; parameters replaced otherwise (``to_empty``, ``fully_shard``)
are followed from the first optimizer step after install, before that step's projections.
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, List, Sequence

from torch import Tensor, nn

from . import _after_step, _registry
from ._engine import Entry, Skipped
from ._tracking import ParamTracker, TrackedUnit, is_lazy

__all__ = ["ATTR", "KIND", "NOTE", "ConstraintUnit", "Entry", "attach", "owner_of"]

#: The kind of unit this module makes, and the attribute it is kept under on the module applied to.
KIND = "constraint"
ATTR = _registry.register_kind(KIND, "_torchreg_constraints")

#: The summary note of a constrained module.
NOTE = "constraint, after each optimizer step"


def owner_of(p: Tensor) -> Any:
    """The constraint unit that covers ``p``, if any."""
    return _registry.owner_of(p, KIND)


class ConstraintUnit(TrackedUnit):
    """The constraints applied by one call, on the module ``root`` it was applied to."""

    KIND = KIND
    ATTR = ATTR

    #: No entry takes a backward hook (``_tracking.ParamTracker`` asks).
    hooked = 0

    def __init__(self, root: nn.Module, entries: Sequence[Entry], skipped: Sequence[Skipped] = ()) -> None:
        self.root = root
        self.entries: List[Entry] = list(entries)
        self.skipped: List[Skipped] = list(skipped)
        self.tracker = ParamTracker()
        self._init_transient()

    def _init_transient(self) -> None:
        self._fresh = True  # no optimizer step since install: check for replaced parameters first

    def __getstate__(self) -> Dict[str, Any]:  # (copy.deepcopy and pickle both use these two)
        return {k: self.__dict__[k] for k in ("root", "entries", "skipped", "tracker")}

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_transient()
        self._register()

    # -- install (TrackedUnit.install / uninstall) -------------------------------------------------
    def _register(self) -> None:
        super()._register()
        _after_step.track(self)

    def _unregister(self) -> None:
        _after_step.untrack(self)

    def extend(self, entries: Sequence[Entry], skipped: Sequence[Skipped] = ()) -> None:
        """Constrain more parameters of the same root (checked by :func:`check` already)."""
        self.entries.extend(entries)
        self.skipped.extend(skipped)
        _registry.claim(self, KIND, [e.param for e in entries])
        self._fresh = True  # the first-step checks again, for the new entries

    # -- what the tracker and the after-step hooks ask ----------------------------------------------
    @staticmethod
    def _takes_hook(entry: Entry) -> bool:
        return False

    def before_step(self) -> None:
        """Called by ``_after_step`` before it looks for this unit's parameters in a stepping optimizer.
        At the first step after install: follow parameters replaced by new objects since (``to_empty``,
        ``fully_shard``: nothing was missed, no step has run), and check the lazy ones now materialized."""
        if not self._fresh:
            return
        self._fresh = False
        self.tracker.opened(self)  # (the forward watcher's checks are done here for constraints)
        self.tracker.rebind(self, self.tracker.replaced(self))
        for entry in self.entries:
            if not is_lazy(entry.param):
                entry.rule._check_param(entry.name, entry.param)


def check(root: nn.Module, entries: Iterable[Entry]) -> List[Entry]:
    """Raise (before anything changes) if ``entries`` cannot be constrained on ``root``; return them."""
    entries = list(entries)
    inner = {id(e.param): u for u in _registry.units_in(root, KIND) for e in u.entries}
    for e in entries:
        other = owner_of(e.param) or inner.get(id(e.param))
        if other is not None:
            raise ValueError(
                f"parameter {e.name!r} is already constrained by torchreg ({_rules_text(other)}); a parameter "
                "can carry one constraint (and one penalty): remove that constraint first, or exclude the "
                "module with a None rule"
            )
        if not is_lazy(e.param) and not (e.param.is_floating_point() or e.param.is_complex()):
            raise TypeError(f"parameter {e.name!r} has dtype {e.param.dtype}; only floating and complex "
                            "parameters can be constrained")
        if not is_lazy(e.param):
            e.rule._check_param(e.name, e.param)
    return entries


def attach(root: nn.Module, entries: Iterable[Entry], skipped: Sequence[Skipped] = ()) -> nn.Module:
    """Make and install a constraint unit on ``root``, or add to the one there (other parameters of the
    same module: Keras' ``kernel_constraint`` and ``bias_constraint``); raise before changing anything
    if that would constrain a parameter twice or a parameter cannot take its constraint."""
    entries = check(root, entries)
    existing = root.__dict__.get(ATTR)
    if existing is None:
        ConstraintUnit(root, entries, skipped).install()
    else:
        existing.extend(entries, skipped)
    return root


def _rules_text(unit: ConstraintUnit) -> str:
    rules: List[str] = []
    for e in unit.entries:
        if repr(e.rule) not in rules:
            rules.append(repr(e.rule))
    return ", ".join(rules) or "no parameter"
