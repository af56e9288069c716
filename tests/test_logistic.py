"""The tuned linear probe: L-BFGS logistic regression on cached features, its penalty chosen on the holdout."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

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


# --------------------------------------------------------------------------------------------------
# transferlab train --probe lbfgs / --flip-features


@pytest.fixture(scope="module")
def varied_ds(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 3-class Tiny ImageNet layout (12 train, 4 val images per class) with every image different: the class
    colour plus strong per-image noise and a random bright square, so a holdout image is not a copy of a fit one
    and a head fitted without it predicts it differently from one fitted with it."""
    import io

    from PIL import Image

    from builders import tiny_imagenet_files, write_folder

    rng = np.random.default_rng(0)
    files = tiny_imagenet_files(n_train=12, n_val_per_class=4, n_test=1)
    for rel, data in files.items():
        if rel.endswith(".JPEG"):
            arr = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)
            arr = arr + rng.integers(-60, 60, arr.shape)
            r, c = rng.integers(0, 44, 2)
            arr[r : r + 20, c : c + 20] = rng.integers(0, 256, 3)
            buf = io.BytesIO()
            Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB").save(buf, "JPEG", quality=90)
            files[rel] = buf.getvalue()
    return write_folder(tmp_path_factory.mktemp("varied") / "tiny-imagenet-200", files)


def _cached(cache: Path, split: str, flip: bool) -> np.ndarray:
    """The one feature-cache entry of ``split`` (mirrored or not) under ``cache``."""
    found = [p for p in (cache / "features").glob(f"*-{split}-pre_logits-*.npz") if ("-hflip-" in p.name) == flip]
    assert len(found) == 1, found
    with np.load(found[0]) as z:
        return z["features"]


def _head(run: Path) -> tuple[np.ndarray, np.ndarray]:
    from safetensors.numpy import load_file

    state = load_file(run / "model.safetensors")
    return state["head.fc.weight"], state["head.fc.bias"]


def _tune_again(cache: Path, y: np.ndarray, hold: np.ndarray, class_ids: list[str], grid: list[float]):
    """tune_logistic as the run should have called it: two rows per fit image, the holdout on the mean of an
    image's two feature vectors, the prior = the ImageNet classifier's rows of the classes, the refit on every
    train row (both views)."""
    from transferlab.labels import imagenet_indices
    from transferlab.models.backbones import create_backbone

    clf = create_backbone("tf_efficientnet_lite0", "auto").model.get_classifier()
    idx = imagenet_indices(class_ids)
    prior = (clf.weight.detach().numpy()[idx], clf.bias.detach().numpy()[idx])
    plain, mirror = _cached(cache, "train", False), _cached(cache, "train", True)
    fit = np.setdiff1d(np.arange(len(y)), hold)
    return tune_logistic(
        np.concatenate([plain[fit], mirror[fit]]),
        np.concatenate([y[fit], y[fit]]),
        (plain[hold] + mirror[hold]) * np.float32(0.5),
        y[hold],
        np.concatenate([plain, mirror]),
        np.concatenate([y, y]),
        len(class_ids),
        grid=grid,
        prior=prior,
    )


