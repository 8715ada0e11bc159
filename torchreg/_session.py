"""Backward sessions: which backward pass a hook runs in, and when a unit's pass ends.

One backward pass of a unit is a *session* (:class:`Session`), from its first hook to its
end-of-backward step. A backward started inside another one's node (``torch.utils.checkpoint`` with
``use_reentrant=True`` runs one in its node's backward; it is its own graph task, on the same thread)
is part of the enclosing one: its hooks join the session, and the end-of-backward step runs once, in
the outermost backward (queued there from a post-hook on the enclosing node when the nested backward
reached the unit first). Nesting is read from the Python stack once per backward (:func:`task_info`:
a ``backward()`` frame beyond the innermost one, or a Python node's backward). ``backward(inputs=...)``
is read there too: the end-of-backward step then adds to the listed parameters only, as autograd
accumulates into them only. A second backward through the unit from another thread while a session is
open raises (torchreg cannot give each its own terms).

The end-of-backward step is queued twice (a callback that queues itself again), so that it runs after
every callback queued during the backward, DistributedDataParallel's reducer finalization among them.

A unit owns one :class:`Sessions` (``unit.sessions``) and gives it three methods: ``_on_open()`` (a
session begins: read this backward's factors), ``_on_owned(task)`` (the pass that will end the session
is known) and ``_on_end(session)`` (that pass ended: add what the hooks did not).
"""

from __future__ import annotations

import functools
import threading
import weakref
from typing import Any, Callable, List, Optional, Tuple

import torch
from torch import Tensor

from . import _torch_private as private

__all__ = ["Session", "Sessions", "task_info"]


class Task:
    """What the engine needs to know about one backward pass (an autograd graph task), read once from
    the Python stack of the thread that runs its first hook (:func:`task_info`).

    ``nested``: the pass was started inside another one's node; such a pass is part of the enclosing
    one. ``enclosed``: the enclosing node is a Python ``autograd.Function`` (``node``, kept only until a
    post-hook is registered on it: that post-hook runs in the enclosing pass). ``listed``: ``None``, or
    for ``backward(inputs=...)`` a test telling whether a parameter is one of the listed inputs."""

    __slots__ = ("id", "nested", "enclosed", "node", "listed", "pending", "__weakref__")

    def __init__(self, task: int, nested: bool, node: Any, listed: Optional[Callable[[Tensor], bool]]) -> None:
        self.id = task
        self.nested = nested
        self.enclosed = node is not None
        self.node = node
        self.listed = listed
        self.pending: List[Tuple[Any, "Session"]] = []  # (unit, session) waiting for the enclosing pass


#: The last task asked for, with a getter of its info: a strong one for a top-level backward (its info
#: refers to no tensor or module), a weak one for a nested backward (its info can refer to the enclosing
#: node and to units: held by the node's post-hook only, so that nothing outlives the graph).
_last_task: Tuple[int, Callable[[], Optional[Task]]] = (-1, lambda: None)


def task_info(task: int) -> Task:
    """The :class:`Task` of the running graph task ``task`` (cached for the last one asked)."""
    global _last_task
    cached_task, get = _last_task
    if cached_task == task:
        cached = get()
        if cached is not None:
            return cached
    run = None
    nested, node = False, None
    for frame in private.frames_from(private.frame(1)):
        code = frame.f_code
        if code is private.RUN_BACKWARD:
            if run is not None:  # a backward() called, outside any Function, by code a backward runs
                nested = True
                break
            run = frame
        elif code is private.FUNCTION_BACKWARD and run is not None:  # backward() inside a Function's backward
            nested, node = True, frame.f_locals.get("self")
            break
    listed = None
    if not nested:
        listed = _listed(_inputs_of(run) if run is not None else _inputs_elsewhere())
    info = Task(task, nested, node, listed)
    _last_task = (task, weakref.ref(info) if nested else (lambda: info))
    return info


def _inputs_of(run: Any) -> Any:
    """The ``inputs`` that ``backward()`` passed to ``_engine_run_backward`` (``()`` when none)."""
    local = run.f_locals
    if "inputs" in local:  # torch.autograd.backward's own frame
        return local["inputs"] or ()
    args, kwargs = local.get("args", ()), local.get("kwargs", {})
    if not kwargs.get("accumulate_grad", True):
        return ()
    return args[3] if len(args) > 3 else kwargs.get("inputs", ())


def _inputs_elsewhere() -> Any:
    """A hook run by a device thread (CUDA) has no ``backward()`` frame below it: the thread that called
    ``backward()`` waits in it. Its ``inputs`` if exactly one thread is in a backward, else ``()``."""
    found = []
    for top in private.current_frames().values():
        run = next((f for f in private.frames_from(top) if f.f_code is private.RUN_BACKWARD), None)
        if run is not None:
            found.append(_inputs_of(run))
    return found[0] if len(found) == 1 else ()


