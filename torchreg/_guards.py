"""Guards: the warnings torchreg gives when a training loop does something it was not told about.

* :class:`StepCounter` counts optimizer steps (one global ``torch.optim`` step post-hook) and, at the
  first steps after a unit is installed, runs the unit's one-time checks: parameters replaced since
  install (``_tracking``) and a ``GradScaler`` that drives the step but was not declared.
* :class:`AccumulationGuard` counts a unit's backward passes between optimizer steps and warns once
  when there are more than ``accumulation_steps`` declared (each added the full penalty gradient).
"""

from __future__ import annotations

import warnings
import weakref
from typing import Any, Optional, Tuple

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from . import _torch_private as private

__all__ = ["AccumulationGuard", "StepCounter", "check_scaler"]


class StepCounter:
    """Counts optimizer steps. At the first step after a unit is installed it asks the unit to check
    that its parameters are still the model's (``unit._check_replaced()``); at the first step of an
    optimizer holding the unit's parameters, that a grad scaler driving the step was declared
    (:func:`check_scaler`; looked for during the first ``SCALER_CHECK_STEPS`` optimizer steps after
    install, so that a copy that is never stepped, an EMA, costs nothing later)."""

    count = 0
    registered = False
    unchecked: "weakref.WeakSet[Any]" = weakref.WeakSet()
    #: unit -> how many more optimizer steps may come before giving up (a copy never trained, an EMA)
    scaler_unchecked: "weakref.WeakKeyDictionary[Any, int]" = weakref.WeakKeyDictionary()
    SCALER_CHECK_STEPS = 100

    @classmethod
    def ensure(cls) -> None:
        if not cls.registered:
            register_optimizer_step_post_hook(cls._on_step)
            cls.registered = True

    @classmethod
    def watch(cls, unit: Any) -> None:
        """Run ``unit``'s one-time checks at the coming optimizer steps."""
        cls.ensure()
        cls.unchecked.add(unit)
        cls.scaler_unchecked[unit] = cls.SCALER_CHECK_STEPS

    @classmethod
    def forget(cls, unit: Any) -> None:
        cls.unchecked.discard(unit)
        cls.scaler_unchecked.pop(unit, None)

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
                    check_scaler(unit, scaler)
                elif left <= 1:
                    del cls.scaler_unchecked[unit]
                else:
                    cls.scaler_unchecked[unit] = left - 1


def _driving_scaler() -> Any:
    """The enabled ``torch.amp.GradScaler`` whose ``step()`` is running the optimizer step in progress
    (found on the Python stack: ``GradScaler.step`` calls ``optimizer.step()``), or None."""
    for frame in private.frames_from(private.frame(2)):
        if frame.f_code in private.SCALER_STEPS:
            scaler = frame.f_locals.get("self")
            return scaler if isinstance(scaler, torch.amp.GradScaler) and scaler.is_enabled() else None
    return None


def check_scaler(unit: Any, scaler: Any) -> None:
    """At the first optimizer step over the unit's parameters: a grad scaler that drives the step
    (``scaler.step(optimizer)``) but was not declared makes every term 1/scale of what it should be."""
    if scaler is not None and unit.grad_scaler is not scaler and unit.hooked:  # (proximal only: no term)
        warnings.warn(
            f"torchreg: the regularized parameters of {type(unit.root).__name__} are stepped by a "
            "torch.amp.GradScaler (scaler.step(optimizer)) that was not declared to torchreg, so the "
            "regularization gradient was not scaled with the loss and scaler.unscale_ divides it by the "
            "scale (the penalty is almost lost). Declare it once before training: "
            "torchreg.configure(model, grad_scaler=scaler).",
            UserWarning,
            stacklevel=5,
        )


class AccumulationGuard:
    """Counts a unit's backward passes between optimizer steps; warns once when there are more than
    declared. A new cycle starts at an optimizer step, or when the gradients were reset (the first
    covered gradient is no longer the tensor seen at the last backward: ``zero_grad(set_to_none=True)``)."""

    __slots__ = ("last_step", "probe", "backwards", "warned")

    def __init__(self) -> None:
        self.last_step = -1
        self.probe: Optional[Tuple[int, Any]] = None
        self.backwards = 0
        self.warned = False

    def count(self, unit: Any) -> None:
        step = StepCounter.count
        new_cycle = step != self.last_step
        if self.probe is not None and not new_cycle:
            index, ref = self.probe
            new_cycle = unit.entries[index].param.grad is not ref()  # grads were set to None
        self.last_step = step
        self.backwards = 1 if new_cycle else self.backwards + 1
        self.probe = None
        for i, entry in enumerate(unit.entries):
            if entry.param.grad is not None:
                self.probe = (i, weakref.ref(entry.param.grad))
                break
        if self.backwards > unit.accumulation_steps and not self.warned:
            self.warned = True
            warnings.warn(
                f"torchreg: {self.backwards} backward passes reached the regularized parameters of "
                f"{type(unit.root).__name__} between two optimizer steps (or without the gradients being "
                f"reset), but accumulation_steps={unit.accumulation_steps} is declared, so each added the "
                "full penalty gradient. For gradient accumulation over k micro-batches call "
                "torchreg.configure(model, accumulation_steps=k) once before training.",
                UserWarning,
                stacklevel=2,
            )
