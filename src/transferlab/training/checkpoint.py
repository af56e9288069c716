"""Checkpoints that let a killed training run resume exactly where it stopped.

A checkpoint ``<name>`` is two files in one directory:

* ``<name>.safetensors`` holds every tensor: the model (``model.<key>``), the optimizer's per-parameter
  state (``optim.<param_index>.<key>``; Adam's ``step`` is a tensor and stays one) and the torch RNG
  states (``rng.torch_cpu``, ``rng.cuda.<device>``);
* ``<name>.json`` holds everything else: the format version, the sha256 and byte size of the tensor file,
  the optimizer's structure (``param_groups`` with parameters as indices, per-parameter Python numbers),
  the AMP scaler state, the Python and NumPy RNG states, and the caller's ``state`` (step, epoch,
  position in the epoch, history, early stopping...).

Nothing is ever unpickled: a checkpoint is data, never code. Both files are written atomically, tensors
first and JSON last, so *a JSON file whose recorded sha256 matches the tensor file* is the completion
marker. A run killed at any moment leaves either the previous complete checkpoint or the new one;
:func:`latest_checkpoint` skips (and reports) anything half-written or corrupted.

The run lock that keeps two processes out of one run directory is :class:`transferlab.artifacts.lock.RunLock`.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import logging
import math
import os
import random
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from transferlab.errors import TransferlabError
from transferlab.io import atomic_open

log = logging.getLogger(__name__)

FORMAT = "transferlab-checkpoint"
FORMAT_VERSION = 1

TENSOR_SUFFIX = ".safetensors"
MANIFEST_SUFFIX = ".json"

_MODEL = "model."
_OPTIM = "optim."
_RNG_CPU = "rng.torch_cpu"
_RNG_CUDA = "rng.cuda."
# Tags that keep tensors and tuples distinguishable inside the optimizer's JSON structure, so that
# ``optimizer.state_dict()`` after a load equals the one that was saved (betas stay a tuple).
_TENSOR_TAG = "__tensor__"
_TUPLE_TAG = "__tuple__"

_HASH_CHUNK = 1 << 20


class CheckpointError(TransferlabError):
    """A checkpoint is missing, incomplete, corrupted or does not fit what it is loaded into."""


@dataclass
class Checkpoint:
    """What :func:`load_checkpoint` read back.

    ``model_state`` has the original state-dict keys (the ``model.`` prefix removed) and CPU tensors;
    ``path`` is the ``.safetensors`` file. The optimizer and RNG states are restored in place, not
    returned, because they only make sense applied to live objects.
    """

    name: str
    path: Path
    model_state: dict[str, torch.Tensor]
    state: dict[str, Any]
    scaler_state: dict[str, Any] | None = None
    meta: dict[str, Any] = field(default_factory=dict, repr=False)


def step_name(step: int, prefix: str = "step") -> str:
    """The conventional name of the checkpoint taken at ``step`` (``step-000120``), zero-padded so that
    names also sort by step in a directory listing."""
    return f"{prefix}-{step:06d}"


# --------------------------------------------------------------------------------------------- saving


def save_checkpoint(
    ckpt_dir: str | os.PathLike[str],
    name: str,
    *,
    model_state: Mapping[str, torch.Tensor],
    optimizer: torch.optim.Optimizer | None,
    scaler_state: dict[str, Any] | None,
    state: dict[str, Any],
) -> Path:
    """Write checkpoint ``name`` into ``ckpt_dir`` and return the path of its ``.safetensors`` file.

    Everything that can fail for reasons other than I/O (a state value that is not JSON, a non-tensor in
    ``model_state``) is checked before the first byte is written, so a bad call never damages an existing
    checkpoint of the same name. The tensor file is serialised in memory once, which gives its sha256
    for the manifest without reading it back; checkpoints here are image-classifier sized.
    """
    from safetensors.torch import save as st_save

    _check_name(name)
    directory = Path(ckpt_dir)
    tensors: dict[str, torch.Tensor] = {}

    for key, value in model_state.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"model_state[{key!r}] is a {type(value).__name__}, not a tensor")
        tensors[_MODEL + str(key)] = value

    optim_meta = _encode_optimizer(optimizer, tensors) if optimizer is not None else None
    rng_meta = _capture_rng(tensors)
    if not isinstance(state, Mapping):
        raise TypeError(f"state must be a dict, not a {type(state).__name__}")
    json_state = _plain_json(state, "state")
    json_scaler = _plain_json(scaler_state, "scaler_state") if scaler_state is not None else None

    data = st_save(_detached(tensors), metadata={"format": FORMAT, "name": name})
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "name": name,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "tensors": {"file": name + TENSOR_SUFFIX, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()},
        # safetensors stores tensors sorted for alignment; the state dict's order is kept here because
        # some consumers (mapping weights by position) depend on it.
        "model_keys": [str(k) for k in model_state],
        "optimizer": optim_meta,
        "scaler": json_scaler,
        "rng": rng_meta,
        "state": json_state,
    }
    text = json.dumps(manifest, indent=1) + "\n"

    tensor_path = directory / (name + TENSOR_SUFFIX)
    # Both files are written in full to temp files before either is renamed into place (the contexts exit
    # in reverse order: tensors first, then the manifest), so a write that fails (full disk, an exception)
    # leaves the previous checkpoint of the same name byte-identical; only a kill between the two renames
    # can leave a pair that does not match, which loading detects by the sha256.
    with atomic_open(directory / (name + MANIFEST_SUFFIX), "w") as fm, atomic_open(tensor_path, "wb") as ft:
        ft.write(data)
        fm.write(text)
    log.debug("saved checkpoint %s (%.1f MB)", tensor_path, len(data) / 1e6)
    return tensor_path


def _check_name(name: str) -> None:
    if not name or name.startswith(".") or "/" in name or "\\" in name or name != name.strip():
        raise ValueError(f"invalid checkpoint name {name!r}: use a plain file name such as 'step-000120' or 'last'")


def _detached(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous tensors that own their memory.

    safetensors refuses tensors that share storage (tied weights, views into a flat buffer); copying
    exactly those keeps the common case free of extra copies.
    """
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, t in tensors.items():
        t = t.detach().cpu()
        storage = t.untyped_storage()
        whole = t.is_contiguous() and t.storage_offset() == 0 and storage.nbytes() == t.numel() * t.element_size()
        ptr = storage.data_ptr()
        if not whole or (ptr in seen and t.numel() > 0):
            t = t.clone(memory_format=torch.contiguous_format)
            ptr = t.untyped_storage().data_ptr()
        seen.add(ptr)
        out[key] = t
    return out


