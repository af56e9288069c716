"""Exact duplicate images, found by the sha256 of each sample's bytes.

Why. A copy of a training image in val is scored as if the model had never seen it, so val accuracy is
optimistic; the same image under two class folders is label noise; a class folder copied (or linked)
under a second name is a class the model cannot tell apart from the first. None of this is an error a
decoder would notice, and all of it is cheap to find: ``data check`` already reads every file's bytes
and hashing them costs about 0.1 s for the 25,200 images of the mini Tiny ImageNet.

What counts as a duplicate: the same bytes (a file's raw contents; for array-backed splits such as
CIFAR-10, the same pixels). A re-encoded, resized, cropped or re-compressed copy has other bytes and is
not found; finding those needs perceptual hashes or embeddings and is left out on purpose: exact copies
have no false positives, so they can be reported as facts.

``transferlab train`` hashes the images it fits on and the ones it reports on (cached under
``CACHE/digests`` by the samples' fingerprint, like the image checks of :mod:`transferlab.data.screen`)
and warns when the two share content.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from transferlab.data.base import ArraySplit, DatasetSource, FileSplit, ImageSplit, split_fingerprint
from transferlab.io import atomic_open

log = logging.getLogger(__name__)

#: Bytes of one digest (sha256).
DIGEST_BYTES = 32
#: What the report says was compared, so nobody reads "no duplicates" as "no near-duplicates".
METHOD = "sha256 of each file's bytes (exact copies; re-encoded, resized or cropped copies are not found)"
#: How many groups the JSON report lists (the counts are always complete).
MAX_LISTED = 1000
#: An all-zero row: a sample whose bytes could not be read (never equal to a real sha256).
UNREAD = bytes(DIGEST_BYTES)


def content_digest(data: bytes) -> bytes:
    """The sha256 of ``data`` (32 bytes)."""
    return hashlib.sha256(data).digest()


def sample_bytes(split: ImageSplit, i: int) -> bytes:
    """What sample ``i`` is made of: its file's bytes, or its pixels for an array-backed split.

    A decoded-cache view hashes its source files, so the digests do not depend on ``--decoded-cache``.
    """
    split = getattr(split, "base_split", split)
    if isinstance(split, FileSplit):
        return split.store.read(split.sample_ids[i])
    if isinstance(split, ArraySplit):
        return split.images[i].tobytes()
    return np.asarray(split.load(i), dtype=np.uint8).tobytes()


def split_digests(split: ImageSplit, indices: Sequence[int] | np.ndarray) -> np.ndarray:
    """``(len(indices), 32)`` uint8 digests of the chosen samples; an unreadable sample gets :data:`UNREAD`."""
    out = np.zeros((len(indices), DIGEST_BYTES), dtype=np.uint8)
    for row, i in enumerate(indices):
        try:
            out[row] = np.frombuffer(content_digest(sample_bytes(split, int(i))), dtype=np.uint8)
        except OSError as e:  # a broken link, an I/O error: screening and `data check` report those
            log.debug("cannot hash %s: %s", split.origin(int(i)), e)
    return out


def cached_digests(split: ImageSplit, indices: np.ndarray, cache_dir: Path | None) -> np.ndarray:
    """:func:`split_digests`, kept under ``cache_dir/digests`` by the samples' fingerprint.

    The fingerprint (ids, labels, zip CRCs or file size+mtime) is the one the image checks and the decoded
    cache are keyed by, so a replaced file is hashed again; a damaged entry is recomputed.
    """
    if cache_dir is None:
        return split_digests(split, indices)
    key = split_fingerprint(split, indices)
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in split.name)
    path = Path(cache_dir) / "digests" / f"{safe}-{key[:32]}.npy"
    try:
        found = np.load(path, allow_pickle=False)
        if found.shape == (len(indices), DIGEST_BYTES) and found.dtype == np.uint8:
            return found
        log.warning("ignoring the digest cache entry %s (shape %s); hashing again", path, found.shape)
    except FileNotFoundError:
        pass
    except (OSError, ValueError) as e:
        log.warning("ignoring the damaged digest cache entry %s (%s); hashing again", path, e)
    digests = split_digests(split, indices)
    try:
        with atomic_open(path, "wb") as f:
            np.save(f, digests, allow_pickle=False)
    except OSError as e:  # a read-only cache must not stop training
        log.warning("could not cache the image digests in %s: %s", path, e)
    return digests


@dataclass(frozen=True)
class Sample:
    """One member of a duplicate group."""

    split: str
    index: int
    origin: str
    label: int


@dataclass
class Duplicates:
    """Groups of samples with identical content, over one or more splits of one dataset."""

    #: Every group (two or more samples), in the order of the first member (split order, then index).
    groups: list[list[Sample]] = field(default_factory=list)
    #: Digest (hex) of each group, in the same order.
    digests: list[str] = field(default_factory=list)
    #: Class names by index, for the cross-class pairs.
    class_ids: tuple[str, ...] = ()

    @property
    def files(self) -> int:
        """Samples that are in some group (each copy counted)."""
        return sum(len(g) for g in self.groups)

    def within(self) -> dict[str, int]:
        """Per split: groups with two or more copies inside that split."""
        out: Counter[str] = Counter()
        for g in self.groups:
            for name, n in Counter(s.split for s in g).items():
                if n > 1:
                    out[name] += 1
        return dict(out)

    def across(self) -> dict[str, int]:
        """Per pair of splits (``"train/val"``): groups with copies in both."""
        out: Counter[str] = Counter()
        for g in self.groups:
            names = sorted({s.split for s in g}, key=[s.split for s in g].index)
            for a in range(len(names)):
                for b in range(a + 1, len(names)):
                    out[f"{names[a]}/{names[b]}"] += 1
        return dict(out)

    def cross_class(self) -> list[list[Sample]]:
        """Groups whose labeled copies carry two or more classes (label noise)."""
        return [g for g in self.groups if len({s.label for s in g if s.label >= 0}) > 1]

    def _folder(self, s: Sample) -> str:
        cid = self.class_ids[s.label]
        return cid if s.split == "all" else f"{s.split}/{cid}"

    def class_pairs(self) -> list[tuple[str, str, int]]:
        """``(class A, class B, images they share)`` for every pair of classes with a common image, most first.

        A class folder copied or linked under a second name shows up here as one pair sharing every image.
        Classes are written ``split/class`` (the folder of an ImageFolder tree).
        """
        pairs: Counter[tuple[str, str]] = Counter()
        for g in self.cross_class():
            members = sorted({(self._folder(s), s.label) for s in g if s.label >= 0})
            for a in range(len(members)):
                for b in range(a + 1, len(members)):
                    if members[a][1] != members[b][1]:  # the same class in two splits is not label noise
                        pairs[(members[a][0], members[b][0])] += 1
        return [(a, b, n) for (a, b), n in pairs.most_common()]

    def summary(self) -> str:
        """One line: how many copies, where."""
        if not self.groups:
            return "no exact duplicates (same bytes) within or across splits"
        parts = [f"within {k} {v:,}" for k, v in self.within().items()]
        parts += [f"{k.replace('/', ' & ')} {v:,}" for k, v in self.across().items()]
        noisy = len(self.cross_class())
        if noisy:
            parts.append(f"across classes {noisy:,} (label noise)")
        return f"{len(self.groups):,} set(s) of identical images (same bytes), {self.files:,} files: " + ", ".join(
            parts
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form: complete counts, the first :data:`MAX_LISTED` groups with their files."""
        return {
            "method": METHOD,
            "groups": len(self.groups),
            "files": self.files,
            "within_split": self.within(),
            "across_splits": self.across(),
            "across_classes": len(self.cross_class()),
            "class_pairs": [{"a": a, "b": b, "shared": n} for a, b, n in self.class_pairs()],
            "listed": [
                {
                    "sha256": d,
                    "files": [
                        {"split": s.split, "file": s.origin, "class": self.class_ids[s.label] if s.label >= 0 else None}
                        for s in g
                    ],
                }
                for d, g in zip(self.digests[:MAX_LISTED], self.groups[:MAX_LISTED], strict=True)
            ],
        }


