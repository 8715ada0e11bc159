"""Reading regularization state, never changing it: :func:`penalty` and :func:`summary`."""

from __future__ import annotations

from typing import Any, Dict, List, Sequence, Set

import torch
from torch import Tensor, nn

from . import _activity_engine, _constraint_unit, _engine, _registry
from ._anchor import at_center
from ._tracking import is_lazy, state_kw
from ._select import EXCLUDED, default_weights
from ._validate import check_module

__all__ = ["penalty", "summary", "Summary", "sparsity", "Sparsity"]


def penalty(module: nn.Module) -> Tensor:
    """The current total penalty of every regularization in ``module`` (0-dim tensor, no graph).

    The sum over the regularized parameters of ``module`` (also those regularized by a call on an
    enclosing module) of ``lam * sum|w|`` (L1) and ``lam / 2 * sum w**2`` (L2), the
    same value whose gradient torchreg adds during backward. It is for logging ("how much of the loss
    is regularization"): torchreg adds the gradient itself, so do not add this to the loss.
    ``tensor(0.)`` when nothing is regularized. Activity regularization (``ActivityL1``,
    ``ActivityL2``) is not included: its penalty depends on outputs, which torchreg does not keep
    (``rule.penalty(out, batch)`` computes one call's value from an output you kept).

    Example::

        >>> import torch, torchreg
        >>> layer = torchreg.L1(torch.nn.Linear(2, 1, bias=False), lam=0.5)
        >>> with torch.no_grad():
        ...     _ = layer.weight.copy_(torch.tensor([[1.0, -3.0]]))
        >>> torchreg.penalty(layer)
        tensor(2.)
    """
    check_module(module, "penalty")
    own = {id(p) for p in module.parameters()}
    units = {id(u): u for u in _engine.units_in(module)}
    for p in module.parameters():  # regularization applied to an enclosing module
        unit = _engine.owner_of(p)
        if unit is not None:
            units.setdefault(id(unit), unit)
    total = None
    for unit in units.values():
        value = unit.penalty(lambda p: id(p) in own)
        if value is not None:
            total = value if total is None else total + value.to(total.device)
    return torch.zeros(()) if total is None else total


