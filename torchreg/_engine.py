"""When the regularization gradient is added: hooks, per-backward bookkeeping, scaling factors.

One :class:`Unit` is made per regularization call (``L1(layer, ...)``, ``apply_regularization``).
It adds each covered parameter's gradient term exactly once per backward pass:

* A post-accumulate-grad hook on each covered parameter (``Tensor.register_post_accumulate_grad_hook``)
  fires once per backward, after every contribution to ``p.grad`` has been accumulated (a module
  called several times, a weight tied between layers: still once), whether or not the layer's input
  required grad and whatever in-place op follows it. It adds the term in place while the gradient is
  still in cache. It does not fire for ``torch.autograd.grad``, which therefore changes no ``.grad``.
  The hook is a closure that does the common case (a dense gradient, one process) with a function
  built once per backward from the rules' strengths and factors (``Regularizer._adder``); every
  other case goes through :meth:`Unit._add`. Per tensor this costs ~1 us more than a bare
  ``p.grad.add_(p, alpha=lam)`` hook (benchmarks/README.md).
* The first hook of a unit in a backward queues an end-of-backward callback; that callback queues a
  second one, which runs after every callback queued during the backward (DistributedDataParallel's
  reducer finalization among them). It adds the term to the unit's parameters that this backward did
  not reach (a branch the forward skipped), so a unit is regularized as a whole, as
  ``loss + penalty`` would. Under an initialized process group with more than one rank, every term is
  added there, after the gradients are averaged: the same on every rank, whichever parameters each
  rank used.
* A ``load_state_dict`` post-hook on the unit's root follows parameters that loading replaced by new
  objects (``assign=True``): the hooks move to the new ones. Parameters replaced otherwise
  (``to_empty`` from the meta device, FSDP2's ``fully_shard``) are found at the first optimizer step
  after install (a global step post-hook), with a warning, and followed from then on.
* Each term is multiplied by ``1 / accumulation_steps`` and by the grad scaler's current scale (a
  device tensor, never read on the host), as declared with :func:`torchreg.configure`.

The regularizers (``regularizers.py``) say *what* term is added; nothing here depends on which.
"""

from __future__ import annotations

import copy
import sys
import threading
import warnings
import weakref
from typing import Any, Callable, Dict, Iterable, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.nn.parameter import UninitializedParameter
from torch.optim.optimizer import register_optimizer_step_post_hook

from . import _prox
from ._ops import Adder

__all__ = ["ATTR", "Entry", "Skipped", "Unit", "attach", "units_in", "owner_of"]

#: The one attribute torchreg sets on a user's module: the :class:`Unit` applied to it.
ATTR = "_torchreg_unit"

_current_task = torch._C._current_graph_task_id
_queue_callback = torch.autograd.Variable._execution_engine.queue_callback
_STRIDED = torch.strided


class Entry(NamedTuple):
    """One covered parameter: its qualified name under the unit's root, the rule, and why."""

    name: str
    param: nn.Parameter
    rule: Any  # a torchreg.Regularizer
    origin: str = ""  # which rule matched, for the summary


class Skipped(NamedTuple):
    """A module a rule matched but that had nothing to regularize (for the summary)."""

    name: str
    module_type: str
    origin: str  # which rule matched
    reason: str


# -- optimizer steps, for the accumulation guard -------------------------------------------------
class StepCounter:
    """Counts optimizer steps (the accumulation guard), and at the first step after a unit is installed
    checks that its parameters are still the model's (see :meth:`Unit._check_replaced`)."""

    count = 0
    registered = False
    unchecked: "weakref.WeakSet[Unit]" = weakref.WeakSet()

    @classmethod
    def ensure(cls) -> None:
        if not cls.registered:
            register_optimizer_step_post_hook(cls._on_step)
            cls.registered = True

    @classmethod
    def _on_step(cls, optimizer: Any, args: Any, kwargs: Any) -> None:
        cls.count += 1
        if cls.unchecked:
            units, cls.unchecked = list(cls.unchecked), weakref.WeakSet()
            for unit in units:
                unit._check_replaced()


