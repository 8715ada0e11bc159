"""Lightning integration: :class:`Regularization`, a callback that tells torchreg what the trainer knows.

Import it explicitly (``import torchreg.lightning``); ``import torchreg`` does not import Lightning.
It works with the ``lightning`` package (``lightning.pytorch``) and, when only that is installed,
with ``pytorch_lightning``; the callback is a ``lightning.pytorch.Callback`` if ``lightning`` is
importable, otherwise a ``pytorch_lightning.Callback``. Lightning calls callbacks by hook name, so
one given in a list (``callbacks=[...]``) works with either package's ``Trainer``.
"""

from __future__ import annotations

import weakref
from typing import Any, Mapping, Optional

import torch

from . import _metrics
from ._registry import is_regularized
from ._validate import check_flags, check_rules_mapping
from .training import configure
from .walker import _compile_rules, apply_regularization

try:
    import lightning.pytorch as _pl
except ImportError:  # pragma: no cover - depends on what is installed
    try:
        import pytorch_lightning as _pl
    except ImportError as error:
        raise ImportError(
            "torchreg.lightning needs Lightning: python3 -m pip install lightning "
            "(or the 'integrations' extra of torchreg)"
        ) from error

__all__ = ["Regularization"]


def _scaler_of(trainer: Any) -> Optional[torch.amp.GradScaler]:
    """The GradScaler of the trainer's precision plugin (``"16-mixed"``), or None."""
    scaler = getattr(getattr(trainer, "precision_plugin", None), "scaler", None)
    return scaler if isinstance(scaler, torch.amp.GradScaler) else None


def _logs_now(trainer: Any) -> bool:
    """Whether Lightning writes this training batch's step metrics to its loggers (called from
    ``on_train_batch_end``): not inside an accumulation window, and at a ``log_every_n_steps`` step.
    Lightning's own test, ``trainer._logger_connector.should_update_logs`` and
    ``trainer.fit_loop._should_accumulate()`` (checked with lightning 2.6; if they are missing, every
    ``log_every_n_steps``-th optimizer step, ``trainer.global_step`` counting the step just made)."""
    fit_loop = getattr(trainer, "fit_loop", None)
    accumulate = getattr(fit_loop, "_should_accumulate", None)
    if callable(accumulate) and accumulate():
        return False
    connector = getattr(trainer, "_logger_connector", None)
    should = getattr(connector, "should_update_logs", None)
    if isinstance(should, bool):
        return should or bool(getattr(trainer, "fast_dev_run", False))
    every = getattr(trainer, "log_every_n_steps", 50)  # pragma: no cover - other Lightning versions
    return bool(every) and trainer.global_step % every == 0  # pragma: no cover


