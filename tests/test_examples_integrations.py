"""Smoke tests of examples/lightning_train.py and examples/hf_train.py, which the docs show verbatim.

The examples run in this process (``runpy``, as ``__main__``), sharing the imports of the
integration tests; each must train and print the summary of what its rules regularized.
"""

import pathlib
import re
import runpy
import warnings

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


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


@pytest.mark.parametrize("name", ["lightning_train.py", "hf_train.py"])
def test_docs_show_the_examples_verbatim(name):
    """The integrations guide page shows each example by including the file itself, so the page
    cannot drift from the code that runs here."""
    page = (ROOT / "docs" / "guide" / "integrations.md").read_text()
    assert f"```{{literalinclude}} ../../examples/{name}\n" in page
    assert (ROOT / "examples" / name).is_file()
