"""Screening the images a training run will read, before it starts (``train --bad-images error|skip``).

Why a pass over the images up front instead of catching a broken file when the loader meets it:

* ``error`` (the default) must stop *before* any compute is spent: a truncated JPEG met at epoch 37 costs
  hours, and a DataLoader worker turns it into a traceback rather than a message naming the file;
* ``skip`` must exclude the same images on every run and on every resume. The excluded set is removed
  from the sample indices before the holdout and the seeded permutations are drawn, so a resumed run
  sees exactly the data order of an uninterrupted one; dropping a sample when it is first met mid-epoch
  would shift every later position and break exact resume (and, under DDP, the ranks' step counts).

Each check decodes a sample exactly as training will (:meth:`ImageSplit.load`). The result is cached under
``CACHE/image-checks`` keyed by the samples' fingerprint (ids, labels, zip CRCs or file size+mtime), so
only the first run on a dataset pays for the decode pass (about 4 s for the 25,000 images of the mini
Tiny ImageNet on 2 cores); a replaced file changes the key and is checked again.
"""

from __future__ import annotations

import json
import logging
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from transferlab.data.base import ArraySplit, DatasetSource, FileSplit, ImageSplit, split_fingerprint
from transferlab.data.decoded import DecodedSplit
from transferlab.errors import BadImageError, DataError, TooFewClassesError
from transferlab.io import atomic_write_json

log = logging.getLogger(__name__)

POLICIES = ("error", "skip")
#: How many bad files metrics.json and the error message list (the count is always complete).
MAX_LISTED = 100
_CHUNK = 500
_FORMAT = 1

Bad = tuple[int, str, str]  # (sample index, origin, reason)


def _bad_in_chunk(split: ImageSplit, indices: list[int]) -> list[Bad]:
    bad: list[Bad] = []
    for i in indices:
        try:
            split.load(i)
        except BadImageError as e:
            bad.append((i, e.origin, e.reason))
        except Exception as e:  # unreadable member, I/O error: the loader would fail on it just the same
            bad.append((i, split.origin(i), f"cannot read: {type(e).__name__}: {e}"))
    return bad


def find_bad_samples(
    split: ImageSplit, indices: np.ndarray, *, workers: int = 0, progress: bool | None = None
) -> list[Bad]:
    """Decode ``split[i]`` for every ``i`` in ``indices``; return the failures in index order.

    Array-backed splits (CIFAR-10) hold decoded pixels whose shape was checked when the batch was read,
    so there is nothing to decode.
    """
    if isinstance(split, DecodedSplit):  # decoded once already: its build recorded what failed, and why
        return [(int(i), split.origin(int(i)), split.bad[int(i)]) for i in indices if int(i) in split.bad]
    if isinstance(split, ArraySplit) or not len(indices):
        return []
    idx = [int(i) for i in indices]
    chunks = [idx[s : s + _CHUNK] for s in range(0, len(idx), _CHUNK)]
    disable = None if progress is None else not progress
    bar = tqdm(total=len(idx), desc=f"check {split.name} images", unit="img", disable=disable, leave=False)
    bad: list[Bad] = []
    if workers > 1 and len(chunks) > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            for ch, found in zip(chunks, pool.map(_bad_in_chunk, [split] * len(chunks), chunks), strict=True):
                bad.extend(found)
                bar.update(len(ch))
    else:
        for ch in chunks:
            bad.extend(_bad_in_chunk(split, ch))
            bar.update(len(ch))
    bar.close()
    return sorted(bad)


