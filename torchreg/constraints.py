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

* ``Linear.weight`` ``(out, in)``: Keras' ``Dense`` kernel ``(in, out)`` with ``axis=0`` is ``dim=0``;
* ``Conv1d.weight`` ``(out, in, k)``: Keras' ``(k, in, out)`` with ``axis=[0, 1]`` is ``dim=0``;
* ``Conv2d.weight`` ``(out, in, kh, kw)``: Keras' ``(kh, kw, in, out)`` with ``axis=[0, 1, 2]`` is
  ``dim=0``;
* ``LSTM.weight_ih_l0`` ``(4h, in)`` and ``weight_hh_l0`` ``(4h, h)``: Keras' ``kernel`` ``(in, 4h)``
  and ``recurrent_kernel`` ``(h, 4h)`` with ``axis=0`` are ``dim=0`` (the gate order i, f, g/c, o is
  the same);
* ``Embedding.weight`` ``(num, emb)``, the layout of Keras' ``embeddings``: ``dim=0`` is one norm per
  token (Keras' ``axis=1``; the grouping of ``nn.Embedding(max_norm=)``), ``dim=1`` one norm per
  feature over the vocabulary (Keras' default ``axis=0`` on an ``Embedding``);
* a bias ``(out,)``: Keras' ``bias_constraint`` with ``axis=0`` (one norm over the vector) is
  ``dim=None``; ``dim=0`` is one norm per element, ``|b_g|`` (as ``torch.renorm``).

``dim=None`` takes one norm over the whole parameter (Keras' ``axis=None``).
"""

from __future__ import annotations

import numbers
from typing import Any, Callable, Dict, List, Optional, Tuple, TypeVar, overload

import torch
from torch import Tensor, nn

from . import _constraint_unit
from ._base import Rule
from ._select import Selection
from ._validate import check_strength, describe
from .regularizers import _EPSILON

__all__ = ["Constraint", "MaxNorm", "MinMaxNorm", "UnitNorm", "NonNeg"]

#: Keras' ``backend.epsilon()``, added to every norm before dividing by it.
EPSILON = _EPSILON


M = TypeVar("M", bound=nn.Module)


class Constraint(Rule):
    """Base class of torchreg's weight constraints: :class:`MaxNorm`, :class:`MinMaxNorm`,
    :class:`UnitNorm` and :class:`NonNeg`, and the contract a new one is written to.

    A constraint is only its projection. *When* it runs (after every ``step()`` of any
    ``torch.optim.Optimizer`` holding the parameter, once per step, not on a step a grad scaler skips,
    after a proximal operator on the same parameter) is ``torchreg/_after_step.py``'s business. A
    subclass:

    * validates its options in ``__init__`` (names in ``_options``; those that may be given by position
      after the module in ``_positional``) and calls ``self._init_selection(params)``;
    * defines :meth:`project_` (replace the parameter in place by its projection);
    * optionally ``_check_param`` (refuse a parameter before anything changes) and ``_coupled_dims``
      (the dimensions the projection couples, for sharded parameters).

    It is then used like the built-in ones: ``Clip(layer, 1.0)``, or ``Clip(1.0)`` as a rule for
    :func:`torchreg.apply_regularization`. A parameter may carry one constraint and one penalty.

    Example (a constraint that clips every weight into ``[-c, c]``)::

        >>> import torch, torchreg
        >>> class Clip(torchreg.Constraint):
        ...     _options = _positional = ("c",)
        ...     def __init__(self, c, *, params=None):
        ...         self.c = float(c)
        ...         self._init_selection(params)
        ...     def project_(self, param):
        ...         param.clamp_(-self.c, self.c)
        >>> layer = Clip(torch.nn.Linear(2, 1, bias=False), 0.5)
        >>> with torch.no_grad():
        ...     _ = layer.weight.fill_(3.0)
        >>> layer.weight.grad = torch.zeros_like(layer.weight)
        >>> torch.optim.SGD(layer.parameters(), lr=0.1).step()   # the step, then the projection
        >>> layer.weight
        Parameter containing:
        tensor([[0.5000, 0.5000]], requires_grad=True)
        >>> Clip(1.0)
        Clip(c=1.0)
    """

    _base = True
    #: The constructor's options (besides ``params``), in the order repr and the config write them.
    _options: Tuple[str, ...] = ()

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # pragma: no cover - subclasses define it
        raise NotImplementedError

    #: Not a proximal regularizer (the after-step hooks apply :meth:`project_`, not a prox).
    proximal = False
    #: The after-step hooks act on a constraint's parameters.
    acts_after_step = True

    # -- the maths --------------------------------------------------------------------------
    def project_(self, param: Tensor) -> None:
        """Replace ``param`` in place by its projection (called with gradients disabled).

        ``param`` is a plain tensor (a DTensor's local shard under FSDP2), or, when the parameter is
        sharded along a dimension :meth:`_coupled_dims` names, the DTensor itself: torch ops on it then
        reduce across the ranks (keep reductions' results out of in-place ops, as DTensor requires).
        """
        raise NotImplementedError

    def _coupled_dims(self, param: Tensor) -> Tuple[int, ...]:
        """Dimensions along which the projection couples elements (none: elementwise). A parameter
        sharded along one of them cannot be projected shard by shard."""
        return ()

    def _check_param(self, name: str, param: Tensor) -> None:
        """Raise ``ValueError`` (``TypeError`` for a dtype) if this constraint cannot project ``param``;
        called before anything changes."""

    # -- use ------------------------------------------------------------------------------------
    def _attach(self, module: nn.Module, chosen: List[Tuple[str, Tensor]]) -> None:
        _constraint_unit.attach(module, [_constraint_unit.Entry(name, p, self) for name, p in chosen])

    def _kwargs(self) -> Dict[str, Any]:
        """The constructor's keyword arguments that rebuild this constraint (repr, the config format)."""
        kwargs = {name: getattr(self, name) for name in self._options}
        if self.params is not None:
            kwargs["params"] = self.params
        return kwargs


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
    norm per output unit or filter, Keras' default ``axis=0`` (``torchreg.constraints`` has the
    correspondence for each layer). Applied after every ``step()`` of any ``torch.optim`` optimizer
    holding the parameter and updating it (its ``.grad`` is not None); not when applied.

    Args:
        module: the layer (or whole model) to constrain. Omit it to get a rule for
            :func:`torchreg.apply_regularization` or :meth:`apply`.
        max_value: the largest norm of a group, a finite real number >= 0 (default 2.0, as Keras); may
            be changed later (``rule.max_value = ...``), from the next step.
        dim: keyword only. The dimension that indexes the groups (negative counts from the end), or
            ``None`` for one norm over the whole parameter (Keras' ``bias_constraint`` on a vector).
        params: keyword only. Which parameters: ``None`` (default) for the kernels, as the
            regularizers (no biases, nothing of a normalization layer); a glob pattern, a list of them
            or a predicate ``fn(name, param)`` otherwise (``params="bias"`` for Keras' ``bias_constraint``).

    Returns:
        With ``module``: the same module object, constrained. Without: a ``MaxNorm`` rule.

    Raises:
        TypeError: ``module`` is no module instance; ``max_value`` is no real number; ``dim`` is neither
            an int nor None; a selected parameter is not floating point or complex.
        ValueError: ``max_value`` is negative, infinite or NaN; the selection matches no parameter; a
            selected parameter has no dimension ``dim``, or is constrained already.

    Example::

        >>> import torch, torchreg
        >>> layer = torchreg.MaxNorm(torch.nn.Linear(2, 2, bias=False), max_value=1.0)
        >>> with torch.no_grad():                          # row norms 5 and 0.5
        ...     _ = layer.weight.copy_(torch.tensor([[3.0, 4.0], [0.3, 0.4]]))
        >>> layer(torch.zeros(1, 2)).sum().backward()      # data gradient 0
        >>> torch.optim.SGD(layer.parameters(), lr=0.1).step()
        >>> layer.weight.detach()                          # row 0 scaled to norm 1; row 1 kept
        tensor([[0.6000, 0.8000],
                [0.3000, 0.4000]])
        >>> torchreg.MaxNorm(3.0, dim=1)
        MaxNorm(max_value=3.0, dim=1)
    """

    _options = ("max_value", "dim")
    _positional = ("max_value",)
    max_value = _option("max_value", _bound, "The largest norm of a group (>= 0); may be changed at any time.")

    @overload
    def __new__(cls, module: M, max_value: float = 2.0, *, dim: Optional[int] = 0,
                params: Selection = None) -> M: ...
    @overload
    def __new__(cls, max_value: float = 2.0, *, dim: Optional[int] = 0, params: Selection = None) -> "MaxNorm": ...
    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        return super().__new__(cls, *args, **kwargs)

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
    direction to scale). Applied as :class:`MaxNorm`.

    Args:
        module: the layer (or whole model) to constrain. Omit it to get a rule.
        min_value: the smallest norm of a group, a finite real number >= 0 (default 0.0, as Keras).
        max_value: the largest norm, finite, at least ``min_value`` (default 1.0, as Keras).
        rate: keyword only. A real number in ``[0, 1]`` (default 1.0: strict enforcement; Keras' rate).
        dim: keyword only; as :class:`MaxNorm`.
        params: keyword only; as :class:`MaxNorm`.

    Returns:
        With ``module``: the same module object, constrained. Without: a ``MinMaxNorm`` rule.

    Raises:
        TypeError: as :class:`MaxNorm`; a bound or ``rate`` is no real number.
        ValueError: as :class:`MaxNorm`; a bound is negative, infinite or NaN; ``min_value > max_value``;
            ``rate`` outside ``[0, 1]``. The options may be changed later, checked the same way (raise
            ``max_value`` before ``min_value`` when moving the interval up).

    Example::

        >>> import torch, torchreg
        >>> w = torch.tensor([[3.0, 4.0], [0.3, 0.4], [0.0, 0.0]])   # row norms 5, 0.5 and 0
        >>> torchreg.MinMaxNorm(min_value=1.0, max_value=2.0).project_(w)
        >>> w                                                          # norms 2, 1 and 0
        tensor([[1.2000, 1.6000],
                [0.6000, 0.8000],
                [0.0000, 0.0000]])
        >>> torchreg.MinMaxNorm(0.5, 1.0, rate=0.5)
        MinMaxNorm(min_value=0.5, max_value=1.0, rate=0.5, dim=0)
    """

    _options = ("min_value", "max_value", "rate", "dim")
    _positional = ("min_value", "max_value")

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

    @overload
    def __new__(cls, module: M, min_value: float = 0.0, max_value: float = 1.0, *, rate: float = 1.0,
                dim: Optional[int] = 0, params: Selection = None) -> M: ...
    @overload
    def __new__(cls, min_value: float = 0.0, max_value: float = 1.0, *, rate: float = 1.0,
                dim: Optional[int] = 0, params: Selection = None) -> "MinMaxNorm": ...
    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        return super().__new__(cls, *args, **kwargs)

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
    group of norm 0 stays 0. Applied as :class:`MaxNorm`.

    Args:
        module: the layer (or whole model) to constrain. Omit it to get a rule.
        dim: keyword only; as :class:`MaxNorm`.
        params: keyword only; as :class:`MaxNorm`.

    Returns:
        With ``module``: the same module object, constrained. Without: a ``UnitNorm`` rule.

    Raises:
        TypeError: as :class:`MaxNorm`.
        ValueError: as :class:`MaxNorm`.

    Example::

        >>> import torch, torchreg
        >>> w = torch.tensor([[3.0, 0.0], [4.0, 0.0]])
        >>> torchreg.UnitNorm(dim=1).project_(w)            # one norm per column: 5 and 0
        >>> w
        tensor([[0.6000, 0.0000],
                [0.8000, 0.0000]])
        >>> conv = torchreg.UnitNorm(torch.nn.Conv2d(3, 8, 3))   # one norm per filter
        >>> torchreg.UnitNorm()
        UnitNorm(dim=0)
    """

    _options = ("dim",)

    @overload
    def __new__(cls, module: M, *, dim: Optional[int] = 0, params: Selection = None) -> M: ...
    @overload
    def __new__(cls, *, dim: Optional[int] = 0, params: Selection = None) -> "UnitNorm": ...
    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        return super().__new__(cls, *args, **kwargs)

    def __init__(self, *, dim: Optional[int] = 0, params: Selection = None) -> None:
        self.dim = dim
        self._init_selection(params)

    def project_(self, param: Tensor) -> None:
        param.div_(self.group_norms(param) + EPSILON)  # (out of place: a sharded norm is a partial sum)


class NonNeg(Constraint):
    """Keras' ``NonNeg``: after each optimizer step, every negative weight is set to 0.

    ``w <- w * (w >= 0)`` elementwise (written as ``clamp_(min=0)``: a negative weight becomes ``+0.0``,
    as Keras 3's ``maximum(w, 0)``; NaN stays NaN). Applied as :class:`MaxNorm`.

    Args:
        module: the layer (or whole model) to constrain. Omit it to get a rule.
        params: keyword only; as :class:`MaxNorm`.

    Returns:
        With ``module``: the same module object, constrained. Without: a ``NonNeg`` rule.

    Raises:
        TypeError: as :class:`MaxNorm`; a selected parameter is complex (it has no order).
        ValueError: as :class:`MaxNorm`.

    Example::

        >>> import torch, torchreg
        >>> w = torch.tensor([-1.5, 0.0, 2.0])
        >>> torchreg.NonNeg().project_(w)
        >>> w
        tensor([0., 0., 2.])
        >>> layer = torchreg.NonNeg(torch.nn.Linear(4, 2), params=["weight", "bias"])
        >>> torchreg.NonNeg(params="bias")
        NonNeg(params='bias')
    """

    @overload
    def __new__(cls, module: M, *, params: Selection = None) -> M: ...
    @overload
    def __new__(cls, *, params: Selection = None) -> "NonNeg": ...
    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        return super().__new__(cls, *args, **kwargs)

    def __init__(self, *, params: Selection = None) -> None:
        self._init_selection(params)

    def _check_param(self, name: str, param: Tensor) -> None:
        if param.is_complex():
            raise TypeError(f"{self!r}: parameter {name!r} is complex ({param.dtype}), which has no order; NonNeg "
                            "needs a real parameter. Exclude it with params=...")

    def project_(self, param: Tensor) -> None:
        param.clamp_(min=0)
