"""Tiny ImageNet in its official layout, read from the folder and straight from the zip. A missing wnids.txt
and annotations naming a missing file or an unknown wnid are tested in tests/reliability/test_bad_data.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from builders import WNIDS, WORDS, jpeg_bytes, tiny_imagenet_files, write_folder, write_zip
from transferlab.data import DatasetSource, FileSplit, open_dataset
from transferlab.data.store import ZipStore
from transferlab.data.tinyimagenet import load_tiny_imagenet, looks_like_tiny_imagenet, parse_words
from transferlab.errors import DataError


def ids_and_targets(src: DatasetSource) -> dict[str, tuple[list[str], list[int]]]:
    return {name: (list(s.sample_ids), s.targets.tolist()) for name, s in src.splits.items()}


def test_folder_and_zip_agree(tiny_folder: Path, tiny_zip: Path) -> None:
    f = open_dataset(tiny_folder)
    z = open_dataset(tiny_zip)
    assert set(f.splits) == set(z.splits) == {"train", "val", "test"}
    assert ids_and_targets(f) == ids_and_targets(z)
    assert f.classes == z.classes
    for name in f.splits:
        fs, zs = f.split(name), z.split(name)
        for i in range(len(fs)):
            np.testing.assert_array_equal(np.asarray(fs.load(i)), np.asarray(zs.load(i)))
    assert f.name == "tiny-imagenet-200"
    assert z.name == "tiny-imagenet-200.zip"
    assert z.location == str(tiny_zip)
    assert z.split("val").origin(0) == f"{tiny_zip}:tiny-imagenet-200/val/images/val_0.JPEG"
    assert f.split("val").origin(0) == str(tiny_folder / "val" / "images" / "val_0.JPEG")


@pytest.mark.parametrize("kind", ["folder", "zip"])
def test_classes_follow_wnids_txt_with_names_from_words_txt(tiny_folder: Path, tiny_zip: Path, kind: str) -> None:
    src = open_dataset(tiny_folder if kind == "folder" else tiny_zip)
    assert list(WNIDS) != sorted(WNIDS)  # the fixture would not catch a sorting loader otherwise
    assert src.classes.ids == WNIDS
    assert src.classes.names == tuple(WORDS[w] for w in WNIDS)
    assert src.imagenet_classes is True


@pytest.mark.parametrize("kind", ["folder", "zip"])
def test_train_targets_come_from_the_class_folder(tiny_folder: Path, tiny_zip: Path, kind: str) -> None:
    train = open_dataset(tiny_folder if kind == "folder" else tiny_zip).split("train")
    assert len(train) == 9
    assert train.labeled
    for rel, t in zip(train.sample_ids, train.targets.tolist(), strict=True):
        wnid = rel.split("/")[1]
        assert rel.startswith(f"train/{wnid}/images/")
        assert t == WNIDS.index(wnid)
    # Follows wnids.txt order, so the first files are n02124075's (index 0), not the sorted-first n01443537.
    assert train.sample_ids[0] == "train/n02124075/images/n02124075_0.JPEG"
    assert train.targets.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert "train/n02124075/n02124075_boxes.txt" not in train.sample_ids


@pytest.mark.parametrize("kind", ["folder", "zip"])
def test_val_uses_the_train_index_map(tiny_folder: Path, tiny_zip: Path, kind: str) -> None:
    src = open_dataset(tiny_folder if kind == "folder" else tiny_zip)
    val = src.split("val")
    assert len(val) == 6
    assert val.labeled
    by_id = dict(zip(val.sample_ids, val.targets.tolist(), strict=True))
    # builders: val_k belongs to class WNIDS[k % 3]
    for k in range(6):
        assert by_id[f"val/images/val_{k}.JPEG"] == k % 3
        assert src.classes.ids[by_id[f"val/images/val_{k}.JPEG"]] == WNIDS[k % 3]
    # The image really is that class: builders make class k's images dominated by colour channel k.
    for i in range(len(val)):
        if i == 0:
            continue  # grayscale
        mean = np.asarray(val.load(i)).reshape(-1, 3).mean(axis=0)
        assert int(np.argmax(mean)) == val.targets[i]


@pytest.mark.parametrize("kind", ["folder", "zip"])
def test_grayscale_val_image_loads_as_rgb(tiny_folder: Path, tiny_zip: Path, kind: str) -> None:
    val = open_dataset(tiny_folder if kind == "folder" else tiny_zip).split("val")
    i = val.sample_ids.index("val/images/val_0.JPEG")
    img = val.load(i)
    assert img.mode == "RGB"
    arr = np.asarray(img)
    assert arr.shape == (64, 64, 3)
    assert (arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all()


@pytest.mark.parametrize("kind", ["folder", "zip"])
def test_test_split_is_unlabeled(tiny_folder: Path, tiny_zip: Path, kind: str) -> None:
    test = open_dataset(tiny_folder if kind == "folder" else tiny_zip).split("test")
    assert list(test.sample_ids) == ["test/images/test_0.JPEG", "test/images/test_1.JPEG"]
    assert test.targets.tolist() == [-1, -1]
    assert test.labeled is False
    assert test.load(1).mode == "RGB"


def test_all_splits_share_one_classinfo(tiny_zip: Path) -> None:
    src = open_dataset(tiny_zip)
    assert all(s.classes is src.classes for s in src.splits.values())
    assert all(isinstance(s, FileSplit) for s in src.splits.values())


@pytest.mark.parametrize("kind", ["folder", "zip"])
def test_counts_come_from_the_files(tmp_path: Path, kind: str) -> None:
    files = tiny_imagenet_files(n_train=5, n_val_per_class=1, n_test=4)
    path = write_folder(tmp_path / "t", files) if kind == "folder" else write_zip(tmp_path / "t.zip", files)
    src = open_dataset(path)
    assert len(src.split("train")) == 15
    assert np.bincount(src.split("train").targets).tolist() == [5, 5, 5]
    assert len(src.split("val")) == 3
    assert src.split("val").targets.tolist() == [0, 1, 2]
    assert len(src.split("test")) == 4


def test_uneven_class_counts(tmp_path: Path) -> None:
    files = tiny_imagenet_files(n_train=2)
    files[f"train/{WNIDS[2]}/images/{WNIDS[2]}_extra.JPEG"] = jpeg_bytes((1, 2, 200))
    src = open_dataset(write_folder(tmp_path / "t", files))
    assert np.bincount(src.split("train").targets).tolist() == [2, 2, 3]


def test_dataset_at_the_archive_top(tmp_path: Path) -> None:
    # Some zips have no tiny-imagenet-200/ top folder.
    z = write_zip(tmp_path / "flat.zip", tiny_imagenet_files(), top="")
    src = open_dataset(z)
    assert src.classes.ids == WNIDS
    assert len(src.split("train")) == 9
    assert src.split("val").origin(0) == f"{z}:val/images/val_0.JPEG"


def test_no_words_txt_uses_wnids_as_names(tmp_path: Path) -> None:
    files = tiny_imagenet_files()
    del files["words.txt"]
    src = open_dataset(write_folder(tmp_path / "t", files))
    assert src.classes.names == WNIDS


def test_parse_words() -> None:
    words = parse_words("n1\tcat, feline\n\nn2\tdog \n")
    assert words == {"n1": "cat, feline", "n2": "dog"}


def test_val_image_without_annotation_is_left_out(tmp_path: Path) -> None:
    files = tiny_imagenet_files()
    files["val/images/val_99.JPEG"] = jpeg_bytes((5, 5, 5))
    val = open_dataset(write_folder(tmp_path / "t", files)).split("val")
    assert len(val) == 6
    assert "val/images/val_99.JPEG" not in val.sample_ids


# --- errors ------------------------------------------------------------------------------------------


def _with_annotation_line(line: str) -> dict[str, bytes]:
    files = tiny_imagenet_files()
    files["val/val_annotations.txt"] += (line + "\n").encode()
    return files


def test_malformed_annotation_line(tmp_path: Path) -> None:
    files = _with_annotation_line("val_1.JPEG")
    with pytest.raises(DataError, match=r"val_annotations\.txt line 7: expected"):
        open_dataset(write_folder(tmp_path / "t", files))


def test_train_class_folder_not_in_wnids(tmp_path: Path) -> None:
    files = tiny_imagenet_files()
    files["train/n09999999/images/n09999999_0.JPEG"] = jpeg_bytes((1, 1, 1))
    with pytest.raises(DataError) as ei:
        open_dataset(write_folder(tmp_path / "t", files))
    msg = str(ei.value)
    assert "n09999999" in msg and "not listed in wnids.txt" in msg
    assert str(tmp_path / "t" / "train") in msg


def test_missing_wnids_txt_train_only_copy(tmp_path: Path) -> None:
    files = {k: v for k, v in tiny_imagenet_files().items() if k.startswith("train/")}
    with pytest.raises(DataError, match=r"wnids\.txt is missing"):
        open_dataset(write_folder(tmp_path / "t", files))


def test_empty_wnids_txt(tmp_path: Path) -> None:
    files = tiny_imagenet_files()
    files["wnids.txt"] = b"\n\n"
    with pytest.raises(DataError, match="lists no classes"):
        open_dataset(write_folder(tmp_path / "t", files))


def test_duplicate_wnid(tmp_path: Path) -> None:
    files = tiny_imagenet_files()
    files["wnids.txt"] += f"{WNIDS[0]}\n".encode()
    with pytest.raises(DataError, match=rf"wnids\.txt: duplicate class ids: \['{WNIDS[0]}'\]"):
        open_dataset(write_folder(tmp_path / "t", files))


def test_val_images_without_annotations_file(tmp_path: Path) -> None:
    files = tiny_imagenet_files()
    del files["val/val_annotations.txt"]
    with pytest.raises(DataError, match=r"val_annotations\.txt is missing, so the val images have no labels"):
        open_dataset(write_folder(tmp_path / "t", files))


def test_looks_like_tiny_imagenet(tiny_zip: Path, tmp_path: Path) -> None:
    assert looks_like_tiny_imagenet(ZipStore(tiny_zip))
    other = write_zip(tmp_path / "o.zip", {"cat/1.png": b"x", "dog/2.png": b"y"}, top="")
    assert not looks_like_tiny_imagenet(ZipStore(other))


def test_load_tiny_imagenet_name(tiny_zip: Path) -> None:
    src = load_tiny_imagenet(ZipStore(tiny_zip), name="mine")
    assert src.name == "mine"


# --- the real mini dataset ---------------------------------------------------------------------------


def test_real_mini_zip(mini_zip: Path) -> None:
    src = open_dataset(mini_zip)
    assert {k: len(v) for k, v in src.splits.items()} == {"train": 20000, "val": 5000, "test": 200}
    assert len(src.classes) == 200
    assert src.imagenet_classes is True
    val = src.split("val")
    assert val.sample_ids[0] == "val/images/val_0.JPEG"
    assert src.classes.ids[val.targets[0]] == "n03444034"
    assert src.split("train").labeled and val.labeled and not src.split("test").labeled
    assert np.bincount(src.split("train").targets, minlength=200).tolist() == [100] * 200
    img = val.load(0)
    assert img.mode == "RGB" and img.size == (64, 64)
