"""Choosing a strength: :func:`lambda_max`, from which L1 / group-lasso strength on a layer is all zero."""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional

import torch
from torch import Tensor, nn

from ._tracking import is_lazy
from ._validate import check_module, describe
from .regularizers import L1, ElasticNet, GroupLasso
from .report import covered_parameters

__all__ = ["lambda_max"]


def lambda_max(model: nn.Module, closure: Callable[[], Tensor]) -> Dict[str, float]:
    """The smallest L1 / group-lasso strength at which each regularized parameter is all zero.

    For every trainable parameter of ``model`` regularized by :class:`torchreg.L1`,
    :class:`torchreg.ElasticNet` (its ``l1``) or :class:`torchreg.GroupLasso`, the parameter is set to
    zero, the other parameters left as they are, and the gradient ``g`` of the loss is taken there.
    ``w = 0`` is a stationary point of ``loss + penalty`` in ``w`` (the proximal step keeps it at zero)
    exactly when every ``|g_i| <= lam`` (L1, ElasticNet's ``l1``: ``l2`` adds nothing at 0), or every
    group's ``||g_g||_2 <= lam`` (GroupLasso). So the value returned is ``max_i |g_i|``, or
    ``max_g ||g_g||_2`` along the rule's ``dim``: any strength above it makes the whole parameter zero
    (from there, with the rest fixed), any strength below it keeps some of it. For a linear model
    with the loss ``||y - X w||^2 / (2 n)`` this is scikit-learn's ``alpha_max`` of ``Lasso``
    (``max|X^T y| / n``) and ``MultiTaskLasso`` (``GroupLasso(dim=1)``: ``max_j ||X_j^T Y|| / n``). A
    grid of strengths from it down (``lam_max * 10 ** -k``) is the usual search.

    ``closure()`` computes the loss on the data to use (the whole data set, or a large batch) and
    returns it, as for ``torch.optim.LBFGS``; it may call ``loss.backward()`` itself or not. Put the
    model in ``eval()`` mode first if dropout should not make the gradient random. It is called once
    per parameter. The loss is what is differentiated: do not add ``torchreg.penalty`` (an activity
    penalty, added by torchreg's output hooks, is part of it).

    Nothing is changed: every parameter's value and ``.grad`` (the same tensor object, or ``None``)
    are restored afterwards, also when ``closure`` raises, and no optimizer is touched (call it before
    training or between optimizer steps, not in the middle of gradient accumulation).

    Args:
        model: a model with L1 / ElasticNet / GroupLasso regularization applied (any mode).
        closure: a callable without arguments that returns the loss, a 0-dim tensor.

    Returns:
        ``{qualified parameter name: strength}`` in the order of ``model.named_parameters()``, as
        Python floats. A parameter the loss does not depend on gets ``0.0``.

    Raises:
        TypeError: ``model`` is not a module, ``closure`` is not callable or does not return a tensor.
        ValueError: nothing in ``model`` is regularized by L1, ElasticNet or GroupLasso, such a rule keeps
            per-parameter state (a penalty toward a center: its zero set is not ``w = 0``), or the loss
            is not a single value.

    Example::

        >>> import torch, torchreg
        >>> x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
        >>> y = torch.tensor([[3.0], [-1.0], [2.0]])
        >>> model = torchreg.L1(torch.nn.Linear(2, 1, bias=False), lam=0.1, proximal=True)
        >>> def closure():
        ...     return ((model(x) - y) ** 2).sum() / (2 * len(x))   # scikit-learn's Lasso loss
        >>> lam_max = torchreg.lambda_max(model, closure)   # max|X^T y| / n = max(5, 1) / 3
        >>> {name: round(value, 4) for name, value in lam_max.items()}
        {'weight': 1.6667}
    """
    check_module(model, "lambda_max")
    if not callable(closure):
        raise TypeError(f"lambda_max expects a closure that returns the loss, got {describe(closure)}")
    targets = [(name, entry.param, entry.rule) for name, _, entry in covered_parameters(model)
               if isinstance(entry.rule, (L1, ElasticNet, GroupLasso)) and entry.param.requires_grad
               and not is_lazy(entry.param)]
    stateful = [name for name, _, entry in covered_parameters(model)
                if isinstance(entry.rule, (L1, ElasticNet, GroupLasso)) and entry.state is not None]
    if stateful:  # e.g. a penalty toward a center: its zero set is not w = 0
        raise ValueError(
            f"lambda_max: the rule of {', '.join(stateful[:3])}{', ...' if len(stateful) > 3 else ''} keeps "
            "per-parameter state (e.g. a center the penalty pulls towards), so the strength from which the "
            "parameter is all zero is not the one computed here; lambda_max supports L1, ElasticNet and "
            "GroupLasso penalties on the weights themselves"
        )
    if not targets:
        raise ValueError(
            f"lambda_max: nothing in {type(model).__name__} is regularized by torchreg.L1, ElasticNet or "
            "GroupLasso (trainable and initialized); apply one first, e.g. torchreg.L1(layer, lam, proximal=True)"
        )
    params = list(model.parameters())
    for _, _, entry in covered_parameters(model):  # parameters of an enclosing model too
        if not any(entry.param is q for q in params):
            params.append(entry.param)
    saved_grads = [p.grad for p in params]
    result: Dict[str, float] = {}
    try:
        for name, p, rule in targets:
            with torch.no_grad():
                value = p.detach().clone()
                p.zero_()
            try:
                for q in params:
                    q.grad = None
                g = _gradient_at(p, closure, params)
            finally:
                with torch.no_grad():
                    p.copy_(value)
            result[name] = _strength_at_zero(rule, g)
    finally:
        for q, grad in zip(params, saved_grads):
            q.grad = grad
    return result


def _gradient_at(p: Tensor, closure: Callable[[], Tensor], params: List[Tensor]) -> Optional[Tensor]:
    """d loss / d ``p`` (None: the loss does not depend on it), from ``p.grad`` if the closure ran a
    backward, else by ``torch.autograd.grad`` (which fires no torchreg hook and fills no ``.grad``)."""
    with torch.enable_grad():
        loss = closure()
    if not isinstance(loss, Tensor):
        raise TypeError(f"lambda_max: closure() must return the loss as a tensor, got {describe(loss)}")
    if loss.numel() != 1:
        raise ValueError(f"lambda_max: closure() must return a single loss value, got a tensor of shape "
                         f"{tuple(loss.shape)}")
    if p.grad is not None or any(q.grad is not None for q in params):  # the closure ran loss.backward()
        return None if p.grad is None else p.grad.detach().to_dense()
    if loss.grad_fn is None:
        return None
    (g,) = torch.autograd.grad(loss.reshape(()), p, allow_unused=True)
    return g


def _strength_at_zero(rule: Any, g: Optional[Tensor]) -> float:
    if g is None or g.numel() == 0:
        return 0.0
    with torch.no_grad():
        if isinstance(rule, GroupLasso):
            return float(rule.group_norms(g).max())
        return float(g.abs().max())
