"""CIFAR-10 from the official *python* batches, read in place from a folder or the ``.tar.gz``.

The official files (``data_batch_1`` .. ``data_batch_5``, ``test_batch``, ``batches.meta``) are
Python 2 pickles. Unpickling runs whatever callables a pickle names, so a doctored batch could run
arbitrary code the moment it is read; we therefore unpickle through :class:`SafeUnpickler`, which only
resolves the few numpy globals an array needs and refuses everything else.

Files are checked against the official md5s (see ``verify`` of :func:`load_cifar10`) so that a
truncated download or a modified file is reported as such instead of silently training on bad data.
"""

from __future__ import annotations

import hashlib
import importlib
import io
import logging
import os
import pickle
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from transferlab.data.base import ArraySplit, ClassInfo, DatasetSource
from transferlab.errors import ConfigError, DataError
from transferlab.io import file_digest

log = logging.getLogger(__name__)

#: Where users are told to get the dataset.
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
#: The folder inside the official archive that holds the batches.
CIFAR10_DIRNAME = "cifar-10-batches-py"

TRAIN_BATCHES: tuple[str, ...] = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"
META_FILE = "batches.meta"
REQUIRED_FILES: tuple[str, ...] = (*TRAIN_BATCHES, TEST_BATCH, META_FILE)

#: md5 of each official file and of the official archive.
OFFICIAL_MD5: dict[str, str] = {
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47d5f1c56",
    "test_batch": "40351d587109b95175f43aff81a1287e",
    "batches.meta": "5ff9c542aee3614f3951f8cda6e48888",
}
OFFICIAL_ARCHIVE_MD5 = "c58f30108f718f92721af3b95e74349a"
#: Rows in every official batch; in ``verify="auto"`` a batch of this size claims to be official.
OFFICIAL_BATCH_ROWS = 10000

VERIFY_MODES = ("auto", "strict", "off")
_ROW_BYTES = 32 * 32 * 3


# --------------------------------------------------------------------------------------------------
# Safe unpickling
# --------------------------------------------------------------------------------------------------


def _numpy_reconstruct() -> Callable[..., Any]:
    """numpy's array-unpickling helper, from wherever this numpy keeps it.

    numpy 2 moved ``numpy.core`` to ``numpy._core`` (the old name still works but warns), while the
    official files, written by numpy 1 under Python 2, name ``numpy.core.multiarray``.
    """
    for module in ("numpy._core.multiarray", "numpy.core.multiarray"):
        try:
            return importlib.import_module(module)._reconstruct  # type: ignore[no-any-return]
        except (ImportError, AttributeError):
            continue
    raise ImportError("numpy provides no multiarray._reconstruct")  # pragma: no cover


def _latin1_encode(obj: Any, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    """Stand-in for ``_codecs.encode``, which protocol-2 pickles written by Python 3 use for bytes.

    Only the latin-1 round trip that pickle itself emits is allowed, so the global cannot be used as
    a general codec machine.
    """
    if not isinstance(obj, str) or encoding.replace("_", "-").lower() not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"_codecs.encode is only allowed for latin-1 str, not {encoding!r}")
    return obj.encode("latin-1", errors)


class SafeUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the globals numpy arrays need.

    CIFAR batches hold nothing but dicts, lists, bytes, ints and uint8 arrays, so any other global
    (``os.system``, ``builtins.eval``, ...) means the file is not a CIFAR batch, or is hostile.
    """

    def __init__(self, file: io.BytesIO, origin: str) -> None:
        super().__init__(file, encoding="bytes")
        self.origin = origin
        reconstruct = _numpy_reconstruct()
        self._allowed: dict[tuple[str, str], Any] = {
            ("numpy.core.multiarray", "_reconstruct"): reconstruct,
            ("numpy._core.multiarray", "_reconstruct"): reconstruct,
            ("numpy", "ndarray"): np.ndarray,
            ("numpy", "dtype"): np.dtype,
            ("_codecs", "encode"): _latin1_encode,
        }

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise DataError(
                f"refusing to unpickle {module}.{name} from {self.origin}: CIFAR batches contain only arrays and lists"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise DataError(f"refusing persistent id {pid!r} in {self.origin}: not a CIFAR batch")


def safe_unpickle(raw: bytes, origin: str) -> Any:
    """Unpickle ``raw`` (the bytes of ``origin``) with :class:`SafeUnpickler`.

    Any failure, including a refused global, becomes a :class:`DataError` naming ``origin``.
    """
    try:
        return SafeUnpickler(io.BytesIO(raw), origin).load()
    except DataError:
        raise
    except Exception as err:  # malformed pickles raise many kinds of errors
        raise DataError(
            f"{origin} is not a readable CIFAR pickle ({type(err).__name__}: {err}); "
            f"re-download CIFAR-10 from {CIFAR10_URL}"
        ) from err


# --------------------------------------------------------------------------------------------------
# Reading the files
# --------------------------------------------------------------------------------------------------


@dataclass
class _Batch:
    """One parsed batch: its ``(N, 3072)`` rows and integer labels (range not yet checked)."""

    name: str
    origin: str
    data: np.ndarray
    labels: np.ndarray


def _get(d: dict[Any, Any], key: str, origin: str) -> Any:
    """``d[key]`` accepting both bytes keys (official Python 2 files) and str keys."""
    for k in (key.encode("ascii"), key):
        if k in d:
            return d[k]
    raise DataError(f"{origin} has no {key!r} entry; is it a CIFAR-10 python batch?")


def _check_md5(name: str, origin: str, raw: bytes) -> None:
    expected = OFFICIAL_MD5[name]
    actual = hashlib.md5(raw).hexdigest()
    if actual != expected:
        raise DataError(
            f"{origin} has md5 {actual}, expected {expected}: the file is corrupt or modified; "
            f"re-download CIFAR-10 from {CIFAR10_URL} (or pass verify='off' for your own batches)"
        )


def _parse_batch(name: str, origin: str, raw: bytes, verify: str) -> _Batch:
    """Unpickle and validate one data/test batch; md5-check it as ``verify`` demands."""
    if verify == "strict":
        _check_md5(name, origin, raw)  # before unpickling: nothing unverified is parsed
    obj = safe_unpickle(raw, origin)
    if not isinstance(obj, dict):
        raise DataError(f"{origin} holds a {type(obj).__name__}, expected a dict (a CIFAR-10 batch)")
    data = _get(obj, "data", origin)
    labels_obj = _get(obj, "labels", origin)
    _check_data(name, origin, raw, verify, data)
    labels = _check_labels(origin, labels_obj, len(data))
    return _Batch(name, origin, data, labels.astype(np.int64))


def _check_data(name: str, origin: str, raw: bytes, verify: str, data: Any) -> None:
    """The batch's pixel rows: a (N, 3072) uint8 array; an official-size batch is md5-checked with ``auto``."""
    if not isinstance(data, np.ndarray):
        raise DataError(f"{origin}: data is a {type(data).__name__}, expected a uint8 array")
    if verify == "auto":
        if data.ndim >= 1 and data.shape[0] == OFFICIAL_BATCH_ROWS:
            _check_md5(name, origin, raw)
        else:
            log.debug("%s: %s rows, not an official-size batch; md5 check skipped", origin, data.shape[:1])
    if data.ndim != 2 or data.shape[1] != _ROW_BYTES:
        raise DataError(f"{origin}: data has shape {tuple(data.shape)}, expected (N, {_ROW_BYTES})")
    if data.dtype != np.uint8:
        raise DataError(f"{origin}: data has dtype {data.dtype}, expected uint8")


