"""Rules as plain data: rules_from_config / rules_to_config.

Table-driven: REGULARIZERS and MATCHES hold the data form of each regularizer and match with the
Python object it stands for; BAD_DATA and BAD_RULES hold inputs that must fail, with the exception
type and the path the message must start with. A new regularizer class gets rows in REGULARIZERS
(and BAD_DATA for its own options), nothing else.
"""

from __future__ import annotations

import copy
import functools
import json
from typing import Any, Callable, Dict, List

import pytest
import torch
from torch import nn

import torchreg
from reference import grads


def rule(match: Dict[str, Any], regularizer: Any) -> Dict[str, Any]:
    return {"match": match, "regularizer": regularizer}


# -- the data form of each regularizer (canonical: as rules_to_config writes it) -----------------
# (data, the Python rule it stands for)
REGULARIZERS = [
    pytest.param({"type": "L1", "lam": 0.0001}, lambda: torchreg.L1(1e-4), id="L1"),
    pytest.param({"type": "L1", "lam": 0.0, "params": ["*"]}, lambda: torchreg.L1(0.0, params="*"), id="L1-zero-all"),
    pytest.param({"type": "L2", "lam": 0.0005, "params": ["weight", "bias"]},
                 lambda: torchreg.L2(5e-4, params=["weight", "bias"]), id="L2-params"),
    pytest.param({"type": "ElasticNet", "l1": 1e-05, "l2": 0.0001},
                 lambda: torchreg.ElasticNet(1e-5, 1e-4), id="ElasticNet"),
    pytest.param({"type": "Orthogonal", "lam": 0.01, "mode": "columns"},
                 lambda: torchreg.Orthogonal(0.01, mode="columns"), id="Orthogonal-columns"),
    pytest.param({"type": "Orthogonal", "lam": 0.5, "mode": "rows", "params": ["weight"]},
                 lambda: torchreg.Orthogonal(0.5, params="weight"), id="Orthogonal-rows-params"),
    pytest.param({"type": "GroupLasso", "lam": 0.01, "dim": 1, "proximal": True},
                 lambda: torchreg.GroupLasso(0.01, dim=1, proximal=True), id="GroupLasso"),
    pytest.param({"type": "L1", "lam": 0.001, "proximal": True},
                 lambda: torchreg.L1(0.001, proximal=True), id="L1-proximal"),
    pytest.param({"type": "ElasticNet", "l1": 0.001, "l2": 0.01, "proximal": True},
                 lambda: torchreg.ElasticNet(0.001, 0.01, proximal=True), id="ElasticNet-proximal"),
    pytest.param({"type": "ActivityL1", "lam": 0.0001}, lambda: torchreg.ActivityL1(lam=0.0001), id="ActivityL1"),
    pytest.param({"type": "ActivityL2", "lam": 0.0001}, lambda: torchreg.ActivityL2(lam=0.0001), id="ActivityL2"),
]

# (data, the Python key it stands for)
MATCHES = [
    pytest.param({"type": "Linear"}, nn.Linear, id="type"),
    pytest.param({"type": "Module"}, nn.Module, id="type-Module"),
    pytest.param({"type": ["Conv1d", "Conv2d"]}, (nn.Conv1d, nn.Conv2d), id="types"),
    pytest.param({"type": ["Linear"]}, (nn.Linear,), id="one-type-list"),
    pytest.param({"name": "encoder.*"}, "encoder.*", id="name"),
    pytest.param({"name": ""}, "", id="root"),
]

# Other spellings that give the same rule; (data, what rules_to_config writes back)
SPELLINGS = [
    pytest.param({"type": "L1", "lam": 1}, {"type": "L1", "lam": 1.0}, id="int-strength"),
    pytest.param({"type": "L1", "lam": 0.1, "params": "weight"}, {"type": "L1", "lam": 0.1, "params": ["weight"]},
                 id="one-pattern"),
    pytest.param({"type": "Orthogonal", "lam": 0.1}, {"type": "Orthogonal", "lam": 0.1, "mode": "rows"},
                 id="default-mode"),
    pytest.param({"lam": 0.1, "type": "L2"}, {"type": "L2", "lam": 0.1}, id="key-order"),
]


