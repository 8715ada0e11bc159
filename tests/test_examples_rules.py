"""Smoke test of examples/rules.py: it runs, trains, and prints the summary of what its rules did."""

import os
import pathlib
import re
import subprocess
import sys

EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "rules.py"


def test_rules_example_runs_and_prints_summary():
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")  # a small model: threads only add overhead on a busy machine
    done = subprocess.run([sys.executable, str(EXAMPLE)], capture_output=True, text=True, timeout=180, env=env)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    rows = {line.split()[0]: line for line in out.splitlines() if line.strip()}
    # the summary table: its header and one row per rule kind the example uses
    assert rows.get("module", "").split()[:4] == ["module", "type", "rule", "regularizer"], out
    assert "rule #1 'stem'" in rows["stem"] and "excluded" in rows["stem"], out  # the exclusion
    assert "stem.0" not in rows, out                                              # with its submodules
    assert "rule #2 'layer*.shortcut.0'" in rows["layer2.shortcut.0"], out        # the name pattern
    assert "rule #3 Conv2d" in rows["layer1.conv1"] and "L2(lam=0.0005)" in rows["layer1.conv1"], out
    assert "rule #4 Linear" in rows["fc"] and "L1(lam=0.0001)" in rows["fc"], out  # the partial
    total = re.search(r"total: (\d+) regularized elements, penalty ([\d.e+-]+)", out)
    assert total and int(total.group(1)) > 0 and float(total.group(2)) > 0, out
    printed = re.search(r"^penalty: ([\d.e+-]+)$", out, re.M)
    assert printed and float(printed.group(1)) > 0, out
