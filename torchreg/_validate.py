"""Argument checks shared by the public functions.

Every check raises at construction time, before anything is changed, with a message that names the
bad value and says what is allowed: ``TypeError`` for a value of the wrong type, ``ValueError`` for a
value of the right type that is out of range.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch
from torch import nn

__all__ = ["check_flags", "check_hookable", "check_module", "check_rules_mapping", "check_strength",
           "check_positive_int", "describe", "largest"]


def describe(value: Any) -> str:
    """``repr(value) (type)``; a module by its class, a huge int by its size (its repr can be thousands of
    digits long, or raise)."""
    if isinstance(value, nn.Module):  # its repr can be a whole model
        return f"a {type(value).__name__} module"
    if isinstance(value, numbers.Integral) and not isinstance(value, bool) and abs(int(value)).bit_length() > 200:
        digits = int(abs(int(value)).bit_length() * math.log10(2)) + 1
        text = f"{'-' if value < 0 else ''}an int of about {digits} digits (~1e{digits - 1})"
    else:
        text = repr(value)
    return f"{text} ({type(value).__name__})"


def check_module(value: Any, what: str) -> nn.Module:
    """Return ``value`` if it is an ``nn.Module`` instance; raise ``TypeError`` otherwise."""
    if isinstance(value, nn.Module):
        return value
    if isinstance(value, type) and issubclass(value, nn.Module):
        raise TypeError(
            f"{what} expects an nn.Module instance, got the class {value.__module__}."
            f"{value.__qualname__}; instantiate it, e.g. {value.__name__}(...)"
        )
    raise TypeError(f"{what} expects an nn.Module instance, got {describe(value)}")


def check_hookable(value: Any, what: str) -> nn.Module:
    """:func:`check_module`, and not a TorchScript module (which takes no ``load_state_dict`` hook)."""
    check_module(value, what)
    if isinstance(value, torch.jit.ScriptModule):
        raise TypeError(
            f"{what} cannot regularize a TorchScript module ({type(value).__name__}): a ScriptModule takes "
            "no load_state_dict hook, which torchreg needs. Regularize the eager module, then script it: "
            "torch.jit.script(torchreg.L1(module, lam)) is regularized as the eager module is"
        )
    from ._distributed import check_module as check_wrapping

    check_wrapping(value, what)  # FSDP1, DeepSpeed ZeRO-3: refused
    return value


def check_strength(value: Any, name: str) -> float:
    """Return ``value`` as a float if it is a finite real number >= 0 (or a one-element tensor of one)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        if isinstance(value, torch.Tensor):
            if value.dtype == torch.bool:
                raise TypeError(f"{name} must be a real number >= 0, got a bool tensor {value!r}")
            if value.is_meta:
                raise TypeError(f"{name} must be a real number >= 0, got a tensor on the meta device, which "
                                f"holds no value ({value!r})")
            if value.numel() != 1 or value.is_complex():
                raise TypeError(f"{name} must be a real number >= 0 or a one-element real tensor, got "
                                f"{value!r}")
            low = value.dtype == torch.float32
            value = value.item()  # a 0-dim / one-element tensor is accepted as its value
            if low:
                value = _shortest(value, torch.tensor(value).to(torch.float32).item())
        else:
            raise TypeError(f"{name} must be a real number >= 0, got {describe(value)}")
    if isinstance(value, numbers.Real) and not isinstance(value, (float, int)) and getattr(value, "dtype", None) is not None:
        try:  # a numpy float32 scalar: its shortest decimal, not its float64 expansion
            if value.dtype.itemsize == 4:
                value = _shortest(float(value), float(value))
        except (AttributeError, TypeError, ValueError, OverflowError):
            pass
    try:
        number = float(value)
    except OverflowError:
        raise ValueError(f"{name} must be a finite real number >= 0, got {describe(value)}, beyond the largest "
                         f"float ({torch.finfo(torch.float64).max!r})") from None
    if math.isnan(number) or math.isinf(number) or number < 0:
        raise ValueError(f"{name} must be a finite real number >= 0, got {number!r}")
    return number


def _shortest(value: float, as_float32: float) -> float:
    """The shortest decimal that is the same float32 as ``value`` (a strength given as a float32 tensor or
    numpy scalar: ``1e-3`` rather than ``0.0010000000474974513``, the float64 expansion of its float32
    value); ``value`` itself if it is not a float32 value."""
    if value != as_float32 or math.isinf(value) or math.isnan(value):
        return value
    for digits in range(1, 10):
        candidate = float(f"{value:.{digits}g}")
        if torch.tensor(candidate, dtype=torch.float32).item() == value:
            return candidate
    return value


def largest(dtype: torch.dtype) -> float:
    """The largest finite value of a floating or complex ``dtype`` (of its real part); ``inf`` otherwise."""
    if not (dtype.is_floating_point or dtype.is_complex):
        return math.inf
    return float(torch.finfo(dtype).max)


def check_positive_int(value: Any, name: str) -> int:
    """Return ``value`` if it is an int >= 1."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int >= 1, got {describe(value)}")
    if value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return int(value)


def check_flags(what: str, **flags: Any) -> None:
    """Raise ``TypeError`` unless every keyword value is ``True`` or ``False``."""
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise TypeError(f"{what}: {name} must be True or False, got {describe(value)}")


def check_rules_mapping(what: str, rules: Any) -> None:
    """Raise ``TypeError`` for a list of rules as a config file holds them (not yet a rules mapping)."""
    if isinstance(rules, (list, tuple)):
        raise TypeError(
            f"{what}: rules must be a mapping from module class or name pattern to regularizer; got a "
            f"{type(rules).__name__}. A list of {{match: ..., regularizer: ...}} entries, as in a YAML or JSON "
            "config, is plain data: turn it into rules first with torchreg.rules_from_config(config)"
        )