def test_lbfgs_probe_on_mirrored_features_end_to_end_on_the_default_path(varied_ds: Path, tmp_path: Path) -> None:
    """Lite0 with its real weights at the default precision (bf16 + channels_last on this CPU) and the decoded
    cache, through the command line: the tuned probe on flip-averaged features, its run folder and caches."""
    from builders import default_train_argv
    from transferlab.artifacts.predictions import read_predictions
    from transferlab.cli import main
    from transferlab.data import open_dataset
    from transferlab.runtime import cpu_has_bf16
    from transferlab.training.config import TrainConfig
    from transferlab.training.probe import stratified_holdout

    run = tmp_path / "lbfgs"
    grid = ["1", "0.1", "0.01", "0.001"]
    assert main(default_train_argv(varied_ds, run, "--probe", "lbfgs", "--flip-features", "--l2-grid", *grid)) == 0
    m = json.loads((run / "metrics.json").read_text())
    assert m["top1"] > 1 / 3 + 0.2  # well above chance (3 classes)
    assert m["head_init"] == "imagenet" and any((tmp_path / "cache" / "decoded").iterdir())
    if cpu_has_bf16():
        assert m["precision"] == "bf16" and m["channels_last"]
    p = m["probe"]
    assert p["solver"] == "lbfgs" and p["prior"] == "imagenet" and p["refit"] and p["flip_features"]
    assert p["l2"] in [float(g) for g in grid] and 1 <= len(p["grid"]) <= len(grid)
    assert p["n_fit"] == m["n_fit"] and p["n_holdout"] == m["n_holdout"] == 6
    assert p["fit_rows"] == 2 * m["n_fit"] and p["refit_rows"] == 2 * (m["n_fit"] + m["n_holdout"])
    assert m["feature_cache"]["train_flip_hit"] is False and m["feature_cache"]["report_flip_hit"] is False
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["probe"] == "lbfgs" and cfg["flip_features"] is True and cfg["l2_grid"] == [1.0, 0.1, 0.01, 0.001]
    assert TrainConfig.from_dict(cfg).l2_grid == (1.0, 0.1, 0.01, 0.001)

    # Mirrored entries next to the plain ones; the report is scored on the mean of an image's two feature vectors.
    cache = tmp_path / "cache"
    x_train = (_cached(cache, "train", False) + _cached(cache, "train", True)) * np.float32(0.5)
    x_val = (_cached(cache, "val", False) + _cached(cache, "val", True)) * np.float32(0.5)
    w, b = _head(run)
    val = read_predictions(run / "predictions" / "val.npz")
    np.testing.assert_allclose(val.logits, logits_of((w, b), x_val), rtol=1e-4, atol=1e-4)

    # predictions/holdout.npz: the train holdout's images, scored by the fit-split head (not the refit one, which
    # saw them): its NLL is the chosen penalty's holdout NLL in the table.
    train = open_dataset(varied_ds).split("train")
    _, hold = stratified_holdout(np.asarray(train.targets), 0.2, 0)
    hp = read_predictions(run / "predictions" / "holdout.npz")
    assert list(hp.sample_ids) == [train.sample_ids[i] for i in hold]
    assert list(hp.targets) == list(np.asarray(train.targets)[hold]) and list(hp.class_ids) == list(val.class_ids)
    chosen = next(r for r in p["grid"] if r["l2"] == p["l2"])
    nll = float(F.cross_entropy(torch.from_numpy(hp.logits).double(), torch.from_numpy(hp.targets)))
    assert nll == pytest.approx(chosen["holdout_nll"], rel=1e-4, abs=1e-6)
    assert not np.allclose(hp.logits, logits_of((w, b), x_train[hold]), atol=1e-4)
    # The whole fit again from the cached features: same inputs, same numbers.
    again = _tune_again(cache, np.asarray(train.targets), hold, list(val.class_ids), [float(g) for g in grid])
    assert again.l2 == p["l2"]
    np.testing.assert_allclose(again.weight, w, atol=1e-5)
    np.testing.assert_allclose(logits_of((again.fit_weight, again.fit_bias), x_train[hold]), hp.logits, atol=1e-4)
    rows = [int(r.split(",")[0]) for r in (run / "history.csv").read_text().splitlines()[1:]]
    assert rows == list(range(len(p["grid"]) + 1))  # row 0: the prior; then one per penalty, strongest first
    assert m["best_epoch"] == 1 + [r["l2"] for r in p["grid"]].index(p["l2"])


