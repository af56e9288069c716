"""Evaluate a backbone on a dataset split: predictions, metrics and per-class accuracy on disk.

Zero-shot evaluation uses the pretrained ImageNet head as it is and keeps only the outputs of the
dataset's classes (Tiny ImageNet's 200 WordNet ids are ImageNet-1k classes), so the argmax is over
the dataset's classes. That number answers "how good is the pretrained model with no training".
"""

from __future__ import annotations

import logging
import platform
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from transferlab import __version__
from transferlab.data import ImageSplit, open_dataset
from transferlab.data.base import data_fingerprint
from transferlab.data.batched import ArrayBatches, eval_batch
from transferlab.data.decoded import DECODED_MODES, decode_split, pixel_array
from transferlab.data.transforms import CROP_MODES, INTERPOLATIONS, EvalTransform, normalize_batch
from transferlab.errors import ConfigError, DataError
from transferlab.io import atomic_write_json, atomic_write_text, atomic_write_with
from transferlab.metrics import per_class_accuracy, summarize
from transferlab.models.backbones import Backbone, create_backbone
from transferlab.models.fold import inference_copy
from transferlab.models.imagenet import imagenet_indices
from transferlab.models.preprocessing import Preprocessing
from transferlab.runtime import (
    Precision,
    eval_mode,
    inference_streams,
    resolve_device,
    resolve_precision,
    reuse_freed_memory,
)

log = logging.getLogger(__name__)

IMAGENET_OVERLAP_WARNING = (
    "the dataset's classes are ImageNet classes and its images likely come from ImageNet itself: "
    "ImageNet-pretrained weights have probably seen them, so these numbers may be optimistic"
)


@dataclass(frozen=True)
class EvalConfig:
    """Everything an evaluation depends on. Invalid values fail here with a sentence naming the option."""

    data: str
    out: Path
    model: str | None = None
    run: Path | None = None
    weights: str = "auto"
    split: str = "val"
    zero_shot: bool = False
    img_size: int | None = None
    crop: str = "auto"
    interpolation: str = "auto"
    batch_size: int = 32
    workers: int = -1
    precision: str = "auto"
    channels_last: str = "auto"
    device: str = "auto"
    limit: int | None = None
    seed: int = 0
    n_boot: int = 1000
    progress: bool | None = None
    #: With a pretrained model (not a run), read the backbone's pooled features from this feature cache
    #: (``<cache_dir>/features``, shared with `transferlab train`) and apply the model's own classifier:
    #: a zero-shot evaluation after a linear probe on the same images then costs no forward pass.
    cache_dir: Path | None = None
    #: Test-time augmentation: none, flip or flip+crops (see transferlab.predict); probabilities are averaged
    #: over the views and predictions.npz then holds log mean probabilities in its logits field.
    tta: str = "none"
    #: ``auto``: read the split from the decoded cache (built on first use) and resize whole batches as
    #: tensors; ``off``: decode each image with PIL in DataLoader workers.
    decoded_cache: str = "auto"

    def __post_init__(self) -> None:
        if (self.model is None) == (self.run is None):
            raise ConfigError("give either a run directory (transferlab evaluate RUN_DIR) or --model, not both")
        if self.run is not None and self.zero_shot:
            raise ConfigError("--zero-shot uses a pretrained ImageNet head; a run directory has its own trained head")
        if self.crop not in CROP_MODES:
            raise ConfigError(f"--crop must be one of {', '.join(CROP_MODES)}, not {self.crop!r}")
        if self.interpolation not in INTERPOLATIONS:
            raise ConfigError(f"--interpolation must be one of {', '.join(INTERPOLATIONS)}, not {self.interpolation!r}")
        if self.img_size is not None and not 16 <= self.img_size <= 1024:
            raise ConfigError(f"--img-size must be between 16 and 1024, got {self.img_size}")
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"--limit must be >= 1, got {self.limit}")
        if self.n_boot < 0:
            raise ConfigError(f"--n-boot must be >= 0, got {self.n_boot}")
        if self.decoded_cache not in DECODED_MODES:
            raise ConfigError(f"--decoded-cache must be one of {', '.join(DECODED_MODES)}, not {self.decoded_cache!r}")
        from transferlab.predict import check_tta

        check_tta(self.tta)
        if self.tta != "none" and self.cache_dir is not None:
            raise ConfigError("--tta runs the model on several views of each image; leave out --cache-dir")


class _SplitDataset(Dataset):
    """Maps an ImageSplit through a transform; yields (uint8 image, index)."""

    def __init__(self, split: ImageSplit, transform: EvalTransform, indices: np.ndarray) -> None:
        self.split = split
        self.transform = transform
        self.indices = indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        j = int(self.indices[i])
        return self.transform(self.split.load(j)), j


