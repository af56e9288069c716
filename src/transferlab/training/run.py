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
import dataclasses
import io
import logging
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from transferlab.artifacts.curves import plot_curves
from transferlab.artifacts.lock import RunLock
from transferlab.artifacts.predictions import predictions_path, write_predictions
from transferlab.artifacts.summary import summarize
from transferlab.data import DatasetSource, open_dataset
from transferlab.data.augment import EvalAsTrain, TrainTransform
from transferlab.data.base import data_fingerprint, subset_indices
from transferlab.data.decoded import decode_split
from transferlab.data.digests import cached_digests, find_duplicates, overlap
from transferlab.data.resolve import cache_dir as user_cache_dir
from transferlab.data.screen import refuse_too_few_classes, screen_images
from transferlab.data.stats import channel_stats
from transferlab.errors import ConfigError, DataError
from transferlab.inference.engine import default_workers, make_eval_transform
from transferlab.inference.features import cached_features
from transferlab.io import atomic_write_json, atomic_write_text
from transferlab.labels import IMAGENET_OVERLAP_WARNING
from transferlab.models.backbones import Backbone, create_backbone
from transferlab.models.heads import TransferModel
from transferlab.models.strategies import trainable_counts
from transferlab.models.weights import read_weight_file, save_weights
from transferlab.runtime import resolve_device, resolve_precision, versions
from transferlab.training.config import RunOptions, TrainConfig
from transferlab.training.hooks import FitHooks, hooks_from_env
from transferlab.training.interrupt import GracefulStop
from transferlab.training.logistic import logits_of, scores, tune_logistic
from transferlab.training.loop import Dist, EvalImages, FitData, TrainImages, fit, predict
from transferlab.training.probe import ProbeConfig, fit_head, head_logits, stratified_holdout
from transferlab.training.runs import backbone_from_run, load_run, load_run_config
from transferlab.training.tensorboard import TensorBoardLog

log = logging.getLogger(__name__)

__all__ = ["TrainConfig", "train"]


def _head_init(cfg: TrainConfig, backbone: Backbone, source: DatasetSource) -> str:
    if cfg.head_from is not None:
        return f"run {cfg.head_from}"
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
        return backbone_from_run(Path(cfg.init_from), cfg.model)
    weights = "none" if cfg.strategy == "scratch" else cfg.weights
    return create_backbone(cfg.model, weights)


def train(
    cfg: TrainConfig,
    *,
    tensorboard: bool = False,
    bad_images: str = "error",
    callback: Callable[[str, dict[str, float]], None] | None = None,
    hooks: FitHooks | None = None,
) -> dict[str, Any]:
    """Run ``cfg`` and write its run directory. Returns metrics.json's content (on rank 0).

    ``callback(kind, row)`` sees every ``"step"`` row (as in steps.csv) and ``"epoch"`` row (as in
    history.csv) on rank 0 as it is recorded in the training loop: live progress for a notebook, or
    timings (benchmarks/ uses it to time steps after a warm-up). The feature-cache path trains its head in
    seconds and reports nothing through it.

    ``tensorboard`` also writes the steps, epochs, curves and hyper-parameters as TensorBoard events to
    RUN_DIR/tensorboard (a view only: not part of the config, so it never changes what a run computes).

    ``bad_images`` (``--bad-images``): every image the run reads is decoded once before any work; ``error``
    stops with each broken file and why, ``skip`` leaves them out (logged, counted in metrics.json's
    ``bad_images``). It is not part of the config: on clean data both give the same run.

    SIGTERM/SIGINT during the training loop finish the current step, write a checkpoint and raise
    :class:`~transferlab.errors.TrainingInterrupted`. A process that ``torchrun --max-restarts`` started
    again after a failure (``TORCHELASTIC_RESTART_COUNT`` > 0) resumes from the newest checkpoint by itself.

    ``hooks`` (:class:`~transferlab.training.hooks.FitHooks`) are called at fixed points of every training step
    (the tests inject faults through them); without them, the ones ``TRANSFERLAB_HOOKS`` names, read here once.
    """
    RunOptions(bad_images=bad_images, tensorboard=tensorboard)  # checks them as the CLI declares them
    if hooks is None:
        hooks = hooks_from_env()
    d = Dist.from_env()
    restarts = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0").strip()
    if restarts.isdigit() and int(restarts) > 0 and not cfg.resume:
        # The failed attempt's checkpoints are in --out; starting over would refuse to overwrite them.
        if d.main:
            log.warning(
                "restarted by torchrun (restart %s): resuming from the newest checkpoint in %s", restarts, cfg.out
            )
        cfg = dataclasses.replace(cfg, resume=True)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    ok = False
    try:
        if d.main:
            with RunLock(out):
                _refuse_to_overwrite(cfg)
                result = _train(cfg, d, tensorboard, bad_images, callback, hooks)
        else:
            result = _train(cfg, d, bad_images=bad_images, hooks=hooks)
        ok = True
        return result
    finally:
        if d.world > 1 and ok:
            _close_process_group()


