"""Argument checks shared by the public functions.

Every check raises at construction time, before anything is changed, with a message that names the
bad value and says what is allowed: ``TypeError`` for a value of the wrong type, ``ValueError`` for a
value of the right type that is out of range.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

from torch import nn

__all__ = ["check_module", "check_strength", "check_positive_int"]


def _describe(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def check_module(value: Any, what: str) -> nn.Module:
    """Return ``value`` if it is an ``nn.Module`` instance; raise ``TypeError`` otherwise."""
    if isinstance(value, nn.Module):
        return value
    if isinstance(value, type) and issubclass(value, nn.Module):
        raise TypeError(
            f"{what} expects an nn.Module instance, got the class {value.__module__}."
            f"{value.__qualname__}; instantiate it, e.g. {value.__name__}(...)"
        )
    raise TypeError(f"{what} expects an nn.Module instance, got {_describe(value)}")


def check_strength(value: Any, name: str) -> float:
    """Return ``value`` as a float if it is a finite real number >= 0."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        if hasattr(value, "numel") and getattr(value, "numel")() == 1 and not value.is_complex():
            value = value.item()  # a 0-dim / one-element tensor is accepted as its value
        else:
            raise TypeError(f"{name} must be a real number >= 0, got {_describe(value)}")
    value = float(value)
    if math.isnan(value) or math.isinf(value) or value < 0:
        raise ValueError(f"{name} must be a finite real number >= 0, got {value!r}")
    return value


def check_positive_int(value: Any, name: str) -> int:
    """Return ``value`` if it is an int >= 1."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int >= 1, got {_describe(value)}")
    if value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return int(value)
