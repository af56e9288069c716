"""Training on a CPU in bf16: strided depthwise convolutions get an fp32 backward pass.

Why. On CPUs without AMX, oneDNN's bf16 kernel for the input gradient of a *strided* depthwise convolution
is 4-60x slower than its fp32 kernel (dev machine, batch 64, channels_last: 134 vs 31 ms for Lite0's first
stride-2 layer at 128px, 65 vs 1 ms for its last). EfficientNet and MobileNet downsample with exactly
these layers, and in a BatchNorm-only step their four backward passes took a third of the step. The
forward pass in bf16 is fast, and stride-1 depthwise layers are as fast in bf16 as in fp32, so only the
backward of the strided ones changes.

What changes numerically. Nothing in the forward pass: the layer computes the bf16 convolution autocast
would. The backward pass is the exact gradient of that bf16 forward (bf16-rounded weights and inputs,
widened to fp32), computed in fp32 and rounded once to bf16 (tests/test_cpu_kernels.py checks this with
torch.equal). On the dev machine oneDNN's stock bf16 kernels return the same values bit for bit, since they
also accumulate in fp32: the swap changes the speed, not the numbers.

The same context also swaps ``nn.ReLU6`` for a version whose backward reads its output instead of a clone
of its input (the stock in-place op keeps one): identical values and gradients, one activation-sized copy
less per layer (about 7% of the same step).

How. :func:`cpu_training_kernels` swaps each eligible layer in place for a :class:`FastStridedDepthwise`
that shares the original's parameters (same objects, same state-dict keys, so checkpoints, optimizers and
DDP see no difference) and puts the originals back on exit. It does nothing on other devices or precisions.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def same_pads(
    ih: int, iw: int, kernel: tuple[int, int], stride: tuple[int, int], dilation: tuple[int, int]
) -> tuple[int, int, int, int]:
    """(left, right, top, bottom) zero padding of TensorFlow's "SAME" rule, as timm's ``Conv2dSame`` pads."""
    (kh, kw), (sh, sw), (dh, dw) = kernel, stride, dilation
    ph = max((math.ceil(ih / sh) - 1) * sh + (kh - 1) * dh + 1 - ih, 0)
    pw = max((math.ceil(iw / sw) - 1) * sw + (kw - 1) * dw + 1 - iw, 0)
    return pw // 2, pw - pw // 2, ph // 2, ph - ph // 2


def pad_border(x: torch.Tensor, pads: tuple[int, int, int, int]) -> torch.Tensor:
    """``F.pad(x, pads)`` with zeros, writing only the border (F.pad zero-fills the whole new tensor first).

    Keeps channels_last inputs channels_last. Not differentiable: callers handle the gradient themselves.
    """
    left, right, top, bottom = pads
    if not any(pads):
        return x
    n, c, ih, iw = x.shape
    fmt = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
    out = torch.empty((n, c, ih + top + bottom, iw + left + right), dtype=x.dtype, device=x.device, memory_format=fmt)
    out[:, :, :top].zero_()
    out[:, :, top + ih :].zero_()
    out[:, :, top : top + ih, :left].zero_()
    out[:, :, top : top + ih, left + iw :].zero_()
    out[:, :, top : top + ih, left : left + iw].copy_(x)
    return out


class _DepthwiseFp32Backward(torch.autograd.Function):
    """Depthwise conv of ``x`` padded by ``pads``: forward in the inputs' dtype, backward in fp32."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        pads: tuple[int, int, int, int],
        stride: tuple[int, int],
        dilation: tuple[int, int],
    ) -> torch.Tensor:
        xp = pad_border(x, pads)
        groups = weight.shape[0]
        ctx.pads, ctx.stride, ctx.dilation, ctx.groups = pads, stride, dilation, groups
        ctx.x_shape, ctx.x_dtype, ctx.w_dtype = x.shape, x.dtype, weight.dtype
        ctx.padded_hw = xp.shape[-2:]
        ctx.has_bias = bias is not None
        # The input is kept only when the weight trains (full fine-tuning); BatchNorm-only runs keep nothing
        # but the weight.
        ctx.save_for_backward(weight, xp if weight.requires_grad else None)
        return F.conv2d(xp, weight, bias, stride, 0, dilation, groups)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        weight, xp = ctx.saved_tensors
        g = grad.float()
        w = weight.float()
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            (kh, kw), (sh, sw), (dh, dw) = w.shape[-2:], ctx.stride, ctx.dilation
            ph, pw = ctx.padded_hw
            oh, ow = g.shape[-2:]
            extra = (ph - ((oh - 1) * sh + (kh - 1) * dh + 1), pw - ((ow - 1) * sw + (kw - 1) * dw + 1))
            gxp = F.conv_transpose2d(g, w, None, ctx.stride, 0, extra, ctx.groups, ctx.dilation)
            left, _, top, _ = ctx.pads
            ih, iw = ctx.x_shape[-2:]
            gx = gxp[:, :, top : top + ih, left : left + iw].to(ctx.x_dtype)
        if ctx.needs_input_grad[1] or (ctx.has_bias and ctx.needs_input_grad[2]):
            _, gw, gb = torch.ops.aten.convolution_backward(
                g,
                xp.float(),
                w,
                [w.shape[0]] if ctx.has_bias else None,
                list(ctx.stride),
                [0, 0],
                list(ctx.dilation),
                False,
                [0, 0],
                ctx.groups,
                [False, bool(ctx.needs_input_grad[1]), bool(ctx.has_bias and ctx.needs_input_grad[2])],
            )
            gw = gw.to(ctx.w_dtype) if gw is not None else None
            gb = gb.to(ctx.w_dtype) if gb is not None else None
        return gx, gw, gb, None, None, None


