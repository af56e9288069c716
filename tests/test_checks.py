"""``data check``: decode everything, count what is there, and name every broken file with its reason."""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from builders import WNIDS, jpeg_bytes, tiny_imagenet_files, write_folder, write_zip
from transferlab.cli import main
from transferlab.data import ArraySplit, ClassInfo, DatasetSource, open_dataset
from transferlab.data.checks import CheckReport, check_dataset

GOOD_JPEG = jpeg_bytes((10, 200, 30))
BAD_FILES = {
    # name -> (bytes, words the reason must contain)
    f"train/{WNIDS[0]}/images/{WNIDS[0]}_empty.JPEG": (b"", "0 bytes"),
    f"train/{WNIDS[0]}/images/{WNIDS[0]}_half.JPEG": (GOOD_JPEG[: len(GOOD_JPEG) // 2], "truncated"),
    # Sorts last in the last class, so with > 500 train images it lands in a different chunk.
    f"train/{WNIDS[2]}/images/{WNIDS[2]}_zzz_text.JPEG": (b"Not Found: the server returned HTML\n", "not an image"),
}


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    # cli.main replaces the root logger's handlers; put them back so later tests are unaffected.
    root = logging.getLogger()
    tl = logging.getLogger("transferlab")
    saved = (root.handlers[:], root.level, tl.level)
    yield
    root.handlers[:], _, _ = saved
    root.setLevel(saved[1])
    tl.setLevel(saved[2])


def with_bad_files(files: dict[str, bytes]) -> dict[str, bytes]:
    out = dict(files)
    out.update({rel: data for rel, (data, _) in BAD_FILES.items()})
    return out


def report_summary(rep: CheckReport) -> dict[str, object]:
    return {
        s.name: (s.n, s.labeled, dict(s.modes), dict(s.sizes), s.per_class, s.failures, s.grayscale) for s in rep.splits
    }


def test_clean_tiny_folder(tiny_folder: Path) -> None:
    rep = check_dataset(open_dataset(tiny_folder), workers=1, progress=False)
    by = {s.name: s for s in rep.splits}
    assert set(by) == {"train", "val", "test"}
    assert rep.num_classes == 3 and rep.imagenet_classes is True
    assert rep.total == 17
    assert rep.failures == []
    assert (by["train"].n, by["val"].n, by["test"].n) == (9, 6, 2)
    assert by["train"].modes == Counter({"RGB": 9})
    assert by["val"].modes == Counter({"RGB": 5, "L": 1})
    assert by["val"].grayscale == 1 and by["train"].grayscale == 0 and by["test"].grayscale == 0
    assert by["val"].sizes == Counter({"64x64": 6})
    assert by["train"].per_class == [3, 3, 3]
    assert by["val"].per_class == [2, 2, 2]
    assert by["test"].labeled is False and by["test"].per_class == []
    d = rep.to_dict()
    assert d["total"] == 17 and d["failures"] == 0
    assert d["splits"]["val"]["grayscale"] == 1
    assert d["splits"]["val"]["modes"] == {"RGB": 5, "L": 1}
    assert d["splits"]["train"]["per_class_min"] == 3
    assert d["splits"]["test"]["per_class_min"] is None
    json.dumps(d)


@pytest.mark.parametrize("kind", ["folder", "zip"])
def test_broken_files_are_each_reported(tmp_path: Path, kind: str) -> None:
    files = with_bad_files(tiny_imagenet_files())
    path = write_folder(tmp_path / "t", files) if kind == "folder" else write_zip(tmp_path / "t.zip", files)
    src = open_dataset(path)
    rep = check_dataset(src, workers=1, progress=False)
    train = next(s for s in rep.splits if s.name == "train")
    assert train.n == 12  # the broken files are still samples of the split
    assert sum(train.modes.values()) == 9  # every good image was still decoded and counted
    assert train.modes == Counter({"RGB": 9})
    assert len(rep.failures) == 3 == len(train.failures)
    reasons = dict(train.failures)
    for rel, (_, words) in BAD_FILES.items():
        origin = str(path / rel) if kind == "folder" else f"{path}:tiny-imagenet-200/{rel}"
        assert origin in reasons, (origin, reasons)
        assert words in reasons[origin].lower()
    # The other splits are untouched.
    assert [s.failures for s in rep.splits if s.name != "train"] == [[], []]


def test_workers_1_and_2_give_the_same_report(tmp_path: Path) -> None:
    # > 500 train images, so the split is checked in several chunks across processes.
    files = with_bad_files(tiny_imagenet_files(n_train=170, n_val_per_class=1, n_test=1))
    src = open_dataset(write_zip(tmp_path / "t.zip", files))
    assert len(src.split("train")) == 513
    one = check_dataset(src, workers=1, progress=False)
    two = check_dataset(src, workers=2, progress=False)
    assert report_summary(one) == report_summary(two)
    assert len(two.failures) == 3
    assert two.failures == one.failures  # same order, too
    train = next(s for s in two.splits if s.name == "train")
    assert train.modes == Counter({"RGB": 510})
    assert train.per_class == [172, 170, 171]
    assert train.failures[-1][0].endswith("_zzz_text.JPEG")  # found by the second chunk


def test_array_split_is_checked(tmp_path: Path) -> None:
    imgs = np.zeros((3, 4, 5, 3), dtype=np.uint8)
    classes = ClassInfo(("a", "b"), ("a", "b"))
    src = DatasetSource("arr", "mem", classes, {"train": ArraySplit("train", imgs, [0, 1, 1], classes)})
    rep = check_dataset(src, workers=2, progress=False)
    assert rep.splits[0].modes == Counter({"RGB": 3})
    assert rep.splits[0].sizes == Counter({"5x4": 3})
    assert rep.splits[0].per_class == [1, 2]


# --- CLI ---------------------------------------------------------------------------------------------


def test_cli_reports_bad_files_and_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_folder(tmp_path / "t", with_bad_files(tiny_imagenet_files()))
    out_json = tmp_path / "report.json"
    assert main(["data", "check", str(path), "--workers", "1", "--json", str(out_json)]) == 1
    out = capsys.readouterr().out
    assert "3 file(s) failed to decode" in out
    for rel in BAD_FILES:
        assert str(path / rel) in out
    assert "0 bytes" in out and "truncated" in out and "not an image" in out
    assert "20 images, 3 classes" in out
    assert "all images decoded" not in out
    saved = json.loads(out_json.read_text())
    assert saved["failures"] == 3
    assert {f["file"] for f in saved["splits"]["train"]["failures"]} == {str(path / r) for r in BAD_FILES}


def test_cli_clean_folder_exits_0(tiny_folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data", "check", str(tiny_folder)]) == 0
    out = capsys.readouterr().out
    assert f"{tiny_folder}: 17 images, 3 classes (ImageNet-1k classes)" in out
    assert "all images decoded" in out
    lines = {line.split()[0]: line for line in out.splitlines() if line.startswith("  ") and "images" in line}
    assert "9 images" in lines["train"] and "0 grayscale" in lines["train"] and "0 failed" in lines["train"]
    assert "6 images" in lines["val"] and "1 grayscale" in lines["val"]
    assert "(unlabeled)" in lines["test"]
    assert "modes: RGB 5, L 1" in out
    assert "sizes: 64x64 9" in out


def test_cli_missing_path_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data", "check", "/nonexistent/x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ")
    assert "/nonexistent/x" in err
    assert "Traceback" not in err


@pytest.mark.slow
def test_cli_real_mini_zip(mini_zip: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data", "check", str(mini_zip)]) == 0
    out = capsys.readouterr().out
    assert f"{mini_zip}: 25,200 images, 200 classes (ImageNet-1k classes)" in out
    lines = {line.split()[0]: line for line in out.splitlines() if line.startswith("  ") and " images" in line}
    assert "20,000 images" in lines["train"] and "100-100 per class" in lines["train"]
    assert "380 grayscale" in lines["train"]
    assert "5,000 images" in lines["val"] and "84 grayscale" in lines["val"]
    assert "200 images (unlabeled)" in lines["test"] and "3 grayscale" in lines["test"]
    assert all("0 failed" in line for line in lines.values())
    assert "all images decoded" in out
