"""``transferlab data check``: decode every image once and report what is there and what is broken.

Run it before a long training job: a broken file found at epoch 37 costs hours, found here it costs
seconds. Decoding is spread over worker processes; each failure is reported with its file and reason.

The bytes read for decoding are also hashed (:mod:`transferlab.data.digests`), so exact duplicates
within a split, across splits and across classes are reported at almost no cost; so are classes that
have no image in a split and the files that were not made samples (hidden files, non-images).
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from transferlab.data.base import ArraySplit, DatasetSource, FileSplit, ImageSplit
from transferlab.data.digests import DIGEST_BYTES, Duplicates, content_digest, find_duplicates, sample_bytes
from transferlab.data.images import GRAYSCALE_MODES, open_image, to_rgb
from transferlab.data.screen import empty_classes
from transferlab.errors import BadImageError

log = logging.getLogger(__name__)


@dataclass
class SplitReport:
    """What one split holds: counts, modes, sizes, labels per class, and the files that failed."""

    name: str
    n: int
    labeled: bool
    modes: Counter[str] = field(default_factory=Counter)
    sizes: Counter[str] = field(default_factory=Counter)
    per_class: list[int] = field(default_factory=list)
    failures: list[tuple[str, str]] = field(default_factory=list)
    #: Classes of the dataset with no image in this split (labeled splits only).
    missing_classes: list[str] = field(default_factory=list)

    @property
    def grayscale(self) -> int:
        """Number of images stored in a grayscale mode (returned as RGB by the loaders)."""
        return sum(v for k, v in self.modes.items() if k in GRAYSCALE_MODES)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form."""
        return {
            "n": self.n,
            "labeled": self.labeled,
            "grayscale": self.grayscale,
            "modes": dict(self.modes.most_common()),
            "sizes": dict(self.sizes.most_common()),
            "per_class_min": min(self.per_class) if self.per_class else None,
            "per_class_max": max(self.per_class) if self.per_class else None,
            "failures": [{"file": f, "reason": r} for f, r in self.failures],
            "classes_without_images": self.missing_classes,
        }