def _table(columns: Sequence[str], rows: List[List[str]]) -> List[str]:
    """The lines of a plain-text table: ``columns`` as its header, a rule of dashes, then ``rows``."""
    rows = [list(columns)] + rows
    widths = [max(len(row[i]) for row in rows) for i in range(len(columns))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return lines


class Summary:
    """What :func:`summary` returns: ``str()`` is a table, :attr:`records` the same as dicts, and
    :attr:`uncovered` the weights no regularization covers.

    Each record has the keys ``module`` (qualified path), ``type``, ``rule`` (which rule matched,
    in rule order), ``regularizer`` (its repr, or ``None`` for a skipped module), ``parameters`` (the
    covered names), ``numel``, ``penalty`` (a float) and ``note`` (why a module was skipped). A weight
    constraint (``torchreg.MaxNorm``, ...) has rows of its own (after a module's penalty row), with
    ``regularizer`` the constraint's repr, ``penalty`` ``None`` and the note
    ``"constraint, after each optimizer step"``.

    :attr:`uncovered` has one dict per module type, in the order the modules are walked, with the keys
    ``type`` (the class name), ``count`` (how many weights), ``numel``, ``frozen`` (how many of them
    have ``requires_grad=False``) and ``parameters`` (their qualified names). A weight is what the
    default selection takes (a kernel of a layer that is not a normalization layer, see
    ``torchreg.L1``'s ``params``); it is uncovered when no regularization or constraint applied to the
    module, to one of its submodules or to an enclosing module covers it, and no ``None`` rule excluded it (a
    ``None`` rule of a call on an enclosing module shows in the summary of that module, not of its
    parts). A rule that matched a module but selected other parameters (``params="bias"``) leaves
    the module's weight uncovered.
    """

    columns = ("module", "type", "rule", "regularizer", "parameters", "numel", "penalty", "note")

    def __init__(self, records: List[Dict[str, Any]], uncovered: Sequence[Dict[str, Any]] = ()) -> None:
        self.records = records
        self.uncovered = list(uncovered)

    def __len__(self) -> int:
        return len(self.records)

    def __str__(self) -> str:
        def cell(record: Dict[str, Any], key: str) -> str:
            value = record[key]
            if value is None:
                return "-"
            if key == "parameters":
                return ", ".join(value) or "-"
            if key == "penalty":
                return f"{value:.4g}"
            return str(value) if value != "" else "-"

        lines = _table(self.columns, [[cell(r, c) for c in self.columns] for r in self.records])
        total = sum(r["penalty"] for r in self.records if r["penalty"] is not None)
        numel = sum(r["numel"] for r in self.records)
        activity = sum(r["note"] == _activity_engine.NOTE for r in self.records)
        constrained = sum(r["numel"] for r in self.records if r["note"] == _constraint_unit.NOTE)
        also = f"; {activity} activity regularization{'s' if activity != 1 else ''} (not in the penalty)" if activity else ""
        if constrained:
            also += f"; {constrained} constrained elements"
        lines.append(f"total: {numel - constrained} regularized elements, penalty {total:.4g}{also}")
        for group in self.uncovered:
            n, frozen = group["count"], group["frozen"]
            extra = "" if not frozen else ", frozen" if frozen == n else f", {frozen} frozen"
            lines.append(f"not covered: {n} weight{'s' if n != 1 else ''} of {group['type']} "
                         f"({group['numel']:,} elements{extra})")
        if not self.uncovered:
            lines.append("not covered: none")
        return "\n".join(lines)

    __repr__ = __str__


def summary(module: nn.Module) -> Summary:
    """A table of what is regularized in ``module``, one row per regularized or skipped module.

    Rows come in the order the model's modules were walked; ``rule`` says which rule matched first.
    The lines after the table say which weights no rule covers, by module type ("not covered: 48
    weights of Conv1D (1,769,472 elements)"), so that a rule that missed a kind of layer shows at once;
    :attr:`Summary.uncovered` gives the same as dicts.

    Example::

        >>> import torch, torchreg
        >>> from torch import nn
        >>> net = torchreg.apply_regularization(
        ...     nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)), {nn.Module: torchreg.L2(1e-3)})
        >>> [(r["module"], r["parameters"], r["note"]) for r in torchreg.summary(net).records]
        [('0', ['weight'], ''), ('1', [], 'selects no parameter here')]
        >>> net = torchreg.apply_regularization(
        ...     nn.Sequential(nn.Embedding(10, 4), nn.Conv1d(4, 4, 3), nn.Linear(4, 2)),
        ...     {nn.Linear: torchreg.L2(1e-3)})
        >>> print(str(torchreg.summary(net)).splitlines()[-2:])
        ['not covered: 1 weight of Embedding (40 elements)', 'not covered: 1 weight of Conv1d (48 elements)']
        >>> torchreg.summary(net).uncovered[1]
        {'type': 'Conv1d', 'count': 1, 'numel': 48, 'frozen': 0, 'parameters': ['1.weight']}
    """
    check_module(module, "summary")
    prefixes = {id(m): name for name, m in module.named_modules()}
    records: List[Dict[str, Any]] = []
    units = list(_engine.units_in(module)) + list(_registry.units_in(module, _constraint_unit.KIND))
    for unit in units:
        constraint = isinstance(unit, _constraint_unit.ConstraintUnit)
        base = prefixes.get(id(unit.root), "")
        rows: Dict[str, Dict[str, Any]] = {}

        def row(path: str, kind: str, rule: str, regularizer: Any) -> Dict[str, Any]:
            full = ".".join(p for p in (base, path) if p)
            key = (full, regularizer)
            if key not in rows:
                rows[key] = dict(module=full, type=kind, rule=rule, regularizer=regularizer,
                                 parameters=[], numel=0, penalty=None, note="", _path=path)
            return rows[key]

        with torch.no_grad():
            for entry in unit.entries:
                path, _, leaf = entry.name.rpartition(".")
                owner = unit.root.get_submodule(path)
                r = row(path, type(owner).__name__, entry.origin or "-", repr(entry.rule))
                r["parameters"].append(leaf)
                if constraint:
                    r["note"] = _constraint_unit.NOTE
                if not is_lazy(entry.param):
                    r["numel"] += entry.param.numel()
                    if not constraint:
                        r["penalty"] = (r["penalty"] or 0.0) + float(unit.entry_penalty(entry))
        for skip in unit.skipped:
            row(skip.name, skip.module_type, skip.origin, None)["note"] = skip.reason
        order = {name: i for i, (name, _) in enumerate(unit.root.named_modules())}
        records.extend(sorted(rows.values(), key=lambda r: order.get(r.pop("_path"), -1)))
    records.extend(_activity_engine.summary_records(module))  # activity rows, penalty None
    position = {name: i for i, name in enumerate(prefixes.values())}
    records.sort(key=lambda r: position.get(r["module"], len(position)))  # module order, whatever the kind
    return Summary(records, _uncovered(module))


def _uncovered(module: nn.Module) -> List[Dict[str, Any]]:
    """The default weights of ``module`` that no unit covers and no ``None`` rule excluded, by type."""
    units = {id(u): u for u in _engine.units_in(module)}
    units.update((id(u), u) for u in _registry.units_in(module, _constraint_unit.KIND))
    for p in module.parameters():  # regularization applied to an enclosing module
        for unit in (_engine.owner_of(p), _constraint_unit.owner_of(p)):
            if unit is not None:
                units.setdefault(id(unit), unit)
    covered: Set[int] = set()
    for unit in units.values():
        covered.update(id(e.param) for e in unit.entries)
        for skip in unit.skipped:
            if skip.reason == EXCLUDED:
                try:
                    excluded = unit.root.get_submodule(skip.name)
                except AttributeError:  # the model's structure changed since
                    continue
                covered.update(id(p) for p in excluded.parameters())
    groups: Dict[type, Dict[str, Any]] = {}
    for name, owner, p in default_weights(module):
        if id(p) in covered:
            continue
        group = groups.setdefault(type(owner), dict(type=type(owner).__name__, count=0, numel=0, frozen=0,
                                                     parameters=[]))
        group["count"] += 1
        group["numel"] += 0 if is_lazy(p) else p.numel()
        group["frozen"] += not p.requires_grad
        group["parameters"].append(name)
    return list(groups.values())


class Sparsity:
    """What :func:`sparsity` returns: ``str()`` is a table, :attr:`records` one dict per parameter,
    :attr:`total` the same keys summed over them.

    Each record has the keys ``parameter`` (qualified name), ``regularizer`` (its repr), ``numel``,
    ``zeros`` (elements exactly 0; for a rule with a ``center=``, elements exactly equal to their
    center), ``zero_fraction``, and for a group regularizer ``groups``,
    ``zero_groups`` and ``zero_group_fraction`` (``None`` otherwise).
    """

    columns = ("parameter", "regularizer", "numel", "zeros", "zero_fraction", "groups", "zero_groups")

    def __init__(self, records: List[Dict[str, Any]]) -> None:
        self.records = records
        numel = sum(r["numel"] for r in records)
        zeros = sum(r["zeros"] for r in records)
        grouped = [r for r in records if r["groups"] is not None]
        groups = sum(r["groups"] for r in grouped) if grouped else None
        zero_groups = sum(r["zero_groups"] for r in grouped) if grouped else None
        self.total: Dict[str, Any] = dict(
            parameter="total", regularizer=None, numel=numel, zeros=zeros,
            zero_fraction=zeros / numel if numel else 0.0, groups=groups, zero_groups=zero_groups,
            zero_group_fraction=(zero_groups / groups if groups else 0.0) if grouped else None,
        )

    def __len__(self) -> int:
        return len(self.records)

    def __str__(self) -> str:
        def cell(record: Dict[str, Any], key: str) -> str:
            value = record[key]
            if value is None:
                return "-"
            if key == "zero_fraction":
                return f"{value:.1%}"
            if key == "zero_groups" and record["groups"]:
                return f"{value} ({record['zero_group_fraction']:.1%})"
            return str(value)

        lines = _table(self.columns, [[cell(r, c) for c in self.columns] for r in self.records + [self.total]])
        lines.insert(len(lines) - 1, lines[1])  # a rule above the total
        return "\n".join(lines)

    __repr__ = __str__


def sparsity(module: nn.Module) -> Sparsity:
    """How sparse the regularized parameters of ``module`` are: exact zeros, and zero groups.

    One record per regularized parameter of ``module`` (also those regularized by a call on an
    enclosing module), in the order of ``module.named_parameters()``, and a total. A group regularizer
    (:class:`torchreg.GroupLasso`) also counts its groups that are exactly zero (a pruned neuron, or
    input feature). Counts are exact: ``w == 0``, no tolerance (proximal regularization makes exact
    zeros; a gradient term leaves weights oscillating near zero). For a rule toward an anchor
    (``center=``) the zeros are of ``w - c``: the weights exactly at their center (a proximal L1 with a
    center leaves most weights exactly at their pretrained values).

    Example::

        >>> import torch, torchreg
        >>> layer = torchreg.GroupLasso(torch.nn.Linear(3, 2, bias=False), lam=0.1, dim=1)
        >>> with torch.no_grad():
        ...     _ = layer.weight.copy_(torch.tensor([[1.0, 0.0, 0.0], [2.0, 0.0, 3.0]]))
        >>> report = torchreg.sparsity(layer)
        >>> {k: report.records[0][k] for k in ("parameter", "zeros", "groups", "zero_groups")}
        {'parameter': 'weight', 'zeros': 3, 'groups': 3, 'zero_groups': 1}
        >>> report.total["zero_fraction"]
        0.5
    """
    check_module(module, "sparsity")
    covered: Dict[int, Any] = {}
    for unit in _engine.units_in(module):
        for entry in unit.entries:
            covered.setdefault(id(entry.param), entry)
    records: List[Dict[str, Any]] = []
    with torch.no_grad():
        for name, p in module.named_parameters():
            entry = covered.get(id(p))
            if entry is None:
                unit = _engine.owner_of(p)  # regularized by a call on an enclosing module
                entry = next((e for e in unit.entries if e.param is p), None) if unit is not None else None
            if entry is None or is_lazy(p):
                continue
            rule = entry.rule
            center = state_kw(entry, p).get("state", {}).get("center")  # a rule toward an anchor (center=)
            zeros = int((p == 0).sum()) if center is None else at_center(p, center)
            record: Dict[str, Any] = dict(parameter=name, regularizer=repr(rule), numel=p.numel(), zeros=zeros,
                                          zero_fraction=zeros / p.numel() if p.numel() else 0.0,
                                          groups=None, zero_groups=None, zero_group_fraction=None)
            norms = getattr(rule, "group_norms", None)
            if norms is not None:
                n = norms(p)
                record["groups"] = n.numel()
                record["zero_groups"] = int((n == 0).sum())
                record["zero_group_fraction"] = record["zero_groups"] / n.numel() if n.numel() else 0.0
            records.append(record)
    return Sparsity(records)
