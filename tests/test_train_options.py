"""Training options end to end on a tiny model: accumulation, early stopping, standardisation, mixing,
imbalance handling, cross-domain init and replaying a run from its config.yaml."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from builders import fast_train_argv, jpeg_bytes, train_argv, write_folder
from transferlab.cli import main
from transferlab.data import open_dataset
from transferlab.data.stats import channel_stats
from transferlab.models.weights import read_weight_file

pytestmark = pytest.mark.usefixtures("one_thread")


def _metrics(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())


def test_gradient_accumulation_equals_the_large_batch(train_ds: Path, in1k32: Path, tmp_path: Path) -> None:
    common = ["--feature-cache", "off", "--optimizer", "sgd", "--lr", "0.05", "--epochs", "2"]
    assert main(train_argv(train_ds, in1k32, tmp_path / "big", *common)) == 0
    small = train_argv(train_ds, in1k32, tmp_path / "acc", *common, "--accum-steps", "2")
    small[small.index("--batch-size") + 1] = "3"
    assert main(small) == 0
    a, _ = read_weight_file(tmp_path / "big" / "model.safetensors")
    b, _ = read_weight_file(tmp_path / "acc" / "model.safetensors")
    torch.testing.assert_close(a["head.fc.weight"], b["head.fc.weight"], rtol=1e-5, atol=1e-6)


def test_early_stopping_keeps_the_best_holdout_epoch(train_ds: Path, in1k32: Path, tmp_path: Path) -> None:
    run = tmp_path / "es"
    assert (
        main(
            train_argv(
                train_ds,
                in1k32,
                run,
                "--feature-cache",
                "off",
                "--lr",
                "0.3",
                "--epochs",
                "30",
                "--patience",
                "2",
                "--head-init",
                "random",
            )
        )
        == 0
    )
    m = _metrics(run)
    assert m["stopped_early"] and m["epochs_run"] < 30
    import csv

    rows = list(csv.DictReader((run / "history.csv").open()))
    losses = [float(r["val_loss"]) for r in rows]
    assert m["best_epoch"] == int(rows[int(np.argmin(losses))]["epoch"])
    assert m["epochs_run"] == m["best_epoch"] + 2
    # the kept epoch's holdout predictions are written, for ensembles fitted off the report split
    from transferlab.artifacts.predictions import predictions_path, read_predictions

    hold = read_predictions(predictions_path(run, "holdout"))
    best = rows[int(np.argmin(losses))]
    assert len(hold.targets) == m["n_holdout"]
    assert float((hold.logits.argmax(1) == hold.targets).mean()) == pytest.approx(float(best["val_acc"]), abs=1e-6)
    assert m["holdout_predictions"].startswith("the kept epoch, which this holdout chose")


def test_dataset_standardization(train_ds: Path, in1k32: Path, tmp_path: Path) -> None:
    split = open_dataset(train_ds).split("train")
    idx = np.arange(len(split))
    mean, std = channel_stats(split, idx, cache_dir=tmp_path / "stats")
    px = np.concatenate([np.asarray(split.load(i), dtype=np.float64).reshape(-1, 3) / 255 for i in idx])
    np.testing.assert_allclose(mean, px.mean(0), rtol=1e-9)
    np.testing.assert_allclose(std, px.std(0), rtol=1e-6)
    assert list((tmp_path / "stats").glob("stats-*.json"))  # cached for the next run
    assert channel_stats(split, idx, cache_dir=tmp_path / "stats") == (mean, std)
    assert (
        main(
            train_argv(
                train_ds, in1k32, tmp_path / "std", "--strategy", "bn-only", "--standardize", "dataset", "--epochs", "1"
            )
        )
        == 0
    )


def test_mixing_smoothing_and_imbalance_options_train(train_ds: Path, in1k32: Path, tmp_path: Path) -> None:
    run = tmp_path / "mix"
    assert (
        main(
            train_argv(
                train_ds,
                in1k32,
                run,
                "--strategy",
                "full",
                "--aug",
                "trivialaugment",
                "--mixup",
                "0.2",
                "--cutmix",
                "1.0",
                "--label-smoothing",
                "0.1",
                "--class-weights",
                "balanced",
                "--sampler",
                "balanced",
                "--schedule",
                "cosine",
                "--warmup-steps",
                "2",
                "--clip-grad",
                "1.0",
                "--epochs",
                "2",
            )
        )
        == 0
    )
    m = _metrics(run)
    assert np.isfinite(m["nll"]) and m["n"] == 12


def test_init_from_carries_the_backbone_to_a_new_dataset(train_ds: Path, in1k32: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    assert main(train_argv(train_ds, in1k32, src, "--strategy", "scratch", "--epochs", "1")) == 0
    files = {
        f"{s}/{c}/{i}.jpg": jpeg_bytes((40 * i, 60, 200 - 40 * i))
        for s in ("train", "val")
        for c in ("cats", "dogs")
        for i in range(5)
    }
    pets = write_folder(tmp_path / "pets", files)
    dst = tmp_path / "dst"
    argv = train_argv(pets, in1k32, dst, "--init-from", str(src), "--epochs", "1")
    argv.remove("--weights")
    argv.remove(str(in1k32))
    assert main(argv) == 0
    a, _ = read_weight_file(src / "model.safetensors")
    b, _ = read_weight_file(dst / "model.safetensors")
    backbone = [k for k in a if k.startswith("backbone.")]
    assert backbone and all(torch.equal(a[k], b[k]) for k in backbone)  # frozen under linear-probe
    assert b["head.fc.weight"].shape[0] == 2 and a["head.fc.weight"].shape[0] == 3
    assert _metrics(dst)["head_init"] == "random"


def test_config_yaml_replays_the_run(train_ds: Path, in1k32: Path, tmp_path: Path, capsys) -> None:
    first = tmp_path / "first"
    assert main(train_argv(train_ds, in1k32, first, "--epochs", "2")) == 0
    again = tmp_path / "again"
    assert main(["train", "--config", str(first / "config.yaml"), "--out", str(again), "--progress", "off"]) == 0
    a, _ = read_weight_file(first / "model.safetensors")
    b, _ = read_weight_file(again / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    cfg = yaml.safe_load((again / "config.yaml").read_text())
    assert cfg["out"] == str(again) and cfg["epochs"] == 2
    # An explicit flag overrides the file.
    assert (
        main(
            [
                "train",
                "--config",
                str(first / "config.yaml"),
                "--epochs",
                "1",
                "--out",
                str(tmp_path / "one"),
                "--progress",
                "off",
            ]
        )
        == 0
    )
    assert _metrics(tmp_path / "one")["epochs"] == 1
    # A misspelled key is an error naming the closest valid one.
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**cfg, "epoch": 3}))
    assert main(["train", "--config", str(bad)]) == 2
    assert "did you mean 'epochs'" in capsys.readouterr().err


def test_small_cnn_from_cifar10_to_tiny_imagenet(train_ds: Path, tmp_path: Path) -> None:
    """The seed's cross-domain member: a small CNN trained from scratch on CIFAR-10 batches, its head
    then retrained on Tiny ImageNet with the CIFAR-trained backbone frozen."""
    from builders import cifar_files

    cifar = write_folder(tmp_path / "cifar-10-batches-py", cifar_files(n_per_batch=24))
    src = tmp_path / "cnn-cifar"
    argv = fast_train_argv(
        "--model",
        "small_cnn",
        "--strategy",
        "scratch",
        "--data",
        str(cifar),
        "--report-split",
        "test",
        "--epochs",
        "4",
        "--lr",
        "3e-3",
        "--batch-size",
        "16",
        "--cache-dir",
        str(tmp_path / "cache"),
        "--out",
        str(src),
    )
    assert main(argv) == 0
    m = _metrics(src)
    assert m["num_classes"] == 10 and m["head_init"] == "random" and m["n"] == 24
    dst = tmp_path / "cnn-tiny"
    argv = fast_train_argv(
        "--model",
        "small_cnn",
        "--init-from",
        str(src),
        "--strategy",
        "linear-probe",
        "--data",
        str(train_ds),
        "--epochs",
        "3",
        "--batch-size",
        "6",
        "--cache-dir",
        str(tmp_path / "cache"),
        "--out",
        str(dst),
    )
    assert main(argv) == 0
    a, _ = read_weight_file(src / "model.safetensors")
    b, _ = read_weight_file(dst / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a if k.startswith("backbone."))
    assert b["head.fc.weight"].shape == (3, 128)
    assert _metrics(dst)["img_size"] == 32  # the CIFAR model's own preprocessing travels with it


def test_a_fresh_run_never_overwrites_an_earlier_one(train_ds: Path, in1k32: Path, tmp_path: Path, capsys) -> None:
    run = tmp_path / "done"
    assert main(train_argv(train_ds, in1k32, run, "--strategy", "bn-only", "--epochs", "1")) == 0
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert main(train_argv(train_ds, in1k32, run, "--strategy", "bn-only", "--epochs", "1")) == 2
    assert "--resume" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before  # byte-identical
    assert not (run / ".lock").exists()
