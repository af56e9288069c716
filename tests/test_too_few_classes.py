"""A classifier needs two classes: a one-class dataset (or a train split holding one class) is refused before
any work by ``train`` (every strategy), ``evaluate`` and a study's pre-flight, instead of reporting top-1 100%."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from builders import WNIDS, eval_argv, jpeg_bytes, tiny_imagenet_files, train_argv, write_folder
from transferlab.cli import main
from transferlab.data import open_dataset
from transferlab.data.screen import refuse_too_few_classes
from transferlab.errors import TooFewClassesError

STRATEGIES = ["linear-probe", "bn-only", "full", "freeze-unfreeze", "scratch"]


def one_class_folder(root: Path) -> Path:
    """An ImageFolder tree whose train and val splits hold the single class ``ant``."""
    return write_folder(
        root, {f"{s}/ant/{i}.jpg": jpeg_bytes((20 * i, 90, 30)) for s in ("train", "val") for i in range(5)}
    )


def cache_contents(cache: Path) -> list[str]:
    return sorted(p.relative_to(cache).as_posix() for p in cache.rglob("*")) if cache.exists() else []


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_train_refuses_a_one_class_folder_before_any_work(
    strategy: str, in1k32: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ds = one_class_folder(tmp_path / "ds")
    run = tmp_path / "run"
    assert main(train_argv(ds, in1k32, run, "--strategy", strategy, "--epochs", "1")) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {ds} has a single class, 'ant': a classifier needs at least two classes")
    assert "transferlab train refuses it before any work" in err and "Add images of at least one other class" in err
    assert "Traceback" not in err
    # config.yaml (written first, so the command can be replayed) and nothing else: no weights, metrics,
    # checkpoints, and nothing in the cache (decoded images, image checks, features, digests).
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml"]
    assert cache_contents(tmp_path / "cache") == []


def test_train_refuses_a_one_class_tiny_imagenet(
    in1k32: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    files = {k: v for k, v in tiny_imagenet_files().items() if k.startswith(("words", "test/")) or WNIDS[0] in k}
    files["wnids.txt"] = f"{WNIDS[0]}\n".encode()
    files["val/val_annotations.txt"] = b"val_0.JPEG\t" + WNIDS[0].encode() + b"\t0\t0\t63\t63\n"
    files["val/images/val_0.JPEG"] = jpeg_bytes((200, 30, 30))
    ds = write_folder(tmp_path / "tiny", files)
    assert main(train_argv(ds, in1k32, tmp_path / "run")) == 2
    assert f"{ds} has a single class, '{WNIDS[0]}'" in capsys.readouterr().err
    assert cache_contents(tmp_path / "cache") == []


@pytest.mark.parametrize("policy", ["error", "skip"])
def test_train_split_with_images_of_one_class_is_refused(
    policy: str, in1k32: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Two classes in the dataset, but "bee" only has val images: even --bad-images skip (which trains despite
    # an empty class) must not fit a classifier on one class.
    files = {f"train/ant/{i}.jpg": jpeg_bytes((20 * i, 90, 30)) for i in range(5)}
    files.update(
        {f"val/{c}/{i}.jpg": jpeg_bytes((20 * i, 30, k * 90)) for k, c in enumerate(("ant", "bee")) for i in range(2)}
    )
    ds = write_folder(tmp_path / "ds", files)
    assert main(train_argv(ds, in1k32, tmp_path / "run", "--bad-images", policy)) == 2
    err = capsys.readouterr().err
    assert f"the train split of {ds} holds images of only class 'ant'; the other 1 class(es) (bee) have none" in err
    assert cache_contents(tmp_path / "cache") == []


def test_evaluate_refuses_a_one_class_dataset(in1k32: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Zero-shot keeps only the dataset's ImageNet columns: over one column the argmax is always right.
    files = {f"val/{WNIDS[0]}/{i}.jpg": jpeg_bytes((20 * i, 90, 30)) for i in range(3)}
    ds = write_folder(tmp_path / "ds", files)
    out = tmp_path / "eval"
    argv = eval_argv(
        "--model", "test_resnet", "--weights", str(in1k32), "--data", str(ds), "--zero-shot", "--out", str(out)
    )
    assert main(argv) == 2
    assert f"{ds} has a single class, '{WNIDS[0]}'" in capsys.readouterr().err
    assert not out.exists()


def test_study_preflight_names_the_one_class_member(
    in1k32: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ds = one_class_folder(tmp_path / "ds")
    spec = {
        "name": "one",
        "data": str(ds),
        "defaults": {"workers": 0, "precision": "fp32", "batch_size": 6, "cache_dir": str(tmp_path / "cache")},
        "members": {"probe": {"model": "test_resnet", "weights": str(in1k32), "epochs": 1}},
    }
    path = tmp_path / "one.yaml"
    path.write_text(yaml.safe_dump(spec))
    out = tmp_path / "out"
    assert main(["study", str(path), "--out", str(out), "--progress", "off"]) == 2
    err = capsys.readouterr().err
    assert "the study cannot start; nothing was run" in err
    assert f"member probe: {ds} has a single class, 'ant'" in err
    assert not (out / "members").exists()
    assert cache_contents(tmp_path / "cache") == []


def test_two_classes_pass(tmp_path: Path) -> None:
    files = {f"train/{c}/{i}.jpg": jpeg_bytes((20 * i, 90, 30)) for c in ("ant", "bee") for i in range(2)}
    refuse_too_few_classes(open_dataset(write_folder(tmp_path / "ds", files)), "train", "x")
    with pytest.raises(TooFewClassesError):
        refuse_too_few_classes(open_dataset(one_class_folder(tmp_path / "one")), None, "x")
