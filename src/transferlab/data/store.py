"""Read-only access to the files of a dataset, wherever they live: a folder or a zip archive.

Datasets are read in place and never moved or extracted. A :class:`ZipStore` opens its archive lazily
and once per process, so it can be pickled into DataLoader worker processes (each worker reopens the
archive instead of sharing one file handle, which would corrupt reads).

A :class:`FolderStore` follows symbolic links, to files and to folders, at every depth (datasets are
often built as a tree of links into a larger collection), but never into a link that leads back to one
of its own parent folders: that loop is skipped with a warning naming the link. A link whose target is
missing is still listed, so the image it stood for is reported as unreadable instead of vanishing.
"""

from __future__ import annotations

import bisect
import errno
import logging
import os
import threading
import zipfile
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

from transferlab.errors import DataError

log = logging.getLogger(__name__)


class FileStore(ABC):
    """A tree of files addressed by POSIX-style relative paths."""

    @abstractmethod
    def read(self, rel: str) -> bytes:
        """Return the bytes of ``rel``; raise FileNotFoundError if absent."""

    @abstractmethod
    def exists(self, rel: str) -> bool:
        """True if ``rel`` is a file in the store."""

    @abstractmethod
    def list_files(self, prefix: str) -> list[str]:
        """All files below the directory ``prefix`` (recursive), sorted, as relative paths."""

    @abstractmethod
    def list_dirs(self, prefix: str) -> list[str]:
        """Names of the immediate sub-directories of ``prefix``, sorted."""

    @abstractmethod
    def origin(self, rel: str) -> str:
        """A human-readable location of ``rel`` for error messages."""

    @property
    @abstractmethod
    def location(self) -> str:
        """The folder or archive this store reads."""

    @abstractmethod
    def stamp(self, rel: str) -> str:
        """A cheap content stamp of ``rel`` (size and CRC or mtime) for cache fingerprints."""

    @abstractmethod
    def sub(self, prefix: str) -> FileStore:
        """A store rooted at the folder ``prefix`` inside this one."""

    def dangling(self, rel: str) -> bool:
        """True if ``rel`` is a symbolic link whose target is missing (or loops); only folders have links."""
        return False

    def read_text(self, rel: str) -> str:
        """Read a UTF-8 text file, with a :class:`DataError` naming it when absent."""
        try:
            return self.read(rel).decode("utf-8")
        except FileNotFoundError:
            raise DataError(f"{self.origin(rel)} is missing; is {self.location} a complete copy?") from None