def _encode_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The optimizer's state dict as JSON, with every tensor moved into ``tensors``."""
    sd = optimizer.state_dict()
    param_state: dict[str, Any] = {}
    for index, entries in sd["state"].items():
        if not isinstance(index, int):
            raise CheckpointError(
                f"cannot checkpoint {type(optimizer).__name__}: its state is keyed by {index!r}, not by parameter index"
            )
        param_state[str(index)] = _encode_value(entries, f"{_OPTIM}{index}", tensors)
    groups = [_encode_value(group, f"{_OPTIM}group.{i}", tensors) for i, group in enumerate(sd["param_groups"])]
    return {"class": type(optimizer).__name__, "param_groups": groups, "state": param_state}


def _encode_value(value: Any, key: str, tensors: dict[str, torch.Tensor]) -> Any:
    """JSON for ``value``; tensors become ``{"__tensor__": key}`` references and tuples stay tuples."""
    if isinstance(value, torch.Tensor):
        if key in tensors:
            raise CheckpointError(f"two optimizer entries map to the tensor name {key!r}")
        tensors[key] = value
        return {_TENSOR_TAG: key}
    if value is None or isinstance(value, bool | int | str | float):
        return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, tuple | list):
        items = [_encode_value(v, f"{key}.{i}", tensors) for i, v in enumerate(value)]
        return {_TUPLE_TAG: items} if isinstance(value, tuple) else items
    if isinstance(value, Mapping):
        return _encode_mapping(value, key, tensors)
    raise CheckpointError(f"optimizer state {key!r} holds a {type(value).__name__}, which cannot be checkpointed")


