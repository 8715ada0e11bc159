"""Rules as plain data: :func:`rules_from_config` and :func:`rules_to_config`.

The rules :func:`torchreg.apply_regularization` takes, written with lists, dicts, strings, numbers
and ``None`` only, so that they can live in a JSON or YAML file or in an experiment tracker's config.
The schema is a list of rules, in order (the first matching rule wins, as in the Python form)::

    [
      {"match": {"name": "encoder.embed"}, "regularizer": null},
      {"match": {"type": "Linear"}, "regularizer": {"type": "L2", "lam": 0.0001}},
      {"match": {"type": ["Conv1d", "Conv2d"]},
       "regularizer": {"type": "L1", "lam": 1e-05, "params": ["weight", "bias"]}},
      {"match": {"type": "Conv3d"}, "regularizer": {"type": "Orthogonal", "lam": 0.01, "mode": "rows"}}
    ]

* ``match`` has exactly one key. ``{"type": "Linear"}`` is the Python key ``nn.Linear`` (instances
  of the class and its subclasses); ``{"type": ["Conv1d", "Conv2d"]}`` is the tuple key
  ``(nn.Conv1d, nn.Conv2d)``; ``{"name": "encoder.*"}`` is the glob key ``"encoder.*"`` over qualified
  module names. A type name is a class of ``torch.nn`` (``"Linear"``, ``"Module"``) or a class passed
  in ``types=``; nothing is ever imported from a dotted path.
* ``regularizer`` is ``null`` (exclude the module and its submodules) or a mapping with ``type``, the
  name of a torchreg rule (``"L1"``, ``"L2"``, ``"ElasticNet"``, ``"GroupLasso"``,
  ``"Orthogonal"``, ``"ActivityL1"``, ``"ActivityL2"``, and the constraints ``"MaxNorm"``,
  ``"MinMaxNorm"``, ``"UnitNorm"``, ``"NonNeg"``), and that class's constructor arguments by
  name: its strengths (``lam``; ``l1`` and ``l2``) and options (``params``: a glob pattern or a list
  of them; ``proximal`` for ``L1``, ``ElasticNet`` and ``GroupLasso``; ``dim`` for ``GroupLasso`` and
  the norm constraints; ``mode`` for ``Orthogonal``; ``max_value``, ``min_value``, ``rate`` for the
  norm constraints); or a list of such mappings, one of each kind (penalty, activity, constraint),
  the Python form's tuple: ``[{"type": "L2", "lam": 0.0001}, {"type": "MaxNorm", "max_value": 3.0}]``.

Every unknown key, unknown name or bad value raises ``TypeError`` (wrong type) or ``ValueError`` (bad
value) with its path in the data first: ``rules[2].regularizer.lam: ...``. Nothing is evaluated,
unpickled or imported.
"""

from __future__ import annotations

import difflib
import functools
import inspect
import numbers
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple, Union

from torch import nn

from . import activity as _activity, regularizers as _regularizers  # noqa: F401 (they register their classes)
from ._registry import RULES as _REGULARIZERS  # (see below)
from . import constraints as _constraints  # noqa: F401 (it registers its classes)
from .walker import RuleKey, RuleValue, _compile_value, _key_label, rule_kind

__all__ = ["rules_from_config", "rules_to_config"]

# The rules a config can name (_REGULARIZERS): every public torchreg rule class, by class name, as each
# registers itself (torchreg._registry.RULES). Each is built as ``cls(**options)`` and written back from
# ``rule._kwargs()`` (its constructor arguments), so a new class needs nothing here.

_RULE_KEYS = ("match", "regularizer")
_MATCH_KEYS = ("type", "name")

Types = Union[None, Mapping[str, type], Iterable[type]]


# -- module types by name ------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _torch_nn_types() -> Dict[str, type]:
    return {
        name: obj for name, obj in vars(nn).items()
        if isinstance(obj, type) and issubclass(obj, nn.Module) and not name.startswith("_")
    }


