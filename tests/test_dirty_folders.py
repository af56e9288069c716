"""What a hand-made ImageFolder tends to hold, and what transferlab does with each (the README's Data table):
hidden files, odd suffixes, non-images, nested folders, symbolic links (good, broken, looping), mixed sizes,
classes present in one split only, and empty class folders."""

from __future__ import annotations

import io
import json
import logging
import os
from pathlib import Path

import pytest
from PIL import Image

from builders import WNIDS, tiny_imagenet_files, train_argv, write_folder, write_zip
from transferlab.cli import main
from transferlab.data import open_dataset
from transferlab.data.checks import check_dataset


def encoded(fmt: str, k: int, i: int = 0, size: tuple[int, int] = (16, 16)) -> bytes:
    """A small image in ``fmt`` (JPEG, PNG, WEBP, BMP, TIFF, GIF), coloured by class ``k`` and index ``i``."""
    buf = io.BytesIO()
    Image.new("RGB", size, (40 + 80 * k, 20 + 10 * i, 90)).save(buf, fmt)
    return buf.getvalue()


def two_class_split(prefix: str = "", n: int = 4) -> dict[str, bytes]:
    """``prefix`` + train/{cat,dog} (n images each) and val/{cat,dog} (2 each), all distinct."""
    return {
        f"{prefix}{s}/{c}/{i}.jpg": encoded("JPEG", k, i + (20 if s == "val" else 0))
        for s, m in (("train", n), ("val", 2))
        for k, c in enumerate(("cat", "dog"))
        for i in range(m)
    }


# --- hidden files, suffixes, non-images, nesting ------------------------------------------------------------