def _close_process_group() -> None:
    """Tear the process group down explicitly once every rank is done. Left to interpreter exit, gloo's
    threads can outlive their context (notably with the per-attempt store of a torchrun restart) and a rank
    aborts with "terminate called without an active exception" after the work has finished."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _refuse_to_overwrite(cfg: TrainConfig) -> None:
    """A fresh run never clobbers an earlier run's results or checkpoints: they cost compute."""
    out = Path(cfg.out)
    ckpts = out / "checkpoints"
    earlier = (out / "metrics.json").exists() or (ckpts.is_dir() and any(ckpts.glob("*.json")))
    if earlier and not cfg.resume:
        raise ConfigError(
            f"{out} already holds a run (metrics.json or checkpoints/). Pass --resume to continue it, choose "
            "another --out, or delete the folder to start over"
        )


@dataclass
class _Setup:
    """Everything both training paths share, resolved once."""

    cfg: TrainConfig
    d: Any
    source: DatasetSource
    backbone: Backbone
    head_init: str
    device: torch.device
    precision: Any
    size: int
    workers: int
    train_idx: np.ndarray
    report_idx: np.ndarray
    fit_pos: np.ndarray
    hold_pos: np.ndarray
    #: A TensorBoardLog on rank 0 with --tensorboard, else None.
    tb: Any = None
    #: The caller's ``train(callback=...)``, else None.
    callback: Any = None
    #: The training-step hooks (``train(hooks=...)`` or ``TRANSFERLAB_HOOKS``), else None.
    hooks: FitHooks | None = None
    #: metrics.json's ``bad_images``: the policy, how many images were left out and which.
    screened: dict[str, Any] = field(default_factory=dict)
    #: metrics.json's ``duplicates`` (exact copies shared by the fitted and the reported images) and the
    #: warnings about them; filled on rank 0.
    duplicates: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    #: With --head-from: which of the probe's heads started this run ("fit": fitted without this run's
    #: holdout rows; "all": refit on every train row, the holdout's included), else None.
    head_from_split: str | None = None

    @property
    def train_split(self) -> Any:
        return self.source.split("train")

    @property
    def report(self) -> Any:
        return self.source.split(self.cfg.report_split)

    @property
    def num_classes(self) -> int:
        return len(self.source.classes)

    def eval_transform(self) -> Any:
        pre = self.backbone.preprocessing
        return make_eval_transform(pre, self.size, self.cfg.crop, self.cfg.interpolation)

    def cache_root(self) -> Path:

        return Path(self.cfg.cache_dir) if self.cfg.cache_dir else user_cache_dir()


@dataclass
class _Outcome:
    """What a training path hands back for the run directory."""

    logits: np.ndarray
    history: list[dict[str, float]]
    best_epoch: int
    params_trained: int
    model_state: dict[str, torch.Tensor]
    strategy: dict[str, str]
    steps: list[dict[str, float]] = field(default_factory=list)
    stopped_early: bool = False
    info: dict[str, Any] = field(default_factory=dict)
    #: Logits on the train holdout from a model fitted without those rows (the probe's head; a fine-tune's kept
    #: epoch, which the holdout chose when there were several), for ensembles fitted off the report split.
    holdout_logits: np.ndarray | None = None