def _type_table(types: Types) -> Tuple[Dict[str, type], Dict[type, str]]:
    """``(name -> class, class -> name)`` for ``torch.nn`` and the user's ``types``."""
    if types is None:
        extra: Dict[str, type] = {}
    elif isinstance(types, Mapping):
        extra = dict(types)
    elif isinstance(types, (str, bytes)) or not isinstance(types, Iterable):
        raise TypeError(f"types must be a mapping from name to nn.Module subclass or a list of such classes, "
                        f"got {types!r} ({type(types).__name__})")
    else:
        extra = {}
        for cls in types:
            if not isinstance(cls, type):
                raise TypeError(f"types: expected nn.Module subclasses, got {cls!r} ({type(cls).__name__})")
            if extra.get(cls.__name__, cls) is not cls:
                raise ValueError(f"types: two classes are named {cls.__name__!r} ({extra[cls.__name__]!r} and "
                                 f"{cls!r}); pass a mapping {{name: class}} with distinct names")
            extra[cls.__name__] = cls
    builtin = _torch_nn_types()
    for name, cls in extra.items():
        if not isinstance(name, str) or not name:
            raise TypeError(f"types: a name must be a non-empty string, got {name!r} ({type(name).__name__})")
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise TypeError(f"types[{name!r}]: expected an nn.Module subclass, got {cls!r} ({type(cls).__name__})")
        if builtin.get(name, cls) is not cls:
            raise ValueError(f"types[{name!r}]: {cls!r} would shadow torch.nn.{name}; register it under "
                             "another name, e.g. types={'My" + name + "': ...}")
    by_name = {**builtin, **extra}
    by_class: Dict[type, str] = {}
    for name, cls in by_name.items():
        if name == cls.__name__ or cls not in by_class:  # the class's own name over an alias
            by_class[cls] = name
    for name, cls in extra.items():  # the user's name for a class wins
        by_class[cls] = name
    return by_name, by_class


def _resolve_type(value: Any, path: str, by_name: Dict[str, type]) -> type:
    if not isinstance(value, str):
        raise TypeError(f"{path}: a module type is named by a string such as 'Linear', "
                        f"got {value!r} ({type(value).__name__})")
    cls = by_name.get(value)
    if cls is not None:
        return cls
    if "." in value:
        hint = (f"; types are named without a module path ('{value.rsplit('.', 1)[-1]}'), and classes "
                "outside torch.nn are never imported: pass the class in types=")
    else:
        close = difflib.get_close_matches(value, list(by_name), n=3)
        hint = (f"; did you mean {' or '.join(map(repr, close))}?" if close else "") + \
            " (classes outside torch.nn must be passed in types=)"
    raise ValueError(f"{path}: unknown module type {value!r}: not a torch.nn class nor one given in types={hint}")


# -- plain data checks ---------------------------------------------------------------------------
def _check_plain(value: Any, path: str) -> None:
    """Raise TypeError unless ``value`` is plain data (None, bool, number, str, list, dict of those)."""
    if value is None or isinstance(value, (str, bool, numbers.Real)):
        return
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_plain(item, f"{path}[{i}]")
        return
    if isinstance(value, Mapping):
        for key, item in value.items():
            _check_plain(item, f"{path}.{key}")
        return
    raise TypeError(f"{path}: expected plain data (null, a bool, a number, a string, a list or a mapping), "
                    f"got {value!r} ({type(value).__name__})")


def _check_keys(mapping: Mapping[Any, Any], allowed: Iterable[str], path: str, what: str) -> None:
    allowed = list(allowed)
    for key in mapping:
        if key not in allowed:
            name = f"{path}.{key}" if isinstance(key, str) else f"{path}[{key!r}]"
            raise ValueError(f"{name}: unknown key {key!r} in {what}; allowed: {', '.join(map(repr, allowed))}")


def _numeric_string_hint(value: Any) -> str:
    if isinstance(value, str):
        try:
            float(value)
        except ValueError:
            return ""
        return (" (a number written as a string: write it without quotes; YAML 1.1 reads 1e-4 as a string, "
                "write 1.0e-4)")
    return ""


# -- data -> rules -------------------------------------------------------------------------------
def _match_from(data: Any, path: str, by_name: Dict[str, type]) -> RuleKey:
    if not isinstance(data, Mapping):
        raise TypeError(f"{path}: expected a mapping with one key, 'type' (module class names) or 'name' "
                        f"(a glob over module names), got {data!r} ({type(data).__name__})")
    _check_keys(data, _MATCH_KEYS, path, "a match")
    if len(data) != 1:
        raise ValueError(f"{path}: a match has exactly one key, 'type' or 'name', got "
                         f"{sorted(data) if data else 'none'}")
    if "name" in data:
        pattern = data["name"]
        if not isinstance(pattern, str):
            raise TypeError(f"{path}.name: expected a glob pattern over qualified module names (a string) "
                            f"such as 'encoder.*', got {pattern!r} ({type(pattern).__name__})")
        return pattern
    value = data["type"]
    if isinstance(value, (list, tuple)):
        if not value:
            raise ValueError(f"{path}.type: an empty list of module types matches nothing")
        return tuple(_resolve_type(v, f"{path}.type[{i}]", by_name) for i, v in enumerate(value))
    return _resolve_type(value, f"{path}.type", by_name)