class FastStridedDepthwise(nn.Conv2d):
    """A stride > 1 depthwise ``nn.Conv2d`` (or timm ``Conv2dSame``) whose bf16 backward runs in fp32 on CPU.

    Built by :meth:`adopt`, never directly: it shares the adopted layer's parameters and attributes. Outside
    CPU bf16 autocast with gradients on, it is the plain convolution (with a border-only SAME pad).
    """

    same: bool = False

    @classmethod
    def adopt(cls, conv: nn.Conv2d) -> FastStridedDepthwise:
        """A layer computing what ``conv`` computes, sharing its parameter objects."""
        new = cls.__new__(cls)
        new.__dict__.update(conv.__dict__)  # the same _parameters dict: one set of tensors for both
        new.same = type(conv).__name__ == "Conv2dSame"
        return new

    def _pads(self, x: torch.Tensor) -> tuple[int, int, int, int]:
        if self.same:
            return same_pads(x.shape[-2], x.shape[-1], self.kernel_size, self.stride, self.dilation)  # type: ignore[arg-type]
        ph, pw = self.padding  # type: ignore[misc]
        return pw, pw, ph, ph

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = self._pads(x)
        if (
            x.device.type == "cpu"
            and torch.is_grad_enabled()
            and torch.is_autocast_enabled("cpu")
            and torch.get_autocast_dtype("cpu") == torch.bfloat16
        ):
            bf = torch.bfloat16
            bias = self.bias.to(bf) if self.bias is not None else None
            with torch.autocast("cpu", enabled=False):
                return _DepthwiseFp32Backward.apply(
                    x.to(bf), self.weight.to(bf), bias, pads, self.stride, self.dilation
                )
        xp = pad_border(x, pads) if not torch.is_grad_enabled() else F.pad(x, pads)
        return F.conv2d(xp, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class _ReLU6Fn(torch.autograd.Function):
    """ReLU6 whose backward reads its output: ``0 < y < 6`` is the same mask as ``0 < x < 6``.

    The stock in-place ``hardtanh_`` keeps a clone of its input for the backward pass, an extra read and
    write of every activation (about 5% of a Lite0 BatchNorm-only step) and an extra activation-sized
    tensor held until backward. The output is held anyway by whatever reads it next.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, inplace: bool) -> torch.Tensor:  # type: ignore[override]
        if inplace:
            ctx.mark_dirty(x)
            y = x.clamp_(0.0, 6.0)
        else:
            y = x.clamp(0.0, 6.0)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        (y,) = ctx.saved_tensors
        return torch.ops.aten.hardtanh_backward(grad, y, 0.0, 6.0), None


class FastReLU6(nn.ReLU6):
    """``nn.ReLU6`` computing the same values; with gradients on, its backward keeps the output, not a clone."""

    @classmethod
    def adopt(cls, act: nn.ReLU6) -> FastReLU6:
        """A ReLU6 like ``act`` (same ``inplace``)."""
        return cls(inplace=act.inplace)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled() or not x.requires_grad:
            return super().forward(x)
        return _ReLU6Fn.apply(x, self.inplace)


def _replacement(m: nn.Module) -> nn.Module | None:
    if type(m) is nn.ReLU6:
        return FastReLU6.adopt(m)
    if _eligible(m):
        return FastStridedDepthwise.adopt(m)  # type: ignore[arg-type]
    return None


def _eligible(m: nn.Module) -> bool:
    if not isinstance(m, nn.Conv2d) or isinstance(m, FastStridedDepthwise):
        return False
    if type(m) is not nn.Conv2d and type(m).__name__ != "Conv2dSame":
        return False  # other subclasses may change forward in ways this layer would not reproduce
    padding_ok = m.padding_mode == "zeros" and not isinstance(m.padding, str)
    depthwise = m.groups > 1 and m.groups == m.in_channels == m.out_channels
    return depthwise and padding_ok and m.stride != (1, 1)


@contextlib.contextmanager
def cpu_training_kernels(model: nn.Module, dtype: torch.dtype | None, device: torch.device) -> Iterator[dict[str, int]]:
    """Within the block, ``model``'s strided depthwise convolutions use :class:`FastStridedDepthwise` and
    its ``nn.ReLU6`` layers :class:`FastReLU6`.

    Applies only to CPU training under bf16 autocast (``dtype`` is the autocast dtype, None for fp32);
    yields how many layers of each kind were swapped (empty when none). The original layers are put back
    on exit, holding whatever the shared parameters were trained to.
    """
    if device.type != "cpu" or dtype != torch.bfloat16:
        yield {}
        return
    swapped = []
    for name, m in list(model.named_modules()):
        new = _replacement(m) if name else None
        if new is not None:
            model.set_submodule(name, new)
            swapped.append((name, m))
    counts: dict[str, int] = {}
    for name, _ in swapped:
        kind = type(model.get_submodule(name)).__name__
        counts[kind] = counts.get(kind, 0) + 1
    try:
        yield counts
    finally:
        for name, m in swapped:
            model.set_submodule(name, m)
