"""What every torchreg rule shares: the module-or-rule call, ``apply``, repr, copy and the registry.

Each public rule class (``L1``, ``MaxNorm``, ...) is used two ways. Called with a module, it applies
itself to that module in place and returns the same module object (as ``torch.nn.utils.spectral_norm``
does). Called without one, it returns a rule for :func:`torchreg.apply_regularization` that can also
be applied later with :meth:`Rule.apply`. A subclass says which options may be given by position
(``_positional``), validates its options in ``__init__``, gives them back in :meth:`Rule._kwargs`, and
says how it attaches to the parameters it selected (:meth:`Rule._attach`); nothing else.
"""

from __future__ import annotations

import inspect
import numbers
from typing import Any, Dict, List, Tuple, TypeVar

from torch import Tensor, nn

from . import _registry
from ._select import Selection, check_selection, describe_selection, select
from ._validate import check_hookable, describe

__all__ = ["NO_MODULE", "Rule"]

M = TypeVar("M", bound=nn.Module)

#: "No module given" (``None`` given as the module is an error, not a rule).
NO_MODULE: Any = object()


class Rule:
    """Base of every torchreg rule (:class:`torchreg.Regularizer`, :class:`torchreg.Constraint`)."""

    #: The options that may be given by position after the module (``L1(layer, 1e-4)``).
    _positional: Tuple[str, ...] = ()
    #: The attribute holding the parameter selection (``None``: the default weights).
    params: Selection = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "_base" not in cls.__dict__:  # a base class (Regularizer, Constraint) sets _base = True
            _registry.register_rule(cls)
        # help(torchreg.L1) and inspect.signature show the wrapper form, L1(module, lam, *, ...); leaving
        # the module out makes a rule (the class docstrings say so).
        init = cls._init_signature = inspect.signature(cls.__init__)
        plain = [p.replace(annotation=inspect.Parameter.empty) for p in list(init.parameters.values())[1:]]
        module = inspect.Parameter("module", inspect.Parameter.POSITIONAL_OR_KEYWORD)
        cls.__signature__ = init.replace(parameters=[module] + plain, return_annotation=inspect.Signature.empty)

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        if "_base" in cls.__dict__:
            raise TypeError(f"{cls.__name__} is a base class; use torchreg's "
                            f"{', '.join(_registry.rule_names(cls))}, or subclass it")
        module, args, kwargs = cls._split_module(args, kwargs)
        if module is NO_MODULE:
            cls._check_call(args, kwargs)
            return super().__new__(cls)
        if isinstance(module, Tensor):
            raise TypeError(
                f"torchreg.{cls.__name__} regularizes the parameters of a module: pass the module that owns this "
                f"{type(module).__name__} of shape {tuple(module.shape)}, e.g. torchreg.{cls.__name__}(layer, ...), "
                "and choose among its parameters with params= (e.g. params='weight' or params=['weight', 'bias'])"
            )
        if isinstance(module, numbers.Number) and not isinstance(module, bool):  # L1(1e-4, True): one too many
            cls._check_call((module,) + args, kwargs)
        if module is None:
            raise TypeError(
                f"torchreg.{cls.__name__} expects an nn.Module instance as its module, got None; leave the module "
                f"out to make a rule: torchreg.{cls.__name__}({', '.join(cls._positional)})"
            )
        check_hookable(module, f"torchreg.{cls.__name__}")
        return cls(*args, **kwargs).apply(module)

    @classmethod
    def _split_module(cls, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Tuple[Any, tuple, Dict[str, Any]]:
        """``(module, args, kwargs)`` of a call ``cls(*args, **kwargs)``, the module taken out of them
        (:data:`NO_MODULE` when the call makes a rule). The first positional argument is the module when
        it is one (or a module class), or when there are more positional arguments than positional options
        left for them (``L1(None, 0.1)``, ``L1(None, lam=0.1)``). Raises ``TypeError`` for two modules."""
        kwargs = dict(kwargs)
        module = kwargs.pop("module", NO_MODULE)
        free = len(cls._positional) - sum(name in kwargs for name in cls._positional)
        if args and (
            isinstance(args[0], nn.Module) or len(args) > free
            or (isinstance(args[0], type) and issubclass(args[0], nn.Module))
        ):
            if module is not NO_MODULE:
                raise TypeError(
                    f"torchreg.{cls.__name__} got two modules: {describe(args[0])} as the first argument and "
                    f"{describe(module)} as module=; give one"
                )
            module, args = args[0], args[1:]
        return module, tuple(args), kwargs

    @classmethod
    def _check_call(cls, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> None:
        """Raise ``TypeError`` naming the class (not a private base's ``__init__``) and what it takes when
        ``cls(*args, **kwargs)`` does not fit its constructor."""
        init = cls._init_signature  # (read once per class, in __init_subclass__)
        try:
            init.bind(None, *args, **kwargs)
            return
        except TypeError as error:
            problem = str(error)
        names = list(init.parameters)[1:]
        takes = str(cls.__signature__)
        unknown = [k for k in kwargs if k not in names]
        if unknown:
            hint = cls._hint(unknown[0])
            raise TypeError(
                f"torchreg.{cls.__name__} got an unexpected keyword argument {unknown[0]!r}{hint}; it takes "
                f"torchreg.{cls.__name__}{takes}"
            )
        if len(args) > len(cls._positional):
            extra = ", ".join(map(repr, args[len(cls._positional):]))
            raise TypeError(
                f"torchreg.{cls.__name__} takes {' and '.join(cls._positional) or 'no option'} by position after "
                f"the module, and its other options as keywords; got the extra positional argument(s) {extra}. It "
                f"takes torchreg.{cls.__name__}{takes}"
            )
        raise TypeError(f"torchreg.{cls.__name__}: {problem}; it takes torchreg.{cls.__name__}{takes}")

    @classmethod
    def _hint(cls, keyword: str) -> str:
        """A hint for an unknown keyword (a subclass may say more, e.g. ElasticNet for ``lam``)."""
        if keyword == "proximal":
            return f" ({cls.__name__} has no proximal mode)"
        if keyword in ("lam", "l1", "l2", "alpha", "factor", "strength") and cls._positional:
            return f" (the strengths of {cls.__name__} are {' and '.join(f'{s}=' for s in cls._positional)})"
        return ""

    def __reduce_ex__(self, protocol: Any) -> Any:
        # Copies and pickles restore the attributes as they are (a rule may hold tensors), without
        # calling the constructor (whose checks want its arguments).
        return (_new_empty, (type(self),), dict(self.__dict__))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError(
            f"a torchreg rule is not called on a module as a Keras regularizer is: apply it with "
            f"{self!r}.apply(module), give the module first (torchreg.{type(self).__name__}(module, ...)), or "
            "pass the rule to torchreg.apply_regularization(model, {...})"
        )

    # -- use ------------------------------------------------------------------------------------
    def apply(self, module: M) -> M:
        """Apply this rule to ``module`` in place and return the same module.

        All parameters of ``module`` and its submodules that the rule selects are covered, as one
        unit: whenever a backward reaches any of them, each gets its gradient term once.

        Raises:
            TypeError: ``module`` is not an ``nn.Module`` instance.
            ValueError: the selection matches no parameter, or a parameter is covered already.
        """
        check_hookable(module, f"{type(self).__name__}.apply")
        chosen = select(module, self.params, recurse=True)
        if not chosen:
            raise ValueError(
                f"{self!r} selects no parameter of {type(module).__name__} (selection: "
                f"{describe_selection(self.params)}; its parameters: "
                f"{[name for name, _ in module.named_parameters()]})"
            )
        self._attach(module, chosen)
        return module

    def _attach(self, module: nn.Module, chosen: List[Tuple[str, Tensor]]) -> None:
        """Cover the ``(name, parameter)`` pairs ``chosen`` in ``module``; raise before changing anything."""
        raise NotImplementedError

    # -- plumbing ---------------------------------------------------------------------------------
    def _init_selection(self, params: Selection) -> None:
        self.params = check_selection(params)

    def _kwargs(self) -> Dict[str, Any]:
        """The constructor arguments that rebuild this rule (repr, the config format)."""
        kwargs = {name: getattr(self, name) for name in self._positional}
        if self.params is not None:
            kwargs["params"] = self.params
        return kwargs

    def __repr__(self) -> str:
        """The constructor call that rebuilds this rule; a predicate ``params`` (no source to show) reads
        ``params=<predicate NAME>``, which is plainly not code."""
        kwargs = self._kwargs()
        if "params" in kwargs:
            kwargs["params"] = _SelectionRepr(self.params)
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in kwargs.items())})"


def _new_empty(cls: type) -> Any:
    return object.__new__(cls)


class _SelectionRepr:
    """``params`` in a repr: one pattern as a string, several as a list, a predicate by its name."""

    def __init__(self, params: Selection) -> None:
        self.params = params

    def __repr__(self) -> str:
        params = self.params
        if callable(params):
            return f"<predicate {describe_selection(params)}>"
        return repr(params[0]) if len(params) == 1 else repr(list(params))
