"""download_file against a local HTTP server: success, checksum mismatch and network failures.

Everything runs on 127.0.0.1; no test touches the internet.
"""

from __future__ import annotations

import hashlib
import http.server
import os
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import pytest

from transferlab.data.download import download_file, file_md5, file_sha256
from transferlab.errors import DataError


@dataclass
class LocalServer:
    """A static file server over ``root`` that records the path of every request it gets."""

    root: Path
    base_url: str
    requests: list[str] = field(default_factory=list)


class _Handler(http.server.SimpleHTTPRequestHandler):
    requests: list[str]

    def do_GET(self) -> None:
        self.requests.append(self.path)
        if self.path == "/truncated":
            # Promise more bytes than are sent, then hang up: a transfer cut off mid-way.
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            self.wfile.write(b"x" * 10)
            self.wfile.flush()
            self.close_connection = True
            return
        super().do_GET()

    def log_message(self, format: str, *args: object) -> None:  # keep pytest output clean
        pass


@pytest.fixture
def server(tmp_path: Path) -> Iterator[LocalServer]:
    root = tmp_path / "served"
    root.mkdir()
    requests: list[str] = []
    handler = type("Handler", (_Handler,), {"requests": requests})
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
def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on, so connecting is refused at once."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def payload(server: LocalServer) -> bytes:
    data = os.urandom(300_000)  # random so that any corruption changes the digest
    (server.root / "blob.bin").write_bytes(data)
    return data


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_download_succeeds_and_bytes_match(server: LocalServer, payload: bytes, tmp_path: Path) -> None:
    dest = tmp_path / "out" / "blob.bin"
    got = download_file(
        f"{server.base_url}/blob.bin",
        dest,
        md5=hashlib.md5(payload).hexdigest(),
        sha256=hashlib.sha256(payload).hexdigest(),
        progress=False,
    )
    assert got == dest
    assert dest.read_bytes() == payload
    assert _leftovers(dest.parent) == ["blob.bin"]
    assert file_md5(dest) == hashlib.md5(payload).hexdigest()
    assert file_sha256(dest) == hashlib.sha256(payload).hexdigest()


def test_download_without_checksum(server: LocalServer, payload: bytes, tmp_path: Path) -> None:
    dest = download_file(f"{server.base_url}/blob.bin", tmp_path / "blob.bin", progress=False)
    assert dest.read_bytes() == payload


def test_checksum_is_case_insensitive(server: LocalServer, payload: bytes, tmp_path: Path) -> None:
    md5 = hashlib.md5(payload).hexdigest().upper()
    dest = download_file(f"{server.base_url}/blob.bin", tmp_path / "blob.bin", md5=md5, progress=False)
    assert dest.read_bytes() == payload


def test_md5_mismatch_leaves_nothing(server: LocalServer, payload: bytes, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    dest = out / "blob.bin"
    wrong = "0" * 32
    url = f"{server.base_url}/blob.bin"
    with pytest.raises(DataError) as err:
        download_file(url, dest, md5=wrong, progress=False)
    msg = str(err.value)
    assert wrong in msg
    assert hashlib.md5(payload).hexdigest() in msg
    assert url in msg
    assert not dest.exists()
    assert _leftovers(out) == []


def test_sha256_mismatch_leaves_nothing(server: LocalServer, payload: bytes, tmp_path: Path) -> None:
    dest = tmp_path / "blob.bin"
    with pytest.raises(DataError) as err:
        download_file(f"{server.base_url}/blob.bin", dest, sha256="f" * 64, progress=False)
    assert hashlib.sha256(payload).hexdigest() in str(err.value)
    assert "f" * 64 in str(err.value)
    assert not dest.exists()
    assert _leftovers(tmp_path) == ["served"]


def test_connection_refused_names_dest(closed_port: int, tmp_path: Path) -> None:
    dest = tmp_path / "data" / "tiny-imagenet-200.zip"
    url = f"http://127.0.0.1:{closed_port}/tiny-imagenet-200.zip"
    with pytest.raises(DataError) as err:
        download_file(url, dest, progress=False, timeout=5)
    msg = str(err.value)
    assert str(dest) in msg
    assert url in msg
    assert "failed" in msg
    assert not dest.exists()
    assert _leftovers(dest.parent) == []


def test_http_404_is_data_error(server: LocalServer, tmp_path: Path) -> None:
    dest = tmp_path / "missing.bin"
    with pytest.raises(DataError, match="404") as err:
        download_file(f"{server.base_url}/missing.bin", dest, progress=False)
    assert str(dest) in str(err.value)
    assert _leftovers(tmp_path) == ["served"]


def test_truncated_transfer_without_checksum(server: LocalServer, tmp_path: Path) -> None:
    dest = tmp_path / "cut.bin"
    with pytest.raises(DataError) as err:
        download_file(f"{server.base_url}/truncated", dest, progress=False)
    assert str(dest) in str(err.value)
    assert not dest.exists()
    assert _leftovers(tmp_path) == ["served"]


def test_read_timeout(tmp_path: Path) -> None:
    # A socket that listens but never answers: the connection is made, the response never comes.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        port = silent.getsockname()[1]
        dest = tmp_path / "slow.bin"
        with pytest.raises(DataError, match="timed out") as err:
            download_file(f"http://127.0.0.1:{port}/slow.bin", dest, progress=False, timeout=0.3)
    assert str(dest) in str(err.value)
    assert _leftovers(tmp_path) == []


def test_existing_good_file_is_not_downloaded(server: LocalServer, payload: bytes, tmp_path: Path) -> None:
    dest = tmp_path / "blob.bin"
    dest.write_bytes(payload)
    download_file(f"{server.base_url}/blob.bin", dest, md5=hashlib.md5(payload).hexdigest(), progress=False)
    assert server.requests == []


def test_existing_bad_file_is_replaced(server: LocalServer, payload: bytes, tmp_path: Path) -> None:
    dest = tmp_path / "blob.bin"
    dest.write_bytes(b"stale")
    download_file(f"{server.base_url}/blob.bin", dest, md5=hashlib.md5(payload).hexdigest(), progress=False)
    assert server.requests == ["/blob.bin"]
    assert dest.read_bytes() == payload


def test_failed_redownload_keeps_existing_file(closed_port: int, tmp_path: Path) -> None:
    dest = tmp_path / "blob.bin"
    dest.write_bytes(b"stale")
    with pytest.raises(DataError):
        download_file(f"http://127.0.0.1:{closed_port}/blob.bin", dest, md5="0" * 32, progress=False)
    assert dest.read_bytes() == b"stale"
    assert _leftovers(tmp_path) == ["blob.bin"]


def test_progress_bar_goes_to_stderr(
    server: LocalServer, payload: bytes, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    download_file(f"{server.base_url}/blob.bin", tmp_path / "blob.bin", progress=True)
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "blob.bin" in captured.err


def test_progress_defaults_off_without_tty(
    server: LocalServer, payload: bytes, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    download_file(f"{server.base_url}/blob.bin", tmp_path / "blob.bin")  # captured stderr is no TTY
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == ""
