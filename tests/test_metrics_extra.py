"""Calibration, confusion, paired bootstrap and diversity metrics against values worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from transferlab.metrics import (
    confusion_matrix,
    error_correlation,
    expected_calibration_error,
    most_confused,
    paired_bootstrap,
    pairwise_disagreement,
    per_class_accuracy,
)


def test_ece_by_hand() -> None:
    # 15 bins of width 1/15. conf 0.9 -> bin (13/15, 14/15]; conf 0.7 -> bin (10/15, 11/15].
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.3, 0.7], [0.3, 0.7]])
    targets = np.array([0, 1, 1, 1])
    # bin 0.9: acc 1/2, conf 0.9 -> 0.4; bin 0.7: acc 1, conf 0.7 -> 0.3; each holds half the samples.
    assert expected_calibration_error(probs, targets) == pytest.approx(0.5 * 0.4 + 0.5 * 0.3)


def test_ece_bins_are_not_pooled() -> None:
    # Pooled in one bin: |0.5 - 0.75| = 0.25. In 15 bins: 0.5 * |1 - 0.95| + 0.5 * |0 - 0.55| = 0.3.
    probs = np.array([[0.95, 0.05], [0.55, 0.45]])
    targets = np.array([0, 1])
    assert expected_calibration_error(probs, targets) == pytest.approx(0.3)
    assert expected_calibration_error(probs, targets, n_bins=1) == pytest.approx(0.25)


def test_ece_zero_when_calibrated_and_edges() -> None:
    probs = np.tile([0.8, 0.2], (10, 1))
    targets = np.array([0] * 8 + [1] * 2)
    assert expected_calibration_error(probs, targets) == pytest.approx(0.0, abs=1e-12)
    # confidence exactly 1.0 lands in the last bin; a confident mistake costs its full confidence.
    assert expected_calibration_error(np.array([[1.0, 0.0]]), np.array([1])) == pytest.approx(1.0)
    assert math.isnan(expected_calibration_error(np.zeros((0, 3)), np.zeros(0, dtype=int)))


# targets 0 0 1 1 2 2 2, predicted 0 1 1 1 0 0 2
CM_SCORES = np.eye(3)[[0, 1, 1, 1, 0, 0, 2]]
CM_TARGETS = np.array([0, 0, 1, 1, 2, 2, 2])


def test_confusion_matrix_by_hand() -> None:
    cm = confusion_matrix(CM_SCORES, CM_TARGETS)
    assert cm.tolist() == [[1, 1, 0], [0, 2, 0], [2, 0, 1]]
    assert cm.dtype == np.int64
    np.testing.assert_allclose(np.diag(cm) / cm.sum(axis=1), per_class_accuracy(CM_SCORES, CM_TARGETS, 3))
    # ties go to the lower index, as in topk_correct
    assert confusion_matrix(np.array([[0.5, 0.5]]), np.array([1])).tolist() == [[0, 0], [1, 0]]
    assert confusion_matrix(np.zeros((0, 2)), np.zeros(0, dtype=int)).tolist() == [[0, 0], [0, 0]]


def test_most_confused_with_names() -> None:
    cm = confusion_matrix(CM_SCORES, CM_TARGETS)
    pairs = most_confused(cm, k=5, class_ids=["n1", "n2", "n3"], class_names=["cat", "dog", "fox"])
    assert len(pairs) == 2
    assert pairs[0] == {
        "true": 2,
        "predicted": 0,
        "count": 2,
        "rate": pytest.approx(2 / 3),
        "true_id": "n3",
        "predicted_id": "n1",
        "true_name": "fox",
        "predicted_name": "cat",
    }
    assert (pairs[1]["true_name"], pairs[1]["predicted_name"], pairs[1]["count"]) == ("cat", "dog", 1)
    assert pairs[1]["rate"] == pytest.approx(0.5)
    assert most_confused(cm, k=1)[0] == {"true": 2, "predicted": 0, "count": 2, "rate": pytest.approx(2 / 3)}
    assert most_confused(cm, min_count=2, k=10) == most_confused(cm, k=1)
    with pytest.raises(ValueError, match="class names"):
        most_confused(cm, class_names=["a"])


def test_most_confused_ties_by_rate_then_index() -> None:
    # 0->1 once of 4 (rate .25), 2->1 once of 1 (rate 1), 1->0 once of 2 (rate .5)
    cm = np.array([[3, 1, 0], [1, 1, 0], [0, 1, 0]])
    assert [(p["true"], p["predicted"]) for p in most_confused(cm)] == [(2, 1), (1, 0), (0, 1)]


def test_paired_bootstrap_always_better_or_worse() -> None:
    a = np.ones(50)
    b = np.zeros(50)
    up = paired_bootstrap(a, b, n_boot=200, seed=1)
    assert up["gain"] == 1.0 and up["p_gain_positive"] == 1.0 and up["ci"] == [1.0, 1.0]
    down = paired_bootstrap(b, a, n_boot=200, seed=1)
    assert down["gain"] == -1.0 and down["p_gain_positive"] == 0.0
    # strictly better on every sample by a small continuous margin: still certain
    rng = np.random.default_rng(0)
    x = rng.random(80)
    assert paired_bootstrap(x + 0.01, x, n_boot=200)["p_gain_positive"] == 1.0
    assert paired_bootstrap(x - 0.01, x, n_boot=200)["p_gain_positive"] == 0.0
    same = paired_bootstrap(x, x, n_boot=200)
    assert same["gain"] == 0.0 and same["p_gain_positive"] == 0.0 and same["ci"] == [0.0, 0.0]


def test_paired_bootstrap_mixed_case() -> None:
    # a is right on 60 of 100, b on 50, a's hits a superset of b's: the gain is 0.1 and every resample
    # that contains one of the 10 extra hits is positive.
    a = np.r_[np.ones(60), np.zeros(40)]
    b = np.r_[np.ones(50), np.zeros(50)]
    r = paired_bootstrap(a, b, n_boot=2000, seed=0)
    assert r["gain"] == pytest.approx(0.1)
    lo, hi = r["ci"]
    assert 0.0 < lo < 0.1 < hi < 0.2
    assert r["p_gain_positive"] == 1.0  # P(no extra hit in 100 draws) = 0.9**100, about 3e-5
    assert r["n_boot"] == 2000
    with pytest.raises(ValueError, match="1-D"):
        paired_bootstrap(a, b[:10])


def test_pairwise_disagreement_by_hand() -> None:
    preds = np.array([[0, 1, 2, 3], [0, 1, 2, 0], [1, 1, 1, 1]])
    d = pairwise_disagreement(preds)
    np.testing.assert_allclose(d, [[0, 0.25, 0.75], [0.25, 0, 0.75], [0.75, 0.75, 0]])


def test_error_correlation_by_hand() -> None:
    correct = np.array(
        [
            [1, 1, 0, 0],  # errors 0 0 1 1
            [1, 1, 0, 0],  # same errors: +1
            [0, 0, 1, 1],  # opposite errors: -1
            [0, 1, 0, 1],  # errors 1 0 1 0: unrelated to member 0
            [1, 1, 1, 1],  # never wrong: undefined
        ],
        dtype=bool,
    )
    r = error_correlation(correct)
    assert r[0, 1] == pytest.approx(1.0) and r[0, 2] == pytest.approx(-1.0) and r[0, 3] == pytest.approx(0.0)
    assert r[0, 0] == pytest.approx(1.0)
    assert np.isnan(r[4]).all() and np.isnan(r[:, 4]).all()
    np.testing.assert_allclose(r, r.T, equal_nan=True)
    # errors 1 1 1 0 vs 1 1 0 0: cov 0.125, sds sqrt(3)/4 and 1/2 -> 1/sqrt(3)
    r2 = error_correlation(np.array([[0, 0, 0, 1], [0, 0, 1, 1]], dtype=bool))
    assert r2[0, 1] == pytest.approx(1 / math.sqrt(3))