class FolderStore(FileStore):
    """Files below a directory on disk."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        #: Links already reported as loops: a dataset is listed more than once while its layout is detected.
        self._loops_seen: set[str] = set()

    @property
    def location(self) -> str:
        return str(self.root)

    def read(self, rel: str) -> bytes:
        path = self.root / rel
        try:
            return path.read_bytes()
        except OSError as e:
            if self.dangling(rel):
                # "No such file or directory" for a path that is listed right there is a riddle; say why.
                target = os.readlink(path)
                why = f"broken symbolic link: its target {target} does not exist (or the links loop)"
                raise FileNotFoundError(errno.ENOENT, why, str(path)) from e
            raise

    def exists(self, rel: str) -> bool:
        return (self.root / rel).is_file()

    def dangling(self, rel: str) -> bool:
        path = self.root / rel
        return path.is_symlink() and not path.exists()

    def list_files(self, prefix: str) -> list[str]:
        base = self.root / prefix
        if not base.is_dir():
            return []
        # The folders above ``base``, up to the root: a link back to any of them is a loop.
        parts = Path(prefix).parts
        above = [self.root / Path(*parts[:k]) for k in range(len(parts))]
        out: list[str] = []
        self._walk(base, {_inode(d) for d in above}, out)
        return sorted(out)

    def _walk(self, folder: Path, ancestors: set[tuple[int, int]], out: list[str]) -> None:
        """Append every file below ``folder``, following links to folders unless they lead back up."""
        key = _inode(folder)
        if key in ancestors:
            if str(folder) in self._loops_seen:
                return
            self._loops_seen.add(str(folder))
            log.warning(
                "skipping %s: a symbolic link to one of its own parent folders (%s), which would loop forever",
                folder,
                os.path.realpath(folder),
            )
            return
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as e:
            log.warning("cannot list %s (%s); its files are left out", folder, e)
            return
        for entry in entries:
            try:
                is_dir = entry.is_dir()  # follows links
            except OSError:
                is_dir = False
            if is_dir:
                self._walk(Path(entry.path), ancestors | {key}, out)
            else:  # files, and links that lead nowhere (reported as unreadable when read)
                out.append(Path(entry.path).relative_to(self.root).as_posix())

    def list_dirs(self, prefix: str) -> list[str]:
        base = self.root / prefix
        if not base.is_dir():
            return []
        return sorted(p.name for p in base.iterdir() if p.is_dir())

    def origin(self, rel: str) -> str:
        return str(self.root / rel)

    def stamp(self, rel: str) -> str:
        try:
            st = (self.root / rel).stat()
        except OSError:  # a broken link, or a file gone since it was listed: reading it will say which
            return f"unreadable:{os.readlink(self.root / rel) if self.dangling(rel) else ''}"
        return f"{st.st_size}:{st.st_mtime_ns}"

    def sub(self, prefix: str) -> FolderStore:
        child = FolderStore(self.root / prefix)
        child._loops_seen = self._loops_seen
        return child


class ZipStore(FileStore):
    """Files inside a zip archive, optionally below a folder ``root`` inside it.

    The archive's table of contents is read once in the parent process; the open file handle is
    per-process (keyed by PID), which makes the store safe in forked or spawned DataLoader workers.
    """

    def __init__(self, archive: str | os.PathLike[str], root: str = "") -> None:
        self.archive = Path(archive)
        self.root = root.strip("/")
        self._pid: int | None = None
        self._zf: zipfile.ZipFile | None = None
        self._lock = threading.Lock()
        try:
            with zipfile.ZipFile(self.archive) as zf:
                infos = [i for i in zf.infolist() if not i.is_dir()]
        except zipfile.BadZipFile as e:
            raise DataError(f"{self.archive} is not a readable zip archive ({e}); re-download it.") from e
        except FileNotFoundError:
            raise DataError(f"{self.archive} does not exist") from None
        pre = f"{self.root}/" if self.root else ""
        self._files = sorted(i.filename[len(pre) :] for i in infos if i.filename.startswith(pre))
        #: CRC-32 and size of every member: a content fingerprint without reading any data.
        self._stamp = {
            i.filename[len(pre) :]: f"{i.CRC:08x}:{i.file_size}" for i in infos if i.filename.startswith(pre)
        }
        self._fileset = frozenset(self._files)

    @property
    def location(self) -> str:
        return str(self.archive)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_zf"] = None
        state["_pid"] = None
        state["_lock"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _handle(self) -> zipfile.ZipFile:
        pid = os.getpid()
        if self._zf is None or self._pid != pid:
            self._zf = zipfile.ZipFile(self.archive)
            self._pid = pid
        return self._zf

    def _member(self, rel: str) -> str:
        return f"{self.root}/{rel}" if self.root else rel

    def read(self, rel: str) -> bytes:
        if rel not in self._fileset:
            raise FileNotFoundError(self.origin(rel))
        with self._lock:
            return self._handle().read(self._member(rel))

    def exists(self, rel: str) -> bool:
        return rel in self._fileset

    def list_files(self, prefix: str) -> list[str]:
        pre = prefix.strip("/") + "/" if prefix.strip("/") else ""
        if not pre:
            return list(self._files)
        # The names are sorted, so everything under ``pre`` is one contiguous run: two bisections
        # instead of a scan (opening a 25k-file archive lists 200 class folders).
        lo = bisect.bisect_left(self._files, pre)
        hi = bisect.bisect_left(self._files, pre[:-1] + chr(ord("/") + 1))
        return self._files[lo:hi]

    def list_dirs(self, prefix: str) -> list[str]:
        pre = prefix.strip("/") + "/" if prefix.strip("/") else ""
        dirs = set()
        for f in self.list_files(prefix):
            rest = f[len(pre) :]
            if "/" in rest:
                dirs.add(rest.split("/", 1)[0])
        return sorted(dirs)

    def origin(self, rel: str) -> str:
        return f"{self.archive}:{self._member(rel)}"

    def stamp(self, rel: str) -> str:
        return self._stamp[rel]

    def sub(self, prefix: str) -> ZipStore:
        prefix = prefix.strip("/")
        child = object.__new__(ZipStore)
        child.__setstate__(self.__getstate__())
        child.root = f"{self.root}/{prefix}" if self.root else prefix
        pre = prefix + "/"
        child._files = [f[len(pre) :] for f in self._files if f.startswith(pre)]
        child._fileset = frozenset(child._files)
        child._stamp = {f[len(pre) :]: v for f, v in self._stamp.items() if f.startswith(pre)}
        return child


def _inode(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_dev, st.st_ino


def open_store(path: str | os.PathLike[str]) -> FileStore:
    """A store for a folder or a ``.zip`` file."""
    p = Path(path)
    if p.is_dir():
        return FolderStore(p)
    if p.is_file() and zipfile.is_zipfile(p):
        return ZipStore(p)
    if p.exists():
        raise DataError(f"{p} is neither a folder nor a zip archive")
    raise DataError(f"{p} does not exist")