def make_eval_transform(
    pre: Preprocessing, size: int, crop: str = "auto", interpolation: str = "auto"
) -> EvalTransform:
    """The eval transform for a backbone's preprocessing. ``interpolation='auto'`` keeps the weights'
    own method for down-scaling and uses bilinear for up-scaling; a named method is used for both."""
    if interpolation == "auto":
        return EvalTransform(size, pre.interpolation, pre.crop_pct, crop, upsample="auto")
    return EvalTransform(size, interpolation, pre.crop_pct, crop, upsample=interpolation)


def pipeline_name(split: ImageSplit) -> str:
    """How a split's images reach the model, for metrics and logs."""
    folder = getattr(split, "folder", None)
    if folder is not None:
        return f"decoded cache ({folder}), batched tensor resize"
    if pixel_array(split) is not None:
        return "in-memory array, batched tensor resize"
    return "PIL per image in DataLoader workers"


def default_workers() -> int:
    """Decode in one or more worker processes, leaving at least one core to the model."""
    import os

    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(4, n - 1))


def subset_indices(n: int, limit: int | None, seed: int) -> np.ndarray:
    """All indices, or a seeded random ``limit`` of them in ascending order (reproducible subsets)."""
    if limit is None or limit >= n:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=limit, replace=False))


@torch.inference_mode()
def predict_logits(
    backbone: Backbone,
    split: ImageSplit,
    transform: EvalTransform,
    *,
    indices: np.ndarray,
    precision: Precision,
    device: torch.device,
    batch_size: int = 64,
    workers: int = 1,
    progress: bool | None = None,
    forward: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor] | None = None,
    desc: str | None = None,
) -> np.ndarray:
    """Run the model over ``split[indices]`` and return float32 outputs in that order.

    ``forward(model, x)`` replaces ``model(x)``, e.g. to return pre-logits features for the feature
    cache; the output width is taken from the first batch.
    """
    model = backbone.model.to(device)
    if precision.channels_last:
        model = model.to(memory_format=torch.channels_last)
    # A copy with BatchNorm folded into the convolutions: the same function, ~30% faster on a CPU.
    model = inference_copy(model, transform.size, device, channels_last=precision.channels_last)
    pre = backbone.preprocessing
    pixels = pixel_array(split)
    loader: Iterable[Any]
    if pixels is not None:  # decoded cache: whole batches resized as tensors, no worker processes
        loader = ArrayBatches(
            pixels,
            split.targets,
            indices,
            range(len(indices)),
            batch_size,
            lambda u8, _idx: u8,  # resized inside each inference stream (below), in parallel
            device,
        )
    else:
        loader = DataLoader(
            _SplitDataset(split, transform, indices),
            batch_size=batch_size,
            shuffle=False,
            num_workers=workers,
            pin_memory=device.type == "cuda",
            persistent_workers=False,
        )
    out: np.ndarray | None = None
    pos = 0
    disable = None if progress is None else not progress

    def run_model(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            if pixels is not None:
                # Standardised (and made channels_last) at the stored size, then resized: see batched.py.
                x = eval_batch(x, transform, norm=(pre.mean, pre.std), channels_last=precision.channels_last)
            with precision.autocast():
                return (model(x) if forward is None else forward(model, x)).float()

    with eval_mode(model), reuse_freed_memory(device), inference_streams(device) as run:
        for batch in tqdm(loader, desc=desc or f"eval {split.name}", unit="batch", disable=disable, leave=False):
            x = batch[0].to(device, non_blocking=True)
            if pixels is None:
                x = normalize_batch(x, pre.mean, pre.std, channels_last=precision.channels_last)
            y = run(run_model, x).cpu().numpy()
            if out is None:
                out = np.empty((len(indices), *y.shape[1:]), dtype=np.float32)
            out[pos : pos + len(y)] = y
            pos += len(y)
    if out is None:
        return np.empty((0, backbone.num_classes), dtype=np.float32)
    return out


def evaluate(cfg: EvalConfig) -> dict[str, Any]:
    """Evaluate ``cfg.model`` on ``cfg.data``/``cfg.split`` and write results under ``cfg.out``.

    Writes ``metrics.json``, ``predictions.npz`` (logits, targets, sample_ids, class_ids) and
    ``per_class.csv``, each atomically. Returns the metrics dict.
    """
    from transferlab.data.screen import refuse_too_few_classes

    torch.manual_seed(cfg.seed)
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
    if cfg.run is not None:
        from transferlab.train.runs import load_run

        run = load_run(cfg.run)
        if run.class_ids != source.classes.ids:
            raise ConfigError(
                f"{cfg.run} was trained on {len(run.class_ids)} classes that differ from the {len(source.classes)} "
                f"classes of {source.location}; evaluate it on data with the same class list"
            )
        backbone = Backbone(run.model, run.config.model, f"run {cfg.run}", run.preprocessing, run.class_ids)
    else:
        assert cfg.model is not None
        backbone = create_backbone(cfg.model, cfg.weights)
    warnings: list[str] = []
    if cfg.zero_shot:
        if not backbone.has_imagenet_head:
            raise ConfigError(
                f"--zero-shot needs a model with an ImageNet-1k head, but {backbone.name} with weights "
                f"'{backbone.weights}' has {backbone.num_classes} outputs"
            )
        cols = imagenet_indices(source.classes.ids)
    else:
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
        cols = None
    if source.imagenet_classes and backbone.has_imagenet_head:
        warnings.append(IMAGENET_OVERLAP_WARNING)
        log.warning(IMAGENET_OVERLAP_WARNING)

    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, cfg.channels_last, device)
    pre = backbone.preprocessing
    # A trained run is fed the way it was trained (its img_size, crop, interpolation) unless told otherwise:
    # a head fitted at 64px sees something else at the weights' 224px.
    trained = run.config if cfg.run is not None else None
    size = cfg.img_size or (trained.img_size if trained is not None else None) or pre.input_size
    crop = trained.crop if trained is not None and cfg.crop == "auto" else cfg.crop
    interpolation = trained.interpolation if trained is not None and cfg.interpolation == "auto" else cfg.interpolation
    transform = make_eval_transform(pre, size, crop, interpolation)
    workers = default_workers() if cfg.workers < 0 else cfg.workers
    indices = subset_indices(len(split), cfg.limit, cfg.seed)
    if cfg.decoded_cache == "auto":
        from transferlab.data.resolve import cache_dir as user_cache_dir

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

    forward = None
    if cfg.tta != "none":
        from transferlab.predict import tta_forward

        forward = tta_forward(cfg.tta, cols)  # keeps the dataset's columns itself, before averaging
        cols = None
    t0 = time.perf_counter()
    cache_info = None
    # What the images go through is the same on both paths; only where the features come from differs.
    common: dict[str, Any] = dict(
        indices=indices,
        precision=precision,
        device=device,
        batch_size=cfg.batch_size,
        workers=workers,
        progress=cfg.progress,
    )
    if cfg.cache_dir is not None and cfg.run is None:
        from transferlab.train.features import cached_features

        feats, path, hit = cached_features(
            backbone, split, transform, cache_dir=Path(cfg.cache_dir) / "features", **common
        )
        classifier = backbone.model.get_classifier()  # type: ignore[operator]
        with torch.inference_mode():
            logits_all = classifier.float()(torch.from_numpy(feats).float()).numpy()
        cache_info = {"file": str(path), "hit": hit}
    else:
        logits_all = predict_logits(backbone, split, transform, forward=forward, **common)
    wall = time.perf_counter() - t0
    logits = logits_all[:, cols] if cols is not None else logits_all
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
        "preprocessing": pre.to_dict(),
        "precision": precision.name,
        "channels_last": precision.channels_last,
        "device": str(device),
        "workers": workers,
        "pipeline": pipeline_name(split),
        "subset": None if cfg.limit is None else {"limit": cfg.limit, "seed": cfg.seed},
        **({"feature_cache": cache_info} if cache_info is not None else {}),
        "warnings": warnings,
        "config": _config_dict(cfg),
        "versions": versions(),
    }
    write_outputs(cfg.out, metrics, logits, targets, [split.sample_ids[i] for i in indices], source.classes)
    return metrics


