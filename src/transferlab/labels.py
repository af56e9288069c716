"""The ImageNet-1k label map: which WordNet id each of the 1,000 classifier outputs means, and their names.

The synset order is the one timm ships (``timm.data.ImageNetInfo``), which is the order every
ImageNet-1k checkpoint in timm and torchvision uses, so no list is re-typed here.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from transferlab.errors import DataError

#: Said (and stored in metrics.json) whenever a dataset's classes are ImageNet classes.
IMAGENET_OVERLAP_WARNING = (
    "the dataset's classes are ImageNet classes and its images likely come from ImageNet itself: "
    "ImageNet-pretrained weights have probably seen them, so these numbers may be optimistic"
)


@functools.cache
def imagenet_synsets() -> tuple[str, ...]:
    """The 1,000 ImageNet-1k WordNet ids in classifier-output order."""
    synsets = _read_synsets_file()
    if synsets is None:  # pragma: no cover - layout changed; ask timm properly (slow import)
        from timm.data import ImageNetInfo

        synsets = tuple(ImageNetInfo("imagenet-1k").label_names())
    if len(synsets) != 1000:  # pragma: no cover - guards against a timm change
        raise RuntimeError(f"timm's ImageNet-1k synset list has {len(synsets)} entries, expected 1000")
    return synsets


def _read_synsets_file() -> tuple[str, ...] | None:
    """Read timm's synset list from its package data without importing timm (which takes seconds)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("timm")
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        f = Path(loc) / "data" / "_info" / "imagenet_synsets.txt"
        if f.is_file():
            return tuple(line.strip() for line in f.read_text().splitlines() if line.strip())
    return None


@functools.cache
def _synset_index() -> dict[str, int]:
    return {s: i for i, s in enumerate(imagenet_synsets())}


def is_imagenet_subset(class_ids: Sequence[str]) -> bool:
    """True if every class id is an ImageNet-1k WordNet id (zero-shot and head warm start apply)."""
    idx = _synset_index()
    return bool(class_ids) and all(c in idx for c in class_ids)


def imagenet_indices(class_ids: Sequence[str]) -> np.ndarray:
    """The ImageNet-1k output index of each class id, in the dataset's class order.

    Raises a DataError naming the classes that are not ImageNet-1k classes, because a zero-shot
    evaluation is meaningless for them.
    """
    idx = _synset_index()
    missing = [c for c in class_ids if c not in idx]
    if missing:
        raise DataError(
            f"{len(missing)} of {len(class_ids)} dataset classes are not ImageNet-1k classes "
            f"(e.g. {', '.join(missing[:5])}), so a zero-shot evaluation through the ImageNet head is not "
            "possible; train a head instead (linear probe)."
        )
    return np.asarray([idx[c] for c in class_ids], dtype=np.int64)


@functools.cache
def imagenet_lemmas() -> dict[str, str]:
    """WordNet id -> lemma for the ImageNet synsets, from timm's package data (no download, no timm import)."""
    spec = importlib.util.find_spec("timm")
    for loc in (spec.submodule_search_locations or []) if spec else []:
        f = Path(loc) / "data" / "_info" / "imagenet_synset_to_lemma.txt"
        if f.is_file():
            out = {}
            for line in f.read_text(encoding="utf-8").splitlines():
                wnid, _, lemma = line.partition("\t")
                if wnid and lemma:
                    out[wnid.strip()] = lemma.strip()
            return out
    return {}
