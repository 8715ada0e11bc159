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
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Tuple, Type, TypeVar, Union, overload

import torch
from torch import Tensor, nn

from . import _engine
from ._anchor import Anchored, add_l1_, add_l2_, l1_penalty, l2_penalty, shifted_
from ._base import Rule
from ._ops import _FLOAT16_MAX
from ._ops import (
    Adder, add_elastic_, add_scaled_, add_sign_, elastic_adder, nothing, scaled_adder, sign_adder, sum_of_squares,
)
from ._select import Selection
from ._validate import check_strength, largest

__all__ = ["Regularizer", "L1", "L2", "ElasticNet", "GroupLasso", "Orthogonal", "strength"]

M = TypeVar("M", bound=nn.Module)
#: ``center=``: None (toward 0), "init" (the value when applied), {name: tensor} or a module.
Center = Union[None, str, Mapping[str, Tensor], nn.Module]
#: ``importance=``: None or {name: tensor >= 0} (e.g. :func:`torchreg.fisher_diagonal`).
Importance = Optional[Mapping[str, Tensor]]
R = TypeVar("R", bound="Regularizer")


#: Strength coefficients above this may not fit a parameter's dtype (float16's largest value); the
#: adders then leave the work to :meth:`Regularizer.grad_`, which gives autograd's inf on overflow.
_SMALLEST_MAX = _FLOAT16_MAX


