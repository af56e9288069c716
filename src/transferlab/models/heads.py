"""Classifier heads that replace a backbone's ImageNet classifier, and the model that joins the two.

Two heads, chosen by name on the command line (``--head linear`` or ``--head seed``):

* ``linear``: one ``nn.Linear`` on the backbone's pooled pre-logits features, exactly where timm's own
  classifier sits. Because of that it can be warm-started from the rows of the ImageNet-1k classifier
  that belong to the dataset's classes, which is worth several points of accuracy on ImageNet subsets.
* ``seed``: the head of the seed experiment, which works on the backbone's feature map instead of the
  pooled vector: conv 3x3 -> ReLU -> global average pool -> dropout -> dense -> ReLU -> dense.

Everything goes through timm's model contract (``forward_features``, ``forward_head(pre_logits=True)``,
``reset_classifier``, ``num_features``/``head_hidden_size``) rather than cutting models at child
indices, so any timm architecture can be adapted by name.
"""

from __future__ import annotations

import copy
import difflib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal, NoReturn

import torch
from torch import nn

from transferlab.errors import ConfigError
from transferlab.labels import imagenet_indices

log = logging.getLogger(__name__)

HeadKind = Literal["linear", "seed"]
HEAD_KINDS: tuple[str, ...] = ("linear", "seed")

#: Short option keys accepted by :meth:`HeadSpec.parse` and the field each one sets.
_SEED_KEYS: dict[str, str] = {
    "conv": "conv_channels",
    "conv_channels": "conv_channels",
    "hidden": "hidden",
    "dropout": "dropout",
    "act": "conv_act",
    "conv_act": "conv_act",
}
CONV_ACTS: tuple[str, ...] = ("none", "relu")
_MAX_CHANNELS = 65536


def _suggest(word: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=3, cutoff=0.5)
    return f"; did you mean {', '.join(close)}?" if close else ""


