"""Classification metrics against values worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from transferlab.artifacts.summary import summarize
from transferlab.metrics import (
    bootstrap_ci,
    log_softmax,
    nll,
    per_class_accuracy,
    softmax,
    topk_accuracy,
    topk_correct,
)

SCORES = np.array(
    [
        [0.1, 0.7, 0.2, 0.0],  # order 1, 2, 0, 3
        [0.5, 0.1, 0.3, 0.4],  # order 0, 3, 2, 1
        [0.0, 0.2, 0.3, 0.9],  # order 3, 2, 1, 0
    ]
)
TARGETS = np.array([1, 2, 0])


def test_topk_correct_by_hand() -> None:
    assert topk_correct(SCORES, TARGETS, 1).tolist() == [True, False, False]
    assert topk_correct(SCORES, TARGETS, 2).tolist() == [True, False, False]
    assert topk_correct(SCORES, TARGETS, 3).tolist() == [True, True, False]
    assert topk_correct(SCORES, TARGETS, 4).tolist() == [True, True, True]
    assert topk_correct(SCORES, TARGETS, 10).tolist() == [True, True, True]  # k > C is all classes


def test_topk_accuracy_by_hand() -> None:
    assert topk_accuracy(SCORES, TARGETS) == pytest.approx(1 / 3)
    assert topk_accuracy(SCORES, TARGETS, 3) == pytest.approx(2 / 3)
    assert topk_accuracy(SCORES, TARGETS, 4) == 1.0
    assert math.isnan(topk_accuracy(np.zeros((0, 4)), np.zeros(0, dtype=int)))


def test_ties_go_to_the_lower_class_index() -> None:
    tied = np.array([[1.0, 3.0, 3.0, 3.0]])
    assert topk_correct(tied, np.array([1]), 1).tolist() == [True]
    assert topk_correct(tied, np.array([2]), 1).tolist() == [False]
    assert topk_correct(tied, np.array([2]), 2).tolist() == [True]
    assert topk_correct(tied, np.array([3]), 2).tolist() == [False]
    all_equal = np.zeros((2, 5))
    assert topk_correct(all_equal, np.array([0, 4]), 1).tolist() == [True, False]
    assert topk_correct(all_equal, np.array([0, 4]), 4).tolist() == [True, False]


def test_topk_works_on_probabilities_and_float32() -> None:
    probs = softmax(SCORES).astype(np.float32)
    assert topk_correct(probs, TARGETS, 3).tolist() == [True, True, False]


def test_log_softmax_by_hand() -> None:
    lp = log_softmax(np.array([[0.0, math.log(3.0)]]))
    np.testing.assert_allclose(lp, [[math.log(0.25), math.log(0.75)]], rtol=1e-12)
    assert lp.dtype == np.float64
    np.testing.assert_allclose(softmax(np.array([[0.0, math.log(3.0)]])), [[0.25, 0.75]], rtol=1e-12)


def test_log_softmax_is_stable_for_huge_logits() -> None:
    big = np.array([[1000.0, 1000.0 + math.log(3.0)], [-1e4, -1e4], [1e300, 0.0]])
    lp = log_softmax(big)
    assert np.isfinite(lp[:2]).all()
    np.testing.assert_allclose(lp[0], [math.log(0.25), math.log(0.75)], rtol=1e-9)
    np.testing.assert_allclose(lp[1], [math.log(0.5)] * 2, rtol=1e-12)
    assert lp[2, 0] == 0.0 and lp[2, 1] == -1e300
    np.testing.assert_allclose(softmax(big).sum(axis=1), 1.0)
    # float16/float32 input is computed in float64, so no overflow in exp.
    lp16 = log_softmax(np.array([[60000.0, 0.0]], dtype=np.float16))
    assert lp16.dtype == np.float64 and lp16[0, 0] == 0.0


def test_nll_uniform_logits_is_log_c() -> None:
    for c in (2, 10, 200):
        logits = np.full((7, c), 3.5)
        targets = np.arange(7) % c
        assert nll(logits, targets) == pytest.approx(math.log(c), rel=1e-12)


def test_nll_two_class_by_hand() -> None:
    # p = softmax([0, ln 3]) = [0.25, 0.75]
    logits = np.array([[0.0, math.log(3.0)], [0.0, math.log(3.0)]])
    assert nll(logits, np.array([1, 1])) == pytest.approx(-math.log(0.75))
    assert nll(logits, np.array([0, 1])) == pytest.approx(-(math.log(0.25) + math.log(0.75)) / 2)


def test_nll_confident_and_wrong_is_finite_and_large() -> None:
    logits = np.array([[500.0, -500.0]])
    assert nll(logits, np.array([1])) == pytest.approx(1000.0)
    assert nll(logits, np.array([0])) == pytest.approx(0.0, abs=1e-12)
    assert math.isnan(nll(np.zeros((0, 2)), np.zeros(0, dtype=int)))


def test_per_class_accuracy_with_an_empty_class() -> None:
    scores = np.array(
        [
            [0.9, 0.1, 0.0, 0.0],  # t0 hit
            [0.1, 0.9, 0.0, 0.0],  # t0 miss
            [0.0, 0.9, 0.1, 0.0],  # t1 hit
            [0.0, 0.0, 0.0, 1.0],  # t3 hit
            [1.0, 0.0, 0.0, 0.0],  # t3 miss
            [0.0, 0.0, 0.2, 0.8],  # t3 hit
        ]
    )
    targets = np.array([0, 0, 1, 3, 3, 3])
    acc = per_class_accuracy(scores, targets, 4)
    assert acc.shape == (4,)
    assert acc[0] == pytest.approx(0.5)
    assert acc[1] == 1.0
    assert math.isnan(acc[2])
    assert acc[3] == pytest.approx(2 / 3)


def test_per_class_accuracy_trailing_empty_classes() -> None:
    acc = per_class_accuracy(np.array([[1.0, 0.0, 0.0]]), np.array([0]), 3)
    assert acc[0] == 1.0 and np.isnan(acc[1:]).all()


def test_bootstrap_ci_is_deterministic_for_a_seed() -> None:
    c = (np.random.default_rng(3).random(300) < 0.6).astype(int)
    a = bootstrap_ci(c, seed=7)
    assert a == bootstrap_ci(c, seed=7)
    assert a != bootstrap_ci(c, seed=8)


def test_bootstrap_ci_contains_the_mean_and_is_sensible() -> None:
    c = (np.random.default_rng(0).random(400) < 0.7).astype(np.int64)
    lo, hi = bootstrap_ci(c)
    m = c.mean()
    assert lo < m < hi
    # Normal approximation: half-width ~ 1.96 * sqrt(p (1 - p) / n) = 0.045 for p=0.7, n=400.
    half = 1.96 * math.sqrt(m * (1 - m) / len(c))
    assert (hi - lo) / 2 == pytest.approx(half, rel=0.2)


def test_bootstrap_ci_narrows_with_four_times_the_samples() -> None:
    small = np.tile([1, 0], 50)  # n=100, mean 0.5
    large = np.tile([1, 0], 200)  # n=400, mean 0.5
    lo_s, hi_s = bootstrap_ci(small)
    lo_l, hi_l = bootstrap_ci(large)
    w_small, w_large = hi_s - lo_s, hi_l - lo_l
    assert w_large < w_small
    assert w_large / w_small == pytest.approx(0.5, rel=0.2)  # width ~ 1/sqrt(n)


def test_bootstrap_ci_degenerate_inputs() -> None:
    assert bootstrap_ci(np.ones(50)) == (1.0, 1.0)
    assert bootstrap_ci(np.zeros(50, dtype=bool)) == (0.0, 0.0)
    lo, hi = bootstrap_ci(np.array([]))
    assert math.isnan(lo) and math.isnan(hi)


def test_bootstrap_ci_level() -> None:
    c = np.tile([1, 0, 0], 100)
    lo90, hi90 = bootstrap_ci(c, level=0.90)
    lo99, hi99 = bootstrap_ci(c, level=0.99)
    assert lo99 < lo90 < c.mean() < hi90 < hi99


def test_bootstrap_ci_chunking_does_not_change_the_result_shape() -> None:
    # n large enough that the resampling runs in several chunks (2e6 // n < n_boot).
    c = (np.arange(5000) % 4 == 0).astype(np.float64)
    lo, hi = bootstrap_ci(c, n_boot=1000)
    assert lo < 0.25 < hi
    assert hi - lo < 0.04


def test_summarize() -> None:
    out = summarize(SCORES, TARGETS, n_boot=200, seed=1)
    assert set(out) == {"n", "top1", "top1_ci", "top5", "top5_ci", "nll", "ece"}
    assert out["n"] == 3
    assert out["top1"] == pytest.approx(1 / 3)
    assert out["top5"] == 1.0  # only 4 classes
    assert out["nll"] == pytest.approx(nll(SCORES, TARGETS))
    lo, hi = out["top1_ci"]  # type: ignore[misc]
    assert 0.0 <= lo <= out["top1"] <= hi <= 1.0
    assert out == summarize(SCORES, TARGETS, n_boot=200, seed=1)
    assert isinstance(out["top1"], float) and isinstance(out["nll"], float)


def test_summarize_empty() -> None:
    out = summarize(np.zeros((0, 3)), np.zeros(0, dtype=int))
    assert out["n"] == 0
    assert math.isnan(out["top1"]) and math.isnan(out["top5"]) and math.isnan(out["nll"])  # type: ignore[arg-type]


def test_topk_on_integer_and_boolean_scores() -> None:
    # Unsigned vote counts: a naive -scores wraps around and ranks a zero count first.
    votes = np.array([[0, 5, 2], [3, 0, 3]], dtype=np.uint8)
    assert topk_correct(votes, np.array([1, 0]), 1).tolist() == [True, True]
    assert topk_correct(votes, np.array([0, 1]), 1).tolist() == [False, False]
    assert topk_correct(votes, np.array([2, 2]), 2).tolist() == [True, True]
    flags = np.array([[False, True, False]])
    assert topk_correct(flags, np.array([1]), 1).tolist() == [True]
    assert per_class_accuracy(votes, np.array([1, 0]), 3).tolist()[:2] == [1.0, 1.0]
