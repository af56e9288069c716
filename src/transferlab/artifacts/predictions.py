"""The predictions file: one type, one writer, one reader.

Layout: ``FOLDER/predictions/<split>.npz`` for every folder that holds predictions (a training run, an
``evaluate`` output, an ensemble, a study's re-evaluation). Folders written before evaluate used that layout
hold ``FOLDER/predictions.npz``; :func:`find_predictions` still reads them.

An ``.npz`` of four arrays, readable with ``np.load(allow_pickle=False)``: ``logits`` (float32, samples x
classes; log-probabilities for TTA and ensembles, which a softmax maps back to the same probabilities),
``targets`` (int64, -1 for unlabeled samples), ``sample_ids`` (str) and ``class_ids`` (str).
"""

from __future__ import annotations

import hashlib
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from transferlab.errors import DataError
from transferlab.io import atomic_write_with
from transferlab.metrics import softmax

PREDICTIONS_DIR = "predictions"
#: The single file evaluate wrote before it used ``predictions/<split>.npz``: still read, never written.
LEGACY_FILE = "predictions.npz"
KEYS = ("logits", "targets", "sample_ids", "class_ids")


@dataclass
class Predictions:
    """One predictions file as read, checked: the arrays fit together, the logits are finite."""

    path: Path
    logits: np.ndarray
    targets: np.ndarray
    sample_ids: np.ndarray
    class_ids: np.ndarray
    _probs: np.ndarray | None = field(default=None, repr=False)

    @property
    def probs(self) -> np.ndarray:
        """Softmax of the logits (also right for log-probabilities), computed once."""
        if self._probs is None:
            self._probs = softmax(self.logits)
        return self._probs

    @property
    def ids_sha256(self) -> str:
        """sha256 over the sample ids in order: two files with the same value cover the same samples."""
        h = hashlib.sha256()
        for s in self.sample_ids.tolist():
            h.update(str(s).encode("utf-8"))
            h.update(b"\n")
        return h.hexdigest()


def predictions_path(folder: str | Path, split: str) -> Path:
    """Where ``folder``'s predictions on ``split`` are written."""
    return Path(folder) / PREDICTIONS_DIR / f"{split}.npz"


def find_predictions(folder: str | Path, split: str) -> Path | None:
    """``folder``'s predictions file for ``split``: ``predictions/<split>.npz``, else a legacy ``predictions.npz``."""
    p = predictions_path(folder, split)
    if p.is_file():
        return p
    legacy = Path(folder) / LEGACY_FILE
    return legacy if legacy.is_file() else None


def prediction_splits(folder: str | Path) -> list[str]:
    """The splits ``folder`` holds predictions for (``predictions/*.npz``), sorted."""
    d = Path(folder) / PREDICTIONS_DIR
    return sorted(f.stem for f in d.glob("*.npz")) if d.is_dir() else []


def write_predictions(
    path: str | Path, logits: np.ndarray, targets: np.ndarray, sample_ids: Sequence[str], class_ids: Sequence[str]
) -> None:
    """Write a predictions file atomically (temp file, fsync, rename); no pickles."""

    def _npz(f: Any) -> None:
        np.savez(
            f,
            logits=np.asarray(logits).astype(np.float32),
            targets=np.asarray(targets).astype(np.int64),
            sample_ids=np.asarray(list(sample_ids), dtype=str),
            class_ids=np.asarray(list(class_ids), dtype=str),
        )

    atomic_write_with(Path(path), _npz)


def read_predictions(path: str | Path, *, where: str | None = None, labeled: bool = False) -> Predictions:
    """Read and check a predictions file; every problem is a DataError naming the file (``where`` says whose).

    ``labeled=True`` (ensembles and reports measure on labeled samples only) also refuses targets outside the class
    range, which is how unlabeled samples are stored.
    """
    path = Path(path)
    who = f"{where} ({path})" if where else str(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in KEYS if k not in z.files]
            if missing:
                raise DataError(
                    f"{who}: missing {', '.join(missing)}; expected a predictions file written by `transferlab train`, "
                    "`evaluate` or `ensemble`"
                )
            data = {k: z[k] for k in KEYS}
    except DataError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise DataError(f"{who}: cannot read it as a predictions .npz ({e}); write it again") from e
    logits = np.asarray(data["logits"])
    targets = np.asarray(data["targets"])
    sample_ids = np.asarray(data["sample_ids"]).astype(str)
    class_ids = np.asarray(data["class_ids"]).astype(str)
    if logits.ndim != 2 or logits.shape != (len(sample_ids), len(class_ids)):
        raise DataError(
            f"{who}: logits have shape {logits.shape} but there are {len(sample_ids)} sample ids and "
            f"{len(class_ids)} class ids; the file is inconsistent, write it again"
        )
    if targets.shape != (len(sample_ids),) or not np.issubdtype(targets.dtype, np.integer):
        raise DataError(f"{who}: targets must be {len(sample_ids)} integers, got {targets.dtype} {targets.shape}")
    if labeled and len(targets) and (targets.min() < 0 or targets.max() >= len(class_ids)):
        raise DataError(
            f"{who}: targets outside 0..{len(class_ids) - 1} (unlabeled samples?); ensembles and reports are "
            "measured on labeled splits only"
        )
    if not np.isfinite(logits).all():
        raise DataError(f"{who}: logits contain NaN or infinity; evaluate the model again")
    return Predictions(path, logits, targets.astype(np.int64), sample_ids, class_ids)
