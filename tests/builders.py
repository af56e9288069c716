"""Synthetic datasets in the exact official formats, for fast offline tests."""

from __future__ import annotations

import contextlib
import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from transferlab.runtime import cpu_has_bf16

#: Real ImageNet-1k WordNet ids (also Tiny ImageNet classes), deliberately not in sorted order, so a
#: loader that sorts instead of following wnids.txt gets the labels wrong.
WNIDS = ("n02124075", "n01443537", "n04067472")
WORDS = {"n02124075": "Egyptian cat", "n01443537": "goldfish, Carassius auratus", "n04067472": "reel"}


def jpeg_bytes(color: tuple[int, int, int], size: int = 64, mode: str = "RGB") -> bytes:
    """A small JPEG of one colour with a little texture (mode RGB or L)."""
    rng = np.random.default_rng(sum(color))
    arr = np.clip(np.array(color, dtype=np.int16) + rng.integers(-8, 8, (size, size, 3)), 0, 255).astype(np.uint8)
    img = Image.fromarray(arr, "RGB")
    if mode == "L":
        img = img.convert("L")
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def tiny_imagenet_files(n_train: int = 3, n_val_per_class: int = 2, n_test: int = 2) -> dict[str, bytes]:
    """The files of a small Tiny ImageNet copy in the official layout, keyed by relative path.

    Class k's images are dominated by colour channel k, so a model can learn them. The first val image
    is grayscale, as some real ones are.
    """
    files: dict[str, bytes] = {}
    files["wnids.txt"] = ("\n".join(WNIDS) + "\n").encode()
    words = "n00001740\tentity\n" + "".join(f"{w}\t{WORDS[w]}\n" for w in WNIDS)
    files["words.txt"] = words.encode()
    for k, w in enumerate(WNIDS):
        color = [30, 30, 30]
        color[k] = 220
        boxes = []
        for i in range(n_train):
            files[f"train/{w}/images/{w}_{i}.JPEG"] = jpeg_bytes(tuple(color))  # type: ignore[arg-type]
            boxes.append(f"{w}_{i}.JPEG\t0\t0\t63\t63")
        files[f"train/{w}/{w}_boxes.txt"] = ("\n".join(boxes) + "\n").encode()
    ann = []
    v = 0
    for _ in range(n_val_per_class):
        for k, w in enumerate(WNIDS):
            color = [40, 40, 40]
            color[k] = 200
            files[f"val/images/val_{v}.JPEG"] = jpeg_bytes(tuple(color), mode="L" if v == 0 else "RGB")  # type: ignore[arg-type]
            ann.append(f"val_{v}.JPEG\t{w}\t1\t2\t60\t61")
            v += 1
    files["val/val_annotations.txt"] = ("\n".join(ann) + "\n").encode()
    for i in range(n_test):
        files[f"test/images/test_{i}.JPEG"] = jpeg_bytes((100, 100, 100))
    return files


def write_folder(root: Path, files: dict[str, bytes]) -> Path:
    """Write ``files`` below ``root``."""
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    return root