@pytest.mark.parametrize("kind", ["folder", "zip"])
def test_hidden_files_and_folders_are_never_samples(
    kind: str, tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    files = two_class_split()
    hidden = {
        "train/.DS_Store": b"\x00\x00\x00\x01Bud1",
        "train/cat/.DS_Store": b"\x00\x00\x00\x01Bud1",
        "train/cat/._0.jpg": b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X",  # AppleDouble: named like an image
        "train/cat/.ipynb_checkpoints/0-checkpoint.jpg": files["train/cat/0.jpg"],  # a valid copy: must not train
        "train/.ipynb_checkpoints/stray.jpg": encoded("JPEG", 0, 9),
        "train/dog/.hidden.jpg": encoded("JPEG", 1, 9),
    }
    extra = {".DS_Store": b"x", "__MACOSX/train/cat/._0.jpg": b"\x00\x05\x16\x07", ".ipynb_checkpoints/x.jpg": b"x"}
    tree = {**files, **hidden, **extra}
    path = write_folder(tmp_path / "ds", tree) if kind == "folder" else write_zip(tmp_path / "ds.zip", tree, top="")
    with caplog.at_level(logging.INFO, logger="transferlab"):
        src = open_dataset(path)
    assert src.classes.ids == ("cat", "dog")
    assert sorted(src.split("train").sample_ids) == sorted(k for k in files if k.startswith("train/"))
    where = (lambda r: str(path / r)) if kind == "folder" else (lambda r: f"{path}:{r}")
    assert sorted(src.ignored) == ["hidden"] and sorted(src.ignored["hidden"]) == sorted(where(r) for r in hidden)
    assert f"{path}: 6 file(s) are not samples: 6 hidden" in caplog.text
    assert main(["data", "check", str(path), "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "not samples (6 files left out):" in out and "  6 hidden: " in out


def test_suffixes_any_case_non_images_and_nested_folders(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    images = {
        "a/1.jpg": encoded("JPEG", 0, 1),
        "a/2.JPG": encoded("JPEG", 0, 2),
        "a/3.jpeg": encoded("JPEG", 0, 3),
        "a/4.webp": encoded("WEBP", 0, 4),
        "a/5.bmp": encoded("BMP", 0, 5),
        "a/6.tif": encoded("TIFF", 0, 6),
        "a/sub/deeper/7.PNG": encoded("PNG", 0, 7),  # a sub-folder's images belong to the class folder above
        "b/1.tiff": encoded("TIFF", 1, 1),
        "b/2.gif": encoded("GIF", 1, 2),
    }
    others = {
        "a/notes.txt": b"n",
        "a/labels.csv": b"f,l",
        "b/photo.heic": b"\x00\x00\x00\x18ftypheic",
        "b/README": b"r",
    }
    ds = write_folder(tmp_path / "ds", {**images, **others, "loose.jpg": encoded("JPEG", 2)})
    src = open_dataset(ds)
    split = src.split("all")
    assert sorted(split.sample_ids) == sorted(images)
    assert [src.classes.ids[t] for t in split.targets] == [r.split("/")[0] for r in split.sample_ids]
    assert sorted(src.ignored["not an image"]) == sorted(str(ds / r) for r in others)
    assert src.ignored["outside a class folder"] == [str(ds / "loose.jpg")]
    rep = check_dataset(src, workers=1, progress=False)
    assert rep.failures == [] and sum(rep.splits[0].modes.values()) == 9  # every suffix decodes
    assert main(["data", "check", str(ds), "--workers", "1", "--json", str(tmp_path / "c.json")]) == 0
    out = capsys.readouterr().out
    assert "not samples (5 files left out):" in out
    assert "  4 not an image (.csv 1, .txt 1, no suffix 1, .heic 1): " in out
    assert f"  1 outside a class folder: {ds / 'loose.jpg'}" in out
    ignored = json.loads((tmp_path / "c.json").read_text())["ignored"]
    assert ignored["not an image"]["count"] == 4 and ignored["outside a class folder"]["count"] == 1


def test_tiny_imagenet_leaves_out_hidden_copies_too(tmp_path: Path) -> None:
    files = tiny_imagenet_files()
    w = WNIDS[0]
    files[f"train/{w}/images/._{w}_0.JPEG"] = b"\x00\x05\x16\x07 AppleDouble"
    files[f"train/{w}/images/.ipynb_checkpoints/{w}_0-checkpoint.JPEG"] = files[f"train/{w}/images/{w}_0.JPEG"]
    src = open_dataset(write_zip(tmp_path / "t.zip", files))
    assert len(src.split("train")) == 9 and all("/." not in f for f in src.split("train").sample_ids)


# --- symbolic links ---------------------------------------------------------------------------------------


def linked_tree(tmp_path: Path) -> Path:
    """train/cat with a file link, a folder link, a broken link and a self-loop; train/dog a link to a folder
    elsewhere; train/bird a broken folder link; train/cat/up a link back to train/ (a loop)."""
    elsewhere = write_folder(
        tmp_path / "elsewhere",
        {"x.jpg": encoded("JPEG", 0, 5), "morecats/m.jpg": encoded("JPEG", 0, 6), "dogs/d.jpg": encoded("JPEG", 1, 5)},
    )
    ds = write_folder(tmp_path / "ds", {k: v for k, v in two_class_split().items() if "/dog/" not in k or "val/" in k})
    cat = ds / "train" / "cat"
    os.symlink(elsewhere / "x.jpg", cat / "link.jpg")
    os.symlink(elsewhere / "morecats", cat / "more")
    os.symlink(tmp_path / "gone.jpg", cat / "gone.jpg")
    os.symlink("self.jpg", cat / "self.jpg")
    os.symlink("..", cat / "up")
    os.symlink(elsewhere / "dogs", ds / "train" / "dog")
    os.symlink(tmp_path / "nowhere", ds / "train" / "bird")
    return ds


def test_symlinks_are_followed_loops_cut_and_broken_ones_reported(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    ds = linked_tree(tmp_path)
    with caplog.at_level(logging.INFO, logger="transferlab"):
        src = open_dataset(ds)
    assert src.classes.ids == ("cat", "dog")  # the broken bird link is no class
    cats = [
        f"train/cat/{n}" for n in ("0.jpg", "1.jpg", "2.jpg", "3.jpg", "gone.jpg", "link.jpg", "more/m.jpg", "self.jpg")
    ]
    assert list(src.split("train").sample_ids) == [*cats, "train/dog/d.jpg"]
    assert src.ignored == {"broken link": [str(ds / "train" / "bird")]}
    assert f"skipping {ds / 'train/cat/up'}: a symbolic link to one of its own parent folders" in caplog.text
    assert caplog.text.count("a symbolic link to one of its own parent folders") == 1  # said once, not per listing
    assert f"1 broken symbolic link(s) in {ds} were left out" in caplog.text

    assert main(["data", "check", str(ds), "--workers", "1", "--json", str(tmp_path / "c.json")]) == 1
    failures = {
        f["file"]: f["reason"] for f in json.loads((tmp_path / "c.json").read_text())["splits"]["train"]["failures"]
    }
    assert set(failures) == {str(ds / "train/cat/gone.jpg"), str(ds / "train/cat/self.jpg")}
    assert all("broken symbolic link" in r for r in failures.values())
    capsys.readouterr()


def test_train_stops_on_a_broken_image_link_unless_skipped(
    in1k32: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ds = write_folder(tmp_path / "ds", two_class_split())
    os.symlink(tmp_path / "gone.jpg", ds / "train" / "cat" / "gone.jpg")
    assert main(train_argv(ds, in1k32, tmp_path / "run", "--epochs", "1")) == 2
    err = capsys.readouterr().err
    assert f"{ds / 'train/cat/gone.jpg'}: cannot read: " in err and "broken symbolic link" in err
    assert main(train_argv(ds, in1k32, tmp_path / "run", "--epochs", "1", "--bad-images", "skip")) == 0
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["bad_images"]["skipped"] == 1


# --- sizes, class coverage, empty class folders -------------------------------------------------------------


def test_mixed_sizes_are_said_and_train_per_image(
    in1k32: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    files = two_class_split()
    files["train/cat/1.jpg"] = encoded("JPEG", 0, 1, size=(40, 24))
    files["val/dog/1.jpg"] = encoded("JPEG", 1, 21, size=(9, 31))
    ds = write_folder(tmp_path / "ds", files)
    assert main(["data", "check", str(ds), "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "sizes: 16x16 7, 40x24 1" in out
    assert (
        out.count("(sizes differ: train and evaluate decode and resize each image on its own, no decoded cache)") == 2
    )
    assert main(train_argv(ds, in1k32, tmp_path / "run", "--strategy", "bn-only", "--epochs", "1")) == 0
    err = capsys.readouterr().err
    assert "decoded cache: train images differ in size" in err and "decoding per image instead" in err


@pytest.mark.parametrize("kind", ["folder", "zip"])
def test_a_class_only_in_val_stops_training_and_says_where_it_is(
    kind: str, in1k32: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    files = two_class_split()
    files["val/bee/0.jpg"] = encoded("JPEG", 2, 0)
    files["train/zebra/0.jpg"] = encoded("JPEG", 3, 0)
    path = write_folder(tmp_path / "ds", files) if kind == "folder" else write_zip(tmp_path / "ds.zip", files, top="")
    line = f"{path} (train): class bee has no usable image in the train split (no train/bee folder; the class only "
    line += "has images in val)"
    assert main(["data", "check", str(path), "--workers", "1"]) == 1
    out = capsys.readouterr().out
    assert line in out and "no image of 1 class(es): zebra" in out  # val lacks zebra: said, not a failure
    assert main(train_argv(path, in1k32, tmp_path / "run", "--epochs", "1")) == 2
    assert line in capsys.readouterr().err


def test_a_class_only_in_train_trains(in1k32: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    files = two_class_split()
    files.update({f"train/zebra/{i}.jpg": encoded("JPEG", 3, i) for i in range(4)})
    ds = write_folder(tmp_path / "ds", files)
    assert main(["data", "check", str(ds), "--workers", "1"]) == 0
    assert "no image of 1 class(es): zebra" in capsys.readouterr().out
    assert main(train_argv(ds, in1k32, tmp_path / "run", "--epochs", "1")) == 0
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["num_classes"] == 3


@pytest.mark.parametrize("kind", ["folder", "zip"])
def test_an_empty_class_folder_is_a_class_that_stops_training(
    kind: str, in1k32: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # In a zip a folder exists only through its files: there the class folder holds just a text file.
    files = {**two_class_split(), "train/bee/notes.txt": b"todo: add bee images"}
    path = write_folder(tmp_path / "ds", files) if kind == "folder" else write_zip(tmp_path / "ds.zip", files, top="")
    if kind == "folder":
        (path / "train" / "owl").mkdir()  # truly empty
    src = open_dataset(path)
    empty = ["bee", "owl"] if kind == "folder" else ["bee"]
    assert src.classes.ids == ("bee", "cat", "dog", *(["owl"] if kind == "folder" else []))
    folder = (lambda c: str(path / "train" / c)) if kind == "folder" else (lambda c: f"{path}:train/{c}")
    assert main(["data", "check", str(path), "--workers", "1"]) == 1
    out = capsys.readouterr().out
    for c in empty:
        assert f"{folder(c)}: class {c} has no usable image in the train split (an empty class folder?)" in out
    assert main(train_argv(path, in1k32, tmp_path / "run", "--epochs", "1")) == 2
    err = capsys.readouterr().err
    assert f"{len(empty)} class(es) cannot be learned" in err and folder("bee") in err
