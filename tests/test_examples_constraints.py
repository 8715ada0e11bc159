"""Smoke test of examples/constraints.py (short run): each constraint holds after training, none without."""

import os
import pathlib
import subprocess
import sys

EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "constraints.py"


def test_constraints_example_runs_and_each_constraint_holds() -> None:
    root = str(EXAMPLE.parents[1])  # this checkout's torchreg, whatever is installed
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, str(EXAMPLE), "--steps", "60"], capture_output=True, text=True,
                          timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    rows = {}
    for line in done.stdout.splitlines():
        if line.rstrip().endswith(tuple("0123456789")) and "%" in line:
            name, values = line[:22].strip(), line[22:].split()
            rows[name] = dict(max=float(values[0]), min=float(values[1]), negative=float(values[2].rstrip("%")),
                              accuracy=float(values[3]))
    assert set(rows) == {"none", "MaxNorm(1.5)", "UnitNorm()", "MinMaxNorm(0.5, 2.0)", "NonNeg()", "L2 + MaxNorm"}, \
        done.stdout
    assert rows["none"]["max"] > 1.5 and rows["none"]["negative"] > 10, rows  # unconstrained: violated
    assert rows["MaxNorm(1.5)"]["max"] <= 1.5 + 1e-4 and rows["L2 + MaxNorm"]["max"] <= 1.5 + 1e-4, rows
    assert abs(rows["UnitNorm()"]["max"] - 1) < 1e-4 and abs(rows["UnitNorm()"]["min"] - 1) < 1e-4, rows
    assert rows["MinMaxNorm(0.5, 2.0)"]["max"] <= 2 + 1e-4 and rows["MinMaxNorm(0.5, 2.0)"]["min"] >= 0.5 - 1e-4
    assert rows["NonNeg()"]["negative"] == 0.0, rows
    assert all(row["accuracy"] > 0.5 for row in rows.values()), rows  # 10 classes: chance is 0.1
    assert "constraint, after each optimizer step" in done.stdout