def _check_labels(origin: str, labels_obj: Any, n_rows: int) -> np.ndarray:
    """The batch's labels as a flat integer array, one per data row."""
    try:
        labels = np.asarray(labels_obj)
    except Exception as err:
        raise DataError(f"{origin}: labels cannot be read as integers ({err})") from err
    if labels.ndim != 1 or (len(labels) and labels.dtype.kind not in "iu"):
        raise DataError(f"{origin}: labels must be a flat list of integers, got {labels.dtype} {tuple(labels.shape)}")
    if len(labels) != n_rows:
        raise DataError(f"{origin}: {len(labels)} labels for {n_rows} data rows")
    return labels


def _parse_meta(origin: str, raw: bytes, verify: str) -> tuple[str, ...]:
    """The class names from ``batches.meta``."""
    if verify == "strict":
        _check_md5(META_FILE, origin, raw)
    obj = safe_unpickle(raw, origin)
    if not isinstance(obj, dict):
        raise DataError(f"{origin} holds a {type(obj).__name__}, expected a dict (CIFAR-10 batches.meta)")
    names_obj = _get(obj, "label_names", origin)
    if not isinstance(names_obj, list | tuple) or not names_obj:
        raise DataError(f"{origin}: label_names must be a non-empty list of names")
    names: list[str] = []
    for n in names_obj:
        if isinstance(n, bytes):
            try:
                n = n.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataError(f"{origin}: label name {n!r} is not UTF-8") from err
        if not isinstance(n, str) or not n:
            raise DataError(f"{origin}: label_names entry {n!r} is not a non-empty string")
        names.append(n)
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise DataError(f"{origin}: duplicate label names {dup[:5]}")
    return tuple(names)


def _missing(origin: str) -> DataError:
    return DataError(
        f"{origin} is missing; CIFAR-10 needs {', '.join(REQUIRED_FILES)}. "
        f"Download {CIFAR10_URL} and pass the archive or its extracted {CIFAR10_DIRNAME} folder"
    )


def _iter_folder(root: Path) -> Iterator[tuple[str, str, bytes]]:
    """``(name, origin, bytes)`` of each required file in ``root``; a DataError for a missing one."""
    absent = [n for n in REQUIRED_FILES if not (root / n).is_file()]
    if absent:
        raise _missing(str(root / absent[0]))
    for n in REQUIRED_FILES:
        yield n, str(root / n), (root / n).read_bytes()


def _iter_tar(archive: Path) -> Iterator[tuple[str, str, bytes]]:
    """``(name, origin, bytes)`` of each required member, in archive order, without extracting.

    A gzip tar can only be read forwards cheaply, so members are handed out as they are met in
    one pass rather than looked up by name.
    """
    seen: set[str] = set()
    try:
        with tarfile.open(archive, "r:*") as tf:
            for member in tf:
                rel = member.name.removeprefix("./")
                parent, _, base = rel.rpartition("/")
                if base not in REQUIRED_FILES or parent not in ("", CIFAR10_DIRNAME) or base in seen:
                    continue
                if not member.isfile():
                    raise DataError(f"{archive}:{member.name} is not a regular file")
                fobj = tf.extractfile(member)
                if fobj is None:  # pragma: no cover - isfile() members always have data
                    raise _missing(f"{archive}:{member.name}")
                seen.add(base)
                yield base, f"{archive}:{member.name}", fobj.read()
    except (tarfile.TarError, EOFError, OSError) as err:
        raise DataError(
            f"{archive} is not a readable tar archive ({err}); re-download CIFAR-10 from {CIFAR10_URL}"
        ) from err
    absent = [n for n in REQUIRED_FILES if n not in seen]
    if absent:
        raise _missing(f"{archive}:{CIFAR10_DIRNAME}/{absent[0]}")


