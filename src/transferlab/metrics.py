"""Classification metrics as pure functions on NumPy arrays.

Everything here takes logits or probabilities of shape (N, C) and integer targets of shape (N,), so it
works the same on a fresh evaluation and on prediction files read back from disk.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Numerically stable log-softmax over the last axis, in float64."""
    x = np.asarray(logits, dtype=np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def softmax(logits: np.ndarray) -> np.ndarray:
    """Softmax over the last axis, in float64."""
    return np.exp(log_softmax(logits))


def topk_correct(scores: np.ndarray, targets: np.ndarray, k: int) -> np.ndarray:
    """Boolean (N,) array: is the target among the ``k`` highest scores?

    Ties are broken towards the lower class index (stable sort), so the result is deterministic.
    """
    scores = np.asarray(scores)
    if not np.issubdtype(scores.dtype, np.floating):
        # Negating unsigned ints wraps (-0 stays the smallest) and negating bools raises: vote counts
        # or 0/1 scores are ranked as floats.
        scores = scores.astype(np.float64)
    targets = np.asarray(targets)
    k = min(k, scores.shape[1])
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return (order == targets[:, None]).any(axis=1)


def topk_accuracy(scores: np.ndarray, targets: np.ndarray, k: int = 1) -> float:
    """Fraction of samples whose target is in the top ``k``."""
    return float(topk_correct(scores, targets, k).mean()) if len(targets) else float("nan")


def nll(logits: np.ndarray, targets: np.ndarray) -> float:
    """Mean negative log-likelihood (cross-entropy) of the targets under softmax(logits)."""
    lp = log_softmax(logits)
    return float(-lp[np.arange(len(targets)), targets].mean()) if len(targets) else float("nan")


def per_class_accuracy(scores: np.ndarray, targets: np.ndarray, num_classes: int) -> np.ndarray:
    """Top-1 accuracy of each class (NaN for a class with no samples)."""
    correct = topk_correct(scores, targets, 1).astype(np.float64)
    counts = np.bincount(targets, minlength=num_classes).astype(np.float64)
    hits = np.bincount(targets, weights=correct, minlength=num_classes)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, hits / np.maximum(counts, 1), np.nan)


