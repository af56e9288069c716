"""The preprocessing a set of weights was trained with. It travels with the weights, so callers never
re-type a mean/std or an input size."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocessing:
    """Input size (square), resize interpolation, normalisation and the eval crop of a backbone."""

    input_size: int = 224
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    crop_pct: float = 0.875

    def __post_init__(self) -> None:
        if isinstance(self.input_size, bool) or not isinstance(self.input_size, int):
            raise ValueError(f"input_size must be an integer, got {self.input_size!r}")
        if self.input_size < 8:
            raise ValueError(f"input_size must be >= 8, got {self.input_size}")
        # Normalise lists (e.g. from JSON) to float tuples so equal settings compare and hash equal.
        for name in ("mean", "std"):
            try:
                vals = tuple(float(v) for v in getattr(self, name))
            except (TypeError, ValueError):
                raise ValueError(f"{name} must be three numbers, got {getattr(self, name)!r}") from None
            if not all(math.isfinite(v) for v in vals):
                raise ValueError(f"{name} must be finite, got {vals}")
            object.__setattr__(self, name, vals)
        try:
            object.__setattr__(self, "crop_pct", float(self.crop_pct))
        except (TypeError, ValueError):
            raise ValueError(f"crop_pct must be a number, got {self.crop_pct!r}") from None
        if self.interpolation not in ("bilinear", "bicubic", "nearest"):
            raise ValueError(f"interpolation must be bilinear, bicubic or nearest, not {self.interpolation!r}")
        if not 0.0 < self.crop_pct <= 1.0:
            raise ValueError(f"crop_pct must be in (0, 1], got {self.crop_pct}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError("mean and std need three values each, std > 0")

    @classmethod
    def from_timm(cls, cfg: Any) -> Preprocessing:
        """Build from a timm ``pretrained_cfg`` (dict or PretrainedCfg)."""
        get = cfg.get if isinstance(cfg, dict) else (lambda k, d=None: getattr(cfg, k, d))
        size = get("input_size", (3, 224, 224))
        interp = get("interpolation", "bicubic") or "bicubic"
        if interp not in ("bilinear", "bicubic", "nearest"):
            interp = "bicubic"
        return cls(
            input_size=int(size[-1]),
            interpolation=interp,
            mean=tuple(float(v) for v in get("mean", IMAGENET_MEAN)),  # type: ignore[arg-type]
            std=tuple(float(v) for v in get("std", IMAGENET_STD)),  # type: ignore[arg-type]
            crop_pct=float(get("crop_pct", 0.875) or 0.875),
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form (tuples become lists)."""
        d = asdict(self)
        d["mean"] = list(self.mean)
        d["std"] = list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocessing:
        """Inverse of :meth:`to_dict`; unknown keys are an error."""
        known = {"input_size", "interpolation", "mean", "std", "crop_pct"}
        extra = set(d) - known
        if extra:
            raise ValueError(f"unknown preprocessing keys: {sorted(extra)}")
        return cls(**d)  # __post_init__ validates and turns the mean/std lists into tuples
