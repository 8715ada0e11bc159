"""Parameter tracking: keeping a unit on the parameters its model trains, whatever happens to them.

* A parameter that takes no hook yet (frozen, ``requires_grad=False``, or uninitialized, a lazy
  module's, when the unit was applied: no hook can be registered on it) gets one at the first forward
  of the unit's root after it became trainable, from a forward hook that exists only while some
  parameter waits (:class:`_LazyWatch`).
* A ``load_state_dict`` post-hook on the root follows parameters that loading replaced by new objects
  (``assign=True``): the hooks move to the new ones (:class:`_Rebind`).
* A rule's per-parameter state follows its parameter's device and dtype (:func:`state_kw`).
* Parameters replaced otherwise (``to_empty`` from the meta device, FSDP2's ``fully_shard``,
  Accelerate's preparation, an assignment) are found before the first backward, at the first forward
  of each module holding them (:class:`_FirstForward`, a forward hook there that exists only until that
  module's first forward with gradients, or the unit's first backward or optimizer step): exact from the first backward, in either order
  of torchreg and sharding. There, too, FSDP1 and DeepSpeed ZeRO wrapping applied after torchreg is
  refused (``_distributed.refusal``), and FSDP2's unsharded parameters get their hooks
  (``_distributed.hook_unsharded``).
* What the first forward could not see (a replacement after the first backward; inside
  ``torch.compile``, where the forward hook does nothing) is found at the first optimizer step after
  install, with a warning, and followed from then on; so are parameters a reparametrization renamed
  (``parametrizations.weight.original``), and a warning names those it took out of the model
  (``weight_norm``).
* torchreg's hook is made the first of a parameter's post-accumulate-grad hooks, so that its term is
  in ``.grad`` before another hook reads it: an optimizer stepped in the hook (optimizer-in-backward),
  DeepSpeed's gradient reduction.

A unit owns one :class:`ParamTracker` (``unit.tracker``) and gives it ``hooked`` (how many entries
take a hook), ``_takes_hook(entry)``, ``_make_hook(index)`` and ``_follow(index, param)`` (an entry
now covers another parameter object).
"""

from __future__ import annotations

import warnings
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.nn.parameter import UninitializedParameter

from . import _distributed, _registry
from . import _torch_private as private

__all__ = ["ParamTracker", "TrackedUnit", "is_lazy", "state_kw"]


def is_lazy(p: Tensor) -> bool:
    return isinstance(p, UninitializedParameter)


def state_kw(entry: Any, p: Tensor) -> Dict[str, Any]:
    """``{"state": ...}`` for a rule's call on ``p`` (empty when the rule keeps no state), the entry's
    state tensors moved to ``p``'s device and (floating) dtype first: the state follows its parameter
    (``model.to()``, ``.half()``) and is converted once, at its first use after the move."""
    state = entry.state
    if state is None:
        return {}
    for key, t in state.items():
        if isinstance(t, Tensor) and (t.device != p.device or (t.is_floating_point() and t.dtype != p.dtype)):
            state[key] = t.to(device=p.device, dtype=p.dtype if t.is_floating_point() else t.dtype)
    return {"state": state}


class _LazyWatch:
    """Forward hook on a unit's root while some covered parameter has no hook yet. The forward after it
    is unfrozen (or materialized) registers its hook, before the backward that needs it."""

    def __init__(self, unit: Any) -> None:
        self.unit = unit

    def __call__(self, module: nn.Module, args: Any, output: Any) -> None:
        self.unit.tracker.register_ready(self.unit)


