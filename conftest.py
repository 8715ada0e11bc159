"""Collect the optional integrations' doctests only where their packages are installed."""

import importlib.util


def _missing(*packages):
    return all(importlib.util.find_spec(p) is None for p in packages)


collect_ignore = []
if _missing("lightning"):  # its doctest uses lightning.pytorch
    collect_ignore.append("torchreg/lightning.py")
if _missing("transformers"):
    collect_ignore.append("torchreg/hf.py")