def _encode_mapping(value: Mapping[Any, Any], key: str, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in value.items():
        if not isinstance(k, str):
            raise CheckpointError(f"optimizer state key {k!r} under {key!r} is not a string; cannot checkpoint it")
        out[k] = _encode_value(v, f"{key}.{k}", tensors)
    return out


def _decode_value(value: Any, tensors: Mapping[str, torch.Tensor], origin: Path) -> Any:
    if isinstance(value, list):
        return [_decode_value(v, tensors, origin) for v in value]
    if isinstance(value, dict):
        if set(value) == {_TENSOR_TAG}:
            key = value[_TENSOR_TAG]
            if key not in tensors:
                raise CheckpointError(f"{origin}: the optimizer state refers to tensor {key!r}, which is missing")
            return tensors[key]
        if set(value) == {_TUPLE_TAG}:
            return tuple(_decode_value(v, tensors, origin) for v in value[_TUPLE_TAG])
        return {k: _decode_value(v, tensors, origin) for k, v in value.items()}
    return value


def _plain_json(value: Any, where: str) -> Any:
    """``value`` as plain JSON, or a TypeError naming the offending entry.

    Stricter than ``json.dumps``: non-string dict keys are refused instead of silently becoming strings,
    because a resumed run would then see ``history["3"]`` where it wrote ``history[3]``.
    """
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, list | tuple):
        return [_plain_json(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"{where} has the key {k!r} ({type(k).__name__}); checkpoint state keys must be str")
            out[k] = _plain_json(v, f"{where}[{k!r}]")
        return out
    if isinstance(value, Path):
        return str(value)
    hint = "; convert it with float(...) or .tolist()" if isinstance(value, torch.Tensor | np.ndarray) else ""
    raise TypeError(f"{where} is a {type(value).__name__}, which is not JSON{hint}")


# ------------------------------------------------------------------------------------------------ RNG


def _capture_rng(tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Every RNG a training step may draw from: Python, NumPy's legacy global, torch CPU and CUDA."""
    version, internal, gauss_next = random.getstate()
    bit_generator, keys, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    tensors[_RNG_CPU] = torch.get_rng_state()
    cuda_keys: list[str] = []
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"{_RNG_CUDA}{i}"] = s
            cuda_keys.append(f"{_RNG_CUDA}{i}")
    return {
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
        "numpy": {
            "bit_generator": bit_generator,
            "keys": [int(k) for k in keys],
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch_cpu": _RNG_CPU,
        "cuda": cuda_keys,
    }


def _restore_rng(rng: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], origin: Path) -> None:
    try:
        py = rng["python"]
        random.setstate((py["version"], tuple(py["internal"]), py["gauss_next"]))
        npy = rng["numpy"]
        np.random.set_state(
            (
                npy["bit_generator"],
                np.asarray(npy["keys"], dtype=np.uint32),
                npy["pos"],
                npy["has_gauss"],
                npy["cached_gaussian"],
            )
        )
        torch.set_rng_state(tensors[rng["torch_cpu"]])
        cuda_keys = list(rng.get("cuda") or [])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{origin}: the saved random-number-generator state is unusable ({e!r})") from e
    if not cuda_keys:
        return
    if not torch.cuda.is_available():
        log.warning(
            "%s was saved with the RNG state of %d CUDA device(s), but CUDA is not available here; GPU random "
            "streams start afresh, so a resumed run will not be bit-identical",
            origin,
            len(cuda_keys),
        )
        return
    count = torch.cuda.device_count()
    if count != len(cuda_keys):
        log.warning(
            "%s holds the RNG state of %d CUDA device(s) but %d are visible; restoring the first %d",
            origin,
            len(cuda_keys),
            count,
            min(count, len(cuda_keys)),
        )
    for i, key in enumerate(cuda_keys[:count]):
        if key not in tensors:
            raise CheckpointError(f"{origin}: the CUDA RNG state {key!r} is missing")
        torch.cuda.set_rng_state(tensors[key], i)


# -------------------------------------------------------------------------------------------- loading


def _paths(ckpt_dir: str | os.PathLike[str], name: str) -> tuple[Path, Path]:
    d = Path(ckpt_dir)
    return d / (name + TENSOR_SUFFIX), d / (name + MANIFEST_SUFFIX)


def _read_manifest(manifest_path: Path, tensor_path: Path) -> dict[str, Any]:
    try:
        text = manifest_path.read_text(encoding="utf-8")
    except FileNotFoundError:
        if tensor_path.exists():
            why = "the writer was interrupted after the tensors and before the manifest"
        else:
            why = "no such checkpoint"
        raise CheckpointError(f"{manifest_path} is missing ({why})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{manifest_path} cannot be read: {e}") from e
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{manifest_path} is not valid JSON ({e}); the file is damaged") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{manifest_path} is not a transferlab checkpoint manifest")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{manifest_path} has checkpoint format version {version!r}; this transferlab reads version "
            f"{FORMAT_VERSION}. Resume it with the transferlab version that wrote it."
        )
    info = meta.get("tensors")
    if (
        not isinstance(info, dict)
        or not isinstance(info.get("bytes"), int)
        or not isinstance(info.get("sha256"), str)
        or not isinstance(meta.get("state"), dict)
    ):
        raise CheckpointError(f"{manifest_path} lacks the tensor file's size and sha256 or the training state")
    return meta


