"""A Sphinx extension: every public name must have an entry in the API reference.

The public names are the ``__all__`` of ``torchreg``, ``torchreg.lightning``, ``torchreg.hf`` and of
every other public module of the package (a module whose name does not start with ``_``). Each must
be documented as a Python object, under its public path (``.. autoclass:: torchreg.L1``) or as the
same object under another path (``torchreg.walker.apply_regularization`` is documented by
``torchreg.apply_regularization``). A missing one is a warning, so ``sphinx -W`` fails the build: a
new public name cannot land without its reference entry.
"""

import importlib
import pkgutil

from sphinx.ext.autodoc.mock import mock
from sphinx.util import logging

logger = logging.getLogger(__name__)

MODULES = ("torchreg", "torchreg.lightning", "torchreg.hf")


def _import(app, modname):
    with mock(app.config.autodoc_mock_imports):
        return importlib.import_module(modname)


def public_modules(app):
    """``api_coverage_modules`` and every public module of the ``torchreg`` package."""
    names = list(app.config.api_coverage_modules)
    package = _import(app, "torchreg")
    for info in pkgutil.iter_modules(package.__path__):
        name = f"torchreg.{info.name}"
        if not info.name.startswith("_") and name not in names:
            names.append(name)
    return names


def missing_entries(app, env):
    """The public names (``module.name``) that the built reference does not document."""
    documented = {name for name, *_ in env.get_domain("py").get_objects()}
    objects = set()
    for name in documented:
        try:
            with mock(app.config.autodoc_mock_imports):
                objects.add(id(_object(name)))
        except Exception:  # an entry that does not import is autodoc's own warning
            continue
    missing = []
    for modname in public_modules(app):
        module = _import(app, modname)
        names = getattr(module, "__all__", None)
        if names is None:
            missing.append(f"{modname}.__all__")
            continue
        for name in names:
            if f"{modname}.{name}" in documented:
                continue
            if not isinstance(getattr(module, name, None), (str, int, float, tuple)) and id(getattr(module, name, None)) in objects:
                continue
            missing.append(f"{modname}.{name}")
    return missing


def _check(app, env):
    for full in missing_entries(app, env):
        if full.endswith(".__all__"):
            logger.warning("%s has no __all__: a public module lists its public names", full[: -len(".__all__")],
                           type="api_coverage", subtype="missing")
            continue
        logger.warning(
            "%s is public (in %s.__all__) but has no entry in the API reference: add it to "
            "docs/api.md (an autoclass / autofunction / autodata line)",
            full, full.rsplit(".", 1)[0], type="api_coverage", subtype="missing",
        )


# -- references written relative to a docstring's own class and module ----------------------------
# A docstring of L1 that says :meth:`apply` means the apply L1 inherits, which the reference documents
# once, on its documented base class; a docstring of Regularizer that says :func:`strength` means the
# strength of the module the class is defined in (torchreg.regularizers), though the class is
# documented as torchreg.Regularizer. Resolve such a reference through the class's bases, then the
# class's own module.


def _object(path):
    module, _, rest = path.partition(".")
    obj = importlib.import_module(module)
    name = module
    for part in rest.split(".") if rest else []:
        name = f"{name}.{part}"
        try:
            obj = getattr(obj, part)
        except AttributeError:
            obj = importlib.import_module(name)
    return obj


def _documented_classes(app, env):
    classes = {}
    for name, _dispname, objtype, *_ in env.get_domain("py").get_objects():
        if objtype == "class":
            try:
                with mock(app.config.autodoc_mock_imports):
                    classes.setdefault(_object(name), name)
            except Exception:  # an entry that does not import is autodoc's own warning
                continue
    return classes


def _resolve_relative(app, env, node, contnode):
    if node.get("refdomain") != "py":
        return None
    target, cls_name, mod_name = node["reftarget"], node.get("py:class"), node.get("py:module")
    if not cls_name or not mod_name or "." in target:
        return None
    try:
        with mock(app.config.autodoc_mock_imports):
            cls = _object(f"{mod_name}.{cls_name}")
    except Exception:
        return None
    if not isinstance(cls, type):
        return None
    py = env.get_domain("py")
    documented = {name for name, *_ in py.get_objects()}
    classes = _documented_classes(app, env)
    candidates = [f"{classes[base]}.{target}" for base in cls.__mro__[1:] if base in classes]
    candidates.append(f"{cls.__module__}.{target}")
    for candidate in candidates:
        if candidate in documented:
            return py.resolve_xref(env, node["refdoc"], app.builder, node["reftype"], candidate, node, contnode)
    return None


def setup(app):
    app.add_config_value("api_coverage_modules", MODULES, "env")
    app.connect("env-check-consistency", _check)
    app.connect("missing-reference", _resolve_relative)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
