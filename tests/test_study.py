"""``transferlab study``: a spec runs end to end, unchanged members are reused, changed ones are never
overwritten silently, missing inputs stop it before any work, and ``evaluate STUDY_DIR`` re-applies every
fitted ensemble without refitting. That an interrupted study resumes is in tests/reliability/."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from builders import cifar_files, write_folder
from transferlab.artifacts.predictions import read_predictions
from transferlab.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")
REPO = Path(__file__).resolve().parents[1]
FAST = {"workers": 0, "precision": "fp32", "batch_size": 6, "holdout": 0.2, "seed": 0}


def _spec(ds: Path, weights: Path, cifar: Path, cache: Path, **member_overrides: dict) -> dict:
    members: dict = {
        "zs": {"kind": "zero-shot", "model": "test_resnet", "weights": str(weights), "workers": 0, "precision": "fp32"},
        "probe": {"model": "test_resnet", "weights": str(weights), "epochs": 3, "lr": 1e-2},
        "bn": {
            "model": "test_resnet",
            "weights": str(weights),
            "strategy": "bn-only",
            "head": "seed:conv=8,hidden=16",
            "epochs": 2,
            "lr": 1e-2,
        },
        "cifar-cnn": {
            "model": "small_cnn",
            "data": str(cifar),
            "role": "pretrain",
            "strategy": "scratch",
            "report_split": "test",
            "img_size": 32,
            "epochs": 1,
        },
        "cnn-head": {"model": "small_cnn", "init_from": "cifar-cnn", "img_size": 32, "epochs": 2, "lr": 1e-2},
    }
    for name, over in member_overrides.items():
        members[name] = {**members[name], **over}
    return {
        "name": "tiny",
        "data": str(ds),
        "defaults": {**FAST, "cache_dir": str(cache)},
        "members": members,
        "ensembles": {"mean": {"method": "mean"}, "greedy": {"method": "greedy", "members": ["zs", "probe", "bn"]}},
    }


@pytest.fixture(scope="module")
def cifar(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_folder(tmp_path_factory.mktemp("c") / "cifar-10-batches-py", cifar_files(n_per_batch=12))


def _write(path: Path, doc: dict) -> Path:
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def _study(spec: Path, out: Path, *extra: str) -> int:
    return main(["study", str(spec), "--out", str(out), "--progress", "off", *extra])


@pytest.fixture(scope="module")
def done(train_ds: Path, in1k32: Path, cifar: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """One finished study (module-scoped: later tests read it, or copy it before changing anything)."""
    import torch

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("study")
    spec = _write(root / "tiny.yaml", _spec(train_ds, in1k32, cifar, root / "cache"))
    assert _study(spec, root / "out") == 0
    return spec, root / "out"


def _summary(out: Path) -> dict[str, dict]:
    return {s["name"]: s for s in json.loads((out / "summary.json").read_text())["steps"]}


def test_study_runs_every_member_ensemble_and_report(done: tuple[Path, Path], capsys) -> None:
    _, out = done
    steps = _summary(out)
    assert list(steps) == ["zs", "probe", "bn", "cifar-cnn", "cnn-head", "mean", "greedy"]
    assert {s["status"] for s in steps.values()} == {"trained", "evaluated"}
    for name in ("zs", "probe", "bn", "cifar-cnn", "cnn-head"):
        marker = json.loads((out / "members" / name / "study.json").read_text())
        assert marker["status"] == "done" and len(marker["hash"]) == 64
    # The CNN head member really started from the CIFAR member's backbone.
    cfg = yaml.safe_load((out / "members" / "cnn-head" / "config.yaml").read_text())
    assert Path(cfg["init_from"]) == out / "members" / "cifar-cnn"
    # The report covers the members on the study's data and the ensembles, not the pretrain member.
    page = (out / "report" / "report.html").read_text()
    for name in ("zs", "probe", "bn", "cnn-head", "mean", "greedy"):
        assert f">{name}<" in page
    assert "cifar-cnn/config" not in page
    assert "study spec, resolved" in page and "sha256:" in page  # provenance: the spec and data fingerprints
    resolved = yaml.safe_load((out / "study.yaml").read_text())
    assert resolved["members"]["probe"]["lr"] == 1e-2 and resolved["members"]["probe"]["batch_size"] == 6


def test_rerun_reuses_every_member(done: tuple[Path, Path], capsys) -> None:
    spec, out = done
    weights = out / "members" / "probe" / "model.safetensors"
    before = weights.read_bytes(), weights.stat().st_mtime_ns
    assert _study(spec, out) == 0
    assert {s["status"] for s in _summary(out).values()} == {"reused"}
    assert (weights.read_bytes(), weights.stat().st_mtime_ns) == before
    assert "reused" in capsys.readouterr().out


def test_changed_member_is_refused_then_replaced(
    done: tuple[Path, Path], train_ds: Path, in1k32: Path, cifar: Path, tmp_path: Path, capsys
) -> None:
    import shutil

    spec0, out0 = done
    out = tmp_path / "out"
    shutil.copytree(out0, out)
    doc = yaml.safe_load(spec0.read_text())
    doc["members"]["bn"]["lr"] = 5e-3
    spec = _write(tmp_path / "changed.yaml", doc)
    old = (out / "members" / "bn" / "model.safetensors").read_bytes()
    assert _study(spec, out) == 2
    err = capsys.readouterr().err
    assert "bn: lr: 0.01 -> 0.005" in err and "--replace-changed" in err
    assert (out / "members" / "bn" / "model.safetensors").read_bytes() == old  # untouched
    assert _study(spec, out, "--replace-changed") == 0
    steps = _summary(out)
    assert steps["bn"]["status"] == "trained"
    assert steps["probe"]["status"] == "reused" and steps["zs"]["status"] == "reused"
    # ensembles that include bn are redone, and the old bn folder is kept, byte for byte
    assert steps["mean"]["status"] == "evaluated" and steps["greedy"]["status"] == "evaluated"
    (moved,) = (out / "superseded").glob("bn-*")
    assert (moved / "model.safetensors").read_bytes() == old


def test_missing_inputs_stop_the_seed_study_before_any_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    monkeypatch.setenv("TRANSFERLAB_DATA", str(tmp_path / "nodata"))
    monkeypatch.setenv("TRANSFERLAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    out = tmp_path / "seed"
    assert main(["study", str(REPO / "studies" / "seed.yaml"), "--out", str(out), "--progress", "off"]) == 2
    err = capsys.readouterr().err
    assert "nothing was run" in err
    assert "resnet50" in err and "weights:" in err  # names the model and how to provide weights
    assert "cifar10" in err.lower() and "tiny-imagenet" in err
    assert not (out / "members").exists()


def test_spec_errors_name_the_key(tmp_path: Path, train_ds: Path, capsys) -> None:
    bad = {"name": "x", "data": str(train_ds), "members": {"a": {"model": "test_resnet", "learning_rate": 0.1}}}
    assert _study(_write(tmp_path / "a.yaml", bad), tmp_path / "o") == 2
    assert "member 'a': unknown key 'learning_rate'" in capsys.readouterr().err
    bad = {"name": "x", "data": str(train_ds), "memebrs": {}}
    assert _study(_write(tmp_path / "b.yaml", bad), tmp_path / "o") == 2
    assert "did you mean 'members'" in capsys.readouterr().err
    bad = {"name": "x", "data": str(train_ds), "members": {"a": {"model": "test_resnet", "out": "elsewhere"}}}
    assert _study(_write(tmp_path / "c.yaml", bad), tmp_path / "o") == 2
    assert "set by the study itself" in capsys.readouterr().err
    bad = {
        "name": "x",
        "data": str(train_ds),
        "members": {"a": {"model": "test_resnet"}},
        "ensembles": {"e": {"method": "mean", "members": ["a", "b"]}},
    }
    assert _study(_write(tmp_path / "d.yaml", bad), tmp_path / "o") == 2
    assert "unknown key 'b'" in capsys.readouterr().err


def test_foreign_folder_is_never_overwritten(train_ds: Path, in1k32: Path, cifar: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    (out / "members" / "probe").mkdir(parents=True)
    keep = out / "members" / "probe" / "notes.txt"
    keep.write_text("mine")
    spec = _write(tmp_path / "s.yaml", _spec(train_ds, in1k32, cifar, tmp_path / "cache"))
    assert _study(spec, out) == 2
    assert "not written by this study" in capsys.readouterr().err
    assert keep.read_text() == "mine" and not (out / "members" / "zs").exists()


def test_evaluate_study_reapplies_fitted_ensembles(
    done: tuple[Path, Path], train_ds: Path, tmp_path: Path, capsys
) -> None:
    _, study = done
    out = tmp_path / "ev"
    argv = ["evaluate", str(study), "--data", str(train_ds), "--split", "val", "--out", str(out), "--progress", "off"]
    assert main([*argv, "--workers", "0", "--precision", "fp32"]) == 0
    printed = capsys.readouterr().out
    s = json.loads((out / "summary.json").read_text())
    assert set(s["members"]) == {"zs", "probe", "bn", "cnn-head"} and set(s["ensembles"]) == {"mean", "greedy"}
    # Same data as the study: members' logits are reproduced, and the greedy ensemble applied to them gives,
    # on the study's report half, exactly the predictions the study wrote (nothing was refit).
    for name in ("probe", "zs"):
        a = read_predictions(study / "members" / name / "predictions" / "val.npz")
        b = read_predictions(out / "members" / name / "predictions" / "val.npz")
        np.testing.assert_allclose(a.logits, b.logits, rtol=1e-4, atol=1e-4)
    old = read_predictions(study / "ensembles" / "greedy" / "predictions" / "val.npz")
    new = read_predictions(out / "ensembles" / "greedy" / "predictions" / "val.npz")
    pos = {sid: i for i, sid in enumerate(new.sample_ids.tolist())}
    rows = [pos[sid] for sid in old.sample_ids.tolist()]
    np.testing.assert_allclose(np.exp(new.logits[rows]), np.exp(old.logits), atol=1e-5)
    # Half of these samples fitted the ensembles in the study: flagged, not passed off as held out.
    assert s["ensembles"]["greedy"]["n_fitted_on"] == len(new.targets) - len(old.targets)
    assert s["ensembles"]["mean"]["n_fitted_on"] == 0  # mean fits nothing: its number here is not optimistic
    assert "were fitted on" in printed
    assert (out / "report" / "report.html").is_file()


def test_quick_study_spec_is_valid_and_its_inputs_exist(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys
) -> None:
    shared = REPO.parent / "shared" / "datasets"
    if not (shared / "tiny-imagenet-200-mini.zip").is_file():
        pytest.skip("../shared/datasets/tiny-imagenet-200-mini.zip is not beside the repository")
    monkeypatch.setenv("TRANSFERLAB_DATA", str(shared))
    assert main(["study", str(REPO / "studies" / "quick.yaml"), "--out", str(tmp_path / "q"), "--check"]) == 0
    out = capsys.readouterr().out
    assert "every input available" in out and "lite0-linear" in out
    assert not (tmp_path / "q" / "members").exists()