class Regularizer(Rule):
    """Base class of torchreg's regularizers, and the contract a new one is written to.

    torchreg's own: :class:`L1`, :class:`L2`, :class:`ElasticNet`, :class:`GroupLasso`,
    :class:`Orthogonal`, and the activity regularizers :class:`torchreg.ActivityL1` and
    :class:`torchreg.ActivityL2`. A regularizer is only its maths; *when* its gradient is added (hooks,
    backward sessions, accumulation, grad scalers, DDP) is the engine's business, and *which step* a
    proximal operator gets after which optimizer is the after-step module's. A subclass:

    * names its strengths in ``_strengths`` (each a :func:`strength` attribute: validated, settable at
      any time) and sets them in ``__init__``; calls ``self._init_selection(params)``;
    * defines :meth:`penalty` (the formula, with autograd-able torch ops) and :meth:`grad_` (adds
      ``alpha * scale * d penalty / d param`` to ``grad`` in place);
    * optionally defines :meth:`prox_` (then ``self._init_proximal(proximal)`` in ``__init__`` enables
      ``proximal=True``), :meth:`init_state` (per-parameter state, e.g. an anchor: then ``state=`` is
      passed to :meth:`penalty`, :meth:`grad_` and :meth:`prox_`), ``_check_param`` (refuse a parameter
      before anything changes) and ``_coupled_dims`` (the dimensions its penalty couples, for sharded
      parameters);
    * gives its constructor arguments back in ``_kwargs()`` when it has options beyond its strengths,
      ``params`` and ``proximal`` (repr and the config format use it).

    It is then used like the built-in ones: ``MyReg(layer, 0.1)``, ``MyReg(0.1)`` as a rule for
    :func:`torchreg.apply_regularization`, and every mechanism of torchreg (accumulation, GradScaler,
    DDP, checkpointing, ``torch.compile``, copies) applies to it.

    Example (a complete regularizer, the smooth ``lam * sum(log(cosh(w)))``)::

        >>> import torch, torchreg
        >>> class LogCosh(torchreg.Regularizer):
        ...     _strengths = ("lam",)
        ...     lam = torchreg.regularizers.strength("lam")
        ...     def __init__(self, lam, *, params=None):
        ...         self.lam = lam
        ...         self._init_selection(params)
        ...     def penalty(self, param):
        ...         return self.lam * torch.log(torch.cosh(param)).sum()
        ...     def grad_(self, grad, param, alpha=1.0, scale=None):
        ...         term = torch.tanh(param) * (self.lam * alpha)
        ...         grad.add_(term if scale is None else term * scale)
        >>> layer = LogCosh(torch.nn.Linear(2, 1, bias=False), 0.5)
        >>> with torch.no_grad():
        ...     _ = layer.weight.copy_(torch.tensor([[0.0, 1.0]]))
        >>> layer(torch.zeros(1, 2)).sum().backward()      # data gradient 0
        >>> layer.weight.grad                               # 0.5 * tanh(w)
        tensor([[0.0000, 0.3808]])
        >>> LogCosh(0.1)
        LogCosh(lam=0.1)
    """

    _base = True
    _strengths: tuple = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._positional = cls._strengths  # L1(layer, 1e-4), ElasticNet(layer, 1e-4, 1e-3)

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # pragma: no cover - replaced by subclasses
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

    def init_state(self, name: str, param: Tensor) -> Optional[Dict[str, Tensor]]:
        """Per-parameter state for ``param`` (named ``name`` under the module the rule is applied to), or
        None (the default: no state).

        Called once per selected parameter when the rule is applied, before anything changes: raise
        ``ValueError``/``TypeError`` to refuse. The returned tensors are kept once per parameter by the
        engine (not by the rule), passed as ``state=`` to :meth:`penalty`, :meth:`grad_` and
        :meth:`prox_`, moved to the parameter's device and dtype before use, copied with the model
        (``deepcopy``, ``torch.save``), and never put in ``state_dict()``. ``param`` may be an
        uninitialized (lazy) parameter: raise if the state needs its values.
        """
        return None

    def _decays_to_zero(self) -> float:
        """The strength of an L2 penalty toward zero in this rule (0: none); an optimizer's own
        ``weight_decay`` on the same parameter would decay it twice (a warning at the first step)."""
        return 0.0

    @property
    def is_zero(self) -> bool:
        """Whether every strength is 0 (then the gradient is left exactly as it is)."""
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

    # -- proximal mode (torchreg/_after_step.py says when and with which step) ---------------------
    @property
    def proximal(self) -> bool:
        """Whether the rule is proximal (fixed at construction). If so, nothing is added at backward, and
        after each optimizer step the parameter is replaced by :meth:`prox_` (see ``torchreg/_after_step.py``)."""
        return self.__dict__.get("proximal", False)

    @property
    def acts_after_step(self) -> bool:
        """Whether the after-step hooks act on this rule's parameters (for a regularizer, whether it is proximal)."""
        return self.proximal

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
        if proximal and type(self).prox_ is Regularizer.prox_:
            raise ValueError(f"{type(self).__name__} has no proximal operator (prox_); use proximal=False")
        self.__dict__["proximal"] = proximal

    # -- use ------------------------------------------------------------------------------------
    def _attach(self, module: nn.Module, chosen: List[Tuple[str, Tensor]]) -> None:
        self._check_fits(chosen)
        _engine.attach(module, [_engine.Entry(name, p, self) for name, p in chosen])
        self._applied_to([p for _, p in chosen])

    def _kwargs(self) -> Dict[str, Any]:
        kwargs = {name: getattr(self, name) for name in self._strengths}
        if self.params is not None:
            kwargs["params"] = self.params
        if self.proximal:
            kwargs["proximal"] = True
        return kwargs


def strength(name: str) -> property:
    """A validated strength attribute named ``name`` for a :class:`Regularizer` subclass: a finite real
    number >= 0 (a one-element tensor is taken as its value), at most the largest value of the dtype of
    the parameters the rule regularizes; a change applies from the next backward."""

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
    lam = strength("lam")

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


