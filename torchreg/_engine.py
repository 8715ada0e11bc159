"""When the regularization gradient is added: the backward hooks of a penalty unit.

One :class:`Unit` is made per regularization call (``L1(layer, ...)``, ``apply_regularization``) and
kept on the module it was applied to. It adds each covered parameter's gradient term exactly once per
backward pass:

* A post-accumulate-grad hook on each covered parameter (``Tensor.register_post_accumulate_grad_hook``)
  fires once per backward, after every contribution to ``p.grad`` has been accumulated (a module
  called several times, a weight tied between layers: still once), whether or not the layer's input
  required grad and whatever in-place op follows it. It adds the term in place while the gradient is
  still in cache. It does not fire for ``torch.autograd.grad``, which therefore changes no ``.grad``.
  The hook is a closure that does the common case (a dense gradient, one process) with a function
  built once per backward from the rules' strengths and factors (``Regularizer._adder``); every
  other case goes through :meth:`Unit._add`. Per tensor this costs ~1 us more than a bare
  ``p.grad.add_(p, alpha=lam)`` hook (benchmarks/README.md).
* The unit's end-of-backward step (``_session``: queued by the first hook of a backward, after DDP's
  own callbacks) adds the term to the unit's parameters that this backward did not reach (a branch the
  forward skipped), so a unit is regularized as a whole, as ``loss + penalty`` would. Under a
  multi-rank process group every plain parameter's term is added there, after DDP averaged the
  gradients; a sharded parameter's (FSDP2) in its hook, which FSDP2 runs after averaging, on the local
  shard; one whose sharded hook did not run (no gradient sync on this backward) at the end
  (``_distributed``).
* torchreg's hook runs before the parameter's other post-accumulate-grad hooks (``_tracking``), so
  that an optimizer stepped in a hook (optimizer-in-backward) reads the gradient with the term.
* The hooks refer to their unit weakly (a tensor's hooks are invisible to Python's garbage collector);
  the unit lives as long as the module it was applied to, so a dropped model is freed.
* Each term is multiplied by ``1 / accumulation_steps`` and by the grad scaler's current scale (a
  device tensor, never read on the host), as declared with :func:`torchreg.configure`.
* A proximal rule takes no hook: ``_after_step`` applies its operator after the optimizer step.
* A rule with per-parameter state (``Regularizer.init_state``) gets it as ``state=``; the state is kept
  on the entry, moved to the parameter's device and dtype before use, copied with the model.

The collaborators, one concern each: ``_session`` (which backward, nesting, ``inputs=``, threads),
``_tracking`` (lazy, frozen, replaced and reparametrized parameters), ``_guards`` (the accumulation and
grad-scaler warnings), ``_distributed`` (process groups), ``_registry`` (what covers what). The
regularizers (``regularizers.py``) say *what* term is added; nothing here depends on which.
"""

from __future__ import annotations

import copy
import weakref
from typing import Any, Callable, Dict, Iterable, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from . import _after_step, _registry
from . import _torch_private as private
from ._distributed import DistributedSweep, deferred, distributed, elementwise_on_shards, is_sharded, local
from ._guards import AccumulationGuard, StepCounter
from ._ops import Adder
from ._session import Session, Sessions
from ._tracking import ParamTracker, TrackedUnit, is_lazy, state_kw

__all__ = ["ATTR", "KIND", "Entry", "Skipped", "Unit", "attach", "owner_of", "units_in"]

#: The kind of unit this module makes, and the attribute it is kept under on the module applied to.
KIND = "penalty"
ATTR = _registry.register_kind(KIND, "_torchreg_unit")

_STRIDED = torch.strided


class Entry(NamedTuple):
    """One covered parameter: its qualified name under the unit's root, the rule, why, and its state."""

    name: str
    param: nn.Parameter
    rule: Any  # a torchreg.Regularizer
    origin: str = ""  # which rule matched, for the summary
    state: Optional[Dict[str, Tensor]] = None  # the rule's per-parameter state (Regularizer.init_state)


