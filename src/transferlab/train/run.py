"""``transferlab train --strategy linear-probe``: the feature-cached linear probe, end to end.

Protocol: a seeded, class-stratified ``--holdout`` fraction of the *train* split picks the best epoch;
the number reported comes from ``--report-split`` (default ``val``), which nothing was fitted or chosen
on. The run directory holds config.yaml, history.csv, metrics.json, predictions/<split>.npz and
model.safetensors (the backbone with its new head, loadable with ``evaluate --weights``).
"""

from __future__ import annotations

import csv
import io
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from transferlab.data import open_dataset
from transferlab.data.transforms import CROP_MODES, INTERPOLATIONS
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
from transferlab.models.backbones import create_backbone
from transferlab.models.imagenet import imagenet_indices
from transferlab.models.weights import save_weights
from transferlab.runtime import resolve_device, resolve_precision
from transferlab.train.features import cached_features
from transferlab.train.probe import ProbeConfig, fit_linear_probe, stratified_holdout

log = logging.getLogger(__name__)

STRATEGIES = ("linear-probe",)
HEAD_INITS = ("auto", "imagenet", "random")


@dataclass(frozen=True)
class TrainConfig:
    """A linear-probe run. Invalid values fail here with a sentence naming the option."""

    model: str
    data: str
    out: Path
    weights: str = "auto"
    strategy: str = "linear-probe"
    head_init: str = "auto"
    img_size: int | None = None
    crop: str = "auto"
    interpolation: str = "auto"
    holdout: float = 0.1
    report_split: str = "val"
    epochs: int = 10
    lr: float = 1e-3
    batch_size: int = 256
    optimizer: str = "adamw"
    weight_decay: float = 0.0
    label_smoothing: float = 0.0
    seed: int = 0
    precision: str = "auto"
    channels_last: str = "auto"
    device: str = "auto"
    workers: int = -1
    feature_batch_size: int = 32
    cache_dir: Path | None = None
    train_limit: int | None = None
    report_limit: int | None = None
    progress: bool | None = None

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"--strategy must be one of {', '.join(STRATEGIES)} (for now), not {self.strategy!r}")
        if self.head_init not in HEAD_INITS:
            raise ConfigError(f"--head-init must be one of {', '.join(HEAD_INITS)}, not {self.head_init!r}")
        if self.crop not in CROP_MODES:
            raise ConfigError(f"--crop must be one of {', '.join(CROP_MODES)}, not {self.crop!r}")
        if self.interpolation not in INTERPOLATIONS:
            raise ConfigError(f"--interpolation must be one of {', '.join(INTERPOLATIONS)}")
        if not 0 < self.holdout < 1:
            raise ConfigError(f"--holdout must be in (0, 1), got {self.holdout}")
        if self.feature_batch_size < 1:
            raise ConfigError(f"--feature-batch-size must be >= 1, got {self.feature_batch_size}")
        ProbeConfig(
            self.epochs, self.lr, self.batch_size, self.optimizer, self.weight_decay, self.label_smoothing, self.seed
        )

    def probe(self) -> ProbeConfig:
        """The optimisation part."""
        return ProbeConfig(
            self.epochs, self.lr, self.batch_size, self.optimizer, self.weight_decay, self.label_smoothing, self.seed
        )


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run a linear probe and write its run directory. Returns metrics.json's content."""
    from transferlab.data.resolve import cache_dir as user_cache_dir

    t_start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    source = open_dataset(cfg.data)
    train_split = source.split("train")
    report = source.split(cfg.report_split)
    if cfg.report_split == "train":
        raise ConfigError("--report-split must not be 'train': the head is fitted on it")
    if not train_split.labeled or not report.labeled:
        raise DataError(f"linear probe needs labeled train and {cfg.report_split} splits in {source.location}")
    backbone = create_backbone(cfg.model, cfg.weights)
    num_classes = len(source.classes)

    can_warm = backbone.has_imagenet_head and source.imagenet_classes
    head_init = ("imagenet" if can_warm else "random") if cfg.head_init == "auto" else cfg.head_init
    if head_init == "imagenet" and not can_warm:
        why = (
            "the backbone has no ImageNet-1k head"
            if not backbone.has_imagenet_head
            else "the dataset's classes are not ImageNet-1k classes"
        )
        raise ConfigError(f"--head-init imagenet is not possible: {why}; use --head-init random")
    init = None
    if head_init == "imagenet":
        clf = backbone.model.get_classifier()
        rows = torch.from_numpy(imagenet_indices(source.classes.ids))
        init = (clf.weight.detach()[rows].numpy().copy(), clf.bias.detach()[rows].numpy().copy())
    warnings = [IMAGENET_OVERLAP_WARNING] if source.imagenet_classes and backbone.has_imagenet_head else []

    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, cfg.channels_last, device)
    pre = backbone.preprocessing
    size = cfg.img_size or pre.input_size
    transform = make_eval_transform(pre, size, cfg.crop, cfg.interpolation)
    workers = default_workers() if cfg.workers < 0 else cfg.workers
    cache = Path(cfg.cache_dir) if cfg.cache_dir else user_cache_dir() / "features"
    log.info(
        "strategy linear-probe: backbone %s frozen (BatchNorm eval), new linear head %d -> %d, head init %s; "
        "feature cache at %s",
        cfg.model,
        backbone.model.num_features,
        num_classes,
        head_init,
        cache,
    )

    train_idx = subset_indices(len(train_split), cfg.train_limit, cfg.seed)
    report_idx = subset_indices(len(report), cfg.report_limit, cfg.seed)
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
    fit_pos, hold_pos = stratified_holdout(y_train, cfg.holdout, cfg.seed)
    t1 = time.perf_counter()
    result = fit_linear_probe(
        x_train[fit_pos], y_train[fit_pos], x_train[hold_pos], y_train[hold_pos], num_classes, cfg.probe(), init=init
    )
    t_fit = time.perf_counter() - t1

    w, b = result.weight, result.bias
    logits = (torch.from_numpy(x_report) @ w.T + b).numpy()
    y_report = report.targets[report_idx]
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)

    model = backbone.model
    model.reset_classifier(num_classes)
    clf = model.get_classifier()
    with torch.no_grad():
        clf.weight.copy_(w)
        clf.bias.copy_(b)
    save_weights(
        out / "model.safetensors",
        model.state_dict(),
        preprocessing=pre,
        class_ids=list(source.classes.ids),
        architecture=cfg.model,
    )

    write_history(out / "history.csv", result.history)
    atomic_write_text(out / "config.yaml", yaml.safe_dump(_config_dict(cfg), sort_keys=False))
    write_predictions(
        out / "predictions" / f"{cfg.report_split}.npz",
        logits,
        y_report,
        [report.sample_ids[i] for i in report_idx],
        source.classes,
    )
    trained = int(w.numel() + b.numel())
    metrics: dict[str, Any] = {
        "model": cfg.model,
        "weights": backbone.weights,
        "strategy": "linear-probe",
        "bn": "eval",
        "head": "linear",
        "head_init": head_init,
        "params_trained": trained,
        "data": source.location,
        "dataset": source.name,
        "split": cfg.report_split,
        **summarize(logits, y_report, seed=cfg.seed),
        "num_classes": num_classes,
        "best_epoch": result.best_epoch,
        "epochs": cfg.epochs,
        "selection": f"lowest loss on a {cfg.holdout:.0%} class-stratified holdout of train "
        f"({len(hold_pos)} images); {cfg.report_split} was not used for any choice",
        "n_fit": len(fit_pos),
        "n_holdout": len(hold_pos),
        "img_size": size,
        "transform": repr(transform),
        "preprocessing": pre.to_dict(),
        "precision": precision.name,
        "device": str(device),
        "feature_cache": {"train_hit": hit_train, "report_hit": hit_report, "dir": str(cache)},
        "feature_seconds": round(t_feat, 2),
        "fit_seconds": round(t_fit, 2),
        "wall_s": round(time.perf_counter() - t_start, 2),
        "warnings": warnings,
        "versions": versions(),
    }
    atomic_write_json(out / "metrics.json", metrics)
    return metrics


def write_history(path: Path, rows: list[dict[str, float]]) -> None:
    """history.csv: one row per epoch (row 0 scores the initial head)."""
    buf = io.StringIO()
    cols = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds", "images_per_s"]
    wr = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    wr.writeheader()
    for r in rows:
        wr.writerow({k: (f"{r[k]:.6g}" if isinstance(r[k], float) else r[k]) for k in cols})
    atomic_write_text(path, buf.getvalue())


def _config_dict(cfg: TrainConfig) -> dict[str, Any]:
    d = asdict(cfg)
    for k, v in d.items():
        if isinstance(v, Path):
            d[k] = str(v)
    return d
