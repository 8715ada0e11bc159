"""Hugging Face ``transformers.Trainer`` integration: :func:`attach`.

Import it explicitly (``import torchreg.hf``); ``import torchreg`` does not import transformers.

A ``TrainerCallback`` is handed the training arguments, the model and the optimizer, but not the
trainer: not ``trainer.current_gradient_accumulation_steps`` (the number of micro-batches in the
current optimizer step, fewer than ``gradient_accumulation_steps`` in an epoch's last step when the
batches do not divide evenly) nor ``trainer.accelerator.scaler`` (the GradScaler of fp16 training).
So the one step is ``torchreg.hf.attach(trainer, rules)`` after building the trainer: it applies the
rules and adds a callback that reads both from the trainer before each optimizer step's first
backward.

A callback cannot add to the Trainer's logs either: ``Trainer.log`` appends a copy of ``logs`` to
``state.log_history`` before ``on_log`` runs, and the ``report_to`` integrations are callbacks that
may run before ours. So :func:`attach` also wraps ``trainer.log`` on that trainer object (no
subclass): at the Trainer's logging steps it adds torchreg's keys to ``logs`` before the Trainer
records them.
"""

from __future__ import annotations

import weakref
from typing import Any, Dict, Mapping, Optional, Tuple

import torch
from torch import nn

from . import _metrics
from ._registry import is_regularized
from ._validate import check_flags, check_rules_mapping
from .training import configure
from .walker import _compile_rules, apply_regularization

try:
    import transformers
    from transformers.pytorch_utils import Conv1D
except ImportError as error:  # pragma: no cover - depends on what is installed
    raise ImportError(
        "torchreg.hf needs transformers: python3 -m pip install transformers accelerate "
        "(or the 'integrations' extra of torchreg)"
    ) from error

__all__ = ["LINEAR_LAYERS", "RegularizationCallback", "attach"]

#: ``nn.Linear`` and transformers' ``Conv1D`` (GPT-2's projections, a linear layer whose weight is
#: stored transposed, ``(in, out)``), as a rule key: ``{torchreg.hf.LINEAR_LAYERS: torchreg.L2(...)}``.
LINEAR_LAYERS: Tuple[type, ...] = (nn.Linear, Conv1D)


def _scaler_of(trainer: Any, optimizer: Any = None) -> Optional[torch.amp.GradScaler]:
    """The GradScaler fp16 training scales the loss with, or None (fp32, bf16)."""
    for owner in (getattr(trainer, "accelerator", None), optimizer, getattr(trainer, "optimizer", None)):
        scaler = getattr(owner, "scaler", None)  # Accelerator.scaler; AcceleratedOptimizer.scaler
        if isinstance(scaler, torch.amp.GradScaler):
            return scaler
    return None


class RegularizationCallback(transformers.TrainerCallback):
    """The callback :func:`attach` adds; declares accumulation and the scaler to torchreg, and logs.

    At the start of training and of each optimizer step it passes the trainer's
    ``current_gradient_accumulation_steps`` (``args.gradient_accumulation_steps`` before the first
    step) and the accelerator's GradScaler to :func:`torchreg.configure`, when they changed. It keeps
    only a weak reference to the trainer.

    With ``logging=True`` the Trainer's training logs (every ``logging_steps``, as ``args`` say) get
    ``reg_penalty``, and with proximal or group rules ``reg_zero_fraction`` and
    ``reg_zero_group_fraction`` (``log_per_rule=True``: also per rule, ``reg_penalty/L1``, ...), the
    same keys as ``torchreg.lightning.Regularization``: in ``trainer.state.log_history`` and in every
    ``report_to`` integration. They are computed at those steps only, read with one host
    synchronization per log.
    """

    def __init__(self, trainer: Any, rules: Optional[Mapping[Any, Any]] = None, *, strict: bool = False,
                 logging: bool = True, log_per_rule: bool = False) -> None:
        self._trainer = weakref.ref(trainer)
        self._declared: Any = None
        self.rules = rules
        self.strict = strict
        self.logging = logging
        self.log_per_rule = log_per_rule

    def __repr__(self) -> str:
        return (f"torchreg.hf.RegularizationCallback(rules={self.rules!r}, strict={self.strict}, logging={self.logging}, "
                f"log_per_rule={self.log_per_rule})")

    def _declare(self, args: Any, model: Any, optimizer: Any) -> None:
        trainer = self._trainer()
        if trainer is None:  # pragma: no cover - the trainer is alive while it calls us
            return
        model = trainer.model if model is None else model
        steps = getattr(trainer, "current_gradient_accumulation_steps", None) or args.gradient_accumulation_steps
        scaler = _scaler_of(trainer, optimizer)
        key = (id(model), int(steps), id(scaler))
        if key != self._declared:
            configure(model, accumulation_steps=int(steps), grad_scaler=scaler)
            self._declared = key

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None,
                       **kwargs: Any) -> None:
        self._declared = None
        model = self._trainer().model if model is None else model
        if not is_regularized(model):
            raise ValueError(f"torchreg.hf: nothing in {type(model).__name__} is regularized by torchreg")
        self._declare(args, model, optimizer)

    def on_step_begin(self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None,
                      **kwargs: Any) -> None:
        self._declare(args, model, optimizer)


