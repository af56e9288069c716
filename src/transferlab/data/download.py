"""Fetch a dataset archive over HTTP(S) so that only a complete, verified file ever appears at ``dest``.

Dataset archives are hundreds of megabytes and their hosts are slow or occasionally down. A download
that dies halfway must not leave a truncated zip behind, because the next run would find it, trust it
and fail deep inside training with a confusing "bad zip" error. So the bytes go into a temp file in
the destination folder (same filesystem, so the final rename is atomic), are hashed while they are
written, and are published under ``dest`` only after the checksum matches.

Only the standard library's ``urllib`` is used, to add no dependency for a feature most runs never
touch.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import IO, Any

from tqdm import tqdm

from transferlab._version import __version__
from transferlab.errors import DataError
from transferlab.io import atomic_open

log = logging.getLogger(__name__)

_CHUNK = 1 << 20  # 1 MiB: large enough to keep syscalls cheap, small enough for a smooth progress bar


class _NetworkFailure(Exception):
    """Internal marker: the failure came from the connection, not from writing to disk.

    Both surface as OSError subclasses (URLError, TimeoutError, ConnectionResetError on one side,
    ENOSPC on the other), yet they need different advice for the user, so reads and writes are told
    apart where they happen rather than guessed at afterwards.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _file_digest(path: str | os.PathLike[str], algorithm: str) -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def file_md5(path: str | os.PathLike[str]) -> str:
    """MD5 hex digest of a file, read in chunks so a multi-GB archive does not have to fit in memory.

    MD5 is used only because the dataset hosts publish MD5 sums; it guards against truncation and
    corruption, not against tampering.
    """
    return _file_digest(path, "md5")


def file_sha256(path: str | os.PathLike[str]) -> str:
    """SHA-256 hex digest of a file, read in chunks."""
    return _file_digest(path, "sha256")


def _expected_digests(md5: str | None, sha256: str | None) -> dict[str, str]:
    expected: dict[str, str] = {}
    if md5 is not None:
        expected["md5"] = md5.strip().lower()
    if sha256 is not None:
        expected["sha256"] = sha256.strip().lower()
    return expected


def _describe(exc: BaseException) -> str:
    """A short human reason for a network failure, e.g. 'HTTP 404 Not Found' or 'Connection refused'."""
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code} {exc.reason}"
    if isinstance(exc, urllib.error.URLError):
        reason: Any = exc.reason
        if isinstance(reason, BaseException):
            return _describe(reason)
        return str(reason)
    if isinstance(exc, TimeoutError):
        return "the connection timed out"
    if isinstance(exc, http.client.IncompleteRead):
        return f"the connection closed early after {len(exc.partial)} bytes"
    text = getattr(exc, "strerror", None) or str(exc)
    return text or type(exc).__name__


def _show_progress(progress: bool | None) -> bool:
    """Default to a bar only on an interactive terminal: in CI logs or redirected output, tqdm's
    carriage-return updates turn into thousands of lines."""
    if progress is not None:
        return progress
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # stderr replaced or closed
        return False


def _stream(url: str, out: IO[bytes], *, timeout: float, progress: bool, label: str) -> dict[str, str]:
    """Copy the body of ``url`` into ``out`` and return its md5 and sha256 hex digests.

    Connection problems are raised as :class:`_NetworkFailure`; write errors propagate as OSError.
    """
    hashers = {"md5": hashlib.md5(), "sha256": hashlib.sha256()}
    request = urllib.request.Request(url, headers={"User-Agent": f"transferlab/{__version__}"})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except (OSError, http.client.HTTPException, ValueError) as exc:
        # ValueError: a malformed URL; treated like an unreachable host because the advice is the same.
        raise _NetworkFailure(_describe(exc)) from exc

    with response:
        length_header = response.headers.get("Content-Length")
        total = int(length_header) if length_header and length_header.isdigit() else None
        received = 0
        with tqdm(
            total=total,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc=label,
            disable=not progress,
            file=sys.stderr,
            leave=False,
        ) as bar:
            while True:
                try:
                    chunk = response.read(_CHUNK)
                except (OSError, http.client.HTTPException) as exc:
                    raise _NetworkFailure(_describe(exc)) from exc
                if not chunk:
                    break
                out.write(chunk)
                for h in hashers.values():
                    h.update(chunk)
                received += len(chunk)
                bar.update(len(chunk))
    if total is not None and received != total:
        # Without a checksum this is the only way to notice a cut-off transfer.
        raise _NetworkFailure(f"the connection closed after {received} of {total} bytes")
    log.debug("received %d bytes from %s", received, url)
    return {name: h.hexdigest() for name, h in hashers.items()}


def download_file(
    url: str,
    dest: str | os.PathLike[str],
    *,
    md5: str | None = None,
    sha256: str | None = None,
    progress: bool | None = None,
    timeout: float = 30.0,
) -> Path:
    """Download ``url`` to ``dest`` and return ``dest``; afterwards ``dest`` is complete or untouched.

    If ``dest`` already exists and matches the given checksum(s) (or none is given), nothing is
    downloaded: re-fetching hundreds of MB on every run would be slow and rude to the host. A present
    file with the wrong checksum is replaced only once a good copy has arrived.

    ``progress``: show a byte progress bar on stderr; ``None`` means only if stderr is a terminal.
    ``timeout``: seconds to wait on the connection or on any single read, not for the whole download.

    Raises :class:`DataError` on a network failure (with the reason and where to put a manually
    downloaded copy), on a checksum mismatch (with both digests) or when ``dest`` cannot be written.
    """
    dest = Path(dest).expanduser()
    expected = _expected_digests(md5, sha256)

    if dest.is_file():
        if not expected:
            log.info("%s already exists; not downloading %s again", dest, url)
            return dest
        if all(_file_digest(dest, algo) == want for algo, want in expected.items()):
            log.info("%s already exists with the expected checksum; not downloading again", dest)
            return dest
        log.warning("%s exists but its checksum does not match; downloading %s again", dest, url)

    log.info("downloading %s to %s", url, dest)
    try:
        # atomic_open writes to a temp file beside dest and removes it if anything below raises,
        # so a failed or interrupted (Ctrl-C) download leaves neither a partial dest nor a stray temp.
        with atomic_open(dest, "wb") as out:
            actual = _stream(url, out, timeout=timeout, progress=_show_progress(progress), label=dest.name)
            for algo, want in expected.items():
                if actual[algo] != want:
                    raise DataError(
                        f"checksum mismatch for {url}: expected {algo} {want}, got {actual[algo]}. "
                        f"The download is corrupt or the file on the server has changed; nothing was "
                        f"saved to {dest}. Try again, or place a verified copy at {dest} yourself."
                    )
    except _NetworkFailure as exc:
        raise DataError(
            f"downloading {url} failed: {exc.reason}. If this machine is offline or cannot reach that "
            f"host, download the file elsewhere and place it at {dest}"
        ) from exc.__cause__
    except OSError as exc:
        raise DataError(f"could not save the download of {url} to {dest}: {_describe(exc)}") from exc

    log.info("saved %s (md5 %s)", dest, actual["md5"])
    return dest
