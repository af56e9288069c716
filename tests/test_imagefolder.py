"""Generic ImageFolder trees: root/<class>/*.png, or root/train|val/<class>/..., as folders or zips."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from builders import write_folder, write_zip
from transferlab.data import open_dataset
from transferlab.data.imagefolder import load_image_folder, looks_like_image_folder
from transferlab.data.store import FolderStore, ZipStore
from transferlab.errors import DataError

COLORS = {"zebra": (250, 250, 250), "ant": (200, 0, 0), "moth": (0, 200, 0), "bee": (0, 0, 200)}


def png(color: tuple[int, int, int], size: int = 8) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, "PNG")
    return buf.getvalue()


def flat_files() -> dict[str, bytes]:
    # Deliberately unsorted class creation order; a non-image file is ignored.
    return {
        "zebra/z1.png": png(COLORS["zebra"]),
        "ant/a2.png": png(COLORS["ant"]),
        "ant/a1.png": png(COLORS["ant"]),
        "moth/deeper/m1.png": png(COLORS["moth"]),
        "moth/notes.txt": b"not an image",
    }


def split_files() -> dict[str, bytes]:
    return {
        "train/zebra/1.png": png(COLORS["zebra"]),
        "train/ant/1.png": png(COLORS["ant"]),
        "train/ant/2.png": png(COLORS["ant"]),
        "val/bee/1.png": png(COLORS["bee"]),
        "val/ant/3.png": png(COLORS["ant"]),
        "README.md": b"hello",
    }


def make(tmp_path: Path, files: dict[str, bytes], kind: str, top: str = "") -> Path:
    if kind == "folder":
        return write_folder(tmp_path / "ds", files)
    return write_zip(tmp_path / "ds.zip", files, top=top)


def check_colours(src, split: str) -> None:  # type: ignore[no-untyped-def]
    s = src.split(split)
    for i in range(len(s)):
        cid = src.classes.ids[s.targets[i]]
        px = np.asarray(s.load(i))[0, 0].tolist()
        assert px == list(COLORS[cid]), (s.sample_ids[i], cid)


@pytest.mark.parametrize("kind", ["folder", "zip"])
def test_flat_layout_is_one_split_all(tmp_path: Path, kind: str) -> None:
    src = open_dataset(make(tmp_path, flat_files(), kind))
    assert list(src.splits) == ["all"]
    assert src.classes.ids == ("ant", "moth", "zebra")
    assert src.classes.names == src.classes.ids
    s = src.split("all")
    assert list(s.sample_ids) == ["ant/a1.png", "ant/a2.png", "moth/deeper/m1.png", "zebra/z1.png"]
    assert s.targets.tolist() == [0, 0, 1, 2]
    assert s.labeled
    assert src.imagenet_classes is False
    check_colours(src, "all")


@pytest.mark.parametrize("kind", ["folder", "zip"])
def test_split_layout_shares_the_sorted_union_of_classes(tmp_path: Path, kind: str) -> None:
    src = open_dataset(make(tmp_path, split_files(), kind))
    assert set(src.splits) == {"train", "val"}
    # bee only in val, zebra only in train: one index map for both.
    assert src.classes.ids == ("ant", "bee", "zebra")
    train, val = src.split("train"), src.split("val")
    assert list(train.sample_ids) == ["train/ant/1.png", "train/ant/2.png", "train/zebra/1.png"]
    assert train.targets.tolist() == [0, 0, 2]
    assert list(val.sample_ids) == ["val/ant/3.png", "val/bee/1.png"]
    assert val.targets.tolist() == [0, 1]
    assert train.classes is val.classes is src.classes
    check_colours(src, "train")
    check_colours(src, "val")


@pytest.mark.parametrize("kind", ["folder", "zip"])
def test_valid_folder_becomes_val(tmp_path: Path, kind: str) -> None:
    files = {"train/ant/1.png": png(COLORS["ant"]), "valid/ant/2.png": png(COLORS["ant"])}
    src = open_dataset(make(tmp_path, files, kind))
    assert set(src.splits) == {"train", "val"}
    assert list(src.split("val").sample_ids) == ["valid/ant/2.png"]


def test_two_validation_folders_are_an_error(tmp_path: Path) -> None:
    files = {"val/ant/1.png": png(COLORS["ant"]), "valid/ant/2.png": png(COLORS["ant"])}
    with pytest.raises(DataError, match="more than one validation folder"):
        open_dataset(make(tmp_path, files, "folder"))


@pytest.mark.parametrize("files", [flat_files(), split_files()], ids=["flat", "splits"])
def test_zip_with_a_wrapping_top_folder(tmp_path: Path, files: dict[str, bytes]) -> None:
    # zip -r ds.zip ds/ puts everything below ds/: that folder must not become the only class.
    plain = open_dataset(make(tmp_path / "a", files, "zip"))
    wrapped = open_dataset(make(tmp_path / "b", files, "zip", top="mydata"))
    assert wrapped.classes == plain.classes
    assert {k: list(v.sample_ids) for k, v in wrapped.splits.items()} == {
        k: list(v.sample_ids) for k, v in plain.splits.items()
    }
    assert {k: v.targets.tolist() for k, v in wrapped.splits.items()} == {
        k: v.targets.tolist() for k, v in plain.splits.items()
    }
    first = next(iter(wrapped.splits.values()))
    assert first.origin(0).endswith(f"ds.zip:mydata/{first.sample_ids[0]}")
    assert np.asarray(first.load(0)).shape == (8, 8, 3)


def test_single_class_folder_is_not_taken_for_a_wrapper(tmp_path: Path) -> None:
    files = {"ant/1.png": png(COLORS["ant"]), "ant/2.png": png(COLORS["ant"])}
    src = open_dataset(make(tmp_path, files, "folder"))
    assert src.classes.ids == ("ant",)
    assert len(src.split("all")) == 2


def test_macos_metadata_is_not_a_class(tmp_path: Path) -> None:
    files = flat_files()
    files["__MACOSX/ant/._a1.png"] = b"\x00\x05\x16\x07 AppleDouble"
    files["ant/._a3.png"] = b"\x00\x05\x16\x07 AppleDouble"
    files[".hidden/x.png"] = png((1, 2, 3))
    src = open_dataset(make(tmp_path, files, "zip"))
    assert src.classes.ids == ("ant", "moth", "zebra")
    assert "ant/._a3.png" not in src.split("all").sample_ids
    assert len(src.split("all")) == 4


@pytest.mark.parametrize("kind", ["folder", "zip"])
def test_no_images_is_a_data_error(tmp_path: Path, kind: str) -> None:
    files = {"docs/readme.txt": b"x", "cat/labels.csv": b"a,b", "top.png": png((1, 1, 1))}
    path = make(tmp_path, files, kind)
    store = FolderStore(path) if kind == "folder" else ZipStore(path)
    assert not looks_like_image_folder(store)
    with pytest.raises(DataError, match="holds no <class>/<image> folders with image files"):
        load_image_folder(store)
    with pytest.raises(DataError, match="not a dataset transferlab recognises"):
        open_dataset(path)


def test_empty_split_folders_are_a_data_error(tmp_path: Path) -> None:
    files = {"train/ant/notes.txt": b"x", "val/readme": b"y"}
    with pytest.raises(DataError):
        open_dataset(make(tmp_path, files, "folder"))


def test_imagenet_wnid_folders_are_flagged(tmp_path: Path) -> None:
    files = {"n01443537/1.png": png((1, 1, 1)), "n02124075/1.png": png((2, 2, 2))}
    src = open_dataset(make(tmp_path, files, "folder"))
    assert src.imagenet_classes is True
    assert src.classes.ids == ("n01443537", "n02124075")


def test_name_and_location(tmp_path: Path) -> None:
    path = make(tmp_path, flat_files(), "zip")
    src = open_dataset(path)
    assert src.name == "ds.zip"
    assert src.location == str(path)
    assert load_image_folder(ZipStore(path)).name == "imagefolder"