class L1(Anchored, _OneStrength):
    """L1 (lasso) regularization: adds ``lam * sign(w)`` to each selected weight's gradient.

    The penalty is ``lam * sum(|w|)``; ``sign(0) = 0``, as autograd's gradient of ``abs``. With a
    center ``c`` (``center=``) it is ``lam * sum(|w - c|)``, the gradient ``lam * sign(w - c)``, and the
    proximal operator ``c + soft(w - c, t * lam)``: the weights it thresholds land exactly on their
    center (sparse fine-tuning deltas).

    Args:
        module: the layer (or whole model) to regularize. Omit it to get a rule for
            :func:`torchreg.apply_regularization` or :meth:`apply`.
        lam: strength, a finite number >= 0, at most the largest value of the regularized
            parameters' dtype (65504 for float16). May be changed later (``rule.lam = ...``): the new
            value applies from the next backward.
        center: keyword only; the anchor the penalty pulls toward. ``None`` (default): 0.
            ``"init"``: each weight's value when the rule is applied. A mapping from parameter names
            (as ``named_parameters()`` of the module the rule is applied to) to tensors of the same
            shapes, e.g. a pretrained model's ``state_dict()``; or an ``nn.Module`` with those
            parameter names (the pretrained model). The anchors are copied once per parameter when
            the rule is applied (then the rule keeps no reference to the mapping or module; a rule
            with one is applied once), follow the parameter's device and dtype, and are not in
            ``state_dict()``: to resume from a checkpoint, apply the rule again with the same
            ``center=``.
        proximal: keyword only. ``False`` (default): add ``lam * sign(w)`` at backward. ``True``: add
            nothing at backward; after every step of a ``torch.optim`` SGD, Adam or AdamW optimizer
            holding the weight, soft-threshold it, ``w <- sign(w) * max(|w| - t * lam, 0)``, with the
            step ``t`` that makes the training's fixed point the exact minimizer of
            ``loss + penalty`` (lr for SGD, ``lr * (1 - dampening) / (1 - momentum)`` with momentum,
            ``lr / (1 - momentum)`` for Nesterov, ``lr / (sqrt(v_hat) + eps)`` per coordinate for
            Adam): weights become exactly zero. Any other optimizer raises at its first step.
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
            matches no parameter; a parameter is regularized already; ``center`` is a string other
            than ``"init"``, has no tensor for a selected parameter, or one of another shape. Nothing
            is changed then.

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

    Toward an anchor (here the weights' values when the rule is applied)::

        >>> layer = torchreg.L1(torch.nn.Linear(2, 1, bias=False), lam=1.0, center="init", proximal=True)
        >>> anchor = layer.weight.detach().clone()
        >>> opt = torch.optim.SGD(layer.parameters(), lr=0.5)
        >>> layer(torch.ones(1, 2)).sum().backward()      # data gradient 1: a step of -0.5
        >>> opt.step()                                    # then soft(w - c, 0.5): back to c
        >>> torch.equal(layer.weight, anchor)
        True
        >>> torchreg.L1(1e-4, center="init", proximal=True)
        L1(lam=0.0001, center='init', proximal=True)
    """

    @overload
    def __new__(cls, module: M, lam: float, *, center: Center = None, proximal: bool = False,
                params: Selection = None) -> M: ...
    @overload
    def __new__(cls, lam: float, *, center: Center = None, proximal: bool = False,
                params: Selection = None) -> "L1": ...
    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        return super().__new__(cls, *args, **kwargs)

    def __init__(self, lam: float, *, center: Center = None, proximal: bool = False,
                 params: Selection = None) -> None:
        super().__init__(lam, params=params)
        self._init_proximal(proximal)
        self._init_anchor(center)

    def _kwargs(self) -> Dict[str, Any]:
        return self._with_anchor(super()._kwargs())

    def penalty(self, param: Tensor, state: Optional[Dict[str, Tensor]] = None) -> Tensor:
        return self.lam * l1_penalty(param, None if state is None else state["center"])

    def prox_(self, param: Tensor, step: Any, state: Optional[Dict[str, Tensor]] = None) -> None:
        """``param <- c + sgn(param - c) * max(|param - c| - step * lam, 0)`` (soft thresholding around
        the center ``c``, 0 without one), in place: the coordinates it thresholds become exactly ``c``."""
        if self.lam and (isinstance(step, Tensor) or step > 0):
            shifted_(param, None if state is None else state["center"],
                     lambda d: _soft_threshold_(d, step, self.lam))

    def grad_(self, grad: Tensor, param: Tensor, alpha: float = 1.0, scale: Optional[Tensor] = None,
              state: Optional[Dict[str, Tensor]] = None) -> None:
        if not self.lam:
            return
        if state is None:
            add_sign_(grad, param, self.lam * alpha, scale)
        else:
            add_l1_(grad, param, state["center"], self.lam * alpha, scale)

    def _adder(self, alpha: float, scale: Optional[Tensor]) -> Optional[Adder]:
        if type(self).grad_ is not L1.grad_ or self.lam * alpha > _SMALLEST_MAX or self.center is not None:
            return None
        return sign_adder(self.lam * alpha, scale) if self.lam else nothing


