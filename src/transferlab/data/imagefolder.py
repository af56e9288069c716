"""Generic ImageFolder datasets: ``root/<class>/*.jpg|png``, optionally one level of split folders.

``root/train/<class>/...`` and ``root/val/<class>/...`` become splits ``train`` and ``val`` sharing
one class index (sorted union of class folder names). A root whose sub-folders are the classes
becomes one split named ``all``. A single folder wrapping all of that (how ``zip -r data.zip data/``
packs it) is looked through, so its name does not become the only class.

What a folder a person assembled by hand tends to hold, and what becomes of it (the README's Data
section has the same list):

* hidden files and folders at any depth (``.DS_Store``, ``._x.jpg`` AppleDouble files,
  ``.ipynb_checkpoints/``, ``__MACOSX/``) are never samples nor classes: they are copies or metadata,
  and a notebook's checkpoint copy of an image would otherwise train twice;
* files without an image suffix (``.txt``, ``.csv``, ``.heic``) are left out, and so are images lying
  next to the class folders (they have no class); all of these are counted and logged once per load and
  listed by ``data check``, so a format that is not read is seen, not silently lost;
* image suffixes are matched case-insensitively (``.JPG``); images in sub-folders of a class folder
  belong to that class;
* a class folder with no image is still a class, so ``data check`` reports it and ``train`` refuses
  it, instead of the model silently losing a class;
* symbolic links are followed (see :mod:`transferlab.data.store`); a broken link named like an image
  stays a sample and is reported as unreadable.
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict

from transferlab.data.base import ClassInfo, DatasetSource, FileSplit
from transferlab.data.images import is_image_name
from transferlab.data.store import FileStore
from transferlab.errors import DataError
from transferlab.labels import is_imagenet_subset

log = logging.getLogger(__name__)

SPLIT_NAMES = ("train", "val", "valid", "validation", "test")

#: Why a file below the dataset was not made a sample (keys of ``DatasetSource.ignored``), in report order.
HIDDEN = "hidden"
NOT_IMAGE = "not an image"
NO_CLASS = "outside a class folder"
BROKEN_LINK = "broken link"
IGNORED_REASONS = (HIDDEN, NOT_IMAGE, NO_CLASS, BROKEN_LINK)


def _ignored(name: str) -> bool:
    return name.startswith(".") or name == "__MACOSX"


def is_hidden(rel: str) -> bool:
    """True if any part of ``rel`` is hidden (``.x``, which includes ``._x`` AppleDouble files) or ``__MACOSX``."""
    return any(_ignored(part) for part in rel.split("/"))


def _dirs(store: FileStore, prefix: str) -> list[str]:
    return [d for d in store.list_dirs(prefix) if not _ignored(d)]


def _scan(store: FileStore, prefix: str) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """Class folder -> its images (possibly none), and reason -> the files left out, below ``prefix``.

    One listing of the whole level (recursive), so a folder store is walked once.
    """
    pre = f"{prefix}/" if prefix else ""
    classes: dict[str, list[str]] = {d: [] for d in _dirs(store, prefix)}
    ignored: dict[str, list[str]] = defaultdict(list)
    for rel in store.list_files(prefix):
        rest = rel[len(pre) :]
        top, sep, _ = rest.partition("/")
        if is_hidden(rest):
            ignored[HIDDEN].append(rel)
        elif not is_image_name(rel):
            ignored[BROKEN_LINK if store.dangling(rel) else NOT_IMAGE].append(rel)
        elif not sep or top not in classes:  # beside the class folders, or below a link that leads nowhere
            ignored[NO_CLASS].append(rel)
        else:
            classes[top].append(rel)
    return classes, ignored


def _has_class_images(store: FileStore, prefix: str) -> bool:
    """Whether some class folder below ``prefix`` holds an image; stops at the first one found."""
    pre = f"{prefix}/" if prefix else ""
    return any(
        any(is_image_name(f) and not is_hidden(f[len(pre) :]) for f in store.list_files(pre + d))
        for d in _dirs(store, prefix)
    )


def _content_root(store: FileStore) -> str:
    """The one folder wrapping the whole tree (``data/cat/1.png``), or "" when the top is the root.

    A lone top folder is a wrapper when it holds split folders or folders of images; a lone folder
    holding images directly (``cat/1.png``) is a one-class dataset and stays as it is.
    """
    top = _dirs(store, "")
    if len(top) != 1 or top[0] in SPLIT_NAMES:
        return ""
    inner = _dirs(store, top[0])
    if any(d in SPLIT_NAMES for d in inner) or _has_class_images(store, top[0]):
        return top[0]
    return ""


def looks_like_image_folder(store: FileStore) -> bool:
    """True if some sub-folder (or split/sub-folder) holds images."""
    return _has_class_images(store, "") or any(
        _has_class_images(store, s) for s in store.list_dirs("") if s in SPLIT_NAMES
    )


def load_image_folder(store: FileStore, name: str = "imagefolder") -> DatasetSource:
    """Read an ImageFolder tree (images decoded lazily); what is left out is in ``source.ignored``."""
    root = _content_root(store)
    if root:
        store = store.sub(root)
    top = _dirs(store, "")
    split_dirs = [d for d in top if d in SPLIT_NAMES]
    per_split: dict[str, dict[str, list[str]]] = {}
    ignored: dict[str, list[str]] = defaultdict(list)
    levels = [(s, "val" if s in ("valid", "validation") else s) for s in split_dirs] if split_dirs else [("", "all")]
    for folder, key in levels:
        found, left_out = _scan(store, folder)
        for why, rels in left_out.items():
            ignored[why].extend(rels)
        if not any(found.values()):  # a split is a folder with at least one image
            continue
        if key in per_split:
            raise DataError(f"{store.location} has more than one validation folder ({', '.join(split_dirs)})")
        per_split[key] = found
    if not per_split:
        raise DataError(f"{store.location} holds no <class>/<image> folders with image files")
    ids = tuple(sorted({c for split in per_split.values() for c in split}))

    classes = ClassInfo(ids, ids)
    index = classes.index
    source = DatasetSource(name=name, location=store.location, classes=classes)
    source.imagenet_classes = is_imagenet_subset(ids)
    for split, by_class in per_split.items():
        files = [f for c in ids for f in by_class.get(c, [])]
        targets = [index[c] for c in ids for _ in by_class.get(c, [])]
        source.splits[split] = FileSplit(split, store, files, targets, classes)
    source.ignored = {why: [store.origin(r) for r in ignored[why]] for why in IGNORED_REASONS if ignored.get(why)}
    _log_ignored(source)
    return source


def describe_ignored(ignored: dict[str, list[str]], examples: int = 2) -> list[str]:
    """One line per reason: the count, the suffixes of non-images, and a few of the files."""
    lines = []
    for why, files in ignored.items():
        what = f"{len(files):,} {why}"
        if why == NOT_IMAGE:
            suffixes = Counter(f.rsplit("/", 1)[-1].rpartition(".")[2].lower() if "." in f else "(none)" for f in files)
            what += " (" + ", ".join(
                f".{s} {n}" if s != "(none)" else f"no suffix {n}" for s, n in suffixes.most_common(5)
            )
            what += ", ...)" if len(suffixes) > 5 else ")"
        more = f", ... (+{len(files) - examples:,})" if len(files) > examples else ""
        lines.append(f"{what}: {', '.join(files[:examples])}{more}")
    return lines


def _log_ignored(source: DatasetSource) -> None:
    if not source.ignored:
        return
    n = sum(len(v) for v in source.ignored.values())
    log.info("%s: %d file(s) are not samples: %s", source.location, n, "; ".join(describe_ignored(source.ignored)))
    links = source.ignored.get(BROKEN_LINK, [])
    if links:
        log.warning(
            "%d broken symbolic link(s) in %s were left out (a class folder whose target is gone loses its images): %s",
            len(links),
            source.location,
            ", ".join(links[:5]) + (" ..." if len(links) > 5 else ""),
        )
