"""``transferlab auto``: the budget is parsed and enforced, the plan takes the cheapest informative candidates
that fit and says why it drops the rest, the label-budget curve and its power law recover a known law, and a
whole run on a tiny dataset writes a study, its plan and its curve within the budget."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from builders import logging_restored
from transferlab.errors import ConfigError
from transferlab.planner import (
    AutoConfig,
    Measurement,
    Plan,
    choose,
    choose_more,
    fit_power_law,
    label_curve,
    larger_size,
    parse_budget,
)


def test_budget_reads_seconds_minutes_hours_and_names_the_option() -> None:
    assert parse_budget("90s") == 90
    assert parse_budget("20m") == 1200
    assert parse_budget("1.5h") == 5400
    assert parse_budget("600") == 600
    for bad in ("twenty minutes", "5", "-3m", "20 min"):
        with pytest.raises(ConfigError, match="--budget"):
            parse_budget(bad)


def test_config_refuses_weights_that_do_not_match_the_models(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--weights gives 1 sources for 2 --models"):
        AutoConfig(data="d", out=tmp_path, models=("a", "b"), weights=("w",))
    with pytest.raises(ConfigError, match="each backbone once"):
        AutoConfig(data="d", out=tmp_path, models=("a", "a"))


def _m(model: str, rate: float, dim: int = 1280) -> Measurement:
    return Measurement(model, 224, rate, 2.0, dim, "openvino", 1000)


def test_plan_takes_the_cheapest_first_and_drops_what_does_not_fit(tmp_path: Path) -> None:
    cfg = AutoConfig(data="d", out=tmp_path, budget="11m", models=("fast", "mid", "slow"))
    ms = [_m("fast", 400.0), _m("mid", 200.0), _m("slow", 50.0)]
    cands = choose(cfg, ms, 20_000, 5_000, 200, spent_s=30.0, flops=5e11)
    by = {c.name: c for c in cands}
    assert [c.name for c in cands if c.kind == "probe"] == ["fast-probe", "mid-probe", "slow-probe"]
    # 50,000 images (with mirrors) at 50 images/s is 1,000 s (more at the sustained rate): beyond the budget
    assert by["slow-probe"].status == "dropped" and "left" in by["slow-probe"].why
    assert by["fast-probe"].status == by["mid-probe"].status == "chosen"
    chosen = sum(c.predicted_s for c in cands if c.status == "chosen")
    assert 30.0 + chosen <= 660  # the zero-shot model and the ensembles (seconds) come out of RESERVE_S
    # the zero-shot model reads the first backbone's probe features; ensembles need two probes
    assert by["fast-zero-shot"].status == "chosen"
    assert by["greedy"].status == "chosen" and by["greedy"].options["select"] == "holdout"
    assert by["greedy"].options["members"] == ["fast-probe", "mid-probe", "concat-probe"]
    # one more probe on the two chosen probes' features side by side, predicted from the summed feature size
    assert by["concat-probe"].status == "chosen" and by["concat-probe"].options["members"] == [
        "fast-probe",
        "mid-probe",
    ]
    # LP-FT and larger inputs wait for the second phase, which chooses on the probes' holdout scores
    assert not [c for c in cands if c.kind == "lp-ft" or (c.img_size or 0) > 224]
    # the label-budget curve is reserved on the cheapest probe, before the next backbone is considered
    assert by["label-curve"].status == "chosen" and "fast-probe" in by["label-curve"].why
    assert by["fast-probe"].options["flip_features"] is True


def _ran_plan(tmp_path: Path, holdout: dict[str, float], train_rate: float | None = None) -> tuple[AutoConfig, Plan]:
    """A plan whose first phase ran: a probe per backbone with the given holdout top-1."""
    models = tuple(holdout)
    cfg = AutoConfig(data="d", out=tmp_path, budget="30m", models=models)
    ms = [Measurement(m, 224, 400.0, 2.0, 1280, "openvino", 1000, train_images_per_s=train_rate) for m in models]
    cands = choose(cfg, ms, 20_000, 5_000, 200, spent_s=30.0, flops=5e11)
    for c in cands:
        if c.kind == "probe":
            c.status, c.holdout_top1, c.actual_s = "ran", holdout[c.model], c.predicted_s
    plan = Plan(1800.0, 20_000, 5_000, ms, cands, 30.0, "cpu", flops=5e11, n_classes=200)
    return cfg, plan


def test_the_second_phase_spends_on_the_backbone_the_holdout_ranks_first(tmp_path: Path) -> None:
    cfg, plan = _ran_plan(tmp_path, {"a": 0.70, "b": 0.74})
    timed: list[str] = []

    def rate(m: Measurement) -> float:
        timed.append(m.model)
        return 40.0

    # 600 s: b's probe at 288 px (its 224 px passes x 1.65: about 270 s) fits; then LP-FT (18,000 fit images at 40
    # a second: about 540 s) does not
    more = choose_more(cfg, plan, 600.0, rate)
    by = {c.name: c for c in more}
    assert [c.name for c in more][:2] == ["b-probe-288", "b-lpft"]
    assert by["b-probe-288"].status == "chosen" and by["b-probe-288"].img_size == 288
    assert by["b-probe-288"].options["img_size"] == 288 and by["b-probe-288"].options["flip_features"] is True
    assert "b-probe is #1 on the holdout (74.00%)" in by["b-probe-288"].why
    probe_b = next(c for c in plan.candidates if c.name == "b-probe")
    assert by["b-probe-288"].predicted_s > probe_b.predicted_s * 1.4
    # decided against what the 288 px probe left, not the 600 s it started from
    left = 600 - by["b-probe-288"].predicted_s
    assert by["b-lpft"].status == "dropped" and by["b-lpft"].why.endswith(f"only {left:.0f} s left")
    assert by["b-lpft"].options["head_from"] == "b-probe" and by["b-lpft"].options["strategy"] == "bn-only"
    assert sum(c.predicted_s for c in more if c.status == "chosen") <= 600
    assert timed[0] == "b"  # the training step is timed for the backbone LP-FT is priced on, best first
    # with a fast training step and an hour, LP-FT of the best backbone is chosen too, and it comes before a's
    cfg, plan = _ran_plan(tmp_path, {"a": 0.70, "b": 0.74}, train_rate=200.0)
    more = choose_more(cfg, plan, 3600.0, rate)
    # (LP-FT at 200 images/s, about 180 s, is now the cheaper of b's two offers)
    assert [c.name for c in more if c.status == "chosen"] == ["b-lpft", "b-probe-288", "a-lpft", "a-probe-288"]
    # nothing left: everything offered is dropped, and no training step is timed
    timed.clear()
    cfg, plan = _ran_plan(tmp_path, {"a": 0.70, "b": 0.74})
    more = choose_more(cfg, plan, 200.0, rate)
    assert all(c.status == "dropped" for c in more) and not timed
    # (LP-FT's floor: 18,000 images at a quarter of the 400 images/s feature rate, plus the eval passes)
    assert "needs at least 268 s even at a fast training step" in {c.name: c for c in more}["b-lpft"].why


def test_an_offer_kind_the_holdout_ruled_out_is_not_offered_again(tmp_path: Path) -> None:
    cfg, plan = _ran_plan(tmp_path, {"a": 0.70, "b": 0.74})
    timed: list[str] = []
    why = "the holdout says LP-FT does not pay here: b-lpft 73.00%, b-probe 74.00%"
    more = choose_more(cfg, plan, 3600.0, lambda m: timed.append(m.model) or 200.0, {"LP-FT": why})
    by = {c.name: c for c in more}
    assert by["b-lpft"].status == by["a-lpft"].status == "dropped" and by["a-lpft"].why.endswith(why)
    assert by["b-probe-288"].status == by["a-probe-288"].status == "chosen"
    assert not timed  # no training step is timed for an offer that will not be made


def test_larger_sizes_are_multiples_of_32() -> None:
    assert [larger_size(s) for s in (32, 224, 240, 260)] == [64, 288, 288, 320]


def test_a_budget_for_one_probe_gets_no_ensemble(tmp_path: Path) -> None:
    cfg = AutoConfig(data="d", out=tmp_path, budget="5m", models=("fast", "mid"))
    cands = choose(cfg, [_m("fast", 400.0), _m("mid", 200.0)], 20_000, 5_000, 200, spent_s=30.0, flops=5e11)
    by = {c.name: c for c in cands}
    assert by["fast-probe"].status == "chosen" and by["mid-probe"].status == "dropped"
    assert by["greedy"].status == "dropped" and by["greedy"].why == "needs two members with holdout predictions"


def test_power_law_is_recovered() -> None:
    n = np.array([10.0, 25, 50, 100])
    a, b = fit_power_law(n, 2.0 * n**-0.4)
    assert a == pytest.approx(2.0, rel=1e-6) and b == pytest.approx(0.4, rel=1e-6)


def test_label_curve_rises_with_labels_and_predicts_a_positive_gain() -> None:
    rng = np.random.default_rng(0)
    c, d, per = 5, 16, 40
    centres = rng.normal(size=(c, d)) * 1.2
    y = np.repeat(np.arange(c), per)
    x = centres[y] + rng.normal(size=(len(y), d))
    yr = np.repeat(np.arange(c), 60)
    xr = centres[yr] + rng.normal(size=(len(yr), d))
    curve = label_curve(x.astype(np.float32), y, xr.astype(np.float32), yr, c, l2=1e-3, prior=None, n_boot=200, seeds=2)
    pts = curve["points"]
    assert [p["per_class"] for p in pts] == [4, 10, 20, 40]
    assert pts[-1]["top1"] > pts[0]["top1"] > 1 / c
    for p in pts:
        assert p["lo"] <= p["top1"] <= p["hi"]
    fit = curve["fit"]
    assert fit["doubling_gain"] > 0 and fit["doubling_lo"] <= fit["doubling_gain"] <= fit["doubling_hi"]
    json.dumps(curve)  # what labels.json holds


def _imagenet_weights(path: Path, arch: str, size: int) -> Path:
    """A tiny timm model with a random ImageNet-1k head saved as safetensors (stands in for real weights)."""
    import timm
    import torch

    from transferlab.models.preprocessing import Preprocessing
    from transferlab.models.weights import save_weights

    torch.manual_seed(1)
    model = timm.create_model(arch, pretrained=False, num_classes=1000).eval()
    pre = Preprocessing(input_size=size, interpolation="bilinear", mean=(0.5,) * 3, std=(0.25,) * 3)
    save_weights(path, model.state_dict(), preprocessing=pre)
    return path


@pytest.fixture(scope="module")
def auto_run(train_ds: Path, in1k32: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """One whole ``transferlab auto`` on the 3-class dataset with two tiny backbones (module-scoped)."""
    import torch

    from transferlab.cli import main

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("auto")
    eff = _imagenet_weights(root / "eff.safetensors", "test_efficientnet", 32)
    out = root / "out"
    argv = ["auto", "--data", str(train_ds), "--out", str(out), "--budget", "10m", "--progress", "off"]
    argv += ["--models", "test_resnet", "test_efficientnet", "--weights", str(in1k32), str(eff)]
    argv += ["--workers", "0", "--precision", "fp32", "--cache-dir", str(root / "cache")]
    with logging_restored():
        assert main(argv) == 0
    return out, json.loads((out / "plan.json").read_text())


def test_auto_runs_the_plan_as_a_study_and_explains_it(auto_run: tuple[Path, dict]) -> None:
    out, plan = auto_run
    by = {c["name"]: c for c in plan["candidates"]}
    assert {"test-resnet-probe", "test-efficientnet-probe", "test-resnet-zero-shot", "greedy", "weighted"} <= set(by)
    for name in (
        "test-resnet-probe",
        "test-efficientnet-probe",
        "concat-probe",
        "test-resnet-zero-shot",
        "greedy",
        "weighted",
    ):
        assert by[name]["status"] == "ran", by[name]
        assert by[name]["actual_s"] is not None and by[name]["predicted_s"] > 0
        assert (out / ("ensembles" if by[name]["kind"] == "ensemble" else "members") / name / "metrics.json").exists()
    assert by["test-resnet-probe"]["holdout_top1"] is not None and by["concat-probe"]["holdout_top1"] is not None
    # the second phase had most of the 10 minutes and ran one offer at a time, the holdout's best backbone first
    # (ties in plan order): its probe at a larger input, then LP-FT from its tuned probe's head. Neither beat
    # the probe on the tiny holdout (all at 100%), so neither kind was offered to the next backbone.
    second = [c for c in plan["candidates"] if c["why"].startswith("second phase")]
    probes = [c for c in plan["candidates"] if c["name"] in ("test-resnet-probe", "test-efficientnet-probe")]
    best = max(probes, key=lambda c: c["holdout_top1"])["name"].replace("-probe", "")
    other = next(c["name"] for c in probes if not c["name"].startswith(best)).replace("-probe", "")
    ran = {c["name"]: c for c in second if c["status"] == "ran"}
    assert set(ran) == {f"{best}-probe-64", f"{best}-lpft"}, second
    assert all(c["holdout_top1"] is not None and "#1 on the holdout" in c["why"] for c in ran.values())
    dropped = {c["name"]: c["why"] for c in second if c["status"] == "dropped"}
    assert set(dropped) == {f"{other}-probe-64", f"{other}-lpft"}
    assert "the holdout says a larger input does not pay here" in dropped[f"{other}-probe-64"]
    assert "the holdout says LP-FT does not pay here" in dropped[f"{other}-lpft"]
    assert any(n.startswith("second phase: the holdout says LP-FT does not pay") for n in plan["notes"])
    lpft = json.loads((out / "members" / f"{best}-lpft" / "metrics.json").read_text())
    assert lpft["strategy"] == "bn-only" and lpft["head_init"].endswith(f"members/{best}-probe")
    # BatchNorm's statistics stay fixed, and the run starts from the probe's fit-split head: its holdout is unseen
    assert lpft["bn"] == "frozen-stats" and lpft["head_from_split"] == "fit"
    assert json.loads((out / "members" / f"{best}-probe-64" / "metrics.json").read_text())["img_size"] == 64
    assert [m["model"] for m in plan["measured"] if m["train_images_per_s"]] == [best.replace("-", "_")]
    # the ensembles take every member with holdout predictions, the second phase's too
    greedy = json.loads((out / "ensembles" / "greedy" / "metrics.json").read_text())
    assert len(greedy["protocol"]["select_files"]) == 5
    assert any(f"{best}-lpft" in f for f in greedy["protocol"]["select_files"])
    concat = json.loads((out / "members" / "concat-probe" / "metrics.json").read_text())
    assert concat["strategy"] == "concat-probe" and concat["features"] == 96 + 256  # both backbones side by side
    assert (out / "members" / "concat-probe" / "predictions" / "holdout.npz").exists()
    assert plan["actual_s"] <= plan["budget_s"] and plan["cpu"]
    assert [m["model"] for m in plan["measured"]] == ["test_resnet", "test_efficientnet"]
    assert all(m["images_per_s"] > 0 and m["setup_s"] >= 0 for m in plan["measured"])
    # the probes are the tuned kind, and the ensembles were fitted off the report split
    cfg = (out / "members" / "test-resnet-probe" / "config.yaml").read_text()
    assert "probe: lbfgs" in cfg and "flip_features: true" in cfg
    protocol = json.loads((out / "ensembles" / "greedy" / "metrics.json").read_text())["protocol"]
    assert protocol["mode"] == "select-data" and protocol["n_report"] == 12  # all of val: none was fitted on
    assert all(f.endswith("predictions/holdout.npz") for f in protocol["select_files"])


def test_auto_writes_the_label_curve_and_the_report_shows_plan_and_curve(auto_run: tuple[Path, dict]) -> None:
    out, _ = auto_run
    labels = json.loads((out / "labels.json").read_text())
    assert labels["member"] == "test-resnet-probe" or labels["member"] == "test-efficientnet-probe"
    assert [p["fraction"] for p in labels["points"]] == [0.1, 0.25, 0.5, 1.0]
    assert "doubling_gain" in labels["fit"]
    html = (out / "report" / "report.html").read_text()
    assert "Plan" in html and "more labels" in html


def _starred(html: str) -> str:
    """The member the report's summary marks as the answer."""
    import re

    row = html[html.index("★ best") :]
    return re.findall(r"<td[^>]*>([^<]+)</td>", row)[0]


