"""What happens after ``optimizer.step()``: proximal operators, with a step per optimizer, then the
projections of weight constraints.

A regularizer built with ``proximal=True`` (``L1``, ``ElasticNet``, ``GroupLasso``) adds nothing at
backward (the engine registers no hook for it). Instead, after every step of a ``torch.optim``
optimizer that holds the parameter, the parameter ``w`` (just updated by the optimizer with the data
gradient alone) is replaced by ``prox(w) = argmin_x h(x) + sum_i (x_i - w_i) ** 2 / (2 * s_i)``,
``h`` the penalty and ``s`` the step this module computes. The regularizer only knows its operator
(``Regularizer.prox_(param, step)``); this module only knows optimizers.

Two global hooks (``torch.optim.optimizer.register_optimizer_step_{pre,post}_hook``), registered
once, do it. The pre-hook finds the parameters with an after-step rule that the stepping optimizer
holds (with their param group) and checks the optimizer and its options, raising *before* anything
changes; the post-hook applies the operators. A unit takes part by :func:`track` (it has ``entries``
whose rule has ``acts_after_step``); its entries' per-parameter state is passed as ``state=``.
Consequences:

* once per optimizer step, not per backward: exact under gradient accumulation, with no declaration;
* a step that ``GradScaler.step`` skips (inf/NaN gradients) does not call ``optimizer.step()``, so
  no prox is applied either (a fused optimizer is called and skips inside its kernel: the post-hook
  reads the ``found_inf`` the scaler gives it and does nothing then);
* a parameter the optimizer does not hold, or that it did not update (``.grad`` is None: torch.optim
  skips it), is left alone; each parameter uses its own param group's hyper-parameters, read at
  every step (learning-rate schedulers included);
* the registry holds units weakly (a dropped model is freed); ``remove_regularization`` ends it.

The step, chosen so that every fixed point of "optimizer step, then prox" satisfies the optimality
conditions of ``loss + penalty`` (``-grad loss(w) in d h(w)``), i.e. is its exact minimizer for a
convex problem (the tests compare with scikit-learn's coordinate-descent solvers):

* **SGD** (``momentum=0``): ``w <- prox_s(w - lr * g)``. A fixed point gives
  ``-lr * g in s * d h(w)``, so ``s = lr`` (the group's current lr).
* **SGD with momentum** ``m`` and dampening ``d``: torch updates ``b <- m * b + (1 - d) * g`` and
  ``w <- w - lr * b``. At a fixed point ``b = (1 - d) / (1 - m) * g``, so the update moves ``w`` by
  ``lr * (1 - d) / (1 - m) * g`` and ``s = lr * (1 - d) / (1 - m)``; plain ``lr`` would give the
  minimizer of ``loss + (1 - m) / (1 - d) * penalty``, a weaker penalty (10x weaker at ``m = 0.9``).
* **Nesterov** (torch requires ``d = 0``): ``w <- w - lr * (g + m * b)``; at a fixed point
  ``g + m * b = g / (1 - m)``, so ``s = lr / (1 - m)``.
  (SGD's own ``weight_decay`` is part of the smooth loss: the fixed point minimizes
  ``loss + weight_decay / 2 * ||w||^2 + penalty``.)
* **Adam / AdamW** (ProxGen, Yun et al., NeurIPS 2021): torch updates
  ``w <- w - lr * m_hat / D`` with ``D = sqrt(v) / sqrt(1 - beta2 ** step) + eps`` (``v`` the
  ``exp_avg_sq`` state, or ``max_exp_avg_sq`` with ``amsgrad``). The prox is taken in the same
  diagonal metric, ``s_i = lr / D_i`` per coordinate, from the optimizer's own state after its step.
  At a fixed point ``m_hat = g``, and ``-lr * g_i / D_i in (lr / D_i) * d h(w)_i`` is again
  ``-g in d h(w)``: the fixed point does not depend on ``D``, ``betas`` or ``eps``. A separable
  penalty (L1, ElasticNet) has its prox per coordinate in closed form; a group's (GroupLasso) is
  found exactly by a one-dimensional root-find (``GroupLasso.prox_``). Adam's own (coupled)
  ``weight_decay`` is part of the smooth loss, as SGD's.
  **AdamW with** ``weight_decay = wd > 0`` first multiplies ``w`` by ``1 - lr * wd``; a fixed point
  then satisfies ``-(g_i + wd * D_i * w_i) in d h(w)_i``: the stationarity condition of
  ``loss + penalty + wd / 2 * sum_i D_i * w_i ** 2`` with ``D`` frozen at its value at that point
  (``D_i = |g_i| + eps`` there, since ``v -> g ** 2``): a ridge term weighted per coordinate by the
  optimizer's own denominator, not the plain Lasso/ElasticNet solution. With ``wd = 0`` it is.

Any other optimizer (RMSprop, Adagrad, LBFGS, a subclass or a user's own), ``maximize=True``,
``momentum >= 1``, a complex parameter under Adam, or a DTensor sharded along a dimension that a
penalty couples (a group spanning shards) raises at its first step, before the step changes anything.

Sharded parameters (FSDP2's DTensors): the operators work on each rank's local shard, with the
optimizer state's local shard: exact for elementwise penalties and for groups that lie within a shard
(``GroupLasso(dim=0)`` under FSDP2's default ``Shard(0)``). Under DDP every rank holds the same
parameters and optimizer state, so every rank computes the same result bit for bit.

Cost per step: one pass over each proximal weight for L1 and ElasticNet under SGD (an in-place
``softshrink``, no temporary), and a few parameter-sized temporaries, one tensor at a time, under
Adam (its threshold is per coordinate); nothing the size of the model.

**Weight constraints** (``torchreg.MaxNorm``, ``MinMaxNorm``, ``UnitNorm``, ``NonNeg``; kept by a
constraint unit, ``_constraint_unit``) take part through the same two hooks. A projection needs no
step size, so it follows **every** ``torch.optim.Optimizer`` (SGD, Adam, AdamW, RMSprop, Adagrad,
LBFGS, a user's subclass: each calls the global step hooks), with the same consequences as above:
once per step, none on a skipped step, only the parameters the optimizer holds and updated. When a
parameter carries a proximal regularizer and a constraint, the prox runs first and the projection
second, so that the weights after every step satisfy the constraint. Under FSDP2 a constraint
projects each rank's local shard when every group lies within a shard (``dim=0`` under the default
``Shard(0)``; ``NonNeg`` always): no communication. When a group spans shards (``dim=1`` on a
``Shard(0)`` weight) it projects the DTensor itself, whose norms DTensor reduces across the ranks (one
all-reduce of the group norms per parameter and step): exact either way.
"""

