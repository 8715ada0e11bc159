"""Collect the optional integrations' doctests only where their packages are installed; run every test
with one intra-op thread."""

import importlib.util

import pytest
import torch


def _missing(*packages):
    return all(importlib.util.find_spec(p) is None for p in packages)


collect_ignore = []
if _missing("lightning"):  # its doctest uses lightning.pytorch
    collect_ignore.append("torchreg/lightning.py")
if _missing("transformers"):
    collect_ignore.append("torchreg/hf.py")


@pytest.fixture(autouse=True)
def _one_intra_op_thread():
    """The tests' tensors are tiny: intra-op threads only add overhead, and two of them spin against
    each other on a busy 2-core machine (an LSTM step 50x slower, a docs page 10x)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