def _open_source(path: Path, verify: str) -> tuple[Iterator[tuple[str, str, bytes]], str]:
    """The file iterator for ``path`` and the verify mode to apply to each file."""
    if path.is_dir():
        nested = path / CIFAR10_DIRNAME
        return _iter_folder(nested if nested.is_dir() else path), verify
    if not path.exists():
        raise DataError(f"{path} does not exist; download CIFAR-10 from {CIFAR10_URL}")
    if not (path.is_file() and tarfile.is_tarfile(path)):
        raise DataError(
            f"{path} is neither a folder nor a tar archive; pass the CIFAR-10 python archive "
            f"({CIFAR10_URL}) or its extracted {CIFAR10_DIRNAME} folder"
        )
    if verify != "off" and file_digest(path, "md5") == OFFICIAL_ARCHIVE_MD5:
        # The whole archive is byte-identical to the official one, so every member is too.
        log.debug("%s is the official CIFAR-10 archive; per-file md5 checks skipped", path)
        return _iter_tar(path), "off"
    return _iter_tar(path), verify


# --------------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------------


def load_cifar10(path: str | os.PathLike[str], verify: str = "auto") -> DatasetSource:
    """Read CIFAR-10 (python version) into a :class:`DatasetSource` with ``train`` and ``test`` splits.

    ``path`` is the folder holding the batch files, a folder containing ``cifar-10-batches-py/``, or
    the official ``cifar-10-python.tar.gz`` (read in place, never extracted).

    ``verify`` decides which files must match the official md5s:

    * ``"auto"``: a batch with exactly 10000 rows claims to be an official file and must match
      (``batches.meta`` too when all six batches do); smaller batches, e.g. synthetic test data, are
      not checked;
    * ``"strict"``: every file must match (checked before it is unpickled);
    * ``"off"``: nothing is checked.

    Images are uint8 ``(N, 32, 32, 3)``; sample ids are ``"<batch file>/<index in batch>"``.
    """
    if verify not in VERIFY_MODES:
        raise ConfigError(f"verify must be one of {', '.join(map(repr, VERIFY_MODES))}, not {verify!r}")
    root = Path(path)
    files, file_verify = _open_source(root, verify)

    batches: dict[str, _Batch] = {}
    meta_raw: tuple[str, bytes] | None = None
    for name, origin, raw in files:
        if name == META_FILE:
            meta_raw = (origin, raw)  # parsed last: auto mode needs to know if the batches are official
        else:
            batches[name] = _parse_batch(name, origin, raw, file_verify)
    assert meta_raw is not None  # the iterators raise for any missing file

    meta_verify = file_verify
    if file_verify == "auto" and not all(len(b.data) == OFFICIAL_BATCH_ROWS for b in batches.values()):
        meta_verify = "off"
    elif file_verify == "auto":
        meta_verify = "strict"
    names = _parse_meta(*meta_raw, meta_verify)
    classes = ClassInfo(ids=names, names=names)

    for b in batches.values():
        bad = np.flatnonzero((b.labels < 0) | (b.labels >= len(names)))
        if len(bad):
            i = int(bad[0])
            raise DataError(
                f"{b.origin}: label {int(b.labels[i])} at row {i} is outside [0, {len(names)}) "
                f"({len(names)} label_names in {META_FILE})"
            )

    splits = {
        "train": _make_split("train", [batches[n] for n in TRAIN_BATCHES], classes, str(root)),
        "test": _make_split("test", [batches[TEST_BATCH]], classes, str(root)),
    }
    log.info(
        "CIFAR-10 from %s: %d train, %d test images, %d classes",
        root,
        len(splits["train"]),
        len(splits["test"]),
        len(classes),
    )
    return DatasetSource(name="cifar10", location=str(path), classes=classes, splits=splits, imagenet_classes=False)


def _make_split(name: str, parts: list[_Batch], classes: ClassInfo, source: str) -> ArraySplit:
    """Concatenate batches into HWC images (rows are planar: 1024 R, 1024 G, 1024 B bytes)."""
    data = np.concatenate([b.data for b in parts]) if parts else np.zeros((0, _ROW_BYTES), np.uint8)
    # Contiguous so each sample is one cheap slice for PIL and DataLoader workers.
    images = np.ascontiguousarray(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    targets = np.concatenate([b.labels for b in parts])
    ids = [f"{b.name}/{i}" for b in parts for i in range(len(b.data))]
    return ArraySplit(name, images, targets, classes, sample_ids=ids, source=source)
