"""Adaptation strategies: which parameters of a :class:`TransferModel` train, and what BatchNorm does.

Five strategies, each a small explicit step (fastai's ``fine_tune`` is freeze -> fit -> unfreeze -> fit):

* ``linear-probe``: only the head trains; the backbone, BatchNorm included, is a fixed feature extractor.
* ``bn-only``: the head and the affine parameters (weight, bias) of every BatchNorm layer train.
* ``full``: everything trains, optionally with layer-wise learning-rate decay towards the stem.
* ``freeze-unfreeze``: head only for the first epochs, then :func:`unfreeze` makes the backbone trainable
  at a smaller learning rate.
* ``scratch``: everything trains from random weights (the baseline that shows what pretraining buys;
  creating the backbone without weights is the caller's job).

"Frozen BatchNorm" means three different things in timm, Keras and fastai, so the BN behaviour is a
named policy of its own (``--bn``), logged with every run:

* ``train``: affine parameters train and running statistics follow the new data (the seed's setting).
* ``frozen-stats``: affine parameters train; running statistics stay the pretrained ones.
* ``eval``: nothing in BatchNorm changes (Keras's inference mode).

A policy only has an effect together with :func:`set_train_mode`, which the training loop calls instead
of ``model.train()``.
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from transferlab.errors import ConfigError
from transferlab.models.heads import TransferModel
from transferlab.options import Option, check, flag_of

log = logging.getLogger(__name__)

STRATEGIES: tuple[str, ...] = ("linear-probe", "bn-only", "full", "freeze-unfreeze", "scratch")
BN_POLICIES: tuple[str, ...] = ("train", "frozen-stats", "eval")
#: The BN policy each strategy gets when ``--bn`` is not given.
DEFAULT_BN: dict[str, str] = {
    "linear-probe": "eval",
    "bn-only": "train",
    "full": "train",
    "freeze-unfreeze": "train",
    "scratch": "train",
}
DEFAULT_UNFREEZE_EPOCH = 1
DEFAULT_UNFREEZE_LR_SCALE = 0.1


def _suggest(word: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=3, cutoff=0.5)
    return f"; did you mean {', '.join(close)}?" if close else ""


def _is_number(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


# The options of a strategy, declared once for StrategySpec and for `transferlab train`.
STRATEGY = Option(
    "what trains: linear-probe (head only, BN eval), bn-only (BatchNorm + head: the seed's fine-tuning), full, "
    "freeze-unfreeze (head first, then everything at a lower LR), scratch (random init)",
    choices=STRATEGIES,
    group="model",
)
BN = Option(
    "BatchNorm policy: train (affine and running stats update), frozen-stats (affine trains, stats fixed), eval "
    "(nothing changes)",
    choices=BN_POLICIES,
    default_text="eval for linear-probe, else train",
    group="model",
)
LAYER_DECAY = Option(
    "full only: each layer towards the stem gets this factor less LR (e.g. 0.75)",
    lo=0,
    hi=1,
    lo_open=True,
    group="model",
)
UNFREEZE_EPOCH = Option(
    "freeze-unfreeze: epochs with the body frozen before unfreezing",
    lo=1,
    hi=10_000,
    default_text=str(DEFAULT_UNFREEZE_EPOCH),
    group="model",
)
UNFREEZE_LR_SCALE = Option(
    "freeze-unfreeze: backbone LR factor after unfreezing",
    lo=0,
    hi=1,
    lo_open=True,
    default_text=f"{DEFAULT_UNFREEZE_LR_SCALE:g}",
    group="model",
)
BACKBONE_LR_SCALE = Option(
    "bn-only, full: the backbone's LR (BatchNorm's for bn-only) as a multiple of the head's, in (0, 100]",
    lo=0,
    hi=100,
    lo_open=True,
    default_text="1",
    group="model",
)
#: Which strategies each option applies to (None: all), and what to use instead elsewhere.
_APPLIES: dict[str, tuple[tuple[str, ...], str]] = {
    "layer_decay": (("full",), "full"),
    "backbone_lr_scale": (("bn-only", "full"), "bn-only or full"),
    "unfreeze_epoch": (("freeze-unfreeze",), "freeze-unfreeze"),
    "unfreeze_lr_scale": (("freeze-unfreeze",), "freeze-unfreeze"),
}
#: A BN policy that contradicts a strategy, and why.
_BN_CONFLICTS: dict[tuple[str, str], str] = {
    **{
        ("linear-probe", bn): f"--bn {bn} does not go with --strategy linear-probe: a linear probe keeps the whole "
        "backbone fixed, BatchNorm included, so only --bn eval applies (use --strategy bn-only to train BatchNorm)"
        for bn in ("train", "frozen-stats")
    },
    ("bn-only", "eval"): "--bn eval does not go with --strategy bn-only: with BatchNorm fixed only the head would "
    "train; use --strategy linear-probe for that, or --bn train / frozen-stats",
    **{
        ("scratch", bn): f"--bn {bn} does not go with --strategy scratch: a randomly initialised backbone has no "
        "pretrained BatchNorm statistics or scales to keep; use --bn train"
        for bn in ("eval", "frozen-stats")
    },
}


@dataclass(frozen=True)
class StrategySpec:
    """How to adapt the backbone; options that do not apply to the strategy are an error, not ignored.

    Options left as None get the strategy's default in ``__post_init__``, so two specs that mean the same
    thing compare equal and the resolved values are what gets logged and saved.
    """

    #: One of linear-probe, bn-only, full, freeze-unfreeze, scratch.
    name: str = STRATEGY.field(flag="--strategy")
    #: BatchNorm policy: train, frozen-stats or eval (default depends on the strategy).
    bn: str | None = BN.field(None)
    #: full only: learning rate multiplier per layer from the head down towards the stem, in (0, 1].
    layer_decay: float | None = LAYER_DECAY.field(None)
    #: freeze-unfreeze only: the epoch (counting from 1) before which the backbone is unfrozen; the head
    #: trains alone for this many epochs.
    unfreeze_epoch: int | None = UNFREEZE_EPOCH.field(None)
    #: freeze-unfreeze only: backbone learning rate after unfreezing, as a fraction of the head's, in (0, 1].
    unfreeze_lr_scale: float | None = UNFREEZE_LR_SCALE.field(None)
    #: bn-only and full: the backbone's learning rate as a multiple of the head's, in (0, 100] (discriminative
    #: LR: pretrained weights usually want smaller steps than a new head; BatchNorm's few affine parameters
    #: may want larger ones). None means 1.
    backbone_lr_scale: float | None = BACKBONE_LR_SCALE.field(None)

    def __post_init__(self) -> None:
        if self.name not in STRATEGIES:
            raise ConfigError(
                f"--strategy {self.name!r} is not a strategy; choose one of {', '.join(STRATEGIES)}"
                f"{_suggest(str(self.name), STRATEGIES)}"
            )
        object.__setattr__(self, "bn", self._resolve_bn())
        self._check_applies()
        if self.name == "freeze-unfreeze":
            if self.unfreeze_epoch is None:
                object.__setattr__(self, "unfreeze_epoch", DEFAULT_UNFREEZE_EPOCH)
            if self.unfreeze_lr_scale is None:
                object.__setattr__(self, "unfreeze_lr_scale", DEFAULT_UNFREEZE_LR_SCALE)
        if isinstance(self.unfreeze_epoch, float):
            raise ConfigError(f"--unfreeze-epoch must be a whole number of epochs, got {self.unfreeze_epoch!r}")
        check(self, ("layer_decay", "unfreeze_epoch", "unfreeze_lr_scale", "backbone_lr_scale"))
        for name in ("layer_decay", "unfreeze_lr_scale", "backbone_lr_scale"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, float(getattr(self, name)))

    def _resolve_bn(self) -> str:
        bn = DEFAULT_BN[self.name] if self.bn is None else self.bn
        if bn not in BN_POLICIES:
            raise ConfigError(
                f"--bn {bn!r} is not a BatchNorm policy; choose one of {', '.join(BN_POLICIES)}"
                f"{_suggest(str(bn), BN_POLICIES)}"
            )
        conflict = _BN_CONFLICTS.get((self.name, bn))
        if conflict:
            raise ConfigError(conflict)
        return bn

    def _check_applies(self) -> None:
        """An option given for a strategy it does not apply to is an error, not silently ignored."""
        for name, (strategies, which) in _APPLIES.items():
            if getattr(self, name) is not None and self.name not in strategies:
                hint = (
                    " (use --unfreeze-lr-scale)"
                    if name == "backbone_lr_scale" and self.name == "freeze-unfreeze"
                    else ""
                )
                raise ConfigError(f"{flag_of(name)} applies only to --strategy {which}, not {self.name}{hint}")

    @property
    def policy(self) -> str:
        """The resolved BN policy (never None after construction)."""
        assert self.bn is not None
        return self.bn

    def __str__(self) -> str:
        extra = ""
        if self.layer_decay is not None:
            extra = f", layer decay {self.layer_decay:g}"
        if self.backbone_lr_scale is not None:
            extra += f", backbone lr x{self.backbone_lr_scale:g}"
        if self.name == "freeze-unfreeze":
            extra = f", unfreeze at epoch {self.unfreeze_epoch} with lr x{self.unfreeze_lr_scale:g}"
        return f"{self.name} (BN {self.bn}{extra})"


# --------------------------------------------------------------------------------------------------
# which parameter is which


def bn_modules(model: TransferModel) -> list[_BatchNorm]:
    """The backbone's BatchNorm layers (``_BatchNorm`` covers BatchNorm1/2/3d, SyncBatchNorm and timm's
    BatchNormAct2d). The head's are not included: the BN policy is about pretrained statistics."""
    return [m for m in model.backbone.modules() if isinstance(m, _BatchNorm)]