def _distributed() -> bool:
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _compiled_autograd() -> bool:
    ca = sys.modules.get("torch._dynamo.compiled_autograd")
    return ca is not None and bool(ca.in_compiled_autograd_region)


def _is_lazy(p: Tensor) -> bool:
    return isinstance(p, UninitializedParameter)


def owner_of(p: Tensor) -> Optional["Unit"]:
    """The unit whose hook is registered on ``p``, if any."""
    for hook in (getattr(p, "_post_accumulate_grad_hooks", None) or {}).values():
        unit = getattr(hook, ATTR, None)
        if isinstance(unit, Unit):
            return unit
    return _prox.owner_of(p)  # [i12] a proximal entry carries no hook


def _make_hook(unit: "Unit", index: int) -> Callable[[Tensor], None]:
    """The post-accumulate-grad hook of ``unit.entries[index]``: the hot path, kept to a few lines."""

    def hook(param: Tensor) -> None:
        if unit._task != _current_task():
            unit._begin()
        unit._seen.add(index)
        add = unit._adders[index]
        if add is not None:
            grad = param.grad
            if grad is not None and grad.layout is _STRIDED:
                add(grad, param)
                return
        unit._on_grad(index, param)

    setattr(hook, ATTR, unit)  # for owner_of
    return hook


def units_in(module: nn.Module) -> Iterator["Unit"]:
    """Every unit applied to ``module`` or to one of its submodules, in ``modules()`` order."""
    for m in module.modules():
        unit = m.__dict__.get(ATTR)
        if unit is not None:
            yield unit


class _DistributedSweep:
    """Under a multi-rank process group: units that this rank's backward did not reach but that DDP
    gave a gradient (their parameters were used on another rank) get their terms too, after the
    averaging, so that every rank adds the same terms. Such a unit is recognized by a parameter whose
    ``.grad`` was None when the backward began and is set when it ends (``zero_grad(set_to_none=True)``,
    the default, makes this visible; with ``set_to_none=False`` it cannot be told apart)."""

    live: "weakref.WeakSet[Unit]" = weakref.WeakSet()
    task = -1
    active: set = set()
    had_no_grad: Dict[int, Tuple["Unit", List[bool]]] = {}

    @classmethod
    def begin(cls, unit: "Unit", task: int) -> None:
        if cls.task != task:
            cls.task, cls.active = task, set()
            cls.had_no_grad = {id(u): (u, [e.param.grad is None for e in u.entries]) for u in list(cls.live)}
            _queue_callback(cls._end_of_backward)
        cls.active.add(id(unit))

    @classmethod
    def _end_of_backward(cls) -> None:
        _queue_callback(cls._finish)

    @classmethod
    def _finish(cls) -> None:
        try:
            for key, (unit, none_before) in cls.had_no_grad.items():
                if key not in cls.active and any(
                    was_none and e.param.grad is not None for was_none, e in zip(none_before, unit.entries)
                ):
                    unit._add_all()
        finally:
            cls.task, cls.active, cls.had_no_grad = -1, set(), {}


class _LazyWatch:
    """Forward hook on a unit's root while some covered parameter is still uninitialized."""

    def __init__(self, unit: "Unit") -> None:
        self.unit = unit

    def __call__(self, module: nn.Module, args: Any, output: Any) -> None:
        self.unit._register_ready()


class _Rebind:
    """``load_state_dict`` post-hook on a unit's root: ``load_state_dict(..., assign=True)`` puts new
    parameter objects in the modules, and the unit follows them (its hooks were on the old ones)."""

    def __init__(self, unit: "Unit") -> None:
        self.unit = unit

    def __call__(self, module: nn.Module, incompatible_keys: Any) -> None:
        self.unit._rebind(self.unit._replaced())


