"""Options are declared once, as config fields: the parsers, the validation and the allowed keys follow them.

These tests hold every command's parser against the dataclass it fills: each default, each choice list and
each range the command line shows must be the field's, and every option a config declares must be on the
command line. A flag added by hand that drifts from its field fails here.
"""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from transferlab.cli import build_parser
from transferlab.errors import ConfigError
from transferlab.options import Option, check_keys, field_option, help_text, option, parser_default
from transferlab.training.config import RunOptions, TrainConfig
from transferlab.training.probe import ProbeConfig


def _configs() -> dict[str, list[type]]:
    from transferlab.ensembles import EnsembleConfig
    from transferlab.evaluation import EvalConfig
    from transferlab.exports import ExportConfig
    from transferlab.planner import AutoConfig
    from transferlab.prediction import PredictConfig
    from transferlab.reports.render import ReportConfig

    return {
        "train": [TrainConfig, RunOptions],
        "evaluate": [EvalConfig],
        "predict": [PredictConfig],
        "ensemble": [EnsembleConfig],
        "export": [ExportConfig],
        "report": [ReportConfig],
        "auto": [AutoConfig],
    }


def _actions(command: str) -> dict[str, argparse.Action]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {a.dest: a for a in sub.choices[command]._actions}


#: Filled from a differently spelled flag: --progress auto/on/off becomes None/True/False.
CONVERTED = {"progress"}


def _cases() -> list[tuple[str, type, dataclasses.Field]]:
    return [(cmd, cls, f) for cmd, classes in _configs().items() for cls in classes for f in dataclasses.fields(cls)]


@pytest.mark.parametrize(("command", "cls", "f"), _cases(), ids=[f"{c}-{f.name}" for c, _, f in _cases()])
def test_every_parser_default_and_choice_is_the_fields(command: str, cls: type, f: dataclasses.Field) -> None:
    actions = _actions(command)
    opt = field_option(f)
    if f.name not in actions or f.name in CONVERTED:
        assert opt is None or not opt.cli, f"{cls.__name__}.{f.name} declares an option that `{command}` lacks"
        return
    action = actions[f.name]
    if opt is None:  # a plain field filled from the command line: at least the defaults must agree
        if f.default is not dataclasses.MISSING and action.default is not None:
            assert action.default == f.default or tuple(action.default) == f.default, f.name
        return
    assert action.default == parser_default(f, opt), f.name
    assert (tuple(action.choices) if action.choices is not None else None) == opt.choices, f.name
    assert action.help == help_text(opt, parser_default(f, opt)), f.name
    base = typing.get_type_hints(cls)[f.name]
    if base in (int, float, Path) or base in (int | None, float | None, Path | None):
        expected = next(t for t in (int, float, Path) if base in (t, t | None))
        assert action.type is expected, f.name


def test_every_range_and_choice_is_enforced_by_the_config() -> None:
    """For each bounded option of train: just outside the range fails naming the flag; the bound passes."""
    base = {"model": "m", "data": "d", "out": Path("o")}
    checked = 0
    for f in dataclasses.fields(TrainConfig):
        opt = field_option(f)
        if opt is None or f.name in ("layer_decay", "unfreeze_epoch", "unfreeze_lr_scale", "backbone_lr_scale"):
            continue  # the strategy options also depend on --strategy (tests/test_strategies.py)
        flag = "--" + f.name.replace("_", "-")
        if opt.choices is not None:
            with pytest.raises(ConfigError, match=f"^{flag} must be one of"):
                TrainConfig(**base, **{f.name: opt.choices[0] + "x"})
            checked += 1
        if opt.lo is not None and not opt.lo_open:
            is_int = typing.get_type_hints(TrainConfig)[f.name] in (int, int | None)
            below = opt.lo - 1 if is_int else opt.lo - abs(opt.lo) * 0.5 - 1e-3
            with pytest.raises(ConfigError, match=f"^{flag} must be between"):
                TrainConfig(**base, **{f.name: below})
            lo = int(opt.lo) if is_int else opt.lo
            try:
                TrainConfig(**base, **{f.name: lo})
            except ConfigError as e:  # a bound may still conflict with another option's default
                assert flag not in str(e).split(" must ")[0], e
            checked += 1
    assert checked > 30


def test_the_probe_shares_train_declarations() -> None:
    """ProbeConfig re-uses TrainConfig's fields, so a range cannot differ between the two paths."""
    train = {f.name: f for f in dataclasses.fields(TrainConfig)}
    for f in dataclasses.fields(ProbeConfig):
        assert field_option(f) == field_option(train[f.name]), f.name
        assert f.default == train[f.name].default, f.name
    with pytest.raises(ConfigError, match=r"^--lr must be between 1e-12 and 10, got 0"):
        ProbeConfig(lr=0)
    with pytest.raises(ConfigError, match=r"^--label-smoothing must be between 0 and 0.99, got 0.995"):
        ProbeConfig(label_smoothing=0.995)


def test_a_mistyped_key_names_the_closest_one_everywhere() -> None:
    @dataclasses.dataclass(frozen=True)
    class Demo:
        epochs: int = option(3, "epochs", lo=1, hi=9)
        batch_size: int = option(8, "batch")

    with pytest.raises(ConfigError, match=r"^where: unknown option 'epoch'; did you mean 'epochs'\?$"):
        check_keys(Demo, ["epochs", "epoch"], where="where", noun="option")
    with pytest.raises(ConfigError, match=r"^unknown key 'zzz'; the keys are batch_size, epochs$"):
        check_keys(Demo, ["zzz"])


def test_a_value_of_the_wrong_type_is_a_config_error_not_a_type_error() -> None:
    with pytest.raises(ConfigError, match=r"^--lr must be between 1e-12 and 10, got '0.1'"):
        TrainConfig(model="m", data="d", out=Path("o"), lr="0.1")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"^--epochs must be between 1 and 10000, got True"):
        TrainConfig(model="m", data="d", out=Path("o"), epochs=True)


def test_help_states_the_default_or_what_it_means() -> None:
    assert help_text(Option("images per step"), 256) == "images per step (default: 256)"
    assert help_text(Option("lr"), 1e-3) == "lr (default: 0.001)"
    assert help_text(Option("clip", default_text="off"), None) == "clip (default: off)"
    assert help_text(Option("flag"), False) == "flag"
    text = _actions("train")["lr"].help
    assert "(default: 0.001)" in text


def test_a_command_builds_only_its_own_options() -> None:
    """`transferlab report` must not pay for train's imports (torch) just to parse its arguments."""
    code = (
        "import sys\n"
        "from transferlab.cli import build_parser\n"
        "build_parser('report').parse_args(['report', 'x', '--out', 'y'])\n"
        "assert 'torch' not in sys.modules, 'building the report parser imported torch'\n"
        "build_parser('train').parse_args(['train', '--model', 'm', '--out', 'o'])\n"
        "assert 'torch' in sys.modules\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
