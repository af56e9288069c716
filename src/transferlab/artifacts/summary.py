"""The headline metrics of one set of predictions: one function for evaluate, train, ensemble, study and report.

Every ``metrics.json`` (and every row of the report's summary table) carries the same keys, computed the same
way: ``n``, ``top1`` and ``top5`` with a 95% bootstrap interval each (resampling the evaluated images:
another draw of the same size could land anywhere in it), ``nll`` and ``ece`` (15 equal-width bins).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from transferlab.metrics import bootstrap_ci, expected_calibration_error, nll, softmax, topk_correct

ECE_BINS = 15


def summarize(scores: np.ndarray, targets: np.ndarray, *, n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """n, top1 (+95% CI), top5 (+95% CI), nll and ece of ``scores`` (logits or log-probabilities) on ``targets``.

    ``n_boot=0`` skips the intervals (they are then NaN).
    """
    n = len(targets)
    c1 = topk_correct(scores, targets, 1)
    c5 = topk_correct(scores, targets, 5)
    lo1, hi1 = bootstrap_ci(c1, n_boot=n_boot, seed=seed) if n_boot else (float("nan"), float("nan"))
    lo5, hi5 = bootstrap_ci(c5, n_boot=n_boot, seed=seed) if n_boot else (float("nan"), float("nan"))
    return {
        "n": n,
        "top1": float(c1.mean()) if n else float("nan"),
        "top1_ci": [round(lo1, 6), round(hi1, 6)],
        "top5": float(c5.mean()) if n else float("nan"),
        "top5_ci": [round(lo5, 6), round(hi5, 6)],
        "nll": nll(scores, targets),
        "ece": expected_calibration_error(softmax(scores), targets, ECE_BINS) if n else float("nan"),
    }