class Regularization(_pl.Callback):
    """Applies torchreg rules at setup, declares accumulation and the grad scaler to torchreg, and logs
    the penalty.

    Lightning divides each training-step loss by ``trainer.accumulate_grad_batches`` and, with
    ``precision="16-mixed"``, scales it with ``trainer.precision_plugin.scaler`` before backward.
    This callback passes both to :func:`torchreg.configure` before the first backward, and again
    whenever they change (a ``GradientAccumulationScheduler``, a plugin replaced between fits), so
    the gradient of every regularized parameter is that of ``loss + penalty``: exact with
    accumulation, gradient clipping, bf16 and fp16 mixed precision, and the ``ddp`` /
    ``ddp_spawn`` strategies.

    With manual optimization (``automatic_optimization = False``) Lightning does not divide the
    loss, so the callback declares only the scaler; declare your own accumulation with
    :func:`torchreg.configure`.

    **Logging** (``logging=True``, the default): at the trainer's logging steps (every
    ``log_every_n_steps`` optimizer steps, what its loggers record; nothing when it has no logger) it
    logs through ``pl_module.log``: ``reg_penalty`` (the total penalty, as :func:`torchreg.penalty`),
    and when proximal or group rules are present ``reg_zero_fraction`` (exact zeros among their
    parameters) and ``reg_zero_group_fraction`` (zero groups of ``GroupLasso`` rules). With
    ``log_per_rule=True`` also ``reg_penalty/L1``, ``reg_zero_fraction/GroupLasso``, ... per rule (a
    rule is named by its class, ``L1_2`` for a second ``L1`` rule). The values are computed on the
    device at those steps only and read with one host synchronization per log; other steps cost
    nothing.

    Args:
        rules: a rules mapping for :func:`torchreg.apply_regularization`, applied to the
            LightningModule at ``setup`` (before the strategy wraps it in DDP), once per module; or
            ``None`` (default) when the module regularizes itself (``torchreg.L1(layer, ...)`` in
            ``__init__``) and the callback only declares. A model built in ``configure_model`` does
            not exist at ``setup``: regularize it there yourself and pass no rules. Rules from a YAML
            or JSON file (a list of ``{match: ..., regularizer: ...}``) become a mapping with
            :func:`torchreg.rules_from_config`.
        strict: passed to :func:`torchreg.apply_regularization`.
        logging: log the penalty and sparsity at the trainer's logging steps (keyword only).
        log_per_rule: also log them per rule (keyword only).

    Raises:
        TypeError: ``rules`` is not a valid rules mapping (at construction), e.g. a list of rules
            from a config file that was not passed through :func:`torchreg.rules_from_config`.
        ValueError: at the start of training, nothing in the LightningModule is regularized.

    Example::

        >>> import lightning.pytorch as L, torchreg, torchreg.lightning
        >>> from torch import nn
        >>> callback = torchreg.lightning.Regularization({nn.Linear: torchreg.L2(lam=1e-4)})
        >>> callback
        torchreg.lightning.Regularization(rules={<class 'torch.nn.modules.linear.Linear'>: L2(lam=0.0001)}, strict=False, logging=True, log_per_rule=False)
        >>> trainer = L.Trainer(callbacks=[callback], accumulate_grad_batches=4, logger=False,
        ...                     enable_progress_bar=False, enable_model_summary=False)
    """

    def __init__(self, rules: Optional[Mapping[Any, Any]] = None, *, strict: bool = False, logging: bool = True,
                 log_per_rule: bool = False) -> None:
        check_flags("torchreg.lightning.Regularization", strict=strict, logging=logging, log_per_rule=log_per_rule)
        if rules is not None:
            check_rules_mapping("torchreg.lightning.Regularization", rules)
            _compile_rules(rules)  # raises TypeError now, not at setup
        self.rules = rules
        self.strict = strict
        self.logging = logging
        self.log_per_rule = log_per_rule
        self._applied_to: Any = None  # weakref to the module the rules were applied to
        self._declared: Any = None  # (module id, accumulation, scaler id) last passed to configure

    def __repr__(self) -> str:
        return (f"torchreg.lightning.Regularization(rules={self.rules!r}, strict={self.strict}, logging={self.logging}, "
                f"log_per_rule={self.log_per_rule})")

    def __getstate__(self) -> dict:  # ddp_spawn pickles callbacks; weak references do not pickle
        state = self.__dict__.copy()
        state["_applied_to"] = None
        state["_declared"] = None
        return state

    # -- hooks ---------------------------------------------------------------------------------
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if self.rules is None or stage != "fit":
            return
        if self._applied_to is not None and self._applied_to() is pl_module:
            return  # fit called again on the same module
        apply_regularization(pl_module, self.rules, strict=self.strict)
        self._applied_to = weakref.ref(pl_module)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        if not is_regularized(pl_module):
            raise ValueError(
                f"torchreg.lightning.Regularization: nothing in {type(pl_module).__name__} is regularized "
                "by torchreg; pass rules=... to the callback or regularize layers in the module's __init__"
            )
        self._declared = None  # always declare at the start of a fit
        self._declare(trainer, pl_module)

    def on_before_backward(self, trainer: Any, pl_module: Any, loss: Any) -> None:
        self._declare(trainer, pl_module)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.logging and trainer.loggers and _logs_now(trainer):
            for key, value in _metrics.values(pl_module, self.log_per_rule).items():
                pl_module.log(key, value, on_step=True, on_epoch=False, prog_bar=False, logger=True)

    def _declare(self, trainer: Any, pl_module: Any) -> None:
        automatic = getattr(pl_module, "automatic_optimization", True)
        steps = int(trainer.accumulate_grad_batches) if automatic else None
        scaler = _scaler_of(trainer)
        key = (id(pl_module), steps, id(scaler))
        if key == self._declared:
            return
        if steps is None:
            configure(pl_module, grad_scaler=scaler)
        else:
            configure(pl_module, accumulation_steps=steps, grad_scaler=scaler)
        self._declared = key
