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

from typing import Any, Dict, Optional, Tuple, Type, TypeVar, overload

import torch
from torch import Tensor, nn

from . import _engine
from ._ops import (
    Adder, add_elastic_, add_scaled_, add_sign_, elastic_adder, nothing, scaled_adder, sign_adder, sum_of_squares,
)
from ._select import Selection, check_selection, describe_selection, select
from ._validate import check_module, check_strength

__all__ = ["Regularizer", "L1", "L2", "ElasticNet", "GroupLasso"]

M = TypeVar("M", bound=nn.Module)
R = TypeVar("R", bound="Regularizer")


def _rebuild(cls: type, kwargs: Dict[str, Any]) -> "Regularizer":
    return cls(**kwargs)


class Regularizer:
    """Base class of :class:`L1`, :class:`L2` and :class:`ElasticNet`.

    A subclass names its strengths in ``_strengths`` and defines :meth:`penalty` and :meth:`grad_`;
    it needs no hook code: when the gradient is added is the engine's business. A proximal one also
    defines :meth:`prox_`; which step it gets after which optimizer is ``torchreg/_prox.py``'s business.
    """

    _strengths: tuple = ()

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        if cls is Regularizer:
            raise TypeError("Regularizer is a base class; use torchreg.L1, torchreg.L2 or torchreg.ElasticNet")
        module = kwargs.pop("module", None)
        if module is None and args and (
            isinstance(args[0], nn.Module) or len(args) > len(cls._strengths)
            or (isinstance(args[0], type) and issubclass(args[0], nn.Module))
        ):
            module, args = args[0], args[1:]
        if module is None:
            return super().__new__(cls)
        check_module(module, f"torchreg.{cls.__name__}")
        return cls(*args, **kwargs).apply(module)

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

    # -- proximal mode (torchreg/_prox.py says when and with which step) --------------------------
    @property
    def proximal(self) -> bool:
        """True: nothing is added at backward; after each optimizer step the parameter is replaced by
        :meth:`prox_` (see ``torchreg/_prox.py``). Fixed at construction."""
        return self.__dict__.get("proximal", False)

    def prox_(self, param: Tensor, step: Any) -> None:
        """Replace ``param`` in place by the proximal operator of its penalty with step ``step``:
        ``argmin_x penalty(x) + sum_i (x_i - param_i) ** 2 / (2 * step_i)``.

        ``step`` is a positive float (the same for every element: plain SGD's learning rate) or a
        tensor of positive steps broadcastable to ``param`` (Adam's per-coordinate ``lr / denom``). A
        step tensor of ``param``'s shape is a temporary made for this call: it may be overwritten.
        """
        raise NotImplementedError(f"{type(self).__name__} has no proximal operator")

    def _check_param(self, name: str, param: Tensor) -> None:
        """Raise ``ValueError`` if this rule cannot regularize ``param`` (called before anything changes)."""

    def _coupled_dims(self, param: Tensor) -> Tuple[int, ...]:
        """Dimensions along which the penalty couples elements (none: elementwise). A sharded parameter
        split along one of them cannot take its proximal operator shard by shard."""
        return ()

    def _init_proximal(self, proximal: Any) -> None:
        if not isinstance(proximal, bool):
            raise TypeError(f"{type(self).__name__} proximal must be True or False, got {proximal!r} "
                            f"({type(proximal).__name__})")
        self.__dict__["proximal"] = proximal

    # -- use ------------------------------------------------------------------------------------
    def apply(self, module: M) -> M:
        """Regularize ``module`` in place with this rule and return the same module.

        All parameters of ``module`` and its submodules that the rule selects are covered, as one
        unit: whenever a backward reaches any of them, each gets its gradient term once.

        Raises:
            TypeError: ``module`` is not an ``nn.Module`` instance.
            ValueError: the selection matches no parameter, or a parameter is regularized already.
        """
        check_module(module, f"{type(self).__name__}.apply")
        chosen = select(module, self.params, recurse=True)
        if not chosen:
            raise ValueError(
                f"{self!r} selects no parameter of {type(module).__name__} (selection: "
                f"{describe_selection(self.params)}; its parameters: "
                f"{[name for name, _ in module.named_parameters()]})"
            )
        return _engine.attach(module, [_engine.Entry(name, p, self) for name, p in chosen])

    # -- plumbing ---------------------------------------------------------------------------
    def _init_selection(self, params: Selection) -> None:
        self.params = check_selection(params)

    def _kwargs(self) -> Dict[str, Any]:
        kwargs = {name: getattr(self, name) for name in self._strengths}
        if self.params is not None:
            kwargs["params"] = self.params
        if self.proximal:
            kwargs["proximal"] = True
        return kwargs

    def __reduce__(self) -> Any:
        return (_rebuild, (type(self), self._kwargs()))

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
        self.__dict__[name] = check_strength(value, f"{type(self).__name__} {name}")

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


