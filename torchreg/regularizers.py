"""What a regularizer is: its penalty and the gradient it adds.

Conventions (the same as ``torch.optim`` weight decay, *not* Keras' for L2):

=============  ==============================  =====================================
regularizer    penalty                          added to ``w.grad`` on each backward
=============  ==============================  =====================================
``L1``         ``lam * sum(|w|)``               ``lam * sign(w)`` (0 where ``w == 0``)
``L2``         ``lam / 2 * sum(w ** 2)``        ``lam * w``
``ElasticNet`` both terms                       ``l1 * sign(w) + l2 * w``
=============  ==============================  =====================================

Keras' ``l2(lam)`` penalizes ``lam * sum(w ** 2)``, whose gradient is ``2 * lam * w``: use
``L2(2 * lam)`` here to reproduce it. Complex parameters use ``|w|`` and ``sgn(w) = w / |w|``.

Each class is used two ways. Called with a module, it regularizes that module in place and returns
the same module object (as ``torch.nn.utils.spectral_norm`` does). Called without one, it returns a
rule for :func:`torchreg.apply_regularization` that can also be applied later with :meth:`apply`.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Iterable, Optional, Tuple, Type, TypeVar, overload

from torch import Tensor, nn

from . import _engine
from ._ops import _FLOAT16_MAX
from ._ops import (
    Adder, add_elastic_, add_scaled_, add_sign_, elastic_adder, nothing, scaled_adder, sign_adder, sum_of_squares,
)
from ._select import Selection, check_selection, describe_selection, select
from ._validate import check_hookable, check_strength, describe, largest

__all__ = ["Regularizer", "L1", "L2", "ElasticNet"]

M = TypeVar("M", bound=nn.Module)
R = TypeVar("R", bound="Regularizer")


def _rebuild(cls: type, kwargs: Dict[str, Any]) -> "Regularizer":
    return cls(**kwargs)


#: "No module given" (``None`` given as the module is an error, not a rule).
_NO_MODULE: Any = object()

#: Strength coefficients above this may not fit a parameter's dtype (float16's largest value); the
#: adders then leave the work to :meth:`Regularizer.grad_`, which gives autograd's inf on overflow.
_SMALLEST_MAX = _FLOAT16_MAX


class Regularizer:
    """Base class of :class:`L1`, :class:`L2` and :class:`ElasticNet`.

    A subclass names its strengths in ``_strengths`` and defines :meth:`penalty` and :meth:`grad_`;
    it needs no hook code: when the gradient is added is the engine's business.
    """

    _strengths: tuple = ()

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        if cls is Regularizer:
            raise TypeError("Regularizer is a base class; use torchreg.L1, torchreg.L2 or torchreg.ElasticNet")
        module, args, kwargs = cls._split_module(args, kwargs)
        if module is _NO_MODULE:
            return super().__new__(cls)
        if module is None:
            raise TypeError(
                f"torchreg.{cls.__name__} expects an nn.Module instance as its module, got None; leave the module "
                f"out to make a rule: torchreg.{cls.__name__}({', '.join(cls._strengths)})"
            )
        check_hookable(module, f"torchreg.{cls.__name__}")
        return cls(*args, **kwargs).apply(module)

    @classmethod
    def _split_module(cls, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Tuple[Any, tuple, Dict[str, Any]]:
        """``(module, args, kwargs)`` of a call ``cls(*args, **kwargs)``, the module taken out of them
        (:data:`_NO_MODULE` when the call makes a rule). The first positional argument is the module when
        it is one (or a module class), or when there are more positional arguments than strengths left
        for them (``L1(None, 0.1)``, ``L1(None, lam=0.1)``). Raises ``TypeError`` for two modules."""
        kwargs = dict(kwargs)
        module = kwargs.pop("module", _NO_MODULE)
        free = len(cls._strengths) - sum(name in kwargs for name in cls._strengths)
        if args and (
            isinstance(args[0], nn.Module) or len(args) > free
            or (isinstance(args[0], type) and issubclass(args[0], nn.Module))
        ):
            if module is not _NO_MODULE:
                raise TypeError(
                    f"torchreg.{cls.__name__} got two modules: {describe(args[0])} as the first argument and "
                    f"{describe(module)} as module=; give one"
                )
            module, args = args[0], args[1:]
        return module, tuple(args), kwargs

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # pragma: no cover - replaced below
        raise NotImplementedError

    # -- the maths --------------------------------------------------------------------------
    def penalty(self, param: Tensor) -> Tensor:
        """The penalty this regularizer puts on ``param`` (a 0-dim tensor)."""
        raise NotImplementedError

    def grad_(self, grad: Tensor, param: Tensor, alpha: float = 1.0, scale: Optional[Tensor] = None) -> None:
        """Add ``alpha * scale * d(penalty)/d(param)`` to ``grad`` in place.

        ``scale`` is ``None`` or a 0-dim tensor on ``grad``'s device (a grad scaler's scale).
        """
        raise NotImplementedError

    @property
    def is_zero(self) -> bool:
        """True when every strength is 0: the gradient is left exactly as it is."""
        return all(getattr(self, name) == 0.0 for name in self._strengths)

    def _adder(self, alpha: float, scale: Optional[Tensor]) -> Optional[Adder]:
        """``f(grad, param)`` doing ``grad_(grad, param, alpha, scale)`` for a dense ``grad``, built once
        per backward for the hooks' hot path; None makes the engine call :meth:`grad_` instead (the
        default, so that a subclass with its own :meth:`grad_` is always honoured)."""
        return None

    def _strength_values(self) -> tuple:
        return tuple(self.__dict__[name] for name in self._strengths)

    def _check_fits(self, named_params: Iterable[Tuple[str, Tensor]]) -> None:
        """Raise ``ValueError`` if a strength is beyond the largest value of a parameter's dtype (the
        gradient term could not be computed: ``1e39`` for float32, ``7e4`` for float16)."""
        for name, p in named_params:
            limit = largest(p.dtype)
            for strength, value in zip(self._strengths, self._strength_values()):
                if value > limit:
                    raise ValueError(
                        f"{type(self).__name__} {strength}={value!r} is beyond the largest {p.dtype} value "
                        f"({limit!r}) of parameter {name!r}: a strength must be at most the largest value of "
                        "the dtype of the parameters it regularizes"
                    )

    def _applied_to(self, params: Iterable[Tensor]) -> None:
        """Remember the smallest dtype limit among ``params``: later strengths are checked against it."""
        limit, dtype = self.__dict__.get("_limit", (math.inf, None))
        for p in params:
            if largest(p.dtype) < limit:
                limit, dtype = largest(p.dtype), p.dtype
        if dtype is not None:
            self.__dict__["_limit"] = (limit, dtype)

    # -- use ------------------------------------------------------------------------------------
    def apply(self, module: M) -> M:
        """Regularize ``module`` in place with this rule and return the same module.

        All parameters of ``module`` and its submodules that the rule selects are covered, as one
        unit: whenever a backward reaches any of them, each gets its gradient term once.

        Raises:
            TypeError: ``module`` is not an ``nn.Module`` instance.
            ValueError: the selection matches no parameter, or a parameter is regularized already.
        """
        check_hookable(module, f"{type(self).__name__}.apply")
        chosen = select(module, self.params, recurse=True)
        if not chosen:
            raise ValueError(
                f"{self!r} selects no parameter of {type(module).__name__} (selection: "
                f"{describe_selection(self.params)}; its parameters: "
                f"{[name for name, _ in module.named_parameters()]})"
            )
        self._check_fits(chosen)
        _engine.attach(module, [_engine.Entry(name, p, self) for name, p in chosen])
        self._applied_to([p for _, p in chosen])
        return module

    # -- plumbing ---------------------------------------------------------------------------
    def _init_selection(self, params: Selection) -> None:
        self.params = check_selection(params)

    def _kwargs(self) -> Dict[str, Any]:
        kwargs = {name: getattr(self, name) for name in self._strengths}
        if self.params is not None:
            kwargs["params"] = self.params
        return kwargs

    def __reduce__(self) -> Any:
        limit = self.__dict__.get("_limit")
        return (_rebuild, (type(self), self._kwargs())) + (({"_limit": limit},) if limit else ())

    def __repr__(self) -> str:
        kwargs = self._kwargs()
        if "params" in kwargs:
            kwargs["params"] = describe_selection(self.params)
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in kwargs.items())})"


def _strength(name: str) -> property:
    """A validated strength attribute; a change applies from the next backward."""

    def get(self: Regularizer) -> float:
        return self.__dict__[name]

    def set(self: Regularizer, value: Any) -> None:
        value = check_strength(value, f"{type(self).__name__} {name}")
        limit, dtype = self.__dict__.get("_limit", (math.inf, None))
        if value > limit:
            raise ValueError(
                f"{type(self).__name__} {name}={value!r} is beyond the largest {dtype} value ({limit!r}); this "
                f"rule regularizes {dtype} parameters, and a strength must be at most the largest value of "
                "their dtype"
            )
        self.__dict__[name] = value

    return property(get, set, doc=f"Strength ``{name}`` (>= 0); may be changed at any time.")


class _OneStrength(Regularizer):
    """A regularizer with one strength, ``lam``."""

    _strengths = ("lam",)
    lam = _strength("lam")

    @overload
    def __new__(cls, module: M, lam: float, *, params: Selection = None) -> M: ...
    @overload
    def __new__(cls: Type[R], lam: float, *, params: Selection = None) -> R: ...
    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        return super().__new__(cls, *args, **kwargs)

    def __init__(self, lam: float, *, params: Selection = None) -> None:
        self.lam = lam
        self._init_selection(params)


class L1(_OneStrength):
    """L1 (lasso) regularization: adds ``lam * sign(w)`` to each selected weight's gradient.

    The penalty is ``lam * sum(|w|)``; ``sign(0) = 0``, as autograd's gradient of ``abs``.

    Args:
        module: the layer (or whole model) to regularize. Omit it to get a rule for
            :func:`torchreg.apply_regularization` or :meth:`apply`.
        lam: strength, a finite number >= 0, at most the largest value of the regularized
            parameters' dtype (65504 for float16). May be changed later (``rule.lam = ...``): the new
            value applies from the next backward.
        params: which parameters: ``None`` (default) for the kernels (weights with at least two
            dimensions of size > 1, or of torch's Linear, Conv, Embedding, RNN and attention layers)
            of every layer but normalization layers, biases and per-channel scales excluded; a glob
            pattern or list of them over the names of ``module.named_parameters()``; or a predicate
            ``fn(name, parameter) -> bool``.

    Returns:
        With ``module``: the same module object, regularized (parameters, ``state_dict`` keys, forward
        and ``isinstance`` unchanged). Without: an ``L1`` rule.

    Raises:
        TypeError: ``module`` is not a module instance (a class: instantiate it; ``None``; a
            TorchScript module: regularize before scripting), or ``lam`` is no number.
        ValueError: ``lam`` is negative, NaN, infinite or beyond the parameters' dtype; the selection
            matches no parameter; or a parameter is regularized already. Nothing is changed then.

    Example::

        >>> import torch, torchreg
        >>> layer = torchreg.L1(torch.nn.Linear(3, 2), lam=0.5)
        >>> with torch.no_grad():
        ...     _ = layer.weight.fill_(-1.0)
        >>> layer(torch.ones(1, 3)).sum().backward()
        >>> layer.weight.grad   # data gradient 1.0 plus 0.5 * sign(-1.0)
        tensor([[0.5000, 0.5000, 0.5000],
                [0.5000, 0.5000, 0.5000]])
        >>> layer.bias.grad     # biases are not regularized by default
        tensor([1., 1.])
        >>> torchreg.L1(1e-4)   # a rule, for apply_regularization
        L1(lam=0.0001)
    """

    def penalty(self, param: Tensor) -> Tensor:
        return self.lam * param.abs().sum()

    def grad_(self, grad: Tensor, param: Tensor, alpha: float = 1.0, scale: Optional[Tensor] = None) -> None:
        if self.lam:
            add_sign_(grad, param, self.lam * alpha, scale)

    def _adder(self, alpha: float, scale: Optional[Tensor]) -> Optional[Adder]:
        if type(self).grad_ is not L1.grad_ or self.lam * alpha > _SMALLEST_MAX:
            return None
        return sign_adder(self.lam * alpha, scale) if self.lam else nothing


class L2(_OneStrength):
    """L2 regularization (weight decay): adds ``lam * w`` to each selected weight's gradient.

    The penalty is ``lam / 2 * sum(w ** 2)``, so that the gradient equals ``torch.optim``'s
    ``weight_decay=lam``. Keras' ``l2(lam)`` penalizes ``lam * sum(w ** 2)``: use ``L2(2 * lam)``.

    Args:
        module: the layer (or whole model) to regularize. Omit it to get a rule.
        lam: strength, a finite number >= 0; may be changed later (``rule.lam = ...``).
        params: which parameters; see :class:`L1`.

    Returns:
        With ``module``: the same module object, regularized. Without: an ``L2`` rule.

    Raises:
        TypeError, ValueError: as :class:`L1`.

    Example::

        >>> import torch, torchreg
        >>> layer = torchreg.L2(torch.nn.Linear(2, 1, bias=False), 0.1)
        >>> with torch.no_grad():
        ...     _ = layer.weight.copy_(torch.tensor([[1.0, -2.0]]))
        >>> layer(torch.zeros(1, 2)).sum().backward()   # data gradient 0
        >>> layer.weight.grad
        tensor([[ 0.1000, -0.2000]])
        >>> torchreg.penalty(layer)                      # 0.1 / 2 * (1 + 4)
        tensor(0.2500)
    """

    def penalty(self, param: Tensor) -> Tensor:
        return self.lam / 2 * sum_of_squares(param)

    def grad_(self, grad: Tensor, param: Tensor, alpha: float = 1.0, scale: Optional[Tensor] = None) -> None:
        if self.lam:
            add_scaled_(grad, param, self.lam * alpha, scale)

    def _adder(self, alpha: float, scale: Optional[Tensor]) -> Optional[Adder]:
        if type(self).grad_ is not L2.grad_ or self.lam * alpha > _SMALLEST_MAX:
            return None
        return scaled_adder(self.lam * alpha, scale) if self.lam else nothing


class ElasticNet(Regularizer):
    """Elastic-net regularization: adds ``l1 * sign(w) + l2 * w`` to each selected weight's gradient.

    The penalty is ``l1 * sum(|w|) + l2 / 2 * sum(w ** 2)`` (L2 in ``torch.optim``'s convention).

    Args:
        module: the layer (or whole model) to regularize. Omit it to get a rule.
        l1: L1 strength, a finite number >= 0; may be changed later.
        l2: L2 strength, a finite number >= 0; may be changed later.
        params: which parameters; see :class:`L1`.

    Returns:
        With ``module``: the same module object, regularized. Without: an ``ElasticNet`` rule.

    Raises:
        TypeError, ValueError: as :class:`L1`.

    Example::

        >>> import torch, torchreg
        >>> net = torch.nn.Sequential(
        ...     torchreg.ElasticNet(torch.nn.Linear(4, 4), l1=1e-4, l2=1e-3),
        ...     torch.nn.ReLU(),
        ...     torch.nn.Linear(4, 1),
        ... )
        >>> torchreg.ElasticNet(l1=1e-4, l2=1e-3)
        ElasticNet(l1=0.0001, l2=0.001)
    """

    _strengths = ("l1", "l2")
    l1 = _strength("l1")
    l2 = _strength("l2")

    @overload
    def __new__(cls, module: M, l1: float, l2: float, *, params: Selection = None) -> M: ...
    @overload
    def __new__(cls, l1: float, l2: float, *, params: Selection = None) -> "ElasticNet": ...
    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        return super().__new__(cls, *args, **kwargs)

    def __init__(self, l1: float, l2: float, *, params: Selection = None) -> None:
        self.l1 = l1
        self.l2 = l2
        self._init_selection(params)

    def penalty(self, param: Tensor) -> Tensor:
        return self.l1 * param.abs().sum() + self.l2 / 2 * sum_of_squares(param)

    def grad_(self, grad: Tensor, param: Tensor, alpha: float = 1.0, scale: Optional[Tensor] = None) -> None:
        add_elastic_(grad, param, self.l1 * alpha, self.l2 * alpha, scale)

    def _adder(self, alpha: float, scale: Optional[Tensor]) -> Optional[Adder]:
        l1, l2 = self.l1 * alpha, self.l2 * alpha
        if type(self).grad_ is not ElasticNet.grad_ or max(l1, l2) > _SMALLEST_MAX:
            return None
        if l1 and l2:
            return elastic_adder(l1, l2, scale)
        return sign_adder(l1, scale) if l1 else scaled_adder(l2, scale) if l2 else nothing
