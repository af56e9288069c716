"""The training configuration: one frozen dataclass, validated on construction.

Every field is a CLI option of ``transferlab train`` and a key of the run's ``config.yaml``; invalid
values and combinations fail here with a sentence naming the option.
"""

from __future__ import annotations

import difflib
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from transferlab.data.decoded import DECODED_MODES
from transferlab.data.transforms import CROP_MODES, INTERPOLATIONS
from transferlab.errors import ConfigError
from transferlab.models.heads import HeadSpec
from transferlab.models.strategies import StrategySpec

STRATEGIES = ("linear-probe", "bn-only", "full", "freeze-unfreeze", "scratch")
HEAD_INITS = ("auto", "imagenet", "random")
AUGS = ("none", "flip", "seed", "randaugment", "trivialaugment")
STANDARDIZE = ("pretrained", "dataset")
CLASS_WEIGHTS = ("none", "balanced")
SAMPLERS = ("shuffle", "balanced")
FEATURE_CACHE = ("auto", "on", "off")


@dataclass(frozen=True)
class TrainConfig:
    """A training run. ``config.yaml`` in the run directory holds exactly these fields."""

    model: str
    data: str
    out: Path
    weights: str = "auto"
    init_from: Path | None = None
    strategy: str = "linear-probe"
    bn: str | None = None
    head: str = "linear"
    head_init: str = "auto"
    layer_decay: float | None = None
    unfreeze_epoch: int | None = None
    unfreeze_lr_scale: float | None = None
    backbone_lr_scale: float | None = None
    img_size: int | None = None
    crop: str = "auto"
    interpolation: str = "auto"
    aug: str = "none"
    mixup: float = 0.0
    cutmix: float = 0.0
    label_smoothing: float = 0.0
    standardize: str = "pretrained"
    class_weights: str = "none"
    sampler: str = "shuffle"
    holdout: float = 0.1
    report_split: str = "val"
    epochs: int = 10
    lr: float = 1e-3
    batch_size: int = 256
    accum_steps: int = 1
    optimizer: str = "adamw"
    weight_decay: float = 0.0
    schedule: str = "constant"
    warmup_steps: int = 0
    step_size: int | None = None
    gamma: float = 0.1
    clip_grad: float | None = None
    early_stop: str = "val_loss"
    patience: int | None = None
    feature_cache: str = "auto"
    feature_batch_size: int = 32
    decoded_cache: str = "auto"
    compile: bool = False
    cache_dir: Path | None = None
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    resume: bool = False
    seed: int = 0
    deterministic: bool = False
    precision: str = "auto"
    channels_last: str = "auto"
    device: str = "auto"
    workers: int = -1
    train_limit: int | None = None
    report_limit: int | None = None
    progress: bool | None = None

    def __post_init__(self) -> None:
        def choice(opt: str, value: object, allowed: tuple[str, ...]) -> None:
            if value not in allowed:
                close = difflib.get_close_matches(str(value), allowed, n=1)
                hint = f"; did you mean {close[0]}?" if close else ""
                raise ConfigError(f"{opt} must be one of {', '.join(allowed)}, not {value!r}{hint}")

        def rng(opt: str, value: float | int | None, lo: float, hi: float) -> None:
            if value is not None and not lo <= value <= hi:
                raise ConfigError(f"{opt} must be between {lo:g} and {hi:g}, got {value}")

        choice("--strategy", self.strategy, STRATEGIES)
        choice("--head-init", self.head_init, HEAD_INITS)
        choice("--crop", self.crop, CROP_MODES)
        choice("--interpolation", self.interpolation, INTERPOLATIONS)
        choice("--aug", self.aug, AUGS)
        choice("--standardize", self.standardize, STANDARDIZE)
        choice("--class-weights", self.class_weights, CLASS_WEIGHTS)
        choice("--sampler", self.sampler, SAMPLERS)
        choice("--feature-cache", self.feature_cache, FEATURE_CACHE)
        choice("--decoded-cache", self.decoded_cache, DECODED_MODES)
        rng("--img-size", self.img_size, 16, 1024)
        rng("--mixup", self.mixup, 0, 10)
        rng("--cutmix", self.cutmix, 0, 10)
        rng("--label-smoothing", self.label_smoothing, 0, 0.99)
        rng("--holdout", self.holdout, 1e-6, 0.9)
        rng("--epochs", self.epochs, 1, 10_000)
        rng("--lr", self.lr, 1e-12, 10)
        rng("--batch-size", self.batch_size, 1, 1 << 16)
        rng("--accum-steps", self.accum_steps, 1, 1024)
        rng("--weight-decay", self.weight_decay, 0, 10)
        rng("--warmup-steps", self.warmup_steps, 0, 10**9)
        rng("--clip-grad", self.clip_grad, 1e-9, 1e9)
        rng("--patience", self.patience, 1, 10_000)
        rng("--feature-batch-size", self.feature_batch_size, 1, 1 << 16)
        rng("--checkpoint-every", self.checkpoint_every, 0, 10**9)
        rng("--keep-checkpoints", self.keep_checkpoints, 1, 1000)
        rng("--step-size", self.step_size, 1, 10**9)
        rng("--gamma", self.gamma, 1e-12, 1)
        rng("--seed", self.seed, 0, 2**63 - 1)  # numpy's SeedSequence (data order, augmentation) needs >= 0
        rng("--workers", self.workers, -1, 256)
        rng("--train-limit", self.train_limit, 1, 10**12)
        rng("--report-limit", self.report_limit, 1, 10**12)
        if self.report_split == "train":
            raise ConfigError("--report-split must not be 'train': the model is fitted on it")
        if self.early_stop not in ("val_loss", "val_acc"):
            raise ConfigError(f"--early-stop must be val_loss or val_acc, not {self.early_stop!r}")
        if self.feature_cache == "on" and not self.cacheable:
            raise ConfigError(
                "--feature-cache on needs a frozen backbone whose inputs never change: --strategy linear-probe, "
                "--aug none, no --mixup/--cutmix, --sampler shuffle (random augmentation would "
                "reach the backbone, so cached features would be wrong)"
            )
        if self.strategy == "scratch" and self.head_init == "imagenet":
            raise ConfigError("--head-init imagenet contradicts --strategy scratch (random init everywhere)")
        # Strategy and head specs validate their own options.
        self.strategy_spec()
        self.head_spec()

    @property
    def cacheable(self) -> bool:
        """True when the backbone's outputs are the same every epoch, so features can be cached."""
        return (
            self.strategy == "linear-probe"
            and self.aug == "none"
            and self.mixup == 0
            and self.cutmix == 0
            and self.sampler == "shuffle"
            and self.class_weights == "none"
            and self.standardize == "pretrained"
            and self.init_from is None
        )

    @property
    def use_feature_cache(self) -> bool:
        """Whether this run trains on cached features."""
        return self.feature_cache != "off" and self.cacheable

    def strategy_spec(self):  # type: ignore[no-untyped-def]
        """The :class:`~transferlab.models.strategies.StrategySpec` of this run."""
        return StrategySpec(
            self.strategy,
            bn=self.bn,
            layer_decay=self.layer_decay,
            unfreeze_epoch=self.unfreeze_epoch,
            unfreeze_lr_scale=self.unfreeze_lr_scale,
            backbone_lr_scale=self.backbone_lr_scale,
        )

    def head_spec(self):  # type: ignore[no-untyped-def]
        """The :class:`~transferlab.models.heads.HeadSpec` of this run."""
        return HeadSpec.parse(self.head)

    def to_dict(self) -> dict[str, Any]:
        """YAML/JSON-friendly form (paths as strings)."""
        d = asdict(self)
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """Inverse of :meth:`to_dict`; an unknown key is an error naming the closest valid one."""
        names = [f.name for f in fields(cls)]
        for k in d:
            if k not in names:
                close = difflib.get_close_matches(k, names, n=1)
                hint = f"did you mean {close[0]!r}?" if close else f"the keys are {', '.join(sorted(names))}"
                raise ConfigError(f"unknown config key {k!r}; {hint}")
        kw = dict(d)
        for k in ("out", "cache_dir", "init_from"):
            if kw.get(k) is not None:
                kw[k] = Path(kw[k])
        return cls(**kw)
