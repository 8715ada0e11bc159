"""Process groups and sharded parameters: DDP, FSDP2 (``fully_shard``, HSDP), and what is refused.

* **DDP.** Under an initialized process group with more than one rank, a unit adds the term of a plain
  (unsharded) parameter at the end of the backward (its end-of-backward step runs after
  DistributedDataParallel's reducer has averaged the gradients, see ``_session``), so that every rank
  adds the same terms whichever parameters each rank's forward used (:func:`deferred`).
  :class:`DistributedSweep` also gives their terms to units that this rank's backward did not reach at
  all but that DDP gave a gradient (their parameters were used on another rank).
* **FSDP2.** A parameter is a DTensor holding this rank's shard. FSDP2 runs the post-accumulate-grad
  hooks of the sharded parameter itself, after the reduce-scatter (and HSDP's all-reduce) averaged its
  gradient: the term is added there, to the local shard (:func:`local`; the kernels never see a
  DTensor), before any hook registered after torchreg's (an optimizer stepped in the hook). On a
  backward that does not synchronize (``set_requires_gradient_sync(False)`` during accumulation) FSDP2
  runs no such hook and writes no sharded gradient; autograd still accumulates into the *unsharded*
  parameter FSDP2 keeps, so a hook there (:func:`hook_unsharded`) opens the unit's backward session, and
  the end-of-backward step adds the term of every parameter whose sharded hook did not run to its sharded
  ``.grad`` (created if needed: FSDP2 accumulates the next reduce-scatter into it). So each backward adds
  ``1/k`` of the term once, whatever the pattern of synchronized micro-batches, as ``loss / k + penalty /
  k`` would. A rule coupling elements along a sharded dimension (a group across shards) computes on the
  DTensor instead (collectives inside the hook).
* **Refused** (:func:`check_module` at apply, :func:`refusal` at the first forward): FSDP1
  (``FullyShardedDataParallel``) flattens the parameters into a ``FlatParameter``, so autograd never
  reaches the original ones; DeepSpeed ZeRO-3 partitions every parameter (``ds_id``, ``ds_status``) and
  gathers it for the forward only, its gradients in DeepSpeed's own buffers; DeepSpeed ZeRO-2 (and
  ZeRO-1 with ``overlap_comm``) moves each gradient into its buffers from a post-accumulate-grad hook of
  its own (``deepspeed.runtime.zero.stage_1_and_2``) and sets ``.grad`` to None within the backward.
"""

from __future__ import annotations

import sys
import weakref
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from . import _torch_private as private

__all__ = ["DistributedSweep", "FSDP1", "ZERO3", "ZERO_HOOKS", "check_module", "deferred", "distributed", "elementwise_on_shards",
           "hook_unsharded", "is_sharded", "local", "refusal", "refusal_at", "sharded_of"]

FSDP1 = (
    "torchreg cannot regularize parameters managed by the original FSDP (torch.distributed.fsdp."
    "FullyShardedDataParallel, 'FSDP1'): FSDP1 flattens them into a FlatParameter, so autograd never "
    "reaches the original parameters and the regularization would be lost. Use FSDP2 instead "
    "(torch.distributed.fsdp.fully_shard; with Accelerate or the Hugging Face Trainer, fsdp_version=2), "
    "with which torchreg is exact."
)
ZERO_HOOKS = (
    "torchreg cannot regularize parameters whose gradients DeepSpeed ZeRO reduces from its own "
    "post-accumulate-grad hooks (stage 2; stage 1 with overlap_comm or contiguous_gradients): DeepSpeed "
    "moves each gradient into its partitioned buffers and sets .grad to None during the backward, before "
    "torchreg's end-of-backward step, so the regularization would be lost. Use FSDP2 (torch.distributed."
    "fsdp.fully_shard) or DistributedDataParallel, or ZeRO stage 1 without overlap_comm and "
    "contiguous_gradients; or write the penalty into the loss yourself (torchreg.penalty() has no graph)."
)
ZERO3 = (
    "torchreg cannot regularize parameters partitioned by DeepSpeed ZeRO stage 3: they are empty outside "
    "the forward and their gradients live in DeepSpeed's partitioned buffers, so the regularization would "
    "be lost. Use ZeRO stage 1 without overlap_comm (stage 2 is refused as well), or FSDP2 (torch.distributed."
    "fsdp.fully_shard); or write the penalty into the loss yourself (torchreg.penalty() has no graph)."
)


def distributed() -> bool:
    """An initialized process group with more than one rank."""
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class DistributedSweep:
    """Under a multi-rank process group: units that this rank's backward did not reach but that DDP
    gave a gradient get their terms too, after the averaging. Such a unit is recognized by a parameter
    whose ``.grad`` was None when the backward began and is set when it ends
    (``zero_grad(set_to_none=True)``, the default, makes this visible; with ``set_to_none=False`` it
    cannot be told apart)."""

    live: "weakref.WeakSet[Any]" = weakref.WeakSet()
    task = -1
    active: set = set()
    had_no_grad: Dict[int, Tuple[Any, List[bool]]] = {}

    @classmethod
    def begin(cls, unit: Any, task: int) -> None:
        if cls.task != task:
            cls.task, cls.active = task, set()
            cls.had_no_grad = {id(u): (u, [e.param.grad is None for e in u.entries]) for u in list(cls.live)}
            private.queue_callback(cls._end_of_backward)
        cls.active.add(id(unit))

    @classmethod
    def _end_of_backward(cls) -> None:
        private.queue_callback(cls._finish)

    @classmethod
    def _finish(cls) -> None:
        try:
            for key, (unit, none_before) in cls.had_no_grad.items():
                if key not in cls.active and any(
                    was_none and e.param.grad is not None for was_none, e in zip(none_before, unit.entries)
                ):
                    unit._add_all()
        finally:
            cls.task, cls.active, cls.had_no_grad = -1, set(), {}