def write_zip(path: Path, files: dict[str, bytes], top: str = "tiny-imagenet-200") -> Path:
    """Write ``files`` into a zip below the folder ``top`` (the official archive's layout)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as zf:
        for rel, data in files.items():
            zf.writestr(f"{top}/{rel}" if top else rel, data)
    return path


def fast_train_argv(*args: str, precision: str | None = "fp32") -> list[str]:
    """``transferlab train`` arguments with the fast, deterministic CPU settings the tests use.

    ``precision=None`` passes no ``--precision``, so the run takes the default users get (``auto``: bf16
    autocast + channels_last on a CPU with native bf16, the swapped training kernels, heap reuse).
    """
    prec = ["--precision", precision] if precision else []
    return ["train", "--progress", "off", "--workers", "0", *prec, *args]


def _run_argv(model: tuple[str, ...], ds: Path, out: Path, extra: tuple[str, ...], precision: str | None) -> list[str]:
    data = ("--data", str(ds), "--batch-size", "6", "--holdout", "0.2", "--cache-dir", str(out.parent / "cache"))
    return fast_train_argv(*model, *data, "--out", str(out), *extra, precision=precision)


def train_argv(ds: Path, weights: Path, out: Path, *extra: str, precision: str | None = "fp32") -> list[str]:
    """A fast, deterministic ``transferlab train`` run of test_resnet on CPU."""
    return _run_argv(("--model", "test_resnet", "--weights", str(weights)), ds, out, extra, precision)


#: bf16 is the default only on CPUs that execute it natively; elsewhere ``auto`` is fp32 and the default path
#: is the fp32 one, which the other tests cover.
requires_native_bf16 = pytest.mark.skipif(
    not cpu_has_bf16(), reason="this CPU has no native bf16 (avx512_bf16/amx_bf16): the default precision is fp32 here"
)


def default_train_argv(ds: Path, out: Path, *extra: str) -> list[str]:
    """A short ``transferlab train`` run on the path users run: EfficientNet-Lite0 with its real ImageNet weights
    (the offline package) at 32px and the default precision, so on this CPU bf16 autocast, channels_last, the
    swapped training kernels (4 strided depthwise convolutions, 33 ReLU6) and heap reuse all take part."""
    return _run_argv(("--model", "tf_efficientnet_lite0", "--img-size", "32"), ds, out, extra, None)


def assert_default_path(log_text: str, run: Path | None = None) -> None:
    """The run logged in ``log_text`` took the default CPU path: the training kernels were swapped in, freed
    memory stays in the heap, and (for a finished ``run``) its metrics record bf16 autocast with channels_last."""
    assert "CPU bf16 training kernels: 4 strided depthwise convolution(s)" in log_text, log_text[-3000:]
    assert "freed tensors stay in the heap for reuse" in log_text, log_text[-3000:]
    if run is not None:
        m = json.loads((run / "metrics.json").read_text())
        assert (m["precision"], m["channels_last"]) == ("bf16", True), (m["precision"], m["channels_last"])


def imagenet_test_resnet(path: Path, input_size: int) -> tuple[Path, object]:
    """Save timm's tiny test_resnet with a random ImageNet-1k head (and its preprocessing) to ``path``.

    Stands in for real ImageNet weights, which tests cannot download. Returns (path, model in eval mode).
    """
    import timm
    import torch

    from transferlab.models.preprocessing import Preprocessing
    from transferlab.models.weights import save_weights

    torch.manual_seed(0)
    model = timm.create_model("test_resnet", pretrained=False, num_classes=1000).eval()
    pre = Preprocessing(input_size=input_size, interpolation="bilinear", mean=(0.5,) * 3, std=(0.25,) * 3)
    save_weights(path, model.state_dict(), preprocessing=pre)
    return path, model


CIFAR_NAMES = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]


def cifar_files(n_per_batch: int = 20, seed: int = 0) -> dict[str, bytes]:
    """CIFAR-10 python batches in the official format (bytes keys, pickle protocol 2), small and
    learnable: class k's images are brighter in a class-specific channel pattern."""
    import pickle

    rng = np.random.default_rng(seed)
    files: dict[str, bytes] = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        labels = [int(v) for v in rng.integers(0, 10, n_per_batch)]
        imgs = rng.integers(0, 60, (n_per_batch, 3, 32, 32)).astype(np.int16)
        for i, lab in enumerate(labels):
            imgs[i, lab % 3] += 120 + 10 * lab
        data = np.clip(imgs, 0, 255).astype(np.uint8).reshape(n_per_batch, 3072)
        batch = {
            b"batch_label": name.encode(),
            b"labels": labels,
            b"data": data,
            b"filenames": [f"{name}_{i}.png".encode() for i in range(n_per_batch)],
        }
        files[name] = pickle.dumps(batch, protocol=2)
    meta = {b"num_cases_per_batch": n_per_batch, b"label_names": CIFAR_NAMES, b"num_vis": 3072}
    files["batches.meta"] = pickle.dumps(meta, protocol=2)
    return files


