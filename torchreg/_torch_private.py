"""Every private torch (and CPython) API torchreg relies on, in one place.

A new torch release that changes one of these breaks this file and the tests that pin each behaviour
(``tests/test_torch_private.py``), nowhere else. Each entry says what torchreg uses it for and the
torch versions it was checked on. "Checked" means the pinning tests passed there; the project is
developed and tested on torch 2.13 (``constraints.txt``) and declares ``torch>=2.4``.

=====================================  =====================================================  ==========
API                                    used for                                               checked
=====================================  =====================================================  ==========
``torch._C._current_graph_task_id``    which backward pass (graph task) runs a hook; -1       2.4-2.13
                                       outside any
``Variable._execution_engine           the end-of-backward step, queued in the running pass;  2.4-2.13
.queue_callback``                      a callback queued from a callback runs after those
                                       queued during the pass (DDP's finalization)
``torch._C._will_engine_execute_node`` ``backward(inputs=...)`` given as GradientEdges:       2.4-2.13
                                       does this pass run a parameter's AccumulateGrad?
``torch.autograd.graph                 the frame of every ``backward()`` call (its ``inputs``   2.3-2.13
._engine_run_backward``                are read from it; a second one on the stack means a
                                       nested pass)
``BackwardCFunction.apply``            the frame of a Python ``autograd.Function``'s backward  2.4-2.13
                                       (reentrant checkpointing runs a nested pass there)
``GradScaler.step`` /                  the frames of a scaler driving ``optimizer.step()``    2.4-2.13
``GradScaler._maybe_opt_step``         (the undeclared-scaler warning)
``GradScaler._scale``                  the current scale as a device tensor (``get_scale()``   2.4-2.13
                                       reads it on the host)
``Tensor._post_accumulate_grad_hooks`` the hooks registered on a parameter (hook order)       2.4-2.13
``torch._dynamo.compiled_autograd      refuse compiled autograd (its end-of-backward step      2.4-2.13
.in_compiled_autograd_region``         would not run)
``optimizer.found_inf``                a fused optimizer under ``GradScaler.step`` is called  2.4-2.13
                                       even for a skipped step
``Tensor._post_accumulate_grad_hooks`` torchreg's hook first (:func:`put_first`): autograd     2.13
(re-inserting its items)               runs them in the dict's insertion order
``_composable_state                    FSDP2's parameter groups (:func:`fsdp2_params`): the   2.13
._module_state_mapping``, ``FSDPState  sharded and unsharded parameter of each ``FSDPParam``
._fsdp_param_groups``, ``FSDPParamGroup
.fsdp_params``, ``FSDPParam.sharded_param
/_unsharded_param``
``_fsdp_flattened`` (FSDP1's           FSDP1 parameters and ``FlatParameter`` (refused)       2.13
``FSDP_FLATTENED``)
``sys._getframe`` /                    reading the frames above
``sys._current_frames``
=====================================  =====================================================  ==========
"""

from __future__ import annotations

import sys
from typing import Any, Dict, Iterator, Optional

import torch
from torch import Tensor

__all__ = [
    "FUNCTION_BACKWARD", "RUN_BACKWARD", "SCALER_STEPS", "current_graph_task", "current_frames", "found_inf",
    "frame", "fsdp1_flattened", "fsdp2_params", "fsdp2_unsharded", "in_compiled_autograd",
    "post_accumulate_grad_hooks", "put_first", "queue_callback", "scaler_scale", "will_execute",
]

#: The id of the graph task (backward pass) running on this thread; -1 outside any.
current_graph_task = torch._C._current_graph_task_id

#: ``queue_callback(fn)``: run ``fn()`` at the end of the running backward pass (first in, first out).
queue_callback = torch.autograd.Variable._execution_engine.queue_callback

#: ``will_execute(node)``: whether the running pass executes ``node`` (for ``backward(inputs=...)``).
will_execute = torch._C._will_engine_execute_node

#: The code of the function every ``backward()`` goes through (torch >= 2.3; before, torch.autograd.backward).
RUN_BACKWARD = getattr(torch.autograd.graph, "_engine_run_backward", torch.autograd.backward).__code__

