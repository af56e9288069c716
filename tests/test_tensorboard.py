"""transferlab train --tensorboard: events hold what history.csv and steps.csv hold, plus the curves and hparams."""

from __future__ import annotations

import csv
import importlib.util
import json
import sys
from pathlib import Path

import pytest

from builders import train_argv
from transferlab.cli import main

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.skipif(
        importlib.util.find_spec("tensorboard") is None, reason="pip install 'transferlab[tensorboard]'"
    ),
]


def _events(run: Path):  # type: ignore[no-untyped-def]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


def _csv(path: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(path.open(encoding="utf-8")))


def test_image_loop_writes_steps_epochs_curves_and_hparams(train_ds: Path, in1k32: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    argv = train_argv(train_ds, in1k32, run, "--strategy", "full", "--epochs", "2", "--tensorboard")
    assert main(argv) == 0
    acc = _events(run)
    tags = acc.Tags()
    steps = _csv(run / "steps.csv")
    loss = acc.Scalars("step/loss")
    assert [e.step for e in loss] == [int(r["step"]) for r in steps]
    assert [e.value for e in loss] == pytest.approx([float(r["loss"]) for r in steps], rel=1e-6)
    assert len(acc.Scalars("step/lr")) == len(steps)
    history = _csv(run / "history.csv")
    for key in ("train_loss", "train_acc", "val_loss", "val_acc", "lr"):
        got = acc.Scalars(f"epoch/{key}")
        assert [e.step for e in got] == [int(r["epoch"]) for r in history]
        assert [e.value for e in got] == pytest.approx([float(r[key]) for r in history], rel=1e-6)
    assert "curves" in tags["images"]
    hp = acc.PluginTagToContent("hparams")
    assert {"_hparams_/experiment", "_hparams_/session_start_info"} <= set(hp)
    assert b"strategy" in hp["_hparams_/session_start_info"] and b"full" in hp["_hparams_/session_start_info"]
    top1 = json.loads((run / "metrics.json").read_text())["top1"]
    assert acc.Scalars("hparam/top1")[0].value == pytest.approx(top1)


def test_feature_cache_probe_writes_its_epochs(train_ds: Path, in1k32: Path, tmp_path: Path) -> None:
    run = tmp_path / "probe"
    assert main(train_argv(train_ds, in1k32, run, "--epochs", "3", "--tensorboard")) == 0
    acc = _events(run)
    history = _csv(run / "history.csv")
    assert [e.step for e in acc.Scalars("epoch/val_loss")] == [int(r["epoch"]) for r in history]  # epoch 0..3
    assert "step/loss" not in acc.Tags()["scalars"]


def test_missing_tensorboard_is_a_clear_error_before_training(
    train_ds: Path, in1k32: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    run = tmp_path / "run"
    assert main(train_argv(train_ds, in1k32, run, "--epochs", "1", "--tensorboard")) == 2
    assert "pip install 'transferlab[tensorboard]'" in capsys.readouterr().err
    assert not (run / "metrics.json").exists() and not (run / "config.yaml").exists()
