"""The values the integrations log: the penalty and, for proximal and group rules, the sparsity.

Every value is computed on the parameters' device and all of them are read to the host together, by
one ``tolist()``: one host synchronization per log, whatever the number of rules and parameters.

Keys (the same in ``torchreg.lightning`` and ``torchreg.hf``):

* ``reg_penalty``: the total penalty, as :func:`torchreg.penalty` gives it;
* ``reg_zero_fraction``: the fraction of exactly-zero elements among the parameters of proximal rules
  and group rules (``GroupLasso``), when there are any;
* ``reg_zero_group_fraction``: the fraction of exactly-zero groups among the parameters of group rules;
* with ``per_rule``: the same per rule, ``reg_penalty/L1``, ``reg_zero_fraction/GroupLasso``, ...: a
  rule is named by its class, with ``_2``, ``_3`` for further rules of one class, in the order of the
  model's parameters (:func:`rule_names` gives the table).
"""

from __future__ import annotations

from typing import Any, Dict, List, Tuple

import torch
from torch import Tensor, nn

from ._tracking import is_lazy
from .report import covered_parameters

PENALTY = "reg_penalty"
ZERO_FRACTION = "reg_zero_fraction"
ZERO_GROUP_FRACTION = "reg_zero_group_fraction"


def rule_names(model: nn.Module) -> Dict[str, Any]:
    """``{name: rule}`` for the rules regularizing ``model``'s parameters: the class name, then ``_2``..."""
    names: Dict[str, Any] = {}
    seen: Dict[int, str] = {}
    for _, _, entry in covered_parameters(model):
        rule = entry.rule
        if id(rule) not in seen:
            base, n = type(rule).__name__, 1
            name = base
            while name in names:
                n += 1
                name = f"{base}_{n}"
            names[name] = rule
            seen[id(rule)] = name
    return names


def _sparse(rule: Any) -> bool:
    return bool(getattr(rule, "proximal", False)) or hasattr(rule, "group_norms")


def values(model: nn.Module, per_rule: bool = False) -> Dict[str, float]:
    """The logged values for ``model`` (see the module's documentation), read with one host sync."""
    params: List[Tuple[Any, Any]] = [(unit, entry) for _, unit, entry in covered_parameters(model)
                                     if not is_lazy(entry.param)]
    if not params:
        return {}
    names = {id(rule): name for name, rule in rule_names(model).items()}
    device = params[0][1].param.device
    # per rule: [penalty, zeros, zero groups] on the device; numel and group counts known on the host
    penalty: Dict[str, Tensor] = {}
    zeros: Dict[str, Tensor] = {}
    zero_groups: Dict[str, Tensor] = {}
    numel: Dict[str, int] = {}
    groups: Dict[str, int] = {}
    with torch.no_grad():
        for unit, entry in params:
            p, rule = entry.param, entry.rule
            name = names[id(rule)]
            value = unit.entry_penalty(entry).to(device=device, dtype=torch.float64)
            penalty[name] = penalty[name] + value if name in penalty else value
            if _sparse(rule):
                count = (p == 0).sum().to(device)
                zeros[name] = zeros[name] + count if name in zeros else count
                numel[name] = numel.get(name, 0) + p.numel()
            norms = getattr(rule, "group_norms", None)
            if norms is not None:
                n = norms(p)
                count = (n == 0).sum().to(device)
                zero_groups[name] = zero_groups[name] + count if name in zero_groups else count
                groups[name] = groups.get(name, 0) + n.numel()
    order = list(penalty)
    stacked = torch.stack([penalty[n] for n in order] + [zeros[n].double() for n in zeros]
                          + [zero_groups[n].double() for n in zero_groups])
    host = stacked.tolist()  # the one host synchronization
    read_penalty = dict(zip(order, host[:len(order)]))
    read_zeros = dict(zip(zeros, host[len(order):len(order) + len(zeros)]))
    read_groups = dict(zip(zero_groups, host[len(order) + len(zeros):]))
    out: Dict[str, float] = {PENALTY: sum(read_penalty.values())}
    if read_zeros:
        total = sum(numel.values())
        out[ZERO_FRACTION] = sum(read_zeros.values()) / total if total else 0.0
    if read_groups:
        total = sum(groups.values())
        out[ZERO_GROUP_FRACTION] = sum(read_groups.values()) / total if total else 0.0
    if per_rule:
        for name in order:
            out[f"{PENALTY}/{name}"] = read_penalty[name]
        for name, count in read_zeros.items():
            out[f"{ZERO_FRACTION}/{name}"] = count / numel[name] if numel[name] else 0.0
        for name, count in read_groups.items():
            out[f"{ZERO_GROUP_FRACTION}/{name}"] = count / groups[name] if groups[name] else 0.0
    return out