class L2(Anchored, _OneStrength):
    """L2 regularization (weight decay): adds ``lam * w`` to each selected weight's gradient.

    The penalty is ``lam / 2 * sum(w ** 2)``, so that the gradient equals ``torch.optim``'s
    ``weight_decay=lam``. Keras' ``l2(lam)`` penalizes ``lam * sum(w ** 2)``: use ``L2(2 * lam)``.
    Toward an anchor ``c`` (``center=``): ``lam / 2 * sum((w - c) ** 2)``, gradient ``lam * (w - c)``
    (L2-SP, for fine-tuning); with an importance ``F`` (``importance=``):
    ``lam / 2 * sum(F * (w - c) ** 2)``, gradient ``lam * F * (w - c)`` (EWC, for continual learning;
    ``F`` from :func:`torchreg.fisher_diagonal`).

    Args:
        module: the layer (or whole model) to regularize. Omit it to get a rule.
        lam: strength, a finite number >= 0; may be changed later (``rule.lam = ...``).
        center: keyword only; ``None`` (default, toward 0), ``"init"``, a mapping from parameter names
            to tensors (a ``state_dict()``) or an ``nn.Module``; see :class:`L1`.
        importance: keyword only; ``None`` (default) or a mapping from parameter names to tensors
            ``>= 0`` of the parameters' shapes, copied once per parameter as the center is; needs a
            ``center``.
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

    L2-SP toward pretrained weights, the new head left out by a ``None`` rule::

        >>> from torch import nn
        >>> pretrained = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 5))
        >>> model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))   # a new head: 2 outputs
        >>> _ = model[0].load_state_dict(pretrained[0].state_dict())
        >>> model = torchreg.apply_regularization(model, {"2": None, nn.Linear: torchreg.L2(1e-2, center=pretrained)})
        >>> torchreg.penalty(model)                      # at the anchor
        tensor(0.)
        >>> torchreg.L2(1.0, center="init", importance={"0.weight": torch.ones(4, 3)})
        L2(lam=1.0, center='init', importance=<dict of 1>)
    """

    _has_importance = True

    def _decays_to_zero(self) -> float:
        return self.lam if getattr(self, "center", None) is None else 0.0

    @overload
    def __new__(cls, module: M, lam: float, *, center: Center = None, importance: Importance = None,
                params: Selection = None) -> M: ...
    @overload
    def __new__(cls, lam: float, *, center: Center = None, importance: Importance = None,
                params: Selection = None) -> "L2": ...
    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        return super().__new__(cls, *args, **kwargs)

    def __init__(self, lam: float, *, center: Center = None, importance: Importance = None,
                 params: Selection = None) -> None:
        super().__init__(lam, params=params)
        self._init_anchor(center, importance)

    def _kwargs(self) -> Dict[str, Any]:
        return self._with_anchor(super()._kwargs())

    def penalty(self, param: Tensor, state: Optional[Dict[str, Tensor]] = None) -> Tensor:
        if state is None:
            return self.lam / 2 * sum_of_squares(param)
        return self.lam / 2 * l2_penalty(param, state["center"], state.get("importance"))

    def grad_(self, grad: Tensor, param: Tensor, alpha: float = 1.0, scale: Optional[Tensor] = None,
              state: Optional[Dict[str, Tensor]] = None) -> None:
        if not self.lam:
            return
        if state is None:
            add_scaled_(grad, param, self.lam * alpha, scale)
        else:
            add_l2_(grad, param, state["center"], state.get("importance"), self.lam * alpha, scale)

    def _adder(self, alpha: float, scale: Optional[Tensor]) -> Optional[Adder]:
        if type(self).grad_ is not L2.grad_ or self.lam * alpha > _SMALLEST_MAX or self.center is not None:
            return None
        return scaled_adder(self.lam * alpha, scale) if self.lam else nothing


