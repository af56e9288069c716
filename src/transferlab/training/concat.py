"""One linear probe on the features of several backbones side by side (``kind: concat`` in a study).

Why. An ensemble averages what separate probes learned; a probe on the concatenated features learns which
backbone to trust for which class, jointly, from the same labels, at the cost of one more L-BFGS fit on
features that are already cached. The member runs must be feature-cache probes on the same data, samples,
holdout and report split (a study's probes with the same seed and holdout are).

The fit is the tuned probe's (:func:`~transferlab.training.logistic.tune_logistic`): the penalty chosen on
the runs' shared holdout, then a refit on all of train. Its prior is the average of the members' priors (each
backbone's ImageNet rows divided by the number of backbones, side by side; the biases averaged): the
penalty pulls towards the mean of the members' zero-shot logits, or towards zero where a member has no
prior. With mirrored features in every member, mirrors are fitted on and averaged for scoring as in
``--flip-features``.

The folder: ``metrics.json`` (as an evaluation's, with ``strategy: concat-probe`` and the members),
``predictions/<report split>.npz``, ``predictions/holdout.npz`` (the pre-refit head on the holdout rows)
and ``head.safetensors`` (the raw-feature weight and bias, columns in the members' order).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from transferlab.artifacts.predictions import predictions_path, write_predictions
from transferlab.artifacts.summary import summarize
from transferlab.errors import ConfigError
from transferlab.io import atomic_write_json
from transferlab.models.weights import save_weights
from transferlab.options import check, option
from transferlab.runtime import versions
from transferlab.training.logistic import logits_of, tune_logistic
from transferlab.training.run import ProbeFeatures, probe_features

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ConcatConfig:
    """A probe on the concatenated features of ``members`` (feature-cache probe run folders)."""

    members: tuple[Path, ...] = option(help="linear-probe run folders whose features are concatenated", nargs="+")
    out: Path = option(help="output folder (created)", required=True)
    l2_grid: tuple[float, ...] | None = option(
        None, "penalty path of the L-BFGS fit", nargs="+", default_text="the tuned probe's"
    )
    seed: int = option(0, "seed of the bootstrap intervals", lo=0, hi=2**63 - 1)

    def __post_init__(self) -> None:
        check(self)
        if len(self.members) < 2:
            raise ConfigError(f"a concatenated probe needs at least two runs, got {len(self.members)}")


def _same(feats: list[ProbeFeatures], members: tuple[Path, ...]) -> None:
    """Refuse members that were not fitted and scored on the same rows."""
    first = feats[0]
    for d, f in zip(members[1:], feats[1:], strict=True):
        checks = {
            "train samples": f.train_ids == first.train_ids,
            "report samples": f.report_ids == first.report_ids and f.report_split == first.report_split,
            "holdout": np.array_equal(f.hold_pos, first.hold_pos),
            "classes": f.class_ids == first.class_ids,
            "mirrored features": (f.x_train_mirror is None) == (first.x_train_mirror is None),
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise ConfigError(
                f"{d} and {members[0]} differ in their {', '.join(bad)}; a concatenated probe needs runs on the same "
                "data, seed, holdout and report split (and --flip-features in all or none)"
            )


def _prior(feats: list[ProbeFeatures]) -> tuple[np.ndarray, np.ndarray] | None:
    """The members' priors side by side, each divided by their number (the mean of their logits)."""
    k = len(feats)
    if any(f.prior is None for f in feats):
        return None
    w = np.concatenate([f.prior[0] / k for f in feats if f.prior is not None], axis=1)
    b = np.mean([f.prior[1] for f in feats if f.prior is not None], axis=0)
    return w.astype(np.float32), b.astype(np.float32)


def fit_concat(cfg: ConcatConfig) -> dict[str, Any]:
    """Fit and score the concatenated probe; write its folder. Returns metrics.json's content."""
    t0 = time.perf_counter()
    feats = [probe_features(d) for d in cfg.members]
    _same(feats, cfg.members)
    first = feats[0]
    x = np.concatenate([f.x_train for f in feats], axis=1)
    x_report = np.concatenate([f.x_report for f in feats], axis=1)
    y = first.y_train
    fit, hold = first.fit_pos, first.hold_pos
    if first.x_train_mirror is not None:
        m = np.concatenate([f.x_train_mirror for f in feats if f.x_train_mirror is not None], axis=1)
        x_fit, y_fit = np.concatenate([x[fit], m[fit]]), np.concatenate([y[fit], y[fit]])
        x_hold = (x[hold] + m[hold]) * np.float32(0.5)
        x_all, y_all = np.concatenate([x, m]), np.concatenate([y, y])
    else:
        x_fit, y_fit, x_hold, x_all, y_all = x[fit], y[fit], x[hold], x, y
    t_feat = time.perf_counter() - t0
    log.info(
        "concatenated probe: %d runs, %d features, %d fit rows, %d holdout rows",
        len(feats),
        x.shape[1],
        len(y_fit),
        len(hold),
    )
    prior = _prior(feats)
    t1 = time.perf_counter()
    res = tune_logistic(x_fit, y_fit, x_hold, y[hold], x_all, y_all, first.num_classes, grid=cfg.l2_grid, prior=prior)
    t_fit = time.perf_counter() - t1
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    logits = logits_of((res.weight, res.bias), x_report)
    write_predictions(
        predictions_path(out, first.report_split), logits, first.y_report, first.report_ids, first.class_ids
    )
    hold_ids = [first.train_ids[i] for i in hold]
    hold_logits = logits_of((res.fit_weight, res.fit_bias), x_hold)
    write_predictions(predictions_path(out, "holdout"), hold_logits, y[hold], hold_ids, first.class_ids)
    save_weights(out / "head.safetensors", {"weight": torch.from_numpy(res.weight), "bias": torch.from_numpy(res.bias)})
    names = [str(d) for d in cfg.members]
    metrics: dict[str, Any] = {
        "model": " + ".join(Path(d).name for d in cfg.members),
        "strategy": "concat-probe",
        "bn": "eval",
        "head": "linear on concatenated features",
        "members": names,
        "split": first.report_split,
        **summarize(logits, first.y_report, seed=cfg.seed),
        "num_classes": first.num_classes,
        "params_trained": int(res.weight.size + res.bias.size),
        "features": int(x.shape[1]),
        "flip_features": first.x_train_mirror is not None,
        "selection": f"L2 penalty by holdout NLL on the runs' shared holdout ({len(hold)} train images); "
        f"{first.report_split} was not used for any choice",
        "probe": {
            "solver": "lbfgs",
            "prior": "mean of the members' priors" if prior is not None else "zero",
            "l2": res.l2,
            "grid": res.table,
            "refit": True,
            "refit_rows": len(y_all),
        },
        "feature_seconds": round(t_feat, 2),
        "fit_seconds": round(t_fit, 2),
        "wall_s": round(time.perf_counter() - t0, 2),
        "versions": versions(),
    }
    atomic_write_json(out / "metrics.json", metrics)
    return metrics
