"""The files between stages: one predictions reader/writer and layout, one folder-kind detector, one summary."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from transferlab.artifacts.folders import folder_kind, has_model, is_ensemble_dir, is_run_dir, is_study_dir
from transferlab.artifacts.predictions import (
    find_predictions,
    prediction_splits,
    predictions_path,
    read_predictions,
    write_predictions,
)
from transferlab.artifacts.summary import summarize
from transferlab.errors import DataError

CLASSES = ("n01", "n02", "n03")


def _write(path: Path, n: int = 4, targets: np.ndarray | None = None) -> Path:
    rng = np.random.default_rng(0)
    t = np.arange(n) % 3 if targets is None else targets
    write_predictions(path, rng.normal(size=(n, 3)), t, [f"s{i}" for i in range(n)], CLASSES)
    return path


def test_round_trip_and_the_one_layout(tmp_path: Path) -> None:
    p = _write(predictions_path(tmp_path / "run", "val"))
    assert p == tmp_path / "run" / "predictions" / "val.npz"
    got = read_predictions(p)
    assert got.logits.dtype == np.float32 and got.targets.dtype == np.int64
    assert got.sample_ids.tolist() == ["s0", "s1", "s2", "s3"] and got.class_ids.tolist() == list(CLASSES)
    np.testing.assert_allclose(got.probs.sum(1), 1.0)
    with np.load(p, allow_pickle=False) as z:  # plain arrays, no pickles
        assert sorted(z.files) == ["class_ids", "logits", "sample_ids", "targets"]
    assert find_predictions(tmp_path / "run", "val") == p and prediction_splits(tmp_path / "run") == ["val"]
    assert find_predictions(tmp_path / "run", "test") is None


def test_the_old_top_level_file_is_still_read(tmp_path: Path) -> None:
    old = _write(tmp_path / "ev" / "predictions.npz")
    assert find_predictions(tmp_path / "ev", "val") == old
    assert read_predictions(old).logits.shape == (4, 3)
    _write(predictions_path(tmp_path / "ev", "val"))  # the current layout wins where both exist
    assert find_predictions(tmp_path / "ev", "val") == tmp_path / "ev" / "predictions" / "val.npz"


def test_a_broken_or_unlabeled_file_is_named(tmp_path: Path) -> None:
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(DataError, match=r"member m \(.*bad\.npz\): cannot read it"):
        read_predictions(bad, where="member m")
    unlabeled = _write(tmp_path / "test.npz", targets=np.full(4, -1))
    assert read_predictions(unlabeled).targets.tolist() == [-1] * 4
    with pytest.raises(DataError, match=r"test\.npz: targets outside 0\.\.2"):
        read_predictions(unlabeled, labeled=True)
    nan = tmp_path / "nan.npz"
    write_predictions(nan, np.full((2, 3), np.nan), np.zeros(2), ["a", "b"], CLASSES)
    with pytest.raises(DataError, match="NaN or infinity"):
        read_predictions(nan)


def test_folder_kinds(tmp_path: Path) -> None:
    def make(name: str, *files: str) -> Path:
        d = tmp_path / name
        for f in files:
            (d / f).parent.mkdir(parents=True, exist_ok=True)
            (d / f).write_text("{}")
        return d

    run = make("run", "config.yaml", "metrics.json", "model.safetensors", "predictions/val.npz")
    unfinished = make("unfinished", "config.yaml")
    ev = make("ev", "metrics.json", "predictions/val.npz")
    old_ev = make("old-ev", "metrics.json", "predictions.npz")
    ens = make("ens", "weights.json", "metrics.json", "predictions/val.npz")
    exp = make("exp", "model_card.json", "model.safetensors")
    study = make("study", "study.yaml", "members/run/config.yaml")
    other = make("other", "metrics.json")
    kinds = {d.name: folder_kind(d) for d in (run, unfinished, ev, old_ev, ens, exp, study, other)}
    assert kinds == {
        "run": "run",
        "unfinished": "run",
        "ev": "evaluation",
        "old-ev": "evaluation",
        "ens": "ensemble",
        "exp": "export",
        "study": "study",
        "other": None,
    }
    assert is_run_dir(run) and not is_run_dir(unfinished)  # a model to load needs model.safetensors
    assert is_study_dir(study) and is_ensemble_dir(ens) and not is_ensemble_dir(run)
    assert [has_model(d) for d in (run, unfinished, ev, ens, exp)] == [True, False, True, False, True]
    assert folder_kind(tmp_path / "missing") is None and folder_kind(run / "config.yaml") is None


def test_one_summary_for_every_metrics_file() -> None:
    scores = np.array([[2.0, 1.0, 0.0], [0.0, 2.0, 1.0], [2.0, 0.0, 1.0], [0.0, 1.0, 2.0]])
    targets = np.array([0, 1, 2, 2])
    out = summarize(scores, targets, n_boot=200)
    assert set(out) == {"n", "top1", "top1_ci", "top5", "top5_ci", "nll", "ece"}
    assert out["n"] == 4 and out["top1"] == 0.75 and out["top5"] == 1.0
    assert out["top1_ci"][0] <= 0.75 <= out["top1_ci"][1] and 0.0 <= out["ece"] <= 1.0
    # log-probabilities give the same numbers as the logits they came from
    lp = scores - np.log(np.exp(scores).sum(1, keepdims=True))
    again = summarize(lp, targets, n_boot=200)
    assert again["top1_ci"] == out["top1_ci"] and again["top5_ci"] == out["top5_ci"]
    assert {k: again[k] for k in ("top1", "top5", "nll", "ece")} == pytest.approx(
        {k: out[k] for k in ("top1", "top5", "nll", "ece")}
    )
