"""FolderStore and ZipStore: the same tree reads the same, and a ZipStore survives pickling into workers."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from builders import jpeg_bytes, tiny_imagenet_files, write_folder, write_zip
from transferlab.data.base import ClassInfo, FileSplit
from transferlab.data.store import FileStore, FolderStore, ZipStore, open_store
from transferlab.errors import DataError

TREE = {
    "a.txt": b"top",
    "d1/x.bin": b"\x00\x01\x02",
    "d1/sub/y.txt": b"deep",
    "d1/sub/z.txt": b"deeper",
    "d2/only.txt": b"two",
    # A sibling whose name shares the prefix "d1" and sorts around "d1/": must not leak into d1's listing.
    "d1-extra/q.txt": b"q",
    "d10/r.txt": b"r",
}


@pytest.fixture
def stores(tmp_path: Path) -> tuple[FolderStore, ZipStore]:
    folder = FolderStore(write_folder(tmp_path / "tree", TREE))
    zipped = ZipStore(write_zip(tmp_path / "tree.zip", TREE, top=""))
    return folder, zipped


@pytest.mark.parametrize("prefix", ["", "d1", "d1/", "d1/sub", "d2", "nope", "a.txt", "d1-extra", "d10"])
def test_folder_and_zip_list_the_same(stores: tuple[FolderStore, ZipStore], prefix: str) -> None:
    folder, zipped = stores
    assert folder.list_files(prefix) == zipped.list_files(prefix)
    assert folder.list_dirs(prefix) == zipped.list_dirs(prefix)


def test_listing_contents(stores: tuple[FolderStore, ZipStore]) -> None:
    for store in stores:
        assert store.list_files("d1") == ["d1/sub/y.txt", "d1/sub/z.txt", "d1/x.bin"]
        assert store.list_dirs("") == ["d1", "d1-extra", "d10", "d2"]
        assert store.list_dirs("d1") == ["sub"]
        assert store.list_files("") == sorted(TREE)
        assert store.list_files("nope") == []
        assert store.list_dirs("nope") == []


def test_folder_and_zip_read_the_same(stores: tuple[FolderStore, ZipStore]) -> None:
    folder, zipped = stores
    for rel, data in TREE.items():
        assert folder.read(rel) == data
        assert zipped.read(rel) == data
        assert folder.exists(rel) and zipped.exists(rel)
    for store in stores:
        assert not store.exists("d1")  # a folder is not a file
        assert not store.exists("missing.txt")
        assert store.read_text("d1/sub/y.txt") == "deep"


def test_missing_member_raises_file_not_found(stores: tuple[FolderStore, ZipStore]) -> None:
    zipped = stores[1]
    for store in stores:
        with pytest.raises(FileNotFoundError):
            store.read("d1/missing.bin")
    with pytest.raises(FileNotFoundError, match=r"tree\.zip:d1/missing\.bin"):
        zipped.read("d1/missing.bin")


def test_read_text_of_missing_file_is_a_data_error(stores: tuple[FolderStore, ZipStore]) -> None:
    for store in stores:
        with pytest.raises(DataError, match=r"wnids\.txt is missing"):
            store.read_text("wnids.txt")


def test_origin_names_the_file(stores: tuple[FolderStore, ZipStore], tmp_path: Path) -> None:
    folder, zipped = stores
    assert folder.origin("d1/x.bin") == str(tmp_path / "tree" / "d1" / "x.bin")
    assert zipped.origin("d1/x.bin") == f"{tmp_path / 'tree.zip'}:d1/x.bin"
    assert zipped.location == str(tmp_path / "tree.zip")


def test_zip_store_rooted_inside_the_archive(tmp_path: Path) -> None:
    z = write_zip(tmp_path / "t.zip", TREE, top="top")
    store = ZipStore(z, root="top/d1")
    assert store.list_files("") == ["sub/y.txt", "sub/z.txt", "x.bin"]
    assert store.read("sub/y.txt") == b"deep"
    assert store.origin("x.bin") == f"{z}:top/d1/x.bin"


def test_zip_sub(tmp_path: Path) -> None:
    z = write_zip(tmp_path / "t.zip", TREE, top="top")
    store = ZipStore(z)
    assert store.list_dirs("") == ["top"]
    top = store.sub("top")
    assert top.list_files("") == sorted(TREE)
    assert top.read("d1/sub/z.txt") == b"deeper"
    assert top.origin("a.txt") == f"{z}:top/a.txt"
    d1 = top.sub("d1/")
    assert d1.list_files("") == ["sub/y.txt", "sub/z.txt", "x.bin"]
    assert d1.list_dirs("") == ["sub"]
    assert d1.read("sub/y.txt") == b"deep"
    assert d1.exists("x.bin") and not d1.exists("a.txt")
    assert d1.origin("x.bin") == f"{z}:top/d1/x.bin"
    with pytest.raises(FileNotFoundError):
        d1.read("a.txt")
    # The parent is unchanged by making children.
    assert store.read("top/a.txt") == b"top"
    assert store.list_files("top/d2") == ["top/d2/only.txt"]


def test_folder_sub(tmp_path: Path) -> None:
    store = FolderStore(write_folder(tmp_path / "tree", TREE))
    d1 = store.sub("d1")
    assert d1.list_files("") == ["sub/y.txt", "sub/z.txt", "x.bin"]
    assert d1.read("sub/y.txt") == b"deep"


def test_zip_store_pickles(stores: tuple[FolderStore, ZipStore]) -> None:
    _, zipped = stores
    assert zipped.read("a.txt") == b"top"  # opens the handle; the copy must not carry it
    clone = pickle.loads(pickle.dumps(zipped))
    assert clone is not zipped
    for rel, data in TREE.items():
        assert clone.read(rel) == data
    assert clone.list_files("d1") == zipped.list_files("d1")
    # The original still works after being pickled.
    assert zipped.read("d2/only.txt") == b"two"
    sub_clone = pickle.loads(pickle.dumps(zipped.sub("d1")))
    assert sub_clone.read("sub/z.txt") == b"deeper"


def test_non_zip_file_is_a_data_error(tmp_path: Path) -> None:
    bogus = tmp_path / "data.zip"
    bogus.write_bytes(b"this is not a zip archive at all" * 10)
    with pytest.raises(DataError, match=r"data\.zip is not a readable zip archive"):
        ZipStore(bogus)
    with pytest.raises(DataError, match=r"data\.zip is neither a folder nor a zip archive"):
        open_store(bogus)
    with pytest.raises(DataError, match="does not exist"):
        ZipStore(tmp_path / "absent.zip")
    with pytest.raises(DataError, match="does not exist"):
        open_store(tmp_path / "absent")


def test_open_store_picks_the_kind(tmp_path: Path) -> None:
    assert isinstance(open_store(write_folder(tmp_path / "f", TREE)), FolderStore)
    assert isinstance(open_store(write_zip(tmp_path / "f.zip", TREE)), ZipStore)


# --- DataLoader worker processes ---------------------------------------------------------------------


class ArrayDataset(Dataset):
    """Decoded images as uint8 arrays, plus the index (so order can be checked)."""

    def __init__(self, split: FileSplit) -> None:
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        return np.asarray(self.split.load(i)), i


def _zip_split(tmp_path: Path, n: int = 160) -> FileSplit:
    files = {
        f"imgs/{i:03d}.JPEG": jpeg_bytes(((i * 37) % 256, (i * 91) % 256, (i * 13) % 256), size=96) for i in range(n)
    }
    z = write_zip(tmp_path / "imgs.zip", files, top="root")
    store: FileStore = ZipStore(z).sub("root")
    names = store.list_files("imgs")
    classes = ClassInfo(("a", "b"), ("a", "b"))
    return FileSplit("train", store, names, [i % 2 for i in range(len(names))], classes)


def test_zip_split_in_dataloader_workers_matches_main_process(tmp_path: Path) -> None:
    split = _zip_split(tmp_path)
    ds = ArrayDataset(split)
    # Load in the main process first, so the parent holds an open archive handle when workers start.
    expected = np.stack([ds[i][0] for i in range(len(ds))])
    assert len(np.unique(expected.reshape(len(ds), -1).mean(axis=1))) > len(ds) // 2  # images differ

    loader = DataLoader(ds, batch_size=2, num_workers=2, shuffle=False)
    got, idx = [], []
    for batch, i in loader:
        got.append(batch.numpy())
        idx.append(i.numpy())
    got_arr = np.concatenate(got)
    assert np.concatenate(idx).tolist() == list(range(len(ds)))
    assert got_arr.dtype == np.uint8
    np.testing.assert_array_equal(got_arr, expected)


def test_zip_split_in_dataloader_workers_shuffled_twice(tmp_path: Path) -> None:
    # Two epochs with shuffled, interleaved reads from both workers: still byte-identical pixels.
    split = _zip_split(tmp_path, n=60)
    ds = ArrayDataset(split)
    expected = {i: ds[i][0] for i in range(len(ds))}
    loader = DataLoader(
        ds,
        batch_size=3,
        num_workers=2,
        shuffle=True,
        generator=torch.Generator().manual_seed(0),
        persistent_workers=True,
    )
    for _ in range(2):
        seen = []
        for batch, idx in loader:
            for arr, i in zip(batch.numpy(), idx.tolist(), strict=True):
                np.testing.assert_array_equal(arr, expected[i])
                seen.append(i)
        assert sorted(seen) == list(range(len(ds)))


@pytest.mark.slow
def test_zip_split_in_spawned_workers(tmp_path: Path) -> None:
    # spawn pickles the dataset (and so the ZipStore) instead of forking it.
    split = _zip_split(tmp_path, n=12)
    ds = ArrayDataset(split)
    expected = np.stack([ds[i][0] for i in range(len(ds))])
    loader = DataLoader(ds, batch_size=4, num_workers=2, multiprocessing_context="spawn")
    got = np.concatenate([b.numpy() for b, _ in loader])
    np.testing.assert_array_equal(got, expected)


def test_tiny_imagenet_folder_and_zip_bytes_agree(tmp_path: Path) -> None:
    files = tiny_imagenet_files()
    folder = FolderStore(write_folder(tmp_path / "f", files))
    zipped = ZipStore(write_zip(tmp_path / "z.zip", files)).sub("tiny-imagenet-200")
    assert folder.list_files("") == zipped.list_files("") == sorted(files)
    for rel in files:
        assert folder.read(rel) == zipped.read(rel) == files[rel]