def _bn_param_ids(model: TransferModel) -> set[int]:
    return {id(p) for m in bn_modules(model) for p in m.parameters(recurse=False)}


def _named_groups(model: TransferModel) -> Iterator[tuple[str, str, nn.Parameter]]:
    """(group, name, param) for every parameter; group is head, bn (backbone BatchNorm) or backbone."""
    bn_ids = _bn_param_ids(model)
    for name, p in model.head.named_parameters(prefix="head"):
        yield "head", name, p
    for name, p in model.backbone.named_parameters(prefix="backbone"):
        yield ("bn" if id(p) in bn_ids else "backbone"), name, p


def trainable_counts(model: TransferModel) -> dict[str, int]:
    """Trainable parameter counts: head, bn (backbone BatchNorm affine), backbone (the rest), total."""
    counts = {"head": 0, "bn": 0, "backbone": 0}
    for group, _, p in _named_groups(model):
        if p.requires_grad:
            counts[group] += p.numel()
    counts["total"] = sum(counts.values())
    return counts


def _set_trainable(model: TransferModel, spec: StrategySpec, *, backbone: bool, bn: bool) -> dict[str, int]:
    model.head.requires_grad_(True)
    model.backbone.requires_grad_(backbone)
    bn_trains = bn and spec.policy != "eval"
    for m in bn_modules(model):
        for p in m.parameters(recurse=False):
            p.requires_grad_(bn_trains)
    return trainable_counts(model)


