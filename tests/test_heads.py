"""Heads, the TransferModel that joins them to a timm backbone, and the ImageNet warm start. Tiny models only."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from torch import nn

from transferlab.errors import ConfigError, DataError
from transferlab.labels import imagenet_indices
from transferlab.models.heads import (
    HeadSpec,
    LinearHead,
    SeedHead,
    TransferModel,
    build_head,
    get_classifier_copy,
    pre_logits_dim,
    warm_start_from_imagenet,
)

# Egyptian cat, tench, solar dish: real ImageNet-1k WordNet ids, deliberately out of index order.
WNIDS = ["n02124075", "n01443537", "n04067472"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _x(n: int = 4, size: int = 64) -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(n, 3, size, size)


# --------------------------------------------------------------------------------------------------
# HeadSpec


def test_headspec_defaults_are_the_seed_sizes() -> None:
    spec = HeadSpec.parse("seed")
    assert (spec.kind, spec.conv_channels, spec.hidden, spec.dropout) == ("seed", 32, 1024, 0.2)
    assert HeadSpec.parse("linear") == HeadSpec("linear")
    assert HeadSpec.parse(" seed: ") == HeadSpec("seed")


def test_headspec_overrides() -> None:
    spec = HeadSpec.parse("seed:conv=16,hidden=256,dropout=0.5")
    assert (spec.conv_channels, spec.hidden, spec.dropout) == (16, 256, 0.5)
    assert HeadSpec.parse("seed:conv_channels=8").conv_channels == 8
    assert HeadSpec.parse(str(spec)) == spec


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("seeed", r"--head.*did you mean seed"),
        ("liner", r"--head.*did you mean linear"),
        ("seed:hiden=5", r"'hiden'.*did you mean hidden"),
        ("seed:dropout=1.5", r"dropout.*\[0, 1\)"),
        ("seed:conv=0", r"conv_channels.*\[1, "),
        ("seed:hidden=big", r"hidden must be an integer"),
        ("seed:conv", r"needs a value"),
        ("seed:conv=8,conv_channels=9", r"given twice"),
        ("linear:conv=8", r"linear head takes no options"),
    ],
)
def test_headspec_parse_errors(text: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        HeadSpec.parse(text)


def test_headspec_validates_direct_construction() -> None:
    with pytest.raises(ConfigError, match="hidden"):
        HeadSpec("seed", hidden=-1)
    with pytest.raises(ConfigError, match="--head"):
        HeadSpec("mlp")  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------
# heads


def test_seed_head_structure_and_shape() -> None:
    head = SeedHead(96, 7)
    assert head.needs_feature_map is True
    assert isinstance(head.conv, nn.Conv2d)
    assert head.conv.kernel_size == (3, 3) and head.conv.padding == (1, 1)
    assert (head.conv.in_channels, head.conv.out_channels) == (96, 32)
    assert isinstance(head.drop, nn.Dropout) and head.drop.p == 0.2
    assert (head.fc1.in_features, head.fc1.out_features) == (32, 1024)
    assert (head.fc2.in_features, head.fc2.out_features) == (1024, 7)
    # the order the seed uses: conv (linear, Keras' default) -> pool -> dropout -> dense -> relu -> dense
    kinds = [type(m).__name__ for m in head.children()]
    assert kinds == ["Conv2d", "Identity", "AdaptiveAvgPool2d", "Dropout", "Linear", "ReLU", "Linear"]
    assert head(torch.randn(5, 96, 3, 3)).shape == (5, 7)
    # act=relu puts a ReLU after the convolution, and the spec string round-trips
    spec = HeadSpec.parse("seed:conv=8,act=relu")
    assert str(spec) == "seed:conv=8,hidden=1024,dropout=0.2,act=relu" and HeadSpec.parse(str(spec)) == spec
    assert str(HeadSpec.parse("seed")) == "seed:conv=32,hidden=1024,dropout=0.2"
    relu = SeedHead(96, 7, conv_channels=8, conv_act="relu")
    assert isinstance(relu.act1, nn.ReLU)
    with pytest.raises(ConfigError, match="act must be one of none, relu"):
        HeadSpec.parse("seed:act=tanh")


def test_seed_head_rejects_tokens() -> None:
    with pytest.raises(ConfigError, match="--head linear"):
        SeedHead(8, 2)(torch.randn(2, 5, 8))


def test_linear_head_on_pre_logits() -> None:
    head = LinearHead(96, 5)
    assert head.needs_feature_map is False
    assert head(torch.randn(3, 96)).shape == (3, 5)


def test_build_head_sizes_from_timm_contract() -> None:
    m = timm.create_model("test_resnet", num_classes=0)
    lin = build_head(HeadSpec("linear"), m, 10)
    seed = build_head(HeadSpec.parse("seed:conv=4,hidden=8,dropout=0"), m, 10)
    assert isinstance(lin, LinearHead) and lin.fc.in_features == m.num_features
    assert isinstance(seed, SeedHead) and seed.conv.in_channels == m.num_features
    assert (seed.conv.out_channels, seed.fc1.out_features, seed.drop.p) == (4, 8, 0.0)
    with pytest.raises(ConfigError, match="num_classes"):
        build_head(HeadSpec("linear"), m, 0)


def test_pre_logits_dim_prefers_head_hidden_size() -> None:
    # MobileNetV3-style: feature map has 8 channels, forward_head(pre_logits=True) gives 16
    stub = nn.Module()
    stub.num_features = 8  # type: ignore[assignment]
    stub.head_hidden_size = 16  # type: ignore[assignment]
    assert pre_logits_dim(stub) == 16
    assert build_head(HeadSpec("seed"), stub, 3).conv.in_channels == 8  # type: ignore[union-attr]
    with pytest.raises(ConfigError, match="timm"):
        pre_logits_dim(nn.Linear(2, 2))


# --------------------------------------------------------------------------------------------------
# TransferModel


@pytest.mark.parametrize("arch", ["test_resnet", "test_efficientnet"])
@pytest.mark.parametrize("head", ["linear", "seed"])
def test_transfer_model_forward_is_the_timm_composition(arch: str, head: str) -> None:
    torch.manual_seed(0)
    model = TransferModel.from_backbone(timm.create_model(arch), HeadSpec.parse(head), 6).eval()
    assert model.backbone.num_classes == 0  # classifier removed through reset_classifier
    x = _x()
    with torch.no_grad():
        f = model.backbone.forward_features(x)
        want = model.head(f) if head == "seed" else model.head(model.backbone.forward_head(f, pre_logits=True))
        got = model(x)
    assert got.shape == (4, 6)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_transfer_model_features_are_what_the_head_takes() -> None:
    model = TransferModel.from_backbone(timm.create_model("test_resnet"), HeadSpec("linear"), 3).eval()
    with torch.no_grad():
        assert model.features(_x(2)).shape == (2, model.backbone.num_features)


# --------------------------------------------------------------------------------------------------
# warm start


def test_get_classifier_copy() -> None:
    m = timm.create_model("test_resnet")
    old = get_classifier_copy(m)
    assert isinstance(old, nn.Linear) and old.out_features == 1000
    assert old.weight is not m.get_classifier().weight
    m.reset_classifier(0)
    assert get_classifier_copy(m) is None
    assert get_classifier_copy(timm.create_model("test_resnet", num_classes=10)) is None


def test_warm_start_reproduces_imagenet_logits() -> None:
    torch.manual_seed(0)
    original = timm.create_model("test_resnet").eval()
    x = _x()
    with torch.no_grad():
        want = original(x)[:, torch.as_tensor(imagenet_indices(WNIDS))]
    model = TransferModel.from_backbone(copy.deepcopy(original), HeadSpec("linear"), len(WNIDS), warm_start_ids=WNIDS)
    with torch.no_grad():
        got = model.eval()(x)
    torch.testing.assert_close(got, want)


def test_warm_start_by_hand_before_reset() -> None:
    original = timm.create_model("test_resnet").eval()
    m = copy.deepcopy(original)
    old = get_classifier_copy(m)
    m.reset_classifier(0)
    head = build_head(HeadSpec("linear"), m, len(WNIDS))
    assert isinstance(head, LinearHead) and old is not None
    warm_start_from_imagenet(head, old, WNIDS)
    rows = torch.as_tensor(imagenet_indices(WNIDS))
    assert torch.equal(head.fc.weight, original.fc.weight[rows])
    assert torch.equal(head.fc.bias, original.fc.bias[rows])


def test_warm_start_rejects_non_imagenet_classes() -> None:
    m = timm.create_model("test_resnet")
    with pytest.raises(DataError, match="not ImageNet-1k"):
        TransferModel.from_backbone(m, HeadSpec("linear"), 2, warm_start_ids=["n02124075", "cat"])


def test_warm_start_refuses_seed_head() -> None:
    m = timm.create_model("test_resnet")
    old = get_classifier_copy(m)
    assert old is not None
    with pytest.raises(ConfigError, match="only to --head linear"):
        warm_start_from_imagenet(SeedHead(m.num_features, 3), old, WNIDS)
    with pytest.raises(ConfigError, match="only to --head linear"):
        TransferModel.from_backbone(m, HeadSpec("seed"), 3, warm_start_ids=WNIDS)
    assert m.num_classes == 1000  # refused before the classifier was thrown away


def test_warm_start_needs_an_imagenet_classifier() -> None:
    m = timm.create_model("test_resnet", num_classes=10)
    with pytest.raises(ConfigError, match="ImageNet-1k linear classifier"):
        TransferModel.from_backbone(m, HeadSpec("linear"), 3, warm_start_ids=WNIDS)
    with pytest.raises(ConfigError, match="class ids"):
        warm_start_from_imagenet(LinearHead(96, 2), nn.Linear(96, 1000), WNIDS)
    with pytest.raises(ConfigError, match="same backbone"):
        warm_start_from_imagenet(LinearHead(96, 3), nn.Linear(64, 1000), WNIDS)
