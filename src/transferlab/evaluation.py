"""Evaluate a backbone on a dataset split: predictions, metrics and per-class accuracy on disk.

Zero-shot evaluation uses the pretrained ImageNet head as it is and keeps only the outputs of the
dataset's classes (Tiny ImageNet's 200 WordNet ids are ImageNet-1k classes), so the argmax is over
the dataset's classes. That number answers "how good is the pretrained model with no training".
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from transferlab.artifacts.predictions import predictions_path, write_predictions
from transferlab.artifacts.summary import summarize
from transferlab.data import ImageSplit, open_dataset
from transferlab.data.base import data_fingerprint, subset_indices
from transferlab.data.decoded import DECODED_CACHE, decode_split
from transferlab.data.resolve import DATA_HELP
from transferlab.data.resolve import cache_dir as user_cache_dir
from transferlab.data.screen import refuse_too_few_classes
from transferlab.data.transforms import CROP, IMG_SIZE, INTERPOLATION, EvalTransform
from transferlab.errors import ConfigError, DataError
from transferlab.inference.engine import BACKEND, default_workers, make_eval_transform, pipeline_name, predict_logits
from transferlab.inference.features import cached_features
from transferlab.inference.tta import TTA, tta_forward
from transferlab.io import atomic_write_json, atomic_write_text
from transferlab.labels import IMAGENET_OVERLAP_WARNING, imagenet_indices
from transferlab.metrics import per_class_accuracy
from transferlab.models.backbones import Backbone, create_backbone
from transferlab.models.weights import WEIGHTS_HELP
from transferlab.options import check, option
from transferlab.runtime import (
    CHANNELS_LAST,
    DEVICE,
    PRECISION,
    WORKERS,
    resolve_device,
    resolve_precision,
    versions,
)
from transferlab.training.runs import load_run

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalConfig:
    """Everything an evaluation depends on. Invalid values fail here with a sentence naming the option."""

    data: str = option(help=DATA_HELP, cli_default="tiny-imagenet-mini", default_text="tiny-imagenet-mini")
    out: Path = option(help="output folder (created)", required=True)
    model: str | None = option(None, "timm architecture name, e.g. tf_efficientnet_lite0, resnet50")
    run: Path | None = option(
        None,
        "a run directory from `transferlab train` (instead of --model), or a study folder from `transferlab study`: "
        "then every member is evaluated and every ensemble re-applied with its fitted weights (nothing refit), each "
        "into OUT/members/<name> and OUT/ensembles/<name>, with a report in OUT/report",
        flag="run",
        nargs="?",
        metavar="RUN_DIR",
    )
    weights: str = option("auto", WEIGHTS_HELP)
    split: str = option("val", "split to evaluate: train, val, test, all")
    zero_shot: bool = option(False, "use the pretrained ImageNet head, keeping only the dataset's classes")
    img_size: int | None = IMG_SIZE.field(None, group=None)
    crop: str = CROP.field("auto", group=None)
    interpolation: str = INTERPOLATION.field("auto", group=None)
    batch_size: int = option(32, "images per forward pass", lo=1, hi=1 << 16)
    workers: int = WORKERS.field(-1, group=None)
    precision: str = PRECISION.field("auto", group=None)
    channels_last: str = CHANNELS_LAST.field("auto", group=None)
    device: str = DEVICE.field("auto", group=None)
    limit: int | None = option(
        None, "evaluate a seeded random subset of this many images", lo=1, hi=10**12, default_text="all"
    )
    seed: int = option(0, "seed for --limit and the bootstrap", lo=0, hi=2**63 - 1)
    n_boot: int = option(1000, "bootstrap resamples for the intervals", lo=0, hi=10**7, cli=False)
    progress: bool | None = None
    #: With a pretrained model (not a run), read the backbone's pooled features from this feature cache
    #: (``<cache_dir>/features``, shared with `transferlab train`) and apply the model's own classifier:
    #: a zero-shot evaluation after a linear probe on the same images then costs no forward pass.
    cache_dir: Path | None = option(
        None,
        "with --model: take the backbone's pooled features from this feature cache (the one `transferlab train "
        "--cache-dir` fills; computed and stored there when absent) and apply the model's own classifier",
        default_text="no cache, a plain forward pass",
    )
    #: Test-time augmentation: none, flip or flip+crops (see transferlab.inference.tta); probabilities are
    #: averaged over the views and predictions/<split>.npz then holds log mean probabilities in its logits field.
    tta: str = TTA.field("none")
    #: ``auto``: read the split from the decoded cache (built on first use) and resize whole batches as
    #: tensors; ``off``: decode each image with PIL in DataLoader workers.
    decoded_cache: str = DECODED_CACHE.field("auto", group=None)
    backend: str = BACKEND.field("torch", group=None)

    def __post_init__(self) -> None:
        if (self.model is None) == (self.run is None):
            raise ConfigError("give either a run directory (transferlab evaluate RUN_DIR) or --model, not both")
        if self.run is not None and self.zero_shot:
            raise ConfigError("--zero-shot uses a pretrained ImageNet head; a run directory has its own trained head")
        check(self)
        if self.tta != "none" and self.cache_dir is not None:
            raise ConfigError("--tta runs the model on several views of each image; leave out --cache-dir")


def evaluate(cfg: EvalConfig) -> dict[str, Any]:
    """Evaluate ``cfg.model`` on ``cfg.data``/``cfg.split`` and write results under ``cfg.out``.

    Writes ``metrics.json``, ``predictions/<split>.npz`` (logits, targets, sample_ids, class_ids) and
    ``per_class.csv``, each atomically. Returns the metrics dict.
    """
    torch.manual_seed(cfg.seed)
    source, split = _labeled_split(cfg)
    backbone, trained = _backbone(cfg, source)
    warnings: list[str] = []
    cols = _scored_columns(cfg, backbone, source)
    if source.imagenet_classes and backbone.has_imagenet_head:
        warnings.append(IMAGENET_OVERLAP_WARNING)
        log.warning(IMAGENET_OVERLAP_WARNING)

    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, cfg.channels_last, device)
    size, transform = _transform(cfg, backbone.preprocessing, trained)
    workers = default_workers() if cfg.workers < 0 else cfg.workers
    indices = subset_indices(len(split), cfg.limit, cfg.seed)
    if cfg.decoded_cache == "auto":
        split = decode_split(split, Path(cfg.cache_dir) if cfg.cache_dir else user_cache_dir(), progress=cfg.progress)
    log.info(
        "evaluating %s (%s) on %s/%s: %d images, %s, %s",
        backbone.name,
        backbone.weights,
        source.location,
        cfg.split,
        len(indices),
        transform,
        precision.describe(),
    )
    # What the images go through is the same on both paths; only where the features come from differs.
    common: dict[str, Any] = dict(
        indices=indices,
        precision=precision,
        device=device,
        batch_size=cfg.batch_size,
        workers=workers,
        progress=cfg.progress,
        backend=cfg.backend,
        info=(engine := {}),
    )
    t0 = time.perf_counter()
    logits, cache_info = _logits(cfg, backbone, split, transform, cols, common)
    wall = time.perf_counter() - t0
    targets = split.targets[indices]

    metrics: dict[str, Any] = {
        "model": backbone.name,
        "run": None if cfg.run is None else str(cfg.run),
        "weights": backbone.weights,
        "data": source.location,
        "dataset": source.name,
        "data_fingerprint": data_fingerprint(source, [cfg.split]),
        "split": cfg.split,
        "mode": "zero-shot" if cfg.zero_shot else ("run" if cfg.run is not None else "head"),
        **summarize(logits, targets, n_boot=cfg.n_boot, seed=cfg.seed),
        "num_classes": len(source.classes),
        "wall_s": round(wall, 3),
        "images_per_s": round(len(indices) / wall, 2) if wall > 0 else None,
        "img_size": size,
        "transform": repr(transform),
        "tta": cfg.tta,
        "preprocessing": backbone.preprocessing.to_dict(),
        "precision": precision.name,
        "channels_last": precision.channels_last,
        "device": str(device),
        "workers": workers,
        "pipeline": pipeline_name(split),
        "backend": engine or {"backend": "feature cache"},
        "subset": None if cfg.limit is None else {"limit": cfg.limit, "seed": cfg.seed},
        **({"feature_cache": cache_info} if cache_info is not None else {}),
        "warnings": warnings,
        "config": _config_dict(cfg),
        "versions": versions(),
    }
    write_outputs(cfg.out, metrics, logits, targets, [split.sample_ids[i] for i in indices], source.classes, cfg.split)
    return metrics


def _labeled_split(cfg: EvalConfig) -> tuple[Any, ImageSplit]:
    """The dataset and its split to score; refused with a sentence when it cannot be scored."""
    source = open_dataset(cfg.data)
    # Every mode scores an argmax over the dataset's classes (zero-shot keeps only their ImageNet columns, a
    # run's head has exactly them): over one class it is always right, so the top-1 100% would mean nothing.
    refuse_too_few_classes(source, None, "transferlab evaluate")
    split = source.split(cfg.split)
    if not split.labeled:
        raise DataError(
            f"split {cfg.split!r} of {source.location} has no labels, so it cannot be evaluated; "
            "use `transferlab predict` for unlabeled images"
        )
    return source, split


def _backbone(cfg: EvalConfig, source: Any) -> tuple[Backbone, Any]:
    """The network to evaluate, and the config of the run it was trained in (None for a pretrained model)."""
    if cfg.run is None:
        assert cfg.model is not None
        return create_backbone(cfg.model, cfg.weights), None
    run = load_run(cfg.run)
    if run.class_ids != source.classes.ids:
        raise ConfigError(
            f"{cfg.run} was trained on {len(run.class_ids)} classes that differ from the {len(source.classes)} "
            f"classes of {source.location}; evaluate it on data with the same class list"
        )
    return Backbone(run.model, run.config.model, f"run {cfg.run}", run.preprocessing, run.class_ids), run.config


def _scored_columns(cfg: EvalConfig, backbone: Backbone, source: Any) -> np.ndarray | None:
    """The output columns scored: the dataset's ImageNet columns for zero-shot, else all (None), after checks."""
    if cfg.zero_shot:
        if not backbone.has_imagenet_head:
            raise ConfigError(
                f"--zero-shot needs a model with an ImageNet-1k head, but {backbone.name} with weights "
                f"'{backbone.weights}' has {backbone.num_classes} outputs"
            )
        return imagenet_indices(source.classes.ids)
    if backbone.class_ids is not None and tuple(backbone.class_ids) != source.classes.ids:
        hint = " (add --zero-shot to use the ImageNet head)" if source.imagenet_classes else ""
        raise ConfigError(
            f"the model's head predicts {backbone.num_classes} classes that are not the dataset's "
            f"{len(source.classes)} classes{hint}"
        )
    if backbone.num_classes != len(source.classes):
        raise ConfigError(
            f"the model has {backbone.num_classes} outputs but {source.location} has "
            f"{len(source.classes)} classes; pass weights trained on this dataset, or --zero-shot"
        )
    return None