def eval_argv(*args: str) -> list[str]:
    """``transferlab evaluate`` arguments with the fast, deterministic CPU settings the tests use."""
    return ["evaluate", *args, "--progress", "off", "--workers", "0", "--precision", "fp32"]


def bomb_png(width: int = 8192, height: int = 8192) -> bytes:
    """A real decompression bomb: a valid grayscale PNG of ``width x height`` zeros (67 Mpx by default,
    above transferlab's 64 Mpx limit) that is only ~70 KB on disk. Streamed, so building it needs no
    64 MB image in memory."""
    import struct
    import zlib

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    comp = zlib.compressobj(6)
    rows = b"\x00" * (width + 1) * 512  # filter byte + pixels, 512 rows at a time
    idat = b"".join(comp.compress(rows) for _ in range(height // 512)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def cmyk_jpeg() -> bytes:
    """A CMYK JPEG (as print workflows write them): valid, decoded to RGB."""
    buf = io.BytesIO()
    Image.new("CMYK", (64, 64), (0, 255, 255, 0)).save(buf, "JPEG", quality=95)
    return buf.getvalue()


def png16() -> bytes:
    """A 16-bit grayscale PNG: valid, scaled (not clipped) to 8 bits."""
    buf = io.BytesIO()
    Image.fromarray(np.linspace(0, 65535, 64 * 64).astype(np.uint16).reshape(64, 64)).save(buf, "PNG")
    return buf.getvalue()


#: Broken files added to a Tiny ImageNet copy by :func:`dirty_tiny_imagenet_files`, with words the reason
#: must contain.
DIRTY = {
    f"train/{WNIDS[0]}/images/{WNIDS[0]}_empty.JPEG": (b"", "0 bytes"),
    f"train/{WNIDS[0]}/images/{WNIDS[0]}_half.JPEG": (jpeg_bytes((10, 200, 30))[:700], "truncated"),
    f"train/{WNIDS[1]}/images/{WNIDS[1]}_html.JPEG": (b"<html>404 Not Found</html>\n", "not an image"),
    f"train/{WNIDS[2]}/images/{WNIDS[2]}_bomb.png": (b"", "decompression bomb"),  # bytes filled in lazily
    "val/images/val_bad.JPEG": (jpeg_bytes((200, 40, 40))[:600], "truncated"),
}


def dirty_tiny_imagenet_files(n_train: int = 10, n_val_per_class: int = 4) -> dict[str, bytes]:
    """:func:`tiny_imagenet_files` plus every kind of broken file in :data:`DIRTY` (4 in train, 1 in val,
    annotated), and two unusual but valid images (CMYK JPEG, 16-bit PNG) that must not count as broken."""
    files = tiny_imagenet_files(n_train=n_train, n_val_per_class=n_val_per_class, n_test=1)
    for rel, (data, _) in DIRTY.items():
        files[rel] = bomb_png() if rel.endswith("_bomb.png") else data
    files[f"train/{WNIDS[1]}/images/{WNIDS[1]}_cmyk.JPEG"] = cmyk_jpeg()
    files[f"train/{WNIDS[2]}/images/{WNIDS[2]}_16bit.png"] = png16()
    files["val/val_annotations.txt"] += f"val_bad.JPEG\t{WNIDS[0]}\t0\t0\t63\t63\n".encode()
    return files


@contextlib.contextmanager
def logging_restored():
    """``cli.main`` configures logging for a terminal; undo it afterwards so tests stay independent (module-scoped
    fixtures that call ``main`` use this too: they run before the per-test restore below takes its snapshot)."""
    import logging

    root = logging.getLogger()
    pkg = logging.getLogger("transferlab")
    saved = (root.handlers[:], root.level, pkg.level)
    try:
        yield
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
        pkg.setLevel(saved[2])