def _soft_threshold_(p: Tensor, step: Any, lam: float) -> None:
    """``p <- sgn(p) * max(|p| - step * lam, 0)`` in place; ``step`` a float >= 0 or a tensor of them
    broadcastable to ``p``. A float step on a real tensor is one pass and no temporary; a tensor step
    four passes and one temporary (``step`` is not changed)."""
    if not isinstance(step, Tensor):
        tau = step * lam
        if tau <= 0:
            return
        if not p.is_complex():
            torch._C._nn.softshrink(p, float(tau), out=p)
            return
    if p.is_complex():
        tau = step * lam
        mag = p.abs()
        p.mul_(torch.where(mag > tau, 1 - tau / mag, 0))
        return
    shrunk = p.abs()
    torch.sub(shrunk, step, alpha=lam, out=shrunk)
    torch.copysign(shrunk.clamp_(min=0), p, out=p)


class L1(_OneStrength):
    """L1 (lasso) regularization: adds ``lam * sign(w)`` to each selected weight's gradient.

    The penalty is ``lam * sum(|w|)``; ``sign(0) = 0``, as autograd's gradient of ``abs``.

    Args:
        module: the layer (or whole model) to regularize. Omit it to get a rule for
            :func:`torchreg.apply_regularization` or :meth:`apply`.
        lam: strength, a finite number >= 0. May be changed later (``rule.lam = ...``): the new value
            applies from the next backward.
        proximal: keyword only. ``False`` (default): add ``lam * sign(w)`` at backward. ``True``: add
            nothing at backward; after every step of a ``torch.optim`` SGD, Adam or AdamW optimizer
            holding the weight, soft-threshold it, ``w <- sign(w) * max(|w| - t * lam, 0)``, with the
            step ``t`` that makes the training's fixed point the exact minimizer of
            ``loss + penalty`` (lr for SGD, ``lr * (1 - dampening) / (1 - momentum)`` with momentum,
            ``lr / (1 - momentum)`` for Nesterov, ``lr / (sqrt(v_hat) + eps)`` per coordinate for
            Adam): weights become exactly zero. Any other optimizer raises at its first step.
        params: which parameters: ``None`` (default) for the weights of every layer but
            normalization layers, biases excluded; a glob pattern or list of them over the names of
            ``module.named_parameters()``; or a predicate ``fn(name, parameter) -> bool``.

    Returns:
        With ``module``: the same module object, regularized (parameters, ``state_dict`` keys, forward
        and ``isinstance`` unchanged). Without: an ``L1`` rule.

    Raises:
        TypeError: ``module`` is not a module instance (a class: instantiate it), or ``lam`` is no number.
        ValueError: ``lam`` is negative, NaN or infinite; the selection matches no parameter; or a
            parameter is regularized already.

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

    Proximal mode: exact zeros, applied by ``optimizer.step()``::

        >>> layer = torchreg.L1(torch.nn.Linear(2, 1, bias=False), lam=1.0, proximal=True)
        >>> with torch.no_grad():
        ...     _ = layer.weight.copy_(torch.tensor([[0.3, -2.0]]))
        >>> opt = torch.optim.SGD(layer.parameters(), lr=0.5)
        >>> layer(torch.zeros(1, 2)).sum().backward()   # data gradient 0, nothing added
        >>> opt.step()                                    # then w <- soft(w, lr * lam)
        >>> layer.weight
        Parameter containing:
        tensor([[ 0.0000, -1.5000]], requires_grad=True)
    """

    @overload
    def __new__(cls, module: M, lam: float, *, proximal: bool = False, params: Selection = None) -> M: ...
    @overload
    def __new__(cls, lam: float, *, proximal: bool = False, params: Selection = None) -> "L1": ...
    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        return super().__new__(cls, *args, **kwargs)

    def __init__(self, lam: float, *, proximal: bool = False, params: Selection = None) -> None:
        super().__init__(lam, params=params)
        self._init_proximal(proximal)

    def penalty(self, param: Tensor) -> Tensor:
        return self.lam * param.abs().sum()

    def prox_(self, param: Tensor, step: Any) -> None:
        """``param <- sgn(param) * max(|param| - step * lam, 0)`` (soft thresholding), in place."""
        if self.lam:
            _soft_threshold_(param, step, self.lam)

    def grad_(self, grad: Tensor, param: Tensor, alpha: float = 1.0, scale: Optional[Tensor] = None) -> None:
        if self.lam:
            add_sign_(grad, param, self.lam * alpha, scale)

    def _adder(self, alpha: float, scale: Optional[Tensor]) -> Optional[Adder]:
        if type(self).grad_ is not L1.grad_:
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
        if type(self).grad_ is not L2.grad_:
            return None
        return scaled_adder(self.lam * alpha, scale) if self.lam else nothing


