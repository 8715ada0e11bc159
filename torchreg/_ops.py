"""Small in-place tensor operations shared by the regularizers."""

from __future__ import annotations

import threading
from typing import Optional

import torch
from torch import Tensor

__all__ = ["add_scaled_", "add_sign_", "sum_of_squares"]


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


_CHUNK = 1 << 20  # elements per chunk of the sign buffer (4 MB of float32)
_LARGE = 32 << 20  # bytes: glibc serves larger blocks with fresh, page-faulting mmap'ed memory
_local = threading.local()  # one sign buffer per thread that runs hooks


def add_sign_(grad: Tensor, p: Tensor, coef: float, scale: Optional[Tensor]) -> None:
    """``grad += coef * scale * sgn(p)`` in place.

    For a contiguous CPU tensor above 32 MiB the sign goes chunk by chunk through one reused 4 MB
    buffer per thread instead of a full-size temporary, whose fresh pages cost several times the
    kernel itself (benchmarks/README.md: a 64 MB tensor 23.3 ms -> 5.0 ms). Bitwise the same result.
    """
    n = p.numel()
    if (
        p.device.type != "cpu"
        or p.is_complex()
        or n * p.element_size() <= _LARGE
        or not (p.is_contiguous() and grad.is_contiguous())
    ):
        add_scaled_(grad, torch.sgn(p), coef, scale)
        return
    buf = getattr(_local, "buf", None)
    if buf is None or buf.dtype != p.dtype:
        buf = _local.buf = torch.empty(_CHUNK, dtype=p.dtype)
    flat_p, flat_g = p.view(-1), grad.view(-1)
    for start in range(0, n, _CHUNK):
        chunk = buf[: min(_CHUNK, n - start)]
        torch.sgn(flat_p[start : start + _CHUNK], out=chunk)
        add_scaled_(flat_g[start : start + _CHUNK], chunk, coef, scale)