class Skipped(NamedTuple):
    """A module a rule matched but that had nothing to regularize (for the summary)."""

    name: str
    module_type: str
    origin: str  # which rule matched
    reason: str


def owner_of(p: Tensor) -> Optional["Unit"]:
    """The penalty unit that covers ``p``, if any."""
    return _registry.owner_of(p, KIND)


def units_in(module: nn.Module) -> Iterator["Unit"]:
    """Every penalty unit applied to ``module`` or to one of its submodules, in ``modules()`` order."""
    return _registry.units_in(module, KIND)


def _make_hook(unit: "Unit", index: int) -> Callable[[Tensor], None]:
    """The post-accumulate-grad hook of ``unit.entries[index]``: the hot path, kept to a few lines.

    It refers to its unit weakly: a tensor's hooks are invisible to Python's garbage collector, so a
    strong reference (hook -> unit -> module -> parameter -> hook) would keep a dropped model alive.
    The unit lives as long as the module it was applied to (``module._torchreg_unit``).
    """
    ref = weakref.ref(unit)
    current_task = private.current_graph_task

    def hook(param: Tensor) -> None:
        unit = ref()
        if unit is None:  # the module it was applied to is gone
            return
        sessions = unit.sessions
        if sessions.task != current_task():
            sessions.begin(unit)
        sessions.seen.add(index)
        add = unit._adders[index]
        if add is not None:
            grad = param.grad
            if grad is not None and grad.layout is _STRIDED:
                add(grad, param)
                return
        unit._on_grad(index, param)

    return hook


