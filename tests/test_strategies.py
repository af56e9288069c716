"""Adaptation strategies and BatchNorm policies on tiny timm models: what trains, what moves, what does not."""

from __future__ import annotations

import logging

import pytest
import timm
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from transferlab.errors import ConfigError
from transferlab.models.heads import HeadSpec, LinearHead, TransferModel
from transferlab.models.strategies import (
    DEFAULT_BN,
    StrategySpec,
    apply_strategy,
    backbone_layer_ids,
    bn_modules,
    param_groups,
    set_train_mode,
    unfreeze,
)

ARCHS = ["test_resnet", "test_efficientnet"]  # plain BatchNorm2d and timm's BatchNormAct2d


pytestmark = pytest.mark.usefixtures("one_thread")


def make_model(arch: str = "test_resnet", head: str = "linear", num_classes: int = 5) -> TransferModel:
    torch.manual_seed(0)
    return TransferModel.from_backbone(timm.create_model(arch), HeadSpec.parse(head), num_classes)


def batch(n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, 32, 32, generator=g) * 2 + 0.5, torch.randint(0, 5, (n,), generator=g)


def trainable_names(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def bn_param_names(model: TransferModel) -> set[str]:
    bn_ids = {id(p) for m in model.modules() if isinstance(m, _BatchNorm) for p in m.parameters(recurse=False)}
    return {n for n, p in model.named_parameters() if id(p) in bn_ids}


def head_names(model: TransferModel) -> set[str]:
    return {n for n, _ in model.named_parameters() if n.startswith("head.")}


def all_names(model: nn.Module) -> set[str]:
    return {n for n, _ in model.named_parameters()}


# --------------------------------------------------------------------------------------------------
# StrategySpec


def test_defaults_resolved() -> None:
    for name, bn in DEFAULT_BN.items():
        assert StrategySpec(name).bn == bn
    assert StrategySpec("full") == StrategySpec("full", bn="train")
    fu = StrategySpec("freeze-unfreeze")
    assert (fu.unfreeze_epoch, fu.unfreeze_lr_scale) == (1, 0.1)
    assert StrategySpec("full", layer_decay=0.7).layer_decay == 0.7


@pytest.mark.parametrize(
    ("kwargs", "option"),
    [
        ({"name": "linear-prob"}, r"--strategy.*did you mean linear-probe"),
        ({"name": "full", "bn": "frozen"}, r"--bn 'frozen'.*did you mean frozen-stats"),
        ({"name": "linear-probe", "bn": "train"}, r"--bn train.*linear-probe"),
        ({"name": "linear-probe", "bn": "frozen-stats"}, r"--bn frozen-stats.*linear-probe"),
        ({"name": "bn-only", "bn": "eval"}, r"--bn eval.*bn-only"),
        ({"name": "scratch", "bn": "eval"}, r"--bn eval.*scratch"),
        ({"name": "full", "layer_decay": 0.0}, r"--layer-decay"),
        ({"name": "full", "layer_decay": 1.5}, r"--layer-decay"),
        ({"name": "bn-only", "layer_decay": 0.7}, r"--layer-decay applies only to --strategy full"),
        ({"name": "freeze-unfreeze", "unfreeze_epoch": 0}, r"--unfreeze-epoch"),
        ({"name": "freeze-unfreeze", "unfreeze_epoch": 1.5}, r"--unfreeze-epoch"),
        ({"name": "full", "unfreeze_epoch": 2}, r"--unfreeze-epoch applies only"),
        ({"name": "freeze-unfreeze", "unfreeze_lr_scale": 0}, r"--unfreeze-lr-scale"),
        ({"name": "scratch", "unfreeze_lr_scale": 0.1}, r"--unfreeze-lr-scale applies only"),
        ({"name": "linear-probe", "backbone_lr_scale": 0.1}, r"--backbone-lr-scale applies only"),
        ({"name": "freeze-unfreeze", "backbone_lr_scale": 0.1}, r"use --unfreeze-lr-scale"),
        ({"name": "bn-only", "backbone_lr_scale": 0}, r"--backbone-lr-scale must be"),
        ({"name": "full", "backbone_lr_scale": "x"}, r"--backbone-lr-scale must be"),
    ],
)
def test_invalid_specs_name_the_option(kwargs: dict, option: str) -> None:
    with pytest.raises(ConfigError, match=option):
        StrategySpec(**kwargs)


# --------------------------------------------------------------------------------------------------
# requires_grad patterns


@pytest.mark.parametrize("arch", ARCHS)
def test_linear_probe_trains_only_the_head(arch: str) -> None:
    model = make_model(arch)
    counts = apply_strategy(model, StrategySpec("linear-probe"))
    assert trainable_names(model) == head_names(model)
    assert counts["bn"] == counts["backbone"] == 0
    assert counts["head"] == counts["total"] == sum(p.numel() for p in model.head.parameters())


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("bn", ["train", "frozen-stats"])
def test_bn_only_trains_head_and_batchnorm_affine(arch: str, bn: str) -> None:
    model = make_model(arch)
    counts = apply_strategy(model, StrategySpec("bn-only", bn=bn))
    bn_names = bn_param_names(model)
    assert bn_names  # both archs have BN
    assert trainable_names(model) == head_names(model) | bn_names
    assert counts["backbone"] == 0 and counts["bn"] == sum(p.numel() for m in bn_modules(model) for p in m.parameters())
    assert counts["total"] == counts["head"] + counts["bn"]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", ["full", "scratch"])
def test_full_and_scratch_train_everything(arch: str, name: str) -> None:
    model = make_model(arch)
    counts = apply_strategy(model, StrategySpec(name))
    assert trainable_names(model) == all_names(model)
    assert counts["total"] == sum(p.numel() for p in model.parameters())


def test_full_with_bn_eval_fixes_batchnorm_only() -> None:
    model = make_model()
    counts = apply_strategy(model, StrategySpec("full", bn="eval"))
    assert trainable_names(model) == all_names(model) - bn_param_names(model)
    assert counts["bn"] == 0 and counts["backbone"] > 0


@pytest.mark.parametrize("arch", ARCHS)
def test_freeze_unfreeze(arch: str) -> None:
    model = make_model(arch)
    spec = StrategySpec("freeze-unfreeze", unfreeze_epoch=2, unfreeze_lr_scale=0.25)
    first = apply_strategy(model, spec)
    assert trainable_names(model) == head_names(model)
    assert [g["name"] for g in param_groups(model, spec, 0.1)] == ["head"]
    after = unfreeze(model, spec)
    assert trainable_names(model) == all_names(model)
    assert after["head"] == first["head"] and after["backbone"] > 0 and after["bn"] > 0
    lrs = {g["name"]: g["lr"] for g in param_groups(model, spec, 0.1)}
    assert lrs == pytest.approx({"backbone": 0.025, "bn": 0.025, "head": 0.1})


def test_unfreeze_only_for_freeze_unfreeze() -> None:
    with pytest.raises(ValueError, match="freeze-unfreeze"):
        unfreeze(make_model(), StrategySpec("full"))


def test_apply_strategy_logs_strategy_policy_and_counts(caplog: pytest.LogCaptureFixture) -> None:
    model = make_model()
    with caplog.at_level(logging.INFO, logger="transferlab.models.strategies"):
        counts = apply_strategy(model, StrategySpec("bn-only", bn="frozen-stats"))
    lines = [r.getMessage() for r in caplog.records if r.name == "transferlab.models.strategies"]
    assert len(lines) == 1
    assert "bn-only" in lines[0] and "frozen-stats" in lines[0] and f"total {counts['total']}" in lines[0]


class _NoBN(nn.Module):
    """A timm-contract backbone with no BatchNorm, so bn-only has nothing to train."""

    num_features = 4

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3)
        self.norm = nn.GroupNorm(2, 4)
        self.body = nn.Conv2d(4, 4, 3)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.norm(self.stem(x)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return x.mean((2, 3))


def test_bn_only_without_batchnorm_is_refused() -> None:
    model = TransferModel(_NoBN(), LinearHead(4, 2))
    with pytest.raises(ConfigError, match="no BatchNorm"):
        apply_strategy(model, StrategySpec("bn-only"))


# --------------------------------------------------------------------------------------------------
# BN policies, end to end: one forward in set_train_mode, one SGD step


POLICY_CASES = [  # (strategy, policy); each policy with a strategy that allows it
    ("bn-only", "train"),
    ("bn-only", "frozen-stats"),
    ("full", "train"),
    ("full", "frozen-stats"),
    ("full", "eval"),
    ("linear-probe", "eval"),
]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize(("strategy", "bn"), POLICY_CASES)
def test_bn_policy(arch: str, strategy: str, bn: str) -> None:
    model = make_model(arch)
    spec = StrategySpec(strategy, bn=bn)
    apply_strategy(model, spec)
    set_train_mode(model, spec)
    bns = bn_modules(model)
    assert model.training and model.head.training
    assert all(m.training == (bn == "train") for m in bns)
    for m in bns:
        assert all(p.requires_grad == (bn != "eval") for p in m.parameters(recurse=False))

    # timm zero-initialises the last BN of each residual branch, which zeroes the gradient of everything
    # earlier in that branch for the first step; start all scales at 1 so every BN weight gets a gradient.
    with torch.no_grad():
        for m in bns:
            m.weight.fill_(1.0)
    stats = [(m.running_mean.clone(), m.running_var.clone()) for m in bns]
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD(param_groups(model, spec, 0.5), lr=0.5)
    x, y = batch()
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()

    moved = [not torch.equal(m.running_mean, mean) for m, (mean, _) in zip(bns, stats, strict=True)]
    if bn == "train":
        assert all(moved)
    else:
        assert not any(moved)
        assert all(torch.equal(m.running_var, var) for m, (_, var) in zip(bns, stats, strict=True))

    after = dict(model.named_parameters())
    bn_names = bn_param_names(model)
    bn_weights_moved = [not torch.equal(after[n], weights[n]) for n in bn_names if n.endswith("weight")]
    assert all(bn_weights_moved) if bn != "eval" else not any(bn_weights_moved)
    assert all(not torch.equal(after[n], weights[n]) for n in head_names(model) if n.endswith("weight"))
    other = all_names(model) - bn_names - head_names(model)
    changed_other = {n for n in other if not torch.equal(after[n], weights[n])}
    if strategy in ("bn-only", "linear-probe"):
        assert not changed_other  # conv weights never move when only BN (or nothing) in the backbone trains
    else:
        assert changed_other


def test_set_train_mode_eval_policy_fixes_affine_even_if_reenabled() -> None:
    model = make_model()
    spec = StrategySpec("full", bn="eval")
    model.requires_grad_(True)  # e.g. a caller that skipped apply_strategy
    set_train_mode(model, spec)
    assert all(not p.requires_grad for m in bn_modules(model) for p in m.parameters())


# --------------------------------------------------------------------------------------------------
# parameter groups


@pytest.mark.parametrize("arch", ARCHS)
def test_layer_decay_groups(arch: str) -> None:
    model = make_model(arch, head="seed")
    spec = StrategySpec("full", layer_decay=0.5)
    apply_strategy(model, spec)
    groups = param_groups(model, spec, 1.0)
    assert groups[-1]["name"] == "head" and groups[-1]["lr"] == 1.0
    lrs = [g["lr"] for g in groups]
    assert lrs == sorted(lrs) and len(set(lrs)) == len(lrs)  # strictly smaller towards the stem
    assert lrs[-2] == pytest.approx(0.5)  # the layer just below the head
    ids, num = backbone_layer_ids(model.backbone)
    assert lrs[0] == pytest.approx(0.5**num)  # the stem
    assert num > 2
    seen = [id(p) for g in groups for p in g["params"]]
    assert len(seen) == len(set(seen))
    assert set(seen) == {id(p) for p in model.parameters() if p.requires_grad}
    # the stem really is the stem
    stem = {n for n, i in ids.items() if i == 0}
    assert stem and all(n.startswith(("conv1", "bn1", "conv_stem")) for n in stem)


def test_layer_decay_groups_skip_frozen_params() -> None:
    model = make_model()
    spec = StrategySpec("full", bn="eval", layer_decay=0.8)
    apply_strategy(model, spec)
    covered = {id(p) for g in param_groups(model, spec, 0.1) for p in g["params"]}
    assert covered == {id(p) for p in model.parameters() if p.requires_grad}
    assert not covered & {id(p) for m in bn_modules(model) for p in m.parameters()}


def test_layer_ids_fall_back_to_child_order_without_group_matcher() -> None:
    ids, num = backbone_layer_ids(_NoBN())
    assert num == 3
    assert ids["stem.weight"] == 0 and ids["norm.weight"] == 1 and ids["body.bias"] == 2


def test_plain_groups_cover_trainable_params_once() -> None:
    model = make_model()
    spec = StrategySpec("bn-only")
    apply_strategy(model, spec)
    groups = param_groups(model, spec, 0.01)
    assert {g["name"] for g in groups} == {"bn", "head"}
    assert all(g["lr"] == 0.01 for g in groups)
    seen = [id(p) for g in groups for p in g["params"]]
    assert sorted(seen) == sorted(id(p) for p in model.parameters() if p.requires_grad)


def test_backbone_lr_scale_sets_the_backbone_groups_only() -> None:
    model = make_model()
    spec = StrategySpec("bn-only", backbone_lr_scale=0.1)
    apply_strategy(model, spec)
    lrs = {g["name"]: (g["lr"], g["lr_scale"]) for g in param_groups(model, spec, 0.01)}
    assert lrs["bn"] == (pytest.approx(0.001), pytest.approx(0.1)) and lrs["head"] == (0.01, 1.0)
    assert "backbone lr x0.1" in str(spec)

    full = StrategySpec("full", layer_decay=0.5, backbone_lr_scale=0.1)
    apply_strategy(model, full)
    groups = param_groups(model, full, 1.0)
    assert groups[-1]["lr"] == 1.0 and groups[-2]["lr"] == pytest.approx(0.05)  # scale x the first decay


def test_param_groups_need_something_to_train() -> None:
    model = make_model()
    model.requires_grad_(False)
    with pytest.raises(ConfigError, match="apply_strategy"):
        param_groups(model, StrategySpec("full"), 0.1)
