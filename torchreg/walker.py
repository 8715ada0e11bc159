"""Rules to modules: :func:`apply_regularization` and :func:`remove_regularization`."""

from __future__ import annotations

import fnmatch
import functools
import warnings
from typing import Any, Callable, Dict, List, Mapping, NamedTuple, Optional, Tuple, TypeVar, Union

from torch import nn

from . import _activity_engine, _constraint_unit, _engine, _registry
from ._select import EXCLUDED, select
from ._validate import check_hookable, check_module, describe
from .activity import _ActivityRegularizer
from ._base import NO_MODULE, Rule
from .constraints import Constraint

__all__ = ["apply_regularization", "remove_regularization"]

M = TypeVar("M", bound=nn.Module)
RuleKey = Union[type, Tuple[type, ...], str]
RuleValue = Union[Rule, "functools.partial[Any]", Tuple[Any, ...], List[Any], None]


#: The kinds of rule a module takes one of each: a penalty on its parameters, an activity penalty on its
#: output, a constraint on its parameters.
KINDS = ("penalty", "activity", "constraint")


def rule_kind(rule: Any) -> str:
    """``"penalty"``, ``"activity"`` or ``"constraint"``: which kind of rule ``rule`` is."""
    if isinstance(rule, Constraint):
        return "constraint"
    return "activity" if isinstance(rule, _ActivityRegularizer) else "penalty"


class _Rule:
    __slots__ = ("label", "matches", "rules")

    def __init__(self, label: str, matches: Callable[[str, nn.Module], bool], rules: Optional[Tuple[Rule, ...]]):
        self.label = label
        self.matches = matches
        self.rules = rules  # None: exclude the module; else one rule per kind at most

    def of_kind(self, kind: str) -> Optional[Rule]:
        """This rule's rule of ``kind``, if it has one."""
        return next((r for r in self.rules or () if rule_kind(r) == kind), None)

    def has(self, kind: str) -> bool:
        """Whether this rule speaks for ``kind``: an exclusion (``None``) speaks for every kind."""
        return self.rules is None or self.of_kind(kind) is not None


def _key_label(key: Any) -> str:
    if isinstance(key, type):
        return key.__name__
    if isinstance(key, tuple):
        return "(" + ", ".join(_key_label(k) for k in key) + ")"
    return repr(key)


def _compile_key(key: Any, label: str) -> Callable[[str, nn.Module], bool]:
    if isinstance(key, str):
        return lambda name, module: fnmatch.fnmatchcase(name, key)
    classes = key if isinstance(key, tuple) else (key,)
    if classes and all(isinstance(c, type) and issubclass(c, nn.Module) for c in classes):
        return lambda name, module: isinstance(module, classes)
    hint = ""
    if any(isinstance(c, nn.Module) for c in classes):
        hint = "; got a module instance: use its class or its qualified name"
    raise TypeError(
        f"rule {label}: a key must be an nn.Module subclass, a non-empty tuple of them, or a glob "
        f"pattern over module names such as 'encoder.layers.*.linear1'; got {key!r} "
        f"({type(key).__name__}){hint}"
    )


def _compile_one(value: Any, label: str) -> Rule:
    """A single rule (a torchreg rule or a ``functools.partial`` of a rule class) made a rule object."""
    if isinstance(value, Rule):
        return value
    if isinstance(value, type) and issubclass(value, Rule):
        raise TypeError(
            f"rule {label}: got the class torchreg.{value.__name__}; instantiate it, e.g. "
            f"torchreg.{value.__name__}({', '.join(f'{s}=1e-4' for s in value._positional)})"
        )
    if isinstance(value, functools.partial) and isinstance(value.func, type) and issubclass(value.func, Rule):
        try:
            module = value.func._split_module(value.args, value.keywords)[0]
            if module is not NO_MODULE:  # calling it would regularize that module now: refuse first
                raise TypeError(
                    f"functools.partial(torchreg.{value.func.__name__}, ...) binds {describe(module)}, "
                    "so calling it would regularize that module rather than make a rule; leave the module "
                    f"out: functools.partial(torchreg.{value.func.__name__}, "
                    f"{', '.join(f'{s}=1e-4' for s in value.func._positional)})"
                )
            rule = value()
        except (TypeError, ValueError) as error:
            raise type(error)(f"rule {label}: {error}") from error
        if isinstance(rule, Rule):
            return rule
    raise TypeError(
        f"rule {label}: a value must be a torchreg regularizer such as torchreg.L1(lam=1e-4) or constraint such as "
        f"torchreg.MaxNorm(3.0), "
        f"a functools.partial of one such as functools.partial(torchreg.L1, lam=1e-4), a tuple or list of "
        f"those (one of each kind: penalty, activity, constraint), or None to exclude the module; got "
        f"{value!r} ({type(value).__name__})"
    )


