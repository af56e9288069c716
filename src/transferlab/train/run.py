"""``transferlab train``: from a config to a complete run directory.

Protocol: a seeded, class-stratified ``--holdout`` fraction of the *train* split picks the epoch kept
(and drives early stopping); the numbers reported come from ``--report-split`` (default ``val``),
which nothing was fitted or chosen on.

Run directory: ``config.yaml`` (replayable: ``transferlab train --config``), ``history.csv``,
``steps.csv``, ``curves.png``, ``checkpoints/``, ``predictions/<split>.npz``, ``metrics.json`` and
``model.safetensors`` (the adapted model with its preprocessing and class ids in the metadata).

Two paths: when nothing before the head trains and no random augmentation reaches the backbone
(a linear probe), the backbone runs once per split into the feature cache and the head trains on
the cached features in seconds; everything else goes through the training loop.
"""

from __future__ import annotations

import csv
import io
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from transferlab.data import DatasetSource, open_dataset
from transferlab.errors import ConfigError, DataError
from transferlab.evaluate import (
    IMAGENET_OVERLAP_WARNING,
    default_workers,
    make_eval_transform,
    subset_indices,
    versions,
    write_predictions,
)
from transferlab.io import atomic_write_json, atomic_write_text
from transferlab.metrics import summarize
from transferlab.models.backbones import Backbone, create_backbone
from transferlab.models.imagenet import imagenet_indices
from transferlab.models.weights import save_weights
from transferlab.runtime import resolve_device, resolve_precision
from transferlab.train.config import TrainConfig
from transferlab.train.features import cached_features
from transferlab.train.probe import ProbeConfig, fit_linear_probe, stratified_holdout

log = logging.getLogger(__name__)

__all__ = ["TrainConfig", "train"]


def _head_init(cfg: TrainConfig, backbone: Backbone, source: DatasetSource) -> str:
    can_warm = backbone.has_imagenet_head and source.imagenet_classes and cfg.head.split(":")[0] == "linear"
    if cfg.head_init == "auto":
        return "imagenet" if can_warm and cfg.strategy != "scratch" else "random"
    if cfg.head_init == "imagenet" and not can_warm:
        if not backbone.has_imagenet_head:
            why = "the backbone has no ImageNet-1k head"
        elif not source.imagenet_classes:
            why = "the dataset's classes are not ImageNet-1k classes"
        else:
            why = "only a linear head can start from classifier rows"
        raise ConfigError(f"--head-init imagenet is not possible: {why}; use --head-init random")
    return cfg.head_init


def _load_backbone(cfg: TrainConfig) -> Backbone:
    if cfg.init_from is not None:
        from transferlab.train.runs import backbone_from_run

        return backbone_from_run(Path(cfg.init_from), cfg.model)
    weights = "none" if cfg.strategy == "scratch" else cfg.weights
    return create_backbone(cfg.model, weights)


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run ``cfg`` and write its run directory. Returns metrics.json's content (on rank 0)."""
    from transferlab.train.checkpoint import RunLock
    from transferlab.train.loop import Dist

    d = Dist.from_env()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    if d.main:
        with RunLock(out):
            return _train(cfg, d)
    return _train(cfg, d)


