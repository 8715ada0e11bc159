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
* One backward pass of a unit is a *session* (:class:`_Session`), from its first hook to its
  end-of-backward step. A backward started inside another one's node (``torch.utils.checkpoint`` with
  ``use_reentrant=True`` runs one in its node's backward; it is its own graph task, on the same thread)
  is part of the enclosing one: its hooks join the session, and the end-of-backward step runs once, in
  the outermost backward (queued there from a post-hook on the enclosing node when the nested backward
  reached the unit first). Nesting is read from the Python stack once per backward
  (:func:`_task_info`: a ``backward()`` frame beyond the innermost one, or a Python node's backward).
  ``backward(inputs=...)`` is read there too: the end-of-backward step then adds to the listed
  parameters only, as autograd accumulates into them only. A second backward through the unit from
  another thread while a session is open raises (torchreg cannot give each its own terms).
* The hooks refer to their unit weakly (a tensor's hooks are invisible to Python's garbage collector);
  the unit lives as long as the module it was applied to, so a dropped model is freed.
* A parameter that has no hook (frozen or uninitialized when the unit was applied: no hook can be
  registered on it) gets one at the first forward of the unit's root after it became trainable, from
  a forward hook that exists only while some parameter waits (:class:`_LazyWatch`).
* A ``load_state_dict`` post-hook on the unit's root follows parameters that loading replaced by new
  objects (``assign=True``): the hooks move to the new ones. Parameters replaced otherwise
  (``to_empty`` from the meta device, FSDP2's ``fully_shard``) are found at the first optimizer step
  after install (a global step post-hook), with a warning, and followed from then on; so are
  parameters a reparametrization renamed (``parametrizations.weight.original``), and a warning names
  those it took out of the model (``weight_norm``). At the first step of an optimizer holding the
  unit's parameters, a ``GradScaler`` that drives the step but was not declared is warned about.
* Each term is multiplied by ``1 / accumulation_steps`` and by the grad scaler's current scale (a
  device tensor, never read on the host), as declared with :func:`torchreg.configure`.

The regularizers (``regularizers.py``) say *what* term is added; nothing here depends on which.
"""

from __future__ import annotations

import copy
import functools
import sys
import threading
import warnings
import weakref
from typing import Any, Callable, Dict, Iterable, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.nn.parameter import UninitializedParameter
from torch.optim.optimizer import register_optimizer_step_post_hook

from . import _prox, _scaleout
from ._ops import Adder

__all__ = ["ATTR", "Entry", "Skipped", "Unit", "attach", "units_in", "owner_of"]

#: The one attribute torchreg sets on a user's module: the :class:`Unit` applied to it.
ATTR = "_torchreg_unit"

_current_task = torch._C._current_graph_task_id
_queue_callback = torch.autograd.Variable._execution_engine.queue_callback
_STRIDED = torch.strided
_will_execute = torch._C._will_engine_execute_node
# Every backward() goes through _engine_run_backward (torch >= 2.3); before it, torch.autograd.backward.
_RUN_BACKWARD = getattr(torch.autograd.graph, "_engine_run_backward", torch.autograd.backward).__code__
_FUNCTION_BACKWARD = torch.autograd.function.BackwardCFunction.apply.__code__  # a Python node's backward
_SCALER_STEPS = (torch.amp.GradScaler.step.__code__, torch.amp.GradScaler._maybe_opt_step.__code__)


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
    """Counts optimizer steps (the accumulation guard). At the first step after a unit is installed it
    checks that the unit's parameters are still the model's (see :meth:`Unit._check_replaced`); at the
    first step of an optimizer holding the unit's parameters, that a grad scaler driving the step was
    declared (see :meth:`Unit._check_scaler`; looked for during the first ``SCALER_CHECK_STEPS``
    optimizer steps after install, so that a copy that is never stepped, an EMA, costs nothing later)."""

    count = 0
    registered = False
    unchecked: "weakref.WeakSet[Unit]" = weakref.WeakSet()
    #: unit -> how many more optimizer steps may come before giving up (a copy never trained, an EMA)
    scaler_unchecked: "weakref.WeakKeyDictionary[Unit, int]" = weakref.WeakKeyDictionary()
    SCALER_CHECK_STEPS = 100

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
        if cls.scaler_unchecked:
            stepped = {id(p) for group in optimizer.param_groups for p in group["params"]}
            scaler = _driving_scaler()
            for unit, left in list(cls.scaler_unchecked.items()):
                if any(id(e.param) in stepped for e in unit.entries):
                    del cls.scaler_unchecked[unit]
                    unit._check_scaler(scaler)
                elif left <= 1:
                    del cls.scaler_unchecked[unit]
                else:
                    cls.scaler_unchecked[unit] = left - 1


def _driving_scaler() -> Any:
    """The enabled ``torch.amp.GradScaler`` whose ``step()`` is running the optimizer step in progress
    (found on the Python stack: ``GradScaler.step`` calls ``optimizer.step()``), or None."""
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code in _SCALER_STEPS:
            scaler = frame.f_locals.get("self")
            return scaler if isinstance(scaler, torch.amp.GradScaler) and scaler.is_enabled() else None
        frame = frame.f_back
    return None


# -- which backward is running: nested ones (reentrant checkpointing), inputs=, threads -------------
class _Task:
    """What the engine needs to know about one backward pass (an autograd graph task), read once from
    the Python stack of the thread that runs its first hook (:func:`_task_info`).

    ``nested``: the pass was started inside another one's node (``torch.utils.checkpoint`` with
    ``use_reentrant=True`` runs ``torch.autograd.backward`` in its node's backward); such a pass is part
    of the enclosing one. ``enclosed``: the enclosing node is a Python ``autograd.Function`` (``node``,
    kept only until a post-hook is registered on it: that post-hook runs in the enclosing pass).
    ``listed``: ``None``, or for ``backward(inputs=...)`` a test telling whether a parameter is one of the
    listed inputs."""

    __slots__ = ("id", "nested", "enclosed", "node", "listed", "pending", "__weakref__")

    def __init__(self, task: int, nested: bool, node: Any, listed: Optional[Callable[[Tensor], bool]]) -> None:
        self.id = task
        self.nested = nested
        self.enclosed = node is not None
        self.node = node
        self.listed = listed
        self.pending: List[Tuple["Unit", "_Session"]] = []  # sessions waiting for the enclosing pass


#: The last task asked for, with a getter of its info: a strong one for a top-level backward (its info
#: refers to no tensor or module), a weak one for a nested backward (its info can refer to the enclosing
#: node and to units: held by the node's post-hook only, so that nothing outlives the graph).
_last_task: Tuple[int, Callable[[], Optional[_Task]]] = (-1, lambda: None)


def _task_info(task: int) -> _Task:
    """The :class:`_Task` of the running graph task ``task`` (cached for the last one asked)."""
    global _last_task
    cached_task, get = _last_task
    if cached_task == task:
        cached = get()
        if cached is not None:
            return cached
    run = None
    nested, node = False, None
    frame = sys._getframe(1)
    while frame is not None:
        code = frame.f_code
        if code is _RUN_BACKWARD:
            if run is not None:  # a backward() called, outside any Function, by code a backward runs
                nested = True
                break
            run = frame
        elif code is _FUNCTION_BACKWARD and run is not None:  # backward() inside a Function's backward
            nested, node = True, frame.f_locals.get("self")
            break
        frame = frame.f_back
    listed = None
    if not nested:
        listed = _listed(_inputs_of(run) if run is not None else _inputs_elsewhere())
    info = _Task(task, nested, node, listed)
    _last_task = (task, weakref.ref(info) if nested else (lambda: info))
    return info


def _inputs_of(run: Any) -> Any:
    """The ``inputs`` that ``backward()`` passed to ``_engine_run_backward`` (``()`` when none)."""
    local = run.f_locals
    if "inputs" in local:  # torch.autograd.backward's own frame
        return local["inputs"] or ()
    args, kwargs = local.get("args", ()), local.get("kwargs", {})
    if not kwargs.get("accumulate_grad", True):
        return ()
    return args[3] if len(args) > 3 else kwargs.get("inputs", ())


def _inputs_elsewhere() -> Any:
    """A hook run by a device thread (CUDA) has no ``backward()`` frame below it: the thread that called
    ``backward()`` waits in it. Its ``inputs`` if exactly one thread is in a backward, else ``()``."""
    found = []
    for frame in sys._current_frames().values():
        while frame is not None and frame.f_code is not _RUN_BACKWARD:
            frame = frame.f_back
        if frame is not None:
            found.append(_inputs_of(frame))
    return found[0] if len(found) == 1 else ()


def _listed(inputs: Any) -> Optional[Callable[[Tensor], bool]]:
    if not inputs:
        return None
    ids = {id(t) for t in inputs if isinstance(t, Tensor)}
    if len(ids) == len(inputs):
        return lambda p: id(p) in ids
    # GradientEdges among the inputs: ask the engine whether it runs the parameter's AccumulateGrad
    return lambda p: id(p) in ids or _will_execute(torch.autograd.graph.get_gradient_edge(p).node)


class _Session:
    """A unit's share of one backward pass, from its first hook to its end-of-backward step.

    ``owner`` is the graph task that runs the end-of-backward step: the outermost pass (-1 while it is
    not known yet: the unit was reached first by a nested pass); ``nested`` the tasks of the passes run
    inside it that reached the unit. The unit refers to its session weakly; the callbacks queued in the
    owner task hold it (or, while the owner is not known, the post-hook on the enclosing node), so a
    backward that failed half-way, whose callbacks never run and are freed, ends its session too."""

    __slots__ = ("owner", "nested", "listed", "__weakref__")

    def __init__(self) -> None:
        self.owner = -1
        self.nested: set = set()
        self.listed: Optional[Callable[[Tensor], bool]] = None


def _no_session() -> Optional[_Session]:
    return None


class _Adopt:
    """Post-hook on the node whose backward ran a nested pass that reached units first: runs in the
    enclosing pass, which takes those units' sessions over (one end-of-backward step for the whole)."""

    def __init__(self, info: _Task) -> None:
        self.info = info

    def __call__(self, grad_inputs: Any, grad_outputs: Any) -> None:
        pending, self.info.pending = self.info.pending, []
        if pending:
            outer = _task_info(_current_task())
            for unit, session in pending:
                with unit._lock:
                    if session.owner == -1 and unit._session() is session:
                        unit._home(session, outer)


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
        ref = getattr(hook, ATTR, None)
        unit = ref() if isinstance(ref, weakref.ref) else None
        if isinstance(unit, Unit):
            return unit
    return _prox.owner_of(p)  # a proximal entry carries no hook


def _make_hook(unit: "Unit", index: int) -> Callable[[Tensor], None]:
    """The post-accumulate-grad hook of ``unit.entries[index]``: the hot path, kept to a few lines.

    It refers to its unit weakly: a tensor's hooks are invisible to Python's garbage collector, so a
    strong reference (hook -> unit -> module -> parameter -> hook) would keep a dropped model alive.
    The unit lives as long as the module it was applied to (``module._torchreg_unit``).
    """
    ref = weakref.ref(unit)

    def hook(param: Tensor) -> None:
        unit = ref()
        if unit is None:  # the module it was applied to is gone
            return
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

    setattr(hook, ATTR, ref)  # for owner_of
    return hook


def _make_reach_hook(unit: "Unit") -> Callable[[Tensor], None]:
    """Post-accumulate-grad hook on the unsharded parameter FSDP2 keeps for a covered sharded one: autograd
    accumulates into it on every backward, also one that does not synchronize gradients (FSDP2 then
    runs no hook of the sharded parameter), so it opens the unit's session; the end-of-backward step adds
    the terms of the parameters whose sharded hook did not run to their sharded ``.grad``."""
    ref = weakref.ref(unit)

    def reach(param: Tensor) -> None:
        unit = ref()
        if unit is not None and unit._task != _current_task():
            unit._begin()

    setattr(reach, ATTR, ref)
    return reach


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
    """Forward hook on a unit's root while some covered parameter has no hook yet: still uninitialized
    (a lazy module), or frozen (``requires_grad=False``: no hook can be registered on it) when the unit
    was applied. The forward after it is unfrozen registers its hook, before the backward that needs it."""

    def __init__(self, unit: "Unit") -> None:
        self.unit = unit

    def __call__(self, module: nn.Module, args: Any, output: Any) -> None:
        self.unit._register_ready()


class _FirstForward:
    """A global module forward hook (``register_module_forward_hook``: no hook on the user's modules)
    while some unit has not run its first backward yet nor seen an optimizer step: at each forward of
    such a unit's root, :meth:`Unit._on_forward` follows parameters replaced since it was applied
    (``fully_shard``, ``to_empty`` from the meta device) before the backward that needs their hooks. It
    is removed as soon as no unit waits; it does nothing inside ``torch.compile`` (the first optimizer
    step does it then, with a warning)."""

    units: "weakref.WeakValueDictionary[int, Unit]" = weakref.WeakValueDictionary()  # id(root) -> unit
    handle: Any = None

    @classmethod
    def add(cls, unit: "Unit") -> None:
        cls.units[id(unit.root)] = unit
        if cls.handle is None:
            cls.handle = torch.nn.modules.module.register_module_forward_hook(cls._hook)

    @classmethod
    def discard(cls, unit: "Unit") -> None:
        if cls.units.get(id(unit.root)) is unit:
            del cls.units[id(unit.root)]
        if not cls.units and cls.handle is not None:
            cls.handle.remove()
            cls.handle = None

    @staticmethod
    def _hook(module: nn.Module, args: Any, output: Any) -> None:
        if torch.compiler.is_compiling():
            return
        unit = _FirstForward.units.get(id(module))
        if unit is not None and unit.root is module:
            unit._on_forward()


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
        # entries that take a backward hook; a proximal rule acts after the optimizer step (_prox.py)
        self._hooked = sum(not e.rule.proximal for e in self.entries)
        self._lock = threading.Lock()
        self._task = -1  # graph task whose hooks ran last (the hooks' test for "a new backward")
        self._session: Callable[[], Optional[_Session]] = _no_session  # weak: see _Session
        self._seen: set = set()  # entries the hooks reached in this session
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
        self._opened = False  # a session was opened since install (or unpickling)
        self._dist = False  # the session in progress runs under a multi-rank process group
        self._nodefer = [False] * len(self.entries)
        self._defer = self._nodefer  # per entry: term left to the end of backward (DDP averages after hooks)
        self._reach: Dict[int, Tuple[Any, Any]] = {}  # entry -> (weakref to FSDP2's unsharded param, handle)

    def __getstate__(self) -> Dict[str, Any]:
        keep = ("root", "entries", "skipped", "accumulation_steps", "_lazy_handle", "_load_handle")
        return {k: self.__dict__[k] for k in keep}

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.grad_scaler = None  # a pickled model is reconfigured with its new scaler
        self._init_transient()
        self._hook_ready()  # (the root may still be unpickling: its hooks are left to the first step)
        _DistributedSweep.live.add(self)
        StepCounter.ensure()  # unpickled where torchreg was never applied: the guard needs the step hook
        StepCounter.unchecked.add(self)
        StepCounter.scaler_unchecked[self] = StepCounter.SCALER_CHECK_STEPS
        _prox.track(self)
        _FirstForward.add(self)

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
            self._load_handle = self.root.register_load_state_dict_post_hook(_Rebind(self))
            setattr(self.root, ATTR, self)
            _DistributedSweep.live.add(self)
            StepCounter.unchecked.add(self)
            StepCounter.scaler_unchecked[self] = StepCounter.SCALER_CHECK_STEPS
            _prox.track(self)
            _FirstForward.add(self)
        except BaseException:
            self.uninstall()
            raise

    def uninstall(self) -> None:
        _FirstForward.discard(self)
        _DistributedSweep.live.discard(self)
        StepCounter.unchecked.discard(self)
        StepCounter.scaler_unchecked.pop(self, None)
        _prox.untrack(self)
        for handle in self._handles.values():
            handle.remove()
        self._handles.clear()
        for _, handle in self._reach.values():
            handle.remove()
        self._reach.clear()
        if self._lazy_handle is not None:
            self._lazy_handle.remove()
            self._lazy_handle = None
        if self._load_handle is not None:
            self._load_handle.remove()
            self._load_handle = None
        if self.root.__dict__.get(ATTR) is self:
            delattr(self.root, ATTR)

    def _register_ready(self) -> None:
        """Register the hook of each covered parameter that is initialized and trainable; keep a forward
        hook on the root (:class:`_LazyWatch`) while some parameter has none."""
        self._hook_ready()
        waiting = len(self._handles) < self._hooked
        if waiting and self._lazy_handle is None:
            self._lazy_handle = self.root.register_forward_hook(_LazyWatch(self))
        elif not waiting and self._lazy_handle is not None:
            self._lazy_handle.remove()
            self._lazy_handle = None

    def _hook_ready(self) -> None:
        for i, entry in enumerate(self.entries):
            p = entry.param
            if i not in self._handles and p.requires_grad and not _is_lazy(p) and not entry.rule.proximal:
                self._handles[i] = handle = p.register_post_accumulate_grad_hook(_make_hook(self, i))
                _scaleout.put_first(p, handle)

    def _on_forward(self) -> None:
        """At a forward of the root before the first backward (and while a parameter waits for its hook):
        refuse parameters torchreg cannot regularize (FSDP1, ZeRO-3: wrapped after torchreg was
        applied), follow parameters replaced since the unit was applied (``fully_shard``, ``to_empty``,
        an assignment: exact from the first backward), hook FSDP2's unsharded parameters, register the
        hooks of parameters initialized or unfrozen since."""
        for entry in self.entries:
            reason = _scaleout.refusal(entry.param) or _scaleout.refusal_at(self.root, entry.name)
            if reason is not None:
                raise RuntimeError(f"{reason} (parameter {entry.name!r} of {type(self.root).__name__})")
        replaced = self._replaced()
        if replaced:  # no backward ran with the old ones yet: exact
            self._rebind(replaced)
        self._hook_unsharded()
        self._register_ready()

    def _hook_unsharded(self) -> None:
        """Register :func:`_make_reach_hook` on the unsharded parameter FSDP2 keeps for each covered
        sharded parameter (created at its first all-gather: hooked at the first forward)."""
        found = _scaleout.fsdp2_params(e.param for e in self.entries if not e.rule.proximal)
        for i, entry in enumerate(self.entries):
            fsdp_param = found.get(id(entry.param))
            unsharded = None if fsdp_param is None else _scaleout.fsdp2_unsharded(fsdp_param)
            if unsharded is None or not unsharded.requires_grad:
                continue
            old = self._reach.get(i)
            if old is not None and old[0]() is unsharded:
                continue
            if old is not None:
                old[1].remove()
            self._reach[i] = (weakref.ref(unsharded), unsharded.register_post_accumulate_grad_hook(_make_reach_hook(self)))

    def _replaced(self) -> List[Tuple[int, Entry, nn.Parameter]]:
        """Entries whose name now holds another parameter object than the one covered."""
        found = []
        for i, entry in enumerate(self.entries):
            try:
                current = self.root.get_parameter(entry.name)
            except AttributeError:  # no longer a parameter under this name: keep the one we have
                continue
            if current is not entry.param:
                current = _scaleout.sharded_of(current)  # FSDP2's unsharded parameter, during forward
                if current is not entry.param:
                    found.append((i, entry, current))
        return found

    def _check_replaced(self) -> None:
        """At the first optimizer step after install: parameters replaced by new objects since (outside
        ``load_state_dict``: ``model.to_empty()`` from the meta device, FSDP2's ``fully_shard``, an
        assignment) got no term so far. Warn, and follow them from now on. Parameters that are no
        longer parameters at all (a reparametrization took them out) are warned about too."""
        _FirstForward.discard(self)
        self._register_ready()  # (an unpickled unit: its forward hook, if a parameter has no hook)
        self._check_gone()
        replaced = self._replaced()
        if replaced:
            self._warn_replaced(replaced, stacklevel=5)  # the user's optimizer.step() call
            self._rebind(replaced)
        self._hook_unsharded()  # (torch.compile: not done at the forward)

    def _warn_replaced(self, replaced: List[Tuple[int, Entry, nn.Parameter]], stacklevel: int) -> None:
        """Parameters replaced after a backward ran with the old ones (found at a forward or a step)."""
        names = ", ".join(entry.name for _, entry, _ in replaced[:5]) + (", ..." if len(replaced) > 5 else "")
        warnings.warn(
            f"torchreg: {len(replaced)} regularized parameter(s) of {type(self.root).__name__} ({names}) "
            "were replaced by new objects (model.to_empty(), fully_shard(), or an assignment) after the "
            "first forward of the model it was applied to, or inside torch.compile, so the backward passes "
            "before this optimizer step added no regularization to them. torchreg follows the new "
            "parameters from now on; replace parameters before the first forward (or apply torchreg "
            "after) to regularize from the first step.",
            UserWarning,
            stacklevel=stacklevel,
        )

    def _check_gone(self) -> None:
        """Entries whose name no longer holds a parameter: the same object under another name (a
        reparametrization that keeps it, e.g. ``parametrizations.orthogonal`` moves it to
        ``parametrizations.weight.original``) is followed silently (its hook still fires); one that is
        no parameter of the model any more (``weight_norm`` made new ones) gets a warning."""
        gone, names = [], None
        for i, entry in enumerate(self.entries):
            try:
                self.root.get_parameter(entry.name)
            except AttributeError:
                if names is None:
                    names = {id(p): n for n, p in self.root.named_parameters(remove_duplicate=False)}
                if id(entry.param) in names:
                    self.entries[i] = entry._replace(name=names[id(entry.param)])
                else:
                    gone.append(entry.name)
        if gone:
            names = ", ".join(gone[:5]) + (", ..." if len(gone) > 5 else "")
            warnings.warn(
                f"torchreg: {len(gone)} regularized parameter(s) of {type(self.root).__name__} ({names}) are no "
                "longer parameters of the model: a reparametrization applied after torchreg "
                "(torch.nn.utils.weight_norm or spectral_norm, torch.nn.utils.parametrizations.weight_norm or "
                "orthogonal, torch.nn.utils.parametrize.register_parametrization) replaced them by computed "
                "tensors, so they get no regularization and torchreg.penalty() leaves them out. Apply torchreg "
                "after the reparametrization, to the parameters the optimizer trains: with "
                "torch.nn.utils.parametrize the originals are module.parametrizations.<name>.original* (select "
                "them with params='parametrizations.weight.original*'); the old weight_norm trains weight_g "
                "and weight_v.",
                UserWarning,
                stacklevel=5,  # the user's optimizer.step() call
            )

    def _check_scaler(self, scaler: Any) -> None:
        """At the first optimizer step over the unit's parameters: a grad scaler that drives the step
        (``scaler.step(optimizer)``) but was not declared makes every term 1/scale of what it should be."""
        if scaler is not None and self.grad_scaler is not scaler and self._hooked:  # (proximal only: no term)
            warnings.warn(
                f"torchreg: the regularized parameters of {type(self.root).__name__} are stepped by a "
                "torch.amp.GradScaler (scaler.step(optimizer)) that was not declared to torchreg, so the "
                "regularization gradient was not scaled with the loss and scaler.unscale_ divides it by the "
                "scale (the penalty is almost lost). Declare it once before training: "
                "torchreg.configure(model, grad_scaler=scaler).",
                UserWarning,
                stacklevel=5,
            )

    def _rebind(self, replaced: List[Tuple[int, Entry, nn.Parameter]]) -> None:
        """Follow the parameters :meth:`_replaced` found."""
        for i, entry, current in replaced:
            handle = self._handles.pop(i, None)
            if handle is not None:
                handle.remove()
            self.entries[i] = entry._replace(param=current)
        self._cached = (None, self._none)  # adders depend on the parameters' kind (DTensor or not)
        self._register_ready()

    def _on_grad(self, index: int, param: Tensor) -> None:
        """The hook's uncommon cases: no or a sparse gradient, a scale on another device, a rule
        without an adder, a sharded parameter; under DDP, nothing until the end."""
        if not self._defer[index]:
            self._add(self.entries[index], param)

    def _begin(self) -> None:
        """A hook of this unit runs in another graph task than the last one: a new backward (open a
        session: read the factors, queue the end-of-backward step), or a backward nested in the one in
        progress (reentrant checkpointing: join its session), or, from another thread, a second backward
        running at the same time (an error)."""
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
            session = self._session()
            if session is None:
                self._open(_task_info(task))
            elif task != session.owner and task not in session.nested:
                info = _task_info(task)
                if info.nested:  # a backward run inside the one in progress: part of it
                    session.nested.add(task)
                elif session.owner == -1:  # the enclosing backward, on another device thread
                    self._own(session, info)
                else:
                    raise RuntimeError(
                        f"torchreg: two backward passes through the regularized parameters of "
                        f"{type(self.root).__name__} are running at the same time (from different threads). "
                        "torchreg adds each parameter's term once per backward pass and cannot give each of "
                        "two concurrent passes its own; run them one after the other (e.g. under a lock), "
                        "or give each thread its own copy of the model."
                    )
            self._task = task

    def _open(self, info: _Task) -> None:
        """A new session: this backward's factors and adders; the end-of-backward step is queued in the
        outermost backward (:meth:`_home`)."""
        session = _Session()
        self._session = weakref.ref(session)
        self._seen = set()
        self._read_factors()
        if not self._opened:
            self._opened = True
            _FirstForward.discard(self)
        self._dist = _distributed()
        # Under DDP the hooks run before the gradients are averaged: every term waits for the end of
        # backward. FSDP2 runs a sharded parameter's hooks after its reduce-scatter: added there.
        self._defer = [not _scaleout.is_dtensor(e.param) for e in self.entries] if self._dist else self._nodefer
        self._deferred = any(self._defer)
        self._adders = self._build_adders()
        self._home(session, info)

    def _home(self, session: _Session, info: _Task) -> None:
        """Give ``session`` to the backward ``info``, or, when that one is nested in another one's Python
        node, to the enclosing backward, from a post-hook on that node (which runs in it)."""
        if info.nested and info.enclosed:
            session.nested.add(info.id)
            info.pending.append((self, session))
            if info.node is not None:  # the first unit: the node's post-hook holds info (no cycle back)
                info.node.register_hook(_Adopt(info))
                info.node = None
        else:  # a top-level backward (or one nested outside any Function: it counts as its own)
            self._own(session, info)

    def _own(self, session: _Session, info: _Task) -> None:
        session.owner = info.id
        session.listed = info.listed
        if self._dist:
            _DistributedSweep.begin(self, info.id)
        _queue_callback(functools.partial(self._end_of_backward, session))

    def _build_adders(self) -> List[Optional[Adder]]:
        """Each entry's adder for this backward (None: the hook calls :meth:`_add`). Rebuilt only when
        a strength or a factor changed; with a grad scaler, every backward (parameters may have moved
        to another device than the scale's since the last one)."""
        if self._deferred and all(self._defer):
            return self._none
        scale = self._scale
        key = (self._alpha, [rule._strength_values() for rule in self._rules], tuple(self._defer))
        if scale is None and key == self._cached[0]:
            return self._cached[1]
        by_rule = {id(rule): rule._adder(self._alpha, scale) for rule in self._rules}
        # (a sharded parameter takes Unit._add: its shard)
        adders = [None if d or _scaleout.is_dtensor(e.param) else by_rule[id(e.rule)]
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
        self._scale = scaler._scale if scaler is not None and scaler.is_enabled() else None
        self._scales = {}

    def _add_all(self) -> None:
        """Add the term of every trainable covered parameter (a unit reached on another rank only)."""
        self._read_factors()
        for entry in self.entries:
            if entry.param.requires_grad and not _is_lazy(entry.param):
                self._add(entry, entry.param)
        self._scales = {}

    def _end_of_backward(self, session: _Session) -> None:
        # Queued again so that it runs after the callbacks queued during the backward (DDP's).
        _queue_callback(functools.partial(self._finish, session))

    def _finish(self, session: _Session) -> None:
        try:
            if self._session() is not session:  # (cannot happen: a session ends here only)
                return
            listed = session.listed  # backward(inputs=...): the terms go to the listed parameters only
            if self._deferred or len(self._seen) < self._hooked:
                self._register_ready()  # parameters unfrozen since the last backward
                for i, entry in enumerate(self.entries):
                    p = entry.param
                    if ((self._defer[i] or i not in self._seen) and p.requires_grad and not _is_lazy(p)
                            and (listed is None or listed(p))):
                        self._add(entry, p)
            self._count_backward()
        finally:
            self._session = _no_session
            self._task = -1
            self._seen = set()
            self._scales = {}
            self._adders = self._none  # (drops the references to a grad scaler's scale)
            self._defer = self._nodefer

    def _add(self, entry: Entry, p: Tensor) -> None:
        if entry.rule.proximal:  # nothing at backward: _prox.py applies it after the step
            return
        g = p.grad
        if g is None or g.layout != torch.strided:
            if entry.rule.is_zero:  # strength 0 leaves the gradient exactly as it is, None or sparse
                return
            # No gradient yet (a skipped parameter), or a sparse one (nn.Embedding(sparse=True)): the
            # result is dense, as autograd's is when a dense penalty gradient is added to the loss.
            p.grad = g = torch.zeros_like(p) if g is None else g.to_dense()
        if _scaleout.is_dtensor(p) and _scaleout.elementwise_on_shards(entry.rule, p):
            g, p = _scaleout.local(g), _scaleout.local(p)  # this rank's shard, as the kernels expect
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
        e.rule._check_param(e.name, e.param)  # e.g. GroupLasso's dim against the parameter's shape
    Unit(root, entries, skipped).install()
    return root


def _rules_text(unit: Unit) -> str:
    rules = []
    for e in unit.entries:
        if repr(e.rule) not in rules:
            rules.append(repr(e.rule))
    return ", ".join(rules) or "no parameter"