class _FirstForward:
    """Forward hook on each module that holds covered parameters, from install until that
    module's first forward with gradients enabled, or the unit's first backward or optimizer step: after
    the forward, outside ``torch.compile``, :meth:`ParamTracker.on_forward` checks the module's entries,
    before the backward that needs their hooks. On the holding modules, not on the root: a trainer may
    never call the root's forward (Lightning calls ``training_step``); and not a global module hook:
    ``torch.compile(model)`` warns when global module hooks exist."""

    def __init__(self, unit: Any, indices: List[int]) -> None:
        self.unit = unit
        self.indices = indices
        self.handle: Any = None

    def __call__(self, module: nn.Module, args: Any, output: Any) -> None:
        if torch.compiler.is_compiling():  # (the first optimizer step checks then)
            return
        tracker = self.unit.tracker
        tracker.on_forward(self.unit, self.indices)
        if torch.is_grad_enabled() and self in tracker.first_hooks:  # (a forward under no_grad leads to no backward)
            tracker.first_hooks.remove(self)
            self.handle.remove()


class _Rebind:
    """``load_state_dict`` post-hook on a unit's root: ``load_state_dict(..., assign=True)`` puts new
    parameter objects in the modules, and the unit follows them (its hooks were on the old ones)."""

    def __init__(self, unit: Any) -> None:
        self.unit = unit

    def __call__(self, module: nn.Module, incompatible_keys: Any) -> None:
        tracker = self.unit.tracker
        tracker.rebind(self.unit, tracker.replaced(self.unit))


