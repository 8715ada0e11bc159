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

from ._registry import is_regularized
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


class Regularization(_pl.Callback):
    """Applies torchreg rules at setup and declares accumulation and the grad scaler to torchreg.

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

    Args:
        rules: a rules mapping for :func:`torchreg.apply_regularization`, applied to the
            LightningModule at ``setup`` (before the strategy wraps it in DDP), once per module; or
            ``None`` (default) when the module regularizes itself (``torchreg.L1(layer, ...)`` in
            ``__init__``) and the callback only declares. A model built in ``configure_model`` does
            not exist at ``setup``: regularize it there yourself and pass no rules.
        strict: passed to :func:`torchreg.apply_regularization`.

    Raises:
        TypeError: ``rules`` is not a valid rules mapping (at construction).
        ValueError: at the start of training, nothing in the LightningModule is regularized.

    Example::

        >>> import lightning.pytorch as L, torchreg, torchreg.lightning
        >>> from torch import nn
        >>> callback = torchreg.lightning.Regularization({nn.Linear: torchreg.L2(lam=1e-4)})
        >>> trainer = L.Trainer(callbacks=[callback], accumulate_grad_batches=4, logger=False,
        ...                     enable_progress_bar=False, enable_model_summary=False)
    """

    def __init__(self, rules: Optional[Mapping[Any, Any]] = None, *, strict: bool = False) -> None:
        if rules is not None:
            _compile_rules(rules)  # raises TypeError now, not at setup
        self.rules = rules
        self.strict = strict
        self._applied_to: Any = None  # weakref to the module the rules were applied to
        self._declared: Any = None  # (module id, accumulation, scaler id) last passed to configure

    def __repr__(self) -> str:
        return f"torchreg.lightning.Regularization(rules={self.rules!r}, strict={self.strict})"

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