def _log_counts(what: str, spec: StrategySpec, counts: dict[str, int]) -> None:
    log.info(
        "%s: strategy %s, BN policy %s; trainable parameters: head %d, bn %d, backbone %d, total %d",
        what,
        spec.name,
        spec.policy,
        counts["head"],
        counts["bn"],
        counts["backbone"],
        counts["total"],
    )


# --------------------------------------------------------------------------------------------------
# the strategies


def apply_strategy(model: TransferModel, spec: StrategySpec) -> dict[str, int]:
    """Set ``requires_grad`` on every parameter of ``model`` for ``spec``; return the trainable counts.

    Returns ``{"head", "bn", "backbone", "total"}`` where ``bn`` counts the backbone's BatchNorm affine
    parameters and ``backbone`` the rest of the backbone. freeze-unfreeze starts with the head alone;
    call :func:`unfreeze` at ``spec.unfreeze_epoch``.
    """
    if spec.name == "bn-only" and not bn_modules(model):
        raise ConfigError(
            f"--strategy bn-only: {type(model.backbone).__name__} has no BatchNorm layers, so only the head "
            "would train; use --strategy linear-probe or full with this backbone"
        )
    if spec.name in ("linear-probe", "freeze-unfreeze"):
        counts = _set_trainable(model, spec, backbone=False, bn=False)
    elif spec.name == "bn-only":
        counts = _set_trainable(model, spec, backbone=False, bn=True)
    else:  # full, scratch
        counts = _set_trainable(model, spec, backbone=True, bn=True)
    _log_counts("adapting", spec, counts)
    return counts


def unfreeze(model: TransferModel, spec: StrategySpec) -> dict[str, int]:
    """Second step of freeze-unfreeze: make the backbone trainable (BatchNorm per policy); return counts.

    The optimizer must then be given the new parameters, e.g. rebuilt from :func:`param_groups`, which
    puts them at ``unfreeze_lr_scale`` times the head's learning rate.
    """
    if spec.name != "freeze-unfreeze":
        raise ValueError(f"unfreeze() is a step of --strategy freeze-unfreeze, not of {spec.name}")
    counts = _set_trainable(model, spec, backbone=True, bn=True)
    _log_counts("unfrozen", spec, counts)
    return counts


