"""Turn what the user typed for ``--data`` (a path or a dataset name) into a local file or folder.

Users should be able to say ``tiny-imagenet`` on any machine: on a laptop the archive is fetched once
into the per-user cache; on a cluster it is usually already on shared storage, which
``TRANSFERLAB_DATA`` points at, so no compute node downloads (or even needs internet). When nothing is
found, the error lists every place that was searched, because "file not found" without the search
path is the most common and least actionable data error.

Environment:

``TRANSFERLAB_DATA``
    Folders (``os.pathsep``-separated) searched first, in order, for datasets by name.
``TRANSFERLAB_CACHE``
    Overrides the per-user cache root (``platformdirs.user_cache_dir("transferlab")``).
``TRANSFERLAB_OFFLINE``
    ``1`` forbids any download, for air-gapped nodes where a hanging connection would waste a job.
"""

from __future__ import annotations

import difflib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import platformdirs

from transferlab.data.download import download_file
from transferlab.errors import DataError

log = logging.getLogger(__name__)

#: What a ``--data`` option accepts (the --help text of every command that reads a dataset).
DATA_HELP = (
    "a folder, a .zip, CIFAR-10 batches, or a dataset name (tiny-imagenet, tiny-imagenet-mini, cifar10) "
    "looked up in $TRANSFERLAB_DATA (os.pathsep-separated folders), then the user cache; tiny-imagenet "
    "and cifar10 are downloaded when absent"
)


@dataclass(frozen=True)
class DatasetInfo:
    """Where a named dataset may be found locally and, if it has one, its official download.

    Frozen so the registry cannot be altered by accident at run time; tests swap whole entries
    (``dataclasses.replace``) to point a download at a local server.
    """

    name: str
    folder: str
    """Name of the unpacked folder, looked for before the archive (reading loose files is faster)."""
    archive: str
    """File name of the archive, which is also the name a download is saved under."""
    url: str | None = None
    md5: str | None = None


KNOWN_DATASETS: dict[str, DatasetInfo] = {
    info.name: info
    for info in (
        DatasetInfo(
            name="tiny-imagenet",
            folder="tiny-imagenet-200",
            archive="tiny-imagenet-200.zip",
            url="http://cs231n.stanford.edu/tiny-imagenet-200.zip",
            md5="90528d7ca1a48142e341f4ef8d21d0de",
        ),
        DatasetInfo(
            # A subset built locally for quick experiments and tests; it is published nowhere.
            name="tiny-imagenet-mini",
            folder="tiny-imagenet-200-mini",
            archive="tiny-imagenet-200-mini.zip",
        ),
        DatasetInfo(
            name="cifar10",
            folder="cifar-10-batches-py",
            archive="cifar-10-python.tar.gz",
            url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
            md5="c58f30108f718f92721af3b95e74349a",
        ),
    )
}


def cache_dir() -> Path:
    """Per-user cache root: ``$TRANSFERLAB_CACHE`` if set, else the platform's user cache folder.

    The override exists for clusters where the home quota is too small for datasets, and for tests.
    """
    override = os.environ.get("TRANSFERLAB_CACHE", "").strip()
    if override:
        return Path(override).expanduser()
    return Path(platformdirs.user_cache_dir("transferlab"))


def datasets_cache_dir() -> Path:
    """Folder inside :func:`cache_dir` where downloaded datasets are kept."""
    return cache_dir() / "datasets"


def search_dirs() -> list[Path]:
    """Folders searched for datasets by name, in priority order: ``$TRANSFERLAB_DATA``, then the cache."""
    raw = os.environ.get("TRANSFERLAB_DATA", "")
    dirs = [Path(part.strip()).expanduser() for part in raw.split(os.pathsep) if part.strip()]
    dirs.append(datasets_cache_dir())
    return dirs


def _offline() -> bool:
    return os.environ.get("TRANSFERLAB_OFFLINE", "").strip() == "1"


def _find_local(info: DatasetInfo, dirs: list[Path]) -> Path | None:
    for d in dirs:
        folder = d / info.folder
        if folder.is_dir():
            return folder
        archive = d / info.archive
        if archive.is_file():
            return archive
    return None


def _lookup_name(spec: str) -> DatasetInfo | None:
    # Case-insensitive because names are typed on command lines; anything looser is left to the
    # did-you-mean hint so that a typo never silently selects a different dataset.
    return KNOWN_DATASETS.get(spec.strip().lower())


def _unknown_spec_error(spec: str) -> DataError:
    names = ", ".join(KNOWN_DATASETS)
    message = f"'{spec}' is not an existing file or folder, nor a known dataset name ({names})"
    close = difflib.get_close_matches(spec.strip().lower(), list(KNOWN_DATASETS), n=1, cutoff=0.6)
    if close:
        message += f". Did you mean '{close[0]}'?"
    return DataError(message)


def _not_found_message(info: DatasetInfo, dirs: list[Path], why_no_download: str) -> str:
    places = "; ".join(
        f"{d / info.folder}/ or {d / info.archive}" + ("" if d.is_dir() else " (folder does not exist)") for d in dirs
    )
    targets = ", ".join(str(d) for d in dirs)
    return (
        f"dataset '{info.name}' was not found. Looked for: {places}. {why_no_download} "
        f"Put {info.archive} (or the unpacked folder {info.folder}/) in one of: {targets}, "
        f"or set TRANSFERLAB_DATA=/folder/holding/it"
    )


def resolve_data(spec: str, *, download: bool = True, progress: bool | None = None) -> Path:
    """Return a local path for ``spec``: an existing file or folder, or a known dataset name.

    A name is looked up in ``$TRANSFERLAB_DATA`` folders, then the user cache (folder before archive
    within each location, first hit wins). If it is missing and has an official download, it is
    downloaded into the cache, unless ``download`` is False or ``TRANSFERLAB_OFFLINE=1``.

    An existing path always wins over a name, so a local folder called ``cifar10`` is used as is.
    Raises :class:`DataError` listing every place searched when nothing can be found or fetched.
    """
    if not spec or not spec.strip():
        # Path("") means the current directory, which would "exist" and be silently used.
        raise DataError("no dataset given: pass a file or folder, or one of " + ", ".join(KNOWN_DATASETS))

    path = Path(spec).expanduser()
    if path.exists():
        return path

    info = _lookup_name(spec)
    if info is None:
        raise _unknown_spec_error(spec)

    dirs = search_dirs()
    found = _find_local(info, dirs)
    if found is not None:
        log.info("dataset '%s': using %s", info.name, found)
        return found

    if info.url is None:
        why = f"'{info.name}' has no official download."
    elif not download:
        why = "Downloading was disabled."
    elif _offline():
        why = "Not downloading because TRANSFERLAB_OFFLINE=1."
    else:
        dest = datasets_cache_dir() / info.archive
        log.info("dataset '%s' not found locally; downloading it to %s", info.name, dest)
        try:
            return download_file(info.url, dest, md5=info.md5, progress=progress)
        except DataError as exc:
            raise DataError(_not_found_message(info, dirs, f"The download failed: {str(exc).rstrip('.')}.")) from exc
    raise DataError(_not_found_message(info, dirs, why))
