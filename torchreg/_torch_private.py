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
    "frame", "in_compiled_autograd", "post_accumulate_grad_hooks", "queue_callback", "scaler_scale",
    "will_execute",
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
