"""Smoke test of the main example: it runs, prints its table, and L1 makes the first layer sparse."""

import os
import pathlib
import subprocess
import sys

EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "quickstart.py"


def test_quickstart_runs_and_l1_sparsifies():
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")  # a tiny model: more threads only add overhead on a busy machine
    done = subprocess.run([sys.executable, str(EXAMPLE)], capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr
    rows = {line.split()[0]: line.split() for line in done.stdout.splitlines() if line.split()}
    assert {"bare", "L1", "L2", "ElasticNet"} <= rows.keys(), done.stdout
    near_zero = {k: float(rows[k][2].rstrip("%")) for k in ("bare", "L1", "L2", "ElasticNet")}
    penalty = {k: float(rows[k][5]) for k in ("bare", "L1", "L2", "ElasticNet")}
    assert near_zero["L1"] > near_zero["bare"] + 50, near_zero  # most useless inputs switched off
    assert near_zero["ElasticNet"] > near_zero["bare"] + 50, near_zero
    assert penalty["bare"] == 0.0 and min(penalty["L1"], penalty["L2"], penalty["ElasticNet"]) > 0
