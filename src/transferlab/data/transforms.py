"""Eval-time image transforms: PIL image -> uint8 tensor at the model's input size.

Normalisation is left to the batch (:func:`normalize_batch`), where it is one vectorised op on the
compute device instead of thousands of small per-image ones.

Crop policy. timm's default eval transform resizes to ``size / crop_pct`` and center-crops; that is
right for ImageNet photos (a few hundred pixels) but throws away a sixth of an image that is already
smaller than the input. On 64x64 Tiny ImageNet, Lite0 zero-shot falls from 58.5% to 52.2% top-1 with
the crop. So ``auto`` (the default) crops only when the source has pixels to spare: when its shorter side
is at least the pre-crop size ``size / crop_pct`` (256 for a 224 input). A 64px image fed at 64px is used
whole, not enlarged to 73px and cropped back (which cost the 64px runs a zoom their training never saw).

Interpolation policy. The weights' own interpolation (bicubic for most timm models) is what they were
evaluated with when *down*-scaling photos. Up-scaling a 64px image 3.5x with bicubic overshoots at
edges (ringing); bilinear does not, and measures better: Lite0 zero-shot on 1,000 mini val images,
straight resize to 224: bilinear 57.8%, bicubic 54.8% (PIL). So ``auto`` up-scales with bilinear.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from transferlab.options import Option

CROP_MODES = ("auto", "center", "none")
INTERPOLATIONS = ("auto", "bilinear", "bicubic", "nearest")

# How images become model inputs: the same three options for train and evaluate.
IMG_SIZE = Option("input resolution", lo=16, hi=1024, default_text="the one the weights were trained at", group="data")
CROP = Option(
    "auto: center-crop only images larger than the input; small images (64px Tiny ImageNet) are resized whole",
    choices=CROP_MODES,
    group="data",
)
INTERPOLATION = Option(
    "resize method; auto: the weights' own when down-scaling, bilinear when up-scaling small images (bicubic "
    "up-scaling rings and costs ~3 points on Tiny ImageNet)",
    choices=INTERPOLATIONS,
    group="data",
)

_PIL_INTERP = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
}


class EvalTransform:
    """Resize (and maybe center-crop) to ``size`` x ``size``, returning a uint8 CHW tensor.

    * ``none``: resize the whole image straight to ``size`` x ``size``;
    * ``center``: resize the shorter side to ``size / crop_pct``, then center-crop ``size``;
    * ``auto``: ``center`` when the shorter side is at least ``size / crop_pct``, else ``none``.

    ``interpolation`` is used when down-scaling; ``upsample`` when the image is smaller than ``size``
    (``auto``: bilinear, see the module docstring; otherwise the named method).
    """

    def __init__(
        self,
        size: int,
        interpolation: str = "bicubic",
        crop_pct: float = 0.875,
        crop: str = "auto",
        upsample: str = "auto",
    ) -> None:
        if crop not in CROP_MODES:
            raise ValueError(f"crop must be one of {CROP_MODES}, not {crop!r}")
        if interpolation not in _PIL_INTERP:
            raise ValueError(f"interpolation must be one of {sorted(_PIL_INTERP)}, not {interpolation!r}")
        if upsample not in INTERPOLATIONS:
            raise ValueError(f"upsample must be one of {INTERPOLATIONS}, not {upsample!r}")
        self.size = int(size)
        self.interpolation = interpolation
        self.upsample = "bilinear" if upsample == "auto" else upsample
        self.crop_pct = float(crop_pct)
        self.crop = crop

    @property
    def crop_threshold(self) -> int:
        """``auto`` center-crops sources whose shorter side is at least this (the pre-crop size)."""
        return round(self.size / self.crop_pct)

    def __repr__(self) -> str:
        return (
            f"EvalTransform(size={self.size}, interpolation={self.interpolation!r}, "
            f"upsample={self.upsample!r}, crop_pct={self.crop_pct}, crop={self.crop!r})"
        )

    def __call__(self, img: Image.Image) -> torch.Tensor:
        w, h = img.size
        resample = _PIL_INTERP[self.upsample if min(w, h) < self.size else self.interpolation]
        mode = self.crop
        if mode == "auto":
            mode = "center" if min(w, h) >= self.crop_threshold else "none"
        if mode == "none":
            if (w, h) != (self.size, self.size):
                img = img.resize((self.size, self.size), resample)
        else:
            short = round(self.size / self.crop_pct)
            scale = short / min(w, h)
            nw, nh = max(self.size, round(w * scale)), max(self.size, round(h * scale))
            if (nw, nh) != (w, h):
                img = img.resize((nw, nh), resample)
            left, top = (nw - self.size) // 2, (nh - self.size) // 2
            img = img.crop((left, top, left + self.size, top + self.size))
        arr = np.asarray(img, dtype=np.uint8)
        return torch.from_numpy(arr.copy()).permute(2, 0, 1)


def normalize_batch(
    x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...], *, channels_last: bool = False
) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float32 standardised with ``mean``/``std`` given in [0, 1] units."""
    m = torch.tensor(mean, dtype=torch.float32, device=x.device).view(1, 3, 1, 1) * 255.0
    s = torch.tensor(std, dtype=torch.float32, device=x.device).view(1, 3, 1, 1) * 255.0
    out = (x.float() - m) / s
    return out.contiguous(memory_format=torch.channels_last) if channels_last else out.contiguous()
