"""The optional files a planner leaves in a study folder: ``plan.json`` and ``labels.json``.

``transferlab auto`` writes them beside ``members/`` and ``ensembles/``; the report only reads them.
They are extras, not results: a study is complete without them, and a report must never fail
because one of them is damaged (a planner killed mid-write, a hand edit, a newer format). So every
reader here returns None for a file that is absent, and for one that is unreadable or incomplete it
logs a warning that names the file and the first problem found, and returns None too; the report
then leaves that section out.

Validation is strict about what a section needs (a candidate without a name, a point without its
accuracy, an accuracy outside [0, 1]) and lenient about what it can do without (a null cost, a
missing note): a half-valid table would be worse than none, but a missing detail is shown as a dash.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

__all__ = [
    "LABELS_FILE",
    "PLAN_FILE",
    "PLAN_STATUSES",
    "LabelCurve",
    "LabelFit",
    "LabelPoint",
    "Plan",
    "PlanCandidate",
    "read_labels",
    "read_plan",
]

PLAN_FILE = "plan.json"
LABELS_FILE = "labels.json"
PLAN_STATUSES = ("chosen", "ran", "dropped", "skipped", "failed")
#: The only fitted form the report knows how to draw; another form still gets its sentence, not its curve.
POWER_LAW = "err = a * n^-b + c"


class _Damaged(ValueError):
    """What is wrong with a file, in words for the log."""


@dataclass(frozen=True)
class PlanCandidate:
    """One candidate the planner considered, with what it predicted and what happened."""

    name: str
    status: str
    model: str | None = None
    img_size: int | None = None
    kind: str | None = None
    predicted_s: float | None = None
    actual_s: float | None = None
    holdout_top1: float | None = None
    why: str = ""


@dataclass(frozen=True)
class Plan:
    """``plan.json``: the budget, the planner's prediction, what it took, and every candidate."""

    candidates: tuple[PlanCandidate, ...]
    budget_s: float | None = None
    predicted_s: float | None = None
    actual_s: float | None = None
    cpu: str | None = None
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class LabelPoint:
    """Top-1 (with its interval) when training on ``per_class`` labels per class."""

    per_class: float
    top1: float
    lo: float | None = None
    hi: float | None = None
    fraction: float | None = None


@dataclass(frozen=True)
class LabelFit:
    """The curve fitted through the points, and the gain it predicts from doubling the labels."""

    form: str
    a: float
    b: float
    c: float
    doubling_gain: float | None = None
    doubling_lo: float | None = None
    doubling_hi: float | None = None
    at_per_class: float | None = None

    @property
    def drawable(self) -> bool:
        """Whether ``form`` is the power law :meth:`top1` evaluates (spacing aside)."""
        return _squash(self.form) == _squash(POWER_LAW)

    def top1(self, n: Any) -> Any:
        """Top-1 the fit predicts at ``n`` labels per class (a float or a numpy array)."""
        return 1.0 - (self.a * n ** (-self.b) + self.c)


@dataclass(frozen=True)
class LabelCurve:
    """``labels.json``: how top-1 of one member grew with the number of labels."""

    points: tuple[LabelPoint, ...]
    member: str | None = None
    model: str | None = None
    split: str | None = None
    fit: LabelFit | None = None


def _squash(s: str) -> str:
    return re.sub(r"\s+", "", s)


# --------------------------------------------------------------------------------------------------
# Field readers: each raises _Damaged naming the field, so the log says what to look at.


