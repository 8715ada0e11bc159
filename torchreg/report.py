"""Reading regularization state, never changing it: :func:`penalty` and :func:`summary`."""

from __future__ import annotations

from typing import Any, Dict, List

import torch
from torch import Tensor, nn

from . import _activity_engine, _engine
from ._validate import check_module

__all__ = ["penalty", "summary", "Summary"]


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


class Summary:
    """What :func:`summary` returns: ``str()`` is a table, :attr:`records` the same as dicts.

    Each record has the keys ``module`` (qualified path), ``type``, ``rule`` (which rule matched,
    in rule order), ``regularizer`` (its repr, or ``None`` for a skipped module), ``parameters`` (the
    covered names), ``numel``, ``penalty`` (a float) and ``note`` (why a module was skipped).
    """

    columns = ("module", "type", "rule", "regularizer", "parameters", "numel", "penalty", "note")

    def __init__(self, records: List[Dict[str, Any]]) -> None:
        self.records = records

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

        rows = [[c for c in self.columns]] + [[cell(r, c) for c in self.columns] for r in self.records]
        widths = [max(len(row[i]) for row in rows) for i in range(len(self.columns))]
        lines = ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        total = sum(r["penalty"] for r in self.records if r["penalty"] is not None)
        numel = sum(r["numel"] for r in self.records)
        lines.append(f"total: {numel} regularized elements, penalty {total:.4g}")
        return "\n".join(lines)

    __repr__ = __str__


def summary(module: nn.Module) -> Summary:
    """A table of what is regularized in ``module``, one row per regularized or skipped module.

    Rows come in the order the model's modules were walked; ``rule`` says which rule matched first.

    Example::

        >>> import torch, torchreg
        >>> from torch import nn
        >>> net = torchreg.apply_regularization(
        ...     nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)), {nn.Module: torchreg.L2(1e-3)})
        >>> [(r["module"], r["parameters"], r["note"]) for r in torchreg.summary(net).records]
        [('0', ['weight'], ''), ('1', [], 'selects no parameter here')]
    """
    check_module(module, "summary")
    prefixes = {id(m): name for name, m in module.named_modules()}
    records: List[Dict[str, Any]] = []
    for unit in _engine.units_in(module):
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
                if not _engine._is_lazy(entry.param):
                    r["numel"] += entry.param.numel()
                    r["penalty"] = (r["penalty"] or 0.0) + float(entry.rule.penalty(entry.param))
        for skip in unit.skipped:
            row(skip.name, skip.module_type, skip.origin, None)["note"] = skip.reason
        order = {name: i for i, (name, _) in enumerate(unit.root.named_modules())}
        records.extend(sorted(rows.values(), key=lambda r: order.get(r.pop("_path"), -1)))
    records.extend(_activity_engine.summary_records(module))  # activity rows, penalty None (i13)
    return Summary(records)
