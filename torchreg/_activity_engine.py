"""When an activity term is added: a forward hook per regularized module, a tensor hook per call.

One :class:`ActivityUnit` is made per call that applies activity regularization
(``ActivityL1(layer, ...)``, or the activity rules of one ``apply_regularization``). It is kept on the
module it was applied to as the attribute :data:`ATTR`, apart from the weight engine's ``Unit``
(``_engine.ATTR``), so that a weight regularizer and an activity regularizer can be applied to the same
module in either order.

For each regularized module, a forward hook (:class:`_OutputHook`, kept in the module's own hook dict)
runs after every call of its forward. When grad mode is on and the output requires grad, it asks the
rule for the compact record its gradient needs (``rule._save(out)``: the sign as ``int8`` for L1, a
copy of the values for L2) and registers a tensor hook (:class:`_TermHook`) on that output. At
backward, the tensor hook receives the gradient w.r.t. the output *as the forward produced it* (also
when the output was changed in place afterwards: a tensor hook registered before an in-place op
receives the gradient of the pre-modification version) and returns it plus the term, so the term flows
through the rest of the graph exactly as the gradient of a loss term would (and is averaged by
DistributedDataParallel as the loss is).

* The record is dropped as soon as the term was added (the first backward that reaches the output), or
  with the graph when no backward ever reaches it: nothing outlives the graph.
* A forward under ``no_grad`` / ``inference_mode``, or whose output does not require grad, registers
  nothing and keeps nothing.
* The accumulation factor (``1 / accumulation_steps``) and the grad scaler's scale (a device tensor,
  never read on the host) are read when the term is added, as :func:`torchreg.configure` declared them.
* After :func:`torchreg.remove_regularization`, terms of outputs computed before the removal are not
  added either.

What the term is (``rule._save``, ``rule._term``) is the rules' business (``activity.py``).
"""

from __future__ import annotations

import copy
from typing import Any, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from . import _registry

__all__ = ["ATTR", "NOTE", "ActivityEntry", "ActivityUnit", "activity_units_in", "attach", "check_free",
           "summary_records"]

#: The kind of unit this module makes, and the attribute set on the module it was applied to.
KIND = "activity"
ATTR = _registry.register_kind(KIND, "_torchreg_activity")

#: The summary note of a module whose outputs are regularized (how ``report.Summary`` tells its rows).
NOTE = "activity: each call's output; not in penalty()"


class ActivityEntry(NamedTuple):
    """One regularized module: its qualified name under the unit's root, the module, the rule, and why."""

    name: str
    module: nn.Module
    rule: Any  # an activity regularizer (activity.ActivityL1 / ActivityL2)
    origin: str = ""  # which rule matched, for the summary


def batch_size(module: nn.Module, out: Tensor) -> int:
    """What a Keras user calls the batch size of ``out``: its first dimension, except for modules with
    ``batch_first=False`` (RNN, LSTM, GRU, MultiheadAttention, Transformer layers), whose batched
    output is ``(time, batch, ...)``: there the second (1 for an unbatched, 2-D output)."""
    if getattr(module, "batch_first", None) is False:
        return out.shape[1] if out.dim() >= 3 else 1
    return out.shape[0] if out.dim() >= 1 else 1


def pick_output(module: nn.Module, output: Any) -> Tuple[Optional[Tensor], int]:
    """The tensor to penalize in a module's output and its batch size.

    A tuple or list gives its first element (LSTM's ``(out, (h, c))`` gives ``out``); a
    ``PackedSequence`` its ``data``, with the batch size its first ``batch_sizes``.
    """
    while isinstance(output, (tuple, list)) and not isinstance(output, PackedSequence):
        if not output:
            return None, 0
        output = output[0]
    if isinstance(output, PackedSequence):
        return output.data, int(output.batch_sizes[0]) if len(output.batch_sizes) else 0
    if isinstance(output, Tensor):
        return output, batch_size(module, output)
    raise TypeError(
        f"torchreg activity regularization on {type(module).__name__}: its forward returned "
        f"{type(output).__name__}; a tensor, a PackedSequence, or a tuple/list whose first element is one "
        "is needed (the first element is penalized)"
    )


class _TermHook:
    """Tensor hook on one call's output: returns ``grad + term`` once, then forgets the record."""

    __slots__ = ("unit", "rule", "saved", "coef")

    def __init__(self, unit: "ActivityUnit", rule: Any, saved: Tensor, coef: float) -> None:
        self.unit = unit
        self.rule = rule
        self.saved: Optional[Tensor] = saved
        self.coef = coef

    def __call__(self, grad: Tensor) -> Optional[Tensor]:
        saved, self.saved = self.saved, None  # the first backward that reaches the output adds the term
        return None if saved is None else self._plus_term(grad, saved)

    def _plus_term(self, grad: Tensor, saved: Tensor) -> Optional[Tensor]:
        """``grad`` plus the term of the output recorded as ``saved`` (None once the unit is removed)."""
        unit = self.unit
        if not unit.installed:
            return None
        return self.rule._term(grad, saved, self.coef / unit.accumulation_steps, unit._scale_for(grad.device))


class _TracedTermHook(_TermHook):
    """The tensor hook registered from a forward traced by ``torch.compile``: Dynamo traces a tensor
    hook's body and graph-breaks on a side effect, so this one changes no state: its record lives as
    long as the graph (a second backward through a retained graph adds the term again)."""

    __slots__ = ()

    def __call__(self, grad: Tensor) -> Optional[Tensor]:
        return self._plus_term(grad, self.saved)