def _resampled_means(values: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """The means of ``n_boot`` seeded resamples (with replacement) of ``values``, drawn in chunks of at most
    ~2M indices so that memory stays flat for large sets."""
    n = len(values)
    rng = np.random.default_rng(seed)
    means = np.empty(n_boot)
    chunk = max(1, 2_000_000 // n)
    for start in range(0, n_boot, chunk):
        stop = min(n_boot, start + chunk)
        idx = rng.integers(0, n, size=(stop - start, n))
        means[start:stop] = values[idx].mean(axis=1)
    return means


def bootstrap_ci(correct: np.ndarray, *, n_boot: int = 1000, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval for the mean of a 0/1 vector (e.g. top-1 hits).

    Resampling the evaluation set says how much the accuracy would move on another draw of the same
    size; with 5,000 images the 95% interval is about +-1.4 points, which is why small differences
    between models must not be over-read.
    """
    c = np.asarray(correct, dtype=np.float64)
    n = len(c)
    if n == 0:
        return (float("nan"), float("nan"))
    means = _resampled_means(c, n_boot, seed)
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(means, [alpha, 1.0 - alpha])
    return (float(lo), float(hi))


def expected_calibration_error(probs: np.ndarray, targets: np.ndarray, n_bins: int = 15) -> float:
    """Expected calibration error with ``n_bins`` equal-width confidence bins (Guo et al. 2017).

    Confidence is the top-1 probability; bin ``b`` holds confidences in ``(b/n_bins, (b+1)/n_bins]``
    (a confidence of exactly 0 goes to the first bin). ECE is the sample-weighted mean of
    ``|accuracy - mean confidence|`` over the bins, so an over-confident model that says 0.99 and is
    right 80% of the time scores about 0.19. Input must be probabilities, not logits: ECE is about what
    the model claims, so rescaling would change the answer.
    """
    p = np.asarray(probs, dtype=np.float64)
    t = np.asarray(targets)
    if len(t) == 0:
        return float("nan")
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    conf = p.max(axis=1)
    correct = topk_correct(p, t, 1).astype(np.float64)
    bins = np.clip(np.ceil(conf * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    counts = np.bincount(bins, minlength=n_bins).astype(np.float64)
    conf_sum = np.bincount(bins, weights=conf, minlength=n_bins)
    hit_sum = np.bincount(bins, weights=correct, minlength=n_bins)
    # sum_b (n_b / N) * |acc_b - conf_b| == sum_b |hits_b - conf_sum_b| / N
    return float(np.abs(hit_sum - conf_sum).sum() / counts.sum())


def confusion_matrix(scores: np.ndarray, targets: np.ndarray, num_classes: int | None = None) -> np.ndarray:
    """(C, C) int64 counts: row = true class, column = predicted (top-1, ties to the lower index).

    Rows sum to the class counts, so row-normalising gives per-class recall and the diagonal over the
    row sum is :func:`per_class_accuracy`.
    """
    s = np.asarray(scores)
    t = np.asarray(targets, dtype=np.int64)
    c = s.shape[1] if num_classes is None else num_classes
    if len(t) == 0:
        return np.zeros((c, c), dtype=np.int64)
    if not np.issubdtype(s.dtype, np.floating):
        s = s.astype(np.float64)
    pred = np.argsort(-s, axis=1, kind="stable")[:, 0]
    return np.bincount(t * c + pred, minlength=c * c).reshape(c, c).astype(np.int64)


def most_confused(
    confusion: np.ndarray,
    *,
    k: int = 10,
    class_ids: Sequence[str] | None = None,
    class_names: Sequence[str] | None = None,
    min_count: int = 1,
) -> list[dict[str, object]]:
    """The ``k`` largest off-diagonal cells of a confusion matrix, as (true -> predicted) pairs.

    Pairs are ordered: "a taken for b" and "b taken for a" are different mistakes and are listed
    separately. Ordered by count, then by the rate within the true class, then by class index, so the
    list is deterministic. ``class_ids``/``class_names`` (aligned with the class index) are copied into
    each entry so that a reader sees "tabby cat -> tiger cat" rather than "281 -> 282".
    """
    cm = np.asarray(confusion, dtype=np.int64)
    c = cm.shape[0]
    row = cm.sum(axis=1)
    off = cm.copy()
    np.fill_diagonal(off, 0)
    ti, pi = np.nonzero(off >= max(1, min_count))
    counts = off[ti, pi]
    rates = counts / np.maximum(row[ti], 1)
    # lexsort: last key is primary. Count desc, rate desc, then true index, predicted index ascending.
    order = np.lexsort((pi, ti, -rates, -counts))[: max(0, k)]
    out: list[dict[str, object]] = []
    for j in order:
        a, b = int(ti[j]), int(pi[j])
        e: dict[str, object] = {"true": a, "predicted": b, "count": int(counts[j]), "rate": float(rates[j])}
        if class_ids is not None:
            if len(class_ids) != c:
                raise ValueError(f"{len(class_ids)} class ids for a {c}-class confusion matrix")
            e["true_id"], e["predicted_id"] = str(class_ids[a]), str(class_ids[b])
        if class_names is not None:
            if len(class_names) != c:
                raise ValueError(f"{len(class_names)} class names for a {c}-class confusion matrix")
            e["true_name"], e["predicted_name"] = str(class_names[a]), str(class_names[b])
        out.append(e)
    return out


def paired_bootstrap(
    values_a: np.ndarray,
    values_b: np.ndarray,
    *,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> dict[str, float | list[float] | int]:
    """Paired bootstrap of ``mean(a) - mean(b)`` where a and b are per-sample scores of two models.

    Both models are resampled on the SAME sample indices, so what is shared (easy and hard images)
    cancels and only the difference between the models varies: this is much tighter, and the only
    correct test, compared with two independent intervals that overlap. Returns the observed gain, the
    percentile interval of the gain and ``p_gain_positive``, the fraction of resamples where a beats b
    strictly (ties count as not positive, so two identical models give 0, not 0.5).
    """
    a = np.asarray(values_a, dtype=np.float64)
    b = np.asarray(values_b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired values must be two 1-D arrays of one length, got {a.shape} and {b.shape}")
    n = len(a)
    if n == 0:
        return {"gain": float("nan"), "ci": [float("nan"), float("nan")], "p_gain_positive": float("nan"), "n_boot": 0}
    d = a - b
    gains = _resampled_means(d, n_boot, seed)
    alpha = (1.0 - level) / 2.0
    if n_boot:
        lo, hi = (float(x) for x in np.quantile(gains, [alpha, 1.0 - alpha]))
        p_pos = float((gains > 0).mean())
    else:
        lo = hi = p_pos = float("nan")
    return {"gain": float(d.mean()), "ci": [lo, hi], "p_gain_positive": p_pos, "n_boot": int(n_boot)}


def pairwise_disagreement(predictions: np.ndarray) -> np.ndarray:
    """(M, M) fraction of samples on which members i and j predict different classes.

    ``predictions`` is (M, N) integer top-1 predictions. Members that never disagree add nothing to a
    vote or an average; the diagonal is 0.
    """
    p = np.asarray(predictions)
    if p.ndim != 2:
        raise ValueError(f"predictions must be (M, N), got shape {p.shape}")
    m, n = p.shape
    if n == 0:
        return np.full((m, m), np.nan)
    return (p[:, None, :] != p[None, :, :]).mean(axis=2)


def error_correlation(correct: np.ndarray) -> np.ndarray:
    """(M, M) Pearson correlation of the members' 0/1 error indicators.

    ``correct`` is (M, N) booleans (top-1 hits). 1 means two members fail on exactly the same samples
    (averaging them cannot help), 0 that their errors are unrelated, negative that one tends to be right
    where the other is wrong. NaN where a member's error indicator is constant (never or always wrong):
    the correlation is undefined there, not zero. The diagonal is 1 for members with varying errors.
    """
    e = 1.0 - np.asarray(correct, dtype=np.float64)
    if e.ndim != 2:
        raise ValueError(f"correct must be (M, N), got shape {e.shape}")
    m = e.shape[0]
    if e.shape[1] == 0:
        return np.full((m, m), np.nan)
    centred = e - e.mean(axis=1, keepdims=True)
    cov = centred @ centred.T / e.shape[1]
    sd = np.sqrt(np.diag(cov))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = cov / np.outer(sd, sd)
    r[(sd == 0)[:, None] | (sd == 0)[None, :]] = np.nan
    return np.clip(r, -1.0, 1.0)
