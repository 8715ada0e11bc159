"""What a weight constraint is: the projection applied to a parameter after each optimizer step.

Keras' weight constraints (``kernel_constraint=MaxNorm(3)``, ``NonNeg()``, ``UnitNorm()``,
``MinMaxNorm()``) in torch's layout. A constraint is its projection only, :meth:`Constraint.project_`,
which replaces a parameter in place by its projected value; when it is applied (after every
``optimizer.step()``) is not its business.

The norm constraints take one norm per index along ``dim``: group ``g`` is ``w.select(dim, g)``
and ``n_g = ||w_g||_2`` (as :class:`torchreg.GroupLasso` and ``torch.renorm``). With Keras'
``epsilon = 1e-7`` (``keras.backend.epsilon()``) each group becomes:

==============  ==================================================================================
constraint      ``w_g`` becomes
==============  ==================================================================================
``MaxNorm``     ``w_g * clip(n_g, 0, max_value) / (epsilon + n_g)``
``UnitNorm``    ``w_g / (epsilon + n_g)``
``MinMaxNorm``  ``w_g * (rate * clip(n_g, min_value, max_value) + (1 - rate) * n_g) / (epsilon + n_g)``
``NonNeg``      ``w * (w >= 0)`` elementwise (no ``dim``)
==============  ==================================================================================

These are Keras' formulas exactly (``keras/src/constraints/constraints.py``), epsilon included: a
group of norm 0 stays 0 (no division by zero), and a group inside the feasible set is multiplied by
``n_g / (epsilon + n_g)``, a relative change of about ``1e-7 / n_g``, as in Keras.

**Keras' axis and torch's dim.** Keras' ``axis`` names the dimensions a norm is taken *over*; ``dim``
here names the one dimension that is *kept* (one norm per index along it), in torch's layout. The
default ``dim=0`` is one norm per output unit or filter, Keras' default ``axis=0``:

=====================================  ===========================  ==================================
layer (torch weight shape)             Keras kernel, Keras axis      here
=====================================  ===========================  ==================================
``Linear`` ``(out, in)``                ``Dense`` ``(in, out)``,      ``dim=0`` (default)
                                        ``axis=0``
``Conv1d`` ``(out, in, k)``             ``(k, in, out)``,             ``dim=0`` (default)
                                        ``axis=[0, 1]``
``Conv2d`` ``(out, in, kh, kw)``        ``(kh, kw, in, out)``,        ``dim=0`` (default)
                                        ``axis=[0, 1, 2]``
``LSTM`` ``weight_ih_l0 (4h, in)``,     ``kernel (in, 4h)``,          ``dim=0`` (default); the gate
``weight_hh_l0 (4h, h)``                ``recurrent_kernel (h, 4h)``, order (i, f, g/c, o) is the same
                                        ``axis=0``
``Embedding`` ``(num, emb)``            ``embeddings (num, emb)``     ``dim=0``: one norm per token
                                        (the same layout)             (Keras' ``axis=1``, and
                                                                      ``nn.Embedding(max_norm=)``);
                                                                      ``dim=1``: per feature, over the
                                                                      vocabulary (Keras' default
                                                                      ``axis=0`` on an ``Embedding``)
a bias ``(out,)``                       ``bias_constraint``,          ``dim=None`` (one norm over the
                                        ``axis=0``                    vector); ``dim=0`` is one norm
                                                                      per element, ``|b_g|``
=====================================  ===========================  ==================================

``dim=None`` takes one norm over the whole parameter (Keras' ``axis=None``).
"""

from __future__ import annotations

import numbers
from typing import Any, Callable, Dict, Optional, Tuple

import torch
from torch import Tensor, nn

from ._select import Selection, check_selection, describe_selection
from ._validate import check_strength, describe
from .regularizers import _EPSILON

__all__ = ["Constraint", "MaxNorm", "MinMaxNorm", "UnitNorm", "NonNeg"]

#: Keras' ``backend.epsilon()``, added to every norm before dividing by it.
EPSILON = _EPSILON


def _rebuild(cls: type, kwargs: Dict[str, Any]) -> "Constraint":
    return cls(**kwargs)


