"""The training configuration: one frozen dataclass, validated on construction.

Every field is a CLI option of ``transferlab train`` and a key of the run's ``config.yaml``; invalid
values and combinations fail here with a sentence naming the option.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from transferlab.data.augment import AUG_MODES
from transferlab.data.decoded import DECODED_CACHE
from transferlab.data.resolve import DATA_HELP
from transferlab.data.screen import POLICIES as BAD_IMAGE_POLICIES
from transferlab.data.transforms import CROP, IMG_SIZE, INTERPOLATION
from transferlab.errors import ConfigError
from transferlab.inference.engine import BACKEND
from transferlab.models.heads import HeadSpec
from transferlab.models.strategies import (
    BACKBONE_LR_SCALE,
    BN,
    LAYER_DECAY,
    STRATEGY,
    UNFREEZE_EPOCH,
    UNFREEZE_LR_SCALE,
    StrategySpec,
)
from transferlab.models.weights import WEIGHTS_HELP
from transferlab.options import check, check_keys, option
from transferlab.runtime import CHANNELS_LAST, DEVICE, PRECISION, WORKERS
from transferlab.training.optim import OPTIMIZERS, SCHEDULES

HEAD_INITS = ("auto", "imagenet", "random")
STANDARDIZE = ("pretrained", "dataset")
CLASS_WEIGHTS = ("none", "balanced")
SAMPLERS = ("shuffle", "balanced")
FEATURE_CACHE = ("auto", "on", "off")
EARLY_STOP = ("val_loss", "val_acc")
PROBES = ("sgd", "lbfgs")


@dataclass(frozen=True)
class TrainConfig:
    """A training run. ``config.yaml`` in the run directory holds exactly these fields."""

    model: str = option(
        help="timm architecture, e.g. tf_efficientnet_lite0, resnet50 (required unless --config)",
        group="model",
        cli_default=None,
    )
    data: str = option(
        help=DATA_HELP, group="data", cli_default="tiny-imagenet-mini", default_text="tiny-imagenet-mini"
    )
    out: Path = option(help="run directory (created; required unless --config)", group="runtime", cli_default=None)
    weights: str = option("auto", WEIGHTS_HELP, group="model")
    init_from: Path | None = option(
        None, "start from the backbone of an earlier run directory (e.g. a CNN trained on CIFAR-10)", group="model"
    )
    head_from: Path | None = option(
        None,
        "start the linear head from an earlier linear-probe run's head (LP-FT: fine-tune from a tuned probe); "
        "same --model and classes",
        group="model",
    )
    strategy: str = STRATEGY.field("linear-probe")
    bn: str | None = BN.field(None)
    head: str = option(
        "linear",
        "linear, or seed (Conv3x3x32, no activation -> GAP -> dropout 0.2 -> dense 1024 + ReLU -> dense N); "
        "options as seed:conv=32,hidden=1024,dropout=0.2,act=none|relu",
        group="model",
    )
    head_init: str = option(
        "auto",
        "imagenet: start a linear head from the matching rows of the ImageNet classifier; auto = imagenet where it "
        "applies",
        choices=HEAD_INITS,
        group="model",
    )
    layer_decay: float | None = LAYER_DECAY.field(None)
    unfreeze_epoch: int | None = UNFREEZE_EPOCH.field(None)
    unfreeze_lr_scale: float | None = UNFREEZE_LR_SCALE.field(None)
    backbone_lr_scale: float | None = BACKBONE_LR_SCALE.field(None)
    img_size: int | None = IMG_SIZE.field(None)
    crop: str = CROP.field("auto")
    interpolation: str = INTERPOLATION.field("auto")
    aug: str = option(
        "none", "training augmentation; seed = shear 0.2 / zoom 0.2 / horizontal flip", choices=AUG_MODES, group="data"
    )
    mixup: float = option(0.0, "mixup alpha, 0 = off", lo=0, hi=10, group="data")
    cutmix: float = option(0.0, "cutmix alpha, 0 = off", lo=0, hi=10, group="data")
    label_smoothing: float = option(0.0, "label smoothing", lo=0, hi=0.99, group="data")
    standardize: str = option(
        "pretrained",
        "input standardisation: the weights' mean/std, or the training set's",
        choices=STANDARDIZE,
        group="data",
    )
    class_weights: str = option(
        "none", "weight the loss by inverse class frequency", choices=CLASS_WEIGHTS, group="data"
    )
    sampler: str = option("shuffle", "balanced draws each class equally often", choices=SAMPLERS, group="data")
    holdout: float = option(
        0.1, "fraction of each train class held out to pick the epoch kept", lo=1e-6, hi=0.9, group="data"
    )
    report_split: str = option("val", "split the final numbers come from; never used for any choice", group="data")
    epochs: int = option(10, "maximum epochs", lo=1, hi=10_000, group="optimisation")
    lr: float = option(1e-3, "learning rate (the seed recipe: 1e-4)", lo=1e-12, hi=10, group="optimisation")
    batch_size: int = option(256, "images per step (the seed recipe: 128)", lo=1, hi=1 << 16, group="optimisation")
    accum_steps: int = option(1, "gradient accumulation steps", lo=1, hi=1024, group="optimisation")
    optimizer: str = option(
        "adamw", "optimizer; rmsprop uses Keras' defaults like the seed", choices=OPTIMIZERS, group="optimisation"
    )
    weight_decay: float = option(0.0, "weight decay", lo=0, hi=10, group="optimisation")
    schedule: str = option("constant", "learning-rate schedule", choices=SCHEDULES, group="optimisation")
    warmup_steps: int = option(0, "linear warmup steps", lo=0, hi=10**9, group="optimisation")
    step_size: int | None = option(
        None, "steps between decays for --schedule step", lo=1, hi=10**9, group="optimisation"
    )
    gamma: float = option(0.1, "decay factor for --schedule step", lo=1e-12, hi=1, group="optimisation")
    clip_grad: float | None = option(
        None, "clip the gradient norm to this", lo=1e-9, hi=1e9, default_text="off", group="optimisation"
    )
    early_stop: str = option(
        "val_loss",
        "holdout metric that picks the best epoch and drives --patience",
        choices=EARLY_STOP,
        group="optimisation",
    )
    patience: int | None = option(
        None,
        "stop after this many epochs without improvement",
        lo=1,
        hi=10_000,
        default_text="never",
        group="optimisation",
    )
    probe: str = option(
        "sgd",
        "how a linear probe on cached features is fitted: sgd = --epochs of minibatch --optimizer steps, the epoch "
        "kept chosen on the holdout; lbfgs = multinomial logistic regression fitted to convergence (full-batch "
        "L-BFGS) for each --l2-grid penalty, the best holdout NLL chosen, then refit on all of train",
        choices=PROBES,
        group="optimisation",
    )
    l2_grid: tuple[float, ...] | None = option(
        None,
        "--probe lbfgs: the L2 penalties tried, on standardised features, pulling the weights towards the ImageNet "
        "rows (--head-init imagenet) or zero",
        nargs="+",
        metavar="L2",
        default_text="1 0.3 0.1 ... 1e-4, half-decades",
        group="optimisation",
    )
    flip_features: bool = option(
        False,
        "linear probe on cached features: also train on the features of each train image's horizontal mirror, and "
        "score an image (holdout and report) on the mean of its and its mirror's features (for a linear head the "
        "mean of the two logits); the mirrored features are extracted once and cached",
        group="optimisation",
    )
    feature_cache: str = option(
        "auto",
        "train a linear probe on cached backbone features (auto: whenever possible)",
        choices=FEATURE_CACHE,
        group="runtime",
    )
    feature_batch_size: int = option(
        32, "images per backbone pass while extracting features", lo=1, hi=1 << 16, group="runtime"
    )
    decoded_cache: str = DECODED_CACHE.field("auto")
    compile: bool = option(
        False,
        "torch.compile the training forward pass (pays a compile at start; worth it for long GPU runs)",
        group="runtime",
    )
    cache_dir: Path | None = option(
        None,
        "cache folder for features and dataset stats",
        default_text="$TRANSFERLAB_CACHE or user cache",
        group="runtime",
    )
    checkpoint_every: int = option(
        0,
        "also checkpoint every N steps, besides each epoch end",
        lo=0,
        hi=10**9,
        default_text="0 = epoch ends only",
        group="runtime",
    )
    keep_checkpoints: int = option(2, "step checkpoints kept", lo=1, hi=1000, group="runtime")
    resume: bool = option(False, "continue from the newest complete checkpoint in --out", group="runtime")
    # numpy's SeedSequence (data order, augmentation) needs a seed >= 0
    seed: int = option(0, "seed for holdout, init, data order, augmentation", lo=0, hi=2**63 - 1, group="runtime")
    deterministic: bool = option(False, "use deterministic algorithms only (slower)", group="runtime")
    precision: str = PRECISION.field("auto")
    channels_last: str = CHANNELS_LAST.field("auto")
    device: str = DEVICE.field("auto")
    workers: int = WORKERS.field(-1)
    #: Feature extraction only (the linear probe's cached features); training and the holdout pass stay on torch.
    backend: str = BACKEND.field("torch", help=BACKEND.help + "; feature extraction only, training stays on torch")
    train_limit: int | None = option(
        None, "use a seeded subset of train", lo=1, hi=10**12, default_text="all", group="data"
    )
    report_limit: int | None = option(
        None, "report on a seeded subset of --report-split", lo=1, hi=10**12, default_text="all", group="data"
    )
    progress: bool | None = option(None, "progress bars (None: only on a terminal)", cli=False)

    def __post_init__(self) -> None:
        check(self)
        if self.report_split == "train":
            raise ConfigError("--report-split must not be 'train': the model is fitted on it")
        if self.feature_cache == "on" and not self.cacheable:
            raise ConfigError(
                "--feature-cache on needs a frozen backbone whose inputs never change: --strategy linear-probe, "
                "--aug none, no --mixup/--cutmix, --sampler shuffle (random augmentation would "
                "reach the backbone, so cached features would be wrong)"
            )
        self._check_probe()
        if self.strategy == "scratch" and self.head_init == "imagenet":
            raise ConfigError("--head-init imagenet contradicts --strategy scratch (random init everywhere)")
        # Strategy and head specs validate their own options.
        self.strategy_spec()
        self.head_spec()

    def _check_probe(self) -> None:
        """``--probe lbfgs``, ``--l2-grid`` and ``--flip-features`` work on cached features with a linear head."""
        if self.l2_grid is not None:
            grid = tuple(self.l2_grid) if isinstance(self.l2_grid, list | tuple) else (self.l2_grid,)
            bad = [v for v in grid if not isinstance(v, int | float) or isinstance(v, bool) or not 0 < v < math.inf]
            if not grid or bad:
                raise ConfigError(f"--l2-grid must be one or more numbers > 0, got {self.l2_grid!r}")
            # A YAML or JSON list (config.yaml, a study spec) becomes the tuple the field holds.
            object.__setattr__(self, "l2_grid", tuple(float(v) for v in grid))
        linear_on_cache = self.use_feature_cache and self.head_spec().kind == "linear"
        for name, used in (("probe", self.probe == "lbfgs"), ("flip_features", self.flip_features)):
            if used and not linear_on_cache:
                flag = "--probe lbfgs" if name == "probe" else "--flip-features"
                raise ConfigError(
                    f"{flag} fits a linear head on cached backbone features, but this run "
                    + ("has a non-linear --head" if self.use_feature_cache else "does not use the feature cache")
                    + ": it needs --strategy linear-probe with --head linear, --aug none, no --mixup/--cutmix, "
                    "--sampler shuffle, --class-weights none, --standardize pretrained, no --init-from and "
                    "--feature-cache auto/on"
                )
        if self.l2_grid is not None and self.probe != "lbfgs":
            raise ConfigError("--l2-grid is the penalty path of --probe lbfgs; add --probe lbfgs or drop --l2-grid")

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
        options = {f.name: getattr(self, f.name) for f in fields(StrategySpec) if f.name != "name"}
        return StrategySpec(self.strategy, **options)

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
        check_keys(cls, d, noun="config key")
        kw = dict(d)
        for k in ("out", "cache_dir", "init_from", "head_from"):
            if kw.get(k) is not None:
                kw[k] = Path(kw[k])
        return cls(**kw)


@dataclass(frozen=True)
class RunOptions:
    """How ``transferlab train`` treats its inputs and what else it writes: not part of the run's result,
    so not in ``config.yaml``."""

    bad_images: str = option(
        "error",
        "every image the run reads is decoded once before training (cached); error: stop there, naming each "
        "broken file and why; skip: leave them out, log each and count them in metrics.json",
        choices=BAD_IMAGE_POLICIES,
        group="data",
    )
    tensorboard: bool = option(
        False,
        "also write steps, epochs, the curves and the hyper-parameters as TensorBoard events to OUT/tensorboard "
        "(needs pip install 'transferlab[tensorboard]'; history.csv and metrics.json stay the record)",
        group="runtime",
    )

    def __post_init__(self) -> None:
        check(self)