class ElasticNet(Anchored, Regularizer):
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
        center: keyword only; the anchor both terms pull toward (``w - c`` in place of ``w``; the
            proximal operator becomes ``c + soft(w - c, t * l1) / (1 + t * l2)``); ``None`` (default),
            ``"init"``, a mapping or a module, see :class:`L1`.
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
    l1 = strength("l1")
    l2 = strength("l2")

    @overload
    def __new__(cls, module: M, l1: float, l2: float, *, center: Center = None, proximal: bool = False,
                params: Selection = None) -> M: ...
    @overload
    def __new__(cls, l1: float, l2: float, *, center: Center = None, proximal: bool = False,
                params: Selection = None) -> "ElasticNet": ...
    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        return super().__new__(cls, *args, **kwargs)

    def __init__(self, l1: float, l2: float, *, center: Center = None, proximal: bool = False,
                 params: Selection = None) -> None:
        self.l1 = l1
        self.l2 = l2
        self._init_proximal(proximal)
        self._init_selection(params)
        self._init_anchor(center)

    def _decays_to_zero(self) -> float:
        return self.l2 if getattr(self, "center", None) is None else 0.0

    def _kwargs(self) -> Dict[str, Any]:
        return self._with_anchor(super()._kwargs())

    def prox_(self, param: Tensor, step: Any, state: Optional[Dict[str, Tensor]] = None) -> None:
        """``param <- c + soft(param - c, step * l1) / (1 + step * l2)`` (``c`` the center, 0 without
        one), in place."""
        if not (self.l1 or self.l2) or (not isinstance(step, Tensor) and step <= 0):
            return

        def centered_(d: Tensor) -> None:
            if self.l1:
                _soft_threshold_(d, step, self.l1)
            if self.l2:
                d.div_(step * self.l2 + 1)

        shifted_(param, None if state is None else state["center"], centered_)

    def penalty(self, param: Tensor, state: Optional[Dict[str, Tensor]] = None) -> Tensor:
        center = None if state is None else state["center"]
        return self.l1 * l1_penalty(param, center) + self.l2 / 2 * l2_penalty(param, center)

    def grad_(self, grad: Tensor, param: Tensor, alpha: float = 1.0, scale: Optional[Tensor] = None,
              state: Optional[Dict[str, Tensor]] = None) -> None:
        if state is None:
            add_elastic_(grad, param, self.l1 * alpha, self.l2 * alpha, scale)
        else:
            add_l2_(grad, param, state["center"], None, self.l2 * alpha, scale)
            add_l1_(grad, param, state["center"], self.l1 * alpha, scale)

    def _adder(self, alpha: float, scale: Optional[Tensor]) -> Optional[Adder]:
        l1, l2 = self.l1 * alpha, self.l2 * alpha
        if type(self).grad_ is not ElasticNet.grad_ or max(l1, l2) > _SMALLEST_MAX or self.center is not None:
            return None
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
        # (out of place: under backward(create_graph=True) autograd saves the reciprocal for the term's graph)
        coef = torch.where(norms > 0, norms.reciprocal() * (self.lam * alpha), 0)
        grad.addcmul_(param, coef if scale is None else coef * scale)

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


_MODES = ("rows", "columns")
_EPSILON = 1e-7  # keras.backend.epsilon(): Keras' floor on a vector's norm before dividing by it
_BLOCK = 1 << 22  # entries of the cosine matrix computed at a time (16 MB of float32)


