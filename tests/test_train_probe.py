"""Linear probe on cached features: the cache, the fit, the holdout protocol and the run directory."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import yaml

from builders import WNIDS, eval_argv, fast_train_argv, imagenet_test_resnet, jpeg_bytes, write_folder
from transferlab.artifacts.predictions import read_predictions
from transferlab.cli import main
from transferlab.data import open_dataset
from transferlab.errors import ConfigError
from transferlab.inference.engine import make_eval_transform
from transferlab.inference.features import cached_features, pre_logits
from transferlab.models.backbones import create_backbone
from transferlab.runtime import resolve_precision
from transferlab.training.probe import ProbeConfig, fit_linear_probe, stratified_holdout

CPU = torch.device("cpu")
FP32 = resolve_precision("fp32", "off", CPU)


@pytest.fixture(scope="module")
def in1k_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return imagenet_test_resnet(tmp_path_factory.mktemp("w") / "test_resnet_in1k.safetensors", 64)[0]


def test_feature_cache_hit_is_identical_and_keyed_on_weights(
    tiny_zip: Path, tmp_path: Path, in1k_weights: Path, caplog: pytest.LogCaptureFixture
) -> None:
    split = open_dataset(tiny_zip).split("train")
    bb = create_backbone("test_resnet", str(in1k_weights))
    t = make_eval_transform(bb.preprocessing, 64)
    idx = np.arange(len(split))
    kw = dict(indices=idx, precision=FP32, device=CPU, cache_dir=tmp_path / "c", workers=0, progress=False)
    f1, p1, hit1 = cached_features(bb, split, t, **kw)
    f2, p2, hit2 = cached_features(bb, split, t, **kw)
    assert not hit1 and hit2 and p1 == p2
    np.testing.assert_array_equal(f1, f2)
    # The cached vectors are the backbone's pre-logits features.
    from transferlab.data.transforms import normalize_batch

    x = normalize_batch(torch.stack([t(split.load(i)) for i in range(3)]), (0.5,) * 3, (0.25,) * 3)
    with torch.no_grad():
        ref = pre_logits(bb.model.eval(), x).numpy()
    np.testing.assert_allclose(f1[:3], ref, rtol=1e-5, atol=1e-5)
    assert f1.shape == (9, bb.model.num_features)
    # Other weights -> another entry, never the stale one.
    with torch.no_grad():
        next(bb.model.parameters()).add_(0.5)
    f3, p3, hit3 = cached_features(bb, split, t, **kw)
    assert not hit3 and p3 != p1 and not np.allclose(f3, f1)
    # A damaged entry is detected, reported and rebuilt.
    p3.write_bytes(p3.read_bytes()[:100])
    with caplog.at_level(logging.WARNING, logger="transferlab"):
        f4, _, hit4 = cached_features(bb, split, t, **kw)
    assert not hit4 and str(p3) in caplog.text
    np.testing.assert_allclose(f4, f3, rtol=1e-6)


def test_stratified_holdout_is_per_class_disjoint_and_seeded() -> None:
    y = np.repeat(np.arange(4), [10, 20, 2, 1])
    fit, hold = stratified_holdout(y, 0.1, seed=3)
    assert set(fit).isdisjoint(hold) and sorted([*fit, *hold]) == list(range(len(y)))
    assert np.bincount(y[hold], minlength=4).tolist() == [1, 2, 1, 0]
    _fit2, hold2 = stratified_holdout(y, 0.1, seed=3)
    assert np.array_equal(hold, hold2)
    assert not np.array_equal(hold, stratified_holdout(y, 0.1, seed=4)[1])
    with pytest.raises(ConfigError, match="--holdout"):
        stratified_holdout(y, 1.5, seed=0)


def _blobs(n_per: int, d: int = 16, c: int = 4, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian blobs around fixed class centres; ``seed`` only changes the samples."""
    centers = np.random.default_rng(123).normal(0, 3, (c, d))
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(c), n_per)
    return (centers[y] + rng.normal(0, 1, (len(y), d))).astype(np.float32), y


def test_probe_loss_falls_and_beats_chance() -> None:
    x, y = _blobs(50)
    xh, yh = _blobs(10, seed=1)
    head, res = fit_linear_probe(x, y, xh, yh, 4, ProbeConfig(epochs=15, lr=0.05, batch_size=32))
    losses = [r["train_loss"] for r in res.history[1:]]
    assert losses[-1] < 0.5 * losses[0]
    assert res.history[-1]["val_acc"] > 0.9
    best = min(res.history, key=lambda r: r["val_loss"])
    assert res.best_epoch == best["epoch"]
    # The head handed back is the best epoch's, not the last one's.
    from transferlab.training.probe import head_logits

    logits = torch.from_numpy(head_logits(head, xh))
    loss = torch.nn.functional.cross_entropy(logits, torch.from_numpy(yh))
    assert float(loss) == pytest.approx(best["val_loss"], rel=1e-5)


def test_probe_warm_start_is_the_starting_point() -> None:
    x, y = _blobs(20)
    w0 = np.zeros((4, 16), dtype=np.float32)
    b0 = np.array([0, 0, 5, 0], dtype=np.float32)  # predicts class 2 for everything
    _, res = fit_linear_probe(x, y, x, y, 4, ProbeConfig(epochs=1, lr=1e-9), init=(w0, b0))
    assert res.history[0]["train_acc"] == pytest.approx(0.25)
    with pytest.raises(ConfigError, match="shape"):
        fit_linear_probe(x, y, x, y, 4, ProbeConfig(epochs=1), init=(w0[:3], b0[:3]))


