"""Optimisers, schedules, early stopping and clipping: hand-computed values, not re-derivations of the code."""

from __future__ import annotations

import json
import math

import pytest
import torch

from transferlab.errors import ConfigError
from transferlab.training.optim import (
    EarlyStopping,
    ScheduleSpec,
    build_optimizer,
    clip_gradients,
    lr_factor,
    no_decay_groups,
    set_lr,
)

# 0.5 * (1 + cos(0.9 * pi)), computed by hand: cos(0.9 pi) = -0.9510565163
COS_AT_0_9 = 0.0244717418


# --- lr_factor -----------------------------------------------------------------------------------------------


def test_constant_with_warmup() -> None:
    spec = ScheduleSpec("constant", warmup_steps=4)
    assert [lr_factor(s, 100, spec) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert lr_factor(99, 100, spec) == 1.0
    assert lr_factor(0, 100, ScheduleSpec("constant")) == 1.0


def test_cosine_without_warmup() -> None:
    spec = ScheduleSpec("cosine")
    assert lr_factor(0, 10, spec) == pytest.approx(1.0)
    assert lr_factor(5, 10, spec) == pytest.approx(0.5)
    assert lr_factor(9, 10, spec) == pytest.approx(COS_AT_0_9)  # last step: just above the floor
    assert lr_factor(10, 10, spec) == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(25, 10, spec) == pytest.approx(0.0, abs=1e-12)  # past the end: stays at the floor


def test_cosine_with_warmup_and_floor() -> None:
    spec = ScheduleSpec("cosine", warmup_steps=2, min_lr_ratio=0.1)
    assert lr_factor(0, 12, spec) == 0.5
    assert lr_factor(1, 12, spec) == 1.0  # last warmup step reaches the full rate
    assert lr_factor(2, 12, spec) == pytest.approx(1.0)  # cosine starts at 1: no dip at the boundary
    assert lr_factor(7, 12, spec) == pytest.approx(0.1 + 0.9 * 0.5)  # half way through the 10 decay steps
    assert lr_factor(11, 12, spec) == pytest.approx(0.1 + 0.9 * COS_AT_0_9)
    assert lr_factor(12, 12, spec) == pytest.approx(0.1)
    # Monotone after warmup.
    values = [lr_factor(s, 12, spec) for s in range(2, 13)]
    assert values == sorted(values, reverse=True)


def test_cosine_when_warmup_covers_the_run() -> None:
    spec = ScheduleSpec("cosine", warmup_steps=10, min_lr_ratio=0.2)
    assert lr_factor(9, 5, spec) == 1.0
    assert lr_factor(10, 5, spec) == pytest.approx(0.2)


def test_step_decay_boundaries() -> None:
    spec = ScheduleSpec("step", warmup_steps=2, step_size=3, gamma=0.1)
    got = [lr_factor(s, 100, spec) for s in range(12)]
    want = [0.5, 1.0, 1.0, 1.0, 1.0, 0.1, 0.1, 0.1, 0.01, 0.01, 0.01, 0.001]
    assert got == pytest.approx(want)


def test_negative_step_is_a_bug() -> None:
    with pytest.raises(ValueError):
        lr_factor(-1, 10, ScheduleSpec("constant"))


@pytest.mark.parametrize(
    ("kwargs", "option"),
    [
        ({"name": "linear"}, "--schedule"),
        ({"name": "cosine", "warmup_steps": -1}, "--warmup"),
        ({"name": "step"}, "--step-size"),
        ({"name": "step", "step_size": 0}, "--step-size"),
        ({"name": "step", "step_size": 5, "gamma": 0.0}, "--gamma"),
        ({"name": "step", "step_size": 5, "gamma": 1.5}, "--gamma"),
        ({"name": "cosine", "min_lr_ratio": -0.1}, "--min-lr-ratio"),
        ({"name": "cosine", "min_lr_ratio": 1.5}, "--min-lr-ratio"),
    ],
)
def test_invalid_schedule_names_the_option(kwargs: dict, option: str) -> None:
    with pytest.raises(ConfigError, match=option):
        ScheduleSpec(**kwargs)


# --- build_optimizer / set_lr / no_decay_groups --------------------------------------------------------------


def _two_groups() -> list[dict]:
    return [
        {"params": [torch.nn.Parameter(torch.zeros(3))]},
        {"params": [torch.nn.Parameter(torch.zeros(2))], "lr_scale": 0.1, "weight_decay": 0.0},
    ]


def test_build_rmsprop_uses_keras_defaults() -> None:
    opt = build_optimizer(_two_groups(), "rmsprop", lr=1e-3, weight_decay=1e-4)
    assert type(opt) is torch.optim.RMSprop
    g0, g1 = opt.param_groups
    assert g0["alpha"] == 0.9 and g0["eps"] == 1e-7 and g0["momentum"] == 0
    assert g0["lr"] == pytest.approx(1e-3) and g0["lr_scale"] == 1.0 and g0["weight_decay"] == 1e-4
    assert g1["lr"] == pytest.approx(1e-4) and g1["lr_scale"] == 0.1 and g1["weight_decay"] == 0.0


def test_build_adamw_and_sgd() -> None:
    adamw = build_optimizer(_two_groups(), "adamw", lr=1e-3, weight_decay=0.05)
    assert type(adamw) is torch.optim.AdamW
    assert adamw.param_groups[0]["betas"] == (0.9, 0.999) and adamw.param_groups[0]["eps"] == 1e-8
    assert adamw.param_groups[0]["weight_decay"] == 0.05 and adamw.param_groups[1]["weight_decay"] == 0.0

    sgd = build_optimizer(_two_groups(), "sgd", lr=0.1, momentum=0.8)
    assert type(sgd) is torch.optim.SGD
    assert sgd.param_groups[0]["nesterov"] is True and sgd.param_groups[0]["momentum"] == 0.8
    assert [g["lr"] for g in sgd.param_groups] == pytest.approx([0.1, 0.01])
    # Nesterov needs momentum, so momentum 0 is plain SGD rather than a torch error.
    assert build_optimizer(_two_groups(), "sgd", lr=0.1, momentum=0.0).param_groups[0]["nesterov"] is False


def test_build_does_not_modify_the_groups() -> None:
    groups = _two_groups()
    build_optimizer(groups, "adamw", lr=1e-3)
    assert "lr" not in groups[0] and "lr_scale" not in groups[0]


@pytest.mark.parametrize(
    ("kwargs", "option"),
    [
        ({"name": "adam", "lr": 1e-3}, "--optimizer.*rmsprop, adamw, sgd"),
        ({"name": "adamw", "lr": 0.0}, "--lr"),
        ({"name": "adamw", "lr": 1e-3, "weight_decay": -1.0}, "--weight-decay"),
        ({"name": "sgd", "lr": 1e-3, "momentum": 1.0}, "--momentum"),
    ],
)
def test_build_invalid_names_the_option(kwargs: dict, option: str) -> None:
    with pytest.raises(ConfigError, match=option):
        build_optimizer(_two_groups(), **kwargs)


def test_build_with_no_groups() -> None:
    with pytest.raises(ConfigError, match="frozen"):
        build_optimizer([], "adamw", lr=1e-3)


def test_set_lr_keeps_group_ratios_and_does_not_compound() -> None:
    opt = build_optimizer(_two_groups(), "sgd", lr=0.01)
    set_lr(opt, 0.5)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.005, 0.0005])
    set_lr(opt, 0.5)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.005, 0.0005])
    set_lr(opt, 1.0)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.01, 0.001])
    assert [g["initial_lr"] for g in opt.param_groups] == pytest.approx([0.01, 0.001])


