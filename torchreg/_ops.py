"""Small in-place tensor operations shared by the regularizers."""

from __future__ import annotations

import functools
import threading
from typing import Callable, Optional

import torch
from torch import Tensor

__all__ = ["Adder", "add_scaled_", "add_sign_", "both", "nothing", "scaled_adder", "sign_adder", "sum_of_squares"]

#: ``f(grad, param)``: adds a fixed term to ``grad`` in place (built once per backward, called per tensor).
Adder = Callable[[Tensor, Tensor], None]


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


def scaled_adder(coef: float, scale: Optional[Tensor]) -> Adder:
    """``f(grad, x)`` doing ``add_scaled_(grad, x, coef, scale)`` without a Python frame of its own."""
    if scale is None:
        return functools.partial(Tensor.add_, alpha=coef)
    return functools.partial(Tensor.addcmul_, tensor2=scale, value=coef)


def sign_adder(coef: float, scale: Optional[Tensor]) -> Adder:
    """``f(grad, p)`` doing ``add_sign_(grad, p, coef, scale)`` with one Python frame in the common case."""
    sgn = torch.sgn
    maybe_large = _LARGE // 8  # elements; above this add_sign_ looks at the size in bytes (8: float64)

    if scale is None:

        def add(grad: Tensor, p: Tensor) -> None:
            if p.numel() > maybe_large:
                add_sign_(grad, p, coef, None)
            else:
                grad.add_(sgn(p), alpha=coef)

    else:

        def add(grad: Tensor, p: Tensor) -> None:
            if p.numel() > maybe_large:
                add_sign_(grad, p, coef, scale)
            else:
                grad.addcmul_(sgn(p), scale, value=coef)

    return add


def both(first: Adder, second: Adder) -> Adder:
    """``f(grad, p)`` applying ``first`` then ``second``."""

    def add(grad: Tensor, p: Tensor) -> None:
        first(grad, p)
        second(grad, p)

    return add


def nothing(grad: Tensor, p: Tensor) -> None:
    """The adder of a zero strength: leaves ``grad`` as it is."""