class Unit(TrackedUnit):
    """The regularization applied by one call, on the module ``root`` it was applied to."""

    KIND = KIND
    ATTR = ATTR

    def __init__(self, root: nn.Module, entries: Sequence[Entry], skipped: Sequence[Skipped] = ()) -> None:
        self.root = root
        self.entries: List[Entry] = list(entries)
        self.skipped: List[Skipped] = list(skipped)
        self.accumulation_steps = 1
        self.grad_scaler: Any = None
        self.tracker = ParamTracker()
        self._init_transient()

    # -- state that is not copied or pickled ------------------------------------------------------
    def _init_transient(self) -> None:
        self.sessions = Sessions()
        self.guard = AccumulationGuard()
        self.hooked = sum(self._takes_hook(e) for e in self.entries)  # entries that take a backward hook
        self._alpha = 1.0
        self._scale: Optional[Tensor] = None
        self._scales: Dict[torch.device, Tensor] = {}
        self._deferred = False  # some entry's term waits for the end of backward (DDP)
        self._dist = False  # the backward in progress runs under a multi-rank process group
        self._nodefer = [False] * len(self.entries)
        self._defer = self._nodefer  # per entry (see _on_open)
        self._rules = list({id(e.rule): e.rule for e in self.entries}.values())
        self._none: List[Optional[Adder]] = [None] * len(self.entries)
        self._adders = self._none  # per entry, for the backward in progress; None: take Unit._add
        self._cached: Tuple[Any, List[Optional[Adder]]] = (None, self._none)  # (key, adders) without a scale

    def __getstate__(self) -> Dict[str, Any]:
        keep = ("root", "entries", "skipped", "accumulation_steps", "tracker")
        return {k: self.__dict__[k] for k in keep}

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.grad_scaler = None  # a pickled model is reconfigured with its new scaler
        self._init_transient()
        self.tracker.hook_ready(self)  # (the root may still be unpickling: its hooks are left to the first step)
        self._register()  # (the first-forward watchers, if still there, come back with the modules)

    def __deepcopy__(self, memo: Dict[int, Any]) -> "Unit":
        new = Unit.__new__(Unit)
        memo[id(self)] = new
        new.__setstate__(copy.deepcopy(self.__getstate__(), memo))
        new.grad_scaler = self.grad_scaler  # a copy trains with the same scaler
        return new

    # -- install (TrackedUnit.install / uninstall) -------------------------------------------------
    def _register(self) -> None:
        super()._register()
        DistributedSweep.live.add(self)
        StepCounter.watch(self)
        _after_step.track(self)

    def _unregister(self) -> None:
        DistributedSweep.live.discard(self)
        StepCounter.forget(self)
        _after_step.untrack(self)

    # -- what the tracker asks ----------------------------------------------------------------------
    @staticmethod
    def _takes_hook(entry: Entry) -> bool:
        return not entry.rule.proximal  # a proximal rule acts after the optimizer step (_after_step)

    def _make_hook(self, index: int) -> Callable[[Tensor], None]:
        return _make_hook(self, index)

    def _follow(self, index: int, param: nn.Parameter) -> None:
        super()._follow(index, param)
        self._cached = (None, self._none)  # the adders depend on the parameter's kind (sharded or not)

    def _check_replaced(self) -> None:
        self.tracker.check(self)

    # -- what the sessions ask ----------------------------------------------------------------------
    def _on_open(self) -> None:
        """A backward begins: this backward's factors and adders."""
        self._read_factors()
        self.tracker.opened(self)
        self._dist = distributed()
        self._defer = deferred(self.entries) if self._dist else self._nodefer
        self._deferred = any(self._defer)
        self._adders = self._build_adders()

    def _on_owned(self, task: int) -> None:
        if self._dist:
            DistributedSweep.begin(self, task)

    def _on_end(self, session: Session) -> None:
        """The outermost backward ended: add the terms the hooks did not (under a process group: all)."""
        try:
            listed = session.listed  # backward(inputs=...): the terms go to the listed parameters only
            seen = self.sessions.seen
            if self._deferred or len(seen) < self.hooked:
                self.tracker.register_ready(self)  # parameters unfrozen since the last backward
                defer = self._defer
                for i, entry in enumerate(self.entries):
                    p = entry.param
                    if ((defer[i] or i not in seen) and p.requires_grad and not is_lazy(p)
                            and (listed is None or listed(p))):
                        self._add(entry, p)
            self.guard.count(self)
        finally:
            self._scales = {}
            self._adders = self._none  # (drops the references to a grad scaler's scale)
            self._defer = self._nodefer

    # -- adding terms ---------------------------------------------------------------------------
    def _on_grad(self, index: int, param: Tensor) -> None:
        """The hook's uncommon cases: no or a sparse gradient, a scale on another device, a rule
        without an adder, a sharded parameter; under DDP, nothing until the end."""
        if not self._defer[index]:
            self._add(self.entries[index], param)

    def _build_adders(self) -> List[Optional[Adder]]:
        """Each entry's adder for this backward (None: the hook calls :meth:`_add`). Rebuilt only when
        a strength or a factor changed; with a grad scaler, every backward (parameters may have moved
        to another device than the scale's since the last one)."""
        if self._deferred and all(self._defer):
            return self._none
        scale = self._scale
        key = (self._alpha, [rule._strength_values() for rule in self._rules], self._defer)
        if scale is None and key == self._cached[0]:
            return self._cached[1]
        by_rule = {id(rule): rule._adder(self._alpha, scale) for rule in self._rules}
        # (a deferred entry, one with state, a sharded parameter: Unit._add)
        adders = [None if d or e.state is not None or is_sharded(e.param) else by_rule[id(e.rule)]
                  for d, e in zip(self._defer, self.entries)]
        if scale is None:
            self._cached = (key, adders)
        else:
            device = scale.device
            adders = [a if e.param.device == device else None for a, e in zip(adders, self.entries)]
        return adders

    def _read_factors(self) -> None:
        self._alpha = 1.0 / self.accumulation_steps
        scaler = self.grad_scaler
        self._scale = private.scaler_scale(scaler) if scaler is not None and scaler.is_enabled() else None
        self._scales = {}

    def _add_all(self) -> None:
        """Add the term of every trainable covered parameter (a unit reached on another rank only)."""
        self._read_factors()
        for entry in self.entries:
            if entry.param.requires_grad and not is_lazy(entry.param):
                self._add(entry, entry.param)
        self._scales = {}

    def _add(self, entry: Entry, p: Tensor) -> None:
        if entry.rule.proximal:  # nothing at backward: _after_step applies it after the step
            return
        g = p.grad
        if g is None or g.layout != torch.strided:
            if entry.rule.is_zero:  # strength 0 leaves the gradient exactly as it is, None or sparse
                return
            # No gradient yet (a skipped parameter), or a sparse one (nn.Embedding(sparse=True)): the
            # result is dense, as autograd's is when a dense penalty gradient is added to the loss.
            p.grad = g = torch.zeros_like(p) if g is None else g.to_dense()
        if is_sharded(p) and elementwise_on_shards(entry.rule, p):
            g, p = local(g), local(p)  # this rank's shard: the kernels work on plain tensors
        kw = state_kw(entry, p)  # (a rule's state for a sharded parameter is its shard: see _anchor)
        scale = self._scale
        if scale is not None and scale.device != g.device:
            scale = self._scales.get(g.device)
            if scale is None:
                scale = self._scales[g.device] = self._scale.to(g.device, non_blocking=True)
        entry.rule.grad_(g, p, self._alpha, scale, **kw)

    # -- reading ---------------------------------------------------------------------------------
    def entry_penalty(self, entry: Entry) -> Tensor:
        """The penalty of one entry (no graph)."""
        with torch.no_grad():
            return entry.rule.penalty(entry.param, **state_kw(entry, entry.param))

    def penalty(self, include: Callable[[Tensor], bool] = lambda p: True) -> Optional[Tensor]:
        """The current penalty (no graph) of the covered parameters ``include`` accepts, or None."""
        total = None
        for entry in self.entries:
            if not is_lazy(entry.param) and include(entry.param):
                value = self.entry_penalty(entry)
                total = value if total is None else total + value.to(total.device)
        return total


