"""The decoded cache: a split's images decoded once into a memory-mapped uint8 array on disk.

Why. Decoding a 64x64 JPEG costs ~0.1 ms, reading it from a zip member a little more; per epoch that is
seconds of a CPU the model needs, and it is repeated by every epoch, evaluation and study member. It
also forces a DataLoader with worker processes (pickling, IPC, one core lost on a 2-core machine). Decoded
once, a split is a plain ``(N, H, W, 3)`` uint8 array: a batch is one fancy-index into page-cached
memory, and resizing and augmentation run on the whole batch as tensor ops
(:mod:`transferlab.data.batched`), on a GPU too. 20,000 Tiny ImageNet images are 246 MB; the full
train split is 1.2 GB.

Layout: ``CACHE/decoded/<split>-<fingerprint>/`` holds ``images.u8`` (raw rows, C order) and
``meta.json`` (shape, the split's fingerprint, a CRC-32 per block of rows, unreadable samples). The
fingerprint is :func:`~transferlab.data.base.split_fingerprint` (ids, labels, zip CRCs or file
size+mtime), so a replaced, relabelled, added or removed file changes the folder and the old entry is
simply not used. The folder is built under a temporary name and renamed into place complete; on every
open the file size and every block's CRC are checked (about 0.2 s for 250 MB), so a truncated or
corrupted cache is rebuilt, never trusted.

Only splits whose images all share one size are cached (Tiny ImageNet, CIFAR-style folders): the
batched pipeline needs a rectangular array. A split of mixed sizes is recorded as such (so the check is
not repeated) and keeps the per-image PIL path.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from transferlab.data.base import ArraySplit, ImageSplit, split_fingerprint
from transferlab.errors import BadImageError
from transferlab.io import atomic_write_json
from transferlab.options import Option

log = logging.getLogger(__name__)

FORMAT = 1
#: Rows per CRC block: small enough to name the damaged region, large enough that CRCs are cheap to store.
BLOCK = 1024
DECODED_MODES = ("auto", "off")
DECODED_CACHE = Option(
    "decode each split once into a memory-mapped uint8 array in the cache folder and resize/augment whole batches "
    "as tensors (auto: when a split's images share one size; off: decode per image with PIL in --workers processes)",
    choices=DECODED_MODES,
    group="runtime",
)


class DecodedSplit(ImageSplit):
    """A split whose pixels come from the decoded cache; ids, targets, classes and origins from ``base``.

    Samples that could not be decoded when the cache was built are zero rows in the array and listed in
    ``bad``; :meth:`load` re-reads them from the source so the caller gets the real error naming the file.
    """

    def __init__(self, base: ImageSplit, images: np.ndarray, bad: dict[int, str], folder: Path) -> None:
        self.base_split = base
        self.name = base.name
        self.classes = base.classes
        self.sample_ids = base.sample_ids
        self.targets = base.targets
        self.images = images
        self.bad = bad
        self.folder = folder

    def __repr__(self) -> str:
        n, h, w, _ = self.images.shape
        return f"DecodedSplit({self.name!r}, {n} x {h}x{w}, {self.folder})"

    def __getstate__(self) -> dict[str, Any]:
        # A memmap would pickle as a full in-memory copy; DataLoader workers reopen the file instead.
        state = self.__dict__.copy()
        state["images"] = None
        state["_shape"] = self.images.shape
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        shape = state.pop("_shape")
        self.__dict__.update(state)
        self.images = np.memmap(self.folder / "images.u8", dtype=np.uint8, mode="r", shape=shape)

    def load(self, i: int) -> Image.Image:
        if i in self.bad:
            return self.base_split.load(i)  # raises the BadImageError that names the file
        return Image.fromarray(np.asarray(self.images[i]), "RGB")

    def origin(self, i: int) -> str:
        return self.base_split.origin(i)


def pixel_array(split: ImageSplit) -> np.ndarray | None:
    """The split's (N, H, W, 3) uint8 pixels when it has them in one array (decoded cache, CIFAR), else None."""
    if isinstance(split, DecodedSplit | ArraySplit):
        return split.images
    return None