class Orthogonal(_OneStrength):
    """Keras' ``OrthogonalRegularizer`` in torch's layout: pushes a weight's rows towards orthogonality.

    Each selected weight is viewed as a matrix ``(shape[0], -1)``: for ``Linear`` and ``Conv*d`` one
    row per output unit or filter (``ConvTranspose*d`` weights are ``(in, out / groups, ...)``: one
    row per input channel). With ``mode="rows"`` the rows ``v_1 .. v_n`` are compared, with
    ``mode="columns"`` the columns. Each vector is L2-normalized as Keras does,
    ``u_i = v_i / max(||v_i||, 1e-7)`` (``1e-7`` is ``keras.backend.epsilon()``), and the penalty is
    the mean absolute cosine over the ``n (n - 1) / 2`` distinct pairs::

        penalty = lam * mean_{i < j} |u_i . u_j|  =  lam * sum_{i < j} |u_i . u_j| / (n (n - 1) / 2)

    which is Keras' ``factor * 0.5 * sum(|U U^T - diag|) / num_pairs`` with ``factor = lam``. Its
    exact gradient (derived analytically, checked against autograd) is added to ``w.grad``.

    **Mapping to Keras.** A Keras ``Dense`` kernel is ``(in, out)``, the transpose of a torch ``Linear``
    weight ``(out, in)``. So ``Orthogonal(linear, lam, mode="rows")`` (output units orthogonal)
    equals Keras' ``OrthogonalRegularizer(lam, mode="columns")`` on the matching ``Dense``, and
    ``mode="columns"`` here equals Keras' ``mode="rows"`` (Keras' default). Keras accepts rank-2
    kernels only; here a conv weight is flattened per filter, ``(out, in / groups * kh * kw)``.

    **Edge cases.** A zero row (column) normalizes to 0: its cosines are 0, it still counts in the
    number of pairs, and its gradient term is 0 (as autograd's, ``|x|``'s derivative at 0 being 0). A
    vector shorter than 1e-7 is divided by 1e-7, not by its norm (Keras' floor; the gradient follows
    that branch). With fewer than two rows (columns) there is no pair: Keras divides by zero pairs and
    returns NaN; here the penalty is 0 and nothing is added to the gradient. A parameter with fewer
    than 2 dimensions (a vector, e.g. ``PReLU``'s weight) is not a set of vectors: it contributes
    nothing either (Keras refuses any rank but 2).

    Args:
        module: the layer (or whole model) to regularize. Omit it to get a rule.
        lam: strength, a finite number >= 0 (Keras' ``factor``); may be changed later.
        mode: ``"rows"`` (default) or ``"columns"`` of the ``(shape[0], -1)`` view; keyword only.
        params: which parameters; see :class:`L1`.

    Returns:
        With ``module``: the same module object, regularized. Without: an ``Orthogonal`` rule.

    Raises:
        TypeError: as :class:`L1`; ``mode`` is not a string; a selected parameter is complex (at
            backward: cosines of complex vectors are not defined here).
        ValueError: as :class:`L1`; ``mode`` is neither ``"rows"`` nor ``"columns"``.

    Example::

        >>> import torch, torchreg
        >>> layer = torchreg.Orthogonal(torch.nn.Linear(2, 3, bias=False), lam=0.3)
        >>> with torch.no_grad():   # rows at 0, 45 and 90 degrees: |cos| = 0.7071, 0, 0.7071
        ...     _ = layer.weight.copy_(torch.tensor([[2.0, 0.0], [1.0, 1.0], [0.0, 5.0]]))
        >>> torchreg.penalty(layer)   # 0.3 * (0.7071 + 0 + 0.7071) / 3
        tensor(0.1414)
        >>> torchreg.Orthogonal(lam=0.01, mode="columns")
        Orthogonal(lam=0.01, mode='columns')
    """

    @overload
    def __new__(cls, module: M, lam: float, *, mode: str = "rows", params: Selection = None) -> M: ...
    @overload
    def __new__(cls, lam: float, *, mode: str = "rows", params: Selection = None) -> "Orthogonal": ...
    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        return super().__new__(cls, *args, **kwargs)

    def __init__(self, lam: float, *, mode: str = "rows", params: Selection = None) -> None:
        super().__init__(lam, params=params)
        self.mode = mode

    @property
    def mode(self) -> str:
        """``"rows"`` or ``"columns"`` of the ``(shape[0], -1)`` view; may be changed at any time."""
        return self.__dict__["mode"]

    @mode.setter
    def mode(self, value: Any) -> None:
        if not isinstance(value, str):
            raise TypeError(f"Orthogonal mode must be 'rows' or 'columns', got {value!r} ({type(value).__name__})")
        if value not in _MODES:
            raise ValueError(f"Orthogonal mode must be 'rows' or 'columns', got {value!r}")
        self.__dict__["mode"] = value

    def _kwargs(self) -> Dict[str, Any]:
        kwargs = {"lam": self.lam, "mode": self.mode}
        if self.params is not None:
            kwargs["params"] = self.params
        return kwargs

    def _vectors(self, param: Tensor) -> Tensor:
        """The compared vectors as the rows of a matrix (float32 for 16-bit parameters). Not detached:
        under ``backward(create_graph=True)`` the term joins ``.grad``'s graph, as a loss penalty's would."""
        if param.is_complex():
            raise TypeError(f"Orthogonal supports real parameters only, got dtype {param.dtype}")
        p = param.float() if param.dtype in (torch.float16, torch.bfloat16) else param
        m = p.reshape(p.shape[0], -1)
        return m if self.mode == "rows" else m.t()

    @staticmethod
    def _normalized(v: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        norm = torch.linalg.vector_norm(v, dim=1, keepdim=True)
        denom = norm.clamp_min(_EPSILON)
        return v / denom, denom, norm >= _EPSILON  # the last: rows whose norm is not floored

    @staticmethod
    def _blocks(n: int) -> Iterator[Tuple[int, int]]:
        """Row blocks of the n x n cosine matrix, so that no more than ~4M entries exist at a time."""
        step = max(1, _BLOCK // n)
        for start in range(0, n, step):
            yield start, min(start + step, n)

    def penalty(self, param: Tensor) -> Tensor:
        if param.ndim < 2:  # a vector, not a set of vectors
            return param.new_zeros((), dtype=param.dtype)
        v = self._vectors(param)
        n = v.shape[0]
        if n < 2:
            return v.new_zeros(()).to(param.dtype)
        u = self._normalized(v)[0]
        total = v.new_zeros(())
        for start, end in self._blocks(n):
            cos = u[start:end] @ u.t()
            cos[:, start:end].fill_diagonal_(0.0)
            total = total + cos.abs().sum()  # every pair twice: (i, j) and (j, i)
        return (self.lam * total / (n * (n - 1))).to(param.dtype)

    def grad_(self, grad: Tensor, param: Tensor, alpha: float = 1.0, scale: Optional[Tensor] = None) -> None:
        # With u_i = v_i / d_i, d_i = max(|v_i|, eps), C = U U^T and P = k * sum_{i<j} |C_ij|,
        # k = lam / (n (n - 1) / 2):  dP/dU = k * S U, where S = sign(C) with a zero diagonal; then
        # dP/dv_i = (g_i - u_i (u_i . g_i)) / d_i where |v_i| >= eps, g_i / eps where floored.
        if not self.lam or param.ndim < 2:
            return
        v = self._vectors(param)
        n = v.shape[0]
        if n < 2:
            return
        u, denom, free = self._normalized(v)
        flat = u.detach()  # sign() has derivative 0: S needs no graph
        parts = []
        for start, end in self._blocks(n):
            sign = torch.sign(flat[start:end] @ flat.t())
            sign[:, start:end].fill_diagonal_(0.0)
            parts.append(sign @ u)
        g = (parts[0] if len(parts) == 1 else torch.cat(parts)) * (self.lam / (n * (n - 1) / 2))
        g = (g - u * ((u * g).sum(dim=1, keepdim=True) * free)) / denom
        if self.mode == "columns":
            g = g.t()
        add_scaled_(grad, g.reshape(param.shape).to(grad.dtype), alpha, scale)
