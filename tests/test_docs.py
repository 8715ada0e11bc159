"""The documentation: its code runs, its site builds without a warning, the README keeps its promises.

- Every ```python block with ``>>>`` lines in ``docs/**/*.md`` runs as a doctest; the blocks of one page
  share a namespace, in page order (a page reads as one session). A page whose code imports Lightning
  or transformers is skipped where they are not installed.
- The site builds with the README's command (``sphinx -W``: a warning, such as a broken reference or a
  public name missing from the API reference, fails it).
- README.md stays short (at most 10 KB), every link in it resolves in the repository, and its test
  command is the one ``.ci/run`` runs.
"""

import doctest
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
README = ROOT / "README.md"
BUILD_COMMAND = "python3 -m sphinx -W --keep-going -b html docs docs/_build/html"
README_LIMIT = 10 * 1024

_FENCE = re.compile(r"^(`{3,})python[ \t]*\n(.*?)^\1[ \t]*$", re.MULTILINE | re.DOTALL)
# The optional packages a page's code may need, by what it imports.
_NEEDS = {
    "lightning": re.compile(r"\b(import lightning|from lightning|torchreg\.lightning|pytorch_lightning)\b"),
    "sklearn": re.compile(r"\b(import sklearn|from sklearn)\b"),
    "transformers": re.compile(r"\b(import transformers|from transformers|torchreg\.hf)\b"),
}


def doc_blocks(text):
    """``(line, code)`` of each ```python block with ``>>>`` lines, in page order."""
    return [
        (text.count("\n", 0, m.start()) + 2, m.group(2))
        for m in _FENCE.finditer(text)
        if re.search(r"^\s*>>>", m.group(2), re.MULTILINE)
    ]


def _pages():
    pages = sorted(p for p in DOCS.rglob("*.md") if "_build" not in p.parts)
    return [p for p in pages if doc_blocks(p.read_text(encoding="utf-8"))]


PAGES = _pages()


def test_pages_have_runnable_examples():
    # the collection below is not vacuous: the guide's pages carry examples
    names = {p.relative_to(DOCS).as_posix() for p in PAGES}
    assert {"getting-started.md", "guide/sparsity.md", "guide/rules.md"} <= names, names


@pytest.mark.parametrize("page", PAGES, ids=[p.relative_to(DOCS).as_posix() for p in PAGES])
def test_page_examples(page):
    text = page.read_text(encoding="utf-8")
    blocks = doc_blocks(text)
    code = "\n".join(block for _, block in blocks)
    for package, pattern in _NEEDS.items():
        if pattern.search(code) and importlib.util.find_spec(package) is None:
            pytest.skip(f"{page.name} needs {package}")
    import torch

    torch.manual_seed(0)
    globs = {"__name__": f"docs.{page.stem}"}
    parser = doctest.DocTestParser()
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    report = []
    name = page.relative_to(ROOT).as_posix()
    for line, block in blocks:
        test = parser.get_doctest(block, globs, f"{name}:{line}", str(page), line - 1)
        runner.run(test, out=report.append, clear_globs=False)
        globs = test.globs  # DocTest copies the namespace it is given: carry it to the next block
    result = runner.summarize(verbose=False)
    assert result.attempted > 0
    assert result.failed == 0, "".join(report)


def test_site_builds_without_warnings(tmp_path):
    if importlib.util.find_spec("sphinx") is None or importlib.util.find_spec("myst_parser") is None:
        if os.environ.get("CI"):
            pytest.fail("CI must build the docs: install the 'docs' extra (README's test command does)")
        pytest.skip("the 'docs' extra (sphinx, myst-parser, furo) is not installed")
    argv = BUILD_COMMAND.split()
    argv[:1] = [sys.executable]
    argv[-1] = str(tmp_path / "html")  # the README's command, into a fresh folder
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=600)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-6000:]
    assert "WARNING" not in output, output[-6000:]
    for page in ("index", "getting-started", "api", "troubleshooting", "design", "performance", "changelog"):
        assert (tmp_path / "html" / f"{page}.html").is_file(), page


