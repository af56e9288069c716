"""The decoded cache (memory-mapped uint8 splits) and the batched tensor pipeline that reads it."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from builders import jpeg_bytes, tiny_imagenet_files, write_folder, write_zip
from transferlab.data import open_dataset
from transferlab.data.augment import AffineParams, EvalAsTrain, SeedAugment, TrainTransform, sample_rng
from transferlab.data.base import split_fingerprint
from transferlab.data.batched import ArrayBatches, draw_params, eval_batch, gather, train_batch
from transferlab.data.decoded import BLOCK, DecodedSplit, decode_split, pixel_array
from transferlab.data.transforms import EvalTransform
from transferlab.errors import BadImageError

CPU = torch.device("cpu")


def _entry(root: Path) -> Path:
    (folder,) = [p for p in (root / "decoded").iterdir() if not p.name.startswith(".")]
    return folder


def _pil_pixels(split, i: int) -> np.ndarray:
    return np.asarray(split.load(i), dtype=np.uint8)


def test_decoded_split_holds_the_decoded_pixels_and_keeps_the_fingerprint(tiny_zip: Path, tmp_path: Path) -> None:
    val = open_dataset(tiny_zip).split("val")
    dec = decode_split(val, tmp_path)
    assert isinstance(dec, DecodedSplit)
    assert dec.images.shape == (len(val), 64, 64, 3) and dec.images.dtype == np.uint8
    for i in range(len(val)):  # the grayscale first image comes out as RGB, like the PIL path
        np.testing.assert_array_equal(dec.images[i], _pil_pixels(val, i))
    assert list(dec.sample_ids) == list(val.sample_ids) and (dec.targets == val.targets).all()
    assert split_fingerprint(dec) == split_fingerprint(val)  # caches and study reuse see the same data
    assert pixel_array(dec) is dec.images and pixel_array(val) is None
    assert decode_split(dec, tmp_path) is dec


def test_second_open_reads_the_cache_without_decoding(tiny_zip: Path, tmp_path: Path, monkeypatch) -> None:
    val = open_dataset(tiny_zip).split("val")
    first = decode_split(val, tmp_path)
    monkeypatch.setattr(type(val), "load", lambda self, i: (_ for _ in ()).throw(AssertionError("decoded again")))
    again = decode_split(val, tmp_path)
    np.testing.assert_array_equal(np.asarray(again.images), np.asarray(first.images))


def test_truncated_cache_is_detected_and_rebuilt(tiny_zip: Path, tmp_path: Path, caplog) -> None:
    val = open_dataset(tiny_zip).split("val")
    decode_split(val, tmp_path)
    data = _entry(tmp_path) / "images.u8"
    with open(data, "r+b") as f:
        f.truncate(data.stat().st_size - 100)
    with caplog.at_level(logging.WARNING, logger="transferlab.data.decoded"):
        dec = decode_split(val, tmp_path)
    assert "truncated" in caplog.text and "images.u8" in caplog.text
    for i in range(len(val)):
        np.testing.assert_array_equal(dec.images[i], _pil_pixels(val, i))


def test_corrupted_bytes_are_detected_by_the_checksums(tiny_zip: Path, tmp_path: Path, caplog) -> None:
    val = open_dataset(tiny_zip).split("val")
    decode_split(val, tmp_path)
    data = _entry(tmp_path) / "images.u8"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # same size, one flipped byte
    data.write_bytes(bytes(raw))
    with caplog.at_level(logging.WARNING, logger="transferlab.data.decoded"):
        dec = decode_split(val, tmp_path)
    assert "checksum" in caplog.text
    np.testing.assert_array_equal(np.asarray(dec.images).reshape(-1), np.frombuffer(bytes(data.read_bytes()), np.uint8))
    np.testing.assert_array_equal(dec.images[len(val) // 2], _pil_pixels(val, len(val) // 2))


def test_a_replaced_source_file_is_not_served_from_the_stale_cache(tmp_path: Path) -> None:
    files = tiny_imagenet_files()
    root = write_folder(tmp_path / "ds", files)
    cache = tmp_path / "cache"
    before = decode_split(open_dataset(root).split("val"), cache)
    old = np.asarray(before.images[1]).copy()
    target = root / "val" / "images" / "val_1.JPEG"
    target.write_bytes(jpeg_bytes((250, 10, 10)))
    os.utime(target, ns=(1, 1))  # a different mtime even on coarse clocks
    after = decode_split(open_dataset(root).split("val"), cache)
    assert after.folder != before.folder
    np.testing.assert_array_equal(after.images[1], _pil_pixels(open_dataset(root).split("val"), 1))
    assert not np.array_equal(after.images[1], old)


def test_mixed_sizes_fall_back_to_per_image_decoding_and_remember_it(tmp_path: Path, monkeypatch) -> None:
    files = tiny_imagenet_files()
    files["val/images/val_3.JPEG"] = jpeg_bytes((10, 200, 10), size=48)
    root = write_folder(tmp_path / "ds", files)
    val = open_dataset(root).split("val")
    assert decode_split(val, tmp_path / "c") is val
    calls = []
    orig = type(val).load
    monkeypatch.setattr(type(val), "load", lambda self, i: calls.append(i) or orig(self, i))
    assert decode_split(val, tmp_path / "c") is val
    assert calls == []  # the mixed-size verdict was recorded, not recomputed


def test_unreadable_images_raise_their_own_error_from_the_cache(tmp_path: Path) -> None:
    files = tiny_imagenet_files()
    files["val/images/val_0.JPEG"] = files["val/images/val_0.JPEG"][:50]  # truncated JPEG, first sample
    files["val/images/val_4.JPEG"] = b""
    zpath = write_zip(tmp_path / "ds.zip", files)
    val = open_dataset(zpath).split("val")
    dec = decode_split(val, tmp_path / "c")
    assert isinstance(dec, DecodedSplit) and set(dec.bad) == {0, 4}
    with pytest.raises(BadImageError, match=r"val_4\.JPEG"):
        dec.load(4)
    np.testing.assert_array_equal(dec.images[2], _pil_pixels(val, 2))
    again = decode_split(open_dataset(zpath).split("val"), tmp_path / "c")  # checksums of zero rows hold
    assert set(again.bad) == {0, 4}


def test_many_blocks_round_trip(tmp_path: Path) -> None:
    files = tiny_imagenet_files(n_train=1, n_val_per_class=1)
    for k in range(BLOCK + 5):  # more rows than one checksum block
        files[f"val/images/val_x{k}.JPEG"] = jpeg_bytes((k % 256, 7, 7), size=8)
    del files["val/images/val_0.JPEG"], files["val/images/val_1.JPEG"], files["val/images/val_2.JPEG"]
    lines = [f"val_x{k}.JPEG\tn02124075\t0\t0\t7\t7" for k in range(BLOCK + 5)]
    files["val/val_annotations.txt"] = ("\n".join(lines) + "\n").encode()
    root = write_folder(tmp_path / "ds", files)
    val = open_dataset(root).split("val")
    dec = decode_split(val, tmp_path / "c")
    reopened = decode_split(val, tmp_path / "c")
    assert reopened.folder == dec.folder and len(reopened.images) == BLOCK + 5
    np.testing.assert_array_equal(reopened.images[BLOCK + 3], _pil_pixels(val, BLOCK + 3))


# ---------------------------------------------------------------------------------------------------------------
# the batched pipeline against the per-image transforms


@pytest.fixture(scope="module")
def mini_val(mini_zip: Path, tmp_path_factory: pytest.TempPathFactory):
    val = open_dataset(mini_zip).split("val")
    return val, decode_split(val, tmp_path_factory.mktemp("dec"))


def test_batched_eval_resize_matches_pil_on_real_images(mini_val) -> None:
    val, dec = mini_val
    idx = np.arange(0, 4000, 125)
    u8 = gather(dec.images, idx, CPU)
    for tf in (
        EvalTransform(224, "bicubic", 0.875, "auto", "auto"),  # 64px up to 224: straight bilinear resize
        EvalTransform(48, "bicubic", 0.875, "auto"),  # down-scaling: resize + center crop, antialiased bicubic
        EvalTransform(64, "bilinear", 0.875, "center"),
    ):
        ref = torch.stack([tf(val.load(int(i))) for i in idx]).float()
        out = eval_batch(u8, tf)
        assert out.shape == ref.shape
        diff = (out - ref).abs()
        assert float(diff.mean()) < 1.0, tf  # rounding-level differences only
        assert float(diff.max()) <= 24.0, tf  # PIL and torch bicubic kernels differ slightly at edges


def test_batched_seed_augmentation_draws_what_the_per_image_path_draws(mini_val) -> None:
    val, dec = mini_val
    idx = np.arange(40)
    tf = TrainTransform(96, "bilinear", "seed")
    seed_aug = SeedAugment()
    draws = draw_params(tf, 3, 5, idx)
    for i, d in zip(idx, draws, strict=True):
        p = seed_aug.sample_params(sample_rng(3, 5, int(i)))
        assert d == (p.shear, p.zx, p.zy, float(p.flip))
    ref = torch.stack([tf(val.load(int(i)), sample_rng(3, 5, int(i))) for i in idx]).float()
    out = train_batch(gather(dec.images, idx, CPU), tf, 3, 5, idx)
    diff = (out - ref).abs()
    # one interpolation instead of PIL's resize followed by the warp: close, not identical
    assert float(diff.mean()) < 3.0 and float(diff.flatten().quantile(0.99)) < 24


def test_batched_warp_geometry(mini_val) -> None:
    _, dec = mini_val
    u8 = gather(dec.images, np.arange(2), CPU)
    tf = TrainTransform(64, "bilinear", "seed")
    from transferlab.data import batched

    ident = batched._warp_grid(torch.tensor([[0.0, 1.0, 1.0, 0.0], [0.0, 1.0, 1.0, 1.0]]), 64)
    out = torch.nn.functional.grid_sample(u8.float(), ident, padding_mode="border", align_corners=False)
    torch.testing.assert_close(out[0], u8[0].float(), atol=1e-3, rtol=0)  # identity at the stored size
    torch.testing.assert_close(out[1], u8[1].float().flip(-1), atol=1e-3, rtol=0)  # flip mirrors
    zoom = batched._warp_grid(torch.tensor([[0.0, 2.0, 2.0, 0.0]]), 64)
    z = torch.nn.functional.grid_sample(u8[:1].float(), zoom, padding_mode="border", align_corners=False)
    # 2x magnification about the centre: the output's centre 32x32 region is the source's centre 16x16
    centre = torch.nn.functional.interpolate(u8[:1, :, 24:40, 24:40].float(), size=32, mode="bilinear")
    assert float((z[:, :, 16:48, 16:48] - centre).abs().mean()) < 2.0
    assert tf.size == 64 and AffineParams().is_identity_warp


@pytest.mark.parametrize("aug", ["none", "flip", "randaugment", "trivialaugment"])
def test_batched_other_policies_match_per_image(mini_val, aug: str) -> None:
    val, dec = mini_val
    idx = np.arange(100, 124)
    tf = TrainTransform(64, "bilinear", aug)
    ref = torch.stack([tf(val.load(int(i)), sample_rng(0, 2, int(i))) for i in idx]).float()
    out = train_batch(gather(dec.images, idx, CPU), tf, 0, 2, idx)
    if aug in ("none", "flip"):  # at the stored size there is no resampling: exact
        torch.testing.assert_close(out, ref, atol=0, rtol=0)
    else:  # same ops with the same seeds; uint8 rounding can tip a posterize/solarize threshold
        assert float((out - ref).abs().mean()) < 2.0


def test_eval_as_train_is_the_eval_transform(mini_val) -> None:
    _, dec = mini_val
    idx = np.arange(8)
    tf = EvalTransform(80, "bicubic", 0.875, "auto")
    u8 = gather(dec.images, idx, CPU)
    torch.testing.assert_close(train_batch(u8, EvalAsTrain(tf), 0, 0, idx), eval_batch(u8, tf))


def test_array_batches_match_positions_and_prefetch_changes_nothing(mini_val) -> None:
    _, dec = mini_val
    indices = np.arange(1000, 1100)
    positions = np.random.default_rng(0).permutation(100)[:37]

    def make(u8, idx):
        return u8.float() + torch.from_numpy(idx).float().view(-1, 1, 1, 1)

    runs = []
    for prefetch in (True, False):
        batches = list(ArrayBatches(dec.images, dec.targets, indices, positions, 16, make, CPU, prefetch=prefetch))
        assert [len(b[1]) for b in batches] == [16, 16, 5]
        runs.append(batches)
        pos = torch.cat([b[2] for b in batches]).numpy()
        np.testing.assert_array_equal(pos, positions)
        y = torch.cat([b[1] for b in batches]).numpy()
        np.testing.assert_array_equal(y, dec.targets[indices[positions]])
        x0 = batches[0][0][3] - float(indices[positions[3]])
        np.testing.assert_array_equal(x0.numpy(), np.asarray(dec.images[indices[positions[3]]]).transpose(2, 0, 1))
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a[0], b[0])


@pytest.mark.parametrize(
    "tf",
    [
        EvalTransform(224, "bicubic", 0.875, "auto", "auto"),
        EvalTransform(48, "bicubic", 0.875, "auto"),  # antialiased down-scale + center crop, clamped
        TrainTransform(96, "bilinear", "seed"),
        TrainTransform(64, "bicubic", "flip"),
        TrainTransform(64, "bilinear", "randaugment"),
    ],
    ids=repr,
)
def test_standardising_at_the_stored_size_commutes_with_the_resize(mini_val, tf) -> None:
    from transferlab.data.transforms import normalize_batch

    _, dec = mini_val
    idx = np.arange(200, 216)
    u8 = gather(dec.images, idx, CPU)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    if isinstance(tf, EvalTransform):
        late = normalize_batch(eval_batch(u8, tf), mean, std)
        early = eval_batch(u8, tf, norm=(mean, std), channels_last=True)
    else:
        late = normalize_batch(train_batch(u8, tf, 1, 2, idx), mean, std)
        early = train_batch(u8, tf, 1, 2, idx, norm=(mean, std), channels_last=True)
    assert early.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(early, late, atol=1e-4, rtol=1e-4)
