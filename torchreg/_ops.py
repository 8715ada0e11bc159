"""Small in-place tensor operations shared by the regularizers."""

from __future__ import annotations

import functools
import threading
from typing import Callable, Optional

import torch
from torch import Tensor

__all__ = [
    "Adder", "add_elastic_", "add_scaled_", "add_sign_", "elastic_adder", "nothing", "scaled_adder", "sign_adder",
    "sum_of_squares",
]

#: ``f(grad, param)``: adds a fixed term to ``grad`` in place (built once per backward, called per tensor).
Adder = Callable[[Tensor, Tensor], None]

_FLOAT16_MAX = 65504.0  # the smallest largest-value of the floating dtypes parameters are trained in


def add_scaled_(grad: Tensor, x: Tensor, coef: float, scale: Optional[Tensor]) -> None:
    """``grad += coef * scale * x`` in place, ``scale`` being ``None`` or a 0-dim device tensor.

    A device tensor for ``scale`` (a grad scaler's) is used without reading it on the host. A ``coef``
    beyond the largest value of ``grad``'s dtype (possible only when the parameters' dtype changed after
    torchreg checked the strength) cannot be passed to ``add_``: the term is then computed in double
    precision and rounded to ``grad``'s dtype, inf where it is beyond the dtype's range, as autograd's
    gradient of the penalty in the loss is then.
    """
    if coef > _FLOAT16_MAX and coef > torch.finfo(grad.dtype).max:
        wide = x.to(torch.complex128 if x.is_complex() else torch.float64) * coef
        grad.add_((wide if scale is None else wide * scale.to(wide.dtype)).to(grad.dtype))
        return
    if scale is None:
        grad.add_(x, alpha=coef)
    else:
        grad.addcmul_(x, scale, value=coef)


def sum_of_squares(p: Tensor) -> Tensor:
    return (p.abs() if p.is_complex() else p).pow(2).sum()


_CHUNK = 1 << 20  # elements per chunk of the sign buffer (4 MB of float32)
_LARGE = 32 << 20  # bytes: glibc serves larger blocks with fresh, page-faulting mmap'ed memory
_local = threading.local()  # one sign buffer per thread that runs hooks


def _large_on_cpu(grad: Tensor, p: Tensor) -> bool:
    return (
        p.device.type == "cpu"
        and not p.is_complex()
        and p.numel() * p.element_size() > _LARGE
        and p.is_contiguous()
        and grad.is_contiguous()
    )


def add_elastic_(grad: Tensor, p: Tensor, l1: float, l2: float, scale: Optional[Tensor]) -> None:
    """``grad += l2 * scale * p`` (if ``l2``), then ``grad += l1 * scale * sgn(p)`` (if ``l1``), in place.

    For a contiguous CPU tensor above 32 MiB both go chunk by chunk (4 MB), the sign through one reused
    buffer per thread: no full-size temporary, whose fresh pages cost several times the kernel itself
    (benchmarks/README.md: a 64 MB tensor 23.3 ms -> 5.0 ms), and each chunk of ``grad`` gets both
    terms while it is in cache. Elementwise, in the same order: bitwise the result of the two updates.
    DTensors sharded alike (FSDP2's parameter and its gradient) are updated through their local shards.
    """
    if hasattr(p, "to_local") and hasattr(grad, "to_local") and getattr(p, "placements", None) == getattr(
            grad, "placements", None):  # DTensors sharded alike (FSDP2): elementwise, shard by shard
        grad, p = grad.to_local(), p.to_local()
    if not _large_on_cpu(grad, p):
        if l2:
            add_scaled_(grad, p, l2, scale)
        if l1:
            add_scaled_(grad, torch.sgn(p), l1, scale)
        return
    buf = getattr(_local, "buf", None)
    if buf is None or buf.dtype != p.dtype:
        buf = _local.buf = torch.empty(_CHUNK, dtype=p.dtype)
    n = p.numel()
    flat_p, flat_g = p.view(-1), grad.view(-1)
    for start in range(0, n, _CHUNK):
        g, q = flat_g[start : start + _CHUNK], flat_p[start : start + _CHUNK]
        if l2:
            add_scaled_(g, q, l2, scale)
        if l1:
            sign = buf[: q.numel()]
            torch.sgn(q, out=sign)
            add_scaled_(g, sign, l1, scale)


def add_sign_(grad: Tensor, p: Tensor, coef: float, scale: Optional[Tensor]) -> None:
    """``grad += coef * scale * sgn(p)`` in place (see :func:`add_elastic_` for tensors above 32 MiB)."""
    add_elastic_(grad, p, coef, 0.0, scale)


def scaled_adder(coef: float, scale: Optional[Tensor]) -> Adder:
    """``f(grad, x)`` doing ``add_scaled_(grad, x, coef, scale)`` without a Python frame of its own."""
    if scale is None:
        return functools.partial(Tensor.add_, alpha=coef)
    return functools.partial(Tensor.addcmul_, tensor2=scale, value=coef)


_MAYBE_LARGE = _LARGE // 8  # elements; above this the adders let add_elastic_ look at the bytes (8: float64)


def sign_adder(coef: float, scale: Optional[Tensor]) -> Adder:
    """``f(grad, p)`` doing ``add_sign_(grad, p, coef, scale)`` with one Python frame in the common case."""
    sgn, add_scaled = torch.sgn, scaled_adder(coef, scale)

    def add(grad: Tensor, p: Tensor) -> None:
        if p.numel() > _MAYBE_LARGE:
            add_elastic_(grad, p, coef, 0.0, scale)
        else:
            add_scaled(grad, sgn(p))

    return add


def elastic_adder(l1: float, l2: float, scale: Optional[Tensor]) -> Adder:
    """``f(grad, p)`` doing ``add_elastic_(grad, p, l1, l2, scale)`` (both strengths non-zero)."""
    sgn, add_l1, add_l2 = torch.sgn, scaled_adder(l1, scale), scaled_adder(l2, scale)

    def add(grad: Tensor, p: Tensor) -> None:
        if p.numel() > _MAYBE_LARGE:
            add_elastic_(grad, p, l1, l2, scale)
        else:
            add_l2(grad, p)
            add_l1(grad, sgn(p))

    return add


def nothing(grad: Tensor, p: Tensor) -> None:
    """The adder of a zero strength: leaves ``grad`` as it is."""