def empty_classes(
    source: DatasetSource, split_name: str = "train", bad: list[Bad] | None = None
) -> list[tuple[str, str]]:
    """``(where, what)`` for every class of ``source`` with no usable image in the split (``bad`` removed).

    A class without a single training image cannot be learned, yet the model still has an output for it and
    the report still counts it: a silent wrong answer. ``where`` is the class folder when there is one.
    """
    split = getattr(source.split(split_name), "base_split", source.split(split_name))  # folders of a decoded one
    counts = np.bincount(split.targets[split.targets >= 0], minlength=len(source.classes))
    for i, _, _ in bad or []:
        counts[split.targets[i]] -= 1
    out = []
    folders = set(split.store.list_dirs(split_name)) if isinstance(split, FileSplit) else set()
    for c in np.flatnonzero(counts <= 0):
        cid, name = source.classes.ids[c], source.classes.names[c]
        label = f"{cid} ({name})" if name != cid else cid
        if cid in folders:
            where, why = split.store.origin(f"{split_name}/{cid}"), "an empty class folder?"
        elif not isinstance(split, FileSplit):
            where, why = f"{source.location} ({split_name})", "no image has that label"
        else:  # the class comes from another split's folders (root/val/<class> without root/train/<class>)
            where = f"{source.location} ({split_name})"
            others = [n for n, s in source.splits.items() if n != split_name and bool((s.targets == c).any())]
            why = f"no {split_name}/{cid} folder; the class only has images in {', '.join(others) or 'no split'}"
        out.append((where, f"class {label} has no usable image in the {split_name} split ({why})"))
    return out


def refuse_too_few_classes(source: DatasetSource, split_name: str | None, action: str) -> None:
    """Raise :class:`TooFewClassesError` unless ``source`` has two classes (and ``split_name`` images of two).

    A classifier over one class is always right: a one-class ImageFolder trained, and was scored, top-1
    100% with NLL 0, a number that looks like success. ``action`` (``transferlab train``, ...) names what
    refuses; ``split_name`` is the split a model would be fitted on (None when nothing is fitted).
    Called before any work, so nothing (decoded cache, image checks, features) is written first.
    """
    ids = source.classes.ids
    if len(ids) < 2:
        found = f"a single class, {ids[0]!r}" if ids else "no class"
        raise TooFewClassesError(
            f"{source.location} has {found}: a classifier needs at least two classes to tell apart (over one class "
            f"every prediction is right, top-1 100%). {action} refuses it before any work. Add images of at least "
            "one other class (root/<class>/*.jpg, or root/train/<class>/ and root/val/<class>/), or check that "
            "--data points at the dataset's root rather than at one class folder"
        )
    if split_name is None:
        return
    split = getattr(source.split(split_name), "base_split", source.split(split_name))
    present = np.unique(split.targets[split.targets >= 0])
    if len(present) < 2:
        only = f"only class {ids[present[0]]!r}" if len(present) else "no labeled image"
        missing = [c for k, c in enumerate(ids) if k not in set(present.tolist())]
        raise TooFewClassesError(
            f"the {split_name} split of {source.location} holds images of {only}; the other "
            f"{len(missing)} class(es) ({', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}) have none "
            f"there. A classifier needs {split_name} images of at least two classes; {action} refuses it before "
            f"any work. Add {split_name}/<class>/ folders with images for the other classes"
        )


def _cached_bad_samples(
    split: ImageSplit, indices: np.ndarray, cache_dir: Path | None, workers: int, progress: bool | None
) -> list[Bad]:
    """:func:`find_bad_samples`, remembered by the samples' fingerprint (a damaged entry is redone)."""
    if isinstance(split, ArraySplit) or cache_dir is None:
        return find_bad_samples(split, indices, workers=workers, progress=progress)
    key = split_fingerprint(split, indices)
    path = cache_dir / "image-checks" / f"{key[:32]}.json"
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        if doc.get("format") == _FORMAT and doc.get("key") == key and doc.get("n") == len(indices):
            bad = [(int(i), str(o), str(r)) for i, o, r in doc["bad"]]
            log.debug("image check of %s: %d bad, from the cache %s", split.name, len(bad), path)
            return bad
    except FileNotFoundError:
        pass
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
        log.warning("ignoring the damaged image-check cache entry %s (%s); checking again", path, e)
    bad = find_bad_samples(split, indices, workers=workers, progress=progress)
    try:
        atomic_write_json(path, {"format": _FORMAT, "key": key, "n": len(indices), "bad": [list(b) for b in bad]})
    except OSError as e:  # a read-only cache must not stop training
        log.warning("could not cache the image check in %s: %s", path, e)
    return bad