def _compile_value(value: Any, label: str) -> Optional[Tuple[Rule, ...]]:
    """``None`` (exclude), or the rules of a value: one rule, or a tuple or list of rules of different
    kinds (``(torchreg.L2(1e-4), torchreg.MaxNorm(3.0))``)."""
    if value is None:
        return None
    values = list(value) if isinstance(value, (tuple, list)) else [value]
    if not values:
        raise ValueError(f"rule {label}: an empty {type(value).__name__} of rules; give at least one rule, or "
                         "None to exclude the module")
    rules: List[Rule] = []
    for item in values:
        if item is None:
            raise TypeError(f"rule {label}: None inside a {type(value).__name__} of rules; None excludes a "
                            "module on its own (the rule's whole value)")
        rule = _compile_one(item, label)
        clash = next((r for r in rules if rule_kind(r) == rule_kind(rule)), None)
        if clash is not None:
            raise ValueError(
                f"rule {label}: {clash!r} and {rule!r} are both {rule_kind(rule)} rules; a module takes one "
                f"rule of each kind (penalty, activity, constraint): combine them into one (e.g. ElasticNet "
                "for L1 and L2) or match the modules with two rules"
            )
        rules.append(rule)
    return tuple(rules)


def _compile_rules(rules: Any) -> List[_Rule]:
    if not isinstance(rules, Mapping):
        raise TypeError(
            "rules must be a mapping (e.g. a dict) from module class or name pattern to regularizer; "
            f"got {type(rules).__name__}"
        )
    compiled = []
    for index, (key, value) in enumerate(rules.items(), start=1):
        label = f"#{index} {_key_label(key)}"
        compiled.append(_Rule(label, _compile_key(key, label), _compile_value(value, label)))
    return compiled