class Constraint:
    """Base class of torchreg's weight constraints: :class:`MaxNorm`, :class:`MinMaxNorm`,
    :class:`UnitNorm` and :class:`NonNeg`.

    A subclass names its options in ``_options`` (each a validated property) and defines
    :meth:`project_`; it needs no hook code. :meth:`_coupled_dims` says which dimensions the projection
    couples (a parameter sharded along one of them cannot be projected shard by shard).

    Writing one (a constraint that clips every weight into ``[-c, c]``)::

        >>> import torch
        >>> from torchreg.constraints import Constraint
        >>> class Clip(Constraint):
        ...     _options = ("c",)
        ...     def __init__(self, c, *, params=None):
        ...         self.c = float(c)
        ...         self._init_selection(params)
        ...     def project_(self, param):
        ...         param.clamp_(-self.c, self.c)
        >>> w = torch.tensor([-3.0, 0.5, 2.0])
        >>> Clip(1.0).project_(w)
        >>> w
        tensor([-1.0000,  0.5000,  1.0000])
        >>> Clip(1.0)
        Clip(c=1.0)
    """

    _options: Tuple[str, ...] = ()

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # pragma: no cover - subclasses define it
        raise TypeError("Constraint is a base class; use torchreg.MaxNorm, MinMaxNorm, UnitNorm or NonNeg")

    # -- the maths --------------------------------------------------------------------------
    def project_(self, param: Tensor) -> None:
        """Replace ``param`` in place by its projection (called with gradients disabled)."""
        raise NotImplementedError

    def _coupled_dims(self, param: Tensor) -> Tuple[int, ...]:
        """Dimensions along which the projection couples elements (none: elementwise)."""
        return ()

    def _check_param(self, name: str, param: Tensor) -> None:
        """Raise ``ValueError`` (``TypeError`` for a dtype) if this constraint cannot project ``param``;
        called before anything changes."""

    # -- plumbing ---------------------------------------------------------------------------
    def _init_selection(self, params: Selection) -> None:
        self.params = check_selection(params)

    def _kwargs(self) -> Dict[str, Any]:
        """The constructor's keyword arguments that rebuild this constraint (repr, copy, config)."""
        kwargs = {name: getattr(self, name) for name in self._options}
        if self.params is not None:
            kwargs["params"] = self.params
        return kwargs

    def __reduce__(self) -> Any:
        return _rebuild, (type(self), self._kwargs())

    def __eq__(self, other: Any) -> bool:
        return type(other) is type(self) and other._kwargs() == self._kwargs()

    __hash__ = object.__hash__

    def __repr__(self) -> str:
        kwargs = self._kwargs()
        if "params" in kwargs:
            kwargs["params"] = describe_selection(self.params)
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in kwargs.items())})"


# -- validated options ----------------------------------------------------------------------------
def _option(name: str, check: Callable[[Any, Any, str], Any], doc: str) -> property:
    """A validated option; ``check(self, value, what)`` returns the value to store or raises."""

    def get(self: Constraint) -> Any:
        return self.__dict__[name]

    def set(self: Constraint, value: Any) -> None:
        self.__dict__[name] = check(self, value, f"{type(self).__name__} {name}")

    return property(get, set, doc=doc)


def _bound(self: Constraint, value: Any, what: str) -> float:
    return check_strength(value, what)  # a finite real number >= 0 (or a one-element tensor of one)


def _check_dim(self: Constraint, value: Any, what: str) -> Optional[int]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{what} must be an int (the dimension that indexes the groups) or None (one norm over "
                        f"the whole parameter), got {describe(value)}")
    return int(value)


def _check_rate(self: Constraint, value: Any, what: str) -> float:
    rate = check_strength(value, what)
    if rate > 1:
        raise ValueError(f"{what} must be a real number in [0, 1] (1: project onto [min_value, max_value]; "
                         f"smaller: move the norm that fraction of the way), got {rate!r}")
    return rate


class _NormConstraint(Constraint):
    """A constraint on the L2 norm of each group ``w.select(dim, g)``: ``w_g <- w_g * factor(n_g)``."""

    dim = _option("dim", _check_dim, "The dimension that indexes the groups (one norm per index along it), or "
                                     "None for one norm over the whole parameter; may be changed at any time.")

    def _check_param(self, name: str, param: Tensor) -> None:
        if isinstance(param, nn.parameter.UninitializedParameter) or self.dim is None:
            return
        if not -param.ndim <= self.dim < param.ndim:
            allowed = f"in [{-param.ndim}, {param.ndim - 1}] or None" if param.ndim else "None"
            raise ValueError(
                f"{self!r}: parameter {name!r} has shape {tuple(param.shape)}; dim={self.dim} is not one of its "
                f"dimensions (allowed: dim {allowed}, None taking one norm over the whole parameter). "
                "Choose another dim or exclude the parameter with params=..."
            )

    def _norm_dims(self, param: Tensor) -> Tuple[int, ...]:
        """The dimensions a norm is taken over (Keras' ``axis``): all but ``dim``."""
        if self.dim is None:
            return tuple(range(param.ndim))
        dim = self.dim % param.ndim
        return tuple(d for d in range(param.ndim) if d != dim)

    def _coupled_dims(self, param: Tensor) -> Tuple[int, ...]:
        return self._norm_dims(param)

    def group_norms(self, param: Tensor) -> Tensor:
        """``||w_g||_2`` of every group, broadcastable to ``param`` (size 1 along every norm dimension).

        Computed in float32 for a 16-bit parameter; real for a complex one.
        """
        dims = self._norm_dims(param)
        dtype = torch.float32 if param.dtype in (torch.float16, torch.bfloat16) else None
        if not dims:  # one element per group (a vector with dim=0): vector_norm(dim=()) would reduce all
            return param.abs() if dtype is None else param.abs().to(dtype)
        return torch.linalg.vector_norm(param, dim=dims, keepdim=True, dtype=dtype)

    def _desired(self, norms: Tensor) -> Tensor:
        """The norm each group is moved to (a new tensor, or ``norms`` changed in place)."""
        raise NotImplementedError

    def project_(self, param: Tensor) -> None:
        norms = self.group_norms(param)
        denom = norms + EPSILON
        param.mul_(self._desired(norms).div_(denom))


