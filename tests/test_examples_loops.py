"""Smoke tests of the training-loop examples: each runs in a subprocess, exits 0, trains, and prints
gradients that match its plain-PyTorch reference."""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys
from typing import List

import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"
SUMMARY = re.compile(r"max \|grad - reference grad\| over all steps: (\S+)")
LOSS = re.compile(r"^step\s+\d+\s+loss (\S+)", re.MULTILINE)


#: A gloo worker sometimes dies at interpreter exit, after its work and destroy_process_group() are done:
#: "terminate called without an active exception" (SIGABRT), then torchrun exits 1. Seen with torchrun
#: on a loaded 2-core machine, 1 run in 5 to 15, also with a barrier before destroy_process_group();
#: not seen with mp.spawn (retried there too). A teardown race outside torchreg: a launch that fails
#: this way is retried, any other failure is not.
GLOO_EXIT_ABORT = "terminate called without an active exception"


def run(args: List[str], attempts: int = 1) -> str:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    for attempt in range(attempts):
        done = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=180,
                              cwd=EXAMPLES.parent, env=env)
        if done.returncode == 0 or GLOO_EXIT_ABORT not in done.stderr:
            break
    assert done.returncode == 0, f"exit {done.returncode}\nstdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    return done.stdout


def check_trained_and_exact(out: str, tolerance: float = 1e-5) -> None:
    match = SUMMARY.search(out)
    assert match, out
    assert float(match.group(1)) < tolerance, out
    losses = [float(v) for v in LOSS.findall(out) if v != "nan"]
    assert len(losses) >= 3, out
    assert losses[-1] < 0.5 * losses[0], f"the loss did not go down: {losses}"


def test_accumulation_example() -> None:
    out = run([str(EXAMPLES / "accumulation.py")])
    assert "4 micro-batches" in out, out
    check_trained_and_exact(out)


def test_amp_example() -> None:
    out = run([str(EXAMPLES / "amp.py")])
    check_trained_and_exact(out)
    assert re.search(r"step skipped .*scale (\d+) -> (\d+)", out), out  # the poisoned batch is skipped
    before, after = map(int, re.search(r"scale (\d+) -> (\d+)", out).groups())
    assert after == before // 2, out


@pytest.mark.parametrize("launcher", ["torchrun", "spawn"])
def test_ddp_example(launcher: str) -> None:
    script = str(EXAMPLES / "ddp.py")
    if launcher == "torchrun":
        out = run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", script], attempts=5)
    else:
        out = run([script], attempts=5)
    assert "world size 2" in out, out
    check_trained_and_exact(out)
    between = re.search(r"max \|grad - rank 0 grad\| over all steps: (\S+)", out)
    assert between and float(between.group(1)) == 0.0, out  # the ranks agree bit for bit