class ParamTracker:
    """The hook handles of a unit's entries, and the watchers that keep them on the right parameters."""

    __slots__ = ("handles", "lazy_handle", "load_handle", "reach", "first_hooks")

    def __init__(self) -> None:
        self.handles: Dict[int, Any] = {}
        self.lazy_handle: Any = None
        self.load_handle: Any = None
        self.reach: Dict[int, Tuple[Any, Any]] = {}  # entry -> (FSDP2's unsharded parameter, weakly; handle)
        self.first_hooks: List[_FirstForward] = []  # on the modules holding entries, until the first backward

    def __getstate__(self) -> Dict[str, Any]:
        return {"lazy_handle": self.lazy_handle, "load_handle": self.load_handle, "first_hooks": self.first_hooks}

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.handles = {}
        self.reach = {}
        self.lazy_handle = state["lazy_handle"]
        self.load_handle = state["load_handle"]
        self.first_hooks = state.get("first_hooks", [])

    def install(self, unit: Any) -> None:
        self.register_ready(unit)
        self.load_handle = unit.root.register_load_state_dict_post_hook(_Rebind(unit))
        self.watch(unit)

    def watch(self, unit: Any) -> None:
        """Check the unit's parameters at forwards until its first backward or optimizer step."""
        holders: Dict[int, Tuple[nn.Module, List[int]]] = {}
        for i, entry in enumerate(unit.entries):
            try:
                module = unit.root.get_submodule(entry.name.rpartition(".")[0])
            except AttributeError:
                continue
            holders.setdefault(id(module), (module, []))[1].append(i)
        for module, indices in holders.values():
            hook = _FirstForward(unit, indices)
            hook.handle = module.register_forward_hook(hook)
            self.first_hooks.append(hook)

    def opened(self, unit: Any) -> None:
        """The unit's first backward began (or its first optimizer step, or it is removed): stop
        watching forwards."""
        hooks, self.first_hooks = self.first_hooks, []
        for hook in hooks:
            hook.handle.remove()

    def on_forward(self, unit: Any, indices: Sequence[int]) -> None:
        """After the forward of a module holding ``unit.entries[i]``, ``i`` in ``indices``, before the first
        backward: refuse FSDP1 / ZeRO-3 wrapping applied since, follow replaced parameters (no backward
        ran with the old ones: exact), hook FSDP2's unsharded parameters."""
        for i in indices:
            entry = unit.entries[i]
            reason = _distributed.refusal(entry.param) or _distributed.refusal_at(unit.root, entry.name)
            if reason is not None:
                raise RuntimeError(f"{reason} (parameter {entry.name!r} of {type(unit.root).__name__})")
        replaced = self.replaced(unit, indices)
        if replaced:
            self.rebind(unit, replaced)
        _distributed.hook_unsharded(unit, indices, self.reach)

    def uninstall(self) -> None:
        for handle in self.handles.values():
            handle.remove()
        self.handles.clear()
        for _, handle in self.reach.values():
            handle.remove()
        self.reach.clear()
        self.opened(None)
        for name in ("lazy_handle", "load_handle"):
            handle = getattr(self, name)
            if handle is not None:
                handle.remove()
                setattr(self, name, None)

    def register_ready(self, unit: Any) -> None:
        """Register the hook of each entry that takes one and is initialized and trainable; keep a forward
        hook on the root (:class:`_LazyWatch`) while some entry waits."""
        self.hook_ready(unit)
        waiting = len(self.handles) < unit.hooked
        if waiting and self.lazy_handle is None:
            self.lazy_handle = unit.root.register_forward_hook(_LazyWatch(unit))
        elif not waiting and self.lazy_handle is not None:
            self.lazy_handle.remove()
            self.lazy_handle = None

    def hook_ready(self, unit: Any) -> None:
        for i, entry in enumerate(unit.entries):
            p = entry.param
            if i not in self.handles and p.requires_grad and not is_lazy(p) and unit._takes_hook(entry):
                self.handles[i] = handle = p.register_post_accumulate_grad_hook(unit._make_hook(i))
                private.put_first(p, handle)  # before hooks that read .grad (optimizer-in-backward)

    def replaced(self, unit: Any, indices: Optional[Sequence[int]] = None) -> List[Tuple[int, Any, nn.Parameter]]:
        """Entries (all, or those of ``indices``) whose name now holds another parameter object than the
        one covered (during an FSDP2 forward, the unsharded parameter stands for its sharded one)."""
        found = []
        for i in range(len(unit.entries)) if indices is None else indices:
            entry = unit.entries[i]
            try:
                current = unit.root.get_parameter(entry.name)
            except AttributeError:  # no longer a parameter under this name: keep the one we have
                continue
            if current is not entry.param:
                current = _distributed.sharded_of(current)
                if current is not entry.param:
                    found.append((i, entry, current))
        return found

    def rebind(self, unit: Any, replaced: List[Tuple[int, Any, nn.Parameter]]) -> None:
        """Follow the parameters :meth:`replaced` found."""
        for i, entry, current in replaced:
            handle = self.handles.pop(i, None)
            if handle is not None:
                handle.remove()
            unit._follow(i, current)
        self.register_ready(unit)

    def check(self, unit: Any) -> None:
        """At the first optimizer step after install: parameters replaced by new objects that the first
        forward did not see (replaced after the first backward, or the forward ran inside
        ``torch.compile``) got no term so far. Warn, and follow them from now on. Parameters that are no
        longer parameters at all (a reparametrization took them out) are warned about too."""
        self.opened(unit)
        self.register_ready(unit)  # (an unpickled unit: its forward hook, if a parameter has no hook)
        self._check_gone(unit)
        replaced = self.replaced(unit)
        if replaced:
            names = ", ".join(entry.name for _, entry, _ in replaced[:5]) + (", ..." if len(replaced) > 5 else "")
            warnings.warn(
                f"torchreg: {len(replaced)} regularized parameter(s) of {type(unit.root).__name__} ({names}) "
                "were replaced by new objects (model.to_empty(), fully_shard(), or an assignment) after "
                "the first backward, or inside torch.compile, so the backward passes before this "
                "optimizer step added no regularization to them. torchreg follows the new parameters "
                "from now on; replace parameters before the first backward, or apply torchreg after, to "
                "regularize from the first step.",
                UserWarning,
                stacklevel=5,  # the user's optimizer.step() call
            )
            self.rebind(unit, replaced)
        # Inside torch.compile no forward was checked: FSDP2's unsharded parameters are hooked only now,
        # so a backward without gradient sync before this step opened no session and added nothing.
        late = _distributed.hook_unsharded(unit, range(len(unit.entries)), self.reach)
        if late and not replaced and unit.guard.backwards < unit.accumulation_steps:
            warnings.warn(
                f"torchreg: {unit.guard.backwards} of the accumulation_steps={unit.accumulation_steps} backward "
                f"passes before this first optimizer step reached the regularized parameters of "
                f"{type(unit.root).__name__}: the forward ran inside torch.compile, where torchreg cannot hook "
                "FSDP2's unsharded parameters, so the micro-batches without gradient sync "
                "(set_requires_gradient_sync(False)) added no regularization. torchreg is exact from the next "
                "step on; to be exact from the first, run the first forward outside torch.compile or sync "
                "gradients on every micro-batch of the first step.",
                UserWarning,
                stacklevel=5,  # the user's optimizer.step() call
            )

    def _check_gone(self, unit: Any) -> None:
        """Entries whose name no longer holds a parameter: the same object under another name (a
        reparametrization that keeps it, e.g. ``parametrizations.orthogonal`` moves it to
        ``parametrizations.weight.original``) is followed silently (its hook still fires); one that is
        no parameter of the model any more (``weight_norm`` made new ones) gets a warning."""
        gone, names = [], None
        for i, entry in enumerate(unit.entries):
            try:
                unit.root.get_parameter(entry.name)
            except AttributeError:
                if names is None:
                    names = {id(p): n for n, p in unit.root.named_parameters(remove_duplicate=False)}
                if id(entry.param) in names:
                    unit.entries[i] = entry._replace(name=names[id(entry.param)])
                else:
                    gone.append(entry.name)
        if gone:
            names = ", ".join(gone[:5]) + (", ..." if len(gone) > 5 else "")
            warnings.warn(
                f"torchreg: {len(gone)} regularized parameter(s) of {type(unit.root).__name__} ({names}) are no "
                "longer parameters of the model: a reparametrization applied after torchreg "
                "(torch.nn.utils.weight_norm or spectral_norm, torch.nn.utils.parametrizations.weight_norm or "
                "orthogonal, torch.nn.utils.parametrize.register_parametrization) replaced them by computed "
                "tensors, so they get no regularization and torchreg.penalty() leaves them out. Apply torchreg "
                "after the reparametrization, to the parameters the optimizer trains: with "
                "torch.nn.utils.parametrize the originals are module.parametrizations.<name>.original* (select "
                "them with params='parametrizations.weight.original*'); the old weight_norm trains weight_g "
                "and weight_v.",
                UserWarning,
                stacklevel=6,  # the user's optimizer.step() call
            )