class ElasticNet(Regularizer):
    """Elastic-net regularization: adds ``l1 * sign(w) + l2 * w`` to each selected weight's gradient.

    The penalty is ``l1 * sum(|w|) + l2 / 2 * sum(w ** 2)`` (L2 in ``torch.optim``'s convention).

    Args:
        module: the layer (or whole model) to regularize. Omit it to get a rule.
        l1: L1 strength, a finite number >= 0; may be changed later.
        l2: L2 strength, a finite number >= 0; may be changed later.
        proximal: keyword only; ``True``: nothing at backward, and after each optimizer step
            ``w <- soft(w, t * l1) / (1 + t * l2)``, the proximal operator of the penalty with the step
            ``t`` of :class:`L1`'s proximal mode (exact zeros; the fixed point is the minimizer of
            ``loss + penalty``, as scikit-learn's ``ElasticNet(alpha, l1_ratio)`` with
            ``l1 = alpha * l1_ratio`` and ``l2 = alpha * (1 - l1_ratio)``).
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
    def __new__(cls, module: M, l1: float, l2: float, *, proximal: bool = False, params: Selection = None) -> M: ...
    @overload
    def __new__(cls, l1: float, l2: float, *, proximal: bool = False, params: Selection = None) -> "ElasticNet": ...
    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        return super().__new__(cls, *args, **kwargs)

    def __init__(self, l1: float, l2: float, *, proximal: bool = False, params: Selection = None) -> None:
        self.l1 = l1
        self.l2 = l2
        self._init_proximal(proximal)
        self._init_selection(params)

    def prox_(self, param: Tensor, step: Any) -> None:
        """``param <- soft(param, step * l1) / (1 + step * l2)``, in place."""
        if self.l1:
            _soft_threshold_(param, step, self.l1)
        if self.l2:
            param.div_(step * self.l2 + 1)

    def penalty(self, param: Tensor) -> Tensor:
        return self.l1 * param.abs().sum() + self.l2 / 2 * sum_of_squares(param)

    def grad_(self, grad: Tensor, param: Tensor, alpha: float = 1.0, scale: Optional[Tensor] = None) -> None:
        add_elastic_(grad, param, self.l1 * alpha, self.l2 * alpha, scale)

    def _adder(self, alpha: float, scale: Optional[Tensor]) -> Optional[Adder]:
        if type(self).grad_ is not ElasticNet.grad_:
            return None
        l1, l2 = self.l1 * alpha, self.l2 * alpha
        if l1 and l2:
            return elastic_adder(l1, l2, scale)
        return sign_adder(l1, scale) if l1 else scaled_adder(l2, scale) if l2 else nothing


class GroupLasso(_OneStrength):
    """Group lasso: ``lam * sum_g ||w_g||_2``, a group ``g`` being every weight with index ``g`` along ``dim``.

    For ``nn.Linear`` (weight ``out x in``), ``dim=0`` groups a neuron's incoming weights and ``dim=1``
    an input feature's outgoing weights (zero groups: pruned inputs); for convolutions ``dim=0`` is a
    filter and ``dim=1`` an input channel. Groups are not weighted by their size (as scikit-learn's
    ``MultiTaskLasso``). In gradient mode ``lam * w_g / ||w_g||`` is added to the gradient (0 for a zero
    group); with ``proximal=True`` nothing is added at backward and after each optimizer step
    ``w_g <- w_g * max(0, 1 - step * lam / ||w_g||)`` (under Adam the step is per coordinate, and the
    group's operator is found exactly by a one-dimensional root-find, see :meth:`prox_`).

    Args:
        module: the layer (or whole model) to regularize. Omit it to get a rule.
        lam: strength, a finite number >= 0; may be changed later (``rule.lam = ...``).
        dim: the dimension that indexes the groups (keyword only; negative counts from the end). Every
            selected parameter must have at least 2 dimensions and ``dim`` among them.
        proximal: apply the proximal operator after each optimizer step instead of a gradient term:
            groups become exactly zero (keyword only; see :class:`L1`).
        params: which parameters; see :class:`L1`.

    Raises:
        TypeError: as :class:`L1`; ``dim`` is no int or ``proximal`` no bool.
        ValueError: as :class:`L1`; a selected parameter has fewer than 2 dimensions or no ``dim``.

    Example::

        >>> import torch, torchreg
        >>> layer = torchreg.GroupLasso(torch.nn.Linear(2, 2, bias=False), lam=1.0, dim=1)
        >>> with torch.no_grad():
        ...     _ = layer.weight.copy_(torch.tensor([[3.0, 0.0], [4.0, 0.0]]))
        >>> torchreg.penalty(layer)          # column norms 5 and 0
        tensor(5.)
        >>> layer(torch.zeros(1, 2)).sum().backward()
        >>> layer.weight.grad                # w_g / ||w_g||; 0 for the zero column
        tensor([[0.6000, 0.0000],
                [0.8000, 0.0000]])
        >>> torchreg.GroupLasso(lam=1e-3, dim=1, proximal=True)
        GroupLasso(lam=0.001, dim=1, proximal=True)
    """

    #: Newton iterations at most per group in the per-coordinate prox (it converges monotonically).
    max_newton_steps = 100

    @overload
    def __new__(cls, module: M, lam: float, *, dim: int = 0, proximal: bool = False,
                params: Selection = None) -> M: ...
    @overload
    def __new__(cls, lam: float, *, dim: int = 0, proximal: bool = False,
                params: Selection = None) -> "GroupLasso": ...
    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        return super().__new__(cls, *args, **kwargs)

    def __init__(self, lam: float, *, dim: int = 0, proximal: bool = False, params: Selection = None) -> None:
        if isinstance(dim, bool) or not isinstance(dim, int):
            raise TypeError(f"GroupLasso dim must be an int, got {dim!r} ({type(dim).__name__})")
        super().__init__(lam, params=params)
        self.dim = dim
        self._init_proximal(proximal)

    def _kwargs(self) -> Dict[str, Any]:
        kwargs = super()._kwargs()
        return {"lam": kwargs.pop("lam"), "dim": self.dim, **kwargs}

    def _check_param(self, name: str, param: Tensor) -> None:
        if isinstance(param, nn.parameter.UninitializedParameter):
            return
        if param.ndim < 2 or not -param.ndim <= self.dim < param.ndim:
            raise ValueError(
                f"{self!r}: parameter {name!r} has shape {tuple(param.shape)}; groups along dim "
                f"{self.dim} need a parameter with at least 2 dimensions and dim in "
                f"[{-max(param.ndim, 2)}, {max(param.ndim, 2) - 1}]. Exclude it with params=... or choose "
                "another dim"
            )

    def _other_dims(self, param: Tensor) -> Tuple[int, ...]:
        dim = self.dim % param.ndim
        return tuple(d for d in range(param.ndim) if d != dim)

    def _coupled_dims(self, param: Tensor) -> Tuple[int, ...]:
        return self._other_dims(param)

    def group_norms(self, param: Tensor) -> Tensor:
        """``||w_g||_2`` of every group, a 1-D tensor of length ``param.shape[dim]``."""
        return torch.linalg.vector_norm(param, dim=self._other_dims(param))

    def penalty(self, param: Tensor) -> Tensor:
        return self.lam * self.group_norms(param).sum()

    def grad_(self, grad: Tensor, param: Tensor, alpha: float = 1.0, scale: Optional[Tensor] = None) -> None:
        if not self.lam:
            return
        norms = torch.linalg.vector_norm(param, dim=self._other_dims(param), keepdim=True)
        coef = torch.where(norms > 0, norms.reciprocal().mul_(self.lam * alpha), 0)
        grad.addcmul_(param, coef if scale is None else coef.mul_(scale))

    def prox_(self, param: Tensor, step: Any) -> None:
        """``w_g <- w_g * max(0, 1 - step * lam / ||w_g||)`` for a step shared by all elements.

        With a step per coordinate ``s_i`` (Adam), the operator ``argmin_x lam * ||x|| +
        sum_i (x_i - z_i) ** 2 / (2 * s_i)`` of a group ``z`` has no closed form. With ``a_i = lam * s_i``:
        ``x = 0`` when ``sum_i (z_i / a_i) ** 2 <= 1``; otherwise ``x_i = z_i * r / (r + a_i)`` where
        ``r = ||x|| > 0`` solves ``S(r) = sum_i z_i ** 2 / (r + a_i) ** 2 = 1``. ``S(r) ** -0.5`` is a
        weighted power mean of exponent -2 of the ``r + a_i`` (up to a constant factor), hence concave
        and increasing in ``r`` (and linear when all ``a_i`` are equal). Newton's method on
        ``S(r) ** -0.5 = 1`` started left of the root, at ``max(0, ||z|| - max_i a_i)``, therefore
        increases monotonically to it (in one step for equal ``a_i``, the closed form); it stops when
        no group's ``r`` moves by more than a few ulps (at most :attr:`max_newton_steps` steps; two
        to four in practice). Every group is solved at once: a few passes over the tensor per step.
        """
        if not self.lam:
            return
        others = self._other_dims(param)
        if not isinstance(step, Tensor) or step.numel() == 1:
            t = step * self.lam
            if not isinstance(t, Tensor) and t <= 0:
                return
            norms = torch.linalg.vector_norm(param, dim=others, keepdim=True)
            param.mul_(norms.reciprocal_().mul_(-t).add_(1).clamp_(min=0))
            return
        a = step.mul_(self.lam) if step.shape == param.shape else torch.broadcast_to(step * self.lam, param.shape)
        z2 = param.abs().square_() if param.is_complex() else param.square()
        inv = a.reciprocal()
        t = z2 * inv
        keep = t.mul_(inv).sum(others, keepdim=True) > 1  # S(0) > 1: the group is not zero
        r = (z2.sum(others, keepdim=True).sqrt_() - a.amax(others, keepdim=True)).clamp_(min=0)
        tol = 16 * torch.finfo(r.dtype).eps
        for _ in range(self.max_newton_steps):
            torch.add(a, r, out=inv).reciprocal_()
            torch.mul(z2, inv, out=t).mul_(inv)
            total = t.sum(others, keepdim=True)  # S(r)
            slope = t.mul_(inv).sum(others, keepdim=True)  # -S'(r) / 2
            delta = torch.where(keep & (total > 1), (total.pow(1.5) - total) / slope, 0)
            r = r + delta
            if bool((delta <= tol * r).all()):
                break
        torch.add(a, r, out=inv)
        param.mul_(torch.div(r, inv, out=inv).mul_(keep))