def _signature(cls: type) -> Tuple[List[str], List[str]]:
    """(every keyword the constructor takes, those without a default)."""
    parameters = [p for name, p in inspect.signature(cls.__init__).parameters.items() if name != "self"
                  and p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)]
    return [p.name for p in parameters], [p.name for p in parameters if p.default is inspect.Parameter.empty]


def _regularizer_from(data: Any, path: str) -> RuleValue:
    if data is None:
        return None
    if isinstance(data, (list, tuple)):  # one rule of each kind: the Python form's tuple
        if not data:
            raise ValueError(f"{path}: an empty list of rules; give at least one, or null to exclude the module")
        rules: List[Any] = []
        for i, item in enumerate(data):
            if item is None:
                raise TypeError(f"{path}[{i}]: null inside a list of rules; null excludes a module on its own "
                                "(the rule's whole value)")
            rule = _one_rule(item, f"{path}[{i}]")
            clash = next((j for j, r in enumerate(rules) if rule_kind(r) == rule_kind(rule)), None)
            if clash is not None:
                raise ValueError(f"{path}[{i}]: a second {rule_kind(rule)} rule (after {path}[{clash}]); a list "
                                 "holds one rule of each kind (penalty, activity, constraint)")
            rules.append(rule)
        return tuple(rules)
    return _one_rule(data, path)


def _one_rule(data: Any, path: str) -> Any:
    if not isinstance(data, Mapping):
        raise TypeError(f"{path}: expected a mapping such as {{'type': 'L1', 'lam': 0.0001}}, a list of them "
                        f"(one of each kind), or null to exclude the module, got {data!r} ({type(data).__name__})")
    if "type" not in data:
        raise ValueError(f"{path}: missing key 'type' (the regularizer's name: "
                         f"{', '.join(map(repr, sorted(_REGULARIZERS)))})")
    name = data["type"]
    if not isinstance(name, str):
        raise TypeError(f"{path}.type: expected a regularizer name (a string), got {name!r} ({type(name).__name__})")
    cls = _REGULARIZERS.get(name)
    if cls is None:
        close = difflib.get_close_matches(name, sorted(_REGULARIZERS), n=1)
        raise ValueError(f"{path}.type: unknown regularizer {name!r}; known: {', '.join(map(repr, sorted(_REGULARIZERS)))}"
                         + (f" (did you mean {close[0]!r}?)" if close else ""))
    allowed, required = _signature(cls)
    _check_keys(data, ["type", *allowed], path, f"a {name} regularizer")
    missing = [key for key in required if key not in data]
    if missing:
        raise ValueError(f"{path}: {name} needs {', '.join(map(repr, missing))}")
    options = {key: value for key, value in data.items() if key != "type"}
    strengths = getattr(cls, "_strengths", ())
    for key, value in options.items():
        where = f"{path}.{key}"
        _check_plain(value, where)
        if key in strengths:
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise TypeError(f"{where}: must be a real number >= 0, got {value!r} "
                                f"({type(value).__name__}){_numeric_string_hint(value)}")
            if not value >= 0 or value == float("inf"):
                raise ValueError(f"{where}: must be a finite real number >= 0, got {value!r}")
        elif key == "params":
            _check_params(value, where)
    try:
        return cls(**options)
    except (TypeError, ValueError) as error:
        raise type(error)(f"{_culprit(cls, options, required, path)}: {error}") from None


def _culprit(cls: type, options: Dict[str, Any], required: List[str], path: str) -> str:
    """The path of the option the constructor refuses on its own; ``path`` when none does."""
    base = {key: options[key] for key in required}
    try:
        cls(**base)
    except (TypeError, ValueError):
        return f"{path}.{required[0]}" if len(required) == 1 else path
    for key in options:
        if key not in base:
            try:
                cls(**base, **{key: options[key]})
            except (TypeError, ValueError):
                return f"{path}.{key}"
    return path  # options refused together only


def _check_params(value: Any, path: str) -> None:
    if isinstance(value, str):
        return
    if isinstance(value, (list, tuple)):
        if not value:
            raise ValueError(f"{path}: an empty list of patterns selects nothing; omit params for the default")
        for i, item in enumerate(value):
            if not isinstance(item, str):
                raise TypeError(f"{path}[{i}]: expected a glob pattern over parameter names (a string), "
                                f"got {item!r} ({type(item).__name__})")
        return
    raise TypeError(f"{path}: expected a glob pattern over parameter names or a list of them, "
                    f"got {value!r} ({type(value).__name__})")


