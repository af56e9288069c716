"""CPU bf16 training kernels: strided depthwise convolutions with an fp32 backward (models/cpu_kernels.py)."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.layers import Conv2dSame
from torch import nn

from transferlab.models.cpu_kernels import FastReLU6, FastStridedDepthwise, cpu_training_kernels

CPU = torch.device("cpu")
CL = torch.channels_last


def _layer(kind: str, channels: int, k: int) -> nn.Conv2d:
    torch.manual_seed(0)
    if kind == "same":
        return Conv2dSame(channels, channels, k, stride=2, groups=channels, bias=True)
    return nn.Conv2d(channels, channels, k, stride=2, padding=k // 2, groups=channels, bias=True)


@pytest.mark.parametrize(("kind", "k", "size"), [("same", 3, 16), ("same", 5, 15), ("same", 5, 8), ("padded", 3, 17)])
def test_forward_is_the_bf16_convolution_and_backward_the_exact_gradient(kind: str, k: int, size: int) -> None:
    conv = _layer(kind, 24, k)
    fast = FastStridedDepthwise.adopt(conv)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 24, size, size, generator=g).contiguous(memory_format=CL)

    def run(layer: nn.Module) -> tuple[torch.Tensor, ...]:
        layer.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(xi)
        y.backward(torch.linspace(-1, 1, y.numel()).view_as(y).to(y.dtype))
        return y, xi.grad, layer.weight.grad, layer.bias.grad

    y_ref, *_ = run(conv)
    y, gx, gw, gb = run(fast)
    assert y.dtype == torch.bfloat16 and torch.equal(y, y_ref)  # forward unchanged, bit for bit

    # Reference: fp32 autograd through the same bf16-rounded numbers the forward used.
    xr = x.bfloat16().float().requires_grad_(True)
    wr = conv.weight.detach().bfloat16().float().requires_grad_(True)
    br = conv.bias.detach().bfloat16().float().requires_grad_(True)
    pads = (0, 0, 0, 0)
    if kind == "same":
        from transferlab.models.cpu_kernels import same_pads

        pads = same_pads(size, size, (k, k), (2, 2), (1, 1))
        yr = F.conv2d(F.pad(xr, pads), wr, br, 2, 0, 1, 24)
    else:
        yr = F.conv2d(xr, wr, br, 2, k // 2, 1, 24)
    yr.backward(torch.linspace(-1, 1, yr.numel()).view_as(yr).bfloat16().float())
    assert gx.shape == x.shape and gx.dtype == x.dtype  # through the bf16 cast, back to the leaf's dtype
    # The fp32 gradient rounded once to bf16, exactly: bf16 has 8 significant bits, so any rounding of a partial
    # sum on the way (a bf16 accumulation) shows up as a different value. torch.equal, not a tolerance.
    for got, ref in ((gx, xr.grad), (gw, wr.grad), (gb, br.grad)):
        assert torch.equal(got.float(), ref.bfloat16().float())
    # The comparison can tell the two apart: the bias gradient summed position by position in bf16 is not equal.
    go = torch.linspace(-1, 1, yr.numel()).view_as(yr).bfloat16()
    acc = torch.zeros(24, dtype=torch.bfloat16)
    for row in go.permute(0, 2, 3, 1).reshape(-1, 24):
        acc = acc + row
    assert not torch.equal(acc.float(), br.grad.bfloat16().float())


def test_outside_bf16_autocast_it_is_the_plain_convolution() -> None:
    conv = _layer("same", 8, 5)
    fast = FastStridedDepthwise.adopt(conv)
    x = torch.randn(2, 8, 11, 11)
    torch.testing.assert_close(fast(x), conv(x), rtol=0, atol=0)
    with torch.inference_mode():
        torch.testing.assert_close(fast(x), conv(x), rtol=0, atol=0)


def test_context_swaps_shares_parameters_and_restores() -> None:
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=5)
    keys = list(model.state_dict())
    before = {n: p for n, p in model.named_parameters()}
    relu6 = sum(type(m) is nn.ReLU6 for m in model.modules())
    with cpu_training_kernels(model, torch.bfloat16, CPU) as n:
        # Lite0 downsamples with four stride-2 depthwise layers; every BatchNormAct2d has a ReLU6
        assert n == {"FastStridedDepthwise": 4, "FastReLU6": relu6} and relu6 > 20
        assert isinstance(model.blocks[1][0].conv_dw, FastStridedDepthwise)
        assert list(model.state_dict()) == keys
        assert all(p is before[name] for name, p in model.named_parameters())
        # a step changes the shared tensors
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(torch.randn(2, 3, 64, 64)).float().logsumexp(1).mean()
        loss.backward()
        w = model.blocks[1][0].conv_dw.weight.detach().clone()
        opt.step()
    assert type(model.blocks[1][0].conv_dw) is Conv2dSame
    assert sum(type(m) is nn.ReLU6 for m in model.modules()) == relu6
    assert not torch.equal(model.blocks[1][0].conv_dw.weight, w)  # the restored layer holds the trained values
    with cpu_training_kernels(model, None, CPU) as n32:
        assert n32 == {}
    with cpu_training_kernels(model, torch.bfloat16, torch.device("meta")) as n_other:
        assert n_other == {}


def test_bn_only_steps_match_without_the_swap() -> None:
    """Same losses step by step (bf16 tolerance) with and without the fp32 backward on a bn-only model."""
    from transferlab.models.heads import HeadSpec, TransferModel
    from transferlab.models.strategies import StrategySpec, apply_strategy

    losses: dict[bool, list[float]] = {}
    for swap in (False, True):
        torch.manual_seed(0)
        body = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0)
        model = TransferModel.from_backbone(body, HeadSpec.parse("linear"), 5)
        apply_strategy(model, StrategySpec("bn-only", bn="train"))
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        g = torch.Generator().manual_seed(0)
        x, y = torch.randn(8, 3, 64, 64, generator=g), torch.randint(0, 5, (8,), generator=g)
        with cpu_training_kernels(model, torch.bfloat16 if swap else None, CPU):
            out = []
            for _ in range(4):
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    loss = F.cross_entropy(model(x).float(), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
                out.append(loss.item())
        losses[swap] = out
    assert losses[True][-1] < losses[True][0]
    assert losses[True] == pytest.approx(losses[False], rel=0.05)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("inplace", [True, False])
def test_relu6_same_values_and_gradients_without_a_clone(dtype: torch.dtype, inplace: bool) -> None:
    """Values at, below, between and above the clip points, through a BatchNorm as in timm's BatchNormAct2d."""
    base = torch.tensor([-1.0, 0.0, 0.5, 3.0, 6.0, 7.5]).repeat(2, 4, 3, 1).to(dtype)

    def run(act: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        x = base.clone().requires_grad_(True)
        h = x * 1.0  # a non-leaf, as a BatchNorm output is: in-place on it is allowed
        y = act(h)
        y.backward(torch.arange(y.numel(), dtype=dtype).view_as(y))
        return y.detach(), x.grad

    y_ref, g_ref = run(nn.ReLU6(inplace=inplace))
    y, g = run(FastReLU6(inplace=inplace))
    assert torch.equal(y, y_ref) and torch.equal(g, g_ref)
    assert g[..., 0].eq(0).all() and g[..., 1].eq(0).all() and g[..., 4].eq(0).all() and g[..., 2].ne(0).all()

    # The clone the stock op makes is gone: the profiler sees none.
    from torch.profiler import ProfilerActivity, profile

    x = base.clone().requires_grad_(True)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        FastReLU6(inplace=inplace)(x * 1.0)
    assert not any(e.name == "aten::clone" for e in prof.events())