from __future__ import annotations

import weakref
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import Tensor

from . import _torch_private as private
from ._tracking import state_kw

__all__ = ["SUPPORTED", "track", "untrack"]

#: The optimizers whose step torchreg knows the exact proximal step for (exact types, not subclasses:
#: a subclass may change the update). ``AdamW`` is a subclass of ``Adam`` in torch >= 2.7.
SUPPORTED: Tuple[type, ...] = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW)

_live: "weakref.WeakSet[Any]" = weakref.WeakSet()  # units with at least one after-step entry
#: optimizer -> what its step in progress will do: (parameter, unit, entry, param group)
_pending: "weakref.WeakKeyDictionary[Any, List[Tuple[Tensor, Any, Any, Dict[str, Any]]]]" = (
    weakref.WeakKeyDictionary()
)
_handles: List[Any] = []


def track(unit: Any) -> None:
    """Watch the optimizer steps for ``unit``'s after-step entries (no-op if it has none)."""
    if any(entry.rule.acts_after_step for entry in unit.entries):
        _live.add(unit)
        if not _handles:
            from torch.optim.optimizer import (
                register_optimizer_step_post_hook, register_optimizer_step_pre_hook,
            )

            _handles.append(register_optimizer_step_pre_hook(_before_step))
            _handles.append(register_optimizer_step_post_hook(_after_step))


def untrack(unit: Any) -> None:
    _live.discard(unit)


# -- the hooks ----------------------------------------------------------------------------------
def _before_step(optimizer: Any, args: Any, kwargs: Any) -> None:
    if not _live:
        return
    wanted: Dict[int, List[Tuple[Any, Any]]] = {}
    for unit in list(_live):
        before = getattr(unit, "before_step", None)  # a constraint unit's first-step checks
        if before is not None:
            before()
        for entry in unit.entries:
            if entry.rule.acts_after_step:
                wanted.setdefault(id(entry.param), []).append((unit, entry))
    plan = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            for unit, entry in wanted.get(id(p), ()):
                plan.append((p, unit, entry, group))
    if not plan:
        _pending.pop(optimizer, None)
        return
    _check(optimizer, plan)
    _pending[optimizer] = plan


def _after_step(optimizer: Any, args: Any, kwargs: Any) -> None:
    plan = _pending.pop(optimizer, None) if _pending else None
    if not plan:
        return
    found_inf = private.found_inf(optimizer)
    if found_inf is not None and bool(found_inf):
        # A fused optimizer under GradScaler.step is called even for inf/NaN gradients and skips the
        # update inside its kernel (GradScaler sets optimizer.found_inf for that step): no prox either.
        # (Reading it is one host synchronization per step, for fused optimizers under a scaler only.)
        return
    with torch.no_grad():
        for p, unit, entry, group in plan:
            if p.grad is None or not entry.rule.proximal:  # torch.optim did not update it
                continue
            step = _step_size(optimizer, group, p)
            if step is not None:
                local = _local(p)
                entry.rule.prox_(local, step, **state_kw(entry, local))
        for p, unit, entry, group in plan:  # then the constraints' projections, after any prox
            if p.grad is not None and not entry.rule.proximal:
                # A group that spans shards is projected on the DTensor itself: its norms are reduced
                # across the ranks (a collective; every rank steps the same parameters). Else locally.
                entry.rule.project_(p if _spans_shards(p, entry.rule) else _local(p))