def _config_dict(cfg: EvalConfig) -> dict[str, Any]:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()}


def versions() -> dict[str, str]:
    """Versions that decide the numbers (for provenance in metrics and reports)."""
    import timm

    return {
        "transferlab": __version__,
        "torch": torch.__version__,
        "timm": timm.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


def write_outputs(
    out: Path,
    metrics: dict[str, Any],
    logits: np.ndarray,
    targets: np.ndarray,
    sample_ids: list[str],
    classes: Any,
) -> None:
    """Write predictions.npz, per_class.csv and metrics.json (last, so its presence means complete)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_predictions(out / "predictions.npz", logits, targets, sample_ids, classes)
    acc = per_class_accuracy(logits, targets, len(classes))
    counts = np.bincount(targets, minlength=len(classes))
    lines = ["class_index,class_id,class_name,n,top1"]
    for i, (cid, name) in enumerate(zip(classes.ids, classes.names, strict=True)):
        safe = name.replace('"', "'")
        lines.append(f'{i},{cid},"{safe}",{counts[i]},{"" if np.isnan(acc[i]) else f"{acc[i]:.4f}"}')
    atomic_write_text(out / "per_class.csv", "\n".join(lines) + "\n")
    atomic_write_json(out / "metrics.json", metrics)


def write_predictions(path: Path, logits: np.ndarray, targets: np.ndarray, sample_ids: list[str], classes: Any) -> None:
    """A predictions file: logits, targets, sample ids and class ids (no pickles; atomic)."""

    def _npz(f: Any) -> None:
        np.savez(
            f,
            logits=logits.astype(np.float32),
            targets=targets.astype(np.int64),
            sample_ids=np.asarray(sample_ids, dtype=str),
            class_ids=np.asarray(classes.ids, dtype=str),
        )

    atomic_write_with(path, _npz)


def load_predictions(path: str | Path) -> dict[str, np.ndarray]:
    """Read a predictions.npz written by :func:`write_outputs` (no pickles allowed)."""
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}