class MaxNorm(_NormConstraint):
    """Keras' ``MaxNorm``: after each optimizer step, every group's norm is clipped to ``max_value``.

    ``w_g <- w_g * clip(n_g, 0, max_value) / (1e-7 + n_g)`` for each group ``w_g = w.select(dim, g)``,
    ``n_g = ||w_g||_2`` (max-norm regularization, Srivastava et al. 2014). The default ``dim=0`` is one
    norm per output unit or filter, Keras' default ``axis=0`` (see ``torchreg.constraints`` for the
    correspondence on each layer).

    Args:
        max_value: the largest norm of a group, a finite real number >= 0 (default 2.0, as Keras).
        dim: keyword only. The dimension that indexes the groups (negative counts from the end), or
            ``None`` for one norm over the whole parameter (Keras' ``bias_constraint`` on a vector).
        params: keyword only. Which parameters: ``None`` (default) for the kernels, as the
            regularizers; a glob pattern, a list of them or a predicate ``fn(name, param)`` otherwise
            (``params="*bias"`` for Keras' ``bias_constraint``).

    Raises:
        TypeError: ``max_value`` is no real number; ``dim`` is neither an int nor None.
        ValueError: ``max_value`` is negative, infinite or NaN.

    Example::

        >>> import torch
        >>> from torchreg.constraints import MaxNorm
        >>> w = torch.tensor([[3.0, 4.0], [0.3, 0.4]])   # row norms 5 and 0.5
        >>> MaxNorm(max_value=1.0).project_(w)
        >>> w                                               # row 0 scaled to norm 1; row 1 kept
        tensor([[0.6000, 0.8000],
                [0.3000, 0.4000]])
        >>> MaxNorm(3.0, dim=1)
        MaxNorm(max_value=3.0, dim=1)
    """

    _options = ("max_value", "dim")
    max_value = _option("max_value", _bound, "The largest norm of a group (>= 0); may be changed at any time.")

    def __init__(self, max_value: float = 2.0, *, dim: Optional[int] = 0, params: Selection = None) -> None:
        self.max_value = max_value
        self.dim = dim
        self._init_selection(params)

    def _desired(self, norms: Tensor) -> Tensor:
        return norms.clamp(0, self.max_value)


