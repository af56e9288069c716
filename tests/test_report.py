"""``transferlab report``: a self-contained report rebuilt from run and ensemble folders, no model loaded."""

from __future__ import annotations

import base64
import csv
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from builders import WNIDS, tiny_imagenet_files, write_folder
from transferlab.artifacts.predictions import write_predictions
from transferlab.artifacts.summary import summarize
from transferlab.cli import build_parser, main
from transferlab.ensembles import EnsembleConfig, run_ensemble
from transferlab.labels import IMAGENET_OVERLAP_WARNING
from transferlab.metrics import expected_calibration_error, softmax
from transferlab.reports import figures as F
from transferlab.reports.render import ReportConfig, build_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
N_VAL_PER_CLASS = 6
NAMES = {"n02124075": "Egyptian cat", "n01443537": "goldfish, Carassius auratus", "n04067472": "reel"}


def _val_split() -> tuple[list[str], np.ndarray]:
    """Sample ids and targets of the synthetic dataset's val split (class k at positions k, k+3, ...)."""
    n = N_VAL_PER_CLASS * len(WNIDS)
    return [f"val/images/val_{i}.JPEG" for i in range(n)], np.arange(n) % len(WNIDS)


def _logits(targets: np.ndarray, acc: float, margin: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n, c = len(targets), len(WNIDS)
    pred = np.where(rng.random(n) < acc, targets, (targets + 1 + rng.integers(0, c - 1, n)) % c)
    z = rng.normal(0.0, 0.3, (n, c))
    z[np.arange(n), pred] += margin
    return z


def make_run(root: Path, name: str, *, acc: float, seed: int, img_size: int = 64, ece: bool = False) -> Path:
    """A run directory in the format `transferlab train` writes (config.yaml, metrics.json, history.csv,
    predictions/val.npz), with numbers that are consistent with its predictions."""
    out = root / name
    ids, t = _val_split()
    z = _logits(t, acc, 2.5, seed)
    write_predictions(out / "predictions" / "val.npz", z, t, ids, WNIDS)
    cfg = {"model": "test_resnet", "data": "tiny", "out": str(out), "strategy": "linear-probe", "seed": seed}
    (out / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    cols = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds", "images_per_s"]
    buf = io.StringIO()
    wr = csv.writer(buf, lineterminator="\n")
    wr.writerow(cols)
    for e in range(6):
        wr.writerow([e, 2.0 / (e + 1), 0.3 + 0.1 * e, 1.8 / (e + 1) + 0.05 * e, 0.3 + 0.08 * e, 1e-3, 0.5 * (e > 0), 0])
    (out / "history.csv").write_text(buf.getvalue())
    metrics = {
        "model": "test_resnet",
        "weights": "synthetic",
        "strategy": "linear-probe",
        "bn": "eval",
        "head": "linear",
        "head_init": "random",
        "params_trained": 1539,
        "data": "/somewhere/tiny",
        "dataset": "tiny-imagenet-200",
        "split": "val",
        **summarize(z, t, n_boot=100, seed=seed),
        "num_classes": len(WNIDS),
        "best_epoch": 3,
        "epochs": 5,
        "epochs_run": 5,
        "stopped_early": False,
        "selection": "val_loss on a 20% class-stratified holdout of train (3 images); val was not used for any choice",
        "img_size": img_size,
        "precision": "fp32",
        "channels_last": False,
        "device": "cpu",
        "world_size": 1,
        "train_seconds": 2.5,
        "wall_s": 4.0,
        "warnings": [IMAGENET_OVERLAP_WARNING],
        "versions": {"transferlab": "0.1.0", "numpy": np.__version__},
    }
    if ece:
        metrics["ece"] = 0.123456
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return out


FIXTURES = Path(__file__).parent / "fixtures" / "report"
# Members as a study writes them, with the names, strategies and costs of a real quick study, so the summary
# table is as wide as a real one (short test names would fit any layout).
STUDY_MEMBERS = {
    "lite0-linear": dict(acc=0.8, seed=1, img_size=224, model="tf_efficientnet_lite0", strategy="linear-probe"),
    "lite0-zero-shot": dict(acc=0.6, seed=2, img_size=224, model="tf_efficientnet_lite0", strategy=None),
    "lite1-linear": dict(acc=0.85, seed=3, img_size=240, model="tf_efficientnet_lite1", strategy="linear-probe"),
    "lite0-bn-seed": dict(acc=0.4, seed=4, img_size=64, model="tf_efficientnet_lite0", strategy="bn-only"),
    "small-cnn": dict(acc=0.2, seed=5, img_size=32, model="small_cnn", strategy="scratch"),
}
STUDY_ENSEMBLES = ("mean", "vote", "weighted", "greedy")


def _as_study_member(run: Path, model: str, strategy: str | None) -> None:
    """Rewrite make_run's metrics.json with a real member's model, strategy and costs."""
    m = json.loads((run / "metrics.json").read_text())
    m.update(model=model, params_trained=256200, wall_s=104.7, train_seconds=2.7, feature_seconds=94.9)
    m["head_init"] = "imagenet" if strategy == "linear-probe" else "random"
    m["epochs_run"], m["best_epoch"] = 10, 4
    if strategy is None:  # a zero-shot evaluation: the ImageNet head, nothing trained
        for k in ("strategy", "params_trained", "head_init", "epochs_run", "best_epoch", "epochs", "train_seconds"):
            m.pop(k, None)
        m.update(mode="zero-shot", wall_s=1.3)
    else:
        m["strategy"] = strategy
    (run / "metrics.json").write_text(json.dumps(m, indent=2))


def make_study(root: Path, *, plan: str | None = "plan.json", labels: str | None = "labels.json") -> Path:
    """A study folder laid out as `transferlab study` writes it (members/, ensembles/), with the planner's plan and
    labels files copied from tests/fixtures/report (None leaves one out). Returns the folder."""
    for name, kw in STUDY_MEMBERS.items():
        kw = dict(kw)
        model, strategy = kw.pop("model"), kw.pop("strategy")
        _as_study_member(make_run(root / "members", name, **kw), model, strategy)
    members = tuple(str(root / "members" / n) for n in STUDY_MEMBERS)
    for method in STUDY_ENSEMBLES:
        run_ensemble(EnsembleConfig(members=members, out=root / "ensembles" / method, method=method, n_boot=100))
    for fixture, name in ((plan, "plan.json"), (labels, "labels.json")):
        if fixture is not None:
            (root / name).write_bytes((FIXTURES / fixture).read_bytes())
    return root


def study_dirs(root: Path) -> tuple[str, ...]:
    """The folders `transferlab study` passes to its report: members first, then ensembles."""
    return tuple(str(root / "members" / n) for n in STUDY_MEMBERS) + tuple(
        str(root / "ensembles" / e) for e in STUDY_ENSEMBLES
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with two runs, an ensemble of them and an unfinished run (no metrics.json yet)."""
    root = tmp_path_factory.mktemp("runs")
    a = make_run(root, "run-a", acc=0.85, seed=1, img_size=64)
    b = make_run(root, "run-b", acc=0.55, seed=2, img_size=32)
    run_ensemble(EnsembleConfig(members=(str(a), str(b)), out=root / "ens", n_boot=100))
    (root / "in-progress" / "checkpoints").mkdir(parents=True)
    (root / "in-progress" / "config.yaml").write_text("model: x\n")
    return root


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ds") / "tiny-imagenet-200"
    return write_folder(root, tiny_imagenet_files(n_train=1, n_val_per_class=N_VAL_PER_CLASS, n_test=1))


def _refuse(*_a: object, **_k: object) -> None:
    raise AssertionError("the report must not create or load a model")


@pytest.fixture(scope="module")
def report(runs: Path, dataset: Path, tmp_path_factory: pytest.TempPathFactory):
    """The report on the three folders given one by one, with --data, while loading a model would fail."""
    import transferlab.models.backbones as backbones
    import transferlab.training.runs as train_runs

    out = tmp_path_factory.mktemp("report")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(backbones, "create_backbone", _refuse)
        mp.setattr(train_runs, "load_run", _refuse)
        res = build_report(
            ReportConfig(
                (str(runs / "run-a"), str(runs / "run-b"), str(runs / "ens")), out, data=str(dataset), title="T & <b>"
            )
        )
    return res


def _summary_rows(page: str) -> list[str]:
    table = re.search(r'<h2 id="summary">.*?<tbody>(.*?)</tbody>', page, re.S)
    assert table is not None
    return re.findall(r"<tr[^>]*>.*?</tr>", table.group(1), re.S)


def test_html_is_one_offline_file(report) -> None:
    page = report.html.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>")
    assert "http://" not in page and "https://" not in page
    assert "<script" not in page and "<link" not in page and "@import" not in page and "url(" not in page
    refs = re.findall(r"""\b(?:src|href)\s*=\s*["']?([^"'\s>]+)""", page)
    assert refs
    for ref in refs:
        assert ref.startswith(("data:image/png;base64,", "#")), ref[:80]
    assert "<title>T &amp; &lt;b&gt;</title>" in page  # the title is escaped, not interpreted


def test_every_image_is_an_embedded_png(report) -> None:
    page = report.html.read_text(encoding="utf-8")
    imgs = re.findall(r"<img\b[^>]*>", page)
    assert len(imgs) == len(report.figures) >= 7
    for tag in imgs:
        m = re.search(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', tag)
        assert m is not None, tag[:120]
        png = base64.b64decode(m.group(1), validate=True)
        assert png.startswith(PNG_SIGNATURE)
        w, h = F.png_size(png)
        assert 100 < w < 3000 and 100 < h < 3000
        assert re.search(r'alt="[^"]+"', tag)


def test_summary_lists_members_then_ensemble_with_best_marked(report) -> None:
    rows = _summary_rows(report.html.read_text(encoding="utf-8"))
    names = [re.findall(r"<td[^>]*>(.*?)</td>", r)[1] for r in rows]
    assert names == ["run-a", "run-b", "ens"]
    best = [r for r in rows if "class=best" in r]
    assert len(best) == 1 and "★ best" in best[0]
    assert report.best in best[0]
    assert report.best in ("run-a", "ens")  # run-b is the weak member
    ens_row = rows[2]
    assert "ensemble of 2" in ens_row and "report half" in ens_row
    assert re.search(r"(no clear difference|beats best member|worse than best member) \([+−]\d", ens_row)
    page = report.html.read_text(encoding="utf-8")
    assert re.search(r"ens (beats|is worse than|is not shown to beat) its best member run-a", page)
    assert "ImageNet-pretrained weights have probably seen them" in page


def test_ece_comes_from_the_predictions_when_metrics_lacks_it(report, runs: Path) -> None:
    with np.load(runs / "run-b" / "predictions" / "val.npz") as z:
        ece = expected_calibration_error(softmax(z["logits"]), z["targets"], 15)
    row = _summary_rows(report.html.read_text(encoding="utf-8"))[1]
    assert f"<td class=num>{ece:.3f}</td>" in row


def test_markdown_links_figures_that_exist(report) -> None:
    md = report.markdown.read_text(encoding="utf-8")
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert len(links) == len(report.figures)
    for rel in links:
        assert not rel.startswith(("/", "http")) and rel.startswith("figures/")
        p = report.markdown.parent / rel
        assert p.is_file() and p.read_bytes().startswith(PNG_SIGNATURE)
    assert {report.markdown.parent / r for r in links} == set(report.figures)
    for name in ("run-a", "run-b", "ens", "★ best", "<details>", "```yaml"):
        assert name in md


def test_names_and_misclassified_images_come_from_data(report) -> None:
    page = report.html.read_text(encoding="utf-8")
    assert "Egyptian cat" in page and "goldfish" in page
    assert any(p.name.startswith("misclassified-") for p in report.figures)
    assert "pass --data" not in page.lower()


def test_cli_on_a_folder_of_runs(runs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "rep"
    assert main(["report", str(runs), "--out", str(out), "-q"]) == 0
    said = capsys.readouterr().out
    assert "2 run(s), 1 ensemble(s)" in said and "report.html" in said
    page = (out / "report.html").read_text(encoding="utf-8")
    assert "Pass --data to show images" in page
    assert "in-progress" not in page
    assert "n02124075" in page  # without --data (and no names recorded), classes are shown by id
    assert (out / "report.md").is_file() and (out / "figures").is_dir()


def test_cli_refuses_missing_and_invalid_dirs(runs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "no-such-run"
    assert main(["report", str(missing), "--out", str(tmp_path / "o1")]) == 2
    assert str(missing) in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["report", str(runs / "run-a"), str(empty), "--out", str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err
    assert str(empty) in err and "metrics.json" in err
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.yaml").write_text("model: x\n")
    (broken / "metrics.json").write_text("{not json")
    assert main(["report", str(broken), "--out", str(tmp_path / "o3")]) == 2
    assert str(broken / "metrics.json") in capsys.readouterr().err
    nopred = make_run(tmp_path, "nopred", acc=0.5, seed=3)
    (nopred / "predictions" / "val.npz").unlink()
    assert main(["report", str(nopred), "--out", str(tmp_path / "o4")]) == 2
    err = capsys.readouterr().err
    assert str(nopred) in err and "predictions/val.npz" in err
    assert not (tmp_path / "o4" / "report.html").exists()


def test_report_help_is_complete() -> None:
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    text = sub.choices["report"].format_help()
    for opt in ("--out", "--data", "--title", "DIR"):
        assert opt in text


def test_report_does_not_import_torch(runs: Path, tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "from transferlab.reports.render import ReportConfig, build_report\n"
        f"build_report(ReportConfig(({str(runs)!r},), {str(tmp_path / 'r')!r}))\n"
        "bad = [m for m in ('torch', 'timm', 'transferlab.models', 'transferlab.training') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "r" / "report.html").is_file()


def test_reliability_bins_agree_with_ece() -> None:
    rng = np.random.default_rng(0)
    p = softmax(rng.normal(0, 2, (500, 7)))
    t = rng.integers(0, 7, 500)
    b = F.reliability_bins(p, t, 15)
    has = b["counts"] > 0
    from_bins = float((b["counts"][has] * np.abs(b["accuracy"][has] - b["confidence"][has])).sum() / 500)
    assert from_bins == pytest.approx(expected_calibration_error(p, t, 15), abs=1e-12)
    png = F.reliability_png(p, t, title="x", ece=from_bins)
    assert png.startswith(PNG_SIGNATURE)


# --------------------------------------------------------------------------------------------------
# The page's order, the single ensemble chart, and the planner's sections (plan.json, labels.json)


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory):
    """The report `transferlab study` would build for a study folder with plan.json and labels.json."""
    root = make_study(tmp_path_factory.mktemp("study"))
    return build_report(ReportConfig(study_dirs(root), root / "report", title="Study"))


def _sections(page: str) -> list[str]:
    return re.findall(r'<h2 id="([^"]+)">', page)


def test_the_answer_comes_before_the_evidence(report) -> None:
    page = report.html.read_text(encoding="utf-8")
    assert _sections(page)[:3] == ["answer", "summary", "ensembles-vs-members"]
    answer = page[page.index('<h2 id="answer">') : page.index('<h2 id="summary">')]
    cards = re.findall(r'<div class="k">(.*?)</div><div class="v">(.*?)</div>', answer)
    assert cards[0] == ("Best model", report.best)
    assert cards[-1][0] == "Cost"
    if report.best == "ens":
        assert [k for k, _ in cards] == [
            "Best model",
            "Top-1 on the report half of val",
            "vs best single member",
            "Cost",
        ]
        assert re.search(r"ens (beats|is worse than|is not shown to beat) its best member run-a", answer)
    else:
        assert cards[2][0] == "vs runner-up"
    md = report.markdown.read_text(encoding="utf-8")
    assert md.index("## Answer") < md.index("## Summary") and "- **Best model:**" in md


def test_summary_table_keeps_every_fact_in_fewer_columns(report) -> None:
    page = report.html.read_text(encoding="utf-8")
    table = re.search(r'<h2 id="summary">.*?<thead>(.*?)</thead>', page, re.S)
    assert table is not None
    heads = re.findall(r"<th[^>]*>(.*?)</th>", table.group(1))
    assert len(heads) == 12 and "train time" not in heads and "resolution" not in heads
    run_a = _summary_rows(page)[0]
    # The resolution sits under the backbone, the epochs under the strategy; the epoch time went to Provenance.
    assert "64 px" in run_a and "5 epochs, kept 3" in run_a and "4.0 s" in run_a
    assert "2.5 s in epochs" in page


def test_one_chart_shows_every_ensemble_beside_the_members(study) -> None:
    res = study
    names = [p.stem for p in res.figures]
    assert [n for n in names if "all-models" in n] == ["top1-all-models"]
    assert not [n for n in names if n.startswith("ensemble-") or n == "overview-top1"]
    page = res.html.read_text(encoding="utf-8")
    assert page.count("ensemble(s) and their members") == 1
    for e in STUDY_ENSEMBLES:
        assert re.search(rf"{e} (beats|is worse than|is not shown to beat) its best member", page)


def test_runs_without_ensembles_answer_with_a_paired_test_against_the_runner_up(runs: Path, tmp_path: Path) -> None:
    res = build_report(ReportConfig((str(runs / "run-a"), str(runs / "run-b")), tmp_path / "r"))
    page = res.html.read_text(encoding="utf-8")
    assert res.best == "run-a" and "ensembles-vs-members" not in _sections(page)
    assert any(p.stem == "overview-top1" for p in res.figures)  # the runs' chart stays in the summary
    m = re.search(r'<div class="k">vs runner-up</div><div class="v">(.*?)</div><div class="d">(.*?)</div>', page)
    assert m is not None and m.group(1).startswith("+")
    assert "over run-b; 95% interval" in m.group(2) and f"the same {N_VAL_PER_CLASS * 3} samples" in m.group(2)


def test_study_report_shows_the_plan_and_the_labels_curve(study) -> None:
    res = study
    page = res.html.read_text(encoding="utf-8")
    sections = _sections(page)
    assert sections.index("would-more-labels-help") < sections.index("plan") < sections.index("calibration")
    sentence = "Doubling the labels (100 → 200 per class) should add about +2.1 pt top-1 (1.5 to 2.7)."
    assert page.count(sentence) == 2  # in the answer and in its section
    assert any(p.stem == "labels-curve" for p in res.figures)
    plan = page[page.index('<h2 id="plan">') : page.index('<h2 id="calibration">')]
    assert "Budget 20.0 min; predicted 18.3 min; took 19.2 min (96% of the budget), on AMD EPYC 7B13." in plan
    rows = re.findall(r"<tr[^>]*>.*?</tr>", plan.split("<tbody>")[1], re.S)
    assert len(rows) == 6 and sum("class=best" in r for r in rows) == 2  # the chosen ones
    assert "tf_efficientnet_lite0 @ 224" in rows[0] and "70.50%" in rows[0] and "cheapest informative" in rows[0]
    assert "dropped" in rows[3] and rows[3].count("<td class=num>—</td>") == 2  # no actual cost, no holdout top-1
    md = res.markdown.read_text(encoding="utf-8")
    assert "## Plan" in md and "## Would more labels help?" in md and "figures/labels-curve.png" in md


def test_planner_sections_need_a_study_folder(report, runs: Path, tmp_path: Path) -> None:
    """Folders outside a study's members/ and ensembles/ have no planner files: no sections. Naming the study
    folder shows them whatever the layout."""
    assert not {"plan", "would-more-labels-help"} & set(_sections(report.html.read_text(encoding="utf-8")))
    folder = tmp_path / "planner"
    folder.mkdir()
    for name in ("plan.json", "labels.json"):
        (folder / name).write_bytes((FIXTURES / name).read_bytes())
    res = build_report(ReportConfig((str(runs / "run-a"),), tmp_path / "r", study=folder))
    assert {"plan", "would-more-labels-help"} <= set(_sections(res.html.read_text(encoding="utf-8")))


@pytest.mark.parametrize(
    ("plan", "labels", "gone", "why"),
    [
        ("plan-damaged.json", "labels.json", "plan", "holdout_top1 = 71.3 is outside [0, 1]"),
        ("plan.json", "labels-truncated.json", "would-more-labels-help", "cannot read it as JSON"),
        ("plan.json", "labels-partial.json", "would-more-labels-help", "points[2]: top1 is missing"),
    ],
)
def test_a_damaged_planner_file_is_skipped_with_a_warning(
    plan: str, labels: str, gone: str, why: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = make_study(tmp_path / "s", plan=plan, labels=labels)
    with caplog.at_level("WARNING", logger="transferlab.reports"):
        res = build_report(ReportConfig(study_dirs(root), root / "report"))
    sections = _sections(res.html.read_text(encoding="utf-8"))
    assert gone not in sections
    assert {"plan", "would-more-labels-help"} - {gone} <= set(sections)  # the other file still shows
    said = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any(why in m and "leaves its section out" in m for m in said), said


def test_an_ensemble_fitted_elsewhere_is_shown_on_its_whole_split(runs: Path, tmp_path: Path) -> None:
    """Only an ensemble fitted on half of its split reports on the other half; one whose protocol fitted it
    elsewhere (e.g. on the members' train holdout) is on the whole split, and the report says so."""
    import shutil

    ens = tmp_path / "ens"
    shutil.copytree(runs / "ens", ens)
    m = json.loads((ens / "metrics.json").read_text())
    m["protocol"]["mode"] = "holdout"
    (ens / "metrics.json").write_text(json.dumps(m))
    res = build_report(ReportConfig((str(runs / "run-a"), str(runs / "run-b"), str(ens)), tmp_path / "r"))
    row = _summary_rows(res.html.read_text(encoding="utf-8"))[2]
    assert "ensemble of 2" in row and "report half" not in row