def _listed(inputs: Any) -> Optional[Callable[[Tensor], bool]]:
    if not inputs:
        return None
    ids = {id(t) for t in inputs if isinstance(t, Tensor)}
    if len(ids) == len(inputs):
        return lambda p: id(p) in ids
    # GradientEdges among the inputs: ask the engine whether it runs the parameter's AccumulateGrad
    return lambda p: id(p) in ids or private.will_execute(torch.autograd.graph.get_gradient_edge(p).node)


class Session:
    """A unit's share of one backward pass, from its first hook to its end-of-backward step.

    ``owner`` is the graph task that runs the end-of-backward step: the outermost pass (-1 while it is
    not known yet: the unit was reached first by a nested pass); ``nested`` the tasks of the passes run
    inside it that reached the unit. The unit refers to its session weakly; the callbacks queued in the
    owner task hold it (or, while the owner is not known, the post-hook on the enclosing node), so a
    backward that failed half-way, whose callbacks never run and are freed, ends its session too."""

    __slots__ = ("owner", "nested", "listed", "__weakref__")

    def __init__(self) -> None:
        self.owner = -1
        self.nested: set = set()
        self.listed: Optional[Callable[[Tensor], bool]] = None


def _no_session() -> Optional[Session]:
    return None


class _Adopt:
    """Post-hook on the node whose backward ran a nested pass that reached units first: runs in the
    enclosing pass, which takes those units' sessions over (one end-of-backward step for the whole)."""

    def __init__(self, info: Task) -> None:
        self.info = info

    def __call__(self, grad_inputs: Any, grad_outputs: Any) -> None:
        pending, self.info.pending = self.info.pending, []
        if pending:
            outer = task_info(private.current_graph_task())
            for unit, session in pending:
                sessions = unit.sessions
                with sessions.lock:
                    if session.owner == -1 and sessions.current() is session:
                        sessions.home(unit, session, outer)


class Sessions:
    """The backward bookkeeping of one unit. ``task`` (the graph task whose hooks ran last) and ``seen``
    (the entries the hooks reached in this session) are read by the hooks' hot path."""

    __slots__ = ("task", "seen", "lock", "current")

    def __init__(self) -> None:
        self.task = -1
        self.seen: set = set()
        self.lock = threading.Lock()
        self.current: Callable[[], Optional[Session]] = _no_session  # weak: see Session

    def begin(self, unit: Any) -> None:
        """A hook of ``unit`` runs in another graph task than the last one: a new backward (open a
        session: ``unit._on_open()``, queue the end-of-backward step), or a backward nested in the one in
        progress (reentrant checkpointing: join its session), or, from another thread, a second backward
        running at the same time (an error)."""
        with self.lock:
            task = private.current_graph_task()
            if self.task == task:
                return
            if private.in_compiled_autograd():
                raise RuntimeError(
                    "torchreg does not support compiled autograd (torch._dynamo.config.compiled_autograd"
                    "=True): its end-of-backward step would not run and penalties would go missing. "
                    "torch.compile of the model itself is supported; leave compiled autograd off."
                )
            session = self.current()
            if session is None:
                session = Session()
                self.current = weakref.ref(session)
                self.seen = set()
                unit._on_open()
                self.home(unit, session, task_info(task))
            elif task != session.owner and task not in session.nested:
                info = task_info(task)
                if info.nested:  # a backward run inside the one in progress: part of it
                    session.nested.add(task)
                elif session.owner == -1:  # the enclosing backward, on another device thread
                    self._own(unit, session, info)
                else:
                    raise RuntimeError(
                        f"torchreg: two backward passes through the regularized parameters of "
                        f"{type(unit.root).__name__} are running at the same time (from different threads). "
                        "torchreg adds each parameter's term once per backward pass and cannot give each of "
                        "two concurrent passes its own; run them one after the other (e.g. under a lock), "
                        "or give each thread its own copy of the model."
                    )
            self.task = task

    def home(self, unit: Any, session: Session, info: Task) -> None:
        """Give ``session`` to the backward ``info``, or, when that one is nested in another one's Python
        node, to the enclosing backward, from a post-hook on that node (which runs in it)."""
        if info.nested and info.enclosed:
            session.nested.add(info.id)
            info.pending.append((unit, session))
            if info.node is not None:  # the first unit: the node's post-hook holds info (no cycle back)
                info.node.register_hook(_Adopt(info))
                info.node = None
        else:  # a top-level backward (or one nested outside any Function: it counts as its own)
            self._own(unit, session, info)

    def _own(self, unit: Any, session: Session, info: Task) -> None:
        session.owner = info.id
        session.listed = info.listed
        unit._on_owned(info.id)
        private.queue_callback(functools.partial(_end_of_backward, unit, session))

    def close(self) -> None:
        self.current = _no_session
        self.task = -1
        self.seen = set()


def _end_of_backward(unit: Any, session: Session) -> None:
    # Queued again so that it runs after the callbacks queued during the backward (DDP's).
    private.queue_callback(functools.partial(_finish, unit, session))


def _finish(unit: Any, session: Session) -> None:
    sessions = unit.sessions
    if sessions.current() is not session:  # (cannot happen: a session ends here only)
        return
    try:
        unit._on_end(session)
    finally:
        sessions.close()
