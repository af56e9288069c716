"""Ensembles of saved predictions, measured on data that nothing was fitted on.

Members are prediction files (``predictions/<split>.npz`` of a run, or an ``evaluate`` output), so an
ensemble never re-runs a model and members may differ in architecture or input resolution. They must
agree on the samples (ids and order) and on the class list; otherwise the rows or columns would be
averaged across different images or classes without any error, so that is refused.

Protocol: the evaluation data is cut once into a seeded, class-stratified ``select`` part and a
``report`` part (or the members' predictions on another split are given for ``select``, and all of the
evaluation data is ``report``). Everything that is fitted - temperatures, weights, the greedy selection,
the stacking model, and which member counts as "the best" - sees the ``select`` rows only; every
number written comes from the ``report`` rows. Fitting and reporting on the same rows would reward
the combination that overfits those rows, which is exactly what an ensemble study must not do.

Methods:

* ``mean``: average of the members' probabilities.
* ``vote``: majority of the members' top-1, ties broken by summed probability (then lower class index).
* ``weighted``: a convex combination of probabilities whose weights minimise NLL on ``select``.
* ``greedy``: Caruana et al. (2004) forward selection with replacement, started from the best member.
* ``stack``: multinomial logistic regression on the concatenated members' log-probabilities.

``--temperature`` first fits one temperature per member by NLL on ``select``.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from transferlab.artifacts.predictions import (
    LEGACY_FILE,
    PREDICTIONS_DIR,
    Predictions,
    find_predictions,
    prediction_splits,
    predictions_path,
    read_predictions,
    write_predictions,
)
from transferlab.artifacts.summary import ECE_BINS, summarize
from transferlab.data import open_dataset
from transferlab.data.resolve import DATA_HELP
from transferlab.errors import ConfigError, DataError
from transferlab.io import atomic_write_json, atomic_write_with
from transferlab.metrics import (
    confusion_matrix,
    error_correlation,
    expected_calibration_error,
    log_softmax,
    most_confused,
    nll,
    paired_bootstrap,
    pairwise_disagreement,
    per_class_accuracy,
    topk_correct,
)
from transferlab.options import check, option

log = logging.getLogger(__name__)

METHODS = ("mean", "vote", "weighted", "greedy", "stack")
GREEDY_METRICS = ("nll", "accuracy")
FORMAT = "transferlab-ensemble"
FORMAT_VERSION = 1
# Temperatures are searched in [T_MIN, T_MAX]; a member that is right on every select sample with a
# margin would otherwise drive T to 0.
T_MIN, T_MAX = 0.01, 100.0


# --------------------------------------------------------------------------------------------------
# Members


@dataclass
class Member(Predictions):
    """One member's predictions on one split (a checked predictions file), with the argument that named it."""

    spec: str = ""

    @property
    def name(self) -> str:
        """A short label for tables: the run directory's name, or the file's stem."""
        p = self.path
        if p.parent.name == PREDICTIONS_DIR:
            return p.parent.parent.name
        if p.name == LEGACY_FILE:
            return p.parent.name
        return p.stem


def resolve_member(spec: str | Path, split: str = "val") -> Path:
    """The predictions file a member argument stands for: a folder's predictions on ``split``
    (artifacts.predictions.find_predictions), or an ``.npz`` file itself."""
    p = Path(spec)
    if p.is_dir():
        found = find_predictions(p, split)
        if found is not None:
            return found
        have = prediction_splits(p)
        hint = (
            f"it has predictions for {', '.join(have)}: pass --split {have[0]}"
            if have
            else "run `transferlab evaluate` on it and pass the folder it writes"
        )
        raise DataError(f"member {spec}: no {PREDICTIONS_DIR}/{split}.npz in this folder; {hint}")
    if not p.is_file():
        raise DataError(f"member {spec}: no such file or folder; pass a run directory or a predictions .npz")
    return p


def load_member(spec: str | Path, split: str = "val") -> Member:
    """Read and check one member's predictions file (no pickles)."""
    path = resolve_member(spec, split)
    preds = read_predictions(path, where=f"member {spec}", labeled=True)
    return Member(preds.path, preds.logits, preds.targets, preds.sample_ids, preds.class_ids, spec=str(spec))


