"""Generic ImageFolder datasets: ``root/<class>/*.jpg|png``, optionally one level of split folders.

``root/train/<class>/...`` and ``root/val/<class>/...`` become splits ``train`` and ``val`` sharing
one class index (sorted union of class folder names). A root whose sub-folders are the classes
becomes one split named ``all``. A single folder wrapping all of that (how ``zip -r data.zip data/``
packs it) is looked through, so its name does not become the only class. Hidden folders and
``__MACOSX`` (resource forks added by macOS archivers) are never classes.
"""

from __future__ import annotations

from transferlab.data.base import ClassInfo, DatasetSource, FileSplit
from transferlab.data.images import is_image_name
from transferlab.data.store import FileStore
from transferlab.errors import DataError

SPLIT_NAMES = ("train", "val", "valid", "validation", "test")


def _ignored(name: str) -> bool:
    return name.startswith(".") or name == "__MACOSX"


def _dirs(store: FileStore, prefix: str) -> list[str]:
    return [d for d in store.list_dirs(prefix) if not _ignored(d)]


def _class_images(store: FileStore, prefix: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for d in _dirs(store, prefix):
        p = f"{prefix}/{d}" if prefix else d
        imgs = [f for f in store.list_files(p) if is_image_name(f) and not f.rsplit("/", 1)[-1].startswith("._")]
        if imgs:
            out[d] = imgs
    return out


def _content_root(store: FileStore) -> str:
    """The one folder wrapping the whole tree (``data/cat/1.png``), or "" when the top is the root.

    A lone top folder is a wrapper when it holds split folders or folders of images; a lone folder
    holding images directly (``cat/1.png``) is a one-class dataset and stays as it is.
    """
    top = _dirs(store, "")
    if len(top) != 1 or top[0] in SPLIT_NAMES:
        return ""
    inner = _dirs(store, top[0])
    if any(d in SPLIT_NAMES for d in inner) or _class_images(store, top[0]):
        return top[0]
    return ""


def looks_like_image_folder(store: FileStore) -> bool:
    """True if some sub-folder (or split/sub-folder) holds images."""
    return bool(_class_images(store, "")) or any(
        _class_images(store, s) for s in store.list_dirs("") if s in SPLIT_NAMES
    )


def load_image_folder(store: FileStore, name: str = "imagefolder") -> DatasetSource:
    """Read an ImageFolder tree (images decoded lazily)."""
    root = _content_root(store)
    if root:
        store = store.sub(root)
    top = _dirs(store, "")
    split_dirs = [d for d in top if d in SPLIT_NAMES]
    per_split: dict[str, dict[str, list[str]]] = {}
    if split_dirs:
        for s in split_dirs:
            found = _class_images(store, s)
            key = "val" if s in ("valid", "validation") else s
            if found and key in per_split:
                raise DataError(f"{store.location} has more than one validation folder ({', '.join(split_dirs)})")
            if found:
                per_split[key] = found
    else:
        found = _class_images(store, "")
        if found:
            per_split["all"] = found
    if not per_split:
        raise DataError(f"{store.location} holds no <class>/<image> folders with image files")
    ids = tuple(sorted({c for split in per_split.values() for c in split}))
    from transferlab.models.imagenet import is_imagenet_subset

    classes = ClassInfo(ids, ids)
    index = classes.index
    source = DatasetSource(name=name, location=store.location, classes=classes)
    source.imagenet_classes = is_imagenet_subset(ids)
    for split, by_class in per_split.items():
        files = [f for c in ids for f in by_class.get(c, [])]
        targets = [index[c] for c in ids for _ in by_class.get(c, [])]
        source.splits[split] = FileSplit(split, store, files, targets, classes)
    return source
