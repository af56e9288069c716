"""Distributed faults: ``torchrun --nproc-per-node 2 --max-restarts 1`` where rank 1 crashes once mid-epoch.
torchrun stops the other rank and starts both again; the restarted run notices it was restarted
(``TORCHELASTIC_RESTART_COUNT``), resumes from its newest checkpoint and ends with exactly the weights
and step losses of an uninterrupted 2-process run (CPU, gloo). And SIGTERM to torchrun stops both ranks
after the same step, with one checkpoint."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_interruptions import assert_same_run

import fault_hooks
from builders import assert_default_path, default_train_argv, requires_native_bf16, train_argv
from transferlab.training.checkpoint import verify_checkpoint

REPO = Path(__file__).resolve().parents[2]
#: 24 fit images, 2 ranks x batch 2: 6 steps per epoch; step 9 is inside epoch 2, after step-8's checkpoint.
ARGS = ("--strategy", "bn-only", "--batch-size", "2", "--epochs", "2", "--checkpoint-every", "2", "--lr", "3e-3")


def _torchrun_cmd(argv: list[str], *extra: str) -> list[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    return [*cmd, "--monitor-interval", "0.1", *extra, "-m", "transferlab", "train", *argv]


def _torchrun(argv: list[str], env: dict[str, str], *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(_torchrun_cmd(argv, *extra), env=env, cwd=REPO, capture_output=True, text=True, timeout=240)


@pytest.mark.slow
@requires_native_bf16
def test_restart_after_a_rank_crash_resumes_exactly(train_ds: Path, tmp_path: Path) -> None:
    """On the default path (Lite0, bf16 + channels_last + the swapped kernels on this CPU), under DDP."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}  # CPU and gloo, even on a GPU machine
    ref = tmp_path / "ref"
    res = _torchrun(default_train_argv(train_ds, ref, *ARGS)[1:], env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert_default_path(res.stderr, ref)

    run = tmp_path / "crashed"
    marker = tmp_path / "crashed-once"
    crash = fault_hooks.env("crash", f"9:1:{marker}", env)
    res = _torchrun(default_train_argv(train_ds, run, *ARGS)[1:], crash, "--max-restarts", "1")
    assert res.returncode == 0, res.stderr[-3000:]
    assert marker.exists(), "rank 1 never crashed"
    assert "crashing at step 9 on rank 1" in res.stderr
    assert "restarted by torchrun (restart 1): resuming" in res.stderr
    assert "resuming from" in res.stderr and "step-00000008" in res.stderr
    assert_same_run(ref, run)


@pytest.mark.slow
def test_sigterm_to_torchrun_stops_every_rank_after_the_same_step(train_ds: Path, in1k32: Path, tmp_path: Path) -> None:
    """torchrun's agent passes SIGTERM on to every rank; the ranks agree (one all-reduce per step) on the
    step to stop after, so rank 0 writes one checkpoint that both were at. Resuming it is exact: the restart
    test above resumes the same kind of mid-epoch checkpoint."""
    run = tmp_path / "run"
    argv = train_argv(train_ds, in1k32, run, *ARGS)[1:]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.Popen(_torchrun_cmd(argv), env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not (run / "checkpoints" / "step-00000004.json").exists():
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, err_bytes = proc.communicate(timeout=120)
    err = err_bytes.decode()
    assert not (run / "metrics.json").exists(), "the run finished before the signal arrived"
    steps = re.findall(r"stopped by SIGTERM after step (\d+) \(epoch \d\); wrote the checkpoint (\S+)\.", err)
    assert len(steps) == 2 and steps[0] == steps[1], err[-3000:]  # both ranks, the same step and checkpoint
    written = Path(steps[0][1])
    assert verify_checkpoint(written.parent, written.name)["state"]["step"] == int(steps[0][0])
