"""Numerical faults: a NaN/inf loss or gradient stops training before the optimizer step, names the step,
exits non-zero and leaves the last good checkpoint as it was; under 2-process DDP a NaN on one rank stops
both ranks at the same step, and nothing hangs.

A NaN at a chosen step cannot be produced reliably from the outside (a huge learning rate diverges at some
step or never), so the tests inject one through the training loop's hooks (tests/fault_hooks.py, named in
``TRANSFERLAB_HOOKS``; see ``transferlab.training.hooks``)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import fault_hooks
from builders import assert_default_path, default_train_argv, train_argv
from transferlab.cli import main
from transferlab.errors import ConfigError
from transferlab.runtime import cpu_has_bf16
from transferlab.training.checkpoint import latest_checkpoint, load_checkpoint
from transferlab.training.config import TrainConfig
from transferlab.training.hooks import HOOKS_ENV, FitHooks, hooks_from_env
from transferlab.training.loop import NonFiniteLossError
from transferlab.training.run import train

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
        ("nan_loss", "the loss became nan at step 7 (epoch 2); stopped before the optimizer"),
        ("nan_grad", "the gradient norm became nan at step 7; stopped before the optimizer"),
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
    monkeypatch.setenv(HOOKS_ENV, fault_hooks.spec(hook, "7"))
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
        ("nan_loss", "seven"),
        ("nan_loss", "0"),
        ("nan_loss", "3:x"),
        ("nan_grad", "3:1"),
        ("crash", "3:-1:m"),
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
    spec = fault_hooks.spec(hook, value)
    monkeypatch.setenv(HOOKS_ENV, spec)
    assert main(train_argv(train_ds, in1k32, tmp_path / "run", *ARGS)) == 2
    err = capsys.readouterr().err
    assert f"{HOOKS_ENV}={spec!r}: {value!r} is not " in err and "unset it for a normal run" in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ("fault_hooks", "is not MODULE:FACTORY[:ARGUMENT]"),
        ("no_such_hooks_module:make", "cannot import 'no_such_hooks_module'"),
        ("fault_hooks:no_such_factory", "fault_hooks has no callable 'no_such_factory'"),
        ("fault_hooks:nan_loss", "missing 1 required positional argument"),
        ("fault_hooks:Path:x", "returned a PosixPath, not a FitHooks"),
    ],
)
def test_a_hooks_variable_that_names_no_hooks_is_a_clear_error(value: str, why: str) -> None:
    with pytest.raises(ConfigError) as e:
        hooks_from_env({HOOKS_ENV: value})
    assert f"{HOOKS_ENV}={value!r}: " in str(e.value) and why in str(e.value)
    assert "unset it for a normal run" in str(e.value)
    assert hooks_from_env({}) is None and hooks_from_env({HOOKS_ENV: " "}) is None


class _Recorder(FitHooks):
    def __init__(self) -> None:
        self.calls: list[tuple[str, int, int]] = []

    def before_step(self, step: int, rank: int) -> None:
        self.calls.append(("before_step", step, rank))

    def after_loss(self, step: int, rank: int, loss: torch.Tensor) -> torch.Tensor:
        self.calls.append(("after_loss", step, rank))
        return loss

    def before_optimizer_step(self, step: int, rank: int, params: list[torch.nn.Parameter]) -> None:
        assert params and all(p.requires_grad for p in params)
        self.calls.append(("before_optimizer_step", step, rank))


def _config(train_ds: Path, in1k32: Path, run: Path, **options: object) -> TrainConfig:
    """What ARGS and builders.train_argv ask for, as a config for ``train(cfg, hooks=...)`` in this process."""
    return TrainConfig(
        model="test_resnet",
        weights=str(in1k32),
        data=str(train_ds),
        out=run,
        batch_size=6,
        holdout=0.2,
        cache_dir=run.parent / "cache",
        strategy="bn-only",
        checkpoint_every=1,
        keep_checkpoints=50,
        precision="fp32",
        device="cpu",
        workers=0,
        progress=False,
        **options,  # type: ignore[arg-type]
    )


def test_hooks_passed_to_train_are_called_at_every_step(train_ds: Path, in1k32: Path, tmp_path: Path) -> None:
    """In this process the hooks are an object passed in; 4 steps an epoch with 3 accumulated: the optimizer
    steps after steps 3 and 4 (the epoch's partial accumulation), 7 and 8, 11 and 12."""
    hooks = _Recorder()
    train(_config(train_ds, in1k32, tmp_path / "run", epochs=3, accum_steps=3), hooks=hooks)
    assert [c[1:] for c in hooks.calls if c[0] == "before_step"] == [(s, 0) for s in range(1, 13)]
    assert [c for c in hooks.calls if c[0] != "before_optimizer_step"] == [
        (kind, s, 0) for s in range(1, 13) for kind in ("before_step", "after_loss")
    ]
    assert [c[1] for c in hooks.calls if c[0] == "before_optimizer_step"] == [3, 4, 7, 8, 11, 12]


def test_a_nan_from_hooks_passed_in_stops_the_run(
    train_ds: Path, in1k32: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An object passed in wins over TRANSFERLAB_HOOKS, which would fault at another step."""
    monkeypatch.setenv(HOOKS_ENV, fault_hooks.spec("nan_loss", "2"))
    run = tmp_path / "run"
    with pytest.raises(NonFiniteLossError, match=r"the loss became nan at step 7 \(epoch 2\)"):
        train(_config(train_ds, in1k32, run, epochs=3), hooks=fault_hooks.NanLoss(7))
    ckpts = run / "checkpoints"
    assert latest_checkpoint(ckpts, prefix="") == "step-00000006"
    assert not (ckpts / "step-00000007.json").exists()


@pytest.mark.slow
def test_nan_on_one_ddp_rank_stops_both_ranks(train_ds: Path, in1k32: Path, tmp_path: Path) -> None:
    run = tmp_path / "ddp"
    argv = train_argv(train_ds, in1k32, run, *ARGS)[1:]
    # CPU and gloo even on a GPU machine (two ranks cannot share one GPU under NCCL); the NaN on rank 1 only.
    env = fault_hooks.env("nan_loss", "3:1", {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""})
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
