"""Inference copies of a model with each BatchNorm folded into the convolution that feeds it.

Why. In eval mode a BatchNorm is a fixed per-channel affine map, so ``BN(conv(x))`` equals one convolution
with rescaled weights and a bias. Left unfolded it is a separate pass over every activation, and on a CPU
those passes are memory-bound: EfficientNet-Lite0 at 224px with bf16 autocast runs at ~77 images/s with its
49 BatchNorms and ~95 without them on the 2-core dev machine. Folding is what inference runtimes (ONNX
Runtime, TensorRT, oneDNN graph) do first; here it is applied to the PyTorch model itself, so evaluation,
zero-shot, feature extraction and predict get it with no export step.

How pairs are found: one small forward pass with hooks records which convolution produced the exact
tensor a BatchNorm receives. That works for any timm architecture without per-model tables, and it never
guesses from module names. A convolution or BatchNorm that runs more than once per forward (shared
modules) is left alone. Because a convolution's output might also feed something other than its
BatchNorm (then folding would change that other consumer), the folded copy is checked against the
original on the same input and discarded if they differ; the original is then used unchanged.

The original model is never modified: training and checkpoints keep their BatchNorm layers.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from transferlab.models.cpu_kernels import pad_border, same_pads

log = logging.getLogger(__name__)


class _AfterFold(nn.Module):
    """What is left of a BatchNorm (with timm's fused dropout/activation) once its affine map moved into the conv."""

    def __init__(self, bn: nn.Module) -> None:
        super().__init__()
        self.drop = getattr(bn, "drop", nn.Identity())
        self.act = getattr(bn, "act", nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop(x)
        # The conv output feeds only this layer (the copy is checked against the original), so the
        # activation can overwrite it: no second activation-sized tensor per layer.
        if type(self.act) in (nn.ReLU6, nn.Hardtanh):
            return x.clamp_(self.act.min_val, self.act.max_val)
        if type(self.act) is nn.ReLU:
            return x.relu_()
        return self.act(x)


class _SamePadConv(nn.Module):
    """timm's ``Conv2dSame`` (TensorFlow "SAME" padding) with a cheaper pad, for inference copies.

    ``F.pad`` fills the whole padded tensor with zeros and then copies the input into it; on EfficientNet-Lite0
    at 224px those fills were 8% of an inference pass. Here only the one- or two-pixel border is zeroed.
    The result is identical.
    """

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.conv = conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.conv
        pads = same_pads(x.shape[-2], x.shape[-1], c.weight.shape[-2:], c.stride, c.dilation)  # type: ignore[arg-type]
        return F.conv2d(pad_border(x, pads), c.weight, c.bias, c.stride, 0, c.dilation, c.groups)


def _find_pairs(model: nn.Module, example: torch.Tensor) -> list[tuple[str, str]]:
    """(conv name, BatchNorm name) pairs where the BatchNorm's input is exactly that conv's output."""
    names = {m: n for n, m in model.named_modules()}
    produced: dict[int, tuple[nn.Module, torch.Tensor]] = {}
    calls: dict[nn.Module, int] = {}
    pairs: list[tuple[nn.Module, nn.Module]] = []
    hooks: list[Any] = []

    def after_conv(mod: nn.Module, _inp: Any, out: torch.Tensor) -> None:
        calls[mod] = calls.get(mod, 0) + 1
        produced[id(out)] = (mod, out)  # keep ``out`` alive so its id cannot be reused during the pass

    def before_bn(mod: nn.Module, inp: tuple[torch.Tensor, ...]) -> None:
        calls[mod] = calls.get(mod, 0) + 1
        src = produced.get(id(inp[0]))
        if src is not None and src[1] is inp[0]:
            pairs.append((src[0], mod))

    for m in model.modules():
        if isinstance(m, nn.Conv2d):  # subclasses too (timm's Conv2dSame uses self.weight/self.bias)
            hooks.append(m.register_forward_hook(after_conv))
        elif isinstance(m, nn.BatchNorm2d):
            hooks.append(m.register_forward_pre_hook(before_bn))
    try:
        with torch.inference_mode():
            model(example)
    finally:
        for h in hooks:
            h.remove()
    return [(names[c], names[b]) for c, b in pairs if calls[c] == 1 and calls[b] == 1]


@torch.no_grad()
def _fold(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    scale = bn.weight.float() if bn.affine else torch.ones_like(bn.running_var, dtype=torch.float32)
    scale = scale / torch.sqrt(bn.running_var.float() + bn.eps)
    shift = (bn.bias.float() if bn.affine else 0.0) - bn.running_mean.float() * scale
    bias = conv.bias.float() if conv.bias is not None else torch.zeros_like(shift)
    conv.weight.copy_((conv.weight.float() * scale.view(-1, 1, 1, 1)).to(conv.weight.dtype))
    conv.bias = nn.Parameter((bias * scale + shift).to(conv.weight.dtype), requires_grad=False)


def fold_batchnorm(model: nn.Module, example: torch.Tensor, *, atol: float = 1e-3) -> tuple[nn.Module, int]:
    """An eval-mode copy of ``model`` with Conv2d -> BatchNorm2d pairs folded, and how many were folded.

    ``example`` is one small input batch (shape and device as the model will see). The copy's output on it
    must match the original's to ``atol`` relative to the output scale, else ``(model, 0)`` is returned.
    BatchNorms without running statistics (``track_running_stats=False``) are skipped.
    """
    was_training = model.training
    model.eval()
    try:
        pairs = _find_pairs(model, example)
        folded = copy.deepcopy(model)
        n = 0
        for conv_name, bn_name in pairs:
            conv, bn = folded.get_submodule(conv_name), folded.get_submodule(bn_name)
            if bn.running_mean is None or bn.running_var is None:
                continue
            _fold(conv, bn)  # type: ignore[arg-type]
            folded.set_submodule(bn_name, _AfterFold(bn))
            n += 1
        for name, m in list(folded.named_modules()):
            if type(m).__name__ == "Conv2dSame" and isinstance(m, nn.Conv2d):
                folded.set_submodule(name, _SamePadConv(m))
                n += 1
        if n == 0:
            return model, 0
        with torch.inference_mode():
            ref, out = model(example).float(), folded(example).float()
        tol = atol * max(1.0, float(ref.abs().max()))
        if ref.shape != out.shape or not bool(((ref - out).abs() <= tol).all()):
            log.warning("folding BatchNorm changed %s's outputs; evaluating it unfolded", type(model).__name__)
            return model, 0
        return folded.eval(), n
    finally:
        model.train(was_training)


def inference_copy(model: nn.Module, size: int, device: torch.device, *, channels_last: bool = False) -> nn.Module:
    """``model`` with its BatchNorms folded (see :func:`fold_batchnorm`) for ``size`` x ``size`` inputs, logged.

    The check input comes from a private generator, so evaluating never draws from the global RNG streams
    that training and exact resume depend on.
    """
    gen = torch.Generator().manual_seed(0)
    example = torch.randn(2, 3, size, size, generator=gen).to(device)
    if channels_last:
        example = example.contiguous(memory_format=torch.channels_last)
    folded, n = fold_batchnorm(model, example)
    if n:
        log.debug("inference: folded %d BatchNorm layers into their convolutions", n)
    return folded
