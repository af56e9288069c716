"""resolve_data: paths, name lookup through TRANSFERLAB_DATA and the cache, and download on demand.

Downloads go to a local HTTP server serving a small zip in the official Tiny ImageNet layout; the
registry is patched to point at it, and every test starts offline so nothing can reach the internet.
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.server
import io
import os
import threading
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import pytest
from PIL import Image

from transferlab.data import resolve
from transferlab.data.resolve import KNOWN_DATASETS, cache_dir, resolve_data
from transferlab.errors import DataError

WNIDS = ["n01443537", "n01629819"]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Isolate every test from the developer's environment and cache, and forbid downloads by default."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("TRANSFERLAB_CACHE", str(cache))
    monkeypatch.delenv("TRANSFERLAB_DATA", raising=False)
    monkeypatch.setenv("TRANSFERLAB_OFFLINE", "1")
    return cache


def _jpeg(color: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, format="JPEG")
    return buf.getvalue()


def make_tiny_imagenet_zip(path: Path) -> Path:
    """Write a two-class, one-image-per-split zip laid out exactly like tiny-imagenet-200.zip."""
    root = "tiny-imagenet-200"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{root}/wnids.txt", "".join(f"{w}\n" for w in WNIDS))
        zf.writestr(f"{root}/words.txt", f"{WNIDS[0]}\tgoldfish\n{WNIDS[1]}\tsalamander\n")
        for i, wnid in enumerate(WNIDS):
            zf.writestr(f"{root}/train/{wnid}/images/{wnid}_0.JPEG", _jpeg((200, 40 * i, 0)))
            zf.writestr(f"{root}/train/{wnid}/{wnid}_boxes.txt", f"{wnid}_0.JPEG\t0\t0\t7\t7\n")
        zf.writestr(f"{root}/val/images/val_0.JPEG", _jpeg((0, 200, 0)))
        zf.writestr(f"{root}/val/val_annotations.txt", f"val_0.JPEG\t{WNIDS[0]}\t0\t0\t7\t7\n")
        zf.writestr(f"{root}/test/images/test_0.JPEG", _jpeg((0, 0, 200)))
    return path


@dataclass
class LocalServer:
    root: Path
    base_url: str
    requests: list[str] = field(default_factory=list)


class _CountingHandler(http.server.SimpleHTTPRequestHandler):
    requests: list[str]

    def do_GET(self) -> None:
        self.requests.append(self.path)
        super().do_GET()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def server(tmp_path: Path) -> Iterator[LocalServer]:
    root = tmp_path / "served"
    root.mkdir()
    requests: list[str] = []
    handler = type("Handler", (_CountingHandler,), {"requests": requests})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(handler, directory=str(root)))
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield LocalServer(root, f"http://127.0.0.1:{httpd.server_address[1]}", requests)
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


@pytest.fixture
def served_tiny_imagenet(server: LocalServer, monkeypatch: pytest.MonkeyPatch) -> tuple[LocalServer, bytes]:
    """Serve the fake zip, point the 'tiny-imagenet' registry entry at it and allow downloads."""
    data = make_tiny_imagenet_zip(server.root / "tiny-imagenet-200.zip").read_bytes()
    entry = dataclasses.replace(
        KNOWN_DATASETS["tiny-imagenet"],
        url=f"{server.base_url}/tiny-imagenet-200.zip",
        md5=hashlib.md5(data).hexdigest(),
    )
    monkeypatch.setitem(resolve.KNOWN_DATASETS, "tiny-imagenet", entry)
    monkeypatch.delenv("TRANSFERLAB_OFFLINE")
    return server, data


# --- download through the registry ------------------------------------------------------------


def test_downloads_into_cache_and_returns_zip(served_tiny_imagenet: tuple[LocalServer, bytes]) -> None:
    server, data = served_tiny_imagenet
    got = resolve_data("tiny-imagenet", progress=False)
    assert got == cache_dir() / "datasets" / "tiny-imagenet-200.zip"
    assert got.read_bytes() == data
    with zipfile.ZipFile(got) as zf:
        names = set(zf.namelist())
    assert "tiny-imagenet-200/wnids.txt" in names
    assert "tiny-imagenet-200/val/val_annotations.txt" in names
    assert f"tiny-imagenet-200/train/{WNIDS[0]}/images/{WNIDS[0]}_0.JPEG" in names
    assert server.requests == ["/tiny-imagenet-200.zip"]


def test_second_call_uses_cache(served_tiny_imagenet: tuple[LocalServer, bytes]) -> None:
    server, _ = served_tiny_imagenet
    first = resolve_data("tiny-imagenet", progress=False)
    second = resolve_data("tiny-imagenet", progress=False)
    assert first == second
    assert len(server.requests) == 1


def test_bad_checksum_from_registry_is_reported(
    served_tiny_imagenet: tuple[LocalServer, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    entry = dataclasses.replace(KNOWN_DATASETS["tiny-imagenet"], md5="0" * 32)
    monkeypatch.setitem(resolve.KNOWN_DATASETS, "tiny-imagenet", entry)
    with pytest.raises(DataError, match="checksum mismatch"):
        resolve_data("tiny-imagenet", progress=False)
    assert not (cache_dir() / "datasets" / "tiny-imagenet-200.zip").exists()


def test_offline_env_blocks_download(
    served_tiny_imagenet: tuple[LocalServer, bytes], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    server, _ = served_tiny_imagenet
    monkeypatch.setenv("TRANSFERLAB_OFFLINE", "1")
    shared = tmp_path / "shared"
    monkeypatch.setenv("TRANSFERLAB_DATA", str(shared))
    with pytest.raises(DataError) as err:
        resolve_data("tiny-imagenet", progress=False)
    msg = str(err.value)
    assert server.requests == []
    assert "TRANSFERLAB_OFFLINE" in msg
    assert "tiny-imagenet-200.zip" in msg
    assert str(shared) in msg  # every place searched is listed
    assert str(cache_dir() / "datasets") in msg
    assert "TRANSFERLAB_DATA=" in msg


def test_download_false_blocks_download(served_tiny_imagenet: tuple[LocalServer, bytes]) -> None:
    server, _ = served_tiny_imagenet
    with pytest.raises(DataError, match="disabled"):
        resolve_data("tiny-imagenet", download=False)
    assert server.requests == []


def test_failed_download_lists_places(
    served_tiny_imagenet: tuple[LocalServer, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    server, _ = served_tiny_imagenet
    entry = dataclasses.replace(KNOWN_DATASETS["tiny-imagenet"], url=f"{server.base_url}/nope.zip")
    monkeypatch.setitem(resolve.KNOWN_DATASETS, "tiny-imagenet", entry)
    with pytest.raises(DataError) as err:
        resolve_data("tiny-imagenet", progress=False)
    msg = str(err.value)
    assert "404" in msg
    assert str(cache_dir() / "datasets") in msg
    assert not any((cache_dir() / "datasets").iterdir())


def test_mini_has_no_download(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRANSFERLAB_OFFLINE")
    with pytest.raises(DataError) as err:
        resolve_data("tiny-imagenet-mini")
    assert "no official download" in str(err.value)
    assert "tiny-imagenet-200-mini.zip" in str(err.value)


# --- local lookup --------------------------------------------------------------------------------


def test_data_env_first_hit_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    make_tiny_imagenet_zip(a / "tiny-imagenet-200.zip")
    make_tiny_imagenet_zip(b / "tiny-imagenet-200.zip")
    monkeypatch.setenv("TRANSFERLAB_DATA", os.pathsep.join(["", str(tmp_path / "missing"), str(a), str(b)]))
    assert resolve_data("tiny-imagenet") == a / "tiny-imagenet-200.zip"
    monkeypatch.setenv("TRANSFERLAB_DATA", os.pathsep.join([str(b), str(a)]))
    assert resolve_data("tiny-imagenet") == b / "tiny-imagenet-200.zip"


def test_folder_preferred_over_zip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d = tmp_path / "d"
    (d / "tiny-imagenet-200").mkdir(parents=True)
    make_tiny_imagenet_zip(d / "tiny-imagenet-200.zip")
    monkeypatch.setenv("TRANSFERLAB_DATA", str(d))
    assert resolve_data("tiny-imagenet") == d / "tiny-imagenet-200"


def test_earlier_location_beats_folder_in_later_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    (b / "tiny-imagenet-200").mkdir(parents=True)
    make_tiny_imagenet_zip(a / "tiny-imagenet-200.zip")
    monkeypatch.setenv("TRANSFERLAB_DATA", os.pathsep.join([str(a), str(b)]))
    assert resolve_data("tiny-imagenet") == a / "tiny-imagenet-200.zip"


def test_data_env_beats_cache(clean_env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (clean_env / "datasets").mkdir(parents=True)
    make_tiny_imagenet_zip(clean_env / "datasets" / "tiny-imagenet-200.zip")
    assert resolve_data("tiny-imagenet") == clean_env / "datasets" / "tiny-imagenet-200.zip"
    shared = tmp_path / "shared"
    shared.mkdir()
    make_tiny_imagenet_zip(shared / "tiny-imagenet-200.zip")
    monkeypatch.setenv("TRANSFERLAB_DATA", str(shared))
    assert resolve_data("tiny-imagenet") == shared / "tiny-imagenet-200.zip"


@pytest.mark.parametrize(
    ("name", "entry"),
    [
        ("tiny-imagenet-mini", "tiny-imagenet-200-mini.zip"),
        ("tiny-imagenet-mini", "tiny-imagenet-200-mini"),
        ("cifar10", "cifar-10-batches-py"),
        ("cifar10", "cifar-10-python.tar.gz"),
    ],
)
def test_other_names(name: str, entry: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d = tmp_path / "d"
    d.mkdir()
    target = d / entry
    if "." in entry:
        target.write_bytes(b"archive")
    else:
        target.mkdir()
    monkeypatch.setenv("TRANSFERLAB_DATA", str(d))
    assert resolve_data(name) == target


def test_cache_dir_defaults_to_platformdirs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRANSFERLAB_CACHE")
    import platformdirs

    assert cache_dir() == Path(platformdirs.user_cache_dir("transferlab"))


# --- paths and bad specs -------------------------------------------------------------------------


def test_existing_paths_returned_as_is(tmp_path: Path) -> None:
    folder = tmp_path / "my-data"
    folder.mkdir()
    archive = make_tiny_imagenet_zip(tmp_path / "anything.zip")
    assert resolve_data(str(folder)) == folder
    assert resolve_data(str(archive)) == archive


def test_existing_path_wins_over_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "cifar10").mkdir()
    monkeypatch.chdir(tmp_path)
    assert resolve_data("cifar10") == Path("cifar10")


def test_user_home_is_expanded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "data").mkdir()
    assert resolve_data("~/data") == tmp_path / "data"


def test_unknown_name_suggests(tmp_path: Path) -> None:
    with pytest.raises(DataError) as err:
        resolve_data("tiny-imagnet")
    msg = str(err.value)
    assert "'tiny-imagnet' is not an existing file or folder, nor a known dataset name" in msg
    assert "tiny-imagenet, tiny-imagenet-mini, cifar10" in msg
    assert "Did you mean 'tiny-imagenet'?" in msg


def test_unknown_name_without_near_miss(tmp_path: Path) -> None:
    with pytest.raises(DataError) as err:
        resolve_data(str(tmp_path / "nowhere" / "data.zip"))
    assert "Did you mean" not in str(err.value)


def test_empty_spec_is_rejected() -> None:
    with pytest.raises(DataError):
        resolve_data("")


def test_name_is_case_insensitive(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "cifar-10-batches-py").mkdir()
    monkeypatch.setenv("TRANSFERLAB_DATA", str(tmp_path))
    assert resolve_data("CIFAR10") == tmp_path / "cifar-10-batches-py"