def rules_from_config(data: Any, *, types: Types = None) -> Dict[RuleKey, RuleValue]:
    """The rules of :func:`torchreg.apply_regularization`, built from plain data.

    Args:
        data: a list of rules, each a mapping ``{"match": ..., "regularizer": ...}``, as described in
            this module's documentation (and as :func:`rules_to_config` writes them): ``match`` is
            ``{"type": "Linear"}``, ``{"type": ["Conv1d", "Conv2d"]}`` or ``{"name": "encoder.*"}``;
            ``regularizer`` is ``null`` or ``{"type": "L1", "lam": 0.0001, ...}`` with the class's
            constructor arguments by name.
        types: module classes outside ``torch.nn`` that ``match`` may name: a mapping
            ``{name: class}`` or a list of classes (each named by ``cls.__name__``). A name may not
            shadow a ``torch.nn`` class. Nothing is ever imported by name.

    Returns:
        An ordered dict from rule key (class, tuple of classes, or glob string) to a new regularizer
        (or ``None``), in the data's order: pass it to :func:`torchreg.apply_regularization`.

    Raises:
        TypeError: a value of the wrong type (a number as a string, a list where a mapping belongs,
            a non-plain value), with its path in the data first: ``rules[2].regularizer.lam: ...``.
        ValueError: an unknown key, module type or regularizer name, a missing key, a bad value (a
            negative strength, ``mode: "diag"``), two rules with the same match; also with its path.

    Example::

        >>> import json, torch, torchreg
        >>> data = json.loads('''[
        ...   {"match": {"name": "0"}, "regularizer": null},
        ...   {"match": {"type": "Linear"}, "regularizer": {"type": "L1", "lam": 1e-4}}
        ... ]''')
        >>> rules = torchreg.rules_from_config(data)
        >>> rules
        {'0': None, <class 'torch.nn.modules.linear.Linear'>: L1(lam=0.0001)}
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 1))
        >>> [r["module"] for r in torchreg.summary(torchreg.apply_regularization(model, rules)).records]
        ['0', '2']
        >>> torchreg.rules_from_config([{"match": {"type": "Linear"}, "regularizer": {"type": "L1", "lam": -1}}])
        Traceback (most recent call last):
        ...
        ValueError: rules[0].regularizer.lam: must be a finite real number >= 0, got -1
    """
    by_name, _ = _type_table(types)
    if not isinstance(data, (list, tuple)):
        hint = " (the rules themselves, not a mapping around them)" if isinstance(data, Mapping) else ""
        raise TypeError(f"rules: expected a list of rules, each {{'match': ..., 'regularizer': ...}}{hint}; "
                        f"got {type(data).__name__}")
    rules: Dict[RuleKey, RuleValue] = {}
    where: Dict[Any, int] = {}
    for i, entry in enumerate(data):
        path = f"rules[{i}]"
        if not isinstance(entry, Mapping):
            raise TypeError(f"{path}: expected a mapping {{'match': ..., 'regularizer': ...}}, "
                            f"got {entry!r} ({type(entry).__name__})")
        _check_keys(entry, _RULE_KEYS, path, "a rule")
        for key in _RULE_KEYS:
            if key not in entry:
                raise ValueError(f"{path}: missing key {key!r} (a rule is {{'match': ..., 'regularizer': ...}}; "
                                 "'regularizer': null excludes the module)")
        key = _match_from(entry["match"], f"{path}.match", by_name)
        if key in where:
            raise ValueError(f"{path}.match: the same match as rules[{where[key]}] ({_key_label(key)}); "
                             "the first would always win: remove one")
        where[key] = i
        rules[key] = _regularizer_from(entry["regularizer"], f"{path}.regularizer")
    return rules


# -- rules -> data -------------------------------------------------------------------------------
def _match_to(key: Any, path: str, by_class: Dict[type, str]) -> Dict[str, Any]:
    if isinstance(key, str):
        return {"name": key}

    def name_of(cls: Any, where: str) -> str:
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise TypeError(f"{where}: a rule key must be an nn.Module subclass, a non-empty tuple of them, or a "
                            f"glob pattern; got {cls!r} ({type(cls).__name__})")
        name = by_class.get(cls)
        if name is None:
            raise ValueError(f"{where}: {cls.__module__}.{cls.__qualname__} is not a torch.nn class; pass it in "
                             f"types= (e.g. types=[{cls.__name__}]) here and to rules_from_config")
        return name

    if isinstance(key, tuple):
        if not key:
            raise TypeError(f"{path}.type: an empty tuple of classes matches nothing")
        return {"type": [name_of(cls, f"{path}.type[{i}]") for i, cls in enumerate(key)]}
    return {"type": name_of(key, f"{path}.type")}


