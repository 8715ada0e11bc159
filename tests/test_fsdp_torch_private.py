"""Pins of the private torch APIs the distributed support relies on (listed in torchreg/_torch_private.py).

Their behaviour under real sharding is checked by tests/test_fsdp.py (2 processes); these fail fast, in
one process, when a torch release renames or changes them.
"""

from __future__ import annotations

import inspect

import pytest
import torch

from torchreg import _torch_private as private


def test_put_first_makes_autograd_run_the_hook_first() -> None:
    p = torch.zeros(2, requires_grad=True)
    order = []
    p.register_post_accumulate_grad_hook(lambda t: order.append("earlier"))
    handle = p.register_post_accumulate_grad_hook(lambda t: order.append("torchreg"))
    private.put_first(p, handle)
    p.sum().backward()
    assert order == ["torchreg", "earlier"]
    handle.remove()  # the handle still finds its hook in the re-filled dict
    order.clear()
    p.sum().backward()
    assert order == ["earlier"]


def test_fsdp1_marks_flattened_parameters_with_the_attribute_torchreg_reads() -> None:
    common = pytest.importorskip("torch.distributed.fsdp._common_utils")
    assert common.FSDP_FLATTENED == private.FSDP_FLATTENED
    t = torch.zeros(1)
    common._set_fsdp_flattened(t)
    assert private.fsdp1_flattened(t)


def test_fsdp2_internals_torchreg_reads_exist() -> None:
    state_mod = pytest.importorskip("torch.distributed._composable_state")
    assert isinstance(state_mod._module_state_mapping, type(state_mod._module_state_mapping))
    from torch.distributed.fsdp._fully_shard import _fsdp_param, _fsdp_param_group, _fsdp_state

    assert "_fsdp_param_groups" in inspect.getsource(_fsdp_state.FSDPState)
    assert "self.fsdp_params" in inspect.getsource(_fsdp_param_group.FSDPParamGroup)
    source = inspect.getsource(_fsdp_param.FSDPParam)
    assert "self.sharded_param = " in source and "self._unsharded_param = " in source
    # FSDP2 runs the sharded parameter's post-accumulate-grad hooks itself, after the reduce-scatter
    from torch.distributed.fsdp._fully_shard import _fsdp_collectives

    assert "_post_accumulate_grad_hooks" in inspect.getsource(_fsdp_collectives.foreach_reduce)