def apply_regularization(model: M, rules: Mapping[RuleKey, RuleValue], *, strict: bool = False) -> M:
    """Regularize the submodules of ``model`` that ``rules`` match; in place, returns ``model``.

    ``model`` is walked recursively (``model.named_modules()``, containers included, each module once)
    and each module is given to the *first* rule that matches it:

    * a key that is a module class, or a tuple of classes, matches instances of it and of its
      subclasses (``isinstance``);
    * a string key is a glob pattern (``fnmatch``; ``*`` also crosses dots) over the module's
      qualified name, as ``named_modules()`` gives it: ``"encoder.layers.*.linear1"``; the root is ``""``.

    A matched module is regularized for the parameters it owns directly, with the rule's selection
    (by default its weights: no biases, nothing of a normalization layer). The value of a rule is a
    regularizer (``torchreg.L1(lam=1e-4)``), a weight constraint (``torchreg.MaxNorm(3.0)``), a
    ``functools.partial`` of one (``functools.partial(torchreg.L1, lam=1e-4)``), a tuple or list of
    those with one rule of each kind (a penalty, an activity penalty, a constraint:
    ``(torchreg.L2(1e-4), torchreg.MaxNorm(3.0))``), or ``None``, which leaves the module *and its
    submodules* alone whatever later rules say. Each kind is matched on its own: a module gets the
    first matching rule that has a rule of that kind, a ``None`` rule counting for every kind (a
    constraint or activity rule matched *before* the ``None`` still applies to the module itself). A
    matched module with nothing selected (an activation, a norm layer caught by a pattern) is skipped and listed as such by :func:`torchreg.summary`; a
    rule that matches no module, or selects no parameter in the modules it matches (or only parameters
    tied to ones a module walked earlier owns), warns. :func:`torchreg.summary` lists the weights no
    rule covers, by module type.

    A parameter shared by several modules (GPT-2's ``lm_head.weight`` *is* ``transformer.wte.weight``)
    is regularized once, under the rule of the first module walked that owns it and whose rule selects
    it or excludes it: a ``None`` rule is a rule, so excluding the embedding keeps its weight
    unregularized through the tied head too. A module no rule matched makes no claim. When the rules of
    the modules sharing a parameter disagree, a warning names the modules and the rule that won
    (``strict=True`` raises); :func:`torchreg.summary` shows the tie on each of their rows.

    The whole model is one unit: whenever a backward reaches any regularized parameter, every
    regularized parameter gets its gradient term once, exactly as ``loss + torchreg.penalty(model)``
    would give, including branches this forward skipped. Parameters of lazy modules are covered once
    they exist.

    Args:
        model: the model to regularize.
        rules: an ordered mapping from rule key to rule value, as above.
        strict: raise instead of warning when a rule matches no module or selects no parameter, or
            when the rules of modules sharing a parameter disagree.

    Returns:
        ``model``, with its parameters, ``state_dict`` and forward unchanged.

    Raises:
        TypeError: ``model`` is not a module instance, or a rule key or value has the wrong type.
        ValueError: ``model`` is regularized already (applying twice would double the penalty), a
            selected parameter is regularized (or constrained) by another call, a tuple of rules holds
            two of one kind, or (``strict=True``) a rule matches no module or selects no parameter
            (none but tied ones claimed already), or modules sharing a parameter have rules that
            disagree. Nothing is changed when it raises.

    Example::

        >>> import functools, torch, torchreg
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
        ...                       nn.LazyLinear(10))
        >>> torchreg.apply_regularization(model, {
        ...     "1": None,                                        # nothing for this one
        ...     nn.Conv2d: torchreg.L2(lam=5e-4),
        ...     nn.Linear: functools.partial(torchreg.L1, lam=1e-5),
        ... }) is model
        True
        >>> _ = model(torch.randn(2, 3, 8, 8))                   # the lazy layer gets its weight
        >>> [r["module"] for r in torchreg.summary(model).records if r["regularizer"]]
        ['0', '4']
        >>> mlp = torchreg.apply_regularization(                 # a penalty and a constraint
        ...     nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1)),
        ...     {nn.Linear: (torchreg.L2(1e-4), torchreg.MaxNorm(3.0))})
        >>> for record in torchreg.summary(mlp).records:
        ...     print(record["module"], record["regularizer"])
        0 L2(lam=0.0001)
        0 MaxNorm(max_value=3.0, dim=0)
        2 L2(lam=0.0001)
        2 MaxNorm(max_value=3.0, dim=0)
    """
    check_hookable(model, "apply_regularization")
    compiled = _compile_rules(rules)
    entries, skipped, activity, hits, selected, tied, constraints, conflicts = _plan(model, compiled)
    problems = [f"rule {r.label} matched no module" for r, n in zip(compiled, hits) if n == 0] + [
        f"rule {r.label} matched {n} module(s) but selected no parameter of them"
        if not shared else
        f"rule {r.label} matched {n} module(s) but every parameter it selected is tied to one that a module "
        f"walked earlier regularizes or excludes ({', '.join(shared[:3])}{', ...' if len(shared) > 3 else ''}), "
        "so it regularizes nothing"
        for r, n, k, shared in zip(compiled, hits, selected, tied)
        if n and not k and r.rules is not None
    ] + conflicts
    if problems:
        message = f"apply_regularization on {type(model).__name__}: " + "; ".join(problems)
        if strict:
            raise ValueError(message)
        warnings.warn(message, UserWarning, stacklevel=2)
    for entry in entries:
        entry.rule._check_fits([(entry.name, entry.param)])
    if activity:
        _activity_engine.check_free(model, activity)  # raise before the weight unit is attached
    if constraints:
        _constraint_unit.check(model, constraints)
    # The skipped modules are listed by the summary from the penalty unit, or from the constraint unit
    # when there is no penalty to attach.
    penalty_skipped = skipped if entries or not constraints else []
    attached: List[Any] = []
    try:
        if entries or penalty_skipped:
            _engine.attach(model, entries, penalty_skipped)
            attached.append(model.__dict__[_engine.ATTR])
        if activity:
            _activity_engine.attach(model, activity)
            attached.append(model.__dict__[_activity_engine.ATTR])
        if constraints:
            _constraint_unit.attach(model, constraints, [] if penalty_skipped else skipped)
    except BaseException:
        for unit in attached:  # (checked above: only an unforeseen error gets here)
            unit.uninstall()
        raise
    for rule in compiled:
        for one in rule.rules or ():
            if rule_kind(one) != "constraint":
                one._applied_to([e.param for e in entries if e.rule is one])
    return model