class _Log:
    """``trainer.log`` on a trainer :func:`attach` was called on: adds the active callbacks' values to a
    training log (``trainer.control.should_log`` is set while the Trainer logs a training step, and
    cleared by its ``on_log``: evaluation and end-of-training logs get nothing), then logs as before."""

    def __init__(self, trainer: Any) -> None:
        self._trainer = weakref.ref(trainer)
        original = trainer.log
        # the class's method is kept unbound, so that the trainer does not refer to itself through us
        self._method = original.__func__ if getattr(original, "__self__", None) is trainer else None
        self._other = None if self._method is not None else original

    def __call__(self, logs: Dict[str, float], *args: Any, **kwargs: Any) -> Any:
        trainer = self._trainer()
        if trainer is not None and getattr(trainer.control, "should_log", False):
            callback = next((c for c in trainer.callback_handler.callbacks
                             if isinstance(c, RegularizationCallback) and c.logging), None)
            if callback is not None:
                logs.update(_metrics.values(trainer.model, callback.log_per_rule))
        if self._method is not None:
            return self._method(trainer, logs, *args, **kwargs)
        return self._other(logs, *args, **kwargs)


def attach(trainer: Any, rules: Optional[Mapping[Any, Any]] = None, *, strict: bool = False, logging: bool = True,
           log_per_rule: bool = False) -> RegularizationCallback:
    """Regularize ``trainer.model`` by ``rules`` and keep torchreg in step with the trainer.

    Call it once, after building the ``transformers.Trainer`` and before ``trainer.train()``. With
    ``rules`` it applies them to ``trainer.model`` (:func:`torchreg.apply_regularization`); with
    ``rules=None`` the model must already be regularized. It then adds a
    :class:`RegularizationCallback` that declares, before the first backward of every optimizer
    step, how many backward passes that step accumulates (the Trainer divides each loss by it, or
    normalizes by the token count of the whole step) and the accelerator's GradScaler (fp16), so the
    gradients equal those of ``loss + penalty`` with accumulation, ``max_grad_norm`` clipping, bf16
    and fp16.

    At the Trainer's logging steps (``logging_steps``) the training logs get ``reg_penalty`` (the
    total penalty) and, with proximal or group rules, ``reg_zero_fraction`` and
    ``reg_zero_group_fraction``: in ``trainer.state.log_history`` and every ``report_to`` integration
    (see :class:`RegularizationCallback`). ``trainer.log`` is wrapped on this trainer object for that.

    GPT-2 and other models built on transformers' ``Conv1D``: ``nn.Linear`` rules do not match it (it
    is no subclass); use :data:`LINEAR_LAYERS` as the key, or the default selection (``params=None``
    selects a ``Conv1D``'s ``weight`` as any layer's).

    Args:
        trainer: a ``transformers.Trainer`` (or subclass).
        rules: an :func:`torchreg.apply_regularization` rules mapping, or ``None``.
        strict: passed to :func:`torchreg.apply_regularization`.
        logging: add the penalty and sparsity to the Trainer's training logs (keyword only).
        log_per_rule: also per rule (keyword only).

    Returns:
        The callback added to ``trainer`` (``trainer.remove_callback(callback)`` takes it off).

    Raises:
        TypeError: ``trainer`` is not a ``transformers.Trainer``, or ``rules`` is not a valid mapping.
        ValueError: ``rules`` is ``None`` and nothing in the model is regularized, or the model is
            regularized already and ``rules`` are given. Nothing is changed when it raises.

    Example::

        >>> import tempfile, torchreg, torchreg.hf
        >>> from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments
        >>> model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64))
        >>> args = TrainingArguments(tempfile.mkdtemp(), gradient_accumulation_steps=4, max_grad_norm=1.0,
        ...                          use_cpu=True, report_to=[])
        >>> trainer = Trainer(model=model, args=args)
        >>> callback = torchreg.hf.attach(trainer, {torchreg.hf.LINEAR_LAYERS: torchreg.L2(lam=1e-4)})
    """
    if not isinstance(trainer, transformers.Trainer):
        raise TypeError(f"attach expects a transformers.Trainer, got {trainer!r} ({type(trainer).__name__})")
    check_flags("torchreg.hf.attach", strict=strict, logging=logging, log_per_rule=log_per_rule)
    if rules is not None:
        check_rules_mapping("torchreg.hf.attach", rules)
    model = trainer.model
    if rules is None:
        if not is_regularized(model):
            raise ValueError(
                f"torchreg.hf.attach: nothing in {type(model).__name__} is regularized by torchreg; pass "
                "rules=... or regularize the model before"
            )
    else:
        _compile_rules(rules)
        apply_regularization(model, rules, strict=strict)
    callback = RegularizationCallback(trainer, rules, strict=strict, logging=logging, log_per_rule=log_per_rule)
    trainer.add_callback(callback)
    if not isinstance(trainer.__dict__.get("log"), _Log):
        trainer.log = _Log(trainer)
    return callback
