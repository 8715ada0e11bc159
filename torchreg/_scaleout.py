"""Sharded and wrapped training: what torchreg needs to know about FSDP2, FSDP1 and DeepSpeed ZeRO-3.

* FSDP2 (``fully_shard``): a parameter is a DTensor holding this rank's shard. FSDP2 runs the
  post-accumulate-grad hooks of the sharded parameter itself, after the reduce-scatter has averaged the
  gradient over the ranks, and only on a backward that synchronizes gradients; autograd accumulates
  into the *unsharded* parameter (a plain ``nn.Parameter`` FSDP2 keeps from the first all-gather on)
  on every backward. :func:`fsdp2_unsharded` maps each sharded parameter to its unsharded one, so that
  the engine can tell a backward that reached a parameter without synchronizing (``model.
  set_requires_gradient_sync(False)`` during accumulation), and :func:`local` gives the shard to the
  elementwise kernels.
* FSDP1 (``FullyShardedDataParallel``) flattens the parameters into a ``FlatParameter``: autograd
  never reaches the original parameters, whose gradients FSDP1 writes as views of the sharded flat
  gradient at the end of backward. torchreg refuses it (:func:`refusal`).
* DeepSpeed ZeRO-3 partitions every parameter and gathers it for the forward only (``ds_id``,
  ``ds_status``); its gradients live in DeepSpeed's partitioned buffers. torchreg refuses it.
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, Optional

import torch
from torch import Tensor, nn

FSDP1 = (
    "torchreg cannot regularize parameters managed by the original FSDP (torch.distributed.fsdp."
    "FullyShardedDataParallel, 'FSDP1'): FSDP1 flattens them into a FlatParameter, so autograd never "
    "reaches the original parameters and the regularization would be lost. Use FSDP2 instead "
    "(torch.distributed.fsdp.fully_shard; with Accelerate or the Hugging Face Trainer, fsdp_version=2), "
    "with which torchreg is exact."
)
ZERO3 = (
    "torchreg cannot regularize parameters partitioned by DeepSpeed ZeRO stage 3: they are empty outside "
    "the forward and their gradients live in DeepSpeed's partitioned buffers, so the regularization would "
    "be lost. Use ZeRO stage 1 or 2, or FSDP2 (torch.distributed.fsdp.fully_shard), or add the penalty "
    "(torchreg.penalty(model)) to the loss."
)


def refusal(p: Tensor) -> Optional[str]:
    """Why torchreg cannot regularize ``p`` (FSDP1, ZeRO-3), or None."""
    if getattr(p, "_fsdp_flattened", False):  # torch.distributed.fsdp._common_utils.FSDP_FLATTENED
        return FSDP1
    if hasattr(p, "ds_id") and hasattr(p, "ds_status"):
        return ZERO3
    return None


def refusal_at(root: nn.Module, name: str) -> Optional[str]:
    """Why torchreg cannot regularize what ``root`` holds under the parameter name ``name`` now (during
    or after a forward): FSDP1 with ``use_orig_params=False`` removed the parameter and puts a view of its
    ``FlatParameter`` there during forward."""
    module_name, _, attr = name.rpartition(".")
    try:
        module = root.get_submodule(module_name)
    except AttributeError:
        return None
    current = getattr(module, attr, None)
    if not isinstance(current, Tensor):
        return None
    return refusal(current) or (refusal(current._base) if current._base is not None else None)


def check_module(module: nn.Module, what: str) -> None:
    """Raise ``TypeError`` if ``module`` is or holds FSDP1-wrapped or ZeRO-3-partitioned parameters."""
    fsdp1 = getattr(getattr(torch.distributed, "fsdp", None), "FullyShardedDataParallel", None)
    for name, p in module.named_parameters():
        reason = refusal(p)
        if reason is not None:
            raise TypeError(f"{what}: {reason} (parameter {name!r})")
    if fsdp1 is not None and any(isinstance(m, fsdp1) for m in module.modules()):
        raise TypeError(f"{what}: {FSDP1}")


def is_dtensor(t: Any) -> bool:
    return hasattr(t, "placements") and hasattr(t, "to_local")


def local(t: Tensor) -> Tensor:
    """This rank's shard of a DTensor (the same storage), or ``t`` itself."""
    return t.to_local() if is_dtensor(t) else t


def elementwise_on_shards(rule: Any, p: Tensor) -> bool:
    """Whether ``rule``'s gradient term of the DTensor ``p`` can be computed shard by shard: no dim the
    penalty couples is sharded."""
    coupled = {d % p.ndim for d in rule._coupled_dims(p)} if p.ndim else set()
    return not any(pl.is_shard() and pl.dim % p.ndim in coupled for pl in p.placements if hasattr(pl, "dim"))


def fsdp2_params(wanted: Iterable[Tensor]) -> Dict[int, Any]:
    """``id(sharded parameter) -> FSDPParam`` for the FSDP2-managed parameters among ``wanted``."""
    ids = {id(p) for p in wanted if is_dtensor(p)}
    found: Dict[int, Any] = {}
    if not ids:
        return found
    try:
        from torch.distributed._composable_state import _module_state_mapping
        from torch.distributed.fsdp._fully_shard._fsdp_state import FSDPState
    except ImportError:  # pragma: no cover - torch without FSDP2
        return found
    for ref in list(_module_state_mapping.values()):
        state = ref()
        if not isinstance(state, FSDPState):
            continue
        for group in getattr(state, "_fsdp_param_groups", None) or ():
            for fsdp_param in group.fsdp_params:
                if id(fsdp_param.sharded_param) in ids:
                    found[id(fsdp_param.sharded_param)] = fsdp_param
    return found


def fsdp2_unsharded(fsdp_param: Any) -> Optional[nn.Parameter]:
    """The unsharded parameter FSDP2 keeps for ``fsdp_param`` (from its first all-gather on), or None."""
    return fsdp_param.__dict__.get("_unsharded_param")


def put_first(p: Tensor, handle: Any) -> None:
    """Make the post-accumulate-grad hook of ``handle`` the first of ``p``'s hooks: torchreg's term must be
    in ``.grad`` before another hook reads it (an optimizer stepped in the hook, DeepSpeed's reduction).
    autograd runs them in the order of the dict (iterated as a plain dict: re-inserted, not moved)."""
    hooks = p._post_accumulate_grad_hooks
    if hooks is None or next(iter(hooks)) == handle.id:
        return
    items = list(hooks.items())
    hooks.clear()
    hooks[handle.id] = dict(items)[handle.id]
    for key, value in items:
        if key != handle.id:
            hooks[key] = value


def sharded_of(p: Tensor) -> Tensor:
    """The sharded parameter whose unsharded one FSDP2 put in the module during forward is ``p``, or
    ``p`` itself."""
    if is_dtensor(p) or not isinstance(p, nn.Parameter):
        return p
    try:
        from torch.distributed._composable_state import _module_state_mapping
        from torch.distributed.fsdp._fully_shard._fsdp_state import FSDPState
    except ImportError:  # pragma: no cover
        return p
    for ref in list(_module_state_mapping.values()):
        state = ref()
        if isinstance(state, FSDPState):
            for group in getattr(state, "_fsdp_param_groups", None) or ():
                for fsdp_param in group.fsdp_params:
                    if fsdp_param.__dict__.get("_unsharded_param") is p:
                        return fsdp_param.sharded_param
    return p
