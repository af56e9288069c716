"""Tiny ImageNet in its official layout, from the extracted folder or straight from the zip.

Layout (``tiny-imagenet-200/`` may be the folder itself or the single top folder of the archive)::

    wnids.txt                      class order (one WordNet id per line)
    words.txt                      "<wnid>\\t<names>" for all of WordNet
    train/<wnid>/images/*.JPEG     labels come from the folder
    train/<wnid>/<wnid>_boxes.txt  bounding boxes (unused here)
    val/images/*.JPEG
    val/val_annotations.txt        "<file>\\t<wnid>\\t<x0>\\t<y0>\\t<x1>\\t<y1>"
    test/images/*.JPEG             unlabeled

Counts are never assumed: the official copy has 500 train images per class and 10,000 val, the mini
copy 100 and 5,000. Train and val share one class index map, taken from ``wnids.txt``.
"""

from __future__ import annotations

import logging

from transferlab.data.base import ClassInfo, DatasetSource, FileSplit
from transferlab.data.imagefolder import is_hidden
from transferlab.data.images import is_image_name
from transferlab.data.store import FileStore
from transferlab.errors import DataError
from transferlab.labels import is_imagenet_subset

log = logging.getLogger(__name__)

MARKER = "wnids.txt"


#: Files only Tiny ImageNet's layout has. A copy that lost ``wnids.txt`` is still recognised by them,
#: so it fails with a message naming the missing file instead of being read as a generic ImageFolder
#: (which would silently turn ``val/images`` into a class called "images").
LAYOUT_MARKERS = (MARKER, "val/val_annotations.txt")


def _is_root(store: FileStore, prefix: str) -> bool:
    pre = f"{prefix}/" if prefix else ""
    if any(store.exists(pre + m) for m in LAYOUT_MARKERS):
        return True
    # train/<wnid>/<wnid>_boxes.txt: a copy with only the train split and no wnids.txt.
    classes = store.list_dirs(f"{pre}train")
    return bool(classes) and store.exists(f"{pre}train/{classes[0]}/{classes[0]}_boxes.txt")


def find_root(store: FileStore) -> str:
    """The folder inside ``store`` that holds the Tiny ImageNet layout ("" for the top, also when none does)."""
    if store.exists(MARKER):
        return ""
    dirs = store.list_dirs("")
    for d in dirs:
        if store.exists(f"{d}/{MARKER}"):
            return d
    if _is_root(store, ""):
        return ""
    for d in dirs:
        if _is_root(store, d):
            return d
    return ""


def looks_like_tiny_imagenet(store: FileStore) -> bool:
    """True if the store has Tiny ImageNet's layout (``wnids.txt``, ``val/val_annotations.txt`` or
    ``train/<wnid>/<wnid>_boxes.txt``) at the top or one folder down."""
    return _is_root(store, find_root(store))


def parse_words(text: str) -> dict[str, str]:
    """Parse ``words.txt`` into {wnid: names}."""
    words: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        wnid, _, names = line.partition("\t")
        words[wnid.strip()] = names.strip()
    return words


def load_tiny_imagenet(store: FileStore, name: str = "tiny-imagenet") -> DatasetSource:
    """Read the class list and every split's file list and labels (images are decoded lazily)."""
    root = find_root(store)
    if root:
        store = store.sub(root)
    if not store.exists(MARKER):
        raise DataError(
            f"{store.origin(MARKER)} is missing: a Tiny ImageNet copy needs wnids.txt to fix the class order"
        )
    wnids = [w.strip() for w in store.read_text(MARKER).splitlines() if w.strip()]
    if not wnids:
        raise DataError(f"{store.origin(MARKER)} lists no classes")
    if store.exists("words.txt"):
        words = parse_words(store.read_text("words.txt"))
    else:
        log.warning("%s is missing; class names will be the WordNet ids", store.origin("words.txt"))
        words = {}
    try:
        classes = ClassInfo(tuple(wnids), tuple(words.get(w, w) for w in wnids))
    except ValueError as e:
        raise DataError(f"{store.origin(MARKER)}: {e}") from e
    index = classes.index

    source = DatasetSource(name=name, location=store.location, classes=classes)

    source.imagenet_classes = is_imagenet_subset(classes.ids)

    train = _train_split(store, classes, index)
    if train is not None:
        source.splits["train"] = train
    val = _val_split(store, classes, index)
    if val is not None:
        source.splits["val"] = val
    test_files = [f for f in store.list_files("test/images") if _is_sample(f)]
    if test_files:
        source.splits["test"] = FileSplit("test", store, test_files, [-1] * len(test_files), classes)
    if not source.splits:
        raise DataError(f"{store.location} has wnids.txt but no train/, val/ or test/ images")
    return source


def _is_sample(rel: str) -> bool:
    # ``._x.JPEG`` (AppleDouble, left by copies made on a Mac) and ``.ipynb_checkpoints/`` copies are not images
    # of the dataset, whatever their suffix.
    return is_image_name(rel) and not is_hidden(rel)


def _train_split(store: FileStore, classes: ClassInfo, index: dict[str, int]) -> FileSplit | None:
    present = store.list_dirs("train")
    if not present:
        return None
    unknown = sorted(set(present) - set(index))
    if unknown:
        raise DataError(
            f"{store.origin('train')} has class folders not listed in wnids.txt: {', '.join(unknown[:5])}"
            + (" ..." if len(unknown) > 5 else "")
        )
    files: list[str] = []
    targets: list[int] = []
    for wnid in classes.ids:
        imgs = [f for f in store.list_files(f"train/{wnid}/images") if _is_sample(f)]
        if not imgs:
            log.warning("%s has no images", store.origin(f"train/{wnid}/images"))
        files.extend(imgs)
        targets.extend([index[wnid]] * len(imgs))
    return FileSplit("train", store, files, targets, classes)


def _val_split(store: FileStore, classes: ClassInfo, index: dict[str, int]) -> FileSplit | None:
    ann_rel = "val/val_annotations.txt"
    images = {f for f in store.list_files("val/images") if is_image_name(f)}
    if not store.exists(ann_rel):
        if images:
            raise DataError(f"{store.origin(ann_rel)} is missing, so the val images have no labels")
        return None
    files: list[str] = []
    targets: list[int] = []
    for lineno, line in enumerate(store.read_text(ann_rel).splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) < 2:
            raise DataError(f"{store.origin(ann_rel)} line {lineno}: expected '<file>\\t<wnid>...', got {line!r}")
        fname, wnid = parts[0].strip(), parts[1].strip()
        rel = f"val/images/{fname}"
        if wnid not in index:
            raise DataError(f"{store.origin(ann_rel)} line {lineno}: class {wnid!r} is not in wnids.txt")
        if rel not in images:
            raise DataError(f"{store.origin(ann_rel)} line {lineno}: {store.origin(rel)} does not exist")
        files.append(rel)
        targets.append(index[wnid])
    unlabeled = len(images) - len(set(files))
    if unlabeled:
        log.warning("%d images in %s have no annotation and are left out", unlabeled, store.origin("val/images"))
    return FileSplit("val", store, files, targets, classes)
