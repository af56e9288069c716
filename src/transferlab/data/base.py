"""The dataset model shared by every source format.

A :class:`DatasetSource` has named splits (``train``, ``val``, ``test``, ...). Each :class:`ImageSplit`
knows its sample ids (stable strings such as ``val/images/val_17.JPEG``), integer targets (``-1`` when
unlabeled) and how to load sample ``i`` as an RGB PIL image. Every split of a source shares one
:class:`ClassInfo`, so a class index means the same class in train, val and test.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from transferlab.data.images import decode_image
from transferlab.data.store import FileStore
from transferlab.errors import DataError


@dataclass(frozen=True)
class ClassInfo:
    """Class ids in index order (e.g. WordNet ids) and their human-readable names."""

    ids: tuple[str, ...]
    names: tuple[str, ...]

    def __post_init__(self) -> None:
        if len(self.ids) != len(self.names):
            raise ValueError(f"{len(self.ids)} class ids but {len(self.names)} names")
        if len(set(self.ids)) != len(self.ids):
            dup = sorted({c for c in self.ids if self.ids.count(c) > 1})
            raise ValueError(f"duplicate class ids: {dup[:5]}")

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def index(self) -> dict[str, int]:
        """Map from class id to index."""
        return {c: i for i, c in enumerate(self.ids)}


class ImageSplit(ABC):
    """One split of a dataset: ``len`` samples with ids, targets and a loader."""

    name: str
    classes: ClassInfo
    sample_ids: Sequence[str]
    targets: np.ndarray

    def __len__(self) -> int:
        return len(self.sample_ids)

    @property
    def labeled(self) -> bool:
        """True if every sample has a target."""
        return bool(len(self.targets)) and bool((self.targets >= 0).all())

    @abstractmethod
    def load(self, i: int) -> Image.Image:
        """Sample ``i`` as an RGB image (raises BadImageError for a broken file)."""

    @abstractmethod
    def origin(self, i: int) -> str:
        """Where sample ``i`` comes from, for messages."""


class FileSplit(ImageSplit):
    """A split whose samples are image files in a :class:`FileStore`."""

    def __init__(
        self,
        name: str,
        store: FileStore,
        files: Sequence[str],
        targets: Sequence[int] | np.ndarray,
        classes: ClassInfo,
    ) -> None:
        if len(files) != len(targets):
            raise ValueError(f"{len(files)} files but {len(targets)} targets")
        self.name = name
        self.store = store
        self.sample_ids = list(files)
        self.targets = np.asarray(targets, dtype=np.int64)
        self.classes = classes

    def load(self, i: int) -> Image.Image:
        rel = self.sample_ids[i]
        return decode_image(self.store.read(rel), self.store.origin(rel))

    def origin(self, i: int) -> str:
        return self.store.origin(self.sample_ids[i])


class ArraySplit(ImageSplit):
    """A split held as a uint8 array of shape (N, H, W, 3) (e.g. CIFAR-10 batches)."""

    def __init__(
        self,
        name: str,
        images: np.ndarray,
        targets: Sequence[int] | np.ndarray,
        classes: ClassInfo,
        sample_ids: Sequence[str] | None = None,
        source: str = "",
    ) -> None:
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise ValueError(f"images must be uint8 (N, H, W, 3), got {images.dtype} {images.shape}")
        if len(images) != len(targets):
            raise ValueError(f"{len(images)} images but {len(targets)} targets")
        self.name = name
        self.images = images
        self.targets = np.asarray(targets, dtype=np.int64)
        self.classes = classes
        self.sample_ids = list(sample_ids) if sample_ids is not None else [f"{name}/{i}" for i in range(len(images))]
        self.source = source

    def load(self, i: int) -> Image.Image:
        return Image.fromarray(self.images[i], "RGB")

    def origin(self, i: int) -> str:
        return f"{self.source}[{self.name} #{i}]"


@dataclass
class DatasetSource:
    """A dataset: its splits by name, its classes, and where it was read from."""

    name: str
    location: str
    classes: ClassInfo
    splits: dict[str, ImageSplit] = field(default_factory=dict)
    #: True when class ids are ImageNet-1k WordNet ids (so zero-shot and head warm-start apply).
    imagenet_classes: bool = False
    #: Files below the dataset that are not samples, by reason (hidden, not an image, ...), as origins:
    #: ``data check`` lists them, so a file format that is not read is seen instead of silently lost.
    ignored: dict[str, list[str]] = field(default_factory=dict)

    def split(self, name: str) -> ImageSplit:
        """The split ``name``, or a DataError listing the available ones."""
        if name not in self.splits:
            raise DataError(
                f"{self.location} has no split {name!r}; available: {', '.join(sorted(self.splits)) or 'none'}"
            )
        return self.splits[name]


def split_fingerprint(split: ImageSplit, indices: Sequence[int] | np.ndarray | None = None) -> str:
    """sha256 over the chosen samples' ids, targets and content stamps (zip CRCs, file size+mtime, pixels).

    Cheap enough to run at every start (no image is decoded for file-backed splits), yet it changes when
    a file is replaced, relabelled, added or removed, which is what caches and study reuse need to know.
    """
    # A decoded-cache view has the pixels of its source split: it is fingerprinted as that source, so
    # caches and study reuse do not depend on whether the decoded cache was used.
    split = getattr(split, "base_split", split)
    h = hashlib.sha256()
    h.update(split.name.encode())
    for i in range(len(split)) if indices is None else indices:
        i = int(i)
        h.update(split.sample_ids[i].encode())
        h.update(int(split.targets[i]).to_bytes(8, "little", signed=True))
        if isinstance(split, FileSplit):
            h.update(split.store.stamp(split.sample_ids[i]).encode())
        elif isinstance(split, ArraySplit):
            h.update(split.images[i].tobytes())
    return h.hexdigest()


def data_fingerprint(source: DatasetSource, splits: Sequence[str]) -> str:
    """One fingerprint for the class list and the named splits of ``source``: ``sha256:<hex>``.

    Recorded in metrics.json so a report can show exactly which data a number came from, and used by
    studies to decide whether a finished member is still valid.
    """
    h = hashlib.sha256()
    h.update("\n".join(source.classes.ids).encode())
    for name in splits:
        h.update(b"\0" + split_fingerprint(source.split(name)).encode())
    return "sha256:" + h.hexdigest()


def subset_indices(n: int, limit: int | None, seed: int) -> np.ndarray:
    """All indices, or a seeded random ``limit`` of them in ascending order (reproducible subsets)."""
    if limit is None or limit >= n:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=limit, replace=False))
