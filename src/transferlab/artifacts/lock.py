"""The run lock: one process at a time writes into a run, evaluation, ensemble or study folder.

:class:`RunLock` records ``{pid, hostname, started, token}`` in ``FOLDER/.lock``; a second process pointed at
the same folder stops at once naming the owner, and a lock whose owner has died is taken over with a warning.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import os
import socket
import time
import uuid
from pathlib import Path
from types import TracebackType
from typing import Any

from transferlab.errors import TransferlabError

log = logging.getLogger(__name__)


class RunLockedError(TransferlabError):
    """Another live process is using the run directory."""


class RunLock:
    """Exclusive use of a run directory by one process, recorded in ``run_dir/.lock``.

    The lock file holds ``{pid, hostname, started}`` as JSON and is created with ``O_CREAT | O_EXCL``, so
    of two processes starting at once exactly one wins. A lock left behind by a process that died on this
    host (or whose pid now belongs to a younger process) is taken over with a warning. A lock from another
    host is never taken over: this machine cannot see whether that process still runs, and two writers on
    a shared file system would corrupt the run.
    """

    _PATIENCE_S = 5.0  # how long to keep trying while the lock file is changing under us
    _FRESH_S = 2.0  # an unparseable lock younger than this is probably still being written by its owner

    def __init__(self, run_dir: str | os.PathLike[str]) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / ".lock"
        self._token: str | None = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()

    @property
    def held(self) -> bool:
        """True between a successful :meth:`acquire` and :meth:`release`."""
        return self._token is not None

    def acquire(self) -> None:
        """Take the lock or raise :class:`RunLockedError` saying who holds it and what to do."""
        if self._token is not None:
            raise RuntimeError(f"{self.path} is already held by this RunLock")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        token = uuid.uuid4().hex
        record = {
            "pid": os.getpid(),
            "hostname": socket.gethostname(),
            "started": _dt.datetime.now(_dt.UTC).isoformat(),
            "token": token,
        }
        payload = (json.dumps(record) + "\n").encode()
        deadline = time.monotonic() + self._PATIENCE_S
        while time.monotonic() < deadline:
            if self._try_create(payload):
                self._token = token
                return
            seen = self._read_existing()
            if seen is None:
                continue  # vanished between our attempt and the read: try again
            text, holder = seen
            reason = self._stale_reason(holder)
            if reason is None:
                time.sleep(0.05)  # still being written by its owner; look again
                continue
            log.warning("taking over the run directory %s: %s", self.run_dir, reason)
            self._take_over(text)
        raise RunLockedError(
            f"could not lock the run directory {self.run_dir}: {self.path} kept changing while trying; is another "
            "process starting in the same directory?"
        )

    def release(self) -> None:
        """Remove the lock file if it is still ours."""
        token, self._token = self._token, None
        if token is None:
            return
        try:
            current = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            log.warning("the lock %s disappeared while the run was using it", self.path)
            return
        except (OSError, ValueError):
            current = None
        if not isinstance(current, dict) or current.get("token") != token:
            log.warning("the lock %s was replaced by another process; leaving it in place", self.path)
            return
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def _try_create(self, payload: bytes) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        try:
            os.write(fd, payload)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            raise
        os.close(fd)
        return True

    def _read_existing(self) -> tuple[str, dict[str, Any] | None] | None:
        """The lock's text and parsed record (None if unparseable), or None if the file is gone."""
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError):
            return "", None
        try:
            holder = json.loads(text)
        except ValueError:
            holder = None
        return text, holder if isinstance(holder, dict) else None

    def _stale_reason(self, holder: dict[str, Any] | None) -> str | None:
        """Why the existing lock may be taken over; None to look again; raises if it is held."""
        if holder is None:
            try:
                age = time.time() - self.path.stat().st_mtime
            except FileNotFoundError:
                return None
            if age < self._FRESH_S:
                return None
            return f"its lock file {self.path} is unreadable (left by a crashed process)"
        pid = holder.get("pid")
        host = holder.get("hostname")
        started = holder.get("started")
        if not isinstance(pid, int) or isinstance(pid, bool):
            return f"its lock file {self.path} names no process"
        here = socket.gethostname()
        if host != here:
            raise RunLockedError(
                f"the run directory {self.run_dir} is locked by process {pid} on host {host} (since {started}); "
                f"this host ({here}) cannot tell whether that process is still running. If it is not, delete "
                f"{self.path} and start again."
            )
        if _pid_alive(pid) and not _pid_reused(pid, started):
            raise RunLockedError(
                f"the run directory {self.run_dir} is in use by process {pid} on this host (since {started}). "
                f"Wait for it to finish, stop it (kill {pid}), or use another output directory; if no such run "
                f"is going on, delete {self.path}."
            )
        return f"its lock was left by process {pid}, which is no longer running (stale since {started})"

    def _take_over(self, seen_text: str) -> None:
        """Move the stale lock aside, making sure it is the one we judged stale.

        Between reading the lock and removing it another process may have taken it over already; removing
        its fresh lock would let two processes in. Renaming first and comparing the content catches that,
        and the fresh lock is put back with ``os.link``, which never overwrites.
        """
        aside = self.path.with_name(f".lock.stale.{os.getpid()}.{uuid.uuid4().hex[:8]}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        try:
            moved = aside.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            moved = None
        if moved != seen_text:
            try:
                os.link(aside, self.path)
            except OSError:
                log.warning("a lock of another process in %s was displaced while taking over", self.run_dir)
        with contextlib.suppress(FileNotFoundError):
            aside.unlink()


_REUSE_MARGIN_S = 60.0


def _pid_alive(pid: int) -> bool:
    """Whether ``pid`` is a running process on this host (zombies count as dead)."""
    if pid <= 0:
        return False
    if os.name == "nt":  # os.kill(pid, 0) would send CTRL_C_EVENT there: assume alive, let the user decide
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    except OSError:
        return True
    stat = _proc_stat(pid)
    return not (stat is not None and stat[0] == "Z")


def _pid_reused(pid: int, started: Any) -> bool:
    """True if the process now carrying ``pid`` started after the lock was written (Linux only).

    After a crash and a reboot, or on a busy machine, the dead owner's pid can belong to an unrelated
    process; without this check the run directory would stay locked until someone deletes the file.
    """
    stat = _proc_stat(pid)
    if stat is None or not isinstance(started, str):
        return False
    try:
        locked_at = _dt.datetime.fromisoformat(started).timestamp()
        ticks = int(stat[19])
        boot = _boot_time()
        hz = os.sysconf("SC_CLK_TCK")
    except (ValueError, IndexError, OSError):
        return False
    if boot is None:
        return False
    # A generous margin: wall-clock steps between writing the lock and now must not make a live owner
    # look younger than its lock. A restarted job is normally far more than a minute younger.
    return boot + ticks / hz > locked_at + _REUSE_MARGIN_S


def _proc_stat(pid: int) -> list[str] | None:
    """Fields of ``/proc/<pid>/stat`` after the command name (state first), or None off Linux."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    _, sep, rest = text.rpartition(")")
    return rest.split() if sep else None


def _boot_time() -> float | None:
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/stat").read_text().splitlines():
            if line.startswith("btime "):
                return float(line.split()[1])
    return None
