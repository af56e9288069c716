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
    """With the probe's --holdout and --seed, the fit-split head starts the run (it never saw the holdout rows,
    so the run's holdout predictions stay out-of-sample); with another holdout, the refit head, and the holdout
    predictions say they are optimistic."""
    import json
    import shutil

    from safetensors.numpy import save_file

    argv = ["train", "--model", "test_resnet", "--weights", str(in1k32), "--data", str(train_ds)]
    # a learning rate too small to move anything: the head that comes out is the head it started from
    argv += ["--strategy", "bn-only", "--head-from", str(tmp_path / "probe"), "--epochs", "1", "--lr", "1e-12", *FAST]
    assert (probe / "head_fit.safetensors").is_file()
    # On the tiny dataset the two heads all but coincide; a copy of the probe with a marked fit-split head tells
    # which one a run started from.
    shutil.copytree(probe, tmp_path / "probe")
    kept = load_file(str(probe / "head_fit.safetensors"))
    save_file({k: (v * 2 + 1).numpy() for k, v in kept.items()}, str(tmp_path / "probe" / "head_fit.safetensors"))
    fit_head = load_file(str(tmp_path / "probe" / "head_fit.safetensors"))
    refit = _head(probe)
    out = tmp_path / "lpft"
    assert main([*argv, "--out", str(out)]) == 0
    end = _head(out)
    torch.testing.assert_close(end["head.fc.weight"], fit_head["weight"], rtol=0, atol=1e-6)
    torch.testing.assert_close(end["head.fc.bias"], fit_head["bias"], rtol=0, atol=1e-6)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["head_init"] == f"run {tmp_path / 'probe'}" and metrics["strategy"] == "bn-only"
    assert metrics["head_from_split"] == "fit"
    assert metrics["holdout_predictions"] == "the one epoch run, from a model fitted without these rows"
    other = tmp_path / "other-holdout"
    i = argv.index("--holdout")
    assert main([*argv[:i], "--holdout", "0.34", *argv[i + 2 :], "--out", str(other)]) == 0
    end = _head(other)
    for k in refit:
        torch.testing.assert_close(end[k], refit[k], rtol=0, atol=1e-6)
    metrics = json.loads((other / "metrics.json").read_text())
    assert metrics["head_from_split"] == "all" and metrics["holdout_predictions"].startswith("optimistic")


def test_a_head_for_another_backbone_is_refused(probe: Path, train_ds: Path, tmp_path: Path, capsys) -> None:
    argv = ["train", "--model", "test_efficientnet", "--weights", "none", "--data", str(train_ds)]
    argv += ["--out", str(tmp_path / "x"), "--strategy", "full", "--head-from", str(probe), "--epochs", "1", *FAST]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"--head-from {probe} holds a test_resnet head, not one for --model test_efficientnet" in err
    assert not (tmp_path / "x" / "model.safetensors").exists()
