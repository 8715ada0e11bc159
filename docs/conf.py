"""Sphinx configuration of torchreg's documentation site.

Build (from the repository root; warnings are errors):

    python -m sphinx -W --keep-going -b html docs docs/_build/html
"""

import importlib.util
import os
import sys

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, ROOT)  # document this checkout's torchreg, not another installed copy
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "_ext"))

import torchreg  # noqa: E402

project = "torchreg"
author = "the torchreg authors"
copyright = "the torchreg authors"
release = torchreg.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
    "api_coverage",  # docs/_ext/api_coverage.py: every public name must be in the reference
]

source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build"]
templates_path = []

# MyST: ```{directive} fences, $...$ maths, heading anchors for [text](page.md#anchor) links.
myst_enable_extensions = ["colon_fence", "dollarmath", "deflist"]
myst_heading_anchors = 3

# API reference: Google-style docstrings, members in source order, signatures with type hints.
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autosummary_generate = False

# The integrations import their frameworks at import time. The test command installs them; a build
# without them documents the integrations from mocked frameworks instead of failing to import.
autodoc_mock_imports = [
    name
    for name in ("lightning", "pytorch_lightning", "transformers", "accelerate")
    if importlib.util.find_spec(name) is None
]

# A reference that does not resolve is a warning, and -W makes it an error. Names from other
# projects (torch, typing, the frameworks) are not in this site's inventory: no intersphinx, since
# the build must work offline.
nitpicky = True
nitpick_ignore_regex = [
    (r"py:.*", r"(torch|lightning|pytorch_lightning|transformers|accelerate|typing|collections|weakref|functools)(\..*)?"),
    (r"py:.*", r"(Tensor|Module|Parameter|Optimizer|GradScaler|nn\..*|optional|callable|iterable)"),
    (r"py:.*", r"(M|RuleKey|RuleValue|Types|Any|Callable|Dict|List|Mapping|Optional|Sequence|Tuple|Union)"),
    (r"py:.*", r"(int|float|bool|str|dict|list|tuple|type|None|object)"),
    # The type variable of "returns the module it was given" signatures (bound to nn.Module).
    (r"py:class", r"torchreg(\.\w+)*\.M"),
    # Private names (a leading underscore: a private module, class or method) are not in the
    # reference by design; a docstring that names one is shown as code.
    (r"py:.*", r"(.*\.)?_[A-Za-z]\w*(\..*)?"),
]

highlight_language = "text"  # a fence without a language is shown as is

html_theme = "furo"
html_title = f"torchreg {release}"
html_static_path = []
html_show_sourcelink = False