def _setup(cfg: TrainConfig, d: Any, bad_images: str = "error") -> _Setup:

    source = open_dataset(cfg.data)
    train_split = source.split("train")
    report = source.split(cfg.report_split)
    if not train_split.labeled or not report.labeled:
        raise DataError(f"training needs labeled train and {cfg.report_split} splits in {source.location}")
    # Every strategy, the feature-cache probe included, passes here before anything is decoded or cached.
    refuse_too_few_classes(source, "train", "transferlab train")
    workers = default_workers() if cfg.workers < 0 else cfg.workers
    train_idx = subset_indices(len(train_split), cfg.train_limit, cfg.seed)
    report_idx = subset_indices(len(report), cfg.report_limit, cfg.seed)
    root = Path(cfg.cache_dir) if cfg.cache_dir else user_cache_dir()
    if cfg.decoded_cache == "auto":
        # Every later pass (screening, epochs, holdout, report, feature extraction) reads pixels from one
        # memory-mapped array and resizes whole batches; split fingerprints stay those of the source files.
        # The decode pass records the unreadable images, so the screening below reads that list instead
        # of decoding every image a second time.

        for name in dict.fromkeys(("train", cfg.report_split)):
            source.splits[name] = decode_split(source.split(name), root, progress=cfg.progress)
    # Every image the run will read is decoded once, before any work (cached by the samples' fingerprint).
    # With --bad-images skip the broken ones leave the index lists here, before the holdout and the data
    # order are drawn, so every run and every resume sees the same samples in the same order.
    kept, screened = screen_images(
        source,
        {"train": train_idx, cfg.report_split: report_idx},
        policy=bad_images,
        cache_dir=root,
        workers=workers,
        progress=cfg.progress,
        rank=d.rank,
        world=d.world,
    )
    train_idx, report_idx = kept["train"], kept[cfg.report_split]
    backbone = _load_backbone(cfg)
    device = resolve_device(cfg.device)
    if d.world > 1 and device.type == "cuda":
        device = torch.device("cuda", d.rank % torch.cuda.device_count())
    fit_pos, hold_pos = stratified_holdout(train_split.targets[train_idx], cfg.holdout, cfg.seed)
    duplicates, warnings = _duplicates(source, cfg, train_idx, fit_pos, report_idx, root) if d.main else ({}, [])
    return _Setup(
        cfg=cfg,
        d=d,
        source=source,
        backbone=backbone,
        head_init=_head_init(cfg, backbone, source),
        device=device,
        precision=resolve_precision(cfg.precision, cfg.channels_last, device),
        size=cfg.img_size or backbone.preprocessing.input_size,
        workers=workers,
        train_idx=train_idx,
        report_idx=report_idx,
        fit_pos=fit_pos,
        hold_pos=hold_pos,
        screened=screened,
        duplicates=duplicates,
        warnings=warnings,
    )


def _duplicates(
    source: DatasetSource,
    cfg: TrainConfig,
    train_idx: np.ndarray,
    fit_pos: np.ndarray,
    report_idx: np.ndarray,
    cache_root: Path,
) -> tuple[dict[str, Any], list[str]]:
    """Exact copies (same bytes) between the images fitted on and the ones reported on, and across classes.

    A report image that is also a training image is scored as if unseen, so the reported accuracy is optimistic;
    nothing fails (the data is still usable) but the run says so, in the log and in metrics.json. Reading and
    hashing the bytes costs ~0.4 s for the mini Tiny ImageNet's 25,000 images and is cached by the samples'
    fingerprint, so later runs on the same data pay nothing.
    """
    if cfg.report_split == "train":  # reporting on the training images themselves: overlap is the point
        return {}, []
    t0 = time.perf_counter()
    train, report = source.split("train"), source.split(cfg.report_split)
    train_d = cached_digests(train, train_idx, cache_root)
    report_d = cached_digests(report, report_idx, cache_root)
    fit_idx, fit_d = train_idx[fit_pos], train_d[fit_pos]
    pairs = overlap((train, fit_idx, fit_d), (report, report_idx, report_d))
    noisy = find_duplicates(source, {"train": fit_d}, {"train": fit_idx}).cross_class()
    log.debug(
        "exact-duplicate check of %d + %d images: %.2f s", len(train_idx), len(report_idx), time.perf_counter() - t0
    )
    warnings = []
    check = f"`transferlab data check {source.location}` lists every exact duplicate"
    if pairs:
        shown = "; ".join(f"{a} = {b}" for a, b in pairs[:3])
        warnings.append(
            f"{len(pairs)} of the {len(report_idx)} {cfg.report_split} images are exact copies (same bytes) of images "
            f"this run trains on, so the {cfg.report_split} numbers are optimistic (e.g. {shown}). Remove the copies "
            f"from one of the splits; {check}"
        )
    if noisy:
        shown = "; ".join(" = ".join(f"{x.origin} ({source.classes.ids[x.label]})" for x in g[:2]) for g in noisy[:3])
        warnings.append(
            f"{len(noisy)} image(s) this run trains on appear under two or more classes (label noise; a class folder "
            f"copied or linked under another name?), e.g. {shown}. Keep each image in one class; {check}"
        )
    for w in warnings:
        log.warning(w)
    record = {
        "method": "sha256 of the file bytes",
        "report_in_fit": len(pairs),
        "report_in_fit_examples": [{"report": a, "fit": b} for a, b in pairs[:20]],
        "fit_across_classes": len(noisy),
    }
    return record, warnings


