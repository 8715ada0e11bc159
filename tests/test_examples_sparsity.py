"""Smoke test of examples/sparsity.py (short run): proximal variants make exact zeros, the gradient one none."""

import importlib.util
import os
import pathlib
import subprocess
import sys

EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "sparsity.py"


def test_sparsity_example_runs_and_prox_makes_exact_zeros(tmp_path: pathlib.Path) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    png = tmp_path / "weights.png"
    done = subprocess.run([sys.executable, str(EXAMPLE), "--steps", "300", "--png", str(png)],
                          capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr
    rows = {}
    for line in done.stdout.splitlines():
        if "%" in line and " of " in line:
            name, rest = line[:19].strip(), line[19:].split()
            rows[name] = dict(zeros=float(rest[0].rstrip("%")), zero_inputs=int(rest[1]), kept=int(rest[5]),
                              ms=float(rest[-1]))
    assert set(rows) == {"bare", "L1 (gradient)", "L1 (proximal)", "ElasticNet (prox.)", "GroupLasso (prox.)"}, done.stdout
    assert rows["bare"]["zeros"] == 0 and rows["L1 (gradient)"]["zeros"] == 0  # a sign gradient makes no zero
    for name in ("L1 (proximal)", "ElasticNet (prox.)"):
        assert rows[name]["zeros"] > 50, rows
    assert rows["GroupLasso (prox.)"]["zero_inputs"] > 5, rows
    assert all(row["kept"] == 5 for row in rows.values()), rows  # no informative input is dropped
    assert "zero_groups" in done.stdout and "GroupLasso(lam=0.2, dim=1, proximal=True)" in done.stdout
    if importlib.util.find_spec("matplotlib") is not None:
        assert png.stat().st_size > 0
    else:
        assert not png.exists()