def test_the_answer_is_chosen_on_the_holdout_not_on_val(auto_run: tuple[Path, dict], tmp_path: Path) -> None:
    import shutil

    from transferlab.reports.render import ReportConfig, build_report

    out, plan = auto_run
    ran = [c for c in plan["candidates"] if c["holdout_top1"] is not None and c["status"] == "ran"]
    top = max(c["holdout_top1"] for c in ran)
    html = (out / "report" / "report.html").read_text()
    assert _starred(html) == next(c["name"] for c in ran if c["holdout_top1"] == top)  # ties: the cheaper, first
    assert "the highest top-1 on the train holdout" in html
    # make the member with the lowest val top-1 the holdout's best: the report's answer follows the holdout
    study = tmp_path / "study"
    shutil.copytree(out, study, ignore=shutil.ignore_patterns("report"))
    val = {c["name"]: json.loads((study / "members" / c["name"] / "metrics.json").read_text())["top1"] for c in ran}
    worst = min(val, key=lambda n: (val[n], n))
    doc = json.loads((study / "plan.json").read_text())
    for c in doc["candidates"]:
        if c["holdout_top1"] is not None:
            c["holdout_top1"] = 0.99 if c["name"] == worst else 0.5
    (study / "plan.json").write_text(json.dumps(doc))
    members = [str(study / "members" / c["name"]) for c in ran]
    res = build_report(ReportConfig(dirs=tuple(members), out=tmp_path / "r", study=study))
    assert _starred(res.html.read_text()) == worst and val[worst] < max(val.values())


