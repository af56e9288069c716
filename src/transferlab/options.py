"""Options declared once: each is a typed dataclass field carrying its help, choices and range.

A command's configuration (``TrainConfig``, ``EvalConfig``, ...) is a frozen dataclass whose fields are
made with :func:`option`. From those fields alone come

* the validation every config runs on construction (:func:`check`: one sentence naming the flag, the
  allowed values or range, and the closest valid choice),
* the argparse options of the command (:func:`add_options`: type, choices, default and ``--help`` text),
* the keys a study spec or a Python caller may set, with the same "did you mean" hint for a typo
  (:func:`check_keys`).

So a range or a choice list lives in one place and the CLI, the library and the study spec cannot drift
apart. Options shared by several commands (``--precision``, ``--crop``, ...) are :class:`Option` objects
declared next to the code that interprets them and turned into fields with :meth:`Option.field`.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from transferlab.errors import ConfigError

__all__ = ["Option", "add_options", "check", "check_keys", "field_option", "flag_of", "option", "suggest"]

_KEY = "transferlab.option"
#: ``cli_default`` not given (None is a real command-line default).
_UNSET = object()


@dataclasses.dataclass(frozen=True)
class Option:
    """What a user needs to know about one option; the field's type and default come from the dataclass.

    ``lo``/``hi`` bound numbers (inclusive unless ``lo_open``/``hi_open``); ``default_text`` is what ``--help`` says
    the default is when the value itself says little (None: "the weights' own"); ``cli_default`` is the
    command line's default for a field the library requires (``--data`` names the mini dataset);
    ``cli=False`` keeps a field out of the parser (set by the program, or spelled differently there).
    """

    help: str
    choices: tuple[str, ...] | None = None
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    default_text: str | None = None
    group: str | None = None
    flag: str | None = None
    metavar: str | None = None
    nargs: str | None = None
    cli: bool = True
    cli_default: Any = _UNSET
    required: bool = False

    def field(self, default: Any = dataclasses.MISSING, **changes: Any) -> Any:
        """A dataclass field with this option's metadata (``changes`` override attributes, e.g. the help); without
        ``default`` the field is required."""
        opt = dataclasses.replace(self, **changes) if changes else self
        return dataclasses.field(default=default, metadata={_KEY: opt})


def option(default: Any = dataclasses.MISSING, help: str = "", **attrs: Any) -> Any:
    """A dataclass field declaring an option: ``lr: float = option(1e-3, "learning rate", lo=1e-12, hi=10)``."""
    return Option(help=help, **attrs).field(default)


def field_option(f: dataclasses.Field[Any]) -> Option | None:
    """The option a field declares, or None for a plain field."""
    return f.metadata.get(_KEY)


def inherit(cls: type, name: str, **changes: Any) -> Any:
    """A field with the same default and declaration as ``cls.name``: one config reusing another's option."""
    f = {x.name: x for x in dataclasses.fields(cls)}[name]
    opt = field_option(f)
    if opt is None:
        raise TypeError(f"{cls.__name__}.{name} does not declare an option")
    return opt.field(f.default, **changes)


def flag_of(name: str, opt: Option | None = None) -> str:
    """The command-line spelling of a field: ``batch_size`` -> ``--batch-size``."""
    if opt is not None and opt.flag:
        return opt.flag
    return "--" + name.replace("_", "-")


def suggest(word: str, allowed: Iterable[str]) -> str | None:
    """The closest allowed word to a mistyped one, or None."""
    close = difflib.get_close_matches(str(word), list(allowed), n=1)
    return close[0] if close else None


# --------------------------------------------------------------------------------------------------
# validation


