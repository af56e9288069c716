"""Dataset sources. :func:`open_dataset` turns a path or a dataset name into a :class:`DatasetSource`."""

from __future__ import annotations

import os
import tarfile
from pathlib import Path

from transferlab.data.base import ArraySplit, ClassInfo, DatasetSource, FileSplit, ImageSplit
from transferlab.data.cifar10 import load_cifar10
from transferlab.data.imagefolder import load_image_folder, looks_like_image_folder
from transferlab.data.resolve import resolve_data
from transferlab.data.store import open_store
from transferlab.data.tinyimagenet import load_tiny_imagenet, looks_like_tiny_imagenet
from transferlab.errors import DataError

__all__ = ["ArraySplit", "ClassInfo", "DatasetSource", "FileSplit", "ImageSplit", "open_dataset"]


def _is_cifar(path: Path) -> bool:
    if path.is_file():
        return path.name.endswith((".tar.gz", ".tgz")) and tarfile.is_tarfile(path)
    return (path / "data_batch_1").is_file() or (path / "cifar-10-batches-py" / "data_batch_1").is_file()


def open_dataset(spec: str | os.PathLike[str], *, download: bool = True) -> DatasetSource:
    """Open a dataset from a path (folder, zip, CIFAR batches) or a known name.

    The format is detected from the contents: CIFAR-10 python batches, Tiny ImageNet's official layout
    (``wnids.txt``), or a generic ``<class>/<image>`` ImageFolder. Nothing is extracted or moved.
    """
    path = resolve_data(str(spec), download=download)
    name = Path(str(spec)).name if Path(str(spec)).exists() else str(spec)
    if _is_cifar(path):
        return load_cifar10(path)

    store = open_store(path)
    if looks_like_tiny_imagenet(store):
        return load_tiny_imagenet(store, name=name)
    if looks_like_image_folder(store):
        return load_image_folder(store, name=name)
    raise DataError(
        f"{path} is not a dataset transferlab recognises: expected Tiny ImageNet's layout (wnids.txt, "
        "train/, val/), CIFAR-10 python batches (data_batch_1..5, test_batch), or <class>/<image> folders"
    )
