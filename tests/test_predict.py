"""transferlab predict: runs, exports, ensembles and studies on files, folders and dataset splits; TTA."""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from builders import WNIDS, WORDS, eval_argv, jpeg_bytes, train_argv
from transferlab.artifacts.predictions import read_predictions
from transferlab.cli import main
from transferlab.inference.tta import tta_forward, tta_log_probs, tta_views
from transferlab.metrics import log_softmax
from transferlab.prediction import (
    PredictConfig,
    collect_inputs,
    load_predictor,
    predict,
)

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = ["--progress", "off", "--workers", "0", "--precision", "fp32"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, train_ds: Path, in1k32: Path) -> tuple[Path, Path]:
    """Two tiny test_resnet linear probes on the 3-class folder (different seeds and learning rates)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("runs")
    try:
        a, b = root / "a", root / "b"
        assert main(train_argv(train_ds, in1k32, a, "--epochs", "3")) == 0
        assert main(train_argv(train_ds, in1k32, b, "--epochs", "3", "--seed", "1", "--lr", "3e-3")) == 0
    finally:
        torch.set_num_threads(n)
    return a, b


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def _image_folder(root: Path) -> Path:
    """Good images of several sizes and modes (one in a subfolder), a broken and a truncated file, a text file."""
    rng = np.random.default_rng(0)
    (root / "sub").mkdir(parents=True)
    (root / "red.jpg").write_bytes(jpeg_bytes((220, 30, 30)))
    (root / "sub" / "green.JPEG").write_bytes(jpeg_bytes((30, 220, 30), size=48))
    (root / "gray.png").write_bytes(_png(Image.fromarray(rng.integers(0, 255, (40, 70), dtype=np.uint8), "L")))
    rgba = rng.integers(0, 255, (120, 300, 4), dtype=np.uint8)
    (root / "wide_rgba.png").write_bytes(_png(Image.fromarray(rgba, "RGBA")))
    (root / "broken.jpg").write_bytes(b"this is not an image")
    (root / "truncated.jpg").write_bytes(jpeg_bytes((30, 30, 220))[:300])
    (root / "notes.txt").write_text("not an image, and not an image suffix: skipped")
    return root


def _rows(path: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(path.open(encoding="utf-8")))


def test_predict_files_and_a_folder_with_broken_files(runs: tuple[Path, Path], tmp_path: Path, capsys) -> None:
    run = runs[0]
    folder = _image_folder(tmp_path / "imgs")
    single = tmp_path / "single.jpg"
    single.write_bytes(jpeg_bytes((30, 30, 220)))
    out = tmp_path / "pred.csv"
    argv = ["predict", str(run), str(folder), str(single), str(tmp_path / "missing.jpg"), "--top-k", "2"]
    rc = main([*argv, "--out", str(out), *FAST])
    assert rc == 1  # some inputs failed, the others were predicted
    err = capsys.readouterr().err
    assert "3 file(s) could not be read" in err
    assert "broken.jpg: not an image file PIL can identify" in err
    assert "truncated.jpg: cannot decode" in err
    assert "missing.jpg: no such file or folder" in err
    rows = _rows(out)
    assert list(rows[0]) == [
        "path",
        "top1_id",
        "top1_name",
        "top1_prob",
        "top2_id",
        "top2_name",
        "top2_prob",
        "error",
    ]
    by_name = {Path(r["path"]).name: r for r in rows}
    assert set(by_name) == {
        "broken.jpg",
        "gray.png",
        "red.jpg",
        "green.JPEG",
        "truncated.jpg",
        "wide_rgba.png",
        "single.jpg",
        "missing.jpg",
    }
    for name in ("gray.png", "red.jpg", "green.JPEG", "wide_rgba.png", "single.jpg"):
        r = by_name[name]
        assert r["error"] == ""
        assert r["top1_id"] in WNIDS and r["top1_name"] == WORDS[r["top1_id"]]  # names from the run's words.txt
        assert 1.0 >= float(r["top1_prob"]) >= float(r["top2_prob"]) > 0.0
    assert by_name["broken.jpg"]["top1_id"] == "" and "PIL" in by_name["broken.jpg"]["error"]
    # The dominant colour decides the class of this learnable toy data (class k = channel k).
    assert by_name["red.jpg"]["top1_id"] == WNIDS[0]


def test_predict_prints_without_out_and_needs_inputs(runs: tuple[Path, Path], tmp_path: Path, capsys) -> None:
    img = tmp_path / "x.jpg"
    img.write_bytes(jpeg_bytes((220, 30, 30)))
    assert main(["predict", str(runs[0]), str(img), "--top-k", "1", *FAST]) == 0
    out = capsys.readouterr().out
    assert str(img) in out and WORDS[WNIDS[0]] in out
    assert main(["predict", str(runs[0]), *FAST]) == 2
    assert "nothing to predict" in capsys.readouterr().err
    assert main(["predict", str(runs[0]), str(img), "--out", str(tmp_path / "p.txt"), *FAST]) == 2


def test_collect_inputs_recurses_sorts_and_dedupes(tmp_path: Path) -> None:
    folder = _image_folder(tmp_path / "imgs")
    items = collect_inputs([folder, folder / "red.jpg", tmp_path / "nope"])
    names = [Path(i.path).name for i in items]
    assert "notes.txt" not in names and names.count("red.jpg") == 1
    assert names[-1] == "nope" and items[-1].error == "no such file or folder"
    paths = [i.path for i in items[:-1]]
    assert paths == sorted(paths) and len(paths) == 6  # 4 good, 2 broken; the text file is skipped


@pytest.mark.parametrize("threads", [1, 2], ids=["one-thread", "two-streams"])
def test_predict_dataset_split_matches_evaluate(
    threads: int, runs: tuple[Path, Path], train_ds: Path, tmp_path: Path
) -> None:
    """With two threads both commands split each batch into two inference streams."""
    torch.set_num_threads(threads)  # the one_thread fixture restores the count afterwards
    run = runs[0]
    out = tmp_path / "val.json"
    assert main(["predict", str(run), "--data", str(train_ds), "--split", "val", "--out", str(out), *FAST]) == 0
    doc = json.loads(out.read_text())
    assert doc["n_inputs"] == doc["n_predicted"] == 12 and doc["errors"] == [] and doc["tta"] == "none"
    assert doc["top_k"] == 3  # capped at the number of classes
    ev = tmp_path / "ev"
    assert main(eval_argv(str(run), "--data", str(train_ds), "--split", "val", "--out", str(ev))) == 0
    p = read_predictions(ev / "predictions" / "val.npz")
    probs = np.exp(log_softmax(p.logits.astype(np.float64)))
    for row, pr, ids in zip(doc["predictions"], probs, p.sample_ids, strict=True):
        assert row["path"].endswith(str(ids))  # same order, the split's origin names
        assert row["label"] in WNIDS
        top = row["top_k"][0]
        assert top["class_index"] == int(np.argmax(pr))
        assert top["prob"] == pytest.approx(pr.max(), abs=1e-5)  # the same preprocessing as evaluate
    m = json.loads((ev / "metrics.json").read_text())
    assert doc["top1"] == pytest.approx(m["top1"])


def test_predict_dataset_split_with_a_broken_image_reports_it_and_predicts_the_rest(
    runs: tuple[Path, Path], train_ds: Path, tmp_path: Path
) -> None:
    """The decoded cache records the broken sample (``split.bad``); predict names its file and reason, and the
    other samples get the numbers they get from the clean copy (the batched path is the same engine)."""
    data = tmp_path / "tiny-imagenet-200"
    shutil.copytree(train_ds, data)
    (data / "val" / "images" / "val_5.JPEG").write_bytes(b"this is not an image")
    cfg = dict(source=runs[0], split="val", workers=0, precision="fp32", progress=False)
    clean = predict(PredictConfig(data=str(train_ds), **cfg))
    dirty = predict(PredictConfig(data=str(data), **cfg))
    assert dirty.meta["n_inputs"] == 12 and dirty.meta["n_predicted"] == 11 and dirty.meta["n_failed"] == 1
    ((path, reason),) = dirty.errors
    assert path.endswith("val_5.JPEG") and "PIL" in reason
    bad_row = next(r for r in dirty.rows if "error" in r)
    assert bad_row["label"] in WNIDS and "top_k" not in bad_row
    want = {Path(r["path"]).name: r["top_k"] for r in clean.rows}
    got = {Path(r["path"]).name: r["top_k"] for r in dirty.predictions}
    assert len(got) == 11 and "val_5.JPEG" not in got
    for name, tops in got.items():
        assert [t["class_id"] for t in tops] == [t["class_id"] for t in want[name]]
        np.testing.assert_allclose([t["prob"] for t in tops], [t["prob"] for t in want[name]], atol=1e-6)


def test_tta_views_and_averaging() -> None:
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    assert len(list(tta_views(x, "none"))) == 1
    views = list(tta_views(x, "flip+crops"))
    assert len(views) == 7 and all(v.shape == x.shape for v in views)
    assert torch.equal(views[0], x) and torch.equal(views[1], x.flip(3))
    assert not torch.equal(views[2], x)

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 5))
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        got = tta_log_probs(model, x, "flip")
        want = (torch.softmax(model(x), 1) + torch.softmax(model(x.flip(3)), 1)) / 2
        assert torch.allclose(got.exp(), want, atol=1e-6)
        # Column restriction happens before the softmax of each view (zero-shot: the dataset's classes).
        cols = np.array([4, 1])
        got = tta_forward("flip", cols)(model, x)
        z1, z2 = model(x)[:, cols], model(x.flip(3))[:, cols]
        assert torch.allclose(got.exp(), (torch.softmax(z1, 1) + torch.softmax(z2, 1)) / 2, atol=1e-6)


def test_tta_flip_in_evaluate_and_predict(runs: tuple[Path, Path], train_ds: Path, tmp_path: Path) -> None:
    run = runs[0]
    base = [str(run), "--data", str(train_ds), "--split", "val"]
    assert main(eval_argv(*base, "--out", str(tmp_path / "none"))) == 0
    assert main(eval_argv(*base, "--tta", "flip", "--out", str(tmp_path / "flip"))) == 0
    m0 = json.loads((tmp_path / "none" / "metrics.json").read_text())
    m1 = json.loads((tmp_path / "flip" / "metrics.json").read_text())
    assert m0["tta"] == "none" and m1["tta"] == "flip" and m1["config"]["tta"] == "flip"
    p0 = np.exp(log_softmax(read_predictions(tmp_path / "none" / "predictions" / "val.npz").logits.astype(np.float64)))
    p1 = np.exp(log_softmax(read_predictions(tmp_path / "flip" / "predictions" / "val.npz").logits.astype(np.float64)))
    assert np.abs(p0 - p1).max() > 1e-6  # fp32 and the same images: any difference comes from the mirror view
    np.testing.assert_allclose(p1.sum(1), 1.0, atol=1e-5)

    cfg = dict(source=run, data=str(train_ds), split="val", workers=0, precision="fp32", progress=False)
    r0 = predict(PredictConfig(**cfg))
    r1 = predict(PredictConfig(**cfg, tta="flip"))
    assert r1.meta["tta"] == "flip" and r1.meta["tta_views"] == 2
    q0 = np.array([row["top_k"][0]["prob"] for row in r0.predictions])
    q1 = np.array([row["top_k"][0]["prob"] for row in r1.predictions])
    assert np.abs(q0 - q1).max() > 1e-6
    np.testing.assert_allclose(q1, p1.max(1), atol=1e-5)  # predict's TTA is evaluate's TTA
    r7 = predict(PredictConfig(**cfg, tta="flip+crops"))
    assert r7.meta["tta_views"] == 7 and len(r7.predictions) == 12


def test_tta_is_refused_with_the_feature_cache(tmp_path: Path) -> None:
    from transferlab.errors import ConfigError
    from transferlab.evaluation import EvalConfig

    with pytest.raises(ConfigError, match="--tta"):
        EvalConfig(model="m", data="d", out=tmp_path, tta="mirror")
    with pytest.raises(ConfigError, match="--cache-dir"):
        EvalConfig(model="m", data="d", out=tmp_path, tta="flip", cache_dir=tmp_path)


@pytest.fixture(scope="module")
def ensemble_dir(runs: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ens") / "weighted"
    rc = main(["ensemble", str(runs[0]), str(runs[1]), "--method", "weighted", "--temperature", "--out", str(out)])
    assert rc == 0
    return out


def test_predict_with_an_ensemble_applies_its_fitted_combination(
    ensemble_dir: Path, train_ds: Path, tmp_path: Path
) -> None:
    pred = load_predictor(ensemble_dir)
    assert pred.kind == "ensemble" and len(pred.entries) == 2 and pred.ensemble.method == "weighted"
    assert pred.class_names == tuple(WORDS[w] for w in WNIDS)
    r = predict(
        PredictConfig(source=ensemble_dir, data=str(train_ds), split="val", workers=0, precision="fp32", top_k=3),
        pred,
    )
    # The ensemble's own predictions (log-probabilities of its report half) come from the members' saved
    # logits; predicting re-runs the members and must give the same distribution on those images.
    saved = read_predictions(ensemble_dir / "predictions" / "val.npz")
    by_id = {row["path"].rsplit("/", 1)[-1]: row for row in r.predictions}
    assert len(saved.sample_ids) > 0
    for sid, lp in zip(saved.sample_ids, saved.logits, strict=True):
        row = by_id[str(sid).rsplit("/", 1)[-1]]
        got = np.zeros(3)
        for t in row["top_k"]:
            got[t["class_index"]] = t["prob"]
        np.testing.assert_allclose(got, np.exp(lp), atol=1e-4)


def test_predict_with_a_study_folder(runs: tuple[Path, Path], ensemble_dir: Path, tmp_path: Path, capsys) -> None:
    study = tmp_path / "study"
    (study / "members").mkdir(parents=True)
    shutil.copytree(runs[0], study / "members" / "a")
    shutil.copytree(runs[1], study / "members" / "b")
    shutil.copytree(ensemble_dir, study / "ensembles" / "weighted")
    (study / "study.yaml").write_text("name: t\nmembers:\n  a: {kind: train}\n  b: {kind: train}\n")
    img = tmp_path / "x.jpg"
    img.write_bytes(jpeg_bytes((30, 220, 30)))
    pred = load_predictor(study)
    assert pred.kind == "ensemble" and pred.info["study"]["chosen"] == "weighted"
    one = load_predictor(study, member="b")
    assert one.kind == "run" and one.info["study"]["how"] == "--member"
    out = tmp_path / "s.json"
    assert main(["predict", str(study), str(img), "--member", "a", "--out", str(out), *FAST]) == 0
    assert json.loads(out.read_text())["study"]["chosen"] == "a"
    assert main(["predict", str(study), str(img), "--member", "zzz", *FAST]) == 2
    assert "no member or ensemble" in capsys.readouterr().err


def test_zero_shot_tta_and_predicting_from_an_evaluate_output(in1k32: Path, train_ds: Path, tmp_path: Path) -> None:
    base = ["--model", "test_resnet", "--weights", str(in1k32), "--zero-shot", "--data", str(train_ds)]
    assert main(eval_argv(*base, "--out", str(tmp_path / "zs"))) == 0
    assert main(eval_argv(*base, "--tta", "flip+crops", "--out", str(tmp_path / "zs-tta"))) == 0
    assert json.loads((tmp_path / "zs-tta" / "metrics.json").read_text())["tta"] == "flip+crops"
    z0 = read_predictions(tmp_path / "zs" / "predictions" / "val.npz").logits
    z1 = read_predictions(tmp_path / "zs-tta" / "predictions" / "val.npz").logits
    assert z0.shape == z1.shape == (12, 3)  # the dataset's 3 classes, not ImageNet's 1,000
    np.testing.assert_allclose(np.exp(z1).sum(1), 1.0, atol=1e-5)  # log mean probabilities over those 3
    assert np.abs(np.exp(log_softmax(z0.astype(np.float64))) - np.exp(z1)).max() > 1e-6

    # The evaluate output is a predictor too: the same weights, resize options and ImageNet columns.
    r = predict(PredictConfig(source=tmp_path / "zs", data=str(train_ds), split="val", workers=0, precision="fp32"))
    assert r.meta["predictor"] == "evaluation"
    probs = np.exp(log_softmax(z0.astype(np.float64)))
    got = np.array([row["top_k"][0]["prob"] for row in r.predictions])
    np.testing.assert_allclose(got, probs.max(1), atol=1e-5)