@dataclass(frozen=True)
class HeadSpec:
    """Which head to put on the backbone, and the sizes of the seed head.

    The seed-head sizes are ignored for a linear head (they keep their defaults so that a spec is
    always complete); :meth:`parse` refuses options after ``linear`` so that a user never believes
    they changed something that has no effect.
    """

    #: ``linear`` (one dense layer on pooled features) or ``seed`` (conv + MLP on the feature map).
    kind: HeadKind = "linear"
    #: Filters of the seed head's 3x3 convolution.
    conv_channels: int = 32
    #: Dropout probability after the seed head's global pooling.
    dropout: float = 0.2
    #: Width of the seed head's hidden dense layer.
    hidden: int = 1024
    #: Activation after the seed head's convolution. The seed's Keras ``Conv2D`` has none (its default
    #: is linear); a ReLU there zeroes about half of the 32 channels before pooling and costs accuracy.
    conv_act: str = "none"

    def __post_init__(self) -> None:
        if self.kind not in HEAD_KINDS:
            raise ConfigError(
                f"--head {self.kind!r} is not a head kind; choose one of {', '.join(HEAD_KINDS)}"
                f"{_suggest(str(self.kind), HEAD_KINDS)}"
            )
        for field, value in (("conv_channels", self.conv_channels), ("hidden", self.hidden)):
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= _MAX_CHANNELS:
                raise ConfigError(f"--head: {field} must be an integer in [1, {_MAX_CHANNELS}], got {value!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, int | float) or not 0 <= self.dropout < 1:
            raise ConfigError(f"--head: dropout must be a number in [0, 1), got {self.dropout!r}")
        if self.conv_act not in CONV_ACTS:
            raise ConfigError(
                f"--head: act must be one of {', '.join(CONV_ACTS)}, got {self.conv_act!r}"
                f"{_suggest(str(self.conv_act), CONV_ACTS)}"
            )

    @classmethod
    def parse(cls, text: str) -> HeadSpec:
        """Parse ``linear``, ``seed`` or ``seed:conv=32,hidden=1024,dropout=0.2`` (any subset of keys).

        Keys may be written as ``conv`` or ``conv_channels``. Unknown kinds and keys are a ConfigError
        with the closest valid spelling, because a silently ignored typo would change an experiment.
        """
        kind, _, rest = text.strip().partition(":")
        kind = kind.strip()
        if kind not in HEAD_KINDS:
            raise ConfigError(
                f"--head {text!r}: unknown head kind {kind!r}; choose one of {', '.join(HEAD_KINDS)}"
                f"{_suggest(kind, HEAD_KINDS)}"
            )
        rest = rest.strip()
        if kind == "linear":
            if rest:
                raise ConfigError(f"--head {text!r}: the linear head takes no options (only the seed head does)")
            return cls("linear")
        values: dict[str, int | float | str] = {}
        for item in filter(None, (part.strip() for part in rest.split(","))):
            key, eq, raw = (s.strip() for s in item.partition("="))
            if key not in _SEED_KEYS:
                raise ConfigError(
                    f"--head {text!r}: unknown seed-head option {key!r}; known: conv, hidden, dropout, act"
                    f"{_suggest(key, list(_SEED_KEYS))}"
                )
            if not eq or not raw:
                raise ConfigError(f"--head {text!r}: option {key!r} needs a value, as in {key}=VALUE")
            field = _SEED_KEYS[key]
            if field in values:
                raise ConfigError(f"--head {text!r}: {field} is given twice")
            if field == "conv_act":
                values[field] = raw
                continue
            try:
                values[field] = float(raw) if field == "dropout" else int(raw)
            except ValueError:
                want = "a number" if field == "dropout" else "an integer"
                raise ConfigError(f"--head {text!r}: {key} must be {want}, got {raw!r}") from None
        return cls("seed", **values)  # type: ignore[arg-type]

    def __str__(self) -> str:
        if self.kind == "linear":
            return "linear"
        act = "" if self.conv_act == "none" else f",act={self.conv_act}"
        return f"seed:conv={self.conv_channels},hidden={self.hidden},dropout={self.dropout:g}{act}"


class LinearHead(nn.Module):
    """One dense layer on the pooled pre-logits vector (B, D): a fresh copy of timm's own classifier."""

    #: Takes ``forward_head(features, pre_logits=True)``, not the feature map.
    needs_feature_map: ClassVar[bool] = False

    def __init__(self, num_features: int, num_classes: int) -> None:
        super().__init__()
        self.num_features = num_features
        self.num_classes = num_classes
        self.fc = nn.Linear(num_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


class SeedHead(nn.Module):
    """The seed experiment's head on the backbone's feature map (B, C, H, W).

    conv 3x3 (``conv_channels`` filters, padding 1; no activation unless ``conv_act="relu"``, like the seed's
    Keras ``Conv2D``) -> global average pool -> dropout ->
    dense (``hidden``) -> ReLU -> dense (``num_classes``). The extra convolution lets the head re-mix
    spatial features before pooling, which a linear head on the pooled vector cannot do.
    """

    #: Takes the output of ``forward_features`` directly.
    needs_feature_map: ClassVar[bool] = True

    def __init__(
        self,
        in_chs: int,
        num_classes: int,
        conv_channels: int = 32,
        dropout: float = 0.2,
        hidden: int = 1024,
        conv_act: str = "none",
    ) -> None:
        super().__init__()
        self.in_chs = in_chs
        self.num_classes = num_classes
        self.conv = nn.Conv2d(in_chs, conv_channels, kernel_size=3, padding=1)
        self.act1: nn.Module = nn.ReLU(inplace=True) if conv_act == "relu" else nn.Identity()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.drop = nn.Dropout(dropout)
        self.fc1 = nn.Linear(conv_channels, hidden)
        self.act2 = nn.ReLU(inplace=True)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4:
            # Transformers give tokens (B, N, D), not a map; the convolution would fail with a shape error
            # that does not say what to do.
            raise ConfigError(
                f"--head seed needs a convolutional feature map (B, C, H, W) from the backbone, but it gives a "
                f"tensor of shape {tuple(x.shape)}; use --head linear with this backbone"
            )
        x = self.act1(self.conv(x))
        x = self.pool(x).flatten(1)
        x = self.drop(x)
        x = self.act2(self.fc1(x))
        return self.fc2(x)


def pre_logits_dim(model: nn.Module) -> int:
    """Width of ``forward_head(x, pre_logits=True)``.

    timm's ``num_features`` is the channel count of the feature map; models whose head has its own
    layers before the classifier (MobileNetV3's conv_head, for one) report the pooled width as
    ``head_hidden_size`` instead, so that one wins when present.
    """
    dim = getattr(model, "head_hidden_size", None) or getattr(model, "num_features", None)
    if not isinstance(dim, int) or dim <= 0:
        raise ConfigError(
            f"{type(model).__name__} does not follow timm's model contract (no num_features); "
            "only timm backbones can be adapted"
        )
    return dim


def feature_map_channels(model: nn.Module) -> int:
    """Channel count of ``forward_features`` output (timm's ``num_features``)."""
    dim = getattr(model, "num_features", None)
    if not isinstance(dim, int) or dim <= 0:
        raise ConfigError(
            f"{type(model).__name__} does not follow timm's model contract (no num_features); "
            "only timm backbones can be adapted"
        )
    return dim


def build_head(spec: HeadSpec, backbone_module: nn.Module, num_classes: int) -> nn.Module:
    """A freshly initialised head of ``spec.kind`` sized for ``backbone_module`` and ``num_classes``."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ConfigError(f"a head needs at least one class, got num_classes={num_classes!r}")
    if spec.kind == "linear":
        return LinearHead(pre_logits_dim(backbone_module), num_classes)
    return SeedHead(
        feature_map_channels(backbone_module),
        num_classes,
        conv_channels=spec.conv_channels,
        dropout=spec.dropout,
        hidden=spec.hidden,
        conv_act=spec.conv_act,
    )


class TransferModel(nn.Module):
    """A timm backbone without its classifier, plus a new head.

    Kept as two named children so strategies can tell the head's parameters from the backbone's by
    prefix, and so the backbone's pre-logits features (what a frozen backbone computes every epoch
    the same) are one call away for caching.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        if not hasattr(head, "needs_feature_map"):
            raise TypeError(f"{type(head).__name__} has no needs_feature_map attribute; use LinearHead or SeedHead")
        self.backbone = backbone
        self.head = head

    @classmethod
    def from_backbone(
        cls,
        timm_model: nn.Module,
        spec: HeadSpec,
        num_classes: int,
        *,
        warm_start_ids: Sequence[str] | None = None,
    ) -> TransferModel:
        """Remove ``timm_model``'s classifier (in place) and put a head of ``spec`` on it.

        With ``warm_start_ids`` (the dataset's ImageNet WordNet ids, in class order) the linear head is
        initialised from the matching rows of the ImageNet classifier; this has to happen here because
        ``reset_classifier`` discards that classifier.
        """
        old = None
        if warm_start_ids is not None:
            if spec.kind != "linear":
                _refuse_warm_start(spec.kind)
            old = get_classifier_copy(timm_model)
            if old is None:
                raise ConfigError(
                    "warm start needs the backbone's ImageNet-1k linear classifier, but this backbone has none "
                    "(random init, or weights with another head); train the head from scratch instead"
                )
        timm_model.reset_classifier(0)
        head = build_head(spec, timm_model, num_classes)
        if old is not None:
            assert warm_start_ids is not None and isinstance(head, LinearHead)
            warm_start_from_imagenet(head, old, warm_start_ids)
        log.info(
            "head %s on %s: %d classes, %d parameters",
            spec,
            type(timm_model).__name__,
            num_classes,
            sum(p.numel() for p in head.parameters()),
        )
        return cls(timm_model, head)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """What the head takes: the feature map for a seed head, pooled pre-logits for a linear head."""
        f = self.backbone.forward_features(x)
        if self.head.needs_feature_map:
            return f
        return self.backbone.forward_head(f, pre_logits=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def get_classifier_copy(timm_model: nn.Module) -> nn.Linear | None:
    """A deep copy of the model's ImageNet-1k classifier, or None when it has none.

    Call before ``reset_classifier``, which throws the classifier away. Only a ``nn.Linear`` with
    1,000 outputs qualifies: anything else (no head, a conv classifier, another label set) cannot be
    mapped row by row onto ImageNet classes. Whether those 1,000 outputs really are ImageNet-1k in
    the standard order is the caller's knowledge (``Backbone.has_imagenet_head``).
    """
    get = getattr(timm_model, "get_classifier", None)
    clf = get() if callable(get) else None
    if isinstance(clf, nn.Linear) and clf.out_features == 1000:
        return copy.deepcopy(clf)
    return None


def _refuse_warm_start(kind: str) -> NoReturn:
    raise ConfigError(
        f"warm start from the ImageNet classifier applies only to --head linear: the {kind} head does not "
        "sit where the ImageNet classifier sat (it works on the feature map and has hidden layers), so "
        "there are no rows to copy into it"
    )


def warm_start_from_imagenet(head: nn.Module, old_classifier: nn.Linear | None, class_ids: Sequence[str]) -> None:
    """Initialise ``head`` with the ImageNet-1k classifier rows of the dataset's classes.

    On an ImageNet subset the pretrained classifier already separates these classes; starting from its
    rows instead of random ones means the head starts at zero-shot accuracy rather than chance.
    Raises DataError (from :func:`imagenet_indices`) when a class is not an ImageNet-1k class, and
    ConfigError for a head or classifier that cannot take the rows.
    """
    if not isinstance(head, LinearHead):
        _refuse_warm_start("seed" if isinstance(head, SeedHead) else type(head).__name__)
    if old_classifier is None or not isinstance(old_classifier, nn.Linear) or old_classifier.out_features != 1000:
        raise ConfigError(
            "warm start needs the backbone's ImageNet-1k linear classifier (1000 outputs); "
            "take it with get_classifier_copy() before reset_classifier() discards it"
        )
    if len(class_ids) != head.num_classes:
        raise ConfigError(f"warm start got {len(class_ids)} class ids for a head with {head.num_classes} outputs")
    if old_classifier.in_features != head.num_features:
        raise ConfigError(
            f"warm start: the ImageNet classifier takes {old_classifier.in_features} features but the head "
            f"takes {head.num_features}; they must come from the same backbone"
        )
    rows = torch.as_tensor(imagenet_indices(class_ids), device=old_classifier.weight.device)
    with torch.no_grad():
        head.fc.weight.copy_(old_classifier.weight.index_select(0, rows))
        if old_classifier.bias is not None:
            head.fc.bias.copy_(old_classifier.bias.index_select(0, rows))
        else:
            head.fc.bias.zero_()
    log.info("warm-started the linear head from %d ImageNet-1k classifier rows", len(class_ids))


__all__ = [
    "HEAD_KINDS",
    "HeadSpec",
    "LinearHead",
    "SeedHead",
    "TransferModel",
    "build_head",
    "feature_map_channels",
    "get_classifier_copy",
    "pre_logits_dim",
    "warm_start_from_imagenet",
]
