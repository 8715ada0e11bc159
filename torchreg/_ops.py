"""Small in-place tensor operations shared by the regularizers."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

__all__ = ["add_scaled_"]


def add_scaled_(grad: Tensor, x: Tensor, coef: float, scale: Optional[Tensor]) -> None:
    """``grad += coef * scale * x`` in place, ``scale`` being ``None`` or a 0-dim device tensor.

    A device tensor for ``scale`` (a grad scaler's) is used without reading it on the host.
    """
    if scale is None:
        grad.add_(x, alpha=coef)
    else:
        grad.addcmul_(x, scale, value=coef)


def sum_of_squares(p: Tensor) -> Tensor:
    return (p.abs() if p.is_complex() else p).pow(2).sum()


def sgn(p: Tensor) -> Tensor:
    """``sign(p)`` for real tensors (0 where ``p == 0``), ``p / |p|`` for complex ones."""
    return torch.sgn(p)