def test_dry_run_prints_the_plan_and_runs_nothing(train_ds: Path, in1k32: Path, tmp_path: Path, capsys) -> None:
    from transferlab.cli import main

    out = tmp_path / "out"
    argv = ["auto", "--data", str(train_ds), "--out", str(out), "--budget", "5m", "--dry-run", "--progress", "off"]
    argv += ["--models", "test_resnet", "--weights", str(in1k32), "--workers", "0", "--precision", "fp32"]
    argv += ["--cache-dir", str(tmp_path / "cache")]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "measured test_resnet@32" in text and "predicted total" in text and "test-resnet-probe" in text
    assert not out.exists()


def _probe_spec(ds: Path, weights: Path, cache: Path, **ensemble: dict) -> dict:
    fast = {"workers": 0, "precision": "fp32", "holdout": 0.2, "cache_dir": str(cache)}
    member = {"model": "test_resnet", "weights": str(weights), "probe": "lbfgs"}
    return {
        "name": "budgeted",
        "data": str(ds),
        "defaults": fast,
        "members": {
            "a": member,
            "b": {**member, "flip_features": True},
            "zs": {"kind": "zero-shot", "model": "test_resnet", "weights": str(weights), "workers": 0},
        },
        "ensembles": ensemble or {"mean": {"method": "mean", "members": ["a", "b"], "select": "holdout"}},
    }