def _check_tensor_file(tensor_path: Path, info: Mapping[str, Any], read: bool) -> bytes | None:
    """Compare size and sha256 with the manifest; return the bytes when ``read`` (so that what is
    loaded is exactly what was hashed)."""
    try:
        size = tensor_path.stat().st_size
    except FileNotFoundError:
        raise CheckpointError(f"{tensor_path} is missing, though its manifest exists") from None
    if size != info["bytes"]:
        raise CheckpointError(
            f"{tensor_path} has {size} bytes but its manifest records {info['bytes']}; the file is truncated or "
            "was replaced by a write that did not finish"
        )
    digest = hashlib.sha256()
    chunks: list[bytes] = []
    try:
        with open(tensor_path, "rb") as f:
            while chunk := f.read(_HASH_CHUNK):
                digest.update(chunk)
                if read:
                    chunks.append(chunk)
    except OSError as e:
        raise CheckpointError(f"{tensor_path} cannot be read: {e}") from e
    if digest.hexdigest() != info["sha256"]:
        raise CheckpointError(f"{tensor_path} does not match the sha256 in its manifest; the file is corrupted")
    return b"".join(chunks) if read else None


def verify_checkpoint(ckpt_dir: str | os.PathLike[str], name: str) -> dict[str, Any]:
    """Check that checkpoint ``name`` is complete and intact; return its manifest or raise CheckpointError."""
    tensor_path, manifest_path = _paths(ckpt_dir, name)
    meta = _read_manifest(manifest_path, tensor_path)
    _check_tensor_file(tensor_path, meta["tensors"], read=False)
    return meta


