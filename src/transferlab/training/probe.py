"""Train a linear head on cached features (the ``linear-probe`` strategy's fast path).

The head is tiny (D x N), so an epoch over 20,000 cached feature vectors takes well under a second;
nearly all the cost is the one-time feature extraction.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from transferlab.errors import ConfigError
from transferlab.options import check, inherit
from transferlab.training.config import TrainConfig
from transferlab.training.optim import (
    EarlyStopping,
    ScheduleSpec,
    build_optimizer,
    clip_gradients,
    lr_factor,
    set_lr,
)

log = logging.getLogger(__name__)


def _train_option(name: str) -> Any:
    """The field of TrainConfig called ``name``: same default, help and range (declared once)."""
    return inherit(TrainConfig, name)


@dataclass(frozen=True)
class ProbeConfig:
    """Optimisation settings of a linear probe: the subset of :class:`TrainConfig` that fitting a head on
    cached features reads, with the same defaults and ranges (:func:`probe_config` makes one from a run's)."""

    epochs: int = _train_option("epochs")
    lr: float = _train_option("lr")
    batch_size: int = _train_option("batch_size")
    optimizer: str = _train_option("optimizer")
    weight_decay: float = _train_option("weight_decay")
    label_smoothing: float = _train_option("label_smoothing")
    seed: int = _train_option("seed")
    #: Learning-rate schedule, in optimiser steps, exactly as the image loop applies it.
    schedule: str = _train_option("schedule")
    warmup_steps: int = _train_option("warmup_steps")
    step_size: int | None = _train_option("step_size")
    gamma: float = _train_option("gamma")
    clip_grad: float | None = _train_option("clip_grad")
    #: Which held-out metric picks the epoch kept, and how many epochs without improvement stop the fit.
    early_stop: str = _train_option("early_stop")
    patience: int | None = _train_option("patience")

    def __post_init__(self) -> None:
        check(self)

    @classmethod
    def of(cls, cfg: TrainConfig) -> ProbeConfig:
        """The probe settings of a training run."""
        return cls(**{f.name: getattr(cfg, f.name) for f in fields(cls)})


@dataclass
class ProbeResult:
    """The epoch kept (lowest held-out loss) and the per-epoch history."""

    best_epoch: int
    history: list[dict[str, float]] = field(default_factory=list)


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The order in which an epoch visits ``n`` samples: a permutation from (seed, epoch) alone.

    Shared by the feature-cache path and the image loop, so both see the data in the same order.
    """
    return np.random.default_rng([seed, epoch, 7]).permutation(n)


def stratified_holdout(targets: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split indices into (fit, holdout) with ``fraction`` of every class held out (at least one when
    the class has two or more samples). Seeded, so the same run always holds out the same images."""
    if not 0 < fraction < 1:
        raise ConfigError(f"--holdout must be in (0, 1), got {fraction}")
    rng = np.random.default_rng(seed)
    fit, hold = [], []
    for c in np.unique(targets):
        idx = np.flatnonzero(targets == c)
        idx = idx[rng.permutation(len(idx))]
        k = round(len(idx) * fraction)
        k = max(1, k) if len(idx) >= 2 else 0
        hold.append(idx[:k])
        fit.append(idx[k:])
    return np.sort(np.concatenate(fit)), np.sort(np.concatenate(hold))


@torch.no_grad()
def _score(head: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 4096) -> tuple[float, float]:
    if not len(y):
        return float("nan"), float("nan")
    logits = torch.cat([head(x[i : i + batch]) for i in range(0, len(x), batch)]).float()
    return float(F.cross_entropy(logits, y)), float((logits.argmax(1) == y).float().mean())


@torch.no_grad()
def head_logits(head: nn.Module, x: np.ndarray, batch: int = 4096) -> np.ndarray:
    """Apply a trained head to cached features, in eval mode."""
    was = head.training
    head.eval()
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    out = torch.cat([head(xt[i : i + batch]) for i in range(0, len(xt), batch)]).numpy()
    head.train(was)
    return out


def fit_head(
    head: nn.Module,
    x_fit: np.ndarray,
    y_fit: np.ndarray,
    x_hold: np.ndarray,
    y_hold: np.ndarray,
    cfg: ProbeConfig,
) -> ProbeResult:
    """Train ``head`` on cached backbone outputs with cross-entropy; keep the best epoch on the held-out
    metric ``cfg.early_stop`` (its weights are loaded back into ``head``).

    History row 0 scores the initial head, so a warm start's starting point is visible. The data order
    is :func:`epoch_order` and the learning rate follows the same schedule, clipping and early stopping as
    the image loop, so a config means the same thing on both paths.
    """
    xf = torch.from_numpy(np.ascontiguousarray(x_fit, dtype=np.float32))
    yf = torch.from_numpy(np.asarray(y_fit, dtype=np.int64))
    xh = torch.from_numpy(np.ascontiguousarray(x_hold, dtype=np.float32))
    yh = torch.from_numpy(np.asarray(y_hold, dtype=np.int64))
    params = [p for p in head.parameters() if p.requires_grad]
    opt = build_optimizer([{"params": params}], cfg.optimizer, cfg.lr, cfg.weight_decay)
    schedule = ScheduleSpec(cfg.schedule, warmup_steps=cfg.warmup_steps, step_size=cfg.step_size, gamma=cfg.gamma)
    stopper = EarlyStopping(cfg.early_stop, patience=cfg.patience)
    total_steps = math.ceil(len(y_fit) / cfg.batch_size) * cfg.epochs
    opt_step = 0

    head.eval()
    hl, ha = _score(head, xh, yh)
    tl, ta = _score(head, xf, yf)
    history = [
        {
            "epoch": 0,
            "train_loss": tl,
            "train_acc": ta,
            "val_loss": hl,
            "val_acc": ha,
            "lr": cfg.lr,
            "seconds": 0.0,
            "images_per_s": 0.0,
        }
    ]
    if len(yh):
        stopper.update(hl if "loss" in cfg.early_stop else ha, 0)
    best = (0, copy.deepcopy(head.state_dict()))
    n = len(yf)
    for epoch in range(1, cfg.epochs + 1):
        t0 = time.perf_counter()
        head.train()
        perm = torch.from_numpy(epoch_order(n, cfg.seed, epoch - 1))
        tot_loss, tot_hit = 0.0, 0
        for s in range(0, n, cfg.batch_size):
            idx = perm[s : s + cfg.batch_size]
            logits = head(xf[idx])
            loss = F.cross_entropy(logits, yf[idx], label_smoothing=cfg.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            clip_gradients(params, cfg.clip_grad)
            set_lr(opt, lr_factor(opt_step, total_steps, schedule))
            lr_now = opt.param_groups[0]["lr"]
            opt.step()
            opt_step += 1
            tot_loss += float(loss.detach()) * len(idx)
            tot_hit += int((logits.argmax(1) == yf[idx]).sum())
        secs = time.perf_counter() - t0
        head.eval()
        hl, ha = _score(head, xh, yh)
        history.append(
            {
                "epoch": epoch,
                "train_loss": tot_loss / n,
                "train_acc": tot_hit / n,
                "val_loss": hl,
                "val_acc": ha,
                "lr": lr_now,
                "seconds": secs,
                "images_per_s": n / max(secs, 1e-9),
            }
        )
        log.info(
            "epoch %d/%d: train loss %.4f acc %.4f | holdout loss %.4f acc %.4f",
            epoch,
            cfg.epochs,
            tot_loss / n,
            tot_hit / n,
            hl,
            ha,
        )
        if len(yh):
            if stopper.update(hl if "loss" in cfg.early_stop else ha, epoch):
                best = (epoch, copy.deepcopy(head.state_dict()))
            if stopper.should_stop:
                log.info("early stop: no %s improvement for %d epochs", cfg.early_stop, stopper.patience)
                break
    if not len(yh):
        best = (len(history) - 1, copy.deepcopy(head.state_dict()))
    head.load_state_dict(best[1])
    return ProbeResult(best_epoch=best[0], history=history)


def fit_linear_probe(
    x_fit: np.ndarray,
    y_fit: np.ndarray,
    x_hold: np.ndarray,
    y_hold: np.ndarray,
    num_classes: int,
    cfg: ProbeConfig,
    *,
    init: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[nn.Linear, ProbeResult]:
    """Fit a linear head ``x W^T + b`` on features (see :func:`fit_head`).

    ``init`` (W, b) warm-starts the head, e.g. from the matching rows of an ImageNet classifier;
    otherwise it is initialised like ``nn.Linear`` from ``cfg.seed``.
    """
    d = int(np.shape(x_fit)[1])
    torch.manual_seed(cfg.seed)
    head = nn.Linear(d, num_classes)
    if init is not None:
        w = torch.as_tensor(init[0], dtype=torch.float32)
        b = torch.as_tensor(init[1], dtype=torch.float32)
        if tuple(w.shape) != (num_classes, d) or tuple(b.shape) != (num_classes,):
            raise ConfigError(f"head init has shape {tuple(w.shape)}, expected {(num_classes, d)}")
        with torch.no_grad():
            head.weight.copy_(w)
            head.bias.copy_(b)
    return head, fit_head(head, x_fit, y_fit, x_hold, y_hold, cfg)
