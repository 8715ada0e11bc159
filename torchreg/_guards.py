"""Guards: the warnings torchreg gives when a training loop does something it was not told about.

* :class:`StepCounter` counts optimizer steps (one global ``torch.optim`` step post-hook) and, at the
  first steps after a unit is installed, runs the unit's one-time checks: parameters replaced since
  install (``_tracking``) and a ``GradScaler`` that drives the step but was not declared.
* :class:`AccumulationGuard` counts a unit's backward passes between optimizer steps and warns once
  when there are more than ``accumulation_steps`` declared (each added the full penalty gradient).
* :func:`check_weight_decay`: at the first step of an optimizer over a unit's parameters, an L2
  penalty toward zero on a parameter whose param group also has ``weight_decay > 0`` decays it twice.

Each warning says what to do in the framework that runs the loop (:func:`advice`: Lightning, the
Hugging Face Trainer, Accelerate, or plain PyTorch), found from the modules on the Python stack.
"""

from __future__ import annotations

import warnings
import weakref
from typing import Any, Optional, Tuple

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from . import _torch_private as private

__all__ = ["AccumulationGuard", "StepCounter", "advice", "check_scaler", "check_weight_decay"]


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
                    check_weight_decay(unit, optimizer)
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
            "scale (the penalty is almost lost). " + advice("grad_scaler=scaler"),
            UserWarning,
            stacklevel=5,
        )


def check_weight_decay(unit: Any, optimizer: Any) -> None:
    """At the first optimizer step over the unit's parameters: an L2 penalty toward zero (``L2``, or
    ``ElasticNet``'s ``l2``) on a parameter that the optimizer also decays (``weight_decay > 0`` in its
    param group) shrinks it twice, silently."""
    covered = {id(e.param): e for e in unit.entries if e.rule._decays_to_zero() > 0}
    twice = [(covered[id(p)].name, group["weight_decay"]) for group in optimizer.param_groups
             if group.get("weight_decay", 0) for p in group["params"] if id(p) in covered]
    if twice:
        names = ", ".join(name for name, _ in twice[:5]) + (", ..." if len(twice) > 5 else "")
        warnings.warn(
            f"torchreg: {len(twice)} parameter(s) of {type(unit.root).__name__} ({names}) have an L2 penalty from "
            f"torchreg and weight_decay={twice[0][1]!r} in {type(optimizer).__name__}'s param group: they are "
            "decayed twice. Keep one: weight_decay=0 for them (torchreg.param_groups(model, 0.0) builds the "
            "groups), or no torchreg L2 rule. With the Hugging Face Trainer, TrainingArguments(weight_decay=...) "
            "is that optimizer weight decay (set it to 0.0 with torchreg.hf.attach L2 rules).",
            UserWarning,
            stacklevel=5,
        )


#: (module name prefix on the stack, what to do there), first match wins; %s is the setting to declare.
_FRAMEWORKS = (
    (("lightning.pytorch", "pytorch_lightning"),
     "In Lightning, add torchreg.lightning.Regularization() to Trainer(callbacks=[...]): it declares the "
     "Trainer's accumulate_grad_batches and its 16-mixed GradScaler before every backward (with manual "
     "optimization, call torchreg.configure(self, %s) in the LightningModule)."),
    (("transformers.trainer",),
     "With the Hugging Face Trainer, call torchreg.hf.attach(trainer) (with your rules, or after "
     "regularizing the model) before trainer.train(): it declares the Trainer's gradient accumulation "
     "steps and its GradScaler."),
    (("accelerate.",),
     "With Accelerate, call torchreg.configure(model, %s) once before training, with "
     "accumulation_steps=accelerator.gradient_accumulation_steps and grad_scaler=accelerator.scaler."),
)


def advice(setting: str) -> str:
    """What to do about an undeclared ``setting`` in the framework running this training loop."""
    for frame in private.frames_from(private.frame(1)):
        name = frame.f_globals.get("__name__", "")
        for prefixes, text in _FRAMEWORKS:
            if name.startswith(prefixes):
                return text.replace("%s", setting)
    return f"Declare it once before training: torchreg.configure(model, {setting})."


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
                "full penalty gradient. " + advice("accumulation_steps=k"),
                UserWarning,
                stacklevel=2,
            )