def _train(argv: list[str]) -> int:
    return main(fast_train_argv(*argv))


def test_train_run_directory_is_complete_and_consistent(tiny_zip: Path, tmp_path: Path, in1k_weights: Path) -> None:
    out = tmp_path / "run"
    rc = _train(
        [
            "--model",
            "test_resnet",
            "--weights",
            str(in1k_weights),
            "--data",
            str(tiny_zip),
            "--epochs",
            "3",
            "--holdout",
            "0.34",
            "--cache-dir",
            str(tmp_path / "c"),
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["strategy"] == "linear-probe" and m["head_init"] == "imagenet" and m["split"] == "val"
    assert m["n"] == 6 and m["n_holdout"] == 3 and m["n_fit"] == 6
    assert m["params_trained"] == 3 * timm.create_model("test_resnet").num_features + 3
    rows = list(csv.DictReader((out / "history.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2, 3]
    assert set(rows[0]) >= {"train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds", "images_per_s"}
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["epochs"] == 3 and cfg["model"] == "test_resnet"
    pred = read_predictions(out / "predictions" / "val.npz")
    assert list(pred.class_ids) == list(WNIDS) and pred.logits.shape == (6, 3)
    # The saved model reproduces the run's predictions through the ordinary evaluate path.
    ev = tmp_path / "ev"
    assert main(eval_argv(str(out), "--data", str(tiny_zip), "--out", str(ev))) == 0
    np.testing.assert_allclose(
        read_predictions(ev / "predictions" / "val.npz").logits, pred.logits, rtol=1e-4, atol=1e-4
    )
    assert json.loads((ev / "metrics.json").read_text())["top1"] == pytest.approx(m["top1"])


def test_warm_start_reproduces_zero_shot(tiny_zip: Path, tmp_path: Path, in1k_weights: Path) -> None:
    """With a vanishing learning rate the warm-started head is the ImageNet head restricted to the classes."""
    assert (
        _train(
            [
                "--model",
                "test_resnet",
                "--weights",
                str(in1k_weights),
                "--data",
                str(tiny_zip),
                "--epochs",
                "1",
                "--lr",
                "1e-12",
                "--cache-dir",
                str(tmp_path / "c"),
                "--out",
                str(tmp_path / "run"),
            ]
        )
        == 0
    )
    assert (
        main(
            eval_argv(
                "--model",
                "test_resnet",
                "--weights",
                str(in1k_weights),
                "--zero-shot",
                "--data",
                str(tiny_zip),
                "--out",
                str(tmp_path / "zs"),
            )
        )
        == 0
    )
    a = read_predictions(tmp_path / "run" / "predictions" / "val.npz").logits
    b = read_predictions(tmp_path / "zs" / "predictions" / "val.npz").logits
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_imagenet_head_init_refused_for_other_classes(tmp_path: Path, in1k_weights: Path, capsys) -> None:
    files = {
        f"{s}/{c}/{i}.jpg": jpeg_bytes((10 * i, 50, 90))
        for s in ("train", "val")
        for c in ("cats", "dogs")
        for i in range(3)
    }
    root = write_folder(tmp_path / "pets", files)
    rc = _train(
        [
            "--model",
            "test_resnet",
            "--weights",
            str(in1k_weights),
            "--data",
            str(root),
            "--head-init",
            "imagenet",
            "--out",
            str(tmp_path / "o"),
        ]
    )
    assert rc == 2
    assert "not ImageNet-1k classes" in capsys.readouterr().err
    # auto falls back to a random head and works.
    assert (
        _train(
            [
                "--model",
                "test_resnet",
                "--weights",
                str(in1k_weights),
                "--data",
                str(root),
                "--epochs",
                "2",
                "--cache-dir",
                str(tmp_path / "c"),
                "--out",
                str(tmp_path / "o2"),
            ]
        )
        == 0
    )
    assert json.loads((tmp_path / "o2" / "metrics.json").read_text())["head_init"] == "random"


def test_seed_head_trains_on_cached_feature_maps(train_ds: Path, in1k32: Path, tmp_path: Path) -> None:
    """A frozen backbone with the seed head (BN eval) is cacheable too: its feature maps are cached."""
    from builders import train_argv

    run = tmp_path / "seedcache"
    argv = train_argv(train_ds, in1k32, run, "--head", "seed", "--epochs", "8", "--lr", "3e-3")
    assert main(argv) == 0
    m = json.loads((run / "metrics.json").read_text())
    assert m["head"].startswith("seed") and m["feature_cache"]["what"] == "feature_map"
    rows = list(csv.DictReader((run / "history.csv").open()))
    assert float(rows[-1]["train_loss"]) < float(rows[1]["train_loss"])
    # Cached maps hold (N, C, H, W); a second run hits the cache.
    assert main(train_argv(train_ds, in1k32, tmp_path / "again", "--head", "seed", "--epochs", "1")) == 0
    assert json.loads((tmp_path / "again" / "metrics.json").read_text())["feature_cache"]["train_hit"]
    # The run directory reproduces its predictions through the ordinary model.
    ev = tmp_path / "ev"
    assert main(eval_argv(str(run), "--data", str(train_ds), "--out", str(ev))) == 0
    np.testing.assert_allclose(
        read_predictions(ev / "predictions" / "val.npz").logits,
        read_predictions(run / "predictions" / "val.npz").logits,
        rtol=1e-4,
        atol=1e-4,
    )