# -- sharded parameters (FSDP2) -----------------------------------------------------------------
def is_sharded(t: Any) -> bool:
    """A DTensor (FSDP2's sharded parameters and gradients)."""
    return hasattr(t, "placements") and hasattr(t, "to_local")


def local(t: Tensor) -> Tensor:
    """This rank's shard of a DTensor (the same storage: in-place ops change the DTensor), or ``t``."""
    return t.to_local() if is_sharded(t) else t


def elementwise_on_shards(rule: Any, p: Tensor) -> bool:
    """Whether ``rule``'s term on the DTensor ``p`` can be computed shard by shard: no dimension the
    penalty couples (``Regularizer._coupled_dims``) is sharded."""
    coupled = {d % p.ndim for d in rule._coupled_dims(p)} if p.ndim else set()
    return not any(pl.is_shard() and pl.dim % p.ndim in coupled for pl in p.placements if hasattr(pl, "dim"))


def deferred(entries: Sequence[Any]) -> List[bool]:
    """Per entry, under a multi-rank process group: whether its term waits for the end of backward (a
    plain parameter: DDP averages after the hooks) or is added by its hook (a sharded one: FSDP2 runs
    the hook after averaging)."""
    return [not is_sharded(e.param) for e in entries]


def sharded_of(p: Tensor) -> Tensor:
    """The sharded parameter whose unsharded one FSDP2 put in the module during its forward is ``p``
    (what ``get_parameter`` returns then), or ``p`` itself."""
    if is_sharded(p) or not isinstance(p, nn.Parameter):
        return p
    for fsdp_param in private.fsdp2_params():
        if private.fsdp2_unsharded(fsdp_param) is p:
            return private.fsdp2_sharded(fsdp_param)
    return p


def _reach_hook(unit: Any) -> Callable[[Tensor], None]:
    """The hook on an unsharded parameter: opens the unit's session (see the module docstring)."""
    ref = weakref.ref(unit)
    current_task = private.current_graph_task

    def reach(param: Tensor) -> None:
        unit = ref()
        if unit is not None and unit.sessions.task != current_task():
            unit.sessions.begin(unit)

    return reach


def hook_unsharded(unit: Any, indices: Sequence[int], handles: Dict[int, Tuple[Any, Any]]) -> int:
    """Register :func:`_reach_hook` on the unsharded parameter FSDP2 keeps for each sharded parameter of
    ``unit.entries[i]``, ``i`` in ``indices`` (it exists from the module's first forward on);
    ``handles``: entry -> (weakref to the unsharded parameter, handle), kept by the tracker. Returns how
    many were registered."""
    wanted = {id(unit.entries[i].param): i for i in indices
              if is_sharded(unit.entries[i].param) and unit._takes_hook(unit.entries[i])}
    added = 0
    if not wanted:
        return added
    for fsdp_param in private.fsdp2_params():
        i = wanted.get(id(private.fsdp2_sharded(fsdp_param)))
        unsharded = None if i is None else private.fsdp2_unsharded(fsdp_param)
        if unsharded is None or not unsharded.requires_grad:
            continue
        old = handles.get(i)
        if old is not None:
            if old[0]() is unsharded:
                continue
            old[1].remove()
        handles[i] = (weakref.ref(unsharded), unsharded.register_post_accumulate_grad_hook(_reach_hook(unit)))
        added += 1
    return added


# -- refused --------------------------------------------------------------------------------------
def refusal(p: Any) -> Optional[str]:
    """Why torchreg cannot regularize ``p`` (FSDP1, DeepSpeed ZeRO-3), or None."""
    if private.fsdp1_flattened(p):
        return FSDP1
    if hasattr(p, "ds_id") and hasattr(p, "ds_status"):
        return ZERO3
    if isinstance(p, Tensor) and any(getattr(hook, "__module__", "").startswith("deepspeed.")
                                     for hook in private.post_accumulate_grad_hooks(p).values()):
        return ZERO_HOOKS
    return None


def refusal_at(root: nn.Module, name: str) -> Optional[str]:
    """Why torchreg cannot regularize what ``root`` holds under the parameter name ``name`` during a
    forward: FSDP1 with ``use_orig_params=False`` removed the parameter and puts a view of its
    ``FlatParameter`` there."""
    module_name, _, attr = name.rpartition(".")
    try:
        current = getattr(root.get_submodule(module_name), attr, None)
    except AttributeError:
        return None
    if not isinstance(current, Tensor):
        return None
    return refusal(current) or (refusal(current._base) if current._base is not None else None)


def check_module(module: nn.Module, what: str) -> None:
    """Raise ``TypeError`` if ``module`` is, or holds, FSDP1-wrapped or ZeRO-3-partitioned parameters."""
    for name, p in module.named_parameters():
        reason = refusal(p)
        if reason is not None:
            raise TypeError(f"{what}: {reason} (parameter {name!r} of {type(module).__name__})")
    fsdp = sys.modules.get("torch.distributed.fsdp")
    fsdp1 = getattr(fsdp, "FullyShardedDataParallel", None)
    if fsdp1 is not None and any(isinstance(m, fsdp1) for m in module.modules()):
        raise TypeError(f"{what}: {FSDP1}")
