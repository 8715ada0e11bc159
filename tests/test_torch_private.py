"""Pins the behaviour of every private torch API torchreg relies on (``torchreg/_torch_private.py``).

A torch release that changes one of them fails here first, with the name of the API in the test.
"""

from __future__ import annotations

import sys

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from torchreg import _torch_private as private


def test_current_graph_task_is_minus_one_outside_and_one_id_per_backward() -> None:
    assert private.current_graph_task() == -1
    w = nn.Parameter(torch.ones(3))
    seen = []
    w.register_post_accumulate_grad_hook(lambda p: seen.append(private.current_graph_task()))
    a = w * 2
    b = w * 3
    (a.sum() + b.sum()).backward()
    (w * 4).sum().backward()
    assert len(seen) == 2 and seen[0] != -1 and seen[1] != -1 and seen[0] != seen[1]


def test_queue_callback_runs_after_the_pass_and_a_requeued_one_after_those_queued_during_it() -> None:
    order = []
    w = nn.Parameter(torch.ones(2))

    def late() -> None:
        order.append("late")

    def first() -> None:
        order.append("first")
        private.queue_callback(late)

    def other() -> None:
        order.append("other")

    def hook(p: torch.Tensor) -> None:
        order.append("hook")
        private.queue_callback(first)

    w.register_post_accumulate_grad_hook(hook)
    x = (w * 2).sum()
    x.register_hook(lambda g: private.queue_callback(other))  # queued before the hook: runs first
    x.backward()
    assert order == ["hook", "other", "first", "late"]


def test_run_backward_frame_is_on_the_stack_with_its_inputs() -> None:
    w, v = nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(2))
    found = []

    def hook(p: torch.Tensor) -> None:
        frames = [f for f in private.frames_from(private.frame(0)) if f.f_code is private.RUN_BACKWARD]
        found.append(frames[0].f_locals.get("args"))

    w.register_post_accumulate_grad_hook(hook)
    (w * v).sum().backward(inputs=[w])
    assert found and [id(t) for t in found[0][3]] == [id(w)]


def test_function_backward_frame_holds_the_node_under_reentrant_checkpointing() -> None:
    layer = nn.Linear(2, 2)
    nodes = []

    def hook(p: torch.Tensor) -> None:
        run = 0
        for f in private.frames_from(private.frame(0)):
            if f.f_code is private.RUN_BACKWARD:
                run += 1
            elif f.f_code is private.FUNCTION_BACKWARD and run:
                nodes.append(f.f_locals.get("self"))
                return

    layer.weight.register_post_accumulate_grad_hook(hook)
    x = torch.randn(3, 2, requires_grad=True)
    checkpoint(layer, x, use_reentrant=True).sum().backward()
    assert len(nodes) == 1 and hasattr(nodes[0], "register_hook")


def test_will_execute_tells_a_listed_gradient_edge() -> None:
    w, v = nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(2))
    answers = {}

    def probe(name: str, p: torch.Tensor):
        def hook(grad: torch.Tensor) -> None:
            answers[name] = private.will_execute(torch.autograd.graph.get_gradient_edge(p).node)
        return hook

    y = (w * v).sum()
    y.register_hook(probe("w", w))
    y.register_hook(probe("v", v))
    torch.autograd.backward(y, inputs=[torch.autograd.graph.get_gradient_edge(w)])
    assert answers == {"w": True, "v": False}


def test_grad_scaler_scale_is_a_device_tensor_and_step_frames_are_known() -> None:
    scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
    layer = nn.Linear(2, 1)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    scaler.scale(layer(torch.ones(1, 2)).sum()).backward()
    scale = private.scaler_scale(scaler)
    assert isinstance(scale, torch.Tensor) and scale.item() == 8.0
    seen = []
    handle = opt.register_step_pre_hook(lambda o, a, k: seen.extend(
        f.f_code for f in private.frames_from(private.frame(0)) if f.f_code in private.SCALER_STEPS))
    scaler.step(opt)
    handle.remove()
    assert set(seen) == set(private.SCALER_STEPS)


def test_post_accumulate_grad_hooks_are_listed_in_registration_order() -> None:
    w = nn.Parameter(torch.ones(1))
    first, second = (lambda p: None), (lambda p: None)
    w.register_post_accumulate_grad_hook(first)
    w.register_post_accumulate_grad_hook(second)
    assert list(private.post_accumulate_grad_hooks(w).values()) == [first, second]
    assert private.post_accumulate_grad_hooks(nn.Parameter(torch.ones(1))) == {}


def test_compiled_autograd_region_flag_exists() -> None:
    import torch._dynamo.compiled_autograd as ca  # noqa: F401

    assert hasattr(sys.modules["torch._dynamo.compiled_autograd"], "in_compiled_autograd_region")
    assert private.in_compiled_autograd() is False


def test_found_inf_is_read_from_a_fused_optimizer_only_when_a_tensor() -> None:
    opt = torch.optim.SGD([nn.Parameter(torch.ones(1))], lr=0.1)
    assert private.found_inf(opt) is None
    opt.found_inf = torch.ones(())
    assert private.found_inf(opt) is opt.found_inf