def _folder_name(split: ImageSplit, fingerprint: str) -> str:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in split.name)
    return f"{safe}-{fingerprint[:24]}"


def _block_crcs(images: np.ndarray) -> list[int]:
    flat = images.reshape(len(images), -1)
    return [zlib.crc32(flat[s : s + BLOCK]) for s in range(0, len(images), BLOCK)]


def _open_entry(folder: Path, split: ImageSplit, fingerprint: str) -> DecodedSplit | str | None:
    """The cached split, ``"mixed"`` for a recorded mixed-size split, or None when absent or invalid."""
    meta_path = folder / "meta.json"
    if not meta_path.exists():
        return None
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        log.warning("decoded cache %s: unreadable meta.json (%s); rebuilding it", folder, e)
        return None
    if meta.get("format") != FORMAT or meta.get("fingerprint") != fingerprint or meta.get("n") != len(split):
        log.warning("decoded cache %s does not describe this split; rebuilding it", folder)
        return None
    if meta.get("mixed_sizes"):
        return "mixed"
    n, h, w = int(meta["n"]), int(meta["height"]), int(meta["width"])
    path = folder / "images.u8"
    expected = n * h * w * 3
    size = path.stat().st_size if path.exists() else -1
    if size != expected:
        log.warning(
            "decoded cache %s is %s bytes, expected %d (truncated or overwritten); rebuilding it",
            path,
            "missing" if size < 0 else size,
            expected,
        )
        return None
    images = np.memmap(path, dtype=np.uint8, mode="r", shape=(n, h, w, 3))
    crcs = _block_crcs(images)
    if crcs != meta.get("crc32"):
        first = next((k for k, (a, b) in enumerate(zip(crcs, meta.get("crc32") or [], strict=False)) if a != b), 0)
        log.warning(
            "decoded cache %s: rows %d-%d do not match their checksum (corrupted); rebuilding it",
            path,
            first * BLOCK,
            min(n, (first + 1) * BLOCK) - 1,
        )
        return None
    bad = {int(k): str(v) for k, v in (meta.get("bad") or {}).items()}
    return DecodedSplit(split, images, bad, folder)


def decode_split(split: ImageSplit, cache_root: Path, *, progress: bool | None = None) -> ImageSplit:
    """``split`` backed by the decoded cache under ``cache_root/decoded``, built on first use.

    Returns ``split`` itself when it already holds an array (CIFAR-10, an already decoded split) or when
    its images differ in size (see the module docstring). Concurrent builders (DDP ranks, two runs) each
    write a private temporary folder; the first rename wins and the others use its result.
    """
    if pixel_array(split) is not None or not len(split):
        return split
    fingerprint = split_fingerprint(split)
    root = Path(cache_root) / "decoded"
    folder = root / _folder_name(split, fingerprint)
    found = _open_entry(folder, split, fingerprint)
    if found == "mixed":
        log.info("decoded cache: %s images differ in size; decoding per image instead", split.name)
        return split
    if isinstance(found, DecodedSplit):
        log.info("decoded cache hit: %s (%d images)", folder, len(split))
        return found
    if folder.exists():
        shutil.rmtree(folder, ignore_errors=True)
    return _build(split, folder, fingerprint, progress=progress)


class _RowWriter:
    """Appends raw rows to ``images.u8`` and keeps the CRC-32 of every block of :data:`BLOCK` rows."""

    def __init__(self, f: Any) -> None:
        self.f = f
        self.crcs: list[int] = []
        self.crc = 0
        self.rows = 0

    def emit(self, row: bytes) -> None:
        self.f.write(row)
        self.crc = zlib.crc32(row, self.crc)
        self.rows += 1
        if self.rows % BLOCK == 0:
            self.crcs.append(self.crc)
            self.crc = 0

    def finish(self) -> list[int]:
        """The block CRCs, the last (partial) block's included."""
        if self.rows % BLOCK:
            self.crcs.append(self.crc)
        return self.crcs