@pytest.mark.parametrize(("name", "lr"), [("rmsprop", 0.05), ("adamw", 0.05), ("sgd", 0.02)])
def test_each_optimizer_minimises_a_quadratic(name: str, lr: float) -> None:
    x = torch.nn.Parameter(torch.tensor([3.0, -2.0]))
    target = torch.tensor([1.0, 1.0])
    opt = build_optimizer([{"params": [x]}], name, lr=lr)
    start = float(((x.detach() - target) ** 2).sum())
    for _ in range(50):
        opt.zero_grad()
        loss = ((x - target) ** 2).sum()
        loss.backward()
        opt.step()
    assert float(((x.detach() - target) ** 2).sum()) < 0.1 * start


def test_no_decay_groups_split() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3), torch.nn.Linear(3, 2))
    model[2].bias.requires_grad_(False)  # frozen parameters are left out
    groups = no_decay_groups(model.named_parameters(), weight_decay=0.01, lr_scale=0.5)
    decay, no_decay = groups
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    assert decay["lr_scale"] == no_decay["lr_scale"] == 0.5
    assert {id(p) for p in decay["params"]} == {id(model[0].weight), id(model[2].weight)}
    assert {id(p) for p in no_decay["params"]} == {id(model[0].bias), id(model[1].weight), id(model[1].bias)}
    opt = build_optimizer(groups, "adamw", lr=1e-3, weight_decay=0.01)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.01, 0.0]