@dataclass
class CheckReport:
    """The result of checking every split of a dataset."""

    name: str
    location: str
    num_classes: int
    imagenet_classes: bool
    splits: list[SplitReport]
    #: Exact copies among the readable images of every split.
    duplicates: Duplicates = field(default_factory=Duplicates)
    #: Files below the dataset that are not samples, by reason (see DatasetSource.ignored).
    ignored: dict[str, list[str]] = field(default_factory=dict)

    @property
    def total(self) -> int:
        """Images in all splits."""
        return sum(s.n for s in self.splits)

    @property
    def failures(self) -> list[tuple[str, str]]:
        """Every failing file with its reason, over all splits."""
        return [f for s in self.splits for f in s.failures]

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form."""
        return {
            "name": self.name,
            "location": self.location,
            "num_classes": self.num_classes,
            "imagenet_classes": self.imagenet_classes,
            "total": self.total,
            "failures": len(self.failures),
            "splits": {s.name: s.to_dict() for s in self.splits},
            "duplicates": self.duplicates.to_dict(),
            "ignored": {why: {"count": len(files), "files": files[:100]} for why, files in self.ignored.items()},
        }


Chunk = tuple[Counter[str], Counter[str], list[tuple[str, str]], np.ndarray]


def _check_chunk(split: ImageSplit, indices: list[int]) -> Chunk:
    """Modes, sizes, failures and content digests (a zero row for each failure) of ``split[indices]``."""
    modes: Counter[str] = Counter()
    sizes: Counter[str] = Counter()
    failures: list[tuple[str, str]] = []
    digests = np.zeros((len(indices), DIGEST_BYTES), dtype=np.uint8)
    for row, i in enumerate(indices):
        try:
            if isinstance(split, FileSplit):
                rel = split.sample_ids[i]
                origin = split.store.origin(rel)
                try:
                    data = split.store.read(rel)
                except OSError as e:
                    raise BadImageError(origin, f"cannot read: {e}") from e
                img = open_image(data, origin)
                modes[img.mode] += 1
                sizes[f"{img.size[0]}x{img.size[1]}"] += 1
                to_rgb(img)
            else:
                img = split.load(i)
                modes[img.mode] += 1
                sizes[f"{img.size[0]}x{img.size[1]}"] += 1
                data = sample_bytes(split, i)
            # The bytes are in hand: hashing them is what finds exact copies (a broken file is not hashed).
            digests[row] = np.frombuffer(content_digest(data), dtype=np.uint8)
        except BadImageError as e:
            failures.append((e.origin, e.reason))
        except Exception as e:
            failures.append((split.origin(i), f"{type(e).__name__}: {e}"))
    return modes, sizes, failures, digests


_WORKER_SPLIT: list[ImageSplit] = []


def _set_worker_split(split: ImageSplit) -> None:
    _WORKER_SPLIT[:] = [split]


def _check_worker_chunk(indices: list[int]) -> Chunk:
    return _check_chunk(_WORKER_SPLIT[0], indices)


def check_dataset(source: DatasetSource, *, workers: int | None = None, progress: bool | None = None) -> CheckReport:
    """Decode every image of every split of ``source`` and collect a :class:`CheckReport`."""
    if workers is None:
        workers = min(4, os.cpu_count() or 1)
    reports = []
    digests: dict[str, np.ndarray] = {}
    disable = None if progress is None else not progress
    for name, split in source.splits.items():
        rep = SplitReport(name=name, n=len(split), labeled=split.labeled)
        if split.labeled:
            rep.per_class = np.bincount(split.targets, minlength=len(source.classes)).tolist()
            rep.missing_classes = [source.classes.ids[c] for c, n in enumerate(rep.per_class) if n == 0]
        chunk = 500
        chunks = [list(range(s, min(s + chunk, len(split)))) for s in range(0, len(split), chunk)]
        bar = tqdm(total=len(split), desc=f"check {name}", unit="img", disable=disable, leave=False)
        rows: list[np.ndarray] = []

        def add(result: Chunk, n: int, rep: SplitReport = rep, rows: list[np.ndarray] = rows, bar: Any = bar) -> None:
            m, s, f, d = result
            rep.modes.update(m)
            rep.sizes.update(s)
            rep.failures.extend(f)
            rows.append(d)
            bar.update(n)

        if workers > 1 and len(chunks) > 1 and not isinstance(split, ArraySplit):
            # The split travels once per worker, not once per chunk: each unpickled copy of a zip-backed split
            # reopens the archive (parsing its whole table of contents), which made 2 workers slower than 1.
            with ProcessPoolExecutor(max_workers=workers, initializer=_set_worker_split, initargs=(split,)) as pool:
                for ch, result in zip(chunks, pool.map(_check_worker_chunk, chunks), strict=True):
                    add(result, len(ch))
        else:
            for ch in chunks:
                add(_check_chunk(split, ch), len(ch))
        bar.close()
        digests[name] = np.concatenate(rows) if rows else np.zeros((0, DIGEST_BYTES), dtype=np.uint8)
        if name == "train" and split.labeled:
            # A class whose every training image is broken, or whose folder is empty, cannot be learned.
            failed = {origin for origin, _ in rep.failures}
            bad = [(i, "", "") for i in range(len(split)) if failed and split.origin(i) in failed]
            rep.failures.extend(empty_classes(source, name, bad))
        for origin, reason in rep.failures:
            log.debug("bad image %s: %s", origin, reason)
        reports.append(rep)
    return CheckReport(
        source.name,
        source.location,
        len(source.classes),
        source.imagenet_classes,
        reports,
        duplicates=find_duplicates(source, digests),
        ignored=dict(source.ignored),
    )