def load_checkpoint(
    ckpt_dir: str | os.PathLike[str],
    name: str,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    restore_rng: bool = True,
) -> Checkpoint:
    """Read and verify checkpoint ``name``; restore ``optimizer`` and the RNGs in place.

    The optimizer must be built the same way as the one that was saved (same class, same parameters in
    the same groups); its state then equals the saved one exactly, so that, with the model loaded from
    ``model_state`` and the RNGs restored, training continues bit-identically. Restoring the RNGs is the
    default because a resumed run must draw the same dropout masks and augmentations; pass
    ``restore_rng=False`` to inspect a checkpoint without disturbing the current process.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load as st_load

    _check_name(name)
    tensor_path, manifest_path = _paths(ckpt_dir, name)
    meta = _read_manifest(manifest_path, tensor_path)
    data = _check_tensor_file(tensor_path, meta["tensors"], read=True) or b""
    try:
        tensors = st_load(data)
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{tensor_path} is not a readable safetensors file: {e}") from e

    model_state = {k[len(_MODEL) :]: v for k, v in tensors.items() if k.startswith(_MODEL)}
    order = meta.get("model_keys")
    if isinstance(order, list) and sorted(order) == sorted(model_state):
        model_state = {k: model_state[k] for k in order}

    if optimizer is not None:
        _restore_optimizer(optimizer, meta.get("optimizer"), tensors, tensor_path)
    if restore_rng:
        rng = meta.get("rng")
        if not isinstance(rng, dict):
            raise CheckpointError(f"{manifest_path} holds no RNG state; load it with restore_rng=False")
        _restore_rng(rng, tensors, tensor_path)

    log.debug("loaded checkpoint %s (step %s)", tensor_path, meta["state"].get("step"))
    return Checkpoint(
        name=name,
        path=tensor_path,
        model_state=model_state,
        state=meta["state"],
        scaler_state=meta.get("scaler"),
        meta=meta,
    )


def _restore_optimizer(
    optimizer: torch.optim.Optimizer, saved: Any, tensors: Mapping[str, torch.Tensor], origin: Path
) -> None:
    cls = type(optimizer).__name__
    if not isinstance(saved, dict):
        raise CheckpointError(f"{origin} was saved without optimizer state, so {cls} cannot be restored from it")
    if saved.get("class") != cls:
        raise CheckpointError(
            f"{origin} holds the state of a {saved.get('class')} optimizer, not of a {cls}; resume with the "
            "optimizer the run was started with"
        )
    try:
        state = {int(k): _decode_value(v, tensors, origin) for k, v in saved["state"].items()}
        groups = [_decode_value(g, tensors, origin) for g in saved["param_groups"]]
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{origin}: the optimizer state in its manifest is malformed ({e!r})") from e
    try:
        optimizer.load_state_dict({"state": state, "param_groups": groups})
    except (ValueError, KeyError, RuntimeError) as e:
        raise CheckpointError(
            f"{origin}: the saved {cls} state does not fit this optimizer ({e}); was the model or its parameter "
            "groups changed since the checkpoint was written?"
        ) from e


# ------------------------------------------------------------------------------ finding and pruning


@dataclass
class _Candidate:
    name: str
    step: float
    mtime: float
    meta: dict[str, Any] | None  # None when the manifest is missing or unreadable
    problem: str | None  # why it is not complete, known without hashing


def _candidates(ckpt_dir: Path, prefix: str) -> list[_Candidate]:
    """Every checkpoint-looking name in ``ckpt_dir`` starting with ``prefix``, newest first.

    Ordered by the ``step`` recorded in the manifest; where the manifest is missing or unreadable, by
    the last number in the name (``step-000120``), so that a broken newer checkpoint sorts where it
    belongs and gets reported. Ties go by modification time.
    """
    if not ckpt_dir.is_dir():
        return []
    names: set[str] = set()
    for p in ckpt_dir.iterdir():
        if p.name.startswith(".") or not p.name.startswith(prefix):
            continue
        for suffix in (TENSOR_SUFFIX, MANIFEST_SUFFIX):
            if p.name.endswith(suffix) and len(p.name) > len(suffix):
                names.add(p.name[: -len(suffix)])
    out: list[_Candidate] = []
    for name in names:
        tensor_path, manifest_path = _paths(ckpt_dir, name)
        meta: dict[str, Any] | None = None
        problem: str | None = None
        try:
            meta = _read_manifest(manifest_path, tensor_path)
        except CheckpointError as e:
            problem = str(e)
        step = meta["state"].get("step") if meta is not None else None
        if not isinstance(step, int | float) or isinstance(step, bool) or math.isnan(step):
            numbers = re.findall(r"\d+", name)
            step = int(numbers[-1]) if numbers else -1
        mtimes: list[float] = []
        for p in (manifest_path, tensor_path):
            with contextlib.suppress(OSError):
                mtimes.append(p.stat().st_mtime)
        out.append(_Candidate(name, float(step), max(mtimes, default=0.0), meta, problem))
    out.sort(key=lambda c: (c.step, c.mtime), reverse=True)
    return out


def latest_checkpoint(ckpt_dir: str | os.PathLike[str], prefix: str = "step") -> str | None:
    """The name of the newest complete, intact checkpoint whose name starts with ``prefix``, or None.

    Every newer one that fails verification (half-written, truncated, corrupted, manifest missing) is
    logged as a WARNING with the file and the reason, and the search falls back to the next older one:
    losing a few steps is better than refusing to resume or resuming from garbage.
    """
    directory = Path(ckpt_dir)
    for cand in _candidates(directory, prefix):
        if cand.problem is None:
            tensor_path, _ = _paths(directory, cand.name)
            try:
                _check_tensor_file(tensor_path, (cand.meta or {})["tensors"], read=False)
                return cand.name
            except CheckpointError as e:
                cand.problem = str(e)
        log.warning("skipping checkpoint %s: %s", cand.name, cand.problem)
    return None


def prune_checkpoints(ckpt_dir: str | os.PathLike[str], prefix: str, keep: int) -> list[str]:
    """Delete complete checkpoints starting with ``prefix`` older than the newest ``keep`` intact ones, and
    temp files left by a killed writer; return the names deleted.

    Only checkpoints that verify count towards ``keep``, so a corrupted newest checkpoint never causes
    the last good one to be deleted. Broken checkpoints newer than the kept ones are left for
    :func:`latest_checkpoint` to report; broken ones older than them are deleted with the rest. Call it
    only from the process that writes the checkpoints (the one holding the :class:`RunLock`), because it
    removes every checkpoint temp file in the directory.
    """
    if keep < 1:
        raise ValueError(f"keep must be at least 1, not {keep}")
    directory = Path(ckpt_dir)
    _remove_temp_files(directory)
    kept = 0
    deleted: list[str] = []
    for cand in _candidates(directory, prefix):
        tensor_path, manifest_path = _paths(directory, cand.name)
        if kept < keep:
            if cand.problem is None:
                try:
                    _check_tensor_file(tensor_path, (cand.meta or {})["tensors"], read=False)
                    kept += 1
                except CheckpointError as e:
                    log.warning("not counting checkpoint %s as kept: %s", cand.name, e)
            continue
        # Manifest first: from that moment the pair is no longer a complete checkpoint.
        for p in (manifest_path, tensor_path):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        deleted.append(cand.name)
        log.debug("pruned checkpoint %s", directory / cand.name)
    return deleted


_TEMP_RE = re.compile(r"^\..+(" + re.escape(TENSOR_SUFFIX) + "|" + re.escape(MANIFEST_SUFFIX) + r")\..+\.tmp$")


def _remove_temp_files(directory: Path) -> None:
    """Remove ``.<name>.safetensors.<random>.tmp`` / ``.json`` temp files from atomic writes that never
    finished (the writer was killed before it could clean up)."""
    if not directory.is_dir():
        return
    for p in directory.iterdir():
        if _TEMP_RE.match(p.name) and p.is_file():
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
            log.info("removed the temp file %s left by an interrupted checkpoint write", p)