@pytest.mark.parametrize("match, key", MATCHES)
@pytest.mark.parametrize("regularizer, make", REGULARIZERS)
def test_each_regularizer_and_match(match: Dict[str, Any], key: Any, regularizer: Dict[str, Any],
                                    make: Callable[[], Any]) -> None:
    data = [rule(match, regularizer)]
    rules = torchreg.rules_from_config(data)
    ((got_key, value),) = rules.items()
    expected = make()
    assert got_key == key and type(got_key) is type(key)
    assert type(value) is type(expected) and repr(value) == repr(expected)
    assert value._kwargs() == expected._kwargs()
    assert torchreg.rules_to_config(rules) == data                   # data -> rules -> data
    assert torchreg.rules_to_config({key: expected}) == data          # the Python form writes the same
    assert json.loads(json.dumps(data)) == data


@pytest.mark.parametrize("data, canonical", SPELLINGS)
def test_other_spellings(data: Dict[str, Any], canonical: Dict[str, Any]) -> None:
    written = torchreg.rules_to_config(torchreg.rules_from_config([rule({"type": "Linear"}, data)]))
    assert written == [rule({"type": "Linear"}, canonical)]


# -- a model: rules -> data -> rules give the same regularization --------------------------------
class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(6, 6)
        self.norm = nn.LayerNorm(6)
        self.weight = nn.Parameter(torch.randn(6, 4))  # owned by Block itself

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.norm(self.proj(x))[..., :2], x[..., :4] @ self.weight.t()[:4, :4]], -1)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 6)
        self.encoder = nn.Sequential(Block(), nn.ReLU(), Block())
        self.conv = nn.Conv1d(6, 6, 3, padding=1)
        self.head = nn.Linear(6, 3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.encoder(self.embed(tokens))
        h = self.conv(h.transpose(1, 2)).transpose(1, 2)
        return self.head(h).pow(2).mean(1)


def python_rules() -> Dict[Any, Any]:
    return {
        "encoder.2": None,
        Block: torchreg.Orthogonal(lam=0.05, mode="columns"),
        "encoder.*": torchreg.L2(lam=1e-3),
        (nn.Conv1d, nn.Conv2d): functools.partial(torchreg.ElasticNet, l1=1e-3, l2=1e-2),
        nn.Embedding: torchreg.L1(2e-3, params=["weight"]),
        "head": torchreg.Orthogonal(0.2),
    }


def backward_summary(model: nn.Module) -> tuple:
    torch.manual_seed(0)
    model(torch.randint(0, 10, (4, 5))).sum().backward()
    return str(torchreg.summary(model)), grads(model)


def test_rules_to_data_to_rules_regularize_identically() -> None:
    torch.manual_seed(1)
    model = Net()
    models = [copy.deepcopy(model) for _ in range(3)]
    data = torchreg.rules_to_config(python_rules(), types=[Block])
    text = json.dumps(data)
    rebuilt = torchreg.rules_from_config(json.loads(text), types={"Block": Block})
    assert [type(k) for k in rebuilt] == [type(k) for k in python_rules()]
    torchreg.apply_regularization(models[0], python_rules())
    torchreg.apply_regularization(models[1], rebuilt)
    (summary_a, grads_a), (summary_b, grads_b) = backward_summary(models[0]), backward_summary(models[1])
    summary_bare, grads_bare = backward_summary(models[2])
    assert summary_a == summary_b and "Orthogonal(lam=0.05, mode='columns'" in summary_a
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        assert torch.equal(grads_a[name], grads_b[name]), name
    assert not torch.equal(grads_a["head.weight"], grads_bare["head.weight"])  # the rules did something
    assert torchreg.rules_to_config(rebuilt, types=[Block]) == data


def test_yaml_round_trip() -> None:
    yaml = pytest.importorskip("yaml")
    data = torchreg.rules_to_config(python_rules(), types=[Block])
    assert yaml.safe_load(yaml.safe_dump(data)) == data
    text = """
    - match: {name: "encoder.2"}
      regularizer: null
    - match: {type: [Conv1d, Conv2d]}
      regularizer: {type: ElasticNet, l1: 1.0e-3, l2: 0.01}
    """
    assert torchreg.rules_to_config(torchreg.rules_from_config(yaml.safe_load(text))) == [
        rule({"name": "encoder.2"}, None),
        rule({"type": ["Conv1d", "Conv2d"]}, {"type": "ElasticNet", "l1": 0.001, "l2": 0.01}),
    ]
    with pytest.raises(TypeError, match=r"^rules\[0\]\.regularizer\.lam: .*YAML"):  # YAML 1.1 reads 1e-4 as text
        torchreg.rules_from_config(yaml.safe_load("- match: {type: Linear}\n  regularizer: {type: L1, lam: 1e-4}"))


def test_shared_regularizer_becomes_one_per_rule() -> None:
    shared = torchreg.L1(1e-3)
    rules = torchreg.rules_from_config(torchreg.rules_to_config({nn.Linear: shared, nn.Conv2d: shared}))
    first, second = rules.values()
    assert first is not second and repr(first) == repr(second) == repr(shared)


def test_user_types() -> None:
    data = [rule({"type": "MyBlock"}, {"type": "L1", "lam": 0.1})]
    assert list(torchreg.rules_from_config(data, types={"MyBlock": Block})) == [Block]
    assert torchreg.rules_to_config({Block: torchreg.L1(0.1)}, types={"MyBlock": Block}) == data
    # a subclass of a torch.nn class is not that class: it needs types= too
    assert torchreg.rules_to_config({Block: None}, types=[Block]) == [rule({"type": "Block"}, None)]


# -- bad data: (data, types, exception, start of the message) ---------------------------------------
def l1(**options: Any) -> Dict[str, Any]:
    return {"type": "L1", **options}


GOOD = rule({"type": "Linear"}, l1(lam=0.1))

BAD_DATA = [
    ([rule({"type": "Linear"}, {"type": "GroupLasso", "lam": 0.1, "dim": "0"})], None, TypeError,
     "rules[0].regularizer.dim: "),
    ([rule({"type": "Linear"}, l1(lam=0.1, proximal="yes"))], None, TypeError, "rules[0].regularizer.proximal: "),
    ([rule({"type": "ReLU"}, {"type": "ActivityL1", "lam": -1})], None, ValueError, "rules[0].regularizer.lam: "),
    ({"rules": [GOOD]}, None, TypeError, "rules: expected a list"),
    ("Linear", None, TypeError, "rules: expected a list"),
    (["Linear"], None, TypeError, "rules[0]: expected a mapping"),
    ([GOOD, {**GOOD, "regulariser": None}], None, ValueError, "rules[1].regulariser: unknown key"),
    ([{"match": {"type": "Linear"}}], None, ValueError, "rules[0]: missing key 'regularizer'"),
    ([{"regularizer": None}], None, ValueError, "rules[0]: missing key 'match'"),
    ([rule("Linear", None)], None, TypeError, "rules[0].match: expected a mapping"),
    ([rule({}, None)], None, ValueError, "rules[0].match: a match has exactly one key"),
    ([rule({"type": "Linear", "name": "x"}, None)], None, ValueError, "rules[0].match: a match has exactly one key"),
    ([rule({"class": "Linear"}, None)], None, ValueError, "rules[0].match.class: unknown key"),
    ([rule({"type": "Linaer"}, None)], None, ValueError, "rules[0].match.type: unknown module type 'Linaer'"),
    ([rule({"type": "torch.nn.Linear"}, None)], None, ValueError, "rules[0].match.type: unknown module type"),
    ([rule({"type": "os.system"}, None)], None, ValueError, "rules[0].match.type: unknown module type"),
    ([rule({"type": "Block"}, None)], None, ValueError, "rules[0].match.type: unknown module type 'Block'"),
    ([rule({"type": "functional"}, None)], None, ValueError, "rules[0].match.type: unknown module type"),
    ([rule({"type": ["Conv2d", 3]}, None)], None, TypeError, "rules[0].match.type[1]: a module type is named"),
    ([rule({"type": ["Conv2d", "Conv9d"]}, None)], None, ValueError, "rules[0].match.type[1]: unknown"),
    ([rule({"type": []}, None)], None, ValueError, "rules[0].match.type: an empty list"),
    ([rule({"type": nn.Linear}, None)], None, TypeError, "rules[0].match.type: a module type is named by a string"),
    ([rule({"name": 3}, None)], None, TypeError, "rules[0].match.name: expected a glob"),
    ([GOOD, rule({"type": "Linear"}, None)], None, ValueError, "rules[1].match: the same match as rules[0]"),
    ([rule({"type": "Linear"}, "L1")], None, TypeError, "rules[0].regularizer: expected a mapping"),
    ([rule({"type": "Linear"}, {"lam": 0.1})], None, ValueError, "rules[0].regularizer: missing key 'type'"),
    ([rule({"type": "Linear"}, {"type": "L3", "lam": 0.1})], None, ValueError,
     "rules[0].regularizer.type: unknown regularizer 'L3'"),
    ([rule({"type": "Linear"}, {"type": "l1", "lam": 0.1})], None, ValueError, "rules[0].regularizer.type: unknown"),
    ([rule({"type": "Linear"}, {"type": "Regularizer"})], None, ValueError, "rules[0].regularizer.type: unknown"),
    ([rule({"type": "Linear"}, {"type": ["L1"], "lam": 0.1})], None, TypeError, "rules[0].regularizer.type: expected"),
    ([rule({"type": "Linear"}, l1(lam=0.1, l1=0.2))], None, ValueError, "rules[0].regularizer.l1: unknown key"),
    ([rule({"type": "Linear"}, l1(lam=0.1, module="x"))], None, ValueError, "rules[0].regularizer.module: unknown"),
    ([rule({"type": "Linear"}, l1())], None, ValueError, "rules[0].regularizer: L1 needs 'lam'"),
    ([rule({"type": "Linear"}, {"type": "ElasticNet", "l1": 0.1})], None, ValueError,
     "rules[0].regularizer: ElasticNet needs 'l2'"),
    ([GOOD, rule({"name": "a"}, None), rule({"name": "b"}, l1(lam=-1))], None, ValueError,
     "rules[2].regularizer.lam: must be a finite real number >= 0"),
    ([rule({"type": "Linear"}, l1(lam="1e-4"))], None, TypeError, "rules[0].regularizer.lam: must be a real number"),
    ([rule({"type": "Linear"}, l1(lam=True))], None, TypeError, "rules[0].regularizer.lam: must be a real number"),
    ([rule({"type": "Linear"}, l1(lam=None))], None, TypeError, "rules[0].regularizer.lam: must be a real number"),
    ([rule({"type": "Linear"}, l1(lam=float("nan")))], None, ValueError, "rules[0].regularizer.lam: must be a finite"),
    ([rule({"type": "Linear"}, l1(lam=float("inf")))], None, ValueError, "rules[0].regularizer.lam: must be a finite"),
    ([rule({"type": "Linear"}, l1(lam=[0.1]))], None, TypeError, "rules[0].regularizer.lam: must be a real number"),
    ([rule({"type": "Linear"}, l1(lam=torch.tensor(0.1)))], None, TypeError, "rules[0].regularizer.lam: expected plain"),
    ([rule({"type": "Linear"}, {"type": "ElasticNet", "l1": 0.1, "l2": -2})], None, ValueError,
     "rules[0].regularizer.l2: must be a finite"),
    ([rule({"type": "Linear"}, l1(lam=0.1, params=1))], None, TypeError, "rules[0].regularizer.params: expected a glob"),
    ([rule({"type": "Linear"}, l1(lam=0.1, params=[]))], None, ValueError, "rules[0].regularizer.params: an empty"),
    ([rule({"type": "Linear"}, l1(lam=0.1, params=["weight", 1]))], None, TypeError,
     "rules[0].regularizer.params[1]: expected a glob"),
    ([rule({"type": "Linear"}, l1(lam=0.1, params={"weight": 1}))], None, TypeError,
     "rules[0].regularizer.params: expected a glob"),
    ([rule({"type": "Linear"}, l1(lam=0.1, params=lambda n, p: True))], None, TypeError,
     "rules[0].regularizer.params: expected plain data"),
    ([rule({"type": "Linear"}, {"type": "Orthogonal", "lam": 0.1, "mode": "diag"})], None, ValueError,
     "rules[0].regularizer.mode: Orthogonal mode must be 'rows' or 'columns'"),
    ([rule({"type": "Linear"}, {"type": "Orthogonal", "lam": 0.1, "mode": 1})], None, TypeError,
     "rules[0].regularizer.mode: Orthogonal mode must be"),
    ([rule({"type": "Linear"}, {"type": "Orthogonal", "lam": 0.1, "mode": ["rows"]})], None, TypeError,
     "rules[0].regularizer.mode: Orthogonal mode must be"),
    ([GOOD], {"Linear": Block}, ValueError, "types['Linear']: "),
    ([GOOD], {"Block": int}, TypeError, "types['Block']: expected an nn.Module subclass"),
    ([GOOD], [Block, "Linear"], TypeError, "types: expected nn.Module subclasses"),
    ([GOOD], "Block", TypeError, "types must be a mapping"),
    ([GOOD], {3: Block}, TypeError, "types: a name must be a non-empty string"),
]


@pytest.mark.parametrize("data, types, error, start", BAD_DATA, ids=[case[3] for case in BAD_DATA])
def test_bad_data(data: Any, types: Any, error: type, start: str) -> None:
    with pytest.raises(error) as info:
        torchreg.rules_from_config(data, types=types)
    assert type(info.value) is error
    assert str(info.value).startswith(start), str(info.value)


class MyL1(torchreg.L1):
    pass


def named_predicate(name: str, p: torch.Tensor) -> bool:
    return p.ndim > 1


# (rules, types, exception, start of the message)
BAD_RULES = [
    ([(nn.Linear, torchreg.L1(0.1))], None, TypeError, "rules must be a mapping"),
    ({nn.Linear: torchreg.L1(0.1), "head": torchreg.L2(0.1, params=named_predicate)}, None, ValueError,
     "rules[1].regularizer.params: rule #2 'head' selects parameters with a predicate (named_predicate)"),
    ({Block: torchreg.L1(0.1)}, None, ValueError, "rules[0].match.type: test_config.Block is not a torch.nn class"),
    ({(nn.Linear, Block): None}, None, ValueError, "rules[0].match.type[1]: test_config.Block is not"),
    ({(): None}, None, TypeError, "rules[0].match.type: an empty tuple"),
    ({3: None}, None, TypeError, "rules[0].match.type: a rule key must be"),
    ({nn.Linear(2, 2): None}, None, TypeError, "rules[0].match.type: a rule key must be"),
    ({nn.Linear: MyL1(0.1)}, None, ValueError, "rules[0].regularizer: test_config.MyL1 is not one of"),
    ({nn.Linear: torchreg.L1}, None, TypeError, "rules[0].regularizer: rule #1 Linear: got the class torchreg.L1"),
    ({nn.Linear: "L1"}, None, TypeError, "rules[0].regularizer: rule #1 Linear: a value must be"),
    ({nn.Linear: functools.partial(torchreg.L1, lam=-1.0)}, None, ValueError, "rules[0].regularizer: rule #1"),
    ({nn.Linear: None}, {"Linear": Block}, ValueError, "types['Linear']: "),
]


@pytest.mark.parametrize("rules, types, error, start", BAD_RULES, ids=[case[3] for case in BAD_RULES])
def test_bad_rules(rules: Any, types: Any, error: type, start: str) -> None:
    with pytest.raises(error) as info:
        torchreg.rules_to_config(rules, types=types)
    assert type(info.value) is error
    assert str(info.value).startswith(start), str(info.value)


def test_nothing_is_imported_or_evaluated(monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins
    import importlib

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError(f"import or eval called with {args}")

    data: List[Dict[str, Any]] = [rule({"type": name}, None) for name in ("torch.nn.Linear", "os.system", "__import__")]
    monkeypatch.setattr(importlib, "import_module", refuse)
    monkeypatch.setattr(builtins, "eval", refuse)
    monkeypatch.setattr(builtins, "exec", refuse)
    for entry in data:
        with pytest.raises(ValueError, match=r"^rules\[0\]\.match\.type: unknown module type"):
            torchreg.rules_from_config([entry])


class Strict(torchreg.L1):
    """A stand-in for a class whose strength is checked by its constructor only (no _strengths)."""

    _strengths = ()

    def __init__(self, lam: Any, *, flag: bool = False) -> None:
        if not isinstance(lam, float):
            raise TypeError(f"lam must be a float, got {lam!r}")
        super().__init__(lam)
        self.flag = flag


@pytest.mark.parametrize("options, start", [
    ({"lam": 1, "flag": True}, "rules[0].regularizer.lam: lam must be a float"),
    ({"lam": 0.5, "flag": True}, None),
])
def test_the_refused_required_option_is_named(monkeypatch: pytest.MonkeyPatch, options: Dict[str, Any],
                                              start: Any) -> None:
    from torchreg import config

    monkeypatch.setitem(config._REGULARIZERS, "Strict", Strict)
    data = [rule({"type": "Linear"}, {"type": "Strict", **options})]
    if start is None:
        (value,) = torchreg.rules_from_config(data).values()
        assert (type(value), value.lam, value.flag) == (Strict, 0.5, True)
    else:
        with pytest.raises(TypeError) as info:
            torchreg.rules_from_config(data)
        assert str(info.value).startswith(start), str(info.value)


class Pair(torchreg.L1):
    """A stand-in for a future regularizer with options of its own (GroupLasso's dim, proximal)."""

    def __init__(self, lam: float, *, a: int = 0, b: bool = False, params: Any = None) -> None:
        super().__init__(lam, params=params)
        if not isinstance(a, int) or isinstance(a, bool):
            raise TypeError(f"a must be an int, got {a!r}")
        if a and b:
            raise ValueError("a and b cannot be set together")
        self.a, self.b = a, b

    def _kwargs(self) -> Dict[str, Any]:
        return {**super()._kwargs(), "a": self.a, "b": self.b}


@pytest.mark.parametrize("options, error, start", [
    ({"lam": 0.1, "a": 2, "b": False}, None, None),
    ({"lam": 0.1, "a": "2"}, TypeError, "rules[0].regularizer.a: a must be an int"),
    ({"lam": 0.1, "a": 1, "b": True}, ValueError, "rules[0].regularizer: a and b cannot be set together"),
    ({"lam": 0.1, "c": 1}, ValueError, "rules[0].regularizer.c: unknown key 'c' in a Pair regularizer; allowed: "
                                      "'type', 'lam', 'a', 'b', 'params'"),
])
def test_a_new_class_needs_one_registry_entry(monkeypatch: pytest.MonkeyPatch, options: Dict[str, Any],
                                              error: Any, start: Any) -> None:
    from torchreg import config

    monkeypatch.setitem(config._REGULARIZERS, "Pair", Pair)
    data = [rule({"type": "Linear"}, {"type": "Pair", **options})]
    if error is None:
        (value,) = torchreg.rules_from_config(data).values()
        assert (type(value), value.lam, value.a, value.b) == (Pair, 0.1, 2, False)
        assert torchreg.rules_to_config({nn.Linear: value}) == data
    else:
        with pytest.raises(error) as info:
            torchreg.rules_from_config(data)
        assert str(info.value).startswith(start), str(info.value)