def attach(root: nn.Module, entries: Iterable[Entry], skipped: Sequence[Skipped] = ()) -> nn.Module:
    """Make and install a unit on ``root``; raise before changing anything if that would double up."""
    entries = list(entries)
    existing = root.__dict__.get(ATTR)
    if existing is not None:
        raise ValueError(
            f"{type(root).__name__} is already regularized by torchreg "
            f"({_rules_text(existing)}); call torchreg.remove_regularization(module) first"
            + "".join({_combine_hint(existing, e) for e in entries})
        )
    inner = {id(e.param): (u, e.name) for u in units_in(root) for e in u.entries}
    for e in entries:
        other = owner_of(e.param)
        if id(e.param) in inner or other is not None:
            unit = other or inner[id(e.param)][0]
            raise ValueError(
                f"parameter {e.name!r} is already regularized by torchreg ({_rules_text(unit)}); a parameter can "
                "be covered once: remove that regularization first, or exclude the module with a None rule"
                + _combine_hint(unit, e)
            )
        if not is_lazy(e.param) and not (e.param.is_floating_point() or e.param.is_complex()):
            raise TypeError(f"parameter {e.name!r} has dtype {e.param.dtype}; only floating and complex "
                            "parameters can be regularized")
        e.rule._check_param(e.name, e.param)  # e.g. GroupLasso's dim against the parameter's shape
    # the rules' per-parameter state (may raise: a missing anchor, a shape mismatch), before any change
    entries = [e._replace(state=e.rule.init_state(e.name, e.param)) for e in entries]
    Unit(root, entries, skipped).install()
    return root


def _combine_hint(unit: Unit, entry: Entry) -> str:
    """L1 then L2 (or L2 then L1) on one parameter: that is ElasticNet."""
    kinds = {type(e.rule).__name__ for e in unit.entries if e.param is entry.param} | {type(entry.rule).__name__}
    if kinds == {"L1", "L2"}:
        return ". For an L1 and an L2 penalty on the same parameters use one torchreg.ElasticNet(l1=..., l2=...)"
    return ""


def _rules_text(unit: Unit) -> str:
    rules = []
    for e in unit.entries:
        if repr(e.rule) not in rules:
            rules.append(repr(e.rule))
    return ", ".join(rules) or "no parameter"