def _is_number(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def _range_text(opt: Option) -> str:
    if (opt.lo_open or opt.hi_open) and opt.lo is not None and opt.hi is not None:
        return f"a number in {'(' if opt.lo_open else '['}{opt.lo:g}, {opt.hi:g}{')' if opt.hi_open else ']'}"
    if opt.lo_open:
        return f"> {opt.lo:g}"
    if opt.lo is not None and opt.hi is not None:
        return f"between {opt.lo:g} and {opt.hi:g}"
    if opt.lo is not None:
        return f">= {opt.lo:g}"
    return f"<= {opt.hi:g}"


def _in_range(opt: Option, value: float) -> bool:
    if opt.lo is not None and (value <= opt.lo if opt.lo_open else value < opt.lo):
        return False
    return opt.hi is None or (value < opt.hi if opt.hi_open else value <= opt.hi)


def check_value(name: str, opt: Option, value: Any) -> None:
    """Raise :class:`ConfigError` unless ``value`` is one of the option's choices and inside its range."""
    if value is None:
        return
    flag = flag_of(name, opt)
    if opt.choices is not None and value not in opt.choices:
        close = suggest(str(value), opt.choices)
        hint = f"; did you mean {close}?" if close else ""
        raise ConfigError(f"{flag} must be one of {', '.join(opt.choices)}, not {value!r}{hint}")
    if opt.lo is None and opt.hi is None:
        return
    if not _is_number(value):
        raise ConfigError(f"{flag} must be {_range_text(opt)}, got {value!r}")
    if not _in_range(opt, value):
        raise ConfigError(f"{flag} must be {_range_text(opt)}, got {value}")


def check(obj: Any, names: Iterable[str] | None = None) -> None:
    """Check every declared option of a dataclass instance (or only ``names``), in field order."""
    wanted = None if names is None else set(names)
    for f in dataclasses.fields(obj):
        opt = field_option(f)
        if opt is not None and (wanted is None or f.name in wanted):
            check_value(f.name, opt, getattr(obj, f.name))


def unknown_key(
    key: str, allowed: Sequence[str], *, where: str = "", noun: str = "key", listing: str = "the keys are"
) -> ConfigError:
    """The error for a key that is not an option: the closest valid one, else the whole list."""
    close = suggest(key, allowed)
    hint = f"did you mean {close!r}?" if close else f"{listing} {', '.join(sorted(allowed))}"
    prefix = f"{where}: " if where else ""
    return ConfigError(f"{prefix}unknown {noun} {key!r}; {hint}")


def check_keys(
    cls: type | Sequence[str],
    keys: Iterable[str],
    *,
    where: str = "",
    noun: str = "key",
    listing: str = "the keys are",
) -> None:
    """Refuse the first key that is not a field of ``cls`` (or not in the given names)."""
    allowed = [f.name for f in dataclasses.fields(cls)] if isinstance(cls, type) else list(cls)
    for k in keys:
        if k not in allowed:
            raise unknown_key(str(k), allowed, where=where, noun=noun, listing=listing)


# --------------------------------------------------------------------------------------------------
# argparse


def _base_type(hint: Any) -> Any:
    """``int | None`` -> int; ``Path`` -> Path; ``tuple[str, ...]`` -> str."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return _base_type(args[0]) if len(args) == 1 else str
    origin = typing.get_origin(hint)
    if origin in (tuple, list):
        return _base_type(typing.get_args(hint)[0])
    return hint


def _fmt_default(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def help_text(opt: Option, default: Any) -> str:
    """The ``--help`` line: the declared text and what the default is."""
    if opt.default_text is not None:
        return f"{opt.help} (default: {opt.default_text})"
    if default is None or default is False or opt.required:
        return opt.help
    return f"{opt.help} (default: {_fmt_default(default)})"


def parser_default(f: dataclasses.Field[Any], opt: Option) -> Any:
    """The argparse default of a field: ``cli_default``, else the field's default, else None."""
    if opt.cli_default is not _UNSET:
        return opt.cli_default
    if f.default is not dataclasses.MISSING:
        return f.default
    return None


def _argument(name: str, f: dataclasses.Field[Any], opt: Option, hint: Any) -> tuple[list[str], dict[str, Any]]:
    default = parser_default(f, opt)
    kw: dict[str, Any] = {"help": help_text(opt, default), "default": default}
    base = _base_type(hint)
    if base is bool and opt.nargs is None:
        kw["action"] = "store_true"
    else:
        if base in (int, float, Path):
            kw["type"] = base
        if opt.choices is not None:
            kw["choices"] = opt.choices
        if opt.metavar is not None:
            kw["metavar"] = opt.metavar
        if opt.nargs is not None:
            kw["nargs"] = opt.nargs
    flag = flag_of(name, opt)
    if not flag.startswith("-"):  # a positional argument: its name is its dest
        if opt.nargs is None:
            del kw["default"]  # argparse requires it; a default would never apply
        return [flag], kw
    kw["dest"] = name
    if opt.required:
        kw["required"] = True
    return [flag], kw


def declared(cls: type) -> list[tuple[dataclasses.Field[Any], Option]]:
    """The fields of ``cls`` that declare an option, in field order."""
    return [(f, o) for f in dataclasses.fields(cls) if (o := field_option(f)) is not None]


def add_options(
    parser: argparse.ArgumentParser,
    cls: type,
    *,
    only: Sequence[str] | None = None,
    exclude: Iterable[str] = (),
    groups: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Add the options of ``cls`` to ``parser`` (in field order, or in the order of ``only``).

    An option with a ``group`` goes into that argument group (created on first use, or taken from
    ``groups``); returns the groups so the caller can add its own options to them.
    """
    hints = typing.get_type_hints(cls)
    by_name = {f.name: (f, o) for f, o in declared(cls)}
    names = list(only) if only is not None else list(by_name)
    skip = set(exclude)
    made: dict[str, Any] = dict(groups or {})
    for name in names:
        if name in skip:
            continue
        if name not in by_name:
            raise KeyError(f"{cls.__name__} declares no option {name!r}")
        f, opt = by_name[name]
        if not opt.cli:
            continue
        target: Any = parser
        if opt.group is not None:
            if opt.group not in made:
                made[opt.group] = parser.add_argument_group(opt.group)
            target = made[opt.group]
        flags, kw = _argument(name, f, opt, hints[name])
        target.add_argument(*flags, **kw)
    return made
