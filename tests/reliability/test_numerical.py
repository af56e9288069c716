"""Numerical faults: a NaN/inf loss or gradient stops training before the optimizer step, names the step,
exits non-zero and leaves the last good checkpoint as it was; under 2-process DDP a NaN on one rank stops
both ranks at the same step, and nothing hangs.

A NaN at a chosen step cannot be produced reliably from the outside (a huge learning rate diverges at some
step or never), so the loop's test hooks inject one (``TRANSFERLAB_TEST_NAN_AT_STEP``, see
``transferlab.training.loop._test_faults``)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from builders import assert_default_path, default_train_argv, train_argv
from transferlab.cli import main
from transferlab.runtime import cpu_has_bf16
from transferlab.training.checkpoint import latest_checkpoint, load_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")
REPO = Path(__file__).resolve().parents[2]
#: 24 fit images at batch 6: 4 steps per epoch in one process, 2 per epoch under 2-process DDP.
ARGS = ("--strategy", "bn-only", "--epochs", "3", "--checkpoint-every", "1", "--keep-checkpoints", "50")
ARGS += ("--device", "cpu")


def _assert_last_good_checkpoint(run: Path, step: int) -> None:
    """The newest complete checkpoint is the one before the bad step; it loads and every weight is finite."""
    ckpts = run / "checkpoints"
    name = latest_checkpoint(ckpts, prefix="")
    assert name is not None
    ck = load_checkpoint(ckpts, name, restore_rng=False)
    assert ck.state["step"] == step - 1
    assert all(torch.isfinite(t).all() for t in ck.model_state.values() if t.is_floating_point())
    assert not (ckpts / f"step-{step:08d}.json").exists()
    assert not (run / "metrics.json").exists() and not (run / ".lock").exists()


@pytest.mark.parametrize("path", ["default", "fp32"])
@pytest.mark.parametrize(
    ("hook", "message"),
    [
        ("TRANSFERLAB_TEST_NAN_AT_STEP", "the loss became nan at step 7 (epoch 2); stopped before the optimizer"),
        ("TRANSFERLAB_TEST_NAN_GRAD_AT_STEP", "the gradient norm became nan at step 7; stopped before the optimizer"),
    ],
    ids=["loss", "gradient"],
)
def test_nan_stops_before_the_optimizer_step(
    hook: str,
    message: str,
    path: str,
    train_ds: Path,
    in1k32: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``default``: Lite0 on the precision users get (bf16 + channels_last + the swapped kernels on this CPU);
    ``fp32``: test_resnet in fp32."""
    if path == "default" and not cpu_has_bf16():
        pytest.skip("this CPU has no native bf16: the default path is the fp32 one")
    monkeypatch.setenv(hook, "7")
    run = tmp_path / "run"
    argv = default_train_argv(train_ds, run, *ARGS) if path == "default" else train_argv(train_ds, in1k32, run, *ARGS)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err
    if path == "default":
        assert_default_path(err)
    _assert_last_good_checkpoint(run, 7)


@pytest.mark.parametrize(
    ("hook", "value"),
    [
        ("TRANSFERLAB_TEST_NAN_AT_STEP", "seven"),
        ("TRANSFERLAB_TEST_NAN_AT_STEP", "0"),
        ("TRANSFERLAB_TEST_NAN_AT_STEP", "3:x"),
        ("TRANSFERLAB_TEST_NAN_GRAD_AT_STEP", "3:1"),
        ("TRANSFERLAB_TEST_CRASH_AT_STEP", "3:-1:m"),
    ],
)
def test_a_malformed_fault_variable_is_a_clear_error(
    hook: str,
    value: str,
    train_ds: Path,
    in1k32: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv(hook, value)
    assert main(train_argv(train_ds, in1k32, tmp_path / "run", *ARGS)) == 2
    err = capsys.readouterr().err
    assert f"{hook}={value!r} is not " in err and "unset it for a normal run" in err
    assert "Traceback" not in err


@pytest.mark.slow
def test_nan_on_one_ddp_rank_stops_both_ranks(train_ds: Path, in1k32: Path, tmp_path: Path) -> None:
    run = tmp_path / "ddp"
    argv = train_argv(train_ds, in1k32, run, *ARGS)[1:]
    # CPU and gloo even on a GPU machine (two ranks cannot share one GPU under NCCL); the NaN on rank 1 only.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "TRANSFERLAB_TEST_NAN_AT_STEP": "3:1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    cmd += ["--monitor-interval", "0.1", "-m", "transferlab", "train", *argv]
    t0 = time.monotonic()
    res = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=180)
    assert res.returncode != 0
    assert time.monotonic() - t0 < 120, "a rank waited for the other instead of stopping"
    err = res.stderr
    assert "the loss became nan at step 3 (epoch 2)" in err  # rank 1, which saw it
    assert "the loss became NaN/inf on another rank at step 3 (epoch 2)" in err  # rank 0, told by rank 1
    _assert_last_good_checkpoint(run, 3)
