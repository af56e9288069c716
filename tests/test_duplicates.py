"""Exact duplicate images (same bytes): ``data check`` reports them within a split, across splits and across
classes (naming the class folders that share images), and ``train`` warns when the images it reports on are
copies of images it trains on."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from builders import WNIDS, jpeg_bytes, tiny_imagenet_files, train_argv, write_folder, write_zip
from transferlab.cli import main
from transferlab.data import open_dataset
from transferlab.data.checks import check_dataset
from transferlab.data.digests import cached_digests, split_digests


def img(k: int, i: int) -> bytes:
    """A distinct JPEG for class ``k``, image ``i`` (no two calls with other arguments share bytes)."""
    return jpeg_bytes((40 + 60 * k, 10 + 9 * i, 200 - 7 * i))


def dirty_tree() -> dict[str, bytes]:
    """train/cat copied as train/cat_copy, train/dog/2.jpg copied into val, train/dog/4.jpg = train/dog/0.jpg."""
    files = {f"train/cat/{i}.jpg": img(0, i) for i in range(4)}
    files.update({f"train/cat_copy/{i}.jpg": img(0, i) for i in range(4)})
    files.update({f"train/dog/{i}.jpg": img(1, i) for i in range(4)})
    files["train/dog/4.jpg"] = img(1, 0)
    files["val/cat/v0.jpg"] = img(0, 9)
    files["val/dog/v1.jpg"] = img(1, 2)
    return files


def test_data_check_reports_copies_within_across_splits_and_classes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ds = write_folder(tmp_path / "ds", dirty_tree())
    report = tmp_path / "check.json"
    assert main(["data", "check", str(ds), "--workers", "1", "--json", str(report)]) == 0  # a warning, not a failure
    out = capsys.readouterr().out
    assert "duplicates: 6 set(s) of identical images (same bytes), 12 files: within train 5, train & val 1, " in out
    assert "across classes 4 (label noise)" in out
    assert "  train/cat and train/cat_copy share 4 identical image(s)" in out
    assert f"  {ds}/train/dog/2.jpg = {ds}/val/dog/v1.jpg" in out
    assert "  ... and 1 more set(s); --json FILE lists them" in out  # cross-split and cross-class ones come first
    dup = json.loads(report.read_text())["duplicates"]
    assert "exact copies" in dup["method"] and "resized" in dup["method"]
    assert (dup["groups"], dup["files"], dup["across_classes"]) == (6, 12, 4)
    assert dup["within_split"] == {"train": 5} and dup["across_splits"] == {"train/val": 1}
    assert dup["class_pairs"] == [{"a": "train/cat", "b": "train/cat_copy", "shared": 4}]
    listed = {tuple(f["file"] for f in g["files"]) for g in dup["listed"]}
    assert (f"{ds}/train/dog/2.jpg", f"{ds}/val/dog/v1.jpg") in listed
    assert (f"{ds}/train/dog/0.jpg", f"{ds}/train/dog/4.jpg") in listed
    assert all(len(g["sha256"]) == 64 for g in dup["listed"])


def test_a_symlinked_class_folder_names_both_folders(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ds = write_folder(
        tmp_path / "ds", {f"{c}/{i}.jpg": img(k, i) for k, c in enumerate(("cat", "dog")) for i in range(3)}
    )
    os.symlink("cat", ds / "kitty")
    src = open_dataset(ds)
    assert src.classes.ids == ("cat", "dog", "kitty")  # a link to a folder is followed, like any folder
    dup = check_dataset(src, workers=1, progress=False).duplicates
    assert dup.class_pairs() == [("cat", "kitty", 3)]
    assert len(dup.cross_class()) == 3 and dup.across() == {}
    assert main(["data", "check", str(ds), "--workers", "1"]) == 0
    assert "  cat and kitty share 3 identical image(s)" in capsys.readouterr().out


def test_zip_with_a_train_image_copied_into_val(tmp_path: Path) -> None:
    files = {k: v for k, v in tiny_imagenet_files(n_train=2, n_val_per_class=1, n_test=0).items()}
    # tiny_imagenet_files gives every image of a class the same bytes; make them distinct first.
    for k, w in enumerate(WNIDS):
        for i in range(2):
            files[f"train/{w}/images/{w}_{i}.JPEG"] = img(k, i)
    for v in range(3):
        files[f"val/images/val_{v}.JPEG"] = img(v, 5)
    files["val/images/val_1.JPEG"] = files[f"train/{WNIDS[1]}/images/{WNIDS[1]}_0.JPEG"]  # val_1 is WNIDS[1] too
    path = write_zip(tmp_path / "t.zip", files)
    for workers in (1, 2):
        dup = check_dataset(open_dataset(path), workers=workers, progress=False).duplicates
        assert dup.across() == {"train/val": 1} and dup.within() == {} and dup.cross_class() == []
        assert [s.origin for s in dup.groups[0]] == [
            f"{path}:tiny-imagenet-200/train/{WNIDS[1]}/images/{WNIDS[1]}_0.JPEG",
            f"{path}:tiny-imagenet-200/val/images/val_1.JPEG",
        ]


def test_broken_files_are_not_duplicates_of_each_other(tmp_path: Path) -> None:
    files = {f"train/{c}/{i}.jpg": img(k, i) for k, c in enumerate(("cat", "dog")) for i in range(2)}
    files["train/cat/empty.jpg"] = b""
    files["train/dog/empty.jpg"] = b""
    rep = check_dataset(open_dataset(write_folder(tmp_path / "ds", files)), workers=1, progress=False)
    assert len(rep.failures) == 2
    assert rep.duplicates.groups == []


def copied_into_val(root: Path) -> Path:
    """Two classes of 6 train images; val holds 2 new images per class plus a copy of every train/dog image;
    train/kitty is train/cat copied under another name."""
    files = {f"train/{c}/{i}.jpg": img(k, i) for k, c in enumerate(("cat", "dog")) for i in range(6)}
    files.update({f"train/kitty/{i}.jpg": img(0, i) for i in range(6)})
    files.update({f"val/{c}/new{i}.jpg": img(k, 10 + i) for k, c in enumerate(("cat", "dog")) for i in range(2)})
    files.update({f"val/dog/copy{i}.jpg": img(1, i) for i in range(6)})
    return write_folder(root, files)


def test_train_warns_when_val_holds_copies_of_training_images(
    in1k32: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    ds = copied_into_val(tmp_path / "ds")
    run = tmp_path / "run"
    assert main(train_argv(ds, in1k32, run, "--epochs", "1")) == 0
    err = capsys.readouterr().err
    m = json.loads((run / "metrics.json").read_text())
    # Only the dog images in the fitted part count: the holdout is not trained on.
    from transferlab.training.probe import stratified_holdout

    targets = open_dataset(ds).split("train").targets
    fit_pos, _ = stratified_holdout(targets, 0.2, 0)
    n_fit_dog = int((targets[fit_pos] == 1).sum())
    assert 0 < n_fit_dog < 6
    line = f"warning: {n_fit_dog} of the 10 val images are exact copies (same bytes) of images this run trains on"
    assert line in err
    assert f"{ds}/val/dog/copy" in err and f"= {ds}/train/dog/" in err
    assert f"`transferlab data check {ds}` lists every exact duplicate" in err
    assert "image(s) this run trains on appear under two or more classes (label noise" in err
    dup = m["duplicates"]
    assert dup["report_in_fit"] == n_fit_dog and dup["fit_across_classes"] > 0
    assert {e["report"].rsplit("/", 1)[0] for e in dup["report_in_fit_examples"]} == {f"{ds}/val/dog"}
    assert any("exact copies" in w for w in m["warnings"])
    # The digests are cached by the samples' fingerprint: a second run hashes nothing.
    assert len(list((tmp_path / "cache" / "digests").glob("*.npy"))) == 2

    def refuse(*a: object) -> None:
        raise AssertionError("hashed again")

    monkeypatch.setattr("transferlab.data.digests.split_digests", refuse)
    assert main(train_argv(ds, in1k32, tmp_path / "run2", "--epochs", "1")) == 0
    assert line in capsys.readouterr().err


def test_clean_data_trains_without_a_duplicate_warning(in1k32: Path, tmp_path: Path, capsys) -> None:
    files = {
        f"{s}/{c}/{i}.jpg": img(k, i + (10 if s == "val" else 0))
        for s in ("train", "val")
        for k, c in enumerate(("cat", "dog"))
        for i in range(4)
    }
    ds = write_folder(tmp_path / "ds", files)
    assert main(train_argv(ds, in1k32, tmp_path / "run", "--epochs", "1")) == 0
    assert "exact copies" not in capsys.readouterr().err
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["duplicates"]["report_in_fit"] == 0 and m["duplicates"]["fit_across_classes"] == 0


def test_digest_cache_survives_damage(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    split = open_dataset(copied_into_val(tmp_path / "ds")).split("train")
    idx = np.arange(len(split))
    first = cached_digests(split, idx, tmp_path / "c")
    assert np.array_equal(first, split_digests(split, idx))
    (entry,) = (tmp_path / "c" / "digests").glob("*.npy")
    entry.write_bytes(b"garbage")
    assert np.array_equal(cached_digests(split, idx, tmp_path / "c"), first)
    assert "damaged digest cache entry" in caplog.text