def find_duplicates(
    source: DatasetSource, digests: dict[str, np.ndarray], indices: dict[str, np.ndarray] | None = None
) -> Duplicates:
    """Group the samples of ``digests`` (split name -> rows, one per sample of ``indices[split]`` or of the
    whole split) by content; unreadable samples (:data:`UNREAD`) are left out."""
    by_digest: dict[bytes, list[Sample]] = defaultdict(list)
    for name, rows in digests.items():
        split = source.split(name)
        idx = indices[name] if indices is not None else np.arange(len(split))
        for row, i in zip(rows, idx, strict=True):
            d = row.tobytes()
            if d != UNREAD:
                i = int(i)
                by_digest[d].append(Sample(name, i, split.origin(i), int(split.targets[i])))
    out = Duplicates(class_ids=source.classes.ids)
    for d, members in by_digest.items():  # dicts keep insertion order: groups come in order of first member
        if len(members) > 1:
            out.groups.append(members)
            out.digests.append(d.hex())
    return out


def overlap(
    fit: tuple[ImageSplit, np.ndarray, np.ndarray], report: tuple[ImageSplit, np.ndarray, np.ndarray]
) -> list[tuple[str, str]]:
    """``(report image, fitted image)`` for every report sample whose bytes equal a sample fitted on.

    Each argument is ``(split, sample indices, their digests)``.
    """
    fit_split, fit_idx, fit_d = fit
    seen = {row.tobytes(): int(i) for row, i in zip(fit_d, fit_idx, strict=True)}
    seen.pop(UNREAD, None)
    rep_split, rep_idx, rep_d = report
    return [
        (rep_split.origin(int(i)), fit_split.origin(seen[row.tobytes()]))
        for row, i in zip(rep_d, rep_idx, strict=True)
        if row.tobytes() in seen
    ]