def _decoded(split: ImageSplit, i: int, bad: dict[int, str]) -> np.ndarray | None:
    """Sample ``i``'s pixels, or None with the reason recorded in ``bad``."""
    try:
        return np.asarray(split.load(i), dtype=np.uint8)
    except BadImageError as e:
        bad[i] = e.reason
    except Exception as e:  # unreadable member, I/O error: the same words as `--bad-images`
        bad[i] = f"cannot read: {type(e).__name__}: {e}"
    return None


def _write_rows(
    split: ImageSplit, out: _RowWriter, bad: dict[int, str], progress: bool | None
) -> tuple[tuple[int, int] | None, dict[str, Any] | None]:
    """Decode every sample into ``out`` (bad ones as zero rows); returns (height, width) and, when two
    samples differ in size, where (then writing stops)."""
    shape: tuple[int, int] | None = None
    disable = None if progress is None else not progress
    for i in tqdm(range(len(split)), desc=f"decode {split.name}", unit="img", disable=disable, leave=False):
        arr = _decoded(split, i, bad)
        if arr is not None and shape is None:
            shape = (arr.shape[0], arr.shape[1])
            for _ in range(i):  # the bad rows before the first good one, now that the size is known
                out.emit(bytes(shape[0] * shape[1] * 3))
        if shape is None:
            continue
        if arr is None:
            arr = np.zeros((*shape, 3), dtype=np.uint8)
        elif arr.shape[:2] != shape:
            return shape, {"first": list(shape), "other": list(arr.shape[:2]), "at": split.origin(i)}
        out.emit(np.ascontiguousarray(arr).tobytes())
    return shape, None


def _write_entry(
    split: ImageSplit, tmp: Path, fingerprint: str, progress: bool | None
) -> tuple[tuple[int, int] | None, dict[str, Any] | None, dict[int, str]]:
    """Build the entry in the private folder ``tmp``: images.u8 and meta.json; returns (shape, mixed, bad)."""
    bad: dict[int, str] = {}
    with open(tmp / "images.u8", "wb") as f:
        out = _RowWriter(f)
        shape, mixed = _write_rows(split, out, bad, progress)
        crcs = out.finish()
        f.flush()
        os.fsync(f.fileno())
    meta: dict[str, Any] = {
        "format": FORMAT,
        "split": split.name,
        "fingerprint": fingerprint,
        "n": len(split),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if mixed is not None or shape is None:
        (tmp / "images.u8").unlink()
        meta["mixed_sizes"] = mixed or {"reason": "no decodable image"}
    else:
        meta.update(height=shape[0], width=shape[1], crc32=crcs, bad={str(k): v for k, v in bad.items()})
    atomic_write_json(tmp / "meta.json", meta)
    return shape, mixed, bad


def _build(split: ImageSplit, folder: Path, fingerprint: str, *, progress: bool | None) -> ImageSplit:
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    t0 = time.perf_counter()
    try:
        shape, mixed, bad = _write_entry(split, tmp, fingerprint, progress)
        try:
            os.rename(tmp, folder)
        except OSError:  # another process finished first: use its entry
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if mixed is not None or shape is None:
        log.info(
            "decoded cache: %s images differ in size (%s); decoding per image instead",
            split.name,
            mixed,
        )
        return split
    found = _open_entry(folder, split, fingerprint)
    if not isinstance(found, DecodedSplit):  # pragma: no cover - only if the disk lies
        log.warning("decoded cache %s could not be read back; decoding per image instead", folder)
        return split
    log.info(
        "decoded cache: %d %s images (%dx%d, %d unreadable) decoded in %.1f s -> %s",
        len(split),
        split.name,
        shape[1],
        shape[0],
        len(bad),
        time.perf_counter() - t0,
        folder,
    )
    return found