def test_every_feature_cache_probe_writes_its_holdout_predictions(
    varied_ds: Path, in1k32: Path, tmp_path: Path
) -> None:
    """The default (sgd) probe too: the kept epoch's head on the holdout, which it never trained on; folders with
    two prediction files still work as ensemble members and report inputs, and the holdout file is what an
    ensemble fits on by default when given the same runs as --select-data."""
    from builders import train_argv
    from transferlab import api
    from transferlab.artifacts.predictions import read_predictions
    from transferlab.cli import main

    runs = []
    for name, extra in (("sgd", ()), ("sgdflip", ("--flip-features",)), ("lbfgs", ("--probe", "lbfgs"))):
        run = tmp_path / name
        assert main(train_argv(varied_ds, in1k32, run, "--epochs", "4", "--lr", "3e-3", *extra)) == 0
        runs.append(run)
    cache = tmp_path / "cache"
    hold = read_predictions(runs[0] / "predictions" / "holdout.npz")
    assert json.loads((runs[0] / "metrics.json").read_text())["probe"]["solver"] == "sgd"
    x_hold = _cached(cache, "train", False)
    from transferlab.data import open_dataset

    ids = list(open_dataset(varied_ds).split("train").sample_ids)
    pos = [ids.index(s) for s in hold.sample_ids]
    np.testing.assert_allclose(hold.logits, logits_of(_head(runs[0]), x_hold[pos]), rtol=1e-4, atol=1e-4)
    # flip-averaged holdout rows for the sgd probe with --flip-features
    flip_hold = read_predictions(runs[1] / "predictions" / "holdout.npz")
    x_avg = (x_hold + _cached(cache, "train", True)) * np.float32(0.5)
    np.testing.assert_allclose(flip_hold.logits, logits_of(_head(runs[1]), x_avg[pos]), rtol=1e-4, atol=1e-4)

    ens = api.ensemble(runs, out=tmp_path / "ens", method="weighted", select_data=tuple(map(str, runs)))
    proto = ens.metrics["protocol"]
    assert proto["mode"] == "select-data" and proto["n_report"] == len(
        read_predictions(runs[0] / "predictions" / "val.npz").targets
    )
    report = api.report(runs, out=tmp_path / "report")
    assert report.html.is_file() and len(report.runs) == 3


def test_probe_options_parse_and_are_refused_where_they_cannot_apply() -> None:
    from transferlab.cli import build_parser
    from transferlab.training.config import TrainConfig

    ns = build_parser().parse_args(
        ["train", "--model", "m", "--out", "o", "--probe", "lbfgs", "--flip-features", "--l2-grid", "0.1", "1e-3"]
    )
    assert ns.probe == "lbfgs" and ns.flip_features is True and ns.l2_grid == [0.1, 1e-3]
    base = {"model": "m", "data": "d", "out": Path("o")}
    cfg = TrainConfig(**base, probe="lbfgs", l2_grid=[0.1, 1e-3], flip_features=True)
    assert cfg.l2_grid == (0.1, 1e-3)
    defaults = TrainConfig(**base)
    assert defaults.probe == "sgd" and defaults.l2_grid is None and defaults.flip_features is False
    with pytest.raises(ConfigError, match=r"^--probe must be one of sgd, lbfgs"):
        TrainConfig(**base, probe="adam")
    for bad in ({"strategy": "full"}, {"feature_cache": "off"}, {"aug": "seed"}):
        with pytest.raises(ConfigError, match=r"^--probe lbfgs .*does not use the feature cache"):
            TrainConfig(**base, probe="lbfgs", **bad)
        with pytest.raises(ConfigError, match=r"^--flip-features .*does not use the feature cache"):
            TrainConfig(**base, flip_features=True, **bad)
    with pytest.raises(ConfigError, match=r"^--probe lbfgs .*non-linear --head"):
        TrainConfig(**base, probe="lbfgs", head="seed")
    with pytest.raises(ConfigError, match=r"^--flip-features .*non-linear --head"):
        TrainConfig(**base, flip_features=True, head="seed")
    with pytest.raises(ConfigError, match=r"^--l2-grid is the penalty path of --probe lbfgs"):
        TrainConfig(**base, l2_grid=(0.1,))
    for grid in ((), (0.1, 0.0), (0.1, -1.0), ("x",), (float("inf"),), (True,)):
        with pytest.raises(ConfigError, match=r"^--l2-grid must be one or more numbers > 0"):
            TrainConfig(**base, probe="lbfgs", l2_grid=grid)