def test_holdout_ensembles_refuse_members_without_holdout_predictions(train_ds: Path, in1k32: Path, tmp_path) -> None:
    from transferlab.studies import parse_spec

    bad = _probe_spec(train_ds, in1k32, tmp_path, mean={"method": "mean", "members": ["a", "zs"], "select": "holdout"})
    with pytest.raises(ConfigError, match="'zs' is a zero-shot member"):
        parse_spec(bad)
    typo = _probe_spec(train_ds, in1k32, tmp_path, mean={"method": "mean", "members": ["a", "b"], "select": "val"})
    with pytest.raises(ConfigError, match="select must be one of split, holdout"):
        parse_spec(typo)


def test_a_study_past_its_deadline_skips_what_has_not_started(train_ds: Path, in1k32: Path, tmp_path: Path) -> None:
    import time

    from transferlab.studies import parse_spec, run_study

    spec = parse_spec(_probe_spec(train_ds, in1k32, tmp_path / "cache"))
    out = tmp_path / "out"
    seen: list[str] = []
    res = run_study(spec, out, progress=False, deadline=time.perf_counter(), before_report=lambda r: seen.append("x"))
    assert [(s.name, s.status) for s in res.steps] == [
        ("a", "skipped"),
        ("b", "skipped"),
        ("zs", "skipped"),
        ("mean", "skipped"),
    ]
    assert seen == ["x"] and not (out / "members" / "a").exists()
    # with time left everything runs, and the holdout-fitted ensemble reads both probes' holdout predictions
    res = run_study(spec, out, progress=False, deadline=time.perf_counter() + 600)
    assert [s.status for s in res.steps] == ["trained", "trained", "evaluated", "evaluated"]
    for name in ("a", "b"):
        assert (out / "members" / name / "predictions" / "holdout.npz").exists()
    # a probe on both runs' features side by side needs them fitted the same way (b has mirrored features)
    from transferlab.training.concat import ConcatConfig, fit_concat

    with pytest.raises(ConfigError, match="differ in their mirrored features"):
        fit_concat(ConcatConfig(members=(out / "members" / "a", out / "members" / "b"), out=tmp_path / "c"))
    assert not (tmp_path / "c").exists()