def screen_images(
    source: DatasetSource,
    selected: dict[str, np.ndarray],
    *,
    policy: str = "error",
    cache_dir: Path | None = None,
    workers: int = 0,
    progress: bool | None = None,
    rank: int = 0,
    world: int = 1,
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Check every image of ``selected`` (split name -> sample indices) and apply ``policy``.

    Returns the indices to use per split (bad samples removed, order kept) and the record for
    metrics.json: ``{"policy", "skipped", "files": [{"split", "file", "reason"}, ...], "empty_classes"}``.
    With ``error``, any bad file, or a class left without a single training image (an empty class folder),
    raises a DataError listing them. Under torchrun rank 0 checks and sends the outcome to the other
    ranks, so all of them go on, or stop, with the same data.
    """
    if policy not in POLICIES:
        raise DataError(f"--bad-images must be one of {', '.join(POLICIES)}, not {policy!r}")
    if world > 1:
        import torch.distributed as dist

        box: list[Any] = [None]
        if rank == 0:
            try:
                box[0] = ("ok", _screen(source, selected, policy, cache_dir, workers, progress))
            except DataError as e:
                box[0] = ("error", str(e))
        dist.broadcast_object_list(box, src=0)
        status, value = box[0]
        if status == "error":
            raise DataError(value)
        return value
    return _screen(source, selected, policy, cache_dir, workers, progress)


def _screen(
    source: DatasetSource,
    selected: dict[str, np.ndarray],
    policy: str,
    cache_dir: Path | None,
    workers: int,
    progress: bool | None,
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    found: dict[str, list[Bad]] = {}
    for name, indices in selected.items():
        found[name] = _cached_bad_samples(source.split(name), indices, cache_dir, workers, progress)
    files = [(name, origin, reason) for name, bad in found.items() for _, origin, reason in bad]

    empty = empty_classes(source, "train", found["train"]) if "train" in selected else []

    if policy == "error" and (files or empty):
        raise _refusal(source, files, empty)

    for _, origin, reason in files:
        log.warning("skipping %s: %s", origin, reason)
    for where, what in empty:
        log.warning("%s: %s; training anyway (--bad-images skip)", where, what)
    kept = {}
    for name, indices in selected.items():
        drop = np.array([i for i, _, _ in found[name]], dtype=np.int64)
        kept[name] = indices[~np.isin(indices, drop)] if len(drop) else indices
    if files:
        log.warning("--bad-images skip: %d image(s) left out", len(files))
    record = {
        "policy": policy,
        "skipped": len(files),
        "files": [{"split": s, "file": o, "reason": r} for s, o, r in files[:MAX_LISTED]],
        "empty_classes": [what for _, what in empty],
    }
    return kept, record


def _listed(rows: list[str], n: int) -> str:
    """The first 20 problem lines, and a count of the others."""
    lines = rows[:20]
    if n > 20:
        lines.append(f"  ... and {n - 20} more")
    return "\n".join(lines)


def _refusal(source: DatasetSource, files: list[tuple[str, str, str]], empty: list[tuple[str, str]]) -> DataError:
    """``--bad-images error``'s DataError: the files that cannot be decoded and the classes that cannot be learned."""
    problems = []
    if files:
        rows = [f"  {origin}: {reason}" for _, origin, reason in files[:20]]
        problems.append(f"{len(files)} image(s) cannot be decoded:\n" + _listed(rows, len(files)))
    if empty:
        rows = [f"  {where}: {what}" for where, what in empty[:20]]
        problems.append(f"{len(empty)} class(es) cannot be learned:\n" + _listed(rows, len(empty)))
    return DataError(
        "\n".join(problems) + f"\nNothing was trained. `transferlab data check {source.location}` lists every "
        "problem; fix or remove those files, or pass --bad-images skip to train without them (each is logged "
        "and counted in metrics.json)"
    )