# -- checks ----------------------------------------------------------------------------------
def _check(optimizer: Any, plan: List[Tuple[Tensor, Any, Any, Dict[str, Any]]]) -> None:
    plan = [(p, entry.rule, group, entry.name) for p, _, entry, group in plan if entry.rule.proximal]
    if not plan:
        return
    kind = type(optimizer)
    names = ", ".join(sorted({name for _, _, _, name in plan})[:5])
    if kind not in SUPPORTED:
        raise TypeError(
            f"torchreg: proximal regularization ({names}) needs torch.optim.SGD, Adam or AdamW to step "
            f"it (their foreach and fused variants included); got {kind.__module__}.{kind.__qualname__}, "
            "whose update has no proximal step torchreg knows to be exact. Use one of those optimizers "
            "for these parameters, or proximal=False (the gradient term) with this one."
        )
    for p, rule, group, name in plan:
        if group.get("maximize", False):
            raise ValueError(f"torchreg: proximal regularization of {name!r} needs maximize=False "
                             f"(a penalty is minimized); got maximize=True in {kind.__name__}")
        if kind is torch.optim.SGD:
            if not 0 <= group["momentum"] < 1:
                raise ValueError(f"torchreg: proximal regularization of {name!r} needs SGD momentum in "
                                 f"[0, 1); got {group['momentum']!r}")
        elif p.is_complex():
            raise ValueError(f"torchreg: proximal regularization of the complex parameter {name!r} is "
                             f"supported under SGD only (Adam's per-coordinate step acts on the real "
                             f"and imaginary parts separately); got {kind.__name__}")
        placements = getattr(p, "placements", None)
        if placements is not None:
            coupled = {d % p.ndim for d in rule._coupled_dims(p)}
            split = [pl.dim for pl in placements if hasattr(pl, "dim") and pl.is_shard() and pl.dim % p.ndim in coupled]
            if split:
                raise ValueError(
                    f"torchreg: {rule!r} on {name!r}: the parameter is sharded along dim {split[0]}, across "
                    f"which its penalty couples elements (a group spans shards), so its proximal operator "
                    f"cannot run on the local shards. Shard along the group dimension (GroupLasso dim) "
                    f"instead, or use proximal=False.")


def _spans_shards(p: Tensor, rule: Any) -> bool:
    """Whether ``p`` is a DTensor sharded along a dimension that ``rule`` couples (a group spans shards)."""
    placements = getattr(p, "placements", None)
    if placements is None:
        return False
    coupled = {d % p.ndim for d in rule._coupled_dims(p)}
    return any(pl.is_shard() and pl.dim % p.ndim in coupled for pl in placements if hasattr(pl, "dim"))


# -- steps ---------------------------------------------------------------------------------------
def _local(t: Any) -> Tensor:
    """The local shard of a DTensor (shares its storage), or ``t`` itself."""
    return t.to_local() if hasattr(t, "to_local") and hasattr(t, "placements") else t


def _step_size(optimizer: Any, group: Dict[str, Any], p: Tensor) -> Any:
    """The proximal step for ``p`` after ``optimizer``'s step (module docstring), or None for none."""
    lr = group["lr"]
    if isinstance(optimizer, torch.optim.SGD):
        m, d = group["momentum"], group["dampening"]
        if m == 0:
            step = lr
        elif group["nesterov"]:
            step = lr * (1 + m * (1 - d) / (1 - m))  # torch requires d == 0 here: lr / (1 - m)
        else:
            step = lr * (1 - d) / (1 - m)
        return None if not isinstance(step, Tensor) and step == 0 else step
    # Adam, AdamW
    state = optimizer.state.get(p)
    if not state or "step" not in state:
        return None
    v = _local(state["max_exp_avg_sq"] if group["amsgrad"] else state["exp_avg_sq"])
    count = state["step"]
    if isinstance(count, Tensor) and count.device.type == "cpu":
        count = count.item()
    beta2 = group["betas"][1]
    if isinstance(beta2, Tensor):
        beta2 = beta2.item()
    if isinstance(count, Tensor):  # capturable / fused on an accelerator: no host synchronization
        correction = (1 - torch.pow(beta2, count)).sqrt()
    else:
        correction = (1 - beta2**count) ** 0.5
    # lr / (sqrt(v) / c + eps) = (lr * c) / (sqrt(v) + eps * c): three passes, one temporary. (A 0-dim
    # CPU tensor is a scalar to every device's kernels.)
    step = v.sqrt().add_(group["eps"] * correction)
    scale = lr * correction
    if not isinstance(scale, Tensor):
        scale = torch.tensor(scale, dtype=torch.float64)
    return torch.div(scale, step, out=step)