def test_no_decay_groups_drops_empty_group() -> None:
    groups = no_decay_groups([("w", torch.nn.Parameter(torch.zeros(2, 2)))], weight_decay=0.1)
    assert len(groups) == 1 and groups[0]["weight_decay"] == 0.1


# --- EarlyStopping ---------------------------------------------------------------------------------------------


def test_early_stopping_min_with_patience() -> None:
    es = EarlyStopping("val_loss", patience=2)
    assert es.mode == "min"
    improved, stop = [], []
    for epoch, v in enumerate([1.0, 0.8, 0.9, 0.7, 0.75, 0.8, 0.6]):
        improved.append(es.update(v, epoch))
        stop.append(es.should_stop)
    assert improved == [True, True, False, True, False, False, True]
    assert stop == [False, False, False, False, False, True, False]
    assert es.best == 0.6 and es.best_epoch == 6


def test_early_stopping_max_auto_and_ties() -> None:
    es = EarlyStopping("val_acc", patience=1)
    assert es.mode == "max"
    assert es.update(0.5, 0) is True
    assert es.update(0.5, 1) is False  # a tie is not an improvement
    assert es.should_stop
    assert es.update(0.7, 2) is True and not es.should_stop
    assert (es.best, es.best_epoch) == (0.7, 2)


def test_early_stopping_min_delta_and_explicit_mode() -> None:
    es = EarlyStopping("val_loss", mode="max", min_delta=0.1)
    assert es.update(1.0, 0) is True
    assert es.update(1.05, 1) is False  # inside min_delta
    assert es.update(1.2, 2) is True
    assert not es.should_stop  # patience None never stops


def test_early_stopping_nan_is_never_an_improvement() -> None:
    es = EarlyStopping("val_loss", patience=2)
    assert es.update(float("nan"), 0) is False
    assert es.best is None and es.best_epoch is None
    assert es.update(1.0, 1) is True
    assert es.update(float("nan"), 2) is False
    assert es.update(float("nan"), 3) is False
    assert es.should_stop and es.best == 1.0


def test_early_stopping_state_round_trip_continues_identically() -> None:
    values = [1.0, 0.9, 0.95, float("nan"), 0.85, 0.86, 0.87, 0.88, 0.7]
    ref = EarlyStopping("val_loss", patience=3)
    for epoch, v in enumerate(values[:4]):
        ref.update(v, epoch)
    resumed = EarlyStopping("val_loss", patience=3)
    resumed.load_state_dict(json.loads(json.dumps(ref.state_dict(), allow_nan=False)))
    for epoch, v in enumerate(values[4:], start=4):
        assert resumed.update(v, epoch) == ref.update(v, epoch)
        assert resumed.should_stop == ref.should_stop
        assert resumed.state_dict() == ref.state_dict()
    assert ref.best_epoch == 8


def test_early_stopping_refuses_other_metric_state() -> None:
    state = EarlyStopping("val_loss").state_dict()
    with pytest.raises(ConfigError, match="val_acc"):
        EarlyStopping("val_acc").load_state_dict(state)


@pytest.mark.parametrize(
    ("kwargs", "option"),
    [({"patience": 0}, "--patience"), ({"min_delta": -0.1}, "--min-delta"), ({"mode": "up"}, "mode")],
)
def test_early_stopping_invalid(kwargs: dict, option: str) -> None:
    with pytest.raises(ConfigError, match=option):
        EarlyStopping(**kwargs)


# --- clip_gradients --------------------------------------------------------------------------------------------


def test_clip_gradients() -> None:
    a, b = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    a.grad, b.grad = torch.tensor([3.0]), torch.tensor([4.0])
    assert clip_gradients([a, b], None) is None
    assert a.grad.item() == 3.0  # disabled: untouched
    assert clip_gradients([a, b], 1.0) == pytest.approx(5.0)  # the norm before clipping
    assert math.hypot(a.grad.item(), b.grad.item()) == pytest.approx(1.0, rel=1e-5)
    with pytest.raises(ConfigError):
        clip_gradients([a, b], 0.0)
