"""Tests for the CIFAR-10 python-batch reader, on synthetic batches in the official format. Hostile pickles,
a wrong shape and a wrong md5 are tested in tests/reliability/."""

from __future__ import annotations

import hashlib
import io
import pickle
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from transferlab.data import cifar10
from transferlab.data.base import ArraySplit
from transferlab.data.cifar10 import load_cifar10, safe_unpickle
from transferlab.errors import ConfigError, DataError

NAMES = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
BATCHES = [f"data_batch_{i}" for i in range(1, 6)]
ROWS = {**{b: 4 + i for i, b in enumerate(BATCHES)}, "test_batch": 3}  # 4..8 train rows, 3 test rows


def _batch_rows(name: str, n: int) -> tuple[np.ndarray, list[int]]:
    """Deterministic rows and labels for batch ``name`` (different per batch)."""
    seed = int(hashlib.md5(name.encode()).hexdigest()[:8], 16)
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(n, 3072), dtype=np.uint8), [int(x) for x in rng.integers(0, 10, n)]


def _batch_bytes(name: str, data: Any, labels: Any) -> bytes:
    """A batch pickled the way the official files are: bytes keys, protocol 2."""
    n = len(labels)
    d = {
        b"batch_label": f"synthetic {name}".encode(),
        b"labels": labels,
        b"data": data,
        b"filenames": [f"img_{i}.png".encode() for i in range(n)],
    }
    return pickle.dumps(d, protocol=2)


def _meta_bytes(names: list[bytes] = NAMES) -> bytes:
    return pickle.dumps({b"num_cases_per_batch": 10000, b"label_names": names, b"num_vis": 3072}, protocol=2)


def _files(overrides: dict[str, bytes] | None = None) -> dict[str, bytes]:
    files = {name: _batch_bytes(name, *_batch_rows(name, n)) for name, n in ROWS.items()}
    files["batches.meta"] = _meta_bytes()
    files.update(overrides or {})
    return files


def _write(folder: Path, files: dict[str, bytes]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, raw in files.items():
        (folder / name).write_bytes(raw)
    return folder


def _check_contents(src: Any) -> None:
    """Everything a correct reader must produce from :func:`_files`."""
    assert src.name == "cifar10"
    assert src.imagenet_classes is False
    assert src.classes.names == tuple(n.decode() for n in NAMES)
    assert src.classes.ids == src.classes.names
    assert set(src.splits) == {"train", "test"}
    train, test = src.split("train"), src.split("test")
    assert isinstance(train, ArraySplit)
    assert isinstance(test, ArraySplit)
    assert len(train) == sum(ROWS[b] for b in BATCHES)
    assert len(test) == ROWS["test_batch"]
    assert train.images.dtype == np.uint8
    assert train.images.shape == (len(train), 32, 32, 3)

    exp_ids, exp_targets, exp_rows = [], [], []
    for b in BATCHES:
        data, labels = _batch_rows(b, ROWS[b])
        exp_ids += [f"{b}/{i}" for i in range(ROWS[b])]
        exp_targets += labels
        exp_rows.append(data)
    assert train.sample_ids == exp_ids
    np.testing.assert_array_equal(train.targets, exp_targets)
    # Planar rows -> HWC: channel c of pixel (r, col) is byte c*1024 + r*32 + col.
    rows = np.concatenate(exp_rows)
    np.testing.assert_array_equal(train.images, rows.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))

    tdata, tlabels = _batch_rows("test_batch", ROWS["test_batch"])
    assert test.sample_ids == [f"test_batch/{i}" for i in range(ROWS["test_batch"])]
    np.testing.assert_array_equal(test.targets, tlabels)
    np.testing.assert_array_equal(test.images[2, 31, 0], tdata[2, [31 * 32, 1024 + 31 * 32, 2048 + 31 * 32]])


def test_folder_layout(tmp_path: Path) -> None:
    root = _write(tmp_path / "flat", _files())
    src = load_cifar10(root)
    assert src.location == str(root)
    _check_contents(src)


def test_nested_layout(tmp_path: Path) -> None:
    _write(tmp_path / "cifar-10-batches-py", _files())
    src = load_cifar10(str(tmp_path))
    assert src.location == str(tmp_path)
    _check_contents(src)


@pytest.mark.parametrize("prefix", ["cifar-10-batches-py/", ""])
def test_tar_gz_layout(tmp_path: Path, prefix: str) -> None:
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        if prefix:
            d = tarfile.TarInfo(prefix.rstrip("/"))
            d.type = tarfile.DIRTYPE
            tf.addfile(d)
        for name, raw in reversed(list(_files().items())):  # meta first: order must not matter
            info = tarfile.TarInfo(prefix + name)
            info.size = len(raw)
            tf.addfile(info, io.BytesIO(raw))
    before = sorted(p.name for p in tmp_path.iterdir())
    src = load_cifar10(archive)
    _check_contents(src)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing extracted


def test_tar_missing_member(tmp_path: Path) -> None:
    archive = tmp_path / "c.tar"
    with tarfile.open(archive, "w") as tf:
        for name, raw in _files().items():
            if name != "data_batch_3":
                info = tarfile.TarInfo("cifar-10-batches-py/" + name)
                info.size = len(raw)
                tf.addfile(info, io.BytesIO(raw))
    with pytest.raises(DataError, match=r"data_batch_3 is missing.*cifar-10-python\.tar\.gz"):
        load_cifar10(archive)


