"""Smoke tests of examples/lightning_train.py and examples/hf_train.py, which README shows verbatim.

The examples run in this process (``runpy``, as ``__main__``), sharing the imports of the
integration tests; each must train and print the summary of what its rules regularized.
"""

import pathlib
import re
import runpy
import warnings

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SECTION = "## Training with Lightning / Hugging Face"


def run_example(name, capsys):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        namespace = runpy.run_path(str(ROOT / "examples" / name), run_name="__main__")
    return namespace, capsys.readouterr().out


def test_lightning_example(capsys):
    pytest.importorskip("lightning.pytorch")
    ns, out = run_example("lightning_train.py", capsys)
    assert ns["trainer"].global_step == 2 * 2                   # 8 batches / 4 accumulated, 2 epochs
    assert [u.accumulation_steps for u in __import__("torchreg")._engine.units_in(ns["model"])] == [4]
    rows = [line.split() for line in out.splitlines()]
    assert ["net.0", "Linear", "rule", "#1", "Linear", "L1(lam=0.0001)", "weight", "2048"] in [r[:8] for r in rows]
    assert ["net.3", "Linear", "rule", "#1", "Linear", "L1(lam=0.0001)", "weight", "64"] in [r[:8] for r in rows]
    assert re.search(r"total: 2112 regularized elements, penalty [\d.e+-]+", out), out


def test_hf_example(capsys):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    ns, out = run_example("hf_train.py", capsys)
    assert ns["trainer"].state.global_step == 2 * 2             # 8 batches / 4 accumulated, 2 epochs
    regularized = [line.split()[0] for line in out.splitlines() if "rule #1 (Linear, Conv1D)" in line]
    assert regularized == [f"transformer.h.{i}.{p}" for i in range(2)
                           for p in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")] + ["lm_head"], out
    groups = ns["optimizer"].param_groups
    assert [g["weight_decay"] for g in groups] == [0.01, 0.0]


def readme_blocks():
    text = (ROOT / "README.md").read_text()
    if SECTION not in text:
        pytest.skip(f"README has no {SECTION!r} section yet (it is pasted from notes/i10.md at merge)")
    section = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(# examples/[\w.]+\n.*?)```", section, re.S)


@pytest.mark.parametrize("name", ["lightning_train.py", "hf_train.py"])
def test_readme_shows_the_examples_verbatim(name):
    """Every README python block that starts with '# examples/<file>' is that file, byte for byte
    (after the marker line and the file's module docstring)."""
    blocks = {b.split("\n", 1)[0][2:]: b.split("\n", 1)[1] for b in readme_blocks()}
    assert f"examples/{name}" in blocks, sorted(blocks)
    source = (ROOT / "examples" / name).read_text()
    body = source.split('"""', 2)[2].lstrip("\n")              # the code after the module docstring
    assert blocks[f"examples/{name}"] == body
