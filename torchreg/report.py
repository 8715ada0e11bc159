"""Reading regularization state, never changing it: :func:`penalty` and :func:`summary`."""

from __future__ import annotations

from typing import Any, Dict, Iterable, List, Sequence, Set, Tuple

import torch
from torch import Tensor, nn

from . import _activity_engine, _constraint_unit, _engine, _registry
from ._anchor import at_center
from ._tracking import is_lazy, state_kw
from ._select import EXCLUDED, default_weights
from ._validate import check_module
from .regularizers import L1, ElasticNet

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
    covered names), ``numel``, ``penalty`` (a float), ``note`` (why a module was skipped; which of its
    parameters are tied to others, or frozen) and ``tied`` (``{parameter: [the other qualified names of the same
    tensor]}`` for the parameters of the row that are shared, e.g. ``{'weight':
    ['transformer.wte.weight']}`` on GPT-2's ``lm_head`` row; ``{}`` when none is). A weight
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

    Rows come in the order of ``module.named_modules()`` (a module's weight row before its activity row);
    ``rule`` says which rule matched first.
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
                elif not entry.param.requires_grad:  # covered, but no hook until it is trained
                    frozen = f"{leaf} frozen (requires_grad=False): no gradient term until it is trained"
                    r["note"] = f"{r['note']}; {frozen}" if r["note"] else frozen
                if not is_lazy(entry.param):
                    r["numel"] += entry.param.numel()
                    if not constraint:
                        r["penalty"] = (r["penalty"] or 0.0) + float(unit.entry_penalty(entry))
        for skip in unit.skipped:
            row(skip.name, skip.module_type, skip.origin, None)["note"] = skip.reason
        _note_ties(unit.root, base, rows.values())
        order = {name: i for i, (name, _) in enumerate(unit.root.named_modules())}
        records.extend(sorted(rows.values(), key=lambda r: order.get(r.pop("_path"), -1)))
    for record in _activity_engine.summary_records(module):  # activity rows, penalty None
        records.append(dict(record, tied={}))
    position = {name: i for i, name in enumerate(prefixes.values())}
    records.sort(key=lambda r: position.get(r["module"], len(position)))  # module order, whatever the kind
    return Summary(records, _uncovered(module))


def _note_ties(root: nn.Module, base: str, rows: Iterable[Dict[str, Any]]) -> None:
    """Fill each row's ``tied`` and add "weight tied to lm_head.weight" to its note, for the parameters
    the row is about (those it covers; every parameter inside an excluded module) that other names share."""
    names: Dict[int, List[str]] = {}
    for name, p in root.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(".".join(n for n in (base, name) if n))
    for r in rows:
        r["tied"] = {}
        if not any(len(v) > 1 for v in names.values()):
            continue
        try:
            owner = root.get_submodule(r["_path"])
        except AttributeError:  # the model's structure changed since
            continue
        if r["note"] == EXCLUDED:
            about = list(owner.named_parameters())
        else:
            about = [(leaf, owner._parameters[leaf]) for leaf in r["parameters"] if leaf in owner._parameters]
            leaf, _, _ = r["note"].partition(" tied to ")
            if leaf in owner._parameters and " tied to " in r["note"]:  # a tied parameter skipped here
                about.append((leaf, owner._parameters[leaf]))
        for leaf, p in about:
            full = ".".join(n for n in (r["module"], leaf) if n)
            others = [n for n in names.get(id(p), ()) if n != full]
            if others:
                r["tied"][leaf] = others
                if f"{leaf} tied to " not in r["note"]:
                    tie = f"{leaf} tied to {', '.join(others)}"
                    r["note"] = f"{r['note']}; {tie}" if r["note"] else tie


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
    center, and likewise for the slices below), ``zero_fraction``; for a group regularizer ``groups``,
    ``zero_groups``, ``zero_group_fraction`` and ``zero_group_indices`` (the indices along its ``dim``
    of the groups that are exactly zero); and for a parameter with at least 2 dimensions
    ``zero_outputs`` and ``zero_inputs``: the indices along dim 0 and dim 1 whose whole slice
    (``w[i]``, ``w[:, j]``) is exactly zero. For an ``nn.Linear`` or ``nn.Conv*d`` weight these are the
    output units no input reaches and the input features (channels) the layer no longer reads;
    transformers' ``Conv1D`` stores its weight transposed, ``(in, out)``, so there dim 0 is its inputs.
    Keys that do not apply are ``None``; in :attr:`total` the index lists are ``None``.

    ``notes``: one line per gradient-mode ``L1`` / ``ElasticNet`` parameter without a single exact
    zero (a gradient term makes weights oscillate around zero, never land on it: exact zeros need
    ``proximal=True``); ``str()`` prints them under the table.
    """

    columns = ("parameter", "regularizer", "numel", "zeros", "zero_fraction", "groups", "zero_groups",
               "zero_outputs", "zero_inputs")

    def __init__(self, records: List[Dict[str, Any]], notes: Sequence[str] = ()) -> None:
        self.records = records
        self.notes = list(notes)
        numel = sum(r["numel"] for r in records)
        zeros = sum(r["zeros"] for r in records)
        grouped = [r for r in records if r["groups"] is not None]
        groups = sum(r["groups"] for r in grouped) if grouped else None
        zero_groups = sum(r["zero_groups"] for r in grouped) if grouped else None
        self.total: Dict[str, Any] = dict(
            parameter="total", regularizer=None, numel=numel, zeros=zeros,
            zero_fraction=zeros / numel if numel else 0.0, groups=groups, zero_groups=zero_groups,
            zero_group_fraction=(zero_groups / groups if groups else 0.0) if grouped else None,
            zero_group_indices=None, zero_outputs=None, zero_inputs=None,
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
            if key in ("zero_outputs", "zero_inputs"):
                return str(len(value))
            return str(value)

        lines = _table(self.columns, [[cell(r, c) for c in self.columns] for r in self.records + [self.total]])
        lines.insert(len(lines) - 1, lines[1])  # a rule above the total
        return "\n".join(lines + self.notes)

    __repr__ = __str__


def _zero_slices(p: Tensor, dim: int) -> List[int]:
    """The indices along ``dim`` whose slice of ``p`` is exactly zero."""
    nonzero = (p != 0).movedim(dim, 0).reshape(p.shape[dim], -1).any(1)
    return (~nonzero).nonzero().flatten().tolist()


def sparsity(module: nn.Module) -> Sparsity:
    """How sparse the regularized parameters of ``module`` are: exact zeros, zero groups, and which
    output units and input features are entirely zero.

    One record per regularized parameter of ``module`` (also those regularized by a call on an
    enclosing module), in the order of ``module.named_parameters()``, and a total. A group regularizer
    (:class:`torchreg.GroupLasso`) also counts its groups that are exactly zero (a pruned neuron, or
    input feature) and lists their indices. For a parameter with at least 2 dimensions the record lists
    the indices along dim 0 (``zero_outputs``) and dim 1 (``zero_inputs``) whose slice is all zero: on a
    first ``nn.Linear`` layer, ``zero_inputs`` are the input features the model no longer reads. The
    table shows their counts. Counts are exact: ``w == 0``, no tolerance (proximal regularization makes
    exact zeros; a gradient term leaves weights oscillating near zero, and the table says so when a
    gradient-mode ``L1`` or ``ElasticNet`` parameter has no exact zero).

    It reads every regularized parameter (a few host synchronizations each): call it to
    inspect or log, not every step. For a rule toward an anchor (``center=``) the zeros are of
    ``w - c``: the weights exactly at their center (a proximal L1 with a center leaves most weights
    exactly at their pretrained values).

    Example::

        >>> import torch, torchreg
        >>> layer = torchreg.GroupLasso(torch.nn.Linear(3, 2, bias=False), lam=0.1, dim=1)
        >>> with torch.no_grad():
        ...     _ = layer.weight.copy_(torch.tensor([[1.0, 0.0, 0.0], [2.0, 0.0, 3.0]]))
        >>> report = torchreg.sparsity(layer)
        >>> {k: report.records[0][k] for k in ("parameter", "zeros", "groups", "zero_groups")}
        {'parameter': 'weight', 'zeros': 3, 'groups': 3, 'zero_groups': 1}
        >>> report.records[0]["zero_inputs"], report.records[0]["zero_group_indices"]
        ([1], [1])
        >>> report.total["zero_fraction"]
        0.5
    """
    check_module(module, "sparsity")
    records: List[Dict[str, Any]] = []
    notes: List[str] = []
    with torch.no_grad():
        for name, _, entry in covered_parameters(module):
            p, rule = entry.param, entry.rule
            if is_lazy(p):
                continue
            center = state_kw(entry, p).get("state", {}).get("center")  # a rule toward an anchor (center=)
            zeros = int((p == 0).sum()) if center is None else at_center(p, center)
            record: Dict[str, Any] = dict(parameter=name, regularizer=repr(rule), numel=p.numel(), zeros=zeros,
                                          zero_fraction=zeros / p.numel() if p.numel() else 0.0,
                                          groups=None, zero_groups=None, zero_group_fraction=None,
                                          zero_group_indices=None, zero_outputs=None, zero_inputs=None)
            norms = getattr(rule, "group_norms", None)
            if norms is not None:
                n = norms(p)
                record["groups"] = n.numel()
                record["zero_group_indices"] = (n == 0).nonzero().flatten().tolist()
                record["zero_groups"] = len(record["zero_group_indices"])
                record["zero_group_fraction"] = record["zero_groups"] / n.numel() if n.numel() else 0.0
            if p.ndim >= 2:
                offset = p if center is None else p - center  # (toward an anchor: slices at their center)
                record["zero_outputs"] = _zero_slices(offset, 0)
                record["zero_inputs"] = _zero_slices(offset, 1)
            if not zeros and p.numel() and _gradient_l1(rule):
                notes.append(f"note: {name} has no exact zero: {rule!r} adds a gradient term, around which weights "
                             f"oscillate; exact zeros need proximal=True ({type(rule).__name__}(..., proximal=True))")
            records.append(record)
    return Sparsity(records, notes)


def covered_parameters(module: nn.Module) -> List[Tuple[str, Any, Any]]:
    """``(name, unit, entry)`` of every regularized parameter of ``module`` (also those regularized by a
    call on an enclosing module), in the order of ``module.named_parameters()``."""
    covered: Dict[int, Tuple[Any, Any]] = {}
    for unit in _engine.units_in(module):
        for entry in unit.entries:
            covered.setdefault(id(entry.param), (unit, entry))
    found = []
    for name, p in module.named_parameters():
        hit = covered.get(id(p))
        if hit is None:
            unit = _engine.owner_of(p)  # regularized by a call on an enclosing module
            entry = next((e for e in unit.entries if e.param is p), None) if unit is not None else None
            hit = (unit, entry) if entry is not None else None
        if hit is not None:
            found.append((name, *hit))
    return found


def _gradient_l1(rule: Any) -> bool:
    """An L1 or ElasticNet rule with an L1 strength > 0, in gradient mode."""
    strength = rule.lam if isinstance(rule, L1) else rule.l1 if isinstance(rule, ElasticNet) else 0.0
    return bool(strength) and not rule.proximal
