"""Smoke test of examples/activity.py: a short run trains both autoencoders and prints their table."""

import os
import pathlib
import re
import subprocess
import sys

EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "activity.py"


def test_activity_example_runs_and_sparsifies_the_code(tmp_path):
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    done = subprocess.run([sys.executable, str(EXAMPLE), "--steps", "300", "--png", str(tmp_path / "codes.png")],
                          capture_output=True, text=True, timeout=180, env=env)
    assert done.returncode == 0, done.stderr
    rows = {m.group(1): (float(m.group(2)), float(m.group(3)), float(m.group(5)))
            for m in re.finditer(r"^(bare|ActivityL1)\s+([\d.]+)%\s+([\d.]+)\s+([\d.]+)%\s+([\d.]+)$",
                                 done.stdout, re.M)}
    assert set(rows) == {"bare", "ActivityL1"}, done.stdout
    # even after a short run, the L1 term makes the code much sparser, at a small reconstruction cost
    assert rows["ActivityL1"][0] > rows["bare"][0] + 50, done.stdout
    assert rows["ActivityL1"][1] < rows["bare"][1] / 4, done.stdout
    assert rows["ActivityL1"][2] < 0.01, done.stdout
    assert "ActivityL1(lam=0.003)" in done.stdout
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "matplotlib is not installed" in done.stdout
    else:
        assert (tmp_path / "codes.png").stat().st_size > 0
