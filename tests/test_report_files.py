"""The planner's files in a study folder (plan.json, labels.json): read when present, never a crash when not."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest

from transferlab.reports.study_files import LabelCurve, LabelFit, LabelPoint, read_labels, read_plan

FIXTURES = Path(__file__).parent / "fixtures" / "report"


def _write(folder: Path, name: str, doc: Any) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(doc if isinstance(doc, str) else json.dumps(doc), encoding="utf-8")
    return folder


def _fixture(name: str) -> dict[str, Any]:
    return json.loads((FIXTURES / name).read_text(encoding="utf-8"))


def test_absent_files_are_no_section_and_no_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        assert read_plan(tmp_path) is None and read_labels(tmp_path) is None
    assert caplog.records == []


def test_plan_is_read_with_nulls_kept_as_unknown(tmp_path: Path) -> None:
    plan = read_plan(_write(tmp_path, "plan.json", _fixture("plan.json")))
    assert plan is not None
    assert (plan.budget_s, plan.predicted_s, plan.actual_s, plan.cpu) == (1200.0, 1100.0, 1150.0, "AMD EPYC 7B13")
    assert [c.status for c in plan.candidates] == ["chosen", "chosen", "ran", "dropped", "skipped", "failed"]
    first, dropped = plan.candidates[0], plan.candidates[3]
    assert (first.name, first.model, first.img_size, first.kind) == (
        "lite0-224-lbfgs",
        "tf_efficientnet_lite0",
        224,
        "probe",
    )
    assert (first.predicted_s, first.actual_s, first.holdout_top1) == (95.0, 101.2, 0.705)
    assert dropped.actual_s is None and dropped.holdout_top1 is None and dropped.why
    assert len(plan.notes) == 2


def test_labels_are_read_sorted_with_their_fit(tmp_path: Path) -> None:
    doc = _fixture("labels.json")
    doc["points"].reverse()  # the file's order does not matter; the curve is drawn along n
    curve = read_labels(_write(tmp_path, "labels.json", doc))
    assert curve is not None and (curve.member, curve.model, curve.split) == (
        "lite0-224-lbfgs",
        "tf_efficientnet_lite0",
        "val",
    )
    assert [p.per_class for p in curve.points] == [10, 25, 50, 100]
    fit = curve.fit
    assert fit is not None and fit.drawable and fit.at_per_class == 100
    assert fit.top1(200.0) - fit.top1(100.0) == pytest.approx(fit.doubling_gain, abs=5e-4)  # the fixture agrees
    assert fit.top1(100.0) == pytest.approx(curve.points[-1].top1, abs=1e-3)


def test_labels_without_a_fit_keep_their_points(tmp_path: Path) -> None:
    doc = _fixture("labels.json")
    del doc["fit"]
    curve = read_labels(_write(tmp_path, "labels.json", doc))
    assert curve is not None and curve.fit is None and len(curve.points) == 4


def test_an_unknown_fit_form_is_read_but_not_drawn(tmp_path: Path) -> None:
    doc = _fixture("labels.json")
    doc["fit"]["form"] = "acc = a + b * log(n)"
    curve = read_labels(_write(tmp_path, "labels.json", doc))
    assert curve is not None and curve.fit is not None and not curve.fit.drawable


def _broken_plans() -> list[tuple[Any, str]]:
    good = _fixture("plan.json")

    def edit(fn: Any) -> dict[str, Any]:
        doc = json.loads(json.dumps(good))
        fn(doc)
        return doc

    return [
        ('{"budget_s": 1200, "candidates": [{"name": "a", "sta', "cannot read it as JSON"),
        ("[1, 2]", "expected a JSON object, found list"),
        (edit(lambda d: d.pop("candidates")), "candidates is missing"),
        (edit(lambda d: d.update(candidates=[])), "not a non-empty list"),
        (edit(lambda d: d["candidates"].append("lite2")), "candidates[6] is 'lite2', not an object"),
        (edit(lambda d: d["candidates"][0].pop("name")), "candidates[0]: name is missing"),
        (edit(lambda d: d["candidates"][2].pop("status")), "candidates[2]: status is missing"),
        (edit(lambda d: d["candidates"][1].update(predicted_s="fast")), "predicted_s is 'fast', not a finite number"),
        (edit(lambda d: d["candidates"][1].update(img_size=22.5)), "img_size = 22.5 is not a whole number"),
        (edit(lambda d: d.update(budget_s=-5)), "budget_s = -5 is outside"),
        (edit(lambda d: d.update(notes="none")), "notes is not a list of strings"),
    ]


@pytest.mark.parametrize(("doc", "why"), _broken_plans())
def test_a_damaged_plan_is_skipped_with_a_warning(
    doc: Any, why: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = _write(tmp_path, "plan.json", doc)
    with caplog.at_level(logging.WARNING):
        assert read_plan(folder) is None
    [record] = [r for r in caplog.records if r.levelname == "WARNING"]
    assert str(folder / "plan.json") in record.getMessage() and why in record.getMessage()


def _broken_labels() -> list[tuple[Any, str]]:
    good = _fixture("labels.json")

    def edit(fn: Any) -> dict[str, Any]:
        doc = json.loads(json.dumps(good))
        fn(doc)
        return doc

    return [
        ((FIXTURES / "labels-truncated.json").read_text(), "cannot read it as JSON"),
        (_fixture("labels-partial.json"), "points[2]: top1 is missing"),
        (edit(lambda d: d["points"][0].update(top1=1.5)), "top1 = 1.5 is outside [0, 1]"),
        (edit(lambda d: d["points"][1].update(per_class=0)), "per_class = 0 is outside"),
        (edit(lambda d: d["points"][1].update(lo=0.7)), "does not hold top1"),
        (edit(lambda d: d["points"][3].update(top1=float("nan"))), "top1 is nan, not a finite number"),
        (edit(lambda d: d.update(fit=[1, 2])), "fit is [1, 2], not an object"),
        (edit(lambda d: d["fit"].pop("b")), "fit: b is missing"),
        (edit(lambda d: d["fit"].update(doubling_gain=True)), "doubling_gain is True, not a finite number"),
    ]


@pytest.mark.parametrize(("doc", "why"), _broken_labels())
def test_damaged_labels_are_skipped_with_a_warning(
    doc: Any, why: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = _write(tmp_path, "labels.json", doc)
    with caplog.at_level(logging.WARNING):
        assert read_labels(folder) is None
    [record] = [r for r in caplog.records if r.levelname == "WARNING"]
    assert str(folder / "labels.json") in record.getMessage() and why in record.getMessage()


def test_an_unknown_status_is_shown_as_written_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    doc = _fixture("plan.json")
    doc["candidates"][2]["status"] = "timed-out"
    with caplog.at_level(logging.WARNING):
        plan = read_plan(_write(tmp_path, "plan.json", doc))
    assert plan is not None and plan.candidates[2].status == "timed-out"
    assert any("unknown status 'timed-out'" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    ("fit", "expected"),
    [
        (
            LabelFit("err = a * n^-b + c", 1, 0.5, 0.2, 0.021, 0.015, 0.027, 100),
            "Doubling the labels (100 → 200 per class) should add about +2.1 pt top-1 (1.5 to 2.7).",
        ),
        (
            LabelFit("err = a * n^-b + c", 1, 0.5, 0.2, 0.004, -0.003, 0.011, 50),
            "Doubling the labels (50 → 100 per class) should add about +0.4 pt top-1 (−0.3 to 1.1); the interval "
            "includes no gain at all.",
        ),
        (
            LabelFit("err = a * n^-b + c", 1, 0.5, 0.2, 0.03, None, None, None),
            "Doubling the labels (100 → 200 per class) should add about +3.0 pt top-1.",
        ),
        (LabelFit("err = a * n^-b + c", 1, 0.5, 0.2), None),
    ],
)
def test_the_doubling_sentence(fit: LabelFit, expected: str | None) -> None:
    from transferlab.reports.render import _labels_sentence

    curve = LabelCurve((LabelPoint(10, 0.5), LabelPoint(100, 0.7)), fit=fit)
    assert _labels_sentence(curve) == expected