class _Plan(NamedTuple):
    """What :func:`apply_regularization` would do with its rules, before anything is changed."""

    entries: List[_engine.Entry]  # covered parameters, in walk order, a tied one once
    skipped: List[_engine.Skipped]
    activity: List[_activity_engine.ActivityEntry]
    hits: List[int]  # modules each rule matched
    selected: List[int]  # parameters (activity: modules) newly covered by each rule
    tied: List[List[str]]  # per rule: selected, but claimed already under another module
    constraints: List[_engine.Entry]  # constrained parameters, in walk order, a tied one once
    conflicts: List[str]  # tied parameters whose modules' rules disagree, one sentence each


class _Claim(NamedTuple):
    """The first module walked that owns a parameter and whose rule of one kind selects it, or excludes it."""

    name: str  # the parameter's qualified name under that module
    module: str  # that module's path
    rule: _Rule  # the matching rule
    one: Optional[Rule]  # its rule of the kind claimed; None: excluded


def _plan(model: nn.Module, compiled: List[_Rule]) -> _Plan:
    """Walk ``model`` with the compiled rules: the first matching rule of each kind (penalty, activity,
    constraint) wins, ``None`` excludes a module with its submodules, a matched module contributes what
    its rule selects among the parameters it owns directly. A tied parameter follows its first claim of
    each kind: the first module walked whose rule selects it, or excludes it (with the module that owns
    it)."""
    hits = [0] * len(compiled)
    selected = [0] * len(compiled)  # parameters newly covered by each rule
    tied: List[List[str]] = [[] for _ in compiled]  # selected, but claimed already under another module
    conflicts: List[str] = []
    found: Dict[str, List[_engine.Entry]] = {"penalty": [], "constraint": []}
    claims: Dict[str, Dict[int, _Claim]] = {"penalty": {}, "constraint": {}}
    skipped: List[_engine.Skipped] = []
    excluded: List[str] = []
    activity: List[_activity_engine.ActivityEntry] = []  # activity rules: a stream of their own

    def claim(kind: str, p: nn.Parameter, name: str, path: str, rule: _Rule, one: Optional[Rule]) -> Optional[_Claim]:
        """Claim ``p`` for ``one`` (of ``kind``); the earlier claim if there is one (and a conflict if they
        disagree)."""
        mine = _Claim(name, path, rule, one)
        first = claims[kind].setdefault(id(p), mine)
        if first is mine:
            return None
        if _disagree(first.one, one):
            conflicts.append(_conflict(kind, first, mine))
        return first

    for path, module in model.named_modules():
        if any(_inside(path, prefix) for prefix in excluded):
            continue
        # Each kind is matched independently: the module gets the first matching rule of each kind
        # (penalty, activity, constraint); a None rule counts for every kind.
        matched = [i for i, rule in enumerate(compiled) if rule.matches(path, module)]
        first = {kind: next((i for i in matched if compiled[i].has(kind)), None) for kind in KINDS}
        for i in sorted({i for i in first.values() if i is not None}):
            hits[i] += 1
        kind_name = type(module).__name__
        # A None rule first among the penalty rules excludes the module's parameters and its submodules
        # (the kinds matched by an earlier rule, activity or constraint, still apply to the module).
        exclusion = first["penalty"]
        if exclusion is not None and compiled[exclusion].rules is not None:
            exclusion = None
        act = first["activity"]
        if act is not None and compiled[act].rules is not None:
            selected[act] += 1
            activity.append(_activity_engine.ActivityEntry(path, module, compiled[act].of_kind("activity"),
                                                           f"rule {compiled[act].label}"))
        if exclusion is not None:  # claims every parameter inside, for the module that owns it
            excluder = compiled[exclusion]
            excluded.append(path)
            skipped.append(_engine.Skipped(path, kind_name, f"rule {excluder.label}", EXCLUDED))
            for leaf, p in module.named_parameters():
                name = _join(path, leaf)
                for kind in ("penalty", "constraint"):
                    claim(kind, p, name, name.rpartition(".")[0], excluder, None)
        empty: Dict[int, bool] = {}  # rule index -> every kind of it selected nothing here
        for kind in ("penalty", "constraint"):
            index = first[kind]
            if index is None or compiled[index].rules is None:
                continue
            rule = compiled[index]
            one = rule.of_kind(kind)
            chosen = select(module, one.params, recurse=False)
            empty[index] = empty.get(index, True) and not chosen
            for leaf, p in chosen:
                name = _join(path, leaf)
                prior = claim(kind, p, name, path, rule, one)
                if prior is not None:
                    verb = "regularized" if kind == "penalty" else "constrained"
                    there = "excluded there" if prior.one is None else f"{verb} once, there"
                    skipped.append(_engine.Skipped(path, kind_name, f"rule {rule.label}",
                                                   f"{leaf} tied to {prior.name}, {there}"))
                    tied[index].append(f"{name} is {prior.name}")
                    continue
                selected[index] += 1
                found[kind].append(_engine.Entry(name, p, one, f"rule {rule.label}"))
        for index, nothing in empty.items():
            if nothing and (module._parameters or not module._modules):  # containers are walked into
                skipped.append(_engine.Skipped(path, kind_name, f"rule {compiled[index].label}",
                                               "selects no parameter here"))
    return _Plan(found["penalty"], skipped, activity, hits, selected, tied, found["constraint"], conflicts)