def set_train_mode(model: TransferModel, spec: StrategySpec) -> TransferModel:
    """Call instead of ``model.train()``: train mode everywhere except where the BN policy forbids it.

    Under ``frozen-stats`` and ``eval`` the backbone's BatchNorm layers are put in eval mode, so they
    normalise with (and never update) the pretrained running statistics; ``eval`` also fixes their
    affine parameters. Dropout and drop-path in the backbone stay as timm's ``train()`` sets them, even
    when the backbone is frozen. Under ``train``, BN statistics update even while a freeze-unfreeze
    backbone is still frozen, as they would in the seed.
    """
    model.train()
    if spec.policy in ("frozen-stats", "eval"):
        for m in bn_modules(model):
            m.eval()
            if spec.policy == "eval":
                for p in m.parameters(recurse=False):
                    p.requires_grad_(False)
    return model


# --------------------------------------------------------------------------------------------------
# optimizer parameter groups


def backbone_layer_ids(backbone: nn.Module) -> tuple[dict[str, int], int]:
    """Depth of each backbone parameter (0 = stem) and the number of depths.

    Uses the model's own ``group_matcher(coarse=False)`` through timm's ``group_parameters`` (blocks in
    forward order; unmatched layers such as EfficientNet's conv_head go last). A model without one falls
    back to its top-level children in registration order, which for a sequential backbone is depth.
    """
    matcher = getattr(backbone, "group_matcher", None)
    if callable(matcher):
        from timm.models import group_parameters

        ids: dict[str, int] = group_parameters(backbone, matcher(coarse=False), reverse=True)
    else:
        order: dict[str, int] = {}
        ids = {}
        for name, _ in backbone.named_parameters():
            child = name.split(".", 1)[0]
            ids[name] = order.setdefault(child, len(order))
    num = max(ids.values(), default=-1) + 1
    return ids, num


def param_groups(model: TransferModel, spec: StrategySpec, base_lr: float) -> list[dict[str, Any]]:
    """Optimizer parameter groups for the parameters that currently train.

    Each group is a dict with ``params``, ``lr``, ``lr_scale`` (lr / base_lr, for schedulers that scale
    per group) and ``name``. The head always trains at ``base_lr``. Backbone parameters go in a ``bn`` and
    a ``backbone`` group (so the loop can, say, exempt BatchNorm from weight decay), at
    ``base_lr * unfreeze_lr_scale`` for freeze-unfreeze, ``base_lr * backbone_lr_scale`` for bn-only and
    full when it is set. With ``layer_decay`` (full only) the backbone is
    split by depth instead: the layer just below the head gets ``base_lr * decay``, each one further
    towards the stem another factor of ``decay``. Frozen parameters are left out, so call this after
    :func:`apply_strategy` / :func:`unfreeze`.
    """
    if not _is_number(base_lr) or base_lr <= 0:
        raise ConfigError(f"the learning rate must be a positive number, got {base_lr!r}")
    head = [p for g, _, p in _named_groups(model) if g == "head" and p.requires_grad]
    groups: list[dict[str, Any]] = []

    if spec.layer_decay is not None:
        ids, num = backbone_layer_ids(model.backbone)
        by_layer: dict[int, list[nn.Parameter]] = {}
        for name, p in model.backbone.named_parameters():
            if p.requires_grad:
                by_layer.setdefault(ids.get(name, num - 1), []).append(p)
        for layer in sorted(by_layer):
            scale = (spec.backbone_lr_scale or 1.0) * spec.layer_decay ** (num - layer)
            groups.append(_group(f"backbone.layer{layer}", by_layer[layer], base_lr, scale))
    else:
        scale = spec.unfreeze_lr_scale if spec.name == "freeze-unfreeze" else (spec.backbone_lr_scale or 1.0)
        assert scale is not None
        for which in ("backbone", "bn"):
            params = [p for g, _, p in _named_groups(model) if g == which and p.requires_grad]
            if params:
                groups.append(_group(which, params, base_lr, scale))
    if head:
        groups.append(_group("head", head, base_lr, 1.0))
    if not groups:
        raise ConfigError("no parameter trains; call apply_strategy() before param_groups()")
    return groups


def _group(name: str, params: list[nn.Parameter], base_lr: float, scale: float) -> dict[str, Any]:
    return {"name": name, "params": params, "lr": base_lr * scale, "lr_scale": scale}


__all__ = [
    "BN_POLICIES",
    "DEFAULT_BN",
    "STRATEGIES",
    "StrategySpec",
    "apply_strategy",
    "backbone_layer_ids",
    "bn_modules",
    "param_groups",
    "set_train_mode",
    "trainable_counts",
    "unfreeze",
]