def _load(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _Damaged(f"cannot read it as JSON ({e})") from e
    if not isinstance(doc, dict):
        raise _Damaged(f"expected a JSON object, found {type(doc).__name__}")
    return doc


def _num(d: dict[str, Any], key: str, where: str, *, lo: float | None = None, hi: float | None = None) -> float | None:
    """``d[key]`` as a finite float within [lo, hi], None when absent or null."""
    x = d.get(key)
    if x is None:
        return None
    if isinstance(x, bool) or not isinstance(x, int | float) or not math.isfinite(x):
        raise _Damaged(f"{where}: {key} is {x!r}, not a finite number")
    if (lo is not None and x < lo) or (hi is not None and x > hi):
        raise _Damaged(f"{where}: {key} = {x} is outside [{lo}, {hi}]")
    return float(x)


def _need_num(d: dict[str, Any], key: str, where: str, **bounds: float) -> float:
    x = _num(d, key, where, **bounds)
    if x is None:
        raise _Damaged(f"{where}: {key} is missing")
    return x


def _str(d: dict[str, Any], key: str, where: str) -> str | None:
    x = d.get(key)
    if x is None:
        return None
    if not isinstance(x, str):
        raise _Damaged(f"{where}: {key} is {x!r}, not a string")
    return x


def _need_str(d: dict[str, Any], key: str, where: str) -> str:
    x = _str(d, key, where)
    if not x or not x.strip():
        raise _Damaged(f"{where}: {key} is missing or empty")
    return x


def _objects(d: dict[str, Any], key: str, where: str) -> list[dict[str, Any]]:
    """``d[key]`` as a non-empty list of objects."""
    xs = d.get(key)
    if not isinstance(xs, list) or not xs:
        raise _Damaged(f"{where}: {key} is missing or not a non-empty list")
    for i, x in enumerate(xs):
        if not isinstance(x, dict):
            raise _Damaged(f"{where}: {key}[{i}] is {x!r}, not an object")
    return xs


def _read(path: Path, parse: Any) -> Any:
    """``parse(doc)`` for the JSON object in ``path``; None when the file is absent or damaged (then warned)."""
    try:
        doc = _load(path)
        return None if doc is None else parse(doc)
    except _Damaged as e:
        log.warning("%s: %s; the report leaves its section out", path, e)
        return None


# --------------------------------------------------------------------------------------------------
# plan.json


def _candidate(c: dict[str, Any], i: int) -> PlanCandidate:
    where = f"candidates[{i}]"
    size = _num(c, "img_size", where, lo=1)
    if size is not None and size != int(size):
        raise _Damaged(f"{where}: img_size = {size} is not a whole number of pixels")
    status = _need_str(c, "status", where)
    if status not in PLAN_STATUSES:
        # A newer planner may add a status: shown as written rather than dropping the table.
        log.warning("plan.json %s: unknown status %r (known: %s)", where, status, ", ".join(PLAN_STATUSES))
    return PlanCandidate(
        name=_need_str(c, "name", where),
        status=status,
        model=_str(c, "model", where),
        img_size=None if size is None else int(size),
        kind=_str(c, "kind", where),
        predicted_s=_num(c, "predicted_s", where, lo=0),
        actual_s=_num(c, "actual_s", where, lo=0),
        holdout_top1=_num(c, "holdout_top1", where, lo=0, hi=1),
        why=_str(c, "why", where) or "",
    )


def _plan(doc: dict[str, Any]) -> Plan:
    notes = doc.get("notes") or []
    if not isinstance(notes, list) or not all(isinstance(n, str) for n in notes):
        raise _Damaged("notes is not a list of strings")
    return Plan(
        candidates=tuple(_candidate(c, i) for i, c in enumerate(_objects(doc, "candidates", "plan"))),
        budget_s=_num(doc, "budget_s", "plan", lo=0),
        predicted_s=_num(doc, "predicted_s", "plan", lo=0),
        actual_s=_num(doc, "actual_s", "plan", lo=0),
        cpu=_str(doc, "cpu", "plan"),
        notes=tuple(notes),
    )


def read_plan(folder: Path) -> Plan | None:
    """``folder/plan.json``, or None when it is absent or damaged (a warning says which)."""
    result: Plan | None = _read(Path(folder) / PLAN_FILE, _plan)
    return result


# --------------------------------------------------------------------------------------------------
# labels.json


def _point(p: dict[str, Any], i: int) -> LabelPoint:
    where = f"points[{i}]"
    pt = LabelPoint(
        per_class=_need_num(p, "per_class", where, lo=1e-9),
        top1=_need_num(p, "top1", where, lo=0, hi=1),
        lo=_num(p, "lo", where, lo=0, hi=1),
        hi=_num(p, "hi", where, lo=0, hi=1),
        fraction=_num(p, "fraction", where, lo=0, hi=1),
    )
    if pt.lo is not None and pt.hi is not None and not pt.lo <= pt.top1 <= pt.hi:
        raise _Damaged(f"{where}: the interval [{pt.lo}, {pt.hi}] does not hold top1 = {pt.top1}")
    return pt


def _fit(doc: dict[str, Any]) -> LabelFit | None:
    f = doc.get("fit")
    if f is None:
        return None
    if not isinstance(f, dict):
        raise _Damaged(f"fit is {f!r}, not an object")
    return LabelFit(
        form=_need_str(f, "form", "fit"),
        a=_need_num(f, "a", "fit"),
        b=_need_num(f, "b", "fit"),
        c=_need_num(f, "c", "fit"),
        doubling_gain=_num(f, "doubling_gain", "fit", lo=-1, hi=1),
        doubling_lo=_num(f, "doubling_lo", "fit", lo=-1, hi=1),
        doubling_hi=_num(f, "doubling_hi", "fit", lo=-1, hi=1),
        at_per_class=_num(f, "at_per_class", "fit", lo=1e-9),
    )


def _labels(doc: dict[str, Any]) -> LabelCurve:
    points = tuple(sorted((_point(p, i) for i, p in enumerate(_objects(doc, "points", "labels"))), key=_by_n))
    return LabelCurve(
        points=points,
        member=_str(doc, "member", "labels"),
        model=_str(doc, "model", "labels"),
        split=_str(doc, "split", "labels"),
        fit=_fit(doc),
    )


def _by_n(p: LabelPoint) -> float:
    return p.per_class


def read_labels(folder: Path) -> LabelCurve | None:
    """``folder/labels.json``, or None when it is absent or damaged (a warning says which)."""
    result: LabelCurve | None = _read(Path(folder) / LABELS_FILE, _labels)
    return result