def check_members(members: Sequence[Member], *, role: str = "member") -> None:
    """Refuse members that do not describe the same samples in the same order with the same classes.

    The first member is the reference; the message names the member that differs and how.
    """
    if not members:
        raise ConfigError("no members given")
    ref = members[0]
    for m in members[1:]:
        who = f"{role} {m.spec}"
        against = f"the first {role} {ref.spec}"
        if len(m.class_ids) != len(ref.class_ids) or not np.array_equal(m.class_ids, ref.class_ids):
            if set(m.class_ids.tolist()) == set(ref.class_ids.tolist()):
                what = "the same classes in a different order"
            else:
                extra = sorted(set(m.class_ids.tolist()) - set(ref.class_ids.tolist()))[:3]
                what = f"{len(m.class_ids)} classes instead of {len(ref.class_ids)}" + (
                    f" (e.g. {', '.join(extra)} not in the first)" if extra else ""
                )
            raise DataError(f"{who} has {what} compared with {against}; members must share one class list")
        if not np.array_equal(m.sample_ids, ref.sample_ids):
            if len(m.sample_ids) == len(ref.sample_ids) and set(m.sample_ids.tolist()) == set(ref.sample_ids.tolist()):
                i = int(np.argmax(m.sample_ids != ref.sample_ids))
                what = (
                    f"the same {len(m.sample_ids)} samples in a different order (row {i}: {m.sample_ids[i]!r} vs "
                    f"{ref.sample_ids[i]!r})"
                )
            else:
                only = sorted(set(m.sample_ids.tolist()) - set(ref.sample_ids.tolist()))
                what = f"{len(m.sample_ids)} samples instead of {len(ref.sample_ids)}" + (
                    f", {len(only)} of them not in the first (e.g. {only[0]!r})" if only else ""
                )
            raise DataError(
                f"{who} has {what} compared with {against}; evaluate every member on the same split without "
                "--limit (or with the same --limit and --seed)"
            )
        if not np.array_equal(m.targets, ref.targets):
            n = int((m.targets != ref.targets).sum())
            raise DataError(
                f"{who} disagrees with {against} on the labels of {n} samples; they come from different data"
            )


def load_members(specs: Sequence[str | Path], split: str = "val", *, role: str = "member") -> list[Member]:
    """Load every member and check that they line up (see :func:`check_members`)."""
    members = [load_member(s, split) for s in specs]
    check_members(members, role=role)
    return members


# --------------------------------------------------------------------------------------------------
# The select/report protocol


def stratified_select_mask(targets: np.ndarray, fraction: float = 0.5, seed: int = 0) -> np.ndarray:
    """Boolean mask of the ``select`` rows: a seeded, class-stratified ``fraction`` of the samples.

    Each class contributes ``floor(fraction * n_c)`` samples; the rows left over to reach
    ``round(fraction * N)`` go to classes with the largest remainders (ties in a seeded order), so the
    split is balanced even with one or two samples per class. It depends on the targets, the fraction
    and the seed only - never on the predictions - so it is the same for every method and member set.
    """
    if not 0.0 < fraction < 1.0:
        raise ConfigError(f"--select-fraction must be strictly between 0 and 1, got {fraction}")
    t = np.asarray(targets, dtype=np.int64)
    n = len(t)
    rng = np.random.default_rng(seed)
    classes = np.unique(t)
    per_class = [np.flatnonzero(t == c) for c in classes]
    counts = np.array([len(ix) for ix in per_class], dtype=np.float64)
    base = np.floor(fraction * counts).astype(np.int64)
    extra = round(fraction * n) - int(base.sum())
    if extra > 0:
        remainder = fraction * counts - base
        tie = rng.permutation(len(classes))
        order = np.lexsort((tie, -remainder))
        base[order[:extra]] += 1
    mask = np.zeros(n, dtype=bool)
    for ix, k in zip(per_class, base, strict=True):
        mask[rng.permutation(ix)[:k]] = True
    return mask