class MinMaxNorm(_NormConstraint):
    """Keras' ``MinMaxNorm``: after each optimizer step, every group's norm is moved into
    ``[min_value, max_value]`` (all the way with ``rate=1``, a fraction ``rate`` of the way otherwise).

    ``w_g <- w_g * (rate * clip(n_g, min_value, max_value) + (1 - rate) * n_g) / (1e-7 + n_g)`` for each
    group ``w_g = w.select(dim, g)``, ``n_g = ||w_g||_2``. A group of norm 0 stays 0 (it has no
    direction to scale).

    Args:
        min_value: the smallest norm of a group, a finite real number >= 0 (default 0.0, as Keras).
        max_value: the largest norm, finite, at least ``min_value`` (default 1.0, as Keras).
        rate: keyword only. A real number in ``[0, 1]`` (default 1.0: strict enforcement; Keras' rate).
        dim: keyword only; as :class:`MaxNorm`.
        params: keyword only; as :class:`MaxNorm`.

    Raises:
        TypeError: a bound or ``rate`` is no real number; ``dim`` is neither an int nor None.
        ValueError: a bound is negative, infinite or NaN; ``min_value > max_value``; ``rate`` outside
            ``[0, 1]``. The options may be changed later, checked the same way (raise ``max_value``
            before ``min_value`` when moving the interval up).

    Example::

        >>> import torch
        >>> from torchreg.constraints import MinMaxNorm
        >>> w = torch.tensor([[3.0, 4.0], [0.3, 0.4], [0.0, 0.0]])   # row norms 5, 0.5 and 0
        >>> MinMaxNorm(min_value=1.0, max_value=2.0).project_(w)
        >>> w                                                          # norms 2, 1 and 0
        tensor([[1.2000, 1.6000],
                [0.6000, 0.8000],
                [0.0000, 0.0000]])
        >>> MinMaxNorm(0.5, 1.0, rate=0.5)
        MinMaxNorm(min_value=0.5, max_value=1.0, rate=0.5, dim=0)
    """

    _options = ("min_value", "max_value", "rate", "dim")

    def _min(self, value: Any, what: str) -> float:
        value = check_strength(value, what)
        if "max_value" in self.__dict__ and value > self.max_value:
            raise ValueError(f"{what} must be at most max_value={self.max_value!r}, got {value!r}")
        return value

    def _max(self, value: Any, what: str) -> float:
        value = check_strength(value, what)
        if "min_value" in self.__dict__ and value < self.min_value:
            raise ValueError(f"{what} must be at least min_value={self.min_value!r}, got {value!r}")
        return value

    min_value = _option("min_value", _min, "The smallest norm of a group (>= 0, <= max_value).")
    max_value = _option("max_value", _max, "The largest norm of a group (>= min_value).")
    rate = _option("rate", _check_rate, "The fraction of the way to the interval each projection goes, in [0, 1].")

    def __init__(self, min_value: float = 0.0, max_value: float = 1.0, *, rate: float = 1.0,
                 dim: Optional[int] = 0, params: Selection = None) -> None:
        low = check_strength(min_value, "MinMaxNorm min_value")
        high = check_strength(max_value, "MinMaxNorm max_value")
        if low > high:
            raise ValueError(f"MinMaxNorm min_value must be at most max_value, got min_value={low!r} > "
                             f"max_value={high!r}")
        self.max_value = high
        self.min_value = low
        self.rate = rate
        self.dim = dim
        self._init_selection(params)

    def _desired(self, norms: Tensor) -> Tensor:
        desired = norms.clamp(self.min_value, self.max_value)
        if self.rate == 1.0:
            return desired
        return desired.mul_(self.rate).add_(norms, alpha=1 - self.rate)


class UnitNorm(_NormConstraint):
    """Keras' ``UnitNorm``: after each optimizer step, every group is scaled to norm 1.

    ``w_g <- w_g / (1e-7 + n_g)`` for each group ``w_g = w.select(dim, g)``, ``n_g = ||w_g||_2``; a
    group of norm 0 stays 0.

    Args:
        dim: keyword only; as :class:`MaxNorm`.
        params: keyword only; as :class:`MaxNorm`.

    Raises:
        TypeError: ``dim`` is neither an int nor None.

    Example::

        >>> import torch
        >>> from torchreg.constraints import UnitNorm
        >>> w = torch.tensor([[3.0, 0.0], [4.0, 0.0]])
        >>> UnitNorm(dim=1).project_(w)                    # one norm per column: 5 and 0
        >>> w
        tensor([[0.6000, 0.0000],
                [0.8000, 0.0000]])
        >>> UnitNorm()
        UnitNorm(dim=0)
    """

    _options = ("dim",)

    def __init__(self, *, dim: Optional[int] = 0, params: Selection = None) -> None:
        self.dim = dim
        self._init_selection(params)

    def project_(self, param: Tensor) -> None:
        param.div_(self.group_norms(param).add_(EPSILON))


class NonNeg(Constraint):
    """Keras' ``NonNeg``: after each optimizer step, every negative weight is set to 0.

    ``w <- w * (w >= 0)`` elementwise (written as ``clamp_(min=0)``: a negative weight becomes ``+0.0``,
    as Keras 3's ``maximum(w, 0)``; NaN stays NaN).

    Args:
        params: keyword only; as :class:`MaxNorm`.

    Raises:
        TypeError: (when applied) a selected parameter is complex: it has no order.

    Example::

        >>> import torch
        >>> from torchreg.constraints import NonNeg
        >>> w = torch.tensor([-1.5, 0.0, 2.0])
        >>> NonNeg().project_(w)
        >>> w
        tensor([0., 0., 2.])
        >>> NonNeg(params="*bias")
        NonNeg(params='*bias')
    """

    def __init__(self, *, params: Selection = None) -> None:
        self._init_selection(params)

    def _check_param(self, name: str, param: Tensor) -> None:
        if param.is_complex():
            raise TypeError(f"{self!r}: parameter {name!r} is complex ({param.dtype}), which has no order; NonNeg "
                            "needs a real parameter. Exclude it with params=...")

    def project_(self, param: Tensor) -> None:
        param.clamp_(min=0)
