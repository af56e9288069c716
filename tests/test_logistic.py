"""The tuned linear probe: L-BFGS logistic regression on cached features, its penalty chosen on the holdout."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from transferlab.errors import ConfigError
from transferlab.training.logistic import fit_logistic, logits_of, scores, tune_logistic


def _blobs(n_per: int, d: int = 12, c: int = 4, seed: int = 0, spread: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Overlapping Gaussian classes on features of very different scales and offsets (as backbone features are),
    so the optimum is finite and standardisation matters; ``seed`` only changes the samples."""
    gen = np.random.default_rng(123)
    centers = gen.normal(0, spread, (c, d))
    scale = np.exp(gen.uniform(-2, 2, d))
    offset = gen.normal(0, 5, d)
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(c), n_per)
    z = centers[y] + rng.normal(0, 1, (len(y), d))
    return (z * scale + offset).astype(np.float32), y


def _objective(
    head: tuple[torch.Tensor, torch.Tensor], x: np.ndarray, y: np.ndarray, l2: float, w0: np.ndarray
) -> torch.Tensor:
    """The documented objective of a raw-feature head, float64: mean CE + l2/2 ||(W - W0) * std||^2."""
    x64 = torch.as_tensor(x, dtype=torch.float64)
    std = x64.std(0, unbiased=False)
    w, b = head
    ce = F.cross_entropy(x64 @ w.T + b, torch.as_tensor(y))
    return ce + 0.5 * l2 * (((w - torch.as_tensor(w0, dtype=torch.float64)) * std) ** 2).sum()


def _grad_at(head: tuple[np.ndarray, np.ndarray], x: np.ndarray, y: np.ndarray, l2: float, w0: np.ndarray):
    """(objective, largest gradient entry) at a raw-feature head, the gradient taken in standardised coordinates
    (W * std, b + W mean), where every coordinate has the same scale: raw coordinates mix the bias's gradient
    into the weights' in proportion to the features' means."""
    x64 = torch.as_tensor(x, dtype=torch.float64)
    mean, std = x64.mean(0), x64.std(0, unbiased=False)
    w = torch.as_tensor(head[0], dtype=torch.float64)
    ws = (w * std).requires_grad_(True)
    bs = (torch.as_tensor(head[1], dtype=torch.float64) + w @ mean).requires_grad_(True)
    loss = _objective((ws / std, bs - (ws / std) @ mean), x, y, l2, w0)
    loss.backward()
    return float(loss.detach()), max(float(ws.grad.abs().max()), float(bs.grad.abs().max()))


def _log_probs(head: tuple[np.ndarray, np.ndarray], x: np.ndarray) -> np.ndarray:
    return F.log_softmax(torch.from_numpy(logits_of(head, x)).double(), dim=1).numpy()