def _ids_sha256(ids: Sequence[str] | np.ndarray) -> str:
    h = hashlib.sha256()
    for s in ids:
        h.update(str(s).encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()


# --------------------------------------------------------------------------------------------------
# Fitting (sees select rows only) and combining


def _logsumexp(x: np.ndarray, axis: int) -> np.ndarray:
    mx = np.max(x, axis=axis, keepdims=True)
    mx = np.where(np.isfinite(mx), mx, 0.0)
    return np.squeeze(mx, axis=axis) + np.log(np.sum(np.exp(x - mx), axis=axis))


def fit_temperature(logits: np.ndarray, targets: np.ndarray) -> float:
    """The temperature T minimising NLL of ``softmax(logits / T)`` (Guo et al. 2017).

    NLL is convex in ``beta = 1/T`` and its derivative, ``mean(E_p[z] - z_y)``, is increasing, so the
    optimum is found by bisection on the derivative (in log space, within [T_MIN, T_MAX]) - exact and
    deterministic, with no optimiser settings to tune.
    """
    z = np.asarray(logits, dtype=np.float64)
    t = np.asarray(targets, dtype=np.int64)
    if len(t) == 0:
        return 1.0
    zy = z[np.arange(len(t)), t]

    def slope(log_beta: float) -> float:
        p = np.exp(log_softmax(z * math.exp(log_beta)))
        return float(((p * z).sum(axis=1) - zy).mean())

    lo, hi = math.log(1.0 / T_MAX), math.log(1.0 / T_MIN)
    if slope(hi) <= 0.0:
        return T_MIN
    if slope(lo) >= 0.0:
        return T_MAX
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if slope(mid) > 0.0:
            hi = mid
        else:
            lo = mid
    return float(1.0 / math.exp(0.5 * (lo + hi)))


def fit_mixture_weights(
    log_probs: np.ndarray, targets: np.ndarray, *, max_iter: int = 5000, tol: float = 1e-12
) -> np.ndarray:
    """Non-negative weights summing to 1 that minimise NLL of ``sum_m w_m p_m`` (the ``weighted`` method).

    This is maximum likelihood for mixture proportions with fixed components, a convex problem; the EM
    update ``w_m <- mean_i(responsibility_im)`` increases the likelihood monotonically, stays on the
    simplex by construction and converges to the global optimum. Computed in log space so members that
    give a target probability that underflows do not produce 0/0.
    """
    lp = np.asarray(log_probs, dtype=np.float64)  # (M, N, C)
    t = np.asarray(targets, dtype=np.int64)
    m = lp.shape[0]
    if len(t) == 0:
        return np.full(m, 1.0 / m)
    ly = lp[:, np.arange(len(t)), t].T  # (N, M)
    w = np.full(m, 1.0 / m)
    for _ in range(max_iter):
        with np.errstate(divide="ignore"):
            a = np.log(w)[None, :] + ly
        r = np.exp(a - _logsumexp(a, axis=1)[:, None])
        new = r.mean(axis=0)
        new /= new.sum()
        done = np.abs(new - w).max() < tol
        w = new
        if done:
            break
    return w


def _mixture_log_probs(log_probs: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """log(sum_m w_m p_m) computed in log space; members with weight 0 are skipped."""
    keep = weights > 0
    lw = np.log(weights[keep])[:, None, None]
    return _logsumexp(lw + log_probs[keep], axis=0)


def _greedy_score(log_probs: np.ndarray, targets: np.ndarray, metric: str) -> tuple[float, float]:
    """A sort key (smaller is better): NLL, or (-accuracy, NLL) so accuracy ties are broken by NLL."""
    n = nll(log_probs, targets)
    if metric == "nll":
        return (n, 0.0)
    return (-float(topk_correct(log_probs, targets, 1).mean()), n)


def fit_greedy(
    log_probs: np.ndarray, targets: np.ndarray, *, metric: str = "nll", rounds: int = 25
) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Caruana et al. (2004) ensemble selection: forward selection WITH replacement.

    Start from the best single member; in each of ``rounds`` rounds add (again, if it helps most) the
    member whose addition gives the best ``metric`` for the average of the bag's probabilities. The bag
    kept is the best one seen over all rounds (earliest on ties), so extra rounds cannot make it worse on
    ``select``. Repeats act as integer weights. Returns the counts per member and the round history.
    """
    if metric not in GREEDY_METRICS:
        raise ConfigError(f"--greedy-metric must be one of {', '.join(GREEDY_METRICS)}, not {metric!r}")
    lp = np.asarray(log_probs, dtype=np.float64)
    m = lp.shape[0]
    probs = np.exp(lp)
    scores = [_greedy_score(lp[i], targets, metric) for i in range(m)]
    first = min(range(m), key=lambda i: scores[i])
    counts = np.zeros(m, dtype=np.int64)
    counts[first] = 1
    total = probs[first].copy()
    best_counts, best_score = counts.copy(), scores[first]
    history = [{"round": 0, "added": first, "nll": scores[first][0 if metric == "nll" else 1]}]
    if metric == "accuracy":
        history[0]["accuracy"] = -scores[first][0]
    for r in range(1, rounds + 1):
        k = counts.sum() + 1
        cand = []
        for i in range(m):
            with np.errstate(divide="ignore"):
                cand.append(_greedy_score(np.log((total + probs[i]) / k), targets, metric))
        pick = min(range(m), key=lambda i: cand[i])
        counts[pick] += 1
        total += probs[pick]
        entry: dict[str, Any] = {"round": r, "added": pick, "nll": cand[pick][0 if metric == "nll" else 1]}
        if metric == "accuracy":
            entry["accuracy"] = -cand[pick][0]
        history.append(entry)
        if cand[pick] < best_score:
            best_score, best_counts = cand[pick], counts.copy()
    return best_counts, history


def _stack_features(log_probs: np.ndarray) -> np.ndarray:
    """(N, M*C): the members' log-probabilities side by side, member-major."""
    m, n, c = log_probs.shape
    return np.ascontiguousarray(np.transpose(log_probs, (1, 0, 2)).reshape(n, m * c))


def _stack_prior(m: int, c: int) -> np.ndarray:
    """Coefficients of the equal-weight log-linear pool, ``(1/M) sum_m log p_m``: the stack's prior."""
    return np.tile(np.eye(c) / m, (1, m))


def fit_stack(
    log_probs: np.ndarray, targets: np.ndarray, *, l2: float = 1e-2, max_iter: int = 500
) -> tuple[np.ndarray, np.ndarray]:
    """Multinomial logistic regression on concatenated member log-probabilities (the ``stack`` method).

    ``z = X @ coef.T + intercept`` with X of shape (N, M*C). The L2 penalty ``l2/2 * ||coef - prior||^2``
    pulls towards the equal-weight log-linear pool rather than towards 0: with many classes and few
    select samples per class, shrinking to 0 would shrink towards the uniform distribution, whereas
    this prior is a sensible ensemble by itself, and the data only has to learn the corrections.
    Fitted in float64 with L-BFGS (strong Wolfe line search): the problem is convex, so the result does
    not depend on a learning rate or on the order of samples.
    """
    import torch

    lp = np.asarray(log_probs, dtype=np.float64)
    m, _, c = lp.shape
    x = torch.from_numpy(_stack_features(lp))
    y = torch.from_numpy(np.asarray(targets, dtype=np.int64))
    prior = torch.from_numpy(_stack_prior(m, c))
    coef = prior.clone().requires_grad_(True)
    intercept = torch.zeros(c, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS(
        [coef, intercept],
        lr=1.0,
        max_iter=max_iter,
        tolerance_grad=1e-9,
        tolerance_change=1e-12,
        history_size=20,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ coef.T + intercept, y)
        loss = loss + 0.5 * l2 * ((coef - prior) ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return coef.detach().numpy().copy(), intercept.detach().numpy().copy()


@dataclass
class FittedEnsemble:
    """Everything a method learned on ``select``; :meth:`log_probs` applies it to any rows."""

    method: str
    num_members: int
    temperatures: np.ndarray | None = None  # (M,), or None without --temperature
    weights: np.ndarray | None = None  # (M,) mixture weights for mean / weighted / greedy
    counts: np.ndarray | None = None  # (M,) greedy selection counts
    coef: np.ndarray | None = None  # (C, M*C) stack
    intercept: np.ndarray | None = None  # (C,) stack
    info: dict[str, Any] = field(default_factory=dict)

    def member_log_probs(self, logits: np.ndarray) -> np.ndarray:
        """(M, N, C) member log-probabilities after the fitted temperatures (if any)."""
        z = np.asarray(logits, dtype=np.float64)
        if z.ndim != 3 or z.shape[0] != self.num_members:
            raise DataError(f"expected logits of {self.num_members} members as (M, N, C), got shape {z.shape}")
        if self.temperatures is not None:
            z = z / self.temperatures[:, None, None]
        return log_softmax(z)

    def log_probs(self, logits: np.ndarray) -> np.ndarray:
        """(N, C) ensemble log-probabilities for (M, N, C) member logits."""
        lp = self.member_log_probs(logits)
        if self.method in ("mean", "weighted", "greedy"):
            assert self.weights is not None
            return _mixture_log_probs(lp, self.weights)
        if self.method == "vote":
            return _vote_log_probs(lp)
        if self.method == "stack":
            assert self.coef is not None and self.intercept is not None
            return log_softmax(_stack_features(lp) @ self.coef.T + self.intercept)
        raise ConfigError(f"unknown ensemble method {self.method!r}; use one of {', '.join(METHODS)}")


def _vote_log_probs(log_probs: np.ndarray) -> np.ndarray:
    """Majority vote as a distribution: ``(votes + mean probability) / (M + 1)``.

    Each member votes for its top-1 (ties to the lower class index). Adding the mean probability (< 1
    per class) never overturns a difference of one vote, and among classes with equal votes it ranks
    them by summed probability, so the argmax is the majority with the tie-break the method promises
    (remaining exact ties go to the lower index, as everywhere). Unlike raw vote shares it gives every
    class some probability, so NLL and ECE are finite - but they describe this construction, not a
    calibrated model.
    """
    m, n, c = log_probs.shape
    top = np.argmax(log_probs, axis=2)  # (M, N); argmax picks the first of equal maxima
    votes = np.zeros((n, c))
    for i in range(m):
        np.add.at(votes, (np.arange(n), top[i]), 1.0)
    mean_p = np.exp(log_probs).mean(axis=0)
    with np.errstate(divide="ignore"):
        return np.log((votes + mean_p) / (m + 1))


def fit_ensemble(
    logits: np.ndarray,
    targets: np.ndarray,
    method: str,
    *,
    temperature: bool = False,
    greedy_metric: str = "nll",
    rounds: int = 25,
    l2: float = 1e-2,
) -> FittedEnsemble:
    """Fit ``method`` on (M, N, C) member logits and their targets - pass the ``select`` rows only.

    This function cannot see anything but what it is given, which is what makes the protocol checkable:
    :func:`run_ensemble` hands it the select rows and nothing else.
    """
    if method not in METHODS:
        raise ConfigError(f"--method must be one of {', '.join(METHODS)}, not {method!r}")
    z = np.asarray(logits, dtype=np.float64)
    t = np.asarray(targets, dtype=np.int64)
    m = z.shape[0]
    fitted = FittedEnsemble(method=method, num_members=m)
    if temperature:
        fitted.temperatures = np.array([fit_temperature(z[i], t) for i in range(m)])
        log.info("temperatures: %s", ", ".join(f"{x:.3f}" for x in fitted.temperatures))
    lp = fitted.member_log_probs(z)
    if method == "mean":
        fitted.weights = np.full(m, 1.0 / m)
    elif method == "weighted":
        fitted.weights = fit_mixture_weights(lp, t)
    elif method == "greedy":
        counts, history = fit_greedy(lp, t, metric=greedy_metric, rounds=rounds)
        fitted.counts = counts
        fitted.weights = counts / counts.sum()
        fitted.info = {"metric": greedy_metric, "rounds": rounds, "history": history}
    elif method == "stack":
        fitted.coef, fitted.intercept = fit_stack(lp, t, l2=l2)
        fitted.info = {"l2": l2}
    return fitted


# --------------------------------------------------------------------------------------------------
# Saving and re-applying a fitted combination

STACK_FILE = "stack.npz"


def save_fitted(
    out: Path,
    fitted: FittedEnsemble,
    members: Sequence[Member],
    *,
    split: str,
    protocol: dict[str, Any],
) -> dict[str, Any]:
    """Write ``weights.json`` (and ``stack.npz`` for ``stack``) so the combination can be re-applied.

    Stacking coefficients are (C, M*C) numbers - too many for a readable JSON - so they go to an
    ``.npz`` beside it and the JSON records the file and the shapes.
    """
    doc: dict[str, Any] = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "method": fitted.method,
        "temperature": fitted.temperatures is not None,
        "split": split,
        "members": [{"name": m.name, "spec": m.spec, "path": str(m.path.resolve())} for m in members],
        "class_ids": members[0].class_ids.tolist(),
        "temperatures": None if fitted.temperatures is None else fitted.temperatures.tolist(),
        "weights": None if fitted.weights is None else fitted.weights.tolist(),
    }
    if fitted.method == "greedy":
        assert fitted.counts is not None
        doc["greedy"] = {**fitted.info, "counts": fitted.counts.tolist()}
    if fitted.method == "vote":
        doc["vote"] = {"tie_break": "summed probability, then lower class index"}
    if fitted.method == "stack":
        assert fitted.coef is not None and fitted.intercept is not None
        coef, intercept = fitted.coef, fitted.intercept

        def _npz(f: Any) -> None:
            np.savez(f, coef=coef, intercept=intercept)

        atomic_write_with(out / STACK_FILE, _npz)
        doc["stack"] = {
            "file": STACK_FILE,
            "coef_shape": list(coef.shape),
            "intercept_shape": list(intercept.shape),
            "features": "members' log-probabilities side by side, member-major: column m*C + c is log p_m(c)",
            "l2": fitted.info.get("l2"),
            "l2_towards": "the equal-weight log-linear pool",
        }
    doc["protocol"] = protocol
    atomic_write_json(out / "weights.json", doc)
    return doc


def load_fitted(weights_json: str | Path) -> tuple[FittedEnsemble, dict[str, Any]]:
    """Read a ``weights.json`` (or the folder holding it) back into a :class:`FittedEnsemble`."""
    import json

    p = Path(weights_json)
    if p.is_dir():
        p = p / "weights.json"
    try:
        doc = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"{p}: cannot read the ensemble's weights.json ({e}); run `transferlab ensemble` first") from e
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise DataError(f"{p}: not a weights.json written by `transferlab ensemble`")
    method = doc["method"]
    m = len(doc["members"])
    fitted = FittedEnsemble(method=method, num_members=m)
    if doc.get("temperatures") is not None:
        fitted.temperatures = np.asarray(doc["temperatures"], dtype=np.float64)
    if doc.get("weights") is not None:
        fitted.weights = np.asarray(doc["weights"], dtype=np.float64)
    if method == "greedy":
        fitted.counts = np.asarray(doc["greedy"]["counts"], dtype=np.int64)
        fitted.info = {k: v for k, v in doc["greedy"].items() if k != "counts"}
    if method == "stack":
        sp = p.parent / doc["stack"]["file"]
        try:
            with np.load(sp, allow_pickle=False) as z:
                fitted.coef, fitted.intercept = z["coef"], z["intercept"]
        except (OSError, KeyError, ValueError) as e:
            raise DataError(f"{sp}: cannot read the stacking coefficients ({e}); it must sit beside {p.name}") from e
        fitted.info = {"l2": doc["stack"].get("l2")}
    return fitted, doc


def apply_ensemble(
    weights_json: str | Path, member_prediction_files: Sequence[str | Path], *, split: str = "val"
) -> np.ndarray:
    """Re-apply a fitted ensemble to new predictions of the same members, without refitting.

    ``member_prediction_files`` are the members' predictions on the new data (``.npz`` files or run
    directories, resolved with ``split``), in the order recorded in ``weights.json``. They must share
    samples and classes with each other and have the recorded class list. Returns (N, C) probabilities.
    """
    fitted, doc = load_fitted(weights_json)
    if len(member_prediction_files) != fitted.num_members:
        names = ", ".join(m["name"] for m in doc["members"])
        raise ConfigError(
            f"{weights_json}: the ensemble has {fitted.num_members} members ({names}) but "
            f"{len(member_prediction_files)} prediction files were given; pass one per member, in that order"
        )
    members = load_members(member_prediction_files, split)
    recorded = np.asarray(doc["class_ids"], dtype=str)
    for mem in members:
        if not np.array_equal(mem.class_ids, recorded):
            raise DataError(
                f"member {mem.spec}: its class list differs from the one the ensemble in {weights_json} was fitted "
                "with; re-apply it only to predictions over the same classes"
            )
    return np.exp(fitted.log_probs(np.stack([mem.logits for mem in members])))


# --------------------------------------------------------------------------------------------------
# The study: fit on select, report on report


@dataclass(frozen=True)
class EnsembleConfig:
    """Everything an ensemble study depends on. Invalid values fail here, naming the option."""

    members: tuple[str, ...] = option(
        help="members: run directories or evaluate output folders (their predictions/<split>.npz) or .npz files; all "
        "on the same samples in the same order, with one class list",
        flag="members",
        nargs="+",
        metavar="RUN_OR_NPZ",
    )
    out: Path = option(help="output folder (created)", required=True)
    method: str = option(
        "mean",
        "mean: average probabilities; vote: majority of top-1, ties by summed probability; weighted: convex weights "
        "minimising select NLL; greedy: Caruana forward selection with replacement; stack: L2-regularised "
        "multinomial logistic regression on the members' log-probabilities",
        choices=METHODS,
    )
    temperature: bool = option(
        False, "first scale each member's logits by a temperature fitted by NLL on the select part"
    )
    split: str = option(
        "val", "split whose predictions are read from run directories, and the name of the output predictions file"
    )
    select_fraction: float = option(
        0.5, "fraction of each class used for fitting; the rest is reported on", lo=0, hi=1, lo_open=True, hi_open=True
    )
    seed: int = option(0, "seed of the select/report split and the bootstrap", lo=0, hi=2**63 - 1)
    select_data: tuple[str, ...] | None = option(
        None,
        "the same members' predictions on another split, one per member in the same order, to fit on; then all of "
        "the evaluated data is reported on",
        nargs="+",
        metavar="RUN_OR_NPZ",
        default_text="split the evaluated data",
    )
    select_split: str | None = option(
        None,
        "split to read from run directories given to --select-data",
        default_text="their only predictions file other than --split",
    )
    data: str | None = option(
        None,
        "dataset whose class names label the most-confused pairs (e.g. words.txt of Tiny ImageNet): " + DATA_HELP,
        default_text="show class ids",
    )
    greedy_metric: str = option(
        "nll", "what greedy selection optimises on select; accuracy ties are broken by NLL", choices=GREEDY_METRICS
    )
    rounds: int = option(25, "greedy: rounds of forward selection after the best member", lo=0, hi=100_000)
    stack_l2: float = option(
        1e-2, "stack: L2 strength pulling the coefficients towards the equal-weight log-linear pool", lo=0, hi=1e6
    )
    n_boot: int = option(1000, "bootstrap resamples for intervals", lo=1, hi=10**7)

    def __post_init__(self) -> None:
        if len(self.members) < 2:
            raise ConfigError(f"an ensemble needs at least two members, got {len(self.members)}")
        check(self)
        if self.select_data is not None and len(self.select_data) != len(self.members):
            raise ConfigError(
                f"--select-data gives {len(self.select_data)} files for {len(self.members)} members; give each "
                "member's predictions on the selection split, in the same order as the members"
            )


def class_name_map(data: str | None) -> dict[str, str] | None:
    """id -> name from a dataset spec (e.g. Tiny ImageNet's words.txt), or None without ``--data``."""
    if data is None:
        return None

    classes = open_dataset(data).classes
    return dict(zip(classes.ids, classes.names, strict=True))


def _aligned_names(lookup: Mapping[str, str] | None, class_ids: np.ndarray, source: str) -> list[str] | None:
    """Class names in class-index order; ids without a name keep their id."""
    if lookup is None:
        return None
    found = [c for c in class_ids.tolist() if c in lookup]
    if not found:
        raise ConfigError(
            f"{source}: none of the members' class ids (e.g. {class_ids[0]}) has a name there; pass the dataset "
            "the members were evaluated on, or leave --data out"
        )
    if len(found) < len(class_ids):
        log.warning("%s names %d of %d classes; the rest are shown by id", source, len(found), len(class_ids))
    return [str(lookup.get(c, c)) for c in class_ids.tolist()]


def _select_members(cfg: EnsembleConfig) -> list[Member]:
    """The members' predictions on ``--select-data``, resolved with ``--select-split`` for run folders."""
    assert cfg.select_data is not None
    out = []
    for spec in cfg.select_data:
        split = cfg.select_split
        p = Path(spec)
        if split is None and p.is_dir() and prediction_splits(p):
            have = [s for s in prediction_splits(p) if s != cfg.split]
            if len(have) != 1:
                raise ConfigError(
                    f"--select-data {spec}: cannot tell which of its predictions to fit on "
                    f"({', '.join(have) or 'none besides ' + cfg.split}); pass --select-split or the .npz file"
                )
            split = have[0]
        out.append(load_member(spec, split or cfg.split))
    check_members(out, role="--select-data file")
    return out


def _offdiag_mean(a: np.ndarray) -> float | None:
    iu = np.triu_indices(a.shape[0], k=1)
    vals = a[iu]
    vals = vals[np.isfinite(vals)]
    return float(vals.mean()) if len(vals) else None


def _nan_to_none(x: Any) -> Any:
    """JSON has no NaN: undefined numbers are written as null."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _nan_to_none(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_nan_to_none(v) for v in x]
    return x


def run_ensemble(
    cfg: EnsembleConfig,
    *,
    select_mask: np.ndarray | None = None,
    class_names: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Fit ``cfg.method`` on the select rows, measure on the report rows, write the results to ``cfg.out``.

    ``select_mask`` overrides the seeded split (it must not be used with ``--select-data``); tests use it
    to show that changing report labels leaves everything fitted unchanged. ``class_names`` (id -> name)
    is used instead of reading ``cfg.data``. Returns the metrics dict.
    """
    members = load_members(cfg.members, cfg.split)
    ref = members[0]
    targets = ref.targets
    logits = np.stack([m.logits.astype(np.float64) for m in members])  # (M, N, C)
    names = [m.name for m in members]
    if class_names is None:
        names_of = _aligned_names(class_name_map(cfg.data), ref.class_ids, f"--data {cfg.data}")
    else:
        names_of = _aligned_names(class_names, ref.class_ids, "the class-name mapping")

    if cfg.select_data is not None:
        if select_mask is not None:
            raise ConfigError("a select mask and --select-data are two different protocols; give one")
        fit_logits, fit_targets, report, protocol = _select_data_protocol(cfg, ref)
    else:
        fit_logits, fit_targets, report, protocol = _split_protocol(cfg, ref, logits, select_mask)

    # --- fit: select rows only -------------------------------------------------------------------
    fitted, sel_scores, best = _fit_on_select(cfg, fit_logits, fit_targets)

    # --- measure: report rows only ---------------------------------------------------------------
    rep_t = targets[report]
    rep_member_lp = fitted.member_log_probs(logits[:, report])
    ens_lp = fitted.log_probs(logits[:, report])
    c = len(ref.class_ids)
    metrics: dict[str, Any] = {
        "method": cfg.method,
        "temperature": cfg.temperature,
        "split": cfg.split,
        "numbers_from": "report: every metric below is measured on the report samples unless marked 'select'",
        "fitted_on": "select: temperatures, weights, selection, stacking and the best member were chosen there",
        "protocol": {k: v for k, v in protocol.items() if k != "select_sample_ids"},
        "num_classes": c,
        "ensemble": _report_summary(cfg, ens_lp, rep_t, ref.class_ids, names_of),
        "members": _member_rows(cfg, members, fitted, logits[:, report], rep_member_lp, rep_t, sel_scores),
        "best_member": {
            "index": best,
            "name": names[best],
            "chosen_on": "select",
            "criterion": "top1, then nll",
            **sel_scores[best],
        },
        **_vs_best_and_diversity(cfg, ens_lp, rep_member_lp, rep_t, best, names),
    }
    if fitted.weights is not None:
        metrics["weights"] = fitted.weights.tolist()
    if fitted.counts is not None:
        metrics["greedy_counts"] = fitted.counts.tolist()
    if fitted.temperatures is not None:
        metrics["temperatures"] = fitted.temperatures.tolist()

    # --- write -----------------------------------------------------------------------------------
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    ids = tuple(ref.class_ids.tolist())
    floor = math.log(np.finfo(np.float32).tiny)
    write_predictions(
        predictions_path(out, cfg.split), np.maximum(ens_lp, floor), rep_t, ref.sample_ids[report].tolist(), ids
    )
    save_fitted(out, fitted, members, split=cfg.split, protocol=protocol)
    metrics = _nan_to_none(metrics)
    atomic_write_json(out / "metrics.json", metrics)
    log.debug("wrote %s", out)
    return metrics


def _select_data_protocol(
    cfg: EnsembleConfig, ref: Member
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
    """``--select-data``: fit on the members' predictions of another split, report on all of ``cfg.split``.

    Returns (fit logits (M, n, C), fit targets, report mask over ``cfg.split``, protocol record).
    """
    targets = ref.targets
    sel_members = _select_members(cfg)
    if not np.array_equal(sel_members[0].class_ids, ref.class_ids):
        raise DataError(
            f"--select-data {sel_members[0].spec} has a different class list from member {ref.spec}; the "
            "selection predictions must come from the same models over the same classes"
        )
    shared = np.intersect1d(sel_members[0].sample_ids, ref.sample_ids)
    if len(shared):
        raise DataError(
            f"--select-data {sel_members[0].spec} shares {len(shared)} samples with the evaluated data "
            f"(e.g. {shared[0]!r}); fitting on them would make the reported numbers optimistic. Use predictions "
            "on another split (or leave --select-data out to split the data in two)"
        )
    fit_logits = np.stack([m.logits.astype(np.float64) for m in sel_members])
    fit_targets = sel_members[0].targets
    report = np.ones(len(targets), dtype=bool)
    protocol: dict[str, Any] = {
        "mode": "select-data",
        "select": f"the members' predictions in --select-data ({len(fit_targets)} samples)",
        "report": f"all {len(targets)} samples of {cfg.split}",
        "select_files": [str(m.path.resolve()) for m in sel_members],
        "n_select": len(fit_targets),
        "n_report": len(targets),
        "select_sample_ids_sha256": _ids_sha256(sel_members[0].sample_ids),
    }
    return fit_logits, fit_targets, report, protocol


def _split_protocol(
    cfg: EnsembleConfig, ref: Member, logits: np.ndarray, select_mask: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
    """``cfg.split`` in two: a class-stratified seeded select part (or ``select_mask``) to fit on, the rest to report.

    Returns (fit logits (M, n, C), fit targets, report mask, protocol record).
    """
    targets = ref.targets
    if select_mask is None:
        mask = stratified_select_mask(targets, cfg.select_fraction, cfg.seed)
    else:
        mask = np.asarray(select_mask, dtype=bool)
        if mask.shape != targets.shape:
            raise ConfigError(f"select mask has shape {mask.shape}, expected {targets.shape}")
    report = ~mask
    if not mask.any() or not report.any():
        raise DataError(
            f"{cfg.split} has {len(targets)} samples: too few to split into select and report parts; "
            "use --select-data with predictions on another split"
        )
    protocol = {
        "mode": "split",
        "select": f"{int(mask.sum())} samples of {cfg.split}, class-stratified, seed {cfg.seed}",
        "report": f"the other {int(report.sum())} samples of {cfg.split}",
        "split": cfg.split,
        "seed": cfg.seed,
        "select_fraction": cfg.select_fraction,
        "stratified_by": "class",
        "custom_mask": select_mask is not None,
        "n_select": int(mask.sum()),
        "n_report": int(report.sum()),
        "select_sample_ids_sha256": _ids_sha256(ref.sample_ids[mask]),
        "select_sample_ids": ref.sample_ids[mask].tolist(),
    }
    return logits[:, mask], targets[mask], report, protocol


def _fit_on_select(
    cfg: EnsembleConfig, fit_logits: np.ndarray, fit_targets: np.ndarray
) -> tuple[FittedEnsemble, list[dict[str, float]], int]:
    """The fitted ensemble, each member's select-part top-1 and NLL, and the best member (chosen there)."""
    fitted = fit_ensemble(
        fit_logits,
        fit_targets,
        cfg.method,
        temperature=cfg.temperature,
        greedy_metric=cfg.greedy_metric,
        rounds=cfg.rounds,
        l2=cfg.stack_l2,
    )
    sel_lp = fitted.member_log_probs(fit_logits)
    sel_scores = [
        {"top1": float(topk_correct(sel_lp[i], fit_targets, 1).mean()), "nll": nll(sel_lp[i], fit_targets)}
        for i in range(len(fit_logits))
    ]
    # The member to beat is chosen where the ensemble was fitted: picking it on report would compare the
    # ensemble with a member that had the advantage of being selected on the numbers being reported.
    best = min(range(len(fit_logits)), key=lambda i: (-sel_scores[i]["top1"], sel_scores[i]["nll"], i))
    return fitted, sel_scores, best


def _report_summary(
    cfg: EnsembleConfig, ens_lp: np.ndarray, rep_t: np.ndarray, class_ids: np.ndarray, names_of: Any
) -> dict[str, Any]:
    """The ensemble's numbers on the report rows: the summary, the most confused pairs and per-class top-1."""
    c = len(class_ids)
    ens = summarize(ens_lp, rep_t, n_boot=cfg.n_boot, seed=cfg.seed)
    ens["split"] = "report"
    cm = confusion_matrix(ens_lp, rep_t, c)
    ens["most_confused"] = most_confused(cm, k=10, class_ids=class_ids.tolist(), class_names=names_of)
    acc = per_class_accuracy(ens_lp, rep_t, c)
    counts = np.bincount(rep_t, minlength=c)
    ens["per_class"] = [
        {
            "index": i,
            "id": class_ids[i],
            **({"name": names_of[i]} if names_of else {}),
            "n": int(counts[i]),
            "top1": float(acc[i]),
        }
        for i in range(c)
    ]
    return ens


def _member_rows(
    cfg: EnsembleConfig,
    members: Sequence[Member],
    fitted: FittedEnsemble,
    rep_logits: np.ndarray,
    rep_member_lp: np.ndarray,
    rep_t: np.ndarray,
    sel_scores: list[dict[str, float]],
) -> list[dict[str, Any]]:
    """Each member's numbers on the report rows (and, with temperatures, before calibration) and on select."""
    member_rows = []
    for i, m in enumerate(members):
        row: dict[str, Any] = {"name": m.name, "path": str(m.path.resolve()), "split": "report"}
        row.update(summarize(rep_member_lp[i], rep_t, n_boot=cfg.n_boot, seed=cfg.seed))
        if fitted.temperatures is not None:
            raw = log_softmax(rep_logits[i])
            row["temperature"] = float(fitted.temperatures[i])
            row["nll_uncalibrated"] = nll(raw, rep_t)
            row["ece_uncalibrated"] = expected_calibration_error(np.exp(raw), rep_t, ECE_BINS)
        row["select"] = {"split": "select", **sel_scores[i]}
        member_rows.append(row)
    return member_rows


def _vs_best_and_diversity(
    cfg: EnsembleConfig,
    ens_lp: np.ndarray,
    rep_member_lp: np.ndarray,
    rep_t: np.ndarray,
    best: int,
    names: list[str],
) -> dict[str, Any]:
    """``vs_best_member`` (a paired bootstrap of the top-1 gain) and ``diversity``, on the report rows."""
    ens_correct = topk_correct(ens_lp, rep_t, 1)
    best_correct = topk_correct(rep_member_lp[best], rep_t, 1)
    pb = paired_bootstrap(ens_correct, best_correct, n_boot=cfg.n_boot, seed=cfg.seed)
    preds = np.argmax(rep_member_lp, axis=2)
    correct = preds == rep_t[None, :]
    dis = pairwise_disagreement(preds)
    corr = error_correlation(correct)
    return {
        "vs_best_member": {
            "split": "report",
            "metric": "top1",
            "test": "paired bootstrap over the same resampled report samples",
            "gain": pb["gain"],
            "gain_ci": pb["ci"],
            "p_gain_positive": pb["p_gain_positive"],
            "n_boot": pb["n_boot"],
            "seed": cfg.seed,
        },
        "diversity": {
            "split": "report",
            "members": names,
            "disagreement": dis.tolist(),
            "error_correlation": corr.tolist(),
            "mean_disagreement": _offdiag_mean(dis),
            "mean_error_correlation": _offdiag_mean(corr),
        },
    }