def _regularizer_to(value: Any, path: str, label: str) -> Union[None, Dict[str, Any], List[Dict[str, Any]]]:
    if value is None:
        return None
    try:
        rules = _compile_value(value, label)  # the values apply_regularization accepts, partials built
    except (TypeError, ValueError) as error:
        raise type(error)(f"{path}: {error}") from None
    assert rules is not None
    if isinstance(value, (tuple, list)):
        return [_rule_to(rule, f"{path}[{i}]", label) for i, rule in enumerate(rules)]
    return _rule_to(rules[0], path, label)


def _rule_to(rule: Any, path: str, label: str) -> Dict[str, Any]:
    cls = type(rule)
    name = cls.__name__
    if _REGULARIZERS.get(name) is not cls:
        raise ValueError(f"{path}: {cls.__module__}.{cls.__qualname__} is not one of the regularizers a config "
                         f"can name ({', '.join(_REGULARIZERS)})")
    data: Dict[str, Any] = {"type": name}
    for key, option in rule._kwargs().items():
        if key == "params" and callable(option):
            raise ValueError(f"{path}.params: rule {label} selects parameters with a predicate "
                             f"({getattr(option, '__name__', repr(option))}), which cannot be written as data; "
                             "use a glob pattern or a list of them")
        if key in ("center", "importance") and not (isinstance(option, str) and option == "init"):
            raise ValueError(
                f"{path}.{key}: rule {label} has {key}={option!r}: tensors, which cannot be written as data. A "
                f"config carries center='init' only; leave this rule out of the config and apply it in code "
                f"with {key}=... (e.g. the pretrained model or its state_dict())")
        if isinstance(option, tuple):
            option = list(option)
        _check_plain(option, f"{path}.{key}")
        data[key] = option
    return data


def rules_to_config(rules: Mapping[RuleKey, RuleValue], *, types: Types = None) -> List[Dict[str, Any]]:
    """Plain data (lists, dicts, strings, numbers, ``None``) that :func:`rules_from_config` turns back
    into the same rules.

    ``rules_from_config(rules_to_config(rules))`` gives a model the same regularization as ``rules``
    (the same summary and gradients), with new regularizer objects: a regularizer shared by several
    rules becomes one per rule. ``rules_to_config(rules_from_config(data)) == data`` for data in the
    form written here (a single parameter pattern ``"weight"`` is written back as ``["weight"]``).

    Args:
        rules: a mapping as :func:`torchreg.apply_regularization` takes it; values may be regularizers,
            ``functools.partial`` of one, or ``None``.
        types: module classes outside ``torch.nn`` that rule keys use, as in :func:`rules_from_config`.

    Returns:
        A list with one ``{"match": ..., "regularizer": ...}`` mapping per rule, ready for
        ``json.dumps``.

    Raises:
        TypeError: ``rules`` is not a mapping, or a key or value has the wrong type.
        ValueError: a key's class is neither in ``torch.nn`` nor in ``types``; a regularizer selects
            parameters with a predicate (``params=callable``), which is code, not data; a regularizer
            is a class a config cannot name. Each message starts with the rule's path
            (``rules[1].regularizer.params: ...``).

    Example::

        >>> import json, torch, torchreg
        >>> rules = {torch.nn.Embedding: None,
        ...          (torch.nn.Linear, torch.nn.Conv2d): torchreg.ElasticNet(l1=1e-5, l2=1e-4, params="weight")}
        >>> for rule in torchreg.rules_to_config(rules):
        ...     print(json.dumps(rule))
        {"match": {"type": "Embedding"}, "regularizer": null}
        {"match": {"type": ["Linear", "Conv2d"]}, "regularizer": {"type": "ElasticNet", "l1": 1e-05, "l2": 0.0001, "params": ["weight"]}}
    """
    _, by_class = _type_table(types)
    if not isinstance(rules, Mapping):
        raise TypeError("rules must be a mapping (e.g. a dict) from module class or name pattern to regularizer; "
                        f"got {type(rules).__name__}")
    data = []
    for i, (key, value) in enumerate(rules.items()):
        path = f"rules[{i}]"
        label = f"#{i + 1} {_key_label(key)}"
        data.append({"match": _match_to(key, f"{path}.match", by_class),
                     "regularizer": _regularizer_to(value, f"{path}.regularizer", label)})
    return data