def _train(
    cfg: TrainConfig,
    d: Any,
    tensorboard: bool = False,
    bad_images: str = "error",
    callback: Callable[[str, dict[str, float]], None] | None = None,
    hooks: FitHooks | None = None,
) -> dict[str, Any]:
    t_start = time.perf_counter()
    tb = None
    if tensorboard and d.main:
        tb = TensorBoardLog(Path(cfg.out) / "tensorboard")  # a missing package fails here, before any work
    # Every global RNG a step may draw from, Python's too: checkpoints restore all three, so an uninterrupted
    # run must start them from the seed for a resumed one to match it.
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed % (2**32))
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    out = Path(cfg.out)
    if d.main:
        atomic_write_text(out / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    s = _setup(cfg, d, bad_images)
    s.tb = tb
    s.callback = callback
    s.hooks = hooks
    res = _probe_on_features(s) if cfg.use_feature_cache else _fit_loop(s)
    if not d.main:
        return {}

    source, report, pre = s.source, s.report, s.backbone.preprocessing
    y_report = report.targets[s.report_idx]
    save_weights(
        out / "model.safetensors",
        res.model_state,
        preprocessing=pre,
        class_ids=list(source.classes.ids),
        architecture=cfg.model,
    )
    write_history(out / "history.csv", res.history)
    if res.steps:
        write_steps(out / "steps.csv", res.steps)
    sample_ids = [report.sample_ids[i] for i in s.report_idx]
    write_predictions(predictions_path(out, cfg.report_split), res.logits, y_report, sample_ids, source.classes.ids)
    _write_holdout(out, s, res.holdout_logits)

    title = f"{cfg.model} {res.strategy['strategy']} ({res.strategy['head']} head)"
    epochs = [r for r in res.history if r["epoch"] >= 1]
    plot_curves(epochs, out / "curves.png", best_epoch=res.best_epoch, title=title, val_label="holdout")
    overlap = source.imagenet_classes and s.backbone.has_imagenet_head
    metrics: dict[str, Any] = {
        "model": cfg.model,
        "weights": s.backbone.weights,
        **res.strategy,
        "head_init": s.head_init,
        "params_trained": res.params_trained,
        "data": source.location,
        "dataset": source.name,
        "data_fingerprint": data_fingerprint(source, ["train", cfg.report_split]),
        "split": cfg.report_split,
        **summarize(res.logits, y_report, seed=cfg.seed),
        "num_classes": s.num_classes,
        "best_epoch": res.best_epoch,
        "epochs": cfg.epochs,
        "epochs_run": max((int(r["epoch"]) for r in res.history), default=0),
        "stopped_early": res.stopped_early,
        "selection": f"{cfg.early_stop} on a {cfg.holdout:.0%} class-stratified holdout of train "
        f"({len(s.hold_pos)} images); {cfg.report_split} was not used for any choice",
        "n_fit": len(s.fit_pos),
        "n_holdout": len(s.hold_pos),
        "holdout_predictions": _holdout_note(s, res),
        "head_from_split": s.head_from_split,
        "img_size": s.size,
        "preprocessing": pre.to_dict(),
        "precision": s.precision.name,
        "channels_last": s.precision.channels_last,
        "device": str(s.device),
        "world_size": d.world,
        "bad_images": s.screened,
        "duplicates": s.duplicates,
        **res.info,
        "train_seconds": round(sum(r.get("seconds", 0.0) for r in res.history), 2),
        "wall_s": round(time.perf_counter() - t_start, 2),
        "warnings": ([IMAGENET_OVERLAP_WARNING] if overlap else []) + s.warnings,
        "versions": versions(),
    }
    atomic_write_json(out / "metrics.json", metrics)
    if tb is not None:
        if cfg.use_feature_cache:  # the head trained in seconds: its epochs are written now
            for row in res.history:
                tb.record("epoch", row)
        hp = {k: v for k, v in cfg.to_dict().items() if k not in ("out", "progress", "resume", "cache_dir")}
        final = {k: metrics[k] for k in ("top1", "top5", "nll", "best_epoch")}
        tb.finish(curves=out / "curves.png", hparams=hp, metrics=final, step=res.best_epoch)
    return metrics


def _holdout_note(s: _Setup, res: _Outcome) -> str | None:
    """What predictions/holdout.npz holds, for whoever fits on it: an ensemble weighting a member by holdout
    predictions that also chose its epoch favours it a little."""
    cfg = s.cfg
    if res.holdout_logits is None:
        return None
    if cfg.use_feature_cache:
        return "a head fitted without these rows"
    if s.head_from_split == "all":
        return "optimistic: the head this run started from (--head-from) was fitted on these rows too"
    if len(res.history) > 1:
        return "the kept epoch, which this holdout chose among the epochs run (a little optimistic)"
    return "the one epoch run, from a model fitted without these rows"


def _write_holdout(out: Path, s: _Setup, logits: np.ndarray | None) -> None:
    """predictions/holdout.npz: the probe's predictions on the train holdout, from the head fitted without it, so
    an ensemble can be fitted on them without touching the report split."""
    if logits is None or not len(s.hold_pos):
        return
    if s.cfg.report_split == "holdout":
        log.warning("not writing the train holdout's predictions: predictions/holdout.npz is the report split's")
        return
    train = s.train_split
    idx = s.train_idx[s.hold_pos]
    ids = [train.sample_ids[i] for i in idx]
    write_predictions(predictions_path(out, "holdout"), logits, train.targets[idx], ids, s.source.classes.ids)


def _probe_on_features(s: _Setup) -> _Outcome:
    """The frozen-backbone fast path: cached backbone outputs, then seconds of head training."""
    cfg, backbone, n_cls = s.cfg, s.backbone, s.num_classes
    cache = s.cache_root() / "features"
    warm = list(s.source.classes.ids) if s.head_init == "imagenet" else None
    # Built before anything else draws random numbers, so its init matches the image loop's.
    model = TransferModel.from_backbone(backbone.model, cfg.head_spec(), n_cls, warm_start_ids=warm)
    if cfg.head_from is not None:
        s.head_from_split = _head_from_run(model, cfg, list(s.source.classes.ids))
    what = "feature_map" if model.head.needs_feature_map else "pre_logits"
    log.info(
        "strategy linear-probe: backbone %s frozen (BatchNorm eval), new %s head -> %d classes, head init %s; "
        "training on cached %s features (%s), probe %s%s",
        cfg.model,
        cfg.head_spec(),
        n_cls,
        s.head_init,
        what,
        cache,
        cfg.probe,
        ", with mirrored features" if cfg.flip_features else "",
    )
    t0 = time.perf_counter()
    data = _probe_data(s, what, cache)
    t_feat = time.perf_counter() - t0
    t1 = time.perf_counter()
    head = model.head
    if cfg.probe == "lbfgs":
        history, best_epoch, stopped, probe_info, hold_logits = _fit_lbfgs(s, head, data)
    else:
        result = fit_head(head, data.x_fit, data.y_fit, data.x_hold, data.y_hold, ProbeConfig.of(cfg))
        history, best_epoch, stopped = result.history, result.best_epoch, False
        probe_info, hold_logits = {"solver": "sgd"}, head_logits(head, data.x_hold)
    t_fit = time.perf_counter() - t1
    probe_info |= {"flip_features": cfg.flip_features, "fit_rows": len(data.y_fit), "holdout_rows": len(data.y_hold)}
    return _Outcome(
        logits=head_logits(head, data.x_report),
        history=history,
        best_epoch=best_epoch,
        params_trained=sum(p.numel() for p in head.parameters()),
        model_state=model.state_dict(),
        strategy={"strategy": "linear-probe", "bn": "eval", "head": str(cfg.head_spec())},
        stopped_early=stopped,
        info={
            "feature_cache": {**data.hits, "dir": str(cache), "what": what},
            "feature_seconds": round(t_feat, 2),
            "fit_seconds": round(t_fit, 2),
            "probe": probe_info,
        },
        holdout_logits=hold_logits,
    )


@dataclass
class _ProbeData:
    """The rows a probe fits, selects and reports on. With ``--flip-features`` a train image gives two fit rows
    (its features and its mirror's) and a holdout or report image one row, the mean of the two."""

    x_fit: np.ndarray
    y_fit: np.ndarray
    x_hold: np.ndarray
    y_hold: np.ndarray
    #: Every train row (fit and holdout): what ``--probe lbfgs`` refits on.
    x_all: np.ndarray
    y_all: np.ndarray
    x_report: np.ndarray
    #: metrics.json's feature_cache hits (``train_hit``, ``report_hit``, and the mirrored ones).
    hits: dict[str, bool]


def _probe_data(s: _Setup, what: str, cache: Path) -> _ProbeData:
    """Cached features of the train and report images (and of their mirrors with ``--flip-features``)."""
    cfg = s.cfg
    kw = dict(
        precision=s.precision,
        device=s.device,
        cache_dir=cache,
        batch_size=cfg.feature_batch_size,
        workers=s.workers,
        progress=cfg.progress,
        what=what,
        backend=cfg.backend,
    )
    tf = s.eval_transform()
    x_train, _, hit_train = cached_features(s.backbone, s.train_split, tf, indices=s.train_idx, **kw)
    x_report, _, hit_report = cached_features(s.backbone, s.report, tf, indices=s.report_idx, **kw)
    y = s.train_split.targets[s.train_idx]
    fit, hold = s.fit_pos, s.hold_pos
    hits = {"train_hit": hit_train, "report_hit": hit_report}
    if not cfg.flip_features:
        return _ProbeData(x_train[fit], y[fit], x_train[hold], y[hold], x_train, y, x_report, hits)
    m_train, _, hits["train_flip_hit"] = cached_features(
        s.backbone, s.train_split, tf, indices=s.train_idx, flip=True, **kw
    )
    m_report, _, hits["report_flip_hit"] = cached_features(
        s.backbone, s.report, tf, indices=s.report_idx, flip=True, **kw
    )
    return _ProbeData(
        x_fit=np.concatenate([x_train[fit], m_train[fit]]),
        y_fit=np.concatenate([y[fit], y[fit]]),
        x_hold=(x_train[hold] + m_train[hold]) * np.float32(0.5),
        y_hold=y[hold],
        x_all=np.concatenate([x_train, m_train]),
        y_all=np.concatenate([y, y]),
        x_report=(x_report + m_report) * np.float32(0.5),
        hits=hits,
    )


def _prior_of(head: torch.nn.Module, head_init: str) -> tuple[np.ndarray, np.ndarray] | None:
    """The head a tuned probe's penalty pulls towards: the ImageNet rows a warm-started head was built with
    (copied out of ``head``), else None (zero)."""
    if head_init != "imagenet":
        return None
    fc = head.fc
    return fc.weight.detach().numpy().copy(), fc.bias.detach().numpy().copy()


#: A tuned probe's head at the chosen penalty fitted on the fit split only (without the holdout rows):
#: what ``--head-from`` starts from when the new run holds out the same rows, so its holdout stays unseen.
FIT_HEAD_FILE = "head_fit.safetensors"


def _fit_lbfgs(
    s: _Setup, head: torch.nn.Module, data: _ProbeData
) -> tuple[list[dict[str, float]], int, bool, dict[str, Any], np.ndarray]:
    """``--probe lbfgs``: the tuned logistic regression, its final head put into ``head``.

    The prior is the head as built: the ImageNet classifier rows when the head was warm-started (the numbers
    ``TransferModel.from_backbone`` copied in), else zero. Returns the history (row 0 the prior, then one row
    per penalty, strongest first), the chosen row, whether the path stopped early, metrics.json's ``probe``
    entry and the chosen fit-split head's holdout logits (out-of-sample, unlike the refit head's).
    """
    fc = head.fc
    prior = _prior_of(head, s.head_init)
    res = tune_logistic(
        data.x_fit,
        data.y_fit,
        data.x_hold,
        data.y_hold,
        data.x_all,
        data.y_all,
        s.num_classes,
        grid=s.cfg.l2_grid,
        prior=prior,
    )
    with torch.no_grad():
        fc.weight.copy_(torch.from_numpy(res.weight))
        fc.bias.copy_(torch.from_numpy(res.bias))
    start = prior or (np.zeros_like(res.weight), np.zeros_like(res.bias))
    (ta, tl), (va, vl) = scores(start, data.x_fit, data.y_fit), scores(start, data.x_hold, data.y_hold)
    history = [_history_row(0, tl, ta, vl, va, 0.0, 0)]
    for i, r in enumerate(res.table, 1):
        n = len(data.y_fit) * r["iterations"]
        history.append(
            _history_row(i, r["fit_nll"], r["fit_top1"], r["holdout_nll"], r["holdout_top1"], r["seconds"], n)
        )
    chosen = 1 + [r["l2"] for r in res.table].index(res.l2)
    info = {
        "solver": "lbfgs",
        "prior": "imagenet" if prior is not None else "zero",
        "l2": res.l2,
        "l2_best_top1": res.l2_best_top1,
        "selection": "lowest holdout NLL over the penalty path, then refit on all of train with that penalty",
        "grid": res.table,
        "refit": True,
        "refit_rows": len(data.y_all),
        "refit_iterations": res.refit["iterations"],
        "refit_seconds": round(res.refit["seconds"], 2),
        "n_fit": len(s.fit_pos),
        "n_holdout": len(s.hold_pos),
    }
    if s.d.main and len(s.hold_pos):
        head_fit = {"weight": torch.from_numpy(res.fit_weight).float(), "bias": torch.from_numpy(res.fit_bias).float()}
        save_weights(Path(s.cfg.out) / FIT_HEAD_FILE, head_fit)
        info["fit_head"] = FIT_HEAD_FILE
    return history, chosen, res.stopped_early, info, logits_of((res.fit_weight, res.fit_bias), data.x_hold)


def _history_row(epoch: int, tl: float, ta: float, vl: float, va: float, secs: float, rows: int) -> dict[str, float]:
    """A history.csv row for one penalty of the L-BFGS path (no learning rate; rows/s over its iterations)."""
    return {
        "epoch": epoch,
        "train_loss": tl,
        "train_acc": ta,
        "val_loss": vl,
        "val_acc": va,
        "lr": float("nan"),
        "seconds": secs,
        "images_per_s": rows / secs if secs > 0 else 0.0,
    }


def _fit_loop(s: _Setup) -> _Outcome:
    """Every strategy through the training loop."""
    cfg, n_cls, train_split = s.cfg, s.num_classes, s.train_split
    pre = s.backbone.preprocessing
    warm = list(s.source.classes.ids) if s.head_init == "imagenet" else None
    model = TransferModel.from_backbone(s.backbone.model, cfg.head_spec(), n_cls, warm_start_ids=warm)
    if cfg.head_from is not None:
        s.head_from_split = _head_from_run(model, cfg, list(s.source.classes.ids))
    fit_idx = s.train_idx[s.fit_pos]
    mean, std = pre.mean, pre.std
    if cfg.standardize == "dataset":
        mean, std = channel_stats(train_split, fit_idx, cache_dir=s.cache_root() / "stats")
        log.info("standardizing with the training set's channel mean %s and std %s", mean, std)
    eval_tf = s.eval_transform()
    up = "bilinear" if cfg.interpolation == "auto" else cfg.interpolation
    # Without augmentation the model trains on exactly the images it is evaluated on (and the feature
    # cache computes): the eval transform, which ignores the per-sample generator.
    train_tf = TrainTransform(s.size, interpolation=up, aug=cfg.aug) if cfg.aug != "none" else EvalAsTrain(eval_tf)
    y_fit = train_split.targets[fit_idx]
    counts = np.bincount(y_fit, minlength=n_cls).astype(np.float64)
    class_weights = None
    if cfg.class_weights == "balanced":
        cw = np.where(counts > 0, len(y_fit) / (n_cls * np.maximum(counts, 1)), 0.0)
        class_weights = torch.tensor(cw, dtype=torch.float32, device=s.device)
    data = FitData(
        train=TrainImages(train_split, fit_idx, train_tf, cfg.seed),
        holdout=EvalImages(train_split, s.train_idx[s.hold_pos], eval_tf),
        num_classes=n_cls,
        mean=mean,
        std=std,
        class_weights=class_weights,
        sample_weights=1.0 / np.maximum(counts[y_fit], 1) if cfg.sampler == "balanced" else None,
    )
    run = dict(precision=s.precision, device=s.device, workers=s.workers, d=s.d)
    with GracefulStop() as stop:  # SIGTERM/SIGINT: finish the step, checkpoint, stop (exit 143/130)
        callback = _callbacks(s.tb, s.callback)
        res = fit(model, data, cfg, run_dir=Path(cfg.out), callback=callback, stop=stop, hooks=s.hooks, **run)
    report = EvalImages(s.report, s.report_idx, eval_tf)
    logits = predict(model, report, mean=mean, std=std, batch_size=cfg.batch_size, progress=cfg.progress, **run)
    # The kept epoch's holdout predictions, so a holdout-fitted ensemble can take this member: a pass over the
    # holdout (a tenth of train by default) is cheap beside the epochs that came before it.
    hold_logits = None
    if len(s.hold_pos):
        hold_logits = predict(
            model, data.holdout, mean=mean, std=std, batch_size=cfg.batch_size, progress=cfg.progress, **run
        )
    spec = cfg.strategy_spec()
    return _Outcome(
        logits=logits,
        holdout_logits=hold_logits,
        history=res.history,
        best_epoch=res.best_epoch,
        params_trained=trainable_counts(model)["total"],
        model_state=model.state_dict(),
        strategy={"strategy": spec.name, "bn": spec.policy, "head": str(cfg.head_spec())},
        steps=res.steps,
        stopped_early=res.stopped_early,
    )


def _head_from_run(model: TransferModel, cfg: TrainConfig, class_ids: list[str]) -> str:
    """``--head-from``: copy an earlier probe's linear head into ``model`` (LP-FT starts fine-tuning from the tuned
    probe's head, so the first steps do not distort the backbone to fit a random head). Where the probe kept its
    fit-split head and this run holds out the same rows (same --holdout and --seed), that head starts it: the
    refit head was fitted on the holdout too, and this run's holdout scores would flatter it. Returns which head:
    ``fit`` or ``all``."""
    src = load_run(Path(cfg.head_from))  # type: ignore[arg-type]
    where = f"--head-from {cfg.head_from}"
    if src.config.model != cfg.model:
        raise ConfigError(f"{where} holds a {src.config.model} head, not one for --model {cfg.model}")
    if list(src.class_ids) != class_ids:
        raise ConfigError(f"{where} was trained on other classes than this run's data; its head cannot start this one")
    if src.config.head_spec().kind != "linear" or cfg.head_spec().kind != "linear":
        raise ConfigError(f"{where}: only a linear head can be carried over (both runs need --head linear)")
    fit_file = Path(cfg.head_from) / FIT_HEAD_FILE  # type: ignore[arg-type]
    same_rows = cfg.holdout > 0 and (src.config.holdout, src.config.seed) == (cfg.holdout, cfg.seed)
    if not (fit_file.is_file() and same_rows):
        model.head.load_state_dict(src.model.head.state_dict())
        log.info("head started from %s (its val top-1 is in its metrics.json)", cfg.head_from)
        return "all"
    head, _ = read_weight_file(fit_file)
    try:
        model.head.fc.load_state_dict(head)
    except RuntimeError as e:  # missing keys or another shape
        raise ConfigError(f"{where}: {fit_file} does not fit this run's head ({e}); re-run the probe") from e
    log.info("head started from %s's fit-split head (fitted without this run's holdout rows)", cfg.head_from)
    return "fit"


def _callbacks(tb: Any, user: Callable[[str, dict[str, float]], None] | None) -> Any:
    """One ``callback(kind, row)`` for fit(): TensorBoard's and the caller's, or None."""
    hooks = [h for h in (None if tb is None else tb.record, user) if h is not None]
    if not hooks:
        return None

    def both(kind: str, row: dict[str, float]) -> None:
        for h in hooks:
            h(kind, row)

    return both


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


@dataclass
class ProbeFeatures:
    """What a finished feature-cache probe was fitted and scored on, read back from the feature cache."""

    x_train: np.ndarray  # (N, D) every train image the run read (fit and holdout)
    x_train_mirror: np.ndarray | None  # (N, D) their mirrors' features with --flip-features, else None
    y_train: np.ndarray
    x_report: np.ndarray  # (M, D) as the probe scored them (the mean with the mirror's with --flip-features)
    y_report: np.ndarray
    #: The head the penalty pulls towards (the ImageNet rows), or None for zero.
    prior: tuple[np.ndarray, np.ndarray] | None
    num_classes: int
    #: Rows of ``x_train`` the head was fitted on and held out from (the run's class-stratified holdout).
    fit_pos: np.ndarray
    hold_pos: np.ndarray
    train_ids: list[str]
    report_ids: list[str]
    class_ids: list[str]
    report_split: str


def probe_features(run_dir: str | Path) -> ProbeFeatures:
    """The features a linear-probe run used (cache hits: nothing is recomputed when the cache still holds
    them), for analyses that refit its head, such as the label-budget curve of ``transferlab auto``."""
    cfg = load_run_config(run_dir)
    if not cfg.use_feature_cache:
        raise ConfigError(f"{run_dir}: not a linear probe on cached features; its features were never cached")
    s = _setup(cfg, Dist())
    warm = list(s.source.classes.ids) if s.head_init == "imagenet" else None
    model = TransferModel.from_backbone(s.backbone.model, cfg.head_spec(), s.num_classes, warm_start_ids=warm)
    data = _probe_data(s, "pre_logits", s.cache_root() / "features")
    n = len(s.train_idx)
    prior = _prior_of(model.head, s.head_init)
    return ProbeFeatures(
        x_train=data.x_all[:n],
        x_train_mirror=data.x_all[n:] if cfg.flip_features else None,
        y_train=data.y_all[:n],
        x_report=data.x_report,
        y_report=s.report.targets[s.report_idx],
        prior=prior,
        num_classes=s.num_classes,
        fit_pos=s.fit_pos,
        hold_pos=s.hold_pos,
        train_ids=[s.train_split.sample_ids[i] for i in s.train_idx],
        report_ids=[s.report.sample_ids[i] for i in s.report_idx],
        class_ids=list(s.source.classes.ids),
        report_split=cfg.report_split,
    )