class TrackedUnit:
    """What every unit that covers parameters shares (the penalty unit, ``_engine.Unit``, and the
    constraint unit): ``root``, ``entries`` and a :class:`ParamTracker`; installed on the root under its
    kind's attribute (``ATTR``), its parameters claimed in ``_registry`` under its ``KIND``. A subclass
    extends :meth:`_register` / :meth:`_unregister` with the watchers it needs."""

    KIND = ""
    ATTR = ""
    root: nn.Module
    entries: List[Any]
    tracker: ParamTracker

    def install(self) -> None:
        """Register the hooks and watchers; on failure undo what was done and re-raise."""
        try:
            self.tracker.install(self)
            setattr(self.root, self.ATTR, self)
            self._register()
        except BaseException:
            self.uninstall()
            raise

    def _register(self) -> None:
        _registry.claim(self, self.KIND, [e.param for e in self.entries])

    def _unregister(self) -> None:
        """Undo what :meth:`_register` added beyond the registry (a subclass's watchers)."""

    def uninstall(self) -> None:
        self._unregister()
        _registry.release(self, self.KIND, [e.param for e in self.entries])
        self.tracker.uninstall()
        if self.root.__dict__.get(self.ATTR) is self:
            delattr(self.root, self.ATTR)

    def _follow(self, index: int, param: nn.Parameter) -> None:
        """Entry ``index`` now covers ``param`` (the model replaced the parameter object)."""
        entry = self.entries[index]
        _registry.release(self, self.KIND, [entry.param])
        self.entries[index] = entry._replace(param=param)
        _registry.claim(self, self.KIND, [param])
