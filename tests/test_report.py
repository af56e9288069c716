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
