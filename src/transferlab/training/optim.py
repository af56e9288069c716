"""Optimisers, learning-rate schedules, early stopping and gradient clipping for fine-tuning.

Everything here is small and pure on purpose: the schedule is a function of the step number (not a stateful
``LRScheduler``), so a resumed run only needs the step counter to land on exactly the same learning rate, and
early stopping round-trips through JSON so it can live in the run directory next to the checkpoint.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

import torch

from transferlab.errors import ConfigError

OPTIMIZERS = ("rmsprop", "adamw", "sgd")
SCHEDULES = ("constant", "cosine", "step")

# Keras' RMSprop defaults. The reference recipe we reproduce was written in Keras, and torch's defaults
# (alpha=0.99, eps=1e-8) average the squared gradient over ~10x more steps, which changes early training.
KERAS_RMSPROP_RHO = 0.9
KERAS_RMSPROP_EPS = 1e-7


def build_optimizer(
    groups: list[dict[str, Any]],
    name: str,
    lr: float,
    weight_decay: float = 0.0,
    momentum: float = 0.9,
) -> torch.optim.Optimizer:
    """Build the optimiser ``name`` over parameter groups, each scaled by its optional ``lr_scale``.

    Each group is a dict with ``"params"`` and optionally ``"lr_scale"`` (default 1.0) and ``"weight_decay"``
    (default ``weight_decay``). The group's ``"lr"`` is set to ``lr * lr_scale`` and ``"lr_scale"`` stays in
    the group, so a schedule (see :func:`set_lr`) scales every group by the same factor while keeping e.g.
    a backbone at a tenth of the head's rate. The input dicts are not modified.

    * ``"rmsprop"``: Keras' defaults (rho 0.9, eps 1e-7, no momentum) because the reference recipe was
      written in Keras; torch's own defaults differ (alpha 0.99, eps 1e-8).
    * ``"adamw"``: torch's defaults (betas 0.9/0.999, eps 1e-8) with decoupled ``weight_decay``.
    * ``"sgd"``: Nesterov momentum ``momentum`` (plain SGD when ``momentum`` is 0, since Nesterov needs it).

    Raises:
        ConfigError: unknown ``name`` (``--optimizer``), ``lr`` <= 0, negative weight decay, ``momentum``
            outside [0, 1), an empty group list or a negative ``lr_scale``.
    """
    _check_hyperparameters(name, lr, weight_decay, momentum)
    if not groups:
        raise ConfigError("no parameter groups to optimise: are all parameters frozen (requires_grad=False)?")
    param_groups = [_scaled_group(i, group, lr, weight_decay) for i, group in enumerate(groups)]
    if name == "rmsprop":
        return torch.optim.RMSprop(
            param_groups, lr=lr, alpha=KERAS_RMSPROP_RHO, eps=KERAS_RMSPROP_EPS, weight_decay=weight_decay
        )
    if name == "adamw":
        return torch.optim.AdamW(param_groups, lr=lr, weight_decay=weight_decay)
    return torch.optim.SGD(param_groups, lr=lr, momentum=momentum, nesterov=momentum > 0, weight_decay=weight_decay)


def _check_hyperparameters(name: str, lr: float, weight_decay: float, momentum: float) -> None:
    if name not in OPTIMIZERS:
        raise ConfigError(f"--optimizer must be one of {', '.join(OPTIMIZERS)}, not {name!r}")
    if not lr > 0:
        raise ConfigError(f"--lr must be > 0, got {lr}")
    if not weight_decay >= 0:
        raise ConfigError(f"--weight-decay must be >= 0, got {weight_decay}")
    if not 0 <= momentum < 1:
        raise ConfigError(f"--momentum must be in [0, 1), got {momentum}")


def _scaled_group(i: int, group: dict[str, Any], lr: float, weight_decay: float) -> dict[str, Any]:
    """A copy of parameter group ``i`` with its ``lr`` set to ``lr * lr_scale`` (``lr_scale`` kept)."""
    if "params" not in group:
        raise ValueError(f"parameter group {i} has no 'params' key")
    scale = float(group.get("lr_scale", 1.0))
    if not scale >= 0:
        raise ConfigError(f"parameter group {i}: lr_scale must be >= 0, got {scale}")
    group_wd = group.get("weight_decay", weight_decay)
    if not group_wd >= 0:
        raise ConfigError(f"parameter group {i}: weight_decay must be >= 0, got {group_wd}")
    return {**group, "params": list(group["params"]), "lr": lr * scale, "lr_scale": scale}


def no_decay_groups(
    named_params: Iterable[tuple[str, torch.nn.Parameter]],
    weight_decay: float,
    lr_scale: float = 1.0,
) -> list[dict[str, Any]]:
    """Split trainable parameters into a decayed group (matrices, conv kernels) and an undecayed one (<2-D).

    Decaying biases and normalisation scales pulls them towards 0, which fights the normalisation instead of
    regularising anything, so standard practice (BERT, nanoGPT, timm) exempts every parameter with fewer than
    two dimensions. Frozen parameters are skipped and empty groups are dropped (an optimiser group with no
    parameters only adds noise to logs). ``lr_scale`` is copied into both groups for :func:`build_optimizer`.
    """
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for _, p in named_params:
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay, "lr_scale": lr_scale},
        {"params": no_decay, "weight_decay": 0.0, "lr_scale": lr_scale},
    ]
    return [g for g in groups if g["params"]]


@dataclass(frozen=True)
class ScheduleSpec:
    """A learning-rate schedule in optimiser steps: optional linear warmup, then constant, cosine or step decay.

    ``step_size`` (steps between decays) is required for ``"step"`` and ignored otherwise; ``gamma`` is the
    step-decay factor; ``min_lr_ratio`` is where cosine ends, as a fraction of the base rate.
    """

    name: str
    warmup_steps: int = 0
    step_size: int | None = None
    gamma: float = 0.1
    min_lr_ratio: float = 0.0

    def __post_init__(self) -> None:
        if self.name not in SCHEDULES:
            raise ConfigError(f"--schedule must be one of {', '.join(SCHEDULES)}, not {self.name!r}")
        if self.warmup_steps < 0:
            raise ConfigError(f"--warmup must be >= 0 steps, got {self.warmup_steps}")
        if self.name == "step" and self.step_size is None:
            raise ConfigError("--schedule step needs --step-size (steps between decays, >= 1)")
        if self.step_size is not None and self.step_size < 1:
            raise ConfigError(f"--step-size must be >= 1 step, got {self.step_size}")
        if not 0 < self.gamma <= 1:
            raise ConfigError(f"--gamma must be in (0, 1], got {self.gamma}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"--min-lr-ratio must be in [0, 1], got {self.min_lr_ratio}")


def lr_factor(step: int, total_steps: int, spec: ScheduleSpec) -> float:
    """The multiplier of the base learning rate for 0-based optimiser ``step`` out of ``total_steps``.

    Warmup is linear and starts at ``1/warmup`` rather than 0 so that the first step is not wasted; it reaches
    1 at ``step == warmup - 1``. After warmup: ``"constant"`` stays 1, ``"cosine"`` follows half a cosine from 1
    (at ``warmup``) to ``min_lr_ratio`` (at ``total_steps``, so the last step is just above it) and stays there
    beyond, ``"step"`` multiplies by ``gamma`` every ``step_size`` steps counted from the end of warmup.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if step < spec.warmup_steps:
        return (step + 1) / spec.warmup_steps
    since = step - spec.warmup_steps
    if spec.name == "constant":
        return 1.0
    if spec.name == "step":
        assert spec.step_size is not None  # guaranteed by ScheduleSpec
        return spec.gamma ** (since // spec.step_size)
    span = total_steps - spec.warmup_steps
    progress = min(since / span, 1.0) if span > 0 else 1.0
    return spec.min_lr_ratio + (1.0 - spec.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, factor: float) -> None:
    """Set every group's ``lr`` to its base rate times ``factor``.

    The base rate is ``group["initial_lr"]``, recorded from the group's ``lr`` on the first call (the key
    torch's own schedulers use), so per-group ``lr_scale`` ratios survive and repeated calls never compound.
    Call it before building anything else that reads ``lr``, and persist the optimiser state dict so a
    resumed run keeps the same base rates.
    """
    for group in optimizer.param_groups:
        group.setdefault("initial_lr", group["lr"])
        group["lr"] = group["initial_lr"] * factor


class EarlyStopping:
    """Track the best value of a validation metric and say when it stopped improving for ``patience`` epochs.

    ``mode="auto"`` minimises metrics whose name contains ``"loss"`` and maximises the rest (accuracy, F1).
    An update improves only if it beats the best by more than ``min_delta``; a non-finite value (NaN, inf) is
    never an improvement, because it means training diverged, and it counts towards patience.
    ``patience=None`` never stops but still tracks the best epoch (for picking the checkpoint).
    """

    def __init__(
        self,
        metric: str = "val_loss",
        mode: Literal["min", "max", "auto"] = "auto",
        patience: int | None = None,
        min_delta: float = 0.0,
    ) -> None:
        if mode == "auto":
            mode = "min" if "loss" in metric else "max"
        if mode not in ("min", "max"):
            raise ConfigError(f"early-stopping mode must be min, max or auto, not {mode!r}")
        if patience is not None and patience < 1:
            raise ConfigError(f"--patience must be >= 1 epoch (or unset to never stop early), got {patience}")
        if not min_delta >= 0:
            raise ConfigError(f"--min-delta must be >= 0, got {min_delta}")
        self.metric = metric
        self.mode: Literal["min", "max"] = mode
        self.patience = patience
        self.min_delta = float(min_delta)
        self.best: float | None = None
        self.best_epoch: int | None = None
        self.wait = 0  # updates since the last improvement

    def _improves(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.best is None:
            return True
        if self.mode == "min":
            return value < self.best - self.min_delta
        return value > self.best + self.min_delta

    def update(self, value: float, epoch: int) -> bool:
        """Record ``value`` of the metric at ``epoch``; True if it is a new best (save the checkpoint)."""
        value = float(value)
        if self._improves(value):
            self.best, self.best_epoch, self.wait = value, int(epoch), 0
            return True
        self.wait += 1
        return False

    @property
    def should_stop(self) -> bool:
        """True once ``patience`` consecutive updates have not improved on the best."""
        return self.patience is not None and self.wait >= self.patience

    def state_dict(self) -> dict[str, Any]:
        """A JSON-serialisable snapshot (``best`` is always finite, so strict JSON works)."""
        return {
            "metric": self.metric,
            "mode": self.mode,
            "patience": self.patience,
            "min_delta": self.min_delta,
            "best": self.best,
            "best_epoch": self.best_epoch,
            "wait": self.wait,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the progress from :meth:`state_dict` so a resumed run stops at the same epoch.

        Only the progress (best, best epoch, wait) is restored: ``patience`` and ``min_delta`` keep this
        instance's values so a resume may extend them. A different metric or mode is refused, because the
        saved best would then be compared against the wrong quantity.
        """
        if state["metric"] != self.metric or state["mode"] != self.mode:
            raise ConfigError(
                f"the checkpoint's early stopping tracked {state['metric']} ({state['mode']}), but this run "
                f"tracks {self.metric} ({self.mode}); resume with the same metric or start a new run"
            )
        self.best = None if state["best"] is None else float(state["best"])
        self.best_epoch = None if state["best_epoch"] is None else int(state["best_epoch"])
        self.wait = int(state["wait"])


def clip_gradients(params: Iterable[torch.Tensor], max_norm: float | None) -> float | None:
    """Clip the gradients' total L2 norm to ``max_norm`` in place and return the norm before clipping.

    Returns None when clipping is disabled (``max_norm`` None), so callers can log the norm only when it was
    computed. The norm may be inf or NaN: the caller should then skip the optimiser step (AMP's scaler does).
    """
    if max_norm is None:
        return None
    if not max_norm > 0:
        raise ConfigError(f"the gradient clipping max norm must be > 0 (or unset to disable), got {max_norm}")
    return float(torch.nn.utils.clip_grad_norm_(list(params), max_norm))
