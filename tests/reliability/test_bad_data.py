"""Dirty data: every kind of broken image is named with its reason (one file at a time, by ``data check``,
and by ``train`` before any training), odd but valid images decode correctly, malformed dataset files stop
loading with the line and file at fault, and ``--bad-images skip`` leaves broken files out, counted."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

import transferlab.data.images as images_mod
from builders import DIRTY, WNIDS, bomb_png, jpeg_bytes, tiny_imagenet_files, train_argv, write_folder, write_zip
from test_cifar10 import _batch_bytes, _files
from test_cifar10 import _write as write_cifar
from test_images import ORIGIN, encode, pixels
from test_tinyimagenet import _with_annotation_line
from transferlab.cli import main
from transferlab.data import cifar10, open_dataset
from transferlab.data.cifar10 import load_cifar10
from transferlab.data.images import decode_image, open_image
from transferlab.errors import BadImageError, DataError

pytestmark = pytest.mark.usefixtures("one_thread")


# --- one file at a time ------------------------------------------------------------------------------


def test_zero_byte_file() -> None:
    with pytest.raises(BadImageError) as ei:
        decode_image(b"", ORIGIN)
    assert ei.value.origin == ORIGIN
    assert "empty" in ei.value.reason and "0 bytes" in ei.value.reason
    assert ORIGIN in str(ei.value)
    assert isinstance(ei.value, DataError)


def test_truncated_jpeg_is_an_error_not_padded() -> None:
    data = jpeg_bytes((120, 60, 30))
    decode_image(data, ORIGIN)  # the whole file is fine
    with pytest.raises(BadImageError) as ei:
        decode_image(data[: len(data) // 2], ORIGIN)
    assert ei.value.origin == ORIGIN
    assert "truncated" in ei.value.reason.lower()
    assert ORIGIN in str(ei.value)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_text_file_named_jpeg() -> None:
    with pytest.raises(BadImageError) as ei:
        decode_image(b"<html>404 Not Found</html>\n", "val/images/val_3.JPEG")
    assert ei.value.origin == "val/images/val_3.JPEG"
    assert "not an image" in ei.value.reason


def test_limits_are_set_at_import() -> None:
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    assert Image.MAX_IMAGE_PIXELS == images_mod.MAX_IMAGE_PIXELS == 64_000_000


def test_real_decompression_bomb_is_refused_at_the_default_limit() -> None:
    data = bomb_png(8192, 8192)  # 67 Mpx of zeros in ~65 KB
    assert len(data) < 100_000
    with pytest.raises(BadImageError) as ei:
        decode_image(data, ORIGIN)
    assert "decompression bomb" in ei.value.reason and "64000000" in ei.value.reason


def test_decompression_bomb_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(images_mod, "MAX_IMAGE_PIXELS", 100)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    data = encode(Image.new("L", (20, 20), 3), "PNG")  # 400 pixels
    with pytest.raises(BadImageError) as ei:
        decode_image(data, ORIGIN)
    assert ei.value.origin == ORIGIN
    assert "decompression bomb" in ei.value.reason
    # Just under the limit is fine.
    decode_image(encode(Image.new("L", (10, 10), 3), "PNG"), ORIGIN)


def test_decompression_bomb_caught_by_pil_limit_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    # Even where only PIL's own limit trips (its warning or error), the result is a BadImageError.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    for side in (12, 40):  # 144 px: PIL warns; 1,600 px (> 2x): PIL raises
        with pytest.raises(BadImageError) as ei:
            decode_image(encode(Image.new("L", (side, side), 3), "PNG"), ORIGIN)
        assert "decompression bomb" in ei.value.reason


def test_cmyk_jpeg_becomes_rgb() -> None:
    # Pure cyan ink + no black = RGB (0, 255, 255); pure magenta + yellow = red.
    data = encode(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG", quality=95)
    assert open_image(data, ORIGIN).mode == "CMYK"
    out = decode_image(data, ORIGIN)
    assert out.mode == "RGB"
    r, g, b = pixels(out)[8, 8]
    assert r > 240 and g < 15 and b < 15


def test_16bit_png_is_scaled_to_8bit() -> None:
    arr = np.array([[0, 32768, 65535, 257]], dtype=np.uint16)
    data = encode(Image.fromarray(arr), "PNG")
    assert open_image(data, ORIGIN).mode == "I;16"
    out = np.asarray(decode_image(data, ORIGIN))
    assert out.dtype == np.uint8 and out.shape == (1, 4, 3)
    assert out[0, 0].tolist() == [0, 0, 0]
    assert abs(int(out[0, 1, 0]) - 128) <= 1
    assert out[0, 2].tolist() == [255, 255, 255]
    assert out[0, 3].tolist() == [1, 1, 1]


def test_dark_16bit_image_is_not_stretched() -> None:
    # The same dark 16-bit data looks the same (dark) whether stored as PNG (mode I;16) or PGM (mode I).
    arr = np.array([[0, 1000, 2000]], dtype=np.uint16)
    png = np.asarray(decode_image(encode(Image.fromarray(arr), "PNG"), ORIGIN))[0, :, 0]
    pgm_data = encode(Image.fromarray(arr), "PPM")
    assert open_image(pgm_data, ORIGIN).mode == "I"
    pgm = np.asarray(decode_image(pgm_data, ORIGIN))[0, :, 0]
    assert png.tolist() == [0, 4, 8]
    assert pgm.tolist() == [0, 4, 8]


# --- malformed dataset files -------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["folder", "zip"])
def test_missing_wnids_txt_fails_with_a_message(tmp_path: Path, kind: str) -> None:
    # Must not fall back to reading the tree as a generic ImageFolder (with a class called "images").
    files = tiny_imagenet_files()
    del files["wnids.txt"]
    path = write_folder(tmp_path / "t", files) if kind == "folder" else write_zip(tmp_path / "t.zip", files)
    with pytest.raises(DataError) as ei:
        open_dataset(path)
    assert "wnids.txt is missing" in str(ei.value)
    assert str(path) in str(ei.value)


@pytest.mark.parametrize("kind", ["folder", "zip"])
def test_annotation_naming_a_missing_file(tmp_path: Path, kind: str) -> None:
    files = _with_annotation_line("val_404.JPEG\tn01443537\t0\t0\t1\t1")
    path = write_folder(tmp_path / "t", files) if kind == "folder" else write_zip(tmp_path / "t.zip", files)
    with pytest.raises(DataError) as ei:
        open_dataset(path)
    msg = str(ei.value)
    assert "val_annotations.txt line 7" in msg
    assert "val_404.JPEG does not exist" in msg


def test_annotation_naming_an_unknown_wnid(tmp_path: Path) -> None:
    files = _with_annotation_line("val_1.JPEG\tn99999999\t0\t0\t1\t1")
    with pytest.raises(DataError, match=r"val_annotations\.txt line 7: class 'n99999999' is not in wnids\.txt"):
        open_dataset(write_folder(tmp_path / "t", files))


def test_cifar_batch_of_the_wrong_shape(tmp_path: Path) -> None:
    bad = np.zeros((10, 3000), np.uint8)
    files = _files({"data_batch_1": _batch_bytes("data_batch_1", bad, [0] * 10)})
    with pytest.raises(DataError, match=r"data_batch_1.*shape \(10, 3000\), expected \(N, 3072\)"):
        load_cifar10(write_cifar(tmp_path, files))


def test_cifar_batch_with_the_wrong_md5(tmp_path: Path) -> None:
    """A 10000-row batch claims to be official, so its md5 must match (checked before unpickling)."""
    data = np.zeros((10000, 3072), np.uint8)
    raw = _batch_bytes("test_batch", data, [0] * 10000)
    root = write_cifar(tmp_path, _files({"test_batch": raw}))
    actual = hashlib.md5(raw).hexdigest()
    expected = cifar10.OFFICIAL_MD5["test_batch"]
    with pytest.raises(DataError, match=rf"test_batch has md5 {actual}, expected {expected}"):
        load_cifar10(root)
    assert len(load_cifar10(root, verify="off").split("test")) == 10000


# --- a whole dataset: data check, train --bad-images error|skip ---------------------------------------


def test_data_check_names_every_bad_file_and_empty_class(
    dirty_ds: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    empty_class = tmp_path / "t" / "train" / WNIDS[2]
    write_folder(tmp_path / "t", {k: v for k, v in tiny_imagenet_files().items() if f"/{WNIDS[2]}_" not in k})
    (empty_class / "images").mkdir(parents=True)  # the class folder is there, its images are not
    assert main(["data", "check", str(tmp_path / "t"), "--workers", "1", "--json", str(tmp_path / "c.json")]) == 1
    out = capsys.readouterr().out
    assert f"{empty_class}: class {WNIDS[2]} (reel) has no usable image in the train split" in out

    assert main(["data", "check", str(dirty_ds), "--workers", "1", "--json", str(tmp_path / "d.json")]) == 1
    out = capsys.readouterr().out
    for rel, (_, words) in DIRTY.items():
        line = next((x for x in out.splitlines() if str(dirty_ds / rel) in x), "")
        assert words in line.lower(), (rel, line)
    assert "_cmyk" not in out and "_16bit" not in out  # unusual, not broken
    report = json.loads((tmp_path / "d.json").read_text())
    assert report["failures"] == len(DIRTY) == 5
    assert report["splits"]["train"]["modes"]["CMYK"] == 1 and report["splits"]["train"]["modes"]["I;16"] == 1


def test_train_stops_before_training_and_names_every_bad_file(
    dirty_ds: Path, in1k32: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    assert main(train_argv(dirty_ds, in1k32, run, "--strategy", "bn-only", "--epochs", "1")) == 2
    err = capsys.readouterr().err
    assert "5 image(s) cannot be decoded" in err and "Nothing was trained" in err and "--bad-images skip" in err
    for rel, (_, words) in DIRTY.items():
        line = next((x for x in err.splitlines() if str(dirty_ds / rel) in x), "")
        assert words in line.lower(), (rel, line)
    assert not (run / "checkpoints").exists() and not (run / "metrics.json").exists()


def test_bad_images_skip_leaves_them_out_and_counts_them(
    dirty_ds: Path, train_ds: Path, in1k32: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    argv = train_argv(dirty_ds, in1k32, run, "--strategy", "bn-only", "--epochs", "1", "--bad-images", "skip")
    assert main(argv) == 0
    err = capsys.readouterr().err
    for rel in DIRTY:
        assert f"skipping {dirty_ds / rel}: " in err
    m = json.loads((run / "metrics.json").read_text())
    bad = m["bad_images"]
    assert bad["policy"] == "skip" and bad["skipped"] == 5 and bad["empty_classes"] == []
    assert {f["file"] for f in bad["files"]} == {str(dirty_ds / rel) for rel in DIRTY}
    assert {f["split"] for f in bad["files"]} == {"train", "val"}
    assert m["n_fit"] + m["n_holdout"] == 30 + 2  # train_ds's 30, the CMYK and the 16-bit image
    assert m["n"] == 12  # the broken val image is not reported on
    # The decode pass is cached (one entry per split), keyed by the samples' fingerprint.
    assert len(list((tmp_path / "cache" / "image-checks").glob("*.json"))) == 2


def test_empty_class_folder_stops_training_unless_skipped(
    in1k32: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    files = {k: v for k, v in tiny_imagenet_files(n_train=4).items() if f"train/{WNIDS[1]}/images/" not in k}
    ds = write_folder(tmp_path / "ds", files)  # train/<wnid>/ holds only its boxes file
    run = tmp_path / "run"
    assert main(train_argv(ds, in1k32, run, "--strategy", "bn-only", "--epochs", "1")) == 2
    err = capsys.readouterr().err
    assert f"{ds / 'train' / WNIDS[1]}: class {WNIDS[1]} (goldfish, Carassius auratus) has no usable image" in err
    assert "1 class(es) cannot be learned" in err
    argv = train_argv(ds, in1k32, run, "--strategy", "bn-only", "--epochs", "1", "--bad-images", "skip")
    assert main(argv) == 0
    m = json.loads((run / "metrics.json").read_text())
    assert m["bad_images"]["skipped"] == 0 and len(m["bad_images"]["empty_classes"]) == 1