@pytest.mark.parametrize("with_prior", [False, True])
def test_the_solution_is_the_optimum_of_the_documented_objective(with_prior: bool) -> None:
    x, y = _blobs(60)
    rng = np.random.default_rng(5)
    prior = (
        (rng.normal(0, 0.3, (4, 12)).astype(np.float32), rng.normal(0, 1, 4).astype(np.float32)) if with_prior else None
    )
    w0 = prior[0] if prior else np.zeros((4, 12), np.float32)
    w, b, info = fit_logistic(x, y, 4, l2=0.05, prior=prior, max_iter=500, tol=2e-6)
    assert info["converged"] and info["iterations"] > 0
    loss, grad = _grad_at((w, b), x, y, 0.05, w0)
    assert grad < 3e-6, grad
    assert info["objective"] == pytest.approx(loss, rel=1e-6)
    # Convex, so a zero gradient means the minimum: every nearby head is worse.
    wt, bt = torch.tensor(w, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    for s in range(5):
        dw = torch.as_tensor(np.random.default_rng(s).normal(0, 1e-2, w.shape)) / torch.as_tensor(x.std(0))
        assert float(_objective((wt + dw, bt), x, y, 0.05, w0)) > loss


def test_the_folded_head_equals_the_standardised_model() -> None:
    """The head returned for raw features gives the logits of the model fitted on standardised features with
    the prior mapped there (W0 * std); and a per-feature affine change of the inputs changes nothing else."""
    x, y = _blobs(50)
    rng = np.random.default_rng(1)
    w0, b0 = rng.normal(0, 0.2, (4, 12)).astype(np.float32), np.zeros(4, np.float32)
    mean, std = x.astype(np.float64).mean(0), x.astype(np.float64).std(0)
    z = ((x - mean) / std).astype(np.float32)
    kw = dict(l2=0.3, max_iter=500, tol=1e-5)
    w, b, _ = fit_logistic(x, y, 4, prior=(w0, b0), **kw)
    wz, bz, _ = fit_logistic(z, y, 4, prior=((w0 * std).astype(np.float32), b0 + w0 @ mean), **kw)
    np.testing.assert_allclose(logits_of((w, b), x), logits_of((wz, bz), z), atol=1e-4)
    np.testing.assert_allclose(w * std, wz, atol=1e-4)
    # x' = a x + c with the prior expressed for x' (W0 / a): the same predictions, W' = W / a. (The starting bias
    # differs, and the softmax ignores a constant added to every class's bias, which nothing penalises: compare
    # log-probabilities.)
    a, c = np.exp(rng.uniform(-1, 1, 12)).astype(np.float32), rng.normal(0, 3, 12).astype(np.float32)
    w2, b2, _ = fit_logistic(x * a + c, y, 4, prior=(w0 / a, b0), **kw)
    np.testing.assert_allclose(_log_probs((w2, b2), x * a + c), _log_probs((w, b), x), atol=1e-4)
    np.testing.assert_allclose(w2 * a, w, atol=1e-4 / std.min())


def test_a_huge_penalty_gives_back_the_prior_in_raw_feature_space() -> None:
    x, y = _blobs(30)
    rng = np.random.default_rng(2)
    w0, b0 = rng.normal(0, 1, (4, 12)).astype(np.float32), rng.normal(0, 1, 4).astype(np.float32)
    w, _b, _ = fit_logistic(x, y, 4, l2=1e7, prior=(w0, b0))
    np.testing.assert_allclose(w, w0, rtol=1e-5, atol=1e-6)
    wz, _, _ = fit_logistic(x, y, 4, l2=1e7)
    assert np.abs(wz).max() < 1e-5 * np.abs(w0).max() / x.std(0).min()
    # A weak penalty moves well away from it: the pull is the penalty's, not a failure to move.
    w_free, _, _ = fit_logistic(x, y, 4, l2=1e-3, prior=(w0, b0))
    assert np.abs(w_free - w0).max() > 0.1


def test_constant_features_and_bad_shapes() -> None:
    x, y = _blobs(20)
    x[:, 3] = 0.0  # a dead unit
    x[:, 5] = 7.25  # a constant one
    w, b, info = fit_logistic(x, y, 4, l2=0.01)
    assert np.isfinite(w).all() and np.isfinite(b).all() and info["converged"]
    assert np.abs(w[:, [3, 5]]).max() < 1e-6  # no data and a zero prior: they stay at the prior
    with pytest.raises(ConfigError, match="shape"):
        fit_logistic(x, y, 4, l2=0.01, prior=(np.zeros((3, 12)), np.zeros(3)))
    with pytest.raises(ConfigError, match="penalty"):
        fit_logistic(x, y, 4, l2=-1)


def _overfit_problem() -> tuple[np.ndarray, ...]:
    """Few samples in many dimensions: the holdout NLL is best at an interior penalty."""
    x, y = _blobs(10, d=40, c=5, spread=0.3)
    xh, yh = _blobs(40, d=40, c=5, seed=1, spread=0.3)
    return x, y, xh, yh


GRID = (10.0, 1.0, 0.3, 0.1, 0.03, 0.01, 1e-3, 1e-4)


def test_the_grid_is_walked_strongest_first_and_the_best_holdout_nll_is_chosen() -> None:
    x, y, xh, yh = _overfit_problem()
    res = tune_logistic(x, y, xh, yh, x, y, 5, grid=list(reversed(GRID)), patience=len(GRID))
    l2s = [r["l2"] for r in res.table]
    assert l2s == sorted(GRID, reverse=True)
    nll = [r["holdout_nll"] for r in res.table]
    best = int(np.argmin(nll))
    assert 0 < best < len(GRID) - 1  # an interior optimum, so the choice means something
    assert res.l2 == GRID[best]
    # The fit-split head kept is that penalty's: its holdout scores are the table's.
    top1, n = scores((res.fit_weight, res.fit_bias), xh, yh)
    assert n == pytest.approx(nll[best], rel=1e-6) and top1 == pytest.approx(res.table[best]["holdout_top1"])
    assert res.l2_best_top1 == max(res.table, key=lambda r: (r["holdout_top1"], r["l2"]))["l2"]
    # Warm starts reach the same optimum as a cold fit at each penalty.
    for r in res.table[: best + 2]:
        head = fit_logistic(x, y, 5, l2=r["l2"])[:2]
        assert scores(head, xh, yh)[1] == pytest.approx(r["holdout_nll"], abs=1e-3)


def test_the_path_stops_once_weaker_penalties_only_overfit() -> None:
    x, y, xh, yh = _overfit_problem()
    full = tune_logistic(x, y, xh, yh, x, y, 5, grid=GRID, patience=len(GRID))
    short = tune_logistic(x, y, xh, yh, x, y, 5, grid=GRID, patience=2)
    best = [r["l2"] for r in full.table].index(full.l2)
    assert len(short.table) == best + 3 and short.stopped_early and not full.stopped_early
    assert short.l2 == full.l2


def test_the_final_head_is_refit_on_every_train_row() -> None:
    x, y, xh, yh = _overfit_problem()
    x_all, y_all = np.concatenate([x, xh]), np.concatenate([y, yh])
    res = tune_logistic(x, y, xh, yh, x_all, y_all, 5, grid=(1.0, 0.1, 0.01))
    w0 = np.zeros((5, 40), np.float32)
    _, grad = _grad_at((res.weight, res.bias), x_all, y_all, res.l2, w0)
    assert grad < 1e-4  # optimal on all rows
    _, grad_fit = _grad_at((res.fit_weight, res.fit_bias), x_all, y_all, res.l2, w0)
    assert grad_fit > 30 * grad  # the fit-split head is not
    assert res.refit["l2"] == res.l2
    cold = fit_logistic(x_all, y_all, 5, l2=res.l2)[:2]
    np.testing.assert_allclose(logits_of(cold, xh), logits_of((res.weight, res.bias), xh), atol=5e-3)


def test_choosing_needs_holdout_rows_and_a_valid_grid() -> None:
    x, y = _blobs(10)
    empty_x, empty_y = x[:0], y[:0]
    with pytest.raises(ConfigError, match="holdout"):
        tune_logistic(x, y, empty_x, empty_y, x, y, 4, grid=(1.0, 0.1))
    res = tune_logistic(x, y, empty_x, empty_y, x, y, 4, grid=(0.1,))
    assert res.l2 == 0.1 and len(res.table) == 1
    with pytest.raises(ConfigError, match="grid"):
        tune_logistic(x, y, x, y, x, y, 4, grid=(0.1, 0.0))


# --------------------------------------------------------------------------------------------------
# Mirrored features in the feature cache


def test_mirrored_features_are_the_mirrored_images_features_in_their_own_entry(
    train_ds: Path, in1k32: Path, tmp_path: Path
) -> None:
    from transferlab.data import open_dataset
    from transferlab.data.transforms import normalize_batch
    from transferlab.inference.engine import make_eval_transform
    from transferlab.inference.features import cached_features, pre_logits
    from transferlab.models.backbones import create_backbone
    from transferlab.runtime import resolve_precision

    cpu = torch.device("cpu")
    split = open_dataset(train_ds).split("train")
    bb = create_backbone("test_resnet", str(in1k32))
    t = make_eval_transform(bb.preprocessing, 32)
    kw = dict(
        indices=np.arange(6),
        precision=resolve_precision("fp32", "off", cpu),
        device=cpu,
        cache_dir=tmp_path,
        workers=0,
        progress=False,
    )
    plain, p_plain, _ = cached_features(bb, split, t, **kw)
    flipped, p_flip, hit = cached_features(bb, split, t, flip=True, **kw)
    assert not hit and p_flip != p_plain and "-hflip-" in p_flip.name and "hflip" not in p_plain.name
    assert cached_features(bb, split, t, flip=True, **kw)[2]  # cached
    pre = bb.preprocessing
    x = normalize_batch(torch.stack([t(split.load(i)) for i in range(6)]), pre.mean, pre.std)
    with torch.no_grad():
        ref = pre_logits(bb.model.eval(), torch.flip(x, dims=[3])).numpy()
    np.testing.assert_allclose(flipped, ref, rtol=1e-5, atol=1e-5)
    assert not np.allclose(flipped, plain, atol=1e-3)
    # The unflipped entry's key is what it was before mirrored entries existed (old caches still hit).
    with np.load(p_plain) as z:
        assert json.loads(str(z["key"]))["transform"] == repr(t)
    with np.load(p_flip) as z:
        assert json.loads(str(z["key"]))["transform"] == repr(t) + " + hflip"
