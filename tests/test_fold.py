"""BatchNorm folding for inference copies: same outputs, original untouched, unsafe cases refused."""

from __future__ import annotations

import logging

import pytest
import timm
import torch
from torch import nn

from transferlab.models.fold import fold_batchnorm, inference_copy


def _randomize_bn(model: nn.Module) -> None:
    """Give every BatchNorm non-trivial statistics and affine params (fresh ones are an identity map)."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                if m.affine:
                    m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.2)


@pytest.mark.parametrize("name", ["test_resnet", "resnet18", "test_efficientnet"])
def test_folded_copy_computes_the_same_function(name: str) -> None:
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=7)
    _randomize_bn(model)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(3, 3, 64, 64)
    folded, n = fold_batchnorm(model, x[:2])
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert n == n_bn > 0  # every BatchNorm in these nets follows its own conv
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert model.training  # the caller's mode and weights are left as they were
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), atol=1e-4, rtol=1e-4)


class _ConvFeedsTwo(nn.Module):
    """conv -> BN and conv -> skip: folding the BN into the conv would change the skip branch."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.bn(y) + y


class _SharedConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.bn1 = nn.BatchNorm2d(3)
        self.bn2 = nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn1(self.conv(x)) + self.bn2(self.conv(x))


def test_a_conv_with_another_consumer_is_not_folded(caplog: pytest.LogCaptureFixture) -> None:
    model = _ConvFeedsTwo()
    _randomize_bn(model)
    with caplog.at_level(logging.WARNING, logger="transferlab.models.fold"):
        out, n = fold_batchnorm(model, torch.randn(2, 3, 8, 8))
    assert out is model and n == 0 and "unfolded" in caplog.text


def test_a_conv_run_twice_is_not_folded() -> None:
    model = _SharedConv()
    _randomize_bn(model)
    out, n = fold_batchnorm(model, torch.randn(2, 3, 8, 8))
    assert out is model and n == 0


def test_inference_copy_keeps_the_global_rng_untouched() -> None:
    model = timm.create_model("test_resnet", num_classes=3)
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    inference_copy(model, 32, torch.device("cpu"), channels_last=True)
    assert torch.equal(torch.rand(3), expected)  # exact resume depends on this stream


@pytest.mark.parametrize("size", [15, 16])
def test_tensorflow_same_padding_is_replaced_exactly(size: int) -> None:
    from timm.layers import create_conv2d

    conv = create_conv2d(3, 8, 5, stride=2, padding="same")
    assert type(conv).__name__ == "Conv2dSame"  # what tf_efficientnet_* use for their stride-2 convs
    model = nn.Sequential(conv, nn.BatchNorm2d(8), nn.ReLU6())
    _randomize_bn(model)
    x = torch.randn(2, 3, size, size).contiguous(memory_format=torch.channels_last)
    folded, n = fold_batchnorm(model, x)
    assert n == 2  # one BatchNorm folded, one padding replaced
    assert type(folded[0]).__name__ == "_SamePadConv"  # the conv's weights, a cheaper pad
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), atol=1e-5, rtol=1e-5)


def test_inference_streams_split_batches_without_changing_results() -> None:
    from transferlab.runtime import inference_streams

    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=5).eval()
    x = torch.randn(7, 3, 32, 32)

    def fwd(t: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return model(t)

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with inference_streams(torch.device("cpu")) as run:
            out = run(fwd, x)
            assert torch.get_num_threads() == 1  # two streams share the two threads
        assert torch.get_num_threads() == 2
        torch.testing.assert_close(out, fwd(x), atol=1e-5, rtol=1e-5)
        with inference_streams(torch.device("meta")) as run:  # not a CPU: a plain call
            assert run(lambda t: t * 2, torch.ones(3)).tolist() == [2.0, 2.0, 2.0]
    finally:
        torch.set_num_threads(before)