class Unit:
    """The regularization applied by one call, on the module ``root`` it was applied to."""

    def __init__(self, root: nn.Module, entries: Sequence[Entry], skipped: Sequence[Skipped] = ()) -> None:
        self.root = root
        self.entries: List[Entry] = list(entries)
        self.skipped: List[Skipped] = list(skipped)
        self.accumulation_steps = 1
        self.grad_scaler: Any = None
        self._lazy_handle: Any = None
        self._load_handle: Any = None
        self._init_transient()

    # -- state that is not copied or pickled ------------------------------------------------------
    def _init_transient(self) -> None:
        self._handles: Dict[int, Any] = {}
        self._lock = threading.Lock()
        self._task = -1  # graph task of the backward in progress
        self._seen: set = set()
        self._alpha = 1.0
        self._scale: Optional[Tensor] = None
        self._scales: Dict[torch.device, Tensor] = {}
        self._deferred = False
        self._rules = list({id(e.rule): e.rule for e in self.entries}.values())
        self._none: List[Optional[Adder]] = [None] * len(self.entries)
        self._adders = self._none  # per entry, for the backward in progress; None: take Unit._add
        self._cached: Tuple[Any, List[Optional[Adder]]] = (None, self._none)  # (key, adders) without a scale
        self._last_step = -1
        self._probe: Optional[Tuple[int, Any]] = None
        self._backwards = 0
        self._warned = False

    def __getstate__(self) -> Dict[str, Any]:
        keep = ("root", "entries", "skipped", "accumulation_steps", "_lazy_handle", "_load_handle")
        return {k: self.__dict__[k] for k in keep}

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.grad_scaler = None  # a pickled model is reconfigured with its new scaler
        self._init_transient()
        self._register_ready()
        _DistributedSweep.live.add(self)
        _prox.track(self)  # [i12 proximal]

    def __deepcopy__(self, memo: Dict[int, Any]) -> "Unit":
        new = Unit.__new__(Unit)
        memo[id(self)] = new
        new.__setstate__(copy.deepcopy(self.__getstate__(), memo))
        new.grad_scaler = self.grad_scaler  # a copy trains with the same scaler
        return new

    # -- hooks -----------------------------------------------------------------------------------
    def install(self) -> None:
        """Register the hooks; on failure remove those registered and re-raise."""
        StepCounter.ensure()
        try:
            self._register_ready()
            if any(_is_lazy(e.param) for e in self.entries):
                self._lazy_handle = self.root.register_forward_hook(_LazyWatch(self))
            self._load_handle = self.root.register_load_state_dict_post_hook(_Rebind(self))
            setattr(self.root, ATTR, self)
            _DistributedSweep.live.add(self)
            StepCounter.unchecked.add(self)
            _prox.track(self)  # [i12 proximal]
        except BaseException:
            self.uninstall()
            raise

    def uninstall(self) -> None:
        _DistributedSweep.live.discard(self)
        StepCounter.unchecked.discard(self)
        _prox.untrack(self)  # [i12 proximal]
        for handle in self._handles.values():
            handle.remove()
        self._handles.clear()
        if self._lazy_handle is not None:
            self._lazy_handle.remove()
            self._lazy_handle = None
        if self._load_handle is not None:
            self._load_handle.remove()
            self._load_handle = None
        if self.root.__dict__.get(ATTR) is self:
            delattr(self.root, ATTR)

    def _register_ready(self) -> None:
        """Register the hook of each covered parameter that is initialized and trainable."""
        for i, entry in enumerate(self.entries):
            p = entry.param
            if i not in self._handles and p.requires_grad and not _is_lazy(p) and not entry.rule.proximal:  # [i12]
                self._handles[i] = p.register_post_accumulate_grad_hook(_make_hook(self, i))
        if self._lazy_handle is not None and not any(_is_lazy(e.param) for e in self.entries):
            self._lazy_handle.remove()
            self._lazy_handle = None

    def _replaced(self) -> List[Tuple[int, Entry, nn.Parameter]]:
        """Entries whose name now holds another parameter object than the one covered."""
        found = []
        for i, entry in enumerate(self.entries):
            try:
                current = self.root.get_parameter(entry.name)
            except AttributeError:  # no longer a parameter under this name: keep the one we have
                continue
            if current is not entry.param:
                found.append((i, entry, current))
        return found

    def _check_replaced(self) -> None:
        """At the first optimizer step after install: parameters replaced by new objects since (outside
        ``load_state_dict``: ``model.to_empty()`` from the meta device, FSDP2's ``fully_shard``, an
        assignment) got no term so far. Warn, and follow them from now on."""
        replaced = self._replaced()
        if replaced:
            names = ", ".join(entry.name for _, entry, _ in replaced[:5]) + (", ..." if len(replaced) > 5 else "")
            warnings.warn(
                f"torchreg: {len(replaced)} regularized parameter(s) of {type(self.root).__name__} ({names}) "
                "were replaced by new objects after torchreg was applied (model.to_empty(), fully_shard(), "
                "or an assignment), so the backward passes before this optimizer step added no "
                "regularization to them. torchreg follows the new parameters from now on; apply torchreg "
                "after such calls to regularize from the first step.",
                UserWarning,
                stacklevel=4,  # the user's optimizer.step() call
            )
            self._rebind(replaced)

    def _rebind(self, replaced: List[Tuple[int, Entry, nn.Parameter]]) -> None:
        """Follow the parameters :meth:`_replaced` found."""
        for i, entry, current in replaced:
            handle = self._handles.pop(i, None)
            if handle is not None:
                handle.remove()
            self.entries[i] = entry._replace(param=current)
        self._register_ready()

    def _on_grad(self, index: int, param: Tensor) -> None:
        """The hook's uncommon cases: no or a sparse gradient, a scale on another device, a rule
        without an adder; under a process group, nothing until the end."""
        if not self._deferred:
            self._add(self.entries[index], param)

    def _begin(self) -> None:
        """First hook of this unit in a backward: read the factors, queue the end-of-backward work."""
        with self._lock:
            task = _current_task()
            if self._task == task:
                return
            if _compiled_autograd():
                raise RuntimeError(
                    "torchreg does not support compiled autograd (torch._dynamo.config.compiled_autograd"
                    "=True): its end-of-backward step would not run and penalties would go missing. "
                    "torch.compile of the model itself is supported; leave compiled autograd off."
                )
            self._task = task
            self._seen = set()
            self._read_factors()
            self._deferred = _distributed()
            self._adders = self._build_adders()
            if self._deferred:
                _DistributedSweep.begin(self, task)
            _queue_callback(self._end_of_backward)

    def _build_adders(self) -> List[Optional[Adder]]:
        """Each entry's adder for this backward (None: the hook calls :meth:`_add`). Rebuilt only when
        a strength or a factor changed; with a grad scaler, every backward (parameters may have moved
        to another device than the scale's since the last one)."""
        if self._deferred:
            return self._none
        scale = self._scale
        key = (self._alpha, [rule._strength_values() for rule in self._rules])
        if scale is None and key == self._cached[0]:
            return self._cached[1]
        by_rule = {id(rule): rule._adder(self._alpha, scale) for rule in self._rules}
        adders = [by_rule[id(e.rule)] for e in self.entries]
        if scale is None:
            self._cached = (key, adders)
        else:
            device = scale.device
            adders = [a if e.param.device == device else None for a, e in zip(adders, self.entries)]
        return adders

    def _read_factors(self) -> None:
        self._alpha = 1.0 / self.accumulation_steps
        scaler = self.grad_scaler
        self._scale = scaler._scale if scaler is not None and scaler.is_enabled() else None
        self._scales = {}

    def _add_all(self) -> None:
        """Add the term of every trainable covered parameter (a unit reached on another rank only)."""
        self._read_factors()
        for entry in self.entries:
            if entry.param.requires_grad and not _is_lazy(entry.param):
                self._add(entry, entry.param)
        self._scales = {}

    def _end_of_backward(self) -> None:
        # Queued again so that it runs after the callbacks queued during the backward (DDP's).
        _queue_callback(self._finish)

    def _finish(self) -> None:
        try:
            if self._deferred or len(self._seen) < len(self.entries):
                self._register_ready()  # parameters unfrozen since the last backward
                for i, entry in enumerate(self.entries):
                    p = entry.param
                    if (self._deferred or i not in self._seen) and p.requires_grad and not _is_lazy(p):
                        self._add(entry, p)
            self._count_backward()
        finally:
            self._task = -1
            self._seen = set()
            self._scales = {}
            self._adders = self._none  # (drops the references to a grad scaler's scale)

    def _add(self, entry: Entry, p: Tensor) -> None:
        if entry.rule.proximal:  # [i12 proximal] nothing at backward: _prox.py applies it after the step
            return
        g = p.grad
        if g is None or g.layout != torch.strided:
            if entry.rule.is_zero:  # strength 0 leaves the gradient exactly as it is, None or sparse
                return
            # No gradient yet (a skipped parameter), or a sparse one (nn.Embedding(sparse=True)): the
            # result is dense, as autograd's is when a dense penalty gradient is added to the loss.
            p.grad = g = torch.zeros_like(p) if g is None else g.to_dense()
        scale = self._scale
        if scale is not None and scale.device != g.device:
            scale = self._scales.get(g.device)
            if scale is None:
                scale = self._scales[g.device] = self._scale.to(g.device, non_blocking=True)
        entry.rule.grad_(g, p, self._alpha, scale)

    # -- the accumulation guard -----------------------------------------------------------------------
    def _count_backward(self) -> None:
        """Count backwards between optimizer steps; warn once when there are more than declared."""
        step = StepCounter.count
        new_cycle = step != self._last_step
        if self._probe is not None and not new_cycle:
            index, ref = self._probe
            new_cycle = self.entries[index].param.grad is not ref()  # grads were set to None
        self._last_step = step
        self._backwards = 1 if new_cycle else self._backwards + 1
        self._probe = None
        for i, entry in enumerate(self.entries):
            if entry.param.grad is not None:
                self._probe = (i, weakref.ref(entry.param.grad))
                break
        if self._backwards > self.accumulation_steps and not self._warned:
            self._warned = True
            warnings.warn(
                f"torchreg: {self._backwards} backward passes reached the regularized parameters of "
                f"{type(self.root).__name__} between two optimizer steps (or without the gradients being "
                f"reset), but accumulation_steps={self.accumulation_steps} is declared, so each added the "
                "full penalty gradient. For gradient accumulation over k micro-batches call "
                "torchreg.configure(model, accumulation_steps=k) once before training.",
                UserWarning,
                stacklevel=2,
            )

    # -- reading ---------------------------------------------------------------------------------
    def penalty(self, include: Callable[[Tensor], bool] = lambda p: True) -> Optional[Tensor]:
        """The current penalty (no graph) of the covered parameters ``include`` accepts, or None."""
        total = None
        with torch.no_grad():
            for entry in self.entries:
                if not _is_lazy(entry.param) and include(entry.param):
                    value = entry.rule.penalty(entry.param)
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
        )
    inner = {id(e.param): (u, e.name) for u in units_in(root) for e in u.entries}
    for e in entries:
        other = owner_of(e.param)
        if id(e.param) in inner or other is not None:
            raise ValueError(
                f"parameter {e.name!r} is already regularized by torchreg "
                f"({_rules_text(other or inner[id(e.param)][0])}); a parameter can be covered once: "
                "remove that regularization first, or exclude the module with a None rule"
            )
        if not _is_lazy(e.param) and not (e.param.is_floating_point() or e.param.is_complex()):
            raise TypeError(f"parameter {e.name!r} has dtype {e.param.dtype}; only floating and complex "
                            "parameters can be regularized")
        e.rule._check_param(e.name, e.param)  # [i12] e.g. GroupLasso's dim against the parameter's shape
    Unit(root, entries, skipped).install()
    return root


def _rules_text(unit: Unit) -> str:
    rules = []
    for e in unit.entries:
        if repr(e.rule) not in rules:
            rules.append(repr(e.rule))
    return ", ".join(rules) or "no parameter"
