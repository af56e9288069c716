"""``--head-from`` (LP-FT): a fine-tune starts from an earlier probe's linear head, exactly; a head for another
backbone or other classes is refused, naming the option."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from builders import logging_restored
from transferlab.cli import main

FAST = ["--workers", "0", "--precision", "fp32", "--progress", "off", "--holdout", "0.2", "--batch-size", "6"]


@pytest.fixture(scope="module")
def probe(train_ds: Path, in1k32: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("lpft") / "probe"
    argv = ["train", "--model", "test_resnet", "--weights", str(in1k32), "--data", str(train_ds), "--out", str(out)]
    with logging_restored():
        assert main([*argv, "--probe", "lbfgs", *FAST]) == 0
    return out


def _head(run: Path) -> dict[str, torch.Tensor]:
    return {k: v for k, v in load_file(str(run / "model.safetensors")).items() if k.startswith("head.")}


def test_a_fine_tune_starts_from_the_probes_head(probe: Path, train_ds: Path, in1k32: Path, tmp_path: Path) -> None:
    out = tmp_path / "lpft"
    argv = ["train", "--model", "test_resnet", "--weights", str(in1k32), "--data", str(train_ds), "--out", str(out)]
    # a learning rate too small to move anything: the head that comes out is the head it started from
    argv += ["--strategy", "bn-only", "--head-from", str(probe), "--epochs", "1", "--lr", "1e-12", *FAST]
    assert main(argv) == 0
    start, end = _head(probe), _head(out)
    assert start.keys() == end.keys() and start
    for k in start:
        torch.testing.assert_close(end[k], start[k], rtol=0, atol=1e-6)
    import json

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["head_init"] == f"run {probe}" and metrics["strategy"] == "bn-only"


def test_a_head_for_another_backbone_is_refused(probe: Path, train_ds: Path, tmp_path: Path, capsys) -> None:
    argv = ["train", "--model", "test_efficientnet", "--weights", "none", "--data", str(train_ds)]
    argv += ["--out", str(tmp_path / "x"), "--strategy", "full", "--head-from", str(probe), "--epochs", "1", *FAST]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"--head-from {probe} holds a test_resnet head, not one for --model test_efficientnet" in err
    assert not (tmp_path / "x" / "model.safetensors").exists()
