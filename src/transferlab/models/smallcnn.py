"""A small CIFAR-style CNN, registered with timm as ``small_cnn`` so it is used like any backbone.

The seed study trains a small network from scratch on CIFAR-10 and then retrains its head on Tiny
ImageNet (a cross-domain member). Registering it with timm gives it the same contract as every other
backbone (``forward_features``, ``forward_head(pre_logits=True)``, ``reset_classifier``,
``group_matcher``) and its own preprocessing (32px, CIFAR-10 mean/std), so nothing downstream needs a
special case.
"""

from __future__ import annotations

from typing import Any

import torch
from timm.models import build_model_with_cfg, register_model
from torch import nn

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class SmallCNN(nn.Module):
    """Three stages of two 3x3 conv-BN-ReLU layers (widths 32/64/128), 2x2 max-pool between stages,
    global average pooling and a linear classifier: about 0.3M parameters."""

    def __init__(
        self,
        num_classes: int = 10,
        in_chans: int = 3,
        widths: tuple[int, ...] = (32, 64, 128),
        drop_rate: float = 0.0,
        global_pool: str = "avg",
        **_: Any,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = in_chans
        for i, w in enumerate(widths):
            if i:
                layers.append(nn.MaxPool2d(2))
            layers.append(_block(cin, w))
            cin = w
        self.features = nn.Sequential(*layers)
        self.num_features = self.head_hidden_size = cin
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        self.global_pool = global_pool
        self.fc: nn.Module = nn.Linear(cin, num_classes) if num_classes else nn.Identity()

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Layer groups for layer-wise LR decay: the first stage is the stem, then one group per stage."""
        return {"stem": r"^features\.0\.[0-2]", "blocks": r"^features\.(\d+)"}

    def get_classifier(self) -> nn.Module:
        """The classifier (timm contract)."""
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the classifier with a fresh one of ``num_classes`` outputs (0 = none)."""
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = global_pool
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last feature map (B, 128, H/4, W/4)."""
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pool, drop out, classify; ``pre_logits`` stops before the classifier."""
        x = x.mean(dim=(2, 3))
        if self.drop_rate:
            x = nn.functional.dropout(x, self.drop_rate, self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


default_cfgs = {
    "small_cnn": {
        "url": "",
        "num_classes": 10,
        "input_size": (3, 32, 32),
        "pool_size": (8, 8),
        "crop_pct": 1.0,
        "interpolation": "bilinear",
        "mean": CIFAR10_MEAN,
        "std": CIFAR10_STD,
        "first_conv": "features.0.0",
        "classifier": "fc",
    }
}


@register_model
def small_cnn(pretrained: bool = False, **kwargs: Any) -> SmallCNN:
    """The small CIFAR-style CNN (no pretrained weights exist: train it with --strategy scratch)."""
    return build_model_with_cfg(SmallCNN, "small_cnn", pretrained, **kwargs)
