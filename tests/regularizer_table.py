"""The table of every regularizer, and the plain-PyTorch reference that the shared suites compare with.

One row per regularizer and mode (OpInfo / BackPACK style). The suites ``tests/test_table_*.py``
(exactness, training loops, DDP, transparency, bad input, memory) are each parametrized over
:data:`TABLE`, so a new regularizer is one row here and runs through all of them.

Row format
----------
::

    Row(
        "L1-prox",                                # the pytest id
        torchreg.L1, dict(lam=0.07, proximal=True),  # cls and kwargs: cls(module, **kwargs) is the wrapper
                                                  # form, cls(**kwargs) the rule for apply_regularization
        penalty=lambda w: 0.07 * w.abs().sum(),   # the penalty of ONE parameter as an autograd loss term
                                                  #   (weight rows), written here, not taken from torchreg
        activity=None,                            # or ``fn(out, batch)``: the penalty of one call's output
        after_step=lambda w, s: soft(w, s * 0.07),  # after-step rows (proximal, constraints): the operator
                                                  #   applied by hand after a plain optimizer step, with the
                                                  #   step ``s`` (SGD: lr; Adam: lr / D per coordinate)
        optimizers=("SGD", "Adam"),               # the optimizers its after-step mode is exact for
        snapshot=False,                           # True: penalty(w, w0) and after_step(w, s, w0) also get
                                                  #   w0, the weight's value when the rule was applied
        layers=("Linear", "Conv2d", "Embedding", "LSTM"),  # the layers it fits (LAYERS; exactness suite)
        bad=(Bad(dict(proximal="yes"), TypeError, ("'yes'",)),),  # bad options besides the strengths
        skip={"compile": "reason"},               # suite -> why this row cannot take it (a visible skip)
        xfail={"ddp": "bug: ..."},                # suite -> a torchreg bug found here (strict xfail)
    )

Adding a row
------------
A few lines in :data:`TABLE`, e.g. (the penalty and operator typed from the maths, never by calling
torchreg)::

    Row("Huber", Huber, dict(lam=LAM, delta=0.5), penalty=lambda w: LAM * huber(w, 0.5),
        bad=(Bad(dict(delta=-1.0), ValueError, ("delta", "-1.0")),)),
    Row("MaxNorm", torchreg.MaxNorm, dict(max_value=0.3),            # a constraint: no penalty, its
        after_step=lambda w, s: keras_norm_projection(w, 0, lambda n: n.clamp(0, 0.3)),  # projection
        optimizers=("SGD", "Adam")),
    Row("L2-center-init", torchreg.L2, dict(lam=LAM, center="init"), snapshot=True,
        penalty=lambda w, w0: LAM / 2 * (w - w0).pow(2).sum()),

Modes, as the suites read them: a row with ``activity`` penalizes outputs; a row with ``after_step``
(proximal regularizers, constraints) adds nothing at backward (its gradients are the bare model's) and
changes the weights after each optimizer step; any other row adds ``d penalty / d w`` to the gradient at
backward. The covered
parameters of a target module are its parameters whose own name starts with ``weight`` (the documented
default selection for the layers used here: Linear, Conv2d, Embedding, LSTM, written out independently
of torchreg's selection code). Suite names for ``skip`` / ``xfail``: :data:`SUITES`.

``LogCosh`` and ``TowardInit`` below are regularizers defined outside the package, written to the
regularizer contract only (``penalty``, ``grad_``; ``TowardInit`` also per-parameter state through
``init_state`` and a ``prox_``); their rows run through every suite as the built-in ones do, which
carries the state through accumulation, DDP, deepcopy, pickle, ``torch.save`` and ``model.to()``.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import pytest
import torch
from torch import Tensor, nn

import torchreg
from reference import assert_same_grads

SUITES = (
    "exactness", "accumulation", "grad_scaler", "compile", "checkpoint-reentrant", "checkpoint",
    "inputs", "create_graph", "retain_graph", "autograd_grad", "ddp", "transparency", "errors", "memory",
)
#: Why the activity rows skip the retain_graph suite.
_ACTIVITY_RETAIN = ("a documented limit (README, activity regularization): a second backward through the same "
                    "retained graph does not add the term again, where the loss penalty would")


# ---------------------------------------------------------------------------------------------------
# Regularizers defined outside torchreg, written to the contract only
# ---------------------------------------------------------------------------------------------------
class LogCosh(torchreg.Regularizer):
    """``lam * sum(log(cosh(w)))``: quadratic near 0, linear far from it (a smooth L1); its gradient
    is ``lam * tanh(w)``."""

    _strengths = ("lam",)
    lam = torchreg.regularizers.strength("lam")

    def __init__(self, lam: float, *, params: Any = None) -> None:
        self.lam = lam
        self._init_selection(params)

    def penalty(self, param: Tensor) -> Tensor:
        a = param.abs()  # log(cosh(w)) = |w| + log1p(exp(-2|w|)) - log(2), stable for large |w|
        return self.lam * (a + torch.log1p(torch.exp(-2 * a)) - math.log(2.0)).sum()

    def grad_(self, grad: Tensor, param: Tensor, alpha: float = 1.0, scale: Optional[Tensor] = None) -> None:
        if scale is None:
            grad.add_(torch.tanh(param), alpha=self.lam * alpha)
        else:
            grad.addcmul_(torch.tanh(param), scale, value=self.lam * alpha)


class TowardInit(torchreg.Regularizer):
    """``lam / 2 * sum((w - w0) ** 2)``, ``w0`` each weight's value when the rule was applied, kept as
    per-parameter state (``init_state``); with ``proximal=True`` its operator
    ``(w + step * lam * w0) / (1 + step * lam)`` runs after each optimizer step instead."""

    _strengths = ("lam",)
    lam = torchreg.regularizers.strength("lam")

    def __init__(self, lam: float, *, proximal: bool = False, params: Any = None) -> None:
        self.lam = lam
        self._init_proximal(proximal)
        self._init_selection(params)

    def init_state(self, name: str, param: Tensor) -> Dict[str, Tensor]:
        return {"start": param.detach().clone()}

    def penalty(self, param: Tensor, state: Dict[str, Tensor]) -> Tensor:
        return self.lam / 2 * (param - state["start"]).pow(2).sum()

    def grad_(self, grad: Tensor, param: Tensor, alpha: float = 1.0, scale: Optional[Tensor] = None,
              state: Optional[Dict[str, Tensor]] = None) -> None:
        term = (param - state["start"]) * (self.lam * alpha)
        grad.add_(term if scale is None else term * scale)

    def prox_(self, param: Tensor, step: Any, state: Optional[Dict[str, Tensor]] = None) -> None:
        t = step * self.lam
        param.add_(state["start"] * t).div_(t + 1)


# ---------------------------------------------------------------------------------------------------
# Reference formulas (typed here, independently of torchreg's code)
# ---------------------------------------------------------------------------------------------------
def soft(w: Tensor, t: Any) -> Tensor:
    """Soft thresholding ``sign(w) * max(|w| - t, 0)``, ``t`` a float or a tensor broadcastable to ``w``."""
    return torch.sign(w) * torch.clamp(w.abs() - t, min=0)


def _other_dims(w: Tensor, dim: int) -> Tuple[int, ...]:
    return tuple(d for d in range(w.ndim) if d != dim % w.ndim)


def group_norm_sum(w: Tensor, dim: int) -> Tensor:
    """``sum_g ||w_g||``, a group being the slice ``w.select(dim, g)``."""
    return torch.stack([w.select(dim, g).pow(2).sum().sqrt() for g in range(w.shape[dim])]).sum()


def group_prox(w: Tensor, step: Any, lam: float, dim: int) -> Tensor:
    """``argmin_x lam * sum_g ||x_g|| + sum_i (x_i - w_i) ** 2 / (2 * s_i)``, group by group, in float64.

    A step per coordinate (Adam; a shared step is the special case): ``x_g = 0`` when
    ``sum_i (w_i / a_i) ** 2 <= 1`` (``a_i = lam * s_i``), else ``x_i = w_i * r / (r + a_i)`` with ``r > 0``
    the root of ``S(r) = sum_i w_i ** 2 / (r + a_i) ** 2 = 1`` (decreasing in ``r``), found here by
    bisection on ``[0, ||w_g||]``, every group at once. For a shared step ``s`` this is the closed form
    ``w_g * max(0, 1 - s * lam / ||w_g||)``.
    """
    z = w.double().movedim(dim, 0)
    a = lam * torch.as_tensor(step, dtype=torch.float64).expand(w.shape).movedim(dim, 0)
    z, a = z.reshape(z.shape[0], -1), a.reshape(z.shape[0], -1)
    zero = ((z / a) ** 2).sum(1, keepdim=True) <= 1
    lo, hi = torch.zeros_like(z[:, :1]), z.pow(2).sum(1, keepdim=True).sqrt()  # S(hi) <= 1 <= S(lo)
    for _ in range(80):
        mid = (lo + hi) / 2
        above = (z ** 2 / (mid + a) ** 2).sum(1, keepdim=True) > 1
        lo, hi = torch.where(above, mid, lo), torch.where(above, hi, mid)
    r = (lo + hi) / 2
    x = torch.where(zero, 0.0, z * r / (r + a))
    return x.reshape(w.movedim(dim, 0).shape).movedim(0, dim).to(w.dtype)


def keras_norm_projection(w: Tensor, dim: int, desired: Callable[[Tensor], Tensor]) -> Tensor:
    """Keras' norm constraints in torch's layout: ``w_g * desired(n_g) / (1e-7 + n_g)``, one norm ``n_g``
    per index ``g`` along ``dim`` (over every other dimension), in float64."""
    z = w.double()
    n = z.pow(2).sum(dim=_other_dims(w, dim), keepdim=True).sqrt()
    return (z * desired(n) / (1e-7 + n)).to(w.dtype)


def orthogonal_penalty(w: Tensor, lam: float, mode: str) -> Tensor:
    """Keras' OrthogonalRegularizer in torch's layout: mean ``|cos|`` over distinct pairs of rows
    (columns) of ``w.reshape(shape[0], -1)``, each normalized by ``max(||v||, 1e-7)``."""
    m = w.reshape(w.shape[0], -1)
    v = m if mode == "rows" else m.t()
    n = v.shape[0]
    u = v / torch.linalg.vector_norm(v, dim=1, keepdim=True).clamp_min(1e-7)
    i, j = torch.triu_indices(n, n, offset=1)
    return lam * (u @ u.t())[i, j].abs().sum() / (n * (n - 1) / 2)


# ---------------------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Bad:
    """Options that must be refused: ``cls(module, **{**row.kwargs, **options})`` raises ``error`` with
    every fragment in its message, before the module changes."""

    options: Mapping[str, Any]
    error: type
    fragments: Tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Row:
    """One regularizer in one mode; see the module docstring for the fields."""

    id: str
    cls: type
    kwargs: Mapping[str, Any]
    penalty: Optional[Callable[[Tensor], Tensor]] = None
    activity: Optional[Callable[[Tensor, int], Tensor]] = None
    after_step: Optional[Callable[[Tensor, Any], Tensor]] = None
    optimizers: Tuple[str, ...] = ("SGD",)
    snapshot: bool = False
    layers: Tuple[str, ...] = ("Linear", "Conv2d", "Embedding", "LSTM")
    bad: Tuple[Bad, ...] = ()
    skip: Mapping[str, str] = dataclasses.field(default_factory=dict)
    xfail: Mapping[str, str] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        assert (self.penalty is None) != (self.activity is None) or self.after_step is not None, self.id
        assert set(self.skip) | set(self.xfail) <= set(SUITES), (self.id, self.skip, self.xfail)

    @property
    def mode(self) -> str:
        """``"gradient"``, ``"after-step"`` or ``"activity"``."""
        return "activity" if self.activity is not None else "after-step" if self.after_step else "gradient"

    # -- the two forms --------------------------------------------------------------------------
    def wrap(self, module: nn.Module) -> nn.Module:
        """The wrapper form: ``cls(module, **kwargs)``, returning ``module``."""
        return self.cls(module, **self.kwargs)

    def rule(self) -> Any:
        """The rule form: ``cls(**kwargs)``, for ``apply_regularization`` or ``rule.apply(module)``."""
        return self.cls(**self.kwargs)

    def regularize(self, model: nn.Module, targets: Sequence[str], form: str = "wrapper") -> nn.Module:
        """Regularize the modules ``targets`` (qualified names; ``""`` is ``model``) of ``model``: one
        wrapper call per target, or one ``apply_regularization`` with one shared rule."""
        if form == "wrapper":
            for name in targets:
                assert self.wrap(model.get_submodule(name)) is model.get_submodule(name)
        else:
            rule = self.rule()
            assert torchreg.apply_regularization(model, {name: rule for name in targets}, strict=True) is model
        return model

    # -- the reference ----------------------------------------------------------------------------
    def ref_penalty(self, model: nn.Module, outputs: Mapping[str, Sequence[Tensor]],
                    snapshot: Optional[Mapping[str, Tensor]] = None) -> Tensor:
        """The penalty as an autograd loss term on the bare ``model``: ``outputs`` maps each target module's
        name to the outputs recorded from its calls (the activity rows' input; weight rows read the
        target's weights); ``snapshot`` maps ``"target/weight name"`` to the weight's value when the rule
        was applied (``Row.snapshot`` rows only)."""
        total = torch.zeros(())
        for name, outs in outputs.items():
            if self.activity is not None:
                for out in outs:
                    total = total + self.activity(out, out.shape[0])
            elif self.penalty is not None:
                for key, w in covered_items(model, name):
                    total = total + (self.penalty(w, snapshot[key].to(w)) if self.snapshot else self.penalty(w))
        return total


def covered_items(model: nn.Module, target: str) -> List[Tuple[str, nn.Parameter]]:
    """``("target/name", weight)`` for the weights the default selection covers in ``target``."""
    return [(f"{target}/{n}", p) for n, p in model.get_submodule(target).named_parameters()
            if n.rsplit(".", 1)[-1].startswith("weight")]


LAM = 0.07  # large enough that a missing, doubled or mis-scaled term moves gradients far past fp32 noise
L1_, L2_ = 0.05, 0.3

_BAD_PROXIMAL = Bad(dict(proximal="yes"), TypeError, ("proximal", "'yes'"))
_BAD_CENTER = Bad(dict(center="start"), ValueError, ("center", "'start'"))
_BAD_DIM = (Bad(dict(dim="0"), TypeError, ("dim", "'0'")), Bad(dict(dim=5), ValueError, ("dim", "5")))
_BAD_MODE = (Bad(dict(mode=1), TypeError, ("mode", "1")), Bad(dict(mode="diagonal"), ValueError, ("'diagonal'",)))


def _group_rows(dim: int) -> List[Row]:
    return [
        Row(f"GroupLasso-dim{dim}", torchreg.GroupLasso, dict(lam=LAM, dim=dim),
            penalty=lambda w: LAM * group_norm_sum(w, dim), bad=_BAD_DIM),
        Row(f"GroupLasso-dim{dim}-prox", torchreg.GroupLasso, dict(lam=LAM, dim=dim, proximal=True),
            penalty=lambda w: LAM * group_norm_sum(w, dim), after_step=lambda w, s: group_prox(w, s, LAM, dim),
            optimizers=("SGD", "Adam"), bad=_BAD_DIM + (_BAD_PROXIMAL,)),
    ]


TABLE: List[Row] = [
    Row("L1", torchreg.L1, dict(lam=LAM), penalty=lambda w: LAM * w.abs().sum()),
    Row("L1-prox", torchreg.L1, dict(lam=LAM, proximal=True), penalty=lambda w: LAM * w.abs().sum(),
        after_step=lambda w, s: soft(w, s * LAM), optimizers=("SGD", "Adam"), bad=(_BAD_PROXIMAL,)),
    Row("L2", torchreg.L2, dict(lam=LAM), penalty=lambda w: LAM / 2 * w.pow(2).sum()),
    Row("ElasticNet", torchreg.ElasticNet, dict(l1=L1_, l2=L2_),
        penalty=lambda w: L1_ * w.abs().sum() + L2_ / 2 * w.pow(2).sum()),
    Row("ElasticNet-prox", torchreg.ElasticNet, dict(l1=L1_, l2=L2_, proximal=True),
        penalty=lambda w: L1_ * w.abs().sum() + L2_ / 2 * w.pow(2).sum(),
        after_step=lambda w, s: soft(w, s * L1_) / (1 + s * L2_), optimizers=("SGD", "Adam"), bad=(_BAD_PROXIMAL,)),
    *_group_rows(0),
    *_group_rows(1),
    Row("Orthogonal-rows", torchreg.Orthogonal, dict(lam=LAM), penalty=lambda w: orthogonal_penalty(w, LAM, "rows"),
        bad=_BAD_MODE),
    Row("Orthogonal-columns", torchreg.Orthogonal, dict(lam=LAM, mode="columns"),
        penalty=lambda w: orthogonal_penalty(w, LAM, "columns"), bad=_BAD_MODE),
    Row("ActivityL1", torchreg.ActivityL1, dict(lam=LAM), activity=lambda out, b: LAM * out.abs().sum() / b,
        skip={"retain_graph": _ACTIVITY_RETAIN}),
    Row("ActivityL2", torchreg.ActivityL2, dict(lam=LAM), activity=lambda out, b: LAM / 2 * out.pow(2).sum() / b,
        skip={"create_graph": "a documented limit (README, activity regularization): under create_graph=True the "
                              "activity term is a constant of the graph, so L2's second derivative lam / batch is "
                              "missing", "retain_graph": _ACTIVITY_RETAIN}),
    # Penalties toward each weight's value when the rule was applied (center="init": L2-SP, sparse deltas).
    Row("L1-center-init", torchreg.L1, dict(lam=LAM, center="init"), snapshot=True,
        penalty=lambda w, w0: LAM * (w - w0).abs().sum(), bad=(_BAD_CENTER,)),
    Row("L1-center-init-prox", torchreg.L1, dict(lam=LAM, center="init", proximal=True), snapshot=True,
        penalty=lambda w, w0: LAM * (w - w0).abs().sum(),
        after_step=lambda w, s, w0: w0 + soft(w - w0, s * LAM), optimizers=("SGD", "Adam"),
        bad=(_BAD_CENTER, _BAD_PROXIMAL)),
    Row("L2-center-init", torchreg.L2, dict(lam=LAM, center="init"), snapshot=True,
        penalty=lambda w, w0: LAM / 2 * (w - w0).pow(2).sum(), bad=(_BAD_CENTER,)),
    Row("ElasticNet-center-init", torchreg.ElasticNet, dict(l1=L1_, l2=L2_, center="init"), snapshot=True,
        penalty=lambda w, w0: L1_ * (w - w0).abs().sum() + L2_ / 2 * (w - w0).pow(2).sum(), bad=(_BAD_CENTER,)),
    Row("ElasticNet-center-init-prox", torchreg.ElasticNet, dict(l1=L1_, l2=L2_, center="init", proximal=True),
        snapshot=True, penalty=lambda w, w0: L1_ * (w - w0).abs().sum() + L2_ / 2 * (w - w0).pow(2).sum(),
        after_step=lambda w, s, w0: w0 + soft(w - w0, s * L1_) / (1 + s * L2_), optimizers=("SGD", "Adam"),
        bad=(_BAD_CENTER, _BAD_PROXIMAL)),
    Row("LogCosh-user-defined", LogCosh, dict(lam=LAM), penalty=lambda w: LAM * torch.log(torch.cosh(w)).sum()),
    # Keras' weight constraints: no penalty, a projection after every optimizer step (the step is not used).
    Row("MaxNorm", torchreg.MaxNorm, dict(max_value=0.3),
        after_step=lambda w, s: keras_norm_projection(w, 0, lambda n: n.clamp(0, 0.3)), optimizers=("SGD", "Adam"),
        bad=(Bad(dict(max_value=-1.0), ValueError, ("max_value", "-1.0")),
             Bad(dict(max_value="3"), TypeError, ("max_value", "'3'")), Bad(dict(dim=5), ValueError, ("dim=5",)))),
    Row("MinMaxNorm-dim1", torchreg.MinMaxNorm, dict(min_value=0.4, max_value=0.6, rate=0.5, dim=1),
        after_step=lambda w, s: keras_norm_projection(w, 1, lambda n: 0.5 * n.clamp(0.4, 0.6) + 0.5 * n),
        optimizers=("SGD", "Adam"), bad=(Bad(dict(min_value=0.7), ValueError, ("min_value", "0.7")),)),
    Row("UnitNorm", torchreg.UnitNorm, dict(), after_step=lambda w, s: keras_norm_projection(w, 0, lambda n: 1.0),
        optimizers=("SGD", "Adam"), bad=(Bad(dict(dim="0"), TypeError, ("dim", "'0'")),)),
    Row("NonNeg", torchreg.NonNeg, dict(), after_step=lambda w, s: w * (w >= 0), optimizers=("SGD", "Adam"),
        bad=(Bad(dict(params=3), TypeError, ("params", "3 (int)")),)),
    Row("TowardInit-user-state", TowardInit, dict(lam=LAM), snapshot=True,
        penalty=lambda w, w0: LAM / 2 * (w - w0).pow(2).sum()),
    Row("TowardInit-user-state-prox", TowardInit, dict(lam=LAM, proximal=True), snapshot=True,
        penalty=lambda w, w0: LAM / 2 * (w - w0).pow(2).sum(),
        after_step=lambda w, s, w0: (w + s * LAM * w0) / (1 + s * LAM), optimizers=("SGD", "Adam"),
        bad=(_BAD_PROXIMAL,)),
]

ROWS: Dict[str, Row] = {row.id: row for row in TABLE}
assert len(ROWS) == len(TABLE), "row ids must be unique"


def params(suite: str, *more: Tuple[str, Sequence[Any]],
           per_row: Optional[Callable[[Row], Sequence[Tuple[str, Tuple[Any, ...]]]]] = None) -> List[Any]:
    """``pytest.param`` for every row times every combination of ``more`` (``(name, values)`` pairs) or
    of ``per_row(row)`` (``(label, values)`` pairs), with readable ids, skipped or strictly xfailed as the
    row says for ``suite``. The parametrized test takes the row, then the values of each combination."""
    assert suite in SUITES, suite
    combos: List[Tuple[Any, ...]] = [()]
    names: List[str] = []
    for name, values in more:
        combos = [c + (v,) for c in combos for v in values]
        names.append(name)
    out = []
    for row in TABLE:
        marks = []
        if suite in row.skip:
            marks.append(pytest.mark.skip(reason=f"{row.id}: {row.skip[suite]}"))
        if suite in row.xfail:
            marks.append(pytest.mark.xfail(reason=f"{row.id}: {row.xfail[suite]}", strict=True))
        labelled = per_row(row) if per_row is not None else [
            ("-".join(v if isinstance(v, str) else f"{n}={v!r}" for n, v in zip(names, combo)), combo)
            for combo in combos]
        for label, combo in labelled:
            out.append(pytest.param(row, *combo, marks=marks, id="-".join(filter(None, [row.id, label]))))
    return out


# ---------------------------------------------------------------------------------------------------
# The reference model: a bare copy, the penalty added to its loss, the after-step operator by hand
# ---------------------------------------------------------------------------------------------------
TARGETS = ("a", "b", "c")  # the regularized modules of the loop suites' model, Net


class _Record:
    def __init__(self, into: List[Tensor]) -> None:
        self.into = into

    def __call__(self, module: nn.Module, args: Any, out: Any) -> None:
        out = out[0] if isinstance(out, tuple) else out
        if torch.is_grad_enabled() and out.requires_grad:
            self.into.append(out)


class Reference:
    """A bare deep copy of ``model`` (taken *before* torchreg is applied to ``model``) trained the
    plain-PyTorch way: :meth:`penalty` is the row's penalty as a loss term (the outputs of the targets'
    calls since the last :meth:`penalty` for activity rows; 0 for after-step rows, whose penalty acts
    through the operator), and :meth:`step` is ``optimizer.step()`` followed, for after-step rows, by
    the row's operator applied by hand to every covered weight the optimizer updated. ``row`` None: the
    bare model, no penalty. ``snapshot``: the covered weights' values when the rule was applied
    (default: ``model``'s now)."""

    def __init__(self, row: Optional[Row], model: nn.Module, targets: Sequence[str] = TARGETS,
                 snapshot: Optional[Mapping[str, Tensor]] = None) -> None:
        self.row, self.targets = row, tuple(targets)
        self.model = copy.deepcopy(model)
        for m in self.model.modules():  # a copy of another reference's model: drop its recorders
            for key in [k for k, h in m._forward_hooks.items() if isinstance(h, _Record)]:
                del m._forward_hooks[key]
        self.snapshot = dict(snapshot) if snapshot is not None else {
            key: w.detach().clone() for t in self.targets for key, w in covered_items(self.model, t)}
        self.outputs: Dict[str, List[Tensor]] = {name: [] for name in self.targets}
        if row is not None and row.activity is not None:
            for name in self.targets:
                self.model.get_submodule(name).register_forward_hook(_Record(self.outputs[name]))

    def fork(self, model: Optional[nn.Module] = None) -> "Reference":
        """A reference for a copy of the regularized model: a copy of this one's model (or ``model``),
        the same snapshot."""
        return Reference(self.row, self.model if model is None else model, self.targets, self.snapshot)

    def penalty(self) -> Tensor:
        row = self.row
        value = (torch.zeros(()) if row is None or row.after_step
                 else row.ref_penalty(self.model, self.outputs, self.snapshot))
        for outs in self.outputs.values():
            outs.clear()
        return value

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        optimizer.step()
        row = self.row
        if row is None or row.after_step is None:
            return
        with torch.no_grad():
            for t in self.targets:
                for key, w in covered_items(self.model, t):
                    if w.grad is None:  # torch.optim did not update it
                        continue
                    args = (w.detach().clone(), step_size(optimizer, w))
                    w.copy_(row.after_step(*args, self.snapshot[key].to(w)) if row.snapshot else row.after_step(*args))


def step_size(optimizer: torch.optim.Optimizer, p: Tensor) -> Any:
    """The step of the after-step operator for ``p`` after ``optimizer.step()``: SGD without momentum
    takes ``lr``; Adam ``lr / (sqrt(v) / sqrt(1 - beta2 ** t) + eps)`` per coordinate, from its state."""
    group = next(g for g in optimizer.param_groups if any(q is p for q in g["params"]))
    if type(optimizer) is torch.optim.SGD:
        assert group["momentum"] == 0
        return group["lr"]
    assert type(optimizer) is torch.optim.Adam and not group["amsgrad"]
    state = optimizer.state[p]
    t = float(state["step"])
    return group["lr"] / (state["exp_avg_sq"].sqrt() / math.sqrt(1 - group["betas"][1] ** t) + group["eps"])


OPTIMIZERS: Dict[str, Callable[..., torch.optim.Optimizer]] = {
    "SGD": lambda ps: torch.optim.SGD(ps, lr=0.1),
    "Adam": lambda ps: torch.optim.Adam(ps, lr=0.05),
}


# ---------------------------------------------------------------------------------------------------
# The layers of the exactness suite (``Row.layers`` names them)
# ---------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Layer:
    make: Callable[[], nn.Module]
    input_shape: Tuple[int, ...]
    vocab: int = 0  # > 0: the input is a tensor of indices below it

    def inputs(self, seed: int) -> Tensor:
        g = torch.Generator().manual_seed(seed)
        if self.vocab:
            return torch.randint(self.vocab, self.input_shape, generator=g)
        return torch.randn(self.input_shape, generator=g)

    @staticmethod
    def call(module: nn.Module, x: Tensor) -> Tensor:
        out = module(x)
        return out[0] if isinstance(out, tuple) else out  # LSTM: (output, (h, c))


LAYERS: Dict[str, Layer] = {
    "Linear": Layer(lambda: nn.Linear(5, 4), (6, 5)),
    "Conv2d": Layer(lambda: nn.Conv2d(2, 3, 3, padding=1), (4, 2, 5, 5)),
    "Embedding": Layer(lambda: nn.Embedding(10, 4), (3, 5), vocab=10),
    "LSTM": Layer(lambda: nn.LSTM(4, 5, batch_first=True), (3, 6, 4)),
}


# ---------------------------------------------------------------------------------------------------
# The model of the loop suites, and one training loop next to its reference
# ---------------------------------------------------------------------------------------------------
class Net(nn.Module):
    """Three Linear layers (all targets); ``ckpt`` checkpoints the middle one (``True``: reentrant)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 3)

    def _middle(self, h: Tensor) -> Tensor:
        return torch.tanh(self.b(h))

    def forward(self, x: Tensor, ckpt: Optional[bool] = None) -> Tensor:
        h = torch.tanh(self.a(x))
        if ckpt is None:
            h = self._middle(h)
        else:
            from torch.utils.checkpoint import checkpoint

            h = checkpoint(self._middle, h, use_reentrant=ckpt)
        return self.c(h)


def make_net(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net()


def readout(out: Tensor) -> Tensor:
    """A scalar loss with non-trivial gradients; a mean over rows, so equal micro-batches average to it."""
    return out.pow(2).mean() + out.mean()


def batch(n: int, seed: int, n_in: int = 6) -> Tensor:
    return torch.randn(n, n_in, generator=torch.Generator().manual_seed(1000 + seed))


def assert_same_params(actual: nn.Module, expected: nn.Module, **tolerances: Any) -> None:
    for (name, p), q in zip(actual.named_parameters(), expected.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), msg=lambda m: f"{name}: {m}", **tolerances)


def pair(row: Row, form: str = "wrapper", seed: int = 0) -> Tuple[Net, Reference]:
    """(the loop model regularized by ``row`` on every target, its reference taken before)."""
    model = make_net(seed)
    reference = Reference(row, model, TARGETS)
    row.regularize(model, TARGETS, form)
    return model, reference


assert all(set(row.layers) <= set(LAYERS) for row in TABLE), "a row names an unknown layer"


def train(model: nn.Module, ref: Reference, *, steps: int = 2, k: int = 1, scaler: Any = None,
          forward: Optional[Callable[[Tensor], Tensor]] = None, optimizer: str = "SGD", n: int = 12,
          seed: int = 0) -> None:
    """``steps`` optimizer steps of ``model`` next to ``ref``, checking gradients after every step's
    backward(s) (after ``scaler.unscale_``) and weights after every step.

    ``model`` runs ``k`` backwards of ``readout(forward(x_i)) / k`` over equal micro-batches (under
    ``scaler`` when given: ``scaler.scale(loss).backward()``, ``unscale_``, ``scaler.step``, ``update``);
    ``ref`` one backward of ``readout(ref(x)) + penalty`` on the full batch, then a plain step.
    """
    forward = model if forward is None else forward
    opt, ref_opt = OPTIMIZERS[optimizer](model.parameters()), OPTIMIZERS[optimizer](ref.model.parameters())
    for step in range(steps):
        x = batch(n, seed=seed + step).to(next(model.parameters()).dtype)
        opt.zero_grad()
        ref_opt.zero_grad()
        for xi in x.chunk(k):
            loss = readout(forward(xi)) / k
            (scaler.scale(loss) if scaler is not None else loss).backward()
        (readout(ref.model(x)) + ref.penalty()).backward()
        if scaler is not None:
            scaler.unscale_(opt)
        assert_same_grads(model, ref.model)
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        ref.step(ref_opt)
        assert_same_params(model, ref.model)


def assert_no_torchreg_state(model: nn.Module) -> None:
    """No hook on any parameter or module, and no attribute of torchreg's, anywhere in ``model``."""
    for name, p in model.named_parameters():
        assert not getattr(p, "_post_accumulate_grad_hooks", None), f"post-accumulate-grad hook left on {name}"
        assert not getattr(p, "_backward_hooks", None), f"tensor hook left on {name}"
    for name, m in model.named_modules():
        hooks = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
                 "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
                 "_load_state_dict_post_hooks")
        assert not [h for h in hooks if getattr(m, h, None)], f"{name!r}: {[h for h in hooks if getattr(m, h, None)]}"
        assert not [k for k in m.__dict__ if "torchreg" in k], f"{name!r}: {[k for k in m.__dict__ if 'torchreg' in k]}"
    with pytest.raises(ValueError, match="no torchreg regularization"):
        torchreg.remove_regularization(model)
