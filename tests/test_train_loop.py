"""The training loop on tiny real models: strategies, the fast path's equivalence, DDP. Exact resume after
SIGKILL/SIGTERM/SIGINT and refused option combinations are tested in tests/reliability/."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from builders import eval_argv, train_argv
from transferlab.artifacts.predictions import read_predictions
from transferlab.cli import main
from transferlab.models.weights import read_weight_file
from transferlab.runtime import cpu_has_bf16

pytestmark = pytest.mark.usefixtures("one_thread")
REPO = Path(__file__).resolve().parents[1]


def _history(run: Path) -> list[dict[str, float]]:
    return [{k: float(v) for k, v in r.items()} for r in csv.DictReader((run / "history.csv").open())]


def test_bn_only_seed_head_trains_only_batchnorm_and_head(train_ds: Path, in1k32: Path, tmp_path: Path) -> None:
    run = tmp_path / "bn"
    assert (
        main(
            train_argv(
                train_ds,
                in1k32,
                run,
                "--strategy",
                "bn-only",
                "--head",
                "seed",
                "--aug",
                "seed",
                "--epochs",
                "6",
                "--lr",
                "3e-3",
            )
        )
        == 0
    )
    h = _history(run)
    assert h[-1]["train_loss"] < h[0]["train_loss"]
    m = json.loads((run / "metrics.json").read_text())
    assert m["strategy"] == "bn-only" and m["bn"] == "train" and m["head"].startswith("seed")
    assert (run / "curves.png").stat().st_size > 1000
    before, _ = read_weight_file(in1k32)
    after, _ = read_weight_file(run / "model.safetensors")
    conv = [k for k in before if k.endswith(".weight") and before[k].ndim == 4]
    bn_w = [k for k in before if k.startswith(("bn1.", "layer1.0.bn1.")) and k.endswith("running_mean")]
    assert conv and bn_w
    for k in conv:  # frozen convolutions are bit-identical
        assert torch.equal(before[k], after[f"backbone.{k}"]), k
    assert any(not torch.equal(before[k], after[f"backbone.{k}"]) for k in bn_w)  # BN statistics moved


@pytest.mark.parametrize("strategy", ["full", "freeze-unfreeze", "scratch"])
def test_other_strategies_run_and_learn(strategy: str, train_ds: Path, in1k32: Path, tmp_path: Path) -> None:
    run = tmp_path / strategy
    extra = ["--unfreeze-epoch", "1"] if strategy == "freeze-unfreeze" else []
    assert main(train_argv(train_ds, in1k32, run, "--strategy", strategy, "--epochs", "3", "--lr", "3e-3", *extra)) == 0
    h = _history(run)
    assert len(h) == 3 and h[-1]["train_loss"] < h[0]["train_loss"]
    m = json.loads((run / "metrics.json").read_text())
    assert m["strategy"] == strategy and m["n"] == 12
    assert m["head_init"] == ("random" if strategy == "scratch" else "imagenet")
    before, _ = read_weight_file(in1k32)
    after, _ = read_weight_file(run / "model.safetensors")
    conv = [k for k in before if before[k].ndim == 4]
    moved = sum(not torch.equal(before[k], after[f"backbone.{k}"]) for k in conv)
    assert moved == len(conv)  # every conv trained (after unfreezing, for freeze-unfreeze)


@pytest.mark.parametrize("precision", ["fp32", "default"])
@pytest.mark.parametrize(
    "extra",
    [[], ["--schedule", "cosine", "--warmup-steps", "2", "--clip-grad", "0.5"]],
    ids=["constant", "cosine-warmup-clip"],
)
def test_feature_cache_path_equals_the_image_loop(
    extra: list[str], precision: str, train_ds: Path, in1k32: Path, tmp_path: Path
) -> None:
    """The fast path is the same computation: same order, same init, same optimizer and schedule -> same head.

    In fp32 to float rounding. On the default path (bf16 autocast + channels_last on this CPU) the cached
    features come from the BatchNorm-folded inference copy and the image loop runs the unfolded backbone, so
    the bf16 features differ by rounding: the heads agree to 5e-3 (they moved 0.16-0.2 from their start), and
    the predictions and the epoch kept are the same.
    """
    if precision == "default" and not cpu_has_bf16():
        pytest.skip("this CPU has no native bf16: the default path is the fp32 one")
    prec = "fp32" if precision == "fp32" else None
    tol = {"rtol": 1e-4, "atol": 1e-5} if prec else {"rtol": 0, "atol": 5e-3}
    fast, slow = tmp_path / "fast", tmp_path / "slow"
    common = ["--epochs", "3", "--lr", "1e-2", *extra]
    assert main(train_argv(train_ds, in1k32, fast, "--feature-cache", "on", *common, precision=prec)) == 0
    assert main(train_argv(train_ds, in1k32, slow, "--feature-cache", "off", *common, precision=prec)) == 0
    mf = json.loads((fast / "metrics.json").read_text())
    ms = json.loads((slow / "metrics.json").read_text())
    assert "feature_cache" in mf and "feature_cache" not in ms
    assert mf["precision"] == ms["precision"] == ("fp32" if prec else "bf16")
    wf, _ = read_weight_file(fast / "model.safetensors")
    wsl, _ = read_weight_file(slow / "model.safetensors")
    torch.testing.assert_close(wf["head.fc.weight"], wsl["head.fc.weight"], **tol)
    pf = read_predictions(fast / "predictions" / "val.npz").logits
    ps = read_predictions(slow / "predictions" / "val.npz").logits
    np.testing.assert_allclose(pf, ps, rtol=1e-4 if prec else 0, atol=1e-4 if prec else 5e-3)
    assert (pf.argmax(1) == ps.argmax(1)).all()
    assert mf["top1"] == ms["top1"] and mf["best_epoch"] == ms["best_epoch"]
    # The learning rate each epoch ended on is the same schedule on both paths (it decays under cosine).
    lr_fast = [r["lr"] for r in _history(fast) if r["epoch"] >= 1]
    lr_slow = [r["lr"] for r in _history(slow) if r["epoch"] >= 1]
    np.testing.assert_allclose(lr_fast, lr_slow, rtol=1e-6)
    if extra:
        assert lr_fast[-1] < lr_fast[0] < 1e-2


def test_evaluate_run_dir_on_another_split(train_ds: Path, in1k32: Path, tmp_path: Path) -> None:
    run = tmp_path / "r"
    assert main(train_argv(train_ds, in1k32, run, "--strategy", "bn-only", "--head", "seed", "--epochs", "1")) == 0
    ev = tmp_path / "ev"
    assert main(eval_argv(str(run), "--data", str(train_ds), "--split", "val", "--out", str(ev))) == 0
    np.testing.assert_allclose(
        read_predictions(ev / "predictions" / "val.npz").logits,
        read_predictions(run / "predictions" / "val.npz").logits,
        rtol=1e-4,
        atol=1e-4,
    )


@pytest.mark.slow
def test_ddp_two_processes_match_single_process_evaluation(train_ds: Path, in1k32: Path, tmp_path: Path) -> None:
    run = tmp_path / "ddp"
    argv = train_argv(train_ds, in1k32, run, "--strategy", "bn-only", "--head", "seed", "--epochs", "2")[1:]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "transferlab",
        "train",
        *argv,
    ]
    res = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    m = json.loads((run / "metrics.json").read_text())
    assert m["world_size"] == 2 and m["n"] == 12
    ev = tmp_path / "ev"
    assert main(eval_argv(str(run), "--data", str(train_ds), "--out", str(ev))) == 0
    single = json.loads((ev / "metrics.json").read_text())
    assert single["n"] == m["n"] and single["top1"] == m["top1"]
    np.testing.assert_allclose(
        read_predictions(ev / "predictions" / "val.npz").logits,
        read_predictions(run / "predictions" / "val.npz").logits,
        rtol=1e-4,
        atol=1e-4,
    )
