"""A Sphinx extension: every public name must have an entry in the API reference.

For each module in ``api_coverage_modules``, each name of its ``__all__`` must be documented as a
Python object under the module's public path (``.. autoclass:: torchreg.L1`` documents
``torchreg.L1``). A missing one is a warning, so ``sphinx -W`` fails the build: a new public name
cannot land without its reference entry.
"""

import importlib

from sphinx.ext.autodoc.mock import mock
from sphinx.util import logging

logger = logging.getLogger(__name__)

MODULES = ("torchreg", "torchreg.lightning", "torchreg.hf")


def _public_names(app, modname):
    """The module's ``__all__``, imported with the frameworks autodoc mocks (if any)."""
    with mock(app.config.autodoc_mock_imports):
        module = importlib.import_module(modname)
    names = getattr(module, "__all__", None)
    if names is None:
        raise ValueError(f"{modname} has no __all__")
    return list(names)


def missing_entries(app, env):
    """The public names of ``api_coverage_modules`` that the built reference does not document."""
    documented = {name for name, *_ in env.get_domain("py").get_objects()}
    missing = []
    for modname in app.config.api_coverage_modules:
        for name in _public_names(app, modname):
            if f"{modname}.{name}" not in documented:
                missing.append(f"{modname}.{name}")
    return missing


def _check(app, env):
    for full in missing_entries(app, env):
        logger.warning(
            "%s is public (in %s.__all__) but has no entry in the API reference: add it to "
            "docs/api.md (an autoclass / autofunction / autodata line)",
            full, full.rsplit(".", 1)[0], type="api_coverage", subtype="missing",
        )


# -- references to inherited members -----------------------------------------------------------
# A docstring of L1 that says :meth:`apply` means the apply L1 inherits from Regularizer, which the
# reference documents once, on Regularizer. Resolve such a reference through the class's bases, to
# the entry of the first base the reference documents that has the member.


def _object(path):
    module, _, rest = path.partition(".")
    obj = importlib.import_module(module)
    parts = rest.split(".") if rest else []
    name = module
    for part in parts:
        try:
            obj = getattr(obj, part)
        except AttributeError:
            name = f"{name}.{part}"
            obj = importlib.import_module(name)
        else:
            name = f"{name}.{part}"
    return obj


def _documented_classes(app, env):
    classes = {}
    for name, _dispname, objtype, *_ in env.get_domain("py").get_objects():
        if objtype == "class":
            try:
                with mock(app.config.autodoc_mock_imports):
                    classes.setdefault(_object(name), name)
            except Exception:  # pragma: no cover - an entry that does not import is autodoc's warning
                continue
    return classes


def _resolve_inherited(app, env, node, contnode):
    if node.get("refdomain") != "py" or node.get("reftype") not in ("meth", "attr", "obj"):
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
    for base in cls.__mro__[1:]:
        entry = classes.get(base)
        if entry and f"{entry}.{target}" in documented:
            return py.resolve_xref(env, node["refdoc"], app.builder, node["reftype"],
                                   f"{entry}.{target}", node, contnode)
    return None


def setup(app):
    app.add_config_value("api_coverage_modules", MODULES, "env")
    app.connect("env-check-consistency", _check)
    app.connect("missing-reference", _resolve_inherited)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