class _OutputHook:
    """Forward hook of one regularized module: registers a :class:`_TermHook` on each call's output."""

    def __init__(self, unit: "ActivityUnit", index: int) -> None:
        self.unit = unit
        self.index = index

    def __call__(self, module: nn.Module, args: Any, output: Any) -> Any:
        if not torch.is_grad_enabled():
            return None
        out, batch = pick_output(module, output)
        if out is None or not out.requires_grad or batch == 0:
            return None
        rule = self.unit.entries[self.index].rule
        if rule.is_zero:
            return None
        replaced = None
        if out is output and out.is_leaf:
            # A leaf returned as is (nn.Identity, Dropout in eval, fed a tensor that requires grad): a hook
            # on it would stay on that tensor for good; return a view of it instead and hook the view.
            out = replaced = out.view_as(out)
        hook = _TracedTermHook if torch.compiler.is_compiling() else _TermHook
        out.register_hook(hook(self.unit, rule, rule._save(out), rule.lam / batch))
        return replaced


class ActivityUnit:
    """The activity regularization applied by one call, on the module ``root`` it was applied to."""

    def __init__(self, root: nn.Module, entries: Sequence[ActivityEntry]) -> None:
        self.root = root
        self.entries: List[ActivityEntry] = list(entries)
        self.accumulation_steps = 1
        self.grad_scaler: Any = None
        self.installed = False

    def __getstate__(self) -> Dict[str, Any]:
        state = dict(self.__dict__)
        state["grad_scaler"] = None  # as the weight engine: a pickled model is reconfigured with its scaler
        return state

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.__dict__.update(state)
        if self.installed:
            _registry.claim(self, KIND, [entry.module for entry in self.entries])

    def __deepcopy__(self, memo: Dict[int, Any]) -> "ActivityUnit":
        new = ActivityUnit.__new__(ActivityUnit)
        memo[id(self)] = new
        state = {k: v for k, v in self.__dict__.items() if k != "grad_scaler"}
        new.__setstate__(copy.deepcopy(state, memo))
        new.grad_scaler = self.grad_scaler  # a copy trains with the same scaler
        return new

    def install(self) -> None:
        try:
            for i, entry in enumerate(self.entries):
                entry.module.register_forward_hook(_OutputHook(self, i))
            setattr(self.root, ATTR, self)
            _registry.claim(self, KIND, [entry.module for entry in self.entries])
            self.installed = True
        except BaseException:
            self.uninstall()
            raise

    def uninstall(self) -> None:
        self.installed = False
        _registry.release(self, KIND, [entry.module for entry in self.entries])
        for entry in self.entries:
            hooks = entry.module._forward_hooks
            for key in [k for k, h in hooks.items() if isinstance(h, _OutputHook) and h.unit is self]:
                del hooks[key]
                for extra in ("_forward_hooks_with_kwargs", "_forward_hooks_always_called"):
                    getattr(entry.module, extra, {}).pop(key, None)
        if self.root.__dict__.get(ATTR) is self:
            delattr(self.root, ATTR)

    def _scale_for(self, device: torch.device) -> Optional[Tensor]:
        scaler = self.grad_scaler
        if scaler is None or not scaler.is_enabled() or scaler._scale is None:
            return None
        scale = scaler._scale
        return scale if scale.device == device else scale.to(device, non_blocking=True)


def activity_units_in(module: nn.Module) -> Iterator[ActivityUnit]:
    """Every activity unit applied to ``module`` or to one of its submodules, in ``modules()`` order."""
    return _registry.units_in(module, KIND)


def check_free(root: nn.Module, entries: Sequence[ActivityEntry]) -> None:
    """Raise ``ValueError`` (changing nothing) if attaching ``entries`` on ``root`` would double up."""
    existing = root.__dict__.get(ATTR)
    if existing is not None:
        raise ValueError(
            f"{type(root).__name__} already has torchreg activity regularization "
            f"({', '.join(sorted({repr(e.rule) for e in existing.entries}))}); "
            "call torchreg.remove_regularization(module) first"
        )
    for entry in entries:
        unit = _registry.owner_of(entry.module, KIND)
        if unit is not None:
            other = next(e.rule for e in unit.entries if e.module is entry.module)
            where = entry.name or type(entry.module).__name__
            raise ValueError(
                f"the output of {where!r} is already regularized by torchreg ({other!r}); a module's output "
                "can have one activity regularizer: remove that regularization first, or exclude the module "
                "with a None rule"
            )


def attach(root: nn.Module, entries: Sequence[ActivityEntry]) -> nn.Module:
    """Make and install an activity unit on ``root``; raise before changing anything if it would double up."""
    check_free(root, entries)
    ActivityUnit(root, entries).install()
    return root


def summary_records(module: nn.Module) -> List[Dict[str, Any]]:
    """Summary rows (``report.Summary``'s keys) for the activity regularization in ``module``."""
    prefixes = {id(m): name for name, m in module.named_modules()}
    records = []
    for unit in activity_units_in(module):
        base = prefixes.get(id(unit.root), "")
        for entry in unit.entries:
            records.append(dict(
                module=".".join(p for p in (base, entry.name) if p), type=type(entry.module).__name__,
                rule=entry.origin or "-", regularizer=repr(entry.rule), parameters=[], numel=0, penalty=None,
                note=NOTE,
            ))
    return records