#: The code that runs a Python ``autograd.Function``'s backward (its ``self`` is the node).
FUNCTION_BACKWARD = torch.autograd.function.BackwardCFunction.apply.__code__

#: The codes of ``GradScaler.step`` and the method that calls ``optimizer.step()`` from it.
SCALER_STEPS = (torch.amp.GradScaler.step.__code__, torch.amp.GradScaler._maybe_opt_step.__code__)

frame = sys._getframe
current_frames = sys._current_frames


def scaler_scale(scaler: Any) -> Optional[Tensor]:
    """The scaler's current scale as a device tensor (``None`` before its first ``scale()``)."""
    return scaler._scale


def post_accumulate_grad_hooks(p: Tensor) -> Dict[int, Any]:
    """The post-accumulate-grad hooks registered on ``p``, by handle id, in registration order."""
    return getattr(p, "_post_accumulate_grad_hooks", None) or {}


def in_compiled_autograd() -> bool:
    """True inside a backward run by compiled autograd (``torch._dynamo.config.compiled_autograd``)."""
    ca = sys.modules.get("torch._dynamo.compiled_autograd")
    return ca is not None and bool(ca.in_compiled_autograd_region)


def found_inf(optimizer: Any) -> Optional[Tensor]:
    """The ``found_inf`` tensor ``GradScaler.step`` gives a fused optimizer for the step in progress."""
    value = getattr(optimizer, "found_inf", None)
    return value if isinstance(value, Tensor) else None


def frames_from(start: Any) -> Iterator[Any]:
    """``start`` and the frames that called it, innermost first."""
    while start is not None:
        yield start
        start = start.f_back


def put_first(p: Tensor, handle: Any) -> None:
    """Make the post-accumulate-grad hook of ``handle`` the first of ``p``'s hooks. autograd iterates the
    hooks' dict as a plain dict (insertion order; ``OrderedDict.move_to_end`` does not change it), so
    the items are re-inserted, in the same dict object (which autograd holds)."""
    hooks = getattr(p, "_post_accumulate_grad_hooks", None)
    if not hooks or next(iter(hooks)) == handle.id:
        return
    items = list(hooks.items())
    hooks.clear()
    hooks[handle.id] = dict(items)[handle.id]
    for key, value in items:
        if key != handle.id:
            hooks[key] = value


#: The attribute FSDP1 (``FullyShardedDataParallel``) sets on the parameters it flattened and on each
#: ``FlatParameter`` (``torch.distributed.fsdp._common_utils.FSDP_FLATTENED``).
FSDP_FLATTENED = "_fsdp_flattened"


def fsdp1_flattened(t: Any) -> bool:
    """Whether FSDP1 flattened ``t`` into a ``FlatParameter`` (or ``t`` is one)."""
    return bool(getattr(t, FSDP_FLATTENED, False))


def fsdp2_params() -> Iterator[Any]:
    """Every ``FSDPParam`` of the live FSDP2 (``fully_shard``) states of this process."""
    try:
        from torch.distributed._composable_state import _module_state_mapping
        from torch.distributed.fsdp._fully_shard._fsdp_state import FSDPState
    except ImportError:  # pragma: no cover - a torch without FSDP2
        return
    for ref in list(_module_state_mapping.values()):
        state = ref()
        if isinstance(state, FSDPState):
            for group in getattr(state, "_fsdp_param_groups", None) or ():
                yield from group.fsdp_params


def fsdp2_sharded(fsdp_param: Any) -> Tensor:
    """The sharded parameter (a DTensor, what the module holds outside forward) of an ``FSDPParam``."""
    return fsdp_param.sharded_param


def fsdp2_unsharded(fsdp_param: Any) -> Optional[Tensor]:
    """The unsharded parameter FSDP2 keeps for an ``FSDPParam`` from its first all-gather on (autograd
    accumulates into it on every backward), or None before."""
    return fsdp_param.__dict__.get("_unsharded_param")