def _train(cfg: TrainConfig, d: Any) -> dict[str, Any]:
    from transferlab.data.resolve import cache_dir as user_cache_dir

    t_start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed % (2**32))
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    out = Path(cfg.out)
    if d.main:
        atomic_write_text(out / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    source = open_dataset(cfg.data)
    train_split = source.split("train")
    report = source.split(cfg.report_split)
    if not train_split.labeled or not report.labeled:
        raise DataError(f"training needs labeled train and {cfg.report_split} splits in {source.location}")
    backbone = _load_backbone(cfg)
    num_classes = len(source.classes)
    head_init = _head_init(cfg, backbone, source)
    warnings = [IMAGENET_OVERLAP_WARNING] if source.imagenet_classes and backbone.has_imagenet_head else []

    device = resolve_device(cfg.device)
    if d.world > 1 and device.type == "cuda":
        device = torch.device("cuda", d.rank % torch.cuda.device_count())
    precision = resolve_precision(cfg.precision, cfg.channels_last, device)
    pre = backbone.preprocessing
    size = cfg.img_size or pre.input_size
    transform = make_eval_transform(pre, size, cfg.crop, cfg.interpolation)
    workers = default_workers() if cfg.workers < 0 else cfg.workers
    cache = Path(cfg.cache_dir) if cfg.cache_dir else user_cache_dir() / "features"

    train_idx = subset_indices(len(train_split), cfg.train_limit, cfg.seed)
    report_idx = subset_indices(len(report), cfg.report_limit, cfg.seed)
    y_train = train_split.targets[train_idx]
    fit_pos, hold_pos = stratified_holdout(y_train, cfg.holdout, cfg.seed)

    info: dict[str, Any] = {}
    if cfg.use_feature_cache:
        logits, history, best_epoch, trained, model_state, extra = _probe_on_features(
            cfg,
            backbone,
            source,
            transform,
            train_idx,
            report_idx,
            fit_pos,
            hold_pos,
            head_init,
            precision=precision,
            device=device,
            cache=cache,
            workers=workers,
        )
        info.update(extra)
        steps: list[dict[str, float]] = []
        strategy = {"strategy": "linear-probe", "bn": "eval", "head": "linear"}
        stopped_early = False
    else:
        logits, history, best_epoch, trained, steps, model_state, strategy, stopped_early = _fit_loop(
            cfg,
            backbone,
            source,
            train_idx,
            fit_pos,
            hold_pos,
            report_idx,
            head_init,
            size,
            d,
            precision=precision,
            device=device,
            workers=workers,
        )
    if not d.main:
        return {}

    y_report = report.targets[report_idx]
    save_weights(
        out / "model.safetensors",
        model_state,
        preprocessing=pre,
        class_ids=list(source.classes.ids),
        architecture=cfg.model,
    )
    write_history(out / "history.csv", history)
    if steps:
        write_steps(out / "steps.csv", steps)
    write_predictions(
        out / "predictions" / f"{cfg.report_split}.npz",
        logits,
        y_report,
        [report.sample_ids[i] for i in report_idx],
        source.classes,
    )
    from transferlab.report.plots import plot_curves

    plot_curves(
        [r for r in history if r["epoch"] >= 1],
        out / "curves.png",
        best_epoch=best_epoch,
        title=f"{cfg.model} {strategy['strategy']} ({strategy['head']} head)",
        val_label="holdout",
    )
    metrics: dict[str, Any] = {
        "model": cfg.model,
        "weights": backbone.weights,
        **strategy,
        "head_init": head_init,
        "params_trained": trained,
        "data": source.location,
        "dataset": source.name,
        "split": cfg.report_split,
        **summarize(logits, y_report, seed=cfg.seed),
        "num_classes": num_classes,
        "best_epoch": best_epoch,
        "epochs": cfg.epochs,
        "epochs_run": max((int(r["epoch"]) for r in history), default=0),
        "stopped_early": stopped_early,
        "selection": f"{cfg.early_stop} on a {cfg.holdout:.0%} class-stratified holdout of train "
        f"({len(hold_pos)} images); {cfg.report_split} was not used for any choice",
        "n_fit": len(fit_pos),
        "n_holdout": len(hold_pos),
        "img_size": size,
        "preprocessing": pre.to_dict(),
        "precision": precision.name,
        "channels_last": precision.channels_last,
        "device": str(device),
        "world_size": d.world,
        **info,
        "train_seconds": round(sum(r.get("seconds", 0.0) for r in history), 2),
        "wall_s": round(time.perf_counter() - t_start, 2),
        "warnings": warnings,
        "versions": versions(),
    }
    atomic_write_json(out / "metrics.json", metrics)
    return metrics


def _probe_on_features(
    cfg,
    backbone,
    source,
    transform,
    train_idx,
    report_idx,
    fit_pos,
    hold_pos,
    head_init,
    *,
    precision,
    device,
    cache,
    workers,
):  # type: ignore[no-untyped-def]
    """The linear probe's fast path: cached features, then a few seconds of head training."""
    train_split, report = source.split("train"), source.split(cfg.report_split)
    num_classes = len(source.classes)
    log.info(
        "strategy linear-probe: backbone %s frozen (BatchNorm eval), new linear head %d -> %d, head init %s; "
        "training on cached features (%s)",
        cfg.model,
        backbone.model.num_features,
        num_classes,
        head_init,
        cache,
    )
    init = None
    if head_init == "imagenet":
        clf = backbone.model.get_classifier()
        rows = torch.from_numpy(imagenet_indices(source.classes.ids))
        init = (clf.weight.detach()[rows].numpy().copy(), clf.bias.detach()[rows].numpy().copy())
    common = dict(
        precision=precision,
        device=device,
        cache_dir=cache,
        batch_size=cfg.feature_batch_size,
        workers=workers,
        progress=cfg.progress,
    )
    t0 = time.perf_counter()
    x_train, _, hit_train = cached_features(backbone, train_split, transform, indices=train_idx, **common)
    x_report, _, hit_report = cached_features(backbone, report, transform, indices=report_idx, **common)
    t_feat = time.perf_counter() - t0
    y_train = train_split.targets[train_idx]
    probe = ProbeConfig(
        cfg.epochs, cfg.lr, cfg.batch_size, cfg.optimizer, cfg.weight_decay, cfg.label_smoothing, cfg.seed
    )
    t1 = time.perf_counter()
    result = fit_linear_probe(
        x_train[fit_pos], y_train[fit_pos], x_train[hold_pos], y_train[hold_pos], num_classes, probe, init=init
    )
    t_fit = time.perf_counter() - t1
    w, b = result.weight, result.bias
    logits = (torch.from_numpy(x_report) @ w.T + b).numpy()
    from transferlab.models.heads import HeadSpec, TransferModel

    model = TransferModel.from_backbone(backbone.model, HeadSpec("linear"), num_classes)
    with torch.no_grad():
        model.head.fc.weight.copy_(w)
        model.head.fc.bias.copy_(b)
    extra = {
        "feature_cache": {"train_hit": hit_train, "report_hit": hit_report, "dir": str(cache)},
        "feature_seconds": round(t_feat, 2),
        "fit_seconds": round(t_fit, 2),
    }
    return logits, result.history, result.best_epoch, int(w.numel() + b.numel()), model.state_dict(), extra


def _fit_loop(
    cfg, backbone, source, train_idx, fit_pos, hold_pos, report_idx, head_init, size, d, *, precision, device, workers
):  # type: ignore[no-untyped-def]
    """Every strategy through the training loop; returns report logits and the trained state."""
    from transferlab.data.augment import TrainTransform
    from transferlab.models.heads import TransferModel
    from transferlab.models.strategies import trainable_counts
    from transferlab.train.loop import EvalImages, FitData, TrainImages, fit, predict

    train_split, report = source.split("train"), source.split(cfg.report_split)
    num_classes = len(source.classes)
    pre = backbone.preprocessing
    warm = list(source.classes.ids) if head_init == "imagenet" else None
    model = TransferModel.from_backbone(backbone.model, cfg.head_spec(), num_classes, warm_start_ids=warm)
    mean, std = pre.mean, pre.std
    if cfg.standardize == "dataset":
        from transferlab.data.resolve import cache_dir as user_cache_dir
        from transferlab.data.stats import channel_stats

        stats_dir = (Path(cfg.cache_dir) if cfg.cache_dir else user_cache_dir()) / "stats"
        mean, std = channel_stats(train_split, train_idx[fit_pos], cache_dir=stats_dir)
        log.info("standardizing with the training set's channel mean %s and std %s", mean, std)
    up = "bilinear" if cfg.interpolation == "auto" else cfg.interpolation
    eval_tf = make_eval_transform(pre, size, cfg.crop, cfg.interpolation)
    # Without augmentation the model trains on exactly the images it is evaluated on (and the feature
    # cache computes): the eval transform, which ignores the per-sample generator.
    train_tf = TrainTransform(size, interpolation=up, aug=cfg.aug) if cfg.aug != "none" else _NoAug(eval_tf)
    fit_idx = train_idx[fit_pos]
    y_fit = train_split.targets[fit_idx]
    class_weights = None
    sample_weights = None
    counts = np.bincount(y_fit, minlength=num_classes).astype(np.float64)
    if cfg.class_weights == "balanced":
        cw = np.where(counts > 0, len(y_fit) / (num_classes * np.maximum(counts, 1)), 0.0)
        class_weights = torch.tensor(cw, dtype=torch.float32, device=device)
    if cfg.sampler == "balanced":
        sample_weights = 1.0 / np.maximum(counts[y_fit], 1)
    data = FitData(
        train=TrainImages(train_split, fit_idx, train_tf, cfg.seed),
        holdout=EvalImages(train_split, train_idx[hold_pos], eval_tf),
        num_classes=num_classes,
        mean=mean,
        std=std,
        class_weights=class_weights,
        sample_weights=sample_weights,
    )
    res = fit(model, data, cfg, run_dir=Path(cfg.out), precision=precision, device=device, workers=workers, d=d)
    logits = predict(
        model,
        EvalImages(report, report_idx, eval_tf),
        mean=mean,
        std=std,
        precision=precision,
        device=device,
        batch_size=cfg.batch_size,
        workers=workers,
        d=d,
        progress=cfg.progress,
    )
    spec = cfg.strategy_spec()
    trained = trainable_counts(model)["total"]
    state = model.state_dict()
    strategy = {"strategy": spec.name, "bn": spec.policy, "head": str(cfg.head_spec())}
    return logits, res.history, res.best_epoch, trained, res.steps, state, strategy, res.stopped_early


class _NoAug:
    """Adapts an eval transform to the training transform's ``(img, rng)`` signature."""

    def __init__(self, tf: Any) -> None:
        self.tf = tf

    def __call__(self, img: Any, rng: Any) -> torch.Tensor:
        return self.tf(img)


def write_history(path: Path, rows: list[dict[str, float]]) -> None:
    """history.csv: one row per epoch (a linear probe's row 0 scores the initial head)."""
    cols = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds", "images_per_s"]
    _write_csv(path, cols, rows)


def write_steps(path: Path, rows: list[dict[str, float]]) -> None:
    """steps.csv: the loss and learning rate of every step (the exact-resume test compares these)."""
    _write_csv(path, ["step", "epoch", "loss", "lr"], rows)


def _write_csv(path: Path, cols: list[str], rows: list[dict[str, float]]) -> None:
    buf = io.StringIO()
    wr = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n", extrasaction="ignore")
    wr.writeheader()
    for r in rows:
        wr.writerow({k: (f"{r[k]:.8g}" if isinstance(r[k], float) else r[k]) for k in cols})
    atomic_write_text(path, buf.getvalue())