def _join(path: str, leaf: str) -> str:
    return f"{path}.{leaf}" if path else leaf


def _disagree(a: Optional[Rule], b: Optional[Rule]) -> bool:
    """Two rules that would treat a parameter differently (equal reprs count as the same rule)."""
    if a is None or b is None:
        return a is not b
    return a is not b and repr(a) != repr(b)


def _conflict(kind: str, first: _Claim, later: _Claim) -> str:
    def says(c: _Claim) -> str:
        return f"rule {c.rule.label}: " + ("None, excluded" if c.one is None else repr(c.one))

    verb = "regularized" if kind == "penalty" else "constrained"
    outcome = f"not {verb}" if first.one is None else f"{verb} by {first.one!r}"
    alias = f" (as {later.name})" if later.name != first.name else ""
    return (f"{first.name} is shared by modules whose rules disagree: {first.module or '(root)'} ({says(first)}) "
            f"and {later.module or '(root)'}{alias} ({says(later)}); a tied parameter follows the first module "
            f"walked that owns it, so it is {outcome} (give {first.module or 'the root'} the rule you want for it)")


def _inside(path: str, prefix: str) -> bool:
    return prefix == "" or path == prefix or path.startswith(prefix + ".")


def remove_regularization(module: M) -> M:
    """Take every torchreg regularization off ``module`` and its submodules; returns ``module``.

    Removes what :func:`apply_regularization` and the wrappers (``L1(layer, ...)``) applied to
    ``module`` or to any module inside it: every hook and the attribute torchreg set. Parameters,
    ``state_dict``, forward and gradients are then those of a module that never had torchreg.

    Activity regularization (``ActivityL1``, ``ActivityL2``) is removed too: outputs computed before
    the removal add no term at their backward either.

    Raises:
        TypeError: ``module`` is not a module instance.
        ValueError: nothing in ``module`` is regularized by torchreg.

    Example::

        >>> import torch, torchreg
        >>> layer = torchreg.L1(torch.nn.Linear(2, 2), 0.1)
        >>> torchreg.remove_regularization(layer) is layer
        True
        >>> torchreg.penalty(layer)
        tensor(0.)
    """
    check_module(module, "remove_regularization")
    units: List[Any] = list(_registry.units_in(module))
    if not units:
        enclosing = _registry.enclosing_unit(module)
        where = (f"; its parameters are regularized by a call on an enclosing {type(enclosing.root).__name__}:"
                 " remove it there" if enclosing is not None else "")
        raise ValueError(f"no torchreg regularization found on {type(module).__name__} or its submodules{where}")
    for unit in units:
        unit.uninstall()
    return module
