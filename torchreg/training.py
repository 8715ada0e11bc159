"""Telling torchreg about the training loop: :func:`configure`."""

from __future__ import annotations

from typing import Any, TypeVar

import torch
from torch import nn

from . import _guards, _registry
from ._validate import check_module, check_positive_int

__all__ = ["configure"]

M = TypeVar("M", bound=nn.Module)
class _Unchanged:
    """The default of :func:`configure`'s settings: keep the current value."""

    def __repr__(self) -> str:
        return "unchanged"


_KEEP: Any = _Unchanged()


def configure(model: M, *, accumulation_steps: int = _KEEP, grad_scaler: Any = _KEEP) -> M:
    """Declare how ``model`` is trained, once, before training; returns ``model``.

    Args:
        accumulation_steps: ``k`` when each optimizer step follows ``k`` backward passes of
            ``loss_i / k`` (gradient accumulation). Each backward then adds ``1/k`` of the penalty
            gradient, so the accumulated gradient equals the full-batch ``loss + penalty`` one.
            Default 1. When more backwards than declared run between two optimizer steps, torchreg
            warns once: each of them added the full penalty gradient.
        grad_scaler: the ``torch.amp.GradScaler`` whose ``scaler.scale(loss).backward()`` drives the
            backward passes (``None`` to forget it). The penalty gradient is then multiplied by the
            scaler's current scale, read as a device tensor (no host synchronization), so that after
            ``scaler.unscale_(optimizer)`` (or inside a fused optimizer) the gradients equal the
            unscaled reference.

    Omitted arguments keep their current value. The settings apply to every regularization already
    applied in ``model`` (call it after applying them), activity regularization (``ActivityL1``,
    ``ActivityL2``: each call's term times ``1/k`` and the scale) included, and take effect from the
    next backward.

    Raises:
        TypeError: ``model`` is not a module, ``accumulation_steps`` no int, ``grad_scaler`` no GradScaler.
        ValueError: ``accumulation_steps < 1``, or nothing in ``model`` is regularized (also when
            ``model`` is part of a model regularized as a whole: configure that model).

    Example::

        >>> import torch, torchreg
        >>> model = torchreg.L2(torch.nn.Linear(4, 1), lam=1e-3)
        >>> scaler = torch.amp.GradScaler("cpu")
        >>> torchreg.configure(model, accumulation_steps=4, grad_scaler=scaler) is model
        True
    """
    check_module(model, "configure")
    if accumulation_steps is not _KEEP:
        accumulation_steps = check_positive_int(accumulation_steps, "accumulation_steps")
    if grad_scaler is not _KEEP and grad_scaler is not None and not isinstance(grad_scaler, torch.amp.GradScaler):
        raise TypeError(
            f"grad_scaler must be a torch.amp.GradScaler or None, got {grad_scaler!r} "
            f"({type(grad_scaler).__name__})"
        )
    units = list(_registry.units_in(model))
    if not units:
        enclosing = _registry.enclosing_unit(model)
        if enclosing is not None:
            raise ValueError(
                f"{type(model).__name__} is regularized as part of an enclosing {type(enclosing.root).__name__}, "
                "the module torchreg was applied to; settings are per regularization call: call "
                f"torchreg.configure on that {type(enclosing.root).__name__} instead"
            )
        raise ValueError(
            f"nothing in {type(model).__name__} is regularized by torchreg; apply regularization first"
        )
    _guards.StepCounter.ensure()
    for unit in units:
        if not hasattr(unit, "accumulation_steps"):  # (a kind that adds no gradient term)
            continue
        if accumulation_steps is not _KEEP:
            unit.accumulation_steps = accumulation_steps
        if grad_scaler is not _KEEP:
            unit.grad_scaler = grad_scaler
    return model