def test_readme_is_short():
    size = README.stat().st_size
    assert size <= README_LIMIT, f"README.md is {size} bytes; keep it at most {README_LIMIT} (move detail to docs/)"


def _slug(heading):
    """GitHub's anchor for a Markdown heading (also MyST's, with myst_heading_anchors)."""
    text = heading.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(path):
    text = path.read_text(encoding="utf-8")
    text = re.sub(r"^(`{3,}).*?^\1", "", text, flags=re.MULTILINE | re.DOTALL)  # headings, not code
    return {_slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.*?)\s*#*\s*$", text, re.MULTILINE)}


def readme_links(text):
    text = re.sub(r"^(`{3,}).*?^\1", "", text, flags=re.MULTILINE | re.DOTALL)  # not in code blocks
    text = re.sub(r"`[^`\n]*`", "", text)
    inline = re.findall(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)", text)
    reference = re.findall(r"^\s*\[[^\]]+\]:\s*(\S+)", text, re.MULTILINE)
    return inline + reference


def test_readme_links_resolve():
    links = readme_links(README.read_text(encoding="utf-8"))
    assert len(links) >= 5, links  # it links into the docs
    bad = []
    for link in links:
        if re.match(r"[a-z][a-z0-9+.-]*:", link):
            bad.append(f"{link}: an external link (the README links only into the repository)")
            continue
        target, _, anchor = link.partition("#")
        path = (ROOT / target).resolve() if target else README
        if not path.exists():
            bad.append(f"{link}: no such file")
        elif anchor and path.suffix == ".md" and anchor not in _anchors(path):
            bad.append(f"{link}: no heading #{anchor} in {target or 'README.md'}")
    assert not bad, "\n".join(bad)


def test_readme_commands_are_the_ones_used():
    text = README.read_text(encoding="utf-8")
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").strip().splitlines()[-1].strip()
    assert ci.startswith("python3 -m pip install -c constraints.txt") and "pytest" in ci, ci
    assert ci in text, f"README.md must show .ci/run's test command: {ci}"
    assert '".[test,integrations,docs]"' in ci, "the test command installs the docs extra (CI builds the docs)"
    assert BUILD_COMMAND in text


def test_docs_pin_the_build_tools():
    pins = (ROOT / "constraints.txt").read_text(encoding="utf-8")
    for package in ("sphinx", "myst-parser", "furo"):
        assert re.search(rf"^{package}==\S+", pins, re.MULTILINE), package


def test_every_warning_has_a_troubleshooting_entry():
    # one "###" entry under "## Warnings" per warnings.warn call in the package: a new warning
    # without its entry (what it means, what to do) fails here
    sites = sum(p.read_text(encoding="utf-8").count("warnings.warn(") for p in (ROOT / "torchreg").rglob("*.py"))
    page = (DOCS / "troubleshooting.md").read_text(encoding="utf-8")
    section = page.split("\n## Warnings\n", 1)[1].split("\n## ", 1)[0]
    entries = re.findall(r"^### ", section, re.MULTILINE)
    assert sites > 0
    assert len(entries) == sites, (
        f"{sites} warnings.warn calls in torchreg/ but {len(entries)} entries under '## Warnings' in "
        "docs/troubleshooting.md: give each warning an entry"
    )


def test_table_cells_escape_pipes_in_code():
    # In a Markdown table a '|' ends the cell even inside `code` (GitHub and MyST alike): `|w|` in a
    # cell cuts the row. Write `\|w\|`.
    bad = []
    for path in [README, ROOT / "benchmarks" / "README.md", *sorted(DOCS.rglob("*.md"))]:
        if "_build" in path.parts:
            continue
        text = re.sub(r"^(`{3,}).*?^\1", "", path.read_text(encoding="utf-8"), flags=re.MULTILINE | re.DOTALL)
        for line in text.splitlines():
            if line.startswith("|") and any(re.search(r"(?<!\\)\|", code) for code in line.split("`")[1::2]):
                bad.append(f"{path.relative_to(ROOT)}: {line[:80]}")
    assert not bad, "\n".join(bad)
