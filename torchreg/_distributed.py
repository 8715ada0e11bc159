"""Process groups: when a unit's terms wait for the end of the backward, and the DDP sweep.

Under an initialized process group with more than one rank, a unit adds every term at the end of the
backward (its end-of-backward step runs after DistributedDataParallel's reducer has averaged the
gradients, see ``_session``), so that every rank adds the same terms whichever parameters each rank's
forward used. :class:`DistributedSweep` also gives their terms to units that this rank's backward did
not reach at all but that DDP gave a gradient (their parameters were used on another rank).
"""

from __future__ import annotations

from typing import Any, Dict, List, Tuple

import torch
import weakref

from . import _torch_private as private

__all__ = ["DistributedSweep", "distributed"]


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
