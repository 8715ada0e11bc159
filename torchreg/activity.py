"""What an activity regularizer is: a penalty on a module's *output*, Keras' ``activity_regularizer``.

=================  ===============================================  ==================================
regularizer        penalty of one call with output ``out``            added to ``out``'s gradient
=================  ===============================================  ==================================
``ActivityL1``     ``lam * sum(|out|) / batch``                       ``lam / batch * sign(out)``
``ActivityL2``     ``lam / 2 * sum(out ** 2) / batch``                ``lam / batch * out``
=================  ===============================================  ==================================

``batch`` is the output's first dimension, as Keras divides by it, except for modules with
``batch_first=False`` (RNN, LSTM, GRU, MultiheadAttention, Transformer layers), where it is the second
one: the batch size, not the sequence length. ``out`` is the output as the forward produced it (an
in-place change afterwards does not alter it). A tuple output (LSTM's ``(out, (h, c))``) penalizes its
first element; a ``PackedSequence`` its data, divided by its batch size. L2 keeps torchreg's ``lam / 2``
(Keras' ``l2(lam)`` penalizes ``lam * sum(out ** 2)``: use ``ActivityL2(2 * lam)``).

Each call of the module's forward adds its own term at backward, in the gradient flowing back from its
output, as ``loss + penalty`` would; when the term is added is ``_activity_engine``'s business.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Type, TypeVar, overload

import torch
from torch import Tensor, nn

from . import _activity_engine
from .regularizers import Regularizer, strength
from ._validate import check_module

__all__ = ["ActivityL1", "ActivityL2"]

M = TypeVar("M", bound=nn.Module)
R = TypeVar("R", bound="_ActivityRegularizer")


class _ActivityRegularizer(Regularizer):
    """Base of :class:`ActivityL1` and :class:`ActivityL2`: one strength ``lam``, no parameter selection.

    A subclass defines :meth:`penalty` and :meth:`_save` (the least the gradient needs from the forward's
    output); the term is ``lam / batch * saved``.
    """

    _strengths = ("lam",)
    lam = strength("lam")
    params = None  # no parameter selection: the output is penalized

    @overload
    def __new__(cls, module: M, lam: float) -> M: ...
    @overload
    def __new__(cls: Type[R], lam: float) -> R: ...
    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        return super().__new__(cls, *args, **kwargs)

    def __init__(self, lam: float) -> None:
        self.lam = lam

    def _kwargs(self) -> Dict[str, Any]:
        return {"lam": self.lam}

    # -- the maths --------------------------------------------------------------------------------
    def penalty(self, output: Tensor, batch: int = 1) -> Tensor:  # type: ignore[override]
        """The penalty of one call whose output is ``output`` (a 0-dim tensor), ``batch`` its batch size."""
        raise NotImplementedError

    def _save(self, output: Tensor) -> Tensor:
        """At forward: what the gradient will need of ``output`` (detached, never a view of it)."""
        raise NotImplementedError

    def _term(self, grad: Tensor, saved: Tensor, coef: float, scale: Optional[Tensor]) -> Tensor:
        """At backward: ``grad + coef * scale * saved``, a new tensor in ``grad``'s dtype."""
        if scale is None:
            return grad.add(saved, alpha=coef)
        return torch.addcmul(grad, saved, scale, value=coef)

    def grad_(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError(f"{type(self).__name__} penalizes outputs, not parameters")

    # -- use --------------------------------------------------------------------------------------
    def apply(self, module: M) -> M:
        """Regularize the output of every call of ``module``'s forward; in place, returns ``module``.

        Raises:
            TypeError: ``module`` is not an ``nn.Module`` instance.
            ValueError: ``module``'s output is activity-regularized already.
        """
        check_module(module, f"{type(self).__name__}.apply")
        return _activity_engine.attach(module, [_activity_engine.ActivityEntry("", module, self)])


class ActivityL1(_ActivityRegularizer):
    """L1 activity regularization: ``lam * sum(|out|) / batch`` on each call's output.

    Keras' ``activity_regularizer=regularizers.l1(lam)``. Each call of ``module``'s forward adds, at
    backward, ``lam / batch * sign(out)`` to the gradient flowing back from its output ``out`` (the
    forward's values: an in-place change of ``out`` afterwards does not alter the term), as if
    ``lam * out.abs().sum() / batch`` had been added to the loss. Between forward and backward it keeps
    ``sign(out)`` as ``int8`` (1 byte per element). See the module docstring for ``batch``.

    Args:
        module: the module whose output to regularize. Omit it to get a rule for
            :func:`torchreg.apply_regularization` (e.g. ``{nn.ReLU: torchreg.ActivityL1(lam=1e-4)}``).
        lam: strength, a finite number >= 0, read at each forward: a new value applies from the next
            forward.

    Returns:
        With ``module``: the same module object (parameters, ``state_dict`` and forward unchanged).
        Without: an ``ActivityL1`` rule.

    Raises:
        TypeError: ``module`` is not a module instance, or ``lam`` is no number.
        ValueError: ``lam`` is negative, NaN or infinite, or the module's output is activity-regularized
            already.

    Example::

        >>> import torch, torchreg
        >>> layer = torchreg.ActivityL1(torch.nn.Linear(2, 3, bias=False), lam=0.6)
        >>> with torch.no_grad():
        ...     _ = layer.weight.copy_(torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 0.0]]))
        >>> x = torch.tensor([[1.0, 0.0], [2.0, 0.0]])   # a batch of 2; outputs [[1, -1, 0], [2, -2, 0]]
        >>> layer(x).sum().backward()                    # data gradient of out: 1 everywhere
        >>> layer.weight.grad                            # x.T @ (1 + 0.6 / 2 * sign(out)), transposed
        tensor([[3.9000, 0.0000],
                [2.1000, 0.0000],
                [3.0000, 0.0000]])
        >>> torchreg.ActivityL1(1e-4)                    # a rule
        ActivityL1(lam=0.0001)
    """

    def penalty(self, output: Tensor, batch: int = 1) -> Tensor:  # type: ignore[override]
        return self.lam * output.abs().sum() / batch

    def _save(self, output: Tensor) -> Tensor:
        # int8: 1 byte per element. A 2-bit record (bit planes of out > 0 and out < 0) keeps 4x less but
        # cost 10-30x more time to pack and unpack on CPU than this (see notes): not worth it here.
        return torch.sign(output.detach()).to(torch.int8)


class ActivityL2(_ActivityRegularizer):
    """L2 activity regularization: ``lam / 2 * sum(out ** 2) / batch`` on each call's output.

    Each call of ``module``'s forward adds, at backward, ``lam / batch * out`` to the gradient flowing
    back from its output ``out`` (the forward's values), as if ``lam / 2 * out.pow(2).sum() / batch`` had
    been added to the loss. Keras' ``l2(lam)`` penalizes ``lam * sum(out ** 2)``: use
    ``ActivityL2(2 * lam)`` to reproduce it. Between forward and backward it keeps a copy of ``out``
    (so that an in-place change of ``out`` afterwards cannot alter the term).

    Args:
        module: the module whose output to regularize. Omit it to get a rule.
        lam: strength, a finite number >= 0, read at each forward.

    Returns:
        With ``module``: the same module object. Without: an ``ActivityL2`` rule.

    Raises:
        TypeError, ValueError: as :class:`ActivityL1`.

    Example::

        >>> import torch, torchreg
        >>> layer = torchreg.ActivityL2(torch.nn.Linear(1, 1, bias=False), lam=0.5)
        >>> with torch.no_grad():
        ...     _ = layer.weight.fill_(2.0)
        >>> layer(torch.tensor([[1.0], [3.0]])).sum().backward()   # out = [[2], [6]], batch 2
        >>> layer.weight.grad     # 1 + 3 (data) + 0.5 / 2 * (2 * 1 + 6 * 3)
        tensor([[9.]])
    """

    def penalty(self, output: Tensor, batch: int = 1) -> Tensor:  # type: ignore[override]
        return self.lam / 2 * output.pow(2).sum() / batch

    def _save(self, output: Tensor) -> Tensor:
        return output.detach().clone()
