"""Test-time augmentation.

Test-time augmentation (TTA) runs the model on several views of each (already resized) input and
averages the softmax probabilities; the result is returned as log mean probabilities, so every
consumer that applies a softmax (metrics, ensembles) sees the averaged distribution:

* ``none``: the input as it is (1 view);
* ``flip``: the input and its horizontal mirror (2 views);
* ``flip+crops``: those two plus the four corner crops and the center crop at 0.875 of the side, each
  resized back to the input size with bilinear interpolation (7 views).

Views are cut from the model-sized tensor rather than from the original image, so TTA costs no extra
decoding and behaves the same for a 64px and a 4000px source.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from transferlab.errors import ConfigError
from transferlab.options import Option

TTA_MODES = ("none", "flip", "flip+crops")
#: The --tta option of evaluate and predict.
TTA = Option(
    "test-time augmentation: average the softmax probabilities over views of each image; flip = the image and its "
    "mirror (2 passes), flip+crops = those plus 4 corner crops and the center crop at 0.875 of the side, resized "
    "back (7 passes); recorded as tta in metrics.json",
    choices=TTA_MODES,
)
#: Side of the ``flip+crops`` crops relative to the input (timm's usual eval crop_pct).
TTA_CROP_SCALE = 0.875


def tta_view_count(mode: str) -> int:
    """How many forward passes ``mode`` costs per image."""
    check_tta(mode)
    return {"none": 1, "flip": 2, "flip+crops": 7}[mode]


def check_tta(mode: str) -> None:
    """Raise a ConfigError naming the option for an unknown TTA mode."""
    if mode not in TTA_MODES:
        raise ConfigError(f"--tta must be one of {', '.join(TTA_MODES)}, not {mode!r}")


def tta_views(x: torch.Tensor, mode: str) -> Iterator[torch.Tensor]:
    """The views of a normalised (B, 3, H, W) batch that ``mode`` averages over (see the module docstring).

    Yielded one at a time so that memory stays that of one batch whatever the number of views.
    """
    check_tta(mode)
    yield x
    if mode == "none":
        return
    yield torch.flip(x, dims=[3])
    if mode == "flip":
        return
    h, w = x.shape[-2:]
    ch, cw = max(1, round(h * TTA_CROP_SCALE)), max(1, round(w * TTA_CROP_SCALE))
    channels_last = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    for top, left in ((0, 0), (0, w - cw), (h - ch, 0), (h - ch, w - cw), ((h - ch) // 2, (w - cw) // 2)):
        crop = x[..., top : top + ch, left : left + cw].float()
        v = F.interpolate(crop, size=(h, w), mode="bilinear", align_corners=False)
        yield v.contiguous(memory_format=torch.channels_last) if channels_last else v.contiguous()


def tta_log_probs(
    model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, mode: str, cols: torch.Tensor | None = None
) -> torch.Tensor:
    """log of the mean over ``mode``'s views of softmax(model(view)), over the output columns ``cols``.

    ``cols`` restricts the outputs *before* the softmax (zero-shot: the dataset's classes among
    ImageNet's 1,000), so each view's distribution is over the classes that are scored, as without TTA.
    """
    total: torch.Tensor | None = None
    n = 0
    for v in tta_views(x, mode):
        z = model(v).float()
        if cols is not None:
            z = z.index_select(1, cols)
        p = torch.softmax(z, dim=1)
        total = p if total is None else total + p
        n += 1
    assert total is not None
    return torch.log((total / n).clamp_min(torch.finfo(torch.float32).tiny))


def tta_forward(mode: str, cols: np.ndarray | None = None) -> Callable[[nn.Module, torch.Tensor], torch.Tensor]:
    """A ``forward(model, x)`` for :func:`transferlab.evaluation.predict_logits` that applies TTA.

    Its rows are log mean probabilities over ``cols`` (all outputs when None); a softmax of them gives
    back the averaged probabilities, so top-1, NLL and ensembles work on them unchanged.
    """
    check_tta(mode)

    def forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        c = None if cols is None else torch.as_tensor(np.asarray(cols), dtype=torch.long, device=x.device)
        return tta_log_probs(model, x, mode, c)

    forward.calls_model_only = True  # type: ignore[attr-defined]  # OpenVINO may run it around the converted model
    return forward
