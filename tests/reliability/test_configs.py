"""Bad configs and flags: an unknown key or flag names the closest valid one, an out-of-range value names
the option and the allowed range, and an incompatible combination says why. All before any work."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from builders import train_argv
from transferlab.cli import main
from transferlab.errors import ConfigError
from transferlab.training.config import TrainConfig

pytestmark = pytest.mark.usefixtures("one_thread")
BASE = {"model": "test_resnet", "data": "tiny-imagenet-mini", "out": "runs/x"}


def test_unknown_config_key_names_the_closest(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ConfigError, match=r"unknown config key 'epoch'; did you mean 'epochs'\?"):
        TrainConfig.from_dict({**BASE, "epoch": 3})
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({**BASE, "batchsize": 64}))
    assert main(["train", "--config", str(config)]) == 2
    assert "unknown config key 'batchsize'; did you mean 'batch_size'?" in capsys.readouterr().err
    with pytest.raises(ConfigError, match=r"unknown config key 'learning_rate'; the keys are .*, lr, "):
        TrainConfig.from_dict({**BASE, "learning_rate": 0.1})  # nothing close: every valid key is listed


def test_mistyped_flag_names_the_closest(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as ei:
        main(["train", "--model", "test_resnet", "--out", "x", "--epohcs", "3"])
    assert ei.value.code == 2
    err = capsys.readouterr().err
    assert "unrecognized arguments: --epohcs 3; did you mean --epochs?" in err
    with pytest.raises(SystemExit):
        main(["train", "--bad-images", "ignore"])
    assert "--bad-images: invalid choice: 'ignore' (choose from" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("lr", 0.0, "--lr must be between 1e-12 and 10, got 0.0"),
        ("epochs", 0, "--epochs must be between 1 and 10000, got 0"),
        ("batch_size", 0, "--batch-size must be between 1 and 65536, got 0"),
        ("holdout", 0.95, "--holdout must be between 1e-06 and 0.9, got 0.95"),
        ("label_smoothing", 1.0, "--label-smoothing must be between 0 and 0.99, got 1.0"),
        ("img_size", 8, "--img-size must be between 16 and 1024, got 8"),
        ("seed", -1, "--seed must be between 0 and "),
        ("workers", -2, "--workers must be between -1 and 256, got -2"),
        ("train_limit", 0, "--train-limit must be between 1 and "),
        ("gamma", 0.0, "--gamma must be between 1e-12 and 1, got 0.0"),
        ("strategy", "linear-prob", "--strategy must be one of .*did you mean linear-probe"),
    ],
)
def test_out_of_range_values_name_the_option_and_the_range(field: str, value: Any, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**{**BASE, field: value})  # type: ignore[arg-type]


def test_out_of_range_flag_stops_the_cli(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--model", "test_resnet", "--out", "x", "--holdout", "1.5"]) == 2
    assert "error: --holdout must be between 1e-06 and 0.9, got 1.5" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("overrides", "why"),
    [
        ({"feature_cache": "on", "aug": "seed"}, "random augmentation would reach the backbone"),
        ({"strategy": "scratch", "head_init": "imagenet"}, "contradicts --strategy scratch"),
        ({"report_split": "train"}, "the model is fitted on it"),
    ],
)
def test_incompatible_options_say_why(overrides: dict[str, Any], why: str) -> None:
    with pytest.raises(ConfigError, match=why):
        TrainConfig(**{**BASE, **overrides})  # type: ignore[arg-type]


def test_bad_combinations_are_refused(train_ds: Path, in1k32: Path, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(train_argv(train_ds, in1k32, tmp_path / "x", "--feature-cache", "on", "--aug", "seed")) == 2
    assert "random augmentation" in capsys.readouterr().err
    assert main(train_argv(train_ds, in1k32, tmp_path / "y", "--strategy", "linear-probe", "--bn", "train")) == 2
    assert "--bn" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()  # refused before any work