def _transform(cfg: EvalConfig, pre: Any, trained: Any) -> tuple[int, EvalTransform]:
    """The input size and eval transform.

    A trained run is fed the way it was trained (its img_size, crop, interpolation) unless told otherwise:
    a head fitted at 64px sees something else at the weights' 224px.
    """
    size = cfg.img_size or (trained.img_size if trained is not None else None) or pre.input_size
    crop = trained.crop if trained is not None and cfg.crop == "auto" else cfg.crop
    interpolation = trained.interpolation if trained is not None and cfg.interpolation == "auto" else cfg.interpolation
    return size, make_eval_transform(pre, size, crop, interpolation)


def _logits(
    cfg: EvalConfig,
    backbone: Backbone,
    split: ImageSplit,
    transform: EvalTransform,
    cols: np.ndarray | None,
    common: dict[str, Any],
) -> tuple[np.ndarray, dict[str, Any] | None]:
    """The scored outputs (the model's, or from the feature cache), and the feature cache's record when used."""
    forward = None
    if cfg.tta != "none":
        forward = tta_forward(cfg.tta, cols)  # keeps the dataset's columns itself, before averaging
        cols = None
    cache_info = None
    if cfg.cache_dir is not None and cfg.run is None:
        feats, path, hit = cached_features(
            backbone, split, transform, cache_dir=Path(cfg.cache_dir) / "features", **common
        )
        classifier = backbone.model.get_classifier()  # type: ignore[operator]
        with torch.inference_mode():
            logits_all = classifier.float()(torch.from_numpy(feats).float()).numpy()
        cache_info = {"file": str(path), "hit": hit}
    else:
        logits_all = predict_logits(backbone, split, transform, forward=forward, **common)
    return (logits_all[:, cols] if cols is not None else logits_all), cache_info


def _config_dict(cfg: EvalConfig) -> dict[str, Any]:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()}


def write_outputs(
    out: Path,
    metrics: dict[str, Any],
    logits: np.ndarray,
    targets: np.ndarray,
    sample_ids: list[str],
    classes: Any,
    split: str,
) -> None:
    """Write predictions/<split>.npz, per_class.csv and metrics.json (last, so its presence means complete)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_predictions(predictions_path(out, split), logits, targets, sample_ids, classes.ids)
    acc = per_class_accuracy(logits, targets, len(classes))
    counts = np.bincount(targets, minlength=len(classes))
    lines = ["class_index,class_id,class_name,n,top1"]
    for i, (cid, name) in enumerate(zip(classes.ids, classes.names, strict=True)):
        safe = name.replace('"', "'")
        lines.append(f'{i},{cid},"{safe}",{counts[i]},{"" if np.isnan(acc[i]) else f"{acc[i]:.4f}"}')
    atomic_write_text(out / "per_class.csv", "\n".join(lines) + "\n")
    atomic_write_json(out / "metrics.json", metrics)