def test_pixel_layout(tmp_path: Path) -> None:
    """One known byte in the planar row must land at its (row, col, channel)."""
    data = np.zeros((2, 3072), np.uint8)
    r, c, ch = 5, 7, 2  # blue channel of pixel at row 5, column 7
    data[1, ch * 1024 + r * 32 + c] = 201
    data[1, 0 * 1024 + 0 * 32 + 31] = 17  # red of pixel (0, 31)
    files = _files({"data_batch_2": _batch_bytes("data_batch_2", data, [3, 9])})
    src = load_cifar10(_write(tmp_path, files))
    train = src.split("train")
    i = train.sample_ids.index("data_batch_2/1")
    img = train.images[i]
    assert img[r, c, ch] == 201
    assert img[0, 31, 0] == 17
    assert int(img.sum()) == 201 + 17
    assert train.load(i).getpixel((c, r)) == (0, 0, 201)  # PIL takes (x, y)
    assert train.targets[i] == 9
    assert train.targets[train.sample_ids.index("data_batch_2/0")] == 3


def test_str_keys_and_ndarray_labels(tmp_path: Path) -> None:
    data, labels = _batch_rows("test_batch", 3)
    raw = pickle.dumps({"data": data, "labels": np.array(labels, np.int64)}, protocol=4)
    meta = pickle.dumps({"label_names": [n.decode() for n in NAMES]}, protocol=4)
    src = load_cifar10(_write(tmp_path, _files({"test_batch": raw, "batches.meta": meta})))
    np.testing.assert_array_equal(src.split("test").targets, labels)
    assert src.classes.names[9] == "truck"


class _Hostile:
    """Unpickling this runs ``func(arg)``: the classic pickle code-execution payload (used by
    tests/reliability/test_hostile_files.py)."""

    def __init__(self, func: Any, arg: str) -> None:
        self.func, self.arg = func, arg

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return self.func, (self.arg,)


def test_codecs_encode_only_latin1() -> None:
    import _codecs

    # pickle's own bytes encoding goes through _codecs.encode(str, 'latin1') and must work ...
    assert safe_unpickle(pickle.dumps(b"\x00\xff", protocol=2), "x") == b"\x00\xff"
    # ... but other codecs through the same global are refused.
    raw = pickle.dumps(_Hostile2(_codecs.encode, ("abc", "rot13")), protocol=2)
    with pytest.raises(DataError, match="latin-1"):
        safe_unpickle(raw, "x")


class _Hostile2:
    def __init__(self, func: Any, args: tuple[Any, ...]) -> None:
        self.func, self.args = func, args

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return self.func, self.args


def test_wrong_dtype(tmp_path: Path) -> None:
    bad = np.zeros((2, 3072), np.int64)
    files = _files({"data_batch_1": _batch_bytes("data_batch_1", bad, [0, 1])})
    with pytest.raises(DataError, match=r"dtype int64, expected uint8"):
        load_cifar10(_write(tmp_path, files))


def test_label_count_mismatch(tmp_path: Path) -> None:
    data, _ = _batch_rows("test_batch", 3)
    files = _files({"test_batch": _batch_bytes("test_batch", data, [1, 2])})
    with pytest.raises(DataError, match=r"test_batch: 2 labels for 3 data rows"):
        load_cifar10(_write(tmp_path, files))


@pytest.mark.parametrize("label", [10, -1])
def test_label_out_of_range(tmp_path: Path, label: int) -> None:
    data, _ = _batch_rows("data_batch_5", 3)
    files = _files({"data_batch_5": _batch_bytes("data_batch_5", data, [0, label, 2])})
    with pytest.raises(DataError, match=rf"data_batch_5: label {label} at row 1 is outside \[0, 10\)"):
        load_cifar10(_write(tmp_path, files))


def test_strict_md5_on_synthetic(tmp_path: Path) -> None:
    root = _write(tmp_path, _files())
    load_cifar10(root, verify="auto")  # small synthetic batches are not md5-checked in auto
    load_cifar10(root, verify="off")
    with pytest.raises(DataError, match=r"md5 [0-9a-f]{32}, expected [0-9a-f]{32}.*corrupt or modified"):
        load_cifar10(root, verify="strict")


def test_md5_passes_when_matching(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files = _files()
    monkeypatch.setattr(cifar10, "OFFICIAL_MD5", {n: hashlib.md5(r).hexdigest() for n, r in files.items()})
    _check_contents(load_cifar10(_write(tmp_path, files), verify="strict"))


def test_invalid_verify(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="verify"):
        load_cifar10(_write(tmp_path, _files()), verify="yes")


@pytest.mark.parametrize("missing", ["test_batch", "data_batch_5", "batches.meta"])
def test_missing_file(tmp_path: Path, missing: str) -> None:
    files = _files()
    del files[missing]
    with pytest.raises(DataError, match=rf"{missing} is missing.*cifar-10-python\.tar\.gz"):
        load_cifar10(_write(tmp_path, files))


def test_nonexistent_and_not_an_archive(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_cifar10(tmp_path / "nope")
    junk = tmp_path / "junk.tar.gz"
    junk.write_bytes(b"not a tar")
    with pytest.raises(DataError, match="neither a folder nor a tar archive"):
        load_cifar10(junk)


def test_garbage_pickle(tmp_path: Path) -> None:
    files = _files({"data_batch_2": b"\x80\x02garbage"})
    with pytest.raises(DataError, match=r"data_batch_2 is not a readable CIFAR pickle"):
        load_cifar10(_write(tmp_path, files))
