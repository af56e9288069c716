"""The feature cache: run a frozen backbone once per split and keep its pre-logits features on disk.

When nothing before the head trains and no random augmentation reaches the backbone (a linear probe),
the backbone's outputs are identical every epoch, so computing them once turns an hour of CPU
training into seconds per epoch. Entries are keyed by a hash of everything the features depend on
(architecture, every weight tensor, the exact samples and their content stamps, the transform,
preprocessing and precision), so a change anywhere gives a new entry, never a stale one. An entry that
does not load or does not match its own metadata is rebuilt, with a warning naming the file.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from transferlab.data.base import ImageSplit, split_fingerprint
from transferlab.data.decoded import pixel_array
from transferlab.data.transforms import EvalTransform
from transferlab.inference.engine import predict_logits
from transferlab.inference.openvino import resolve_backend
from transferlab.io import atomic_write_with
from transferlab.models.backbones import Backbone
from transferlab.runtime import Precision

log = logging.getLogger(__name__)

FORMAT_VERSION = 1


def weights_fingerprint(model: torch.nn.Module) -> str:
    """sha256 over every parameter and buffer (name, dtype, shape, bytes) of ``model`` except its classifier.

    Features are what comes before the classifier, so the classifier is left out: a zero-shot evaluation
    (ImageNet head attached) and a linear probe (head removed) of the same backbone share one cache entry.
    """
    skip = None
    get = getattr(model, "get_classifier", None)
    if callable(get):
        clf = get()
        skip = next((n + "." for n, mod in model.named_modules() if n and mod is clf), None)
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        if skip is not None and name.startswith(skip):
            continue
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@dataclass(frozen=True)
class FeatureKey:
    """What a cached feature array depends on."""

    model: str
    weights: str
    samples: str
    transform: str
    preprocessing: str
    precision: str
    what: str = "pre_logits"
    #: ``tensor`` (batched resize from a pixel array) or ``pil`` (per image): the resampling differs in
    #: rounding, so their features are not interchangeable bit for bit.
    pipeline: str = "pil"
    #: ``torch`` or ``openvino`` (what the run resolved ``--backend`` to): their features differ in rounding.
    #: Left out of the key for torch, so entries written before there was a choice keep their names.
    backend: str = "torch"

    def fields(self) -> dict[str, str]:
        """The key as stored in an entry."""
        d = dict(self.__dict__)
        if d["backend"] == "torch":
            del d["backend"]
        return d

    def digest(self) -> str:
        """Short hex id used as the file name."""
        blob = json.dumps(self.fields() | {"format": FORMAT_VERSION}, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:24]


def pre_logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The pooled features a timm classifier sees (``forward_head(pre_logits=True)``)."""
    return model.forward_head(model.forward_features(x), pre_logits=True)  # type: ignore[operator]


def feature_map(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The last feature map (B, C, H, W), what a convolutional head such as the seed's sees."""
    return model.forward_features(x)  # type: ignore[operator]


FORWARDS = {"pre_logits": pre_logits, "feature_map": feature_map}

Forward = Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]


def mirrored(forward: Forward) -> Forward:
    """``forward`` applied to the horizontal mirror of the (standardised, B x 3 x H x W) batch."""

    def run(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        return forward(model, torch.flip(x, dims=[3]))

    run.mirror_of = forward  # type: ignore[attr-defined]  # lets the OpenVINO backend convert ``forward`` itself
    return run


def cached_features(
    backbone: Backbone,
    split: ImageSplit,
    transform: EvalTransform,
    *,
    indices: np.ndarray,
    precision: Precision,
    device: torch.device,
    cache_dir: Path,
    batch_size: int = 32,
    workers: int = 1,
    progress: bool | None = None,
    what: str = "pre_logits",
    flip: bool = False,
    backend: str = "torch",
    info: dict[str, Any] | None = None,
) -> tuple[np.ndarray, Path, bool]:
    """Backbone outputs of ``split[indices]``: from the cache when present, else computed and stored.

    ``what`` is ``pre_logits`` (pooled vectors, for a linear head) or ``feature_map`` (for the seed
    head). ``flip`` computes them on the horizontal mirror of each input (the standardised batch flipped
    left-right, as TTA's ``flip`` view): another entry, whose transform in the key says ``+ hflip``, so
    the unflipped entries written before this option existed keep their names. Returns (features float32
    (N, ...), cache file, whether it was a cache hit). ``backend`` and ``info``: as for
    :func:`~transferlab.inference.engine.model_outputs`.
    """
    if what not in FORWARDS:
        raise ValueError(f"what must be one of {sorted(FORWARDS)}, not {what!r}")
    key = FeatureKey(
        model=backbone.name,
        weights=weights_fingerprint(backbone.model),
        samples=split_fingerprint(split, indices),
        transform=repr(transform) + (" + hflip" if flip else ""),
        preprocessing=json.dumps(backbone.preprocessing.to_dict(), sort_keys=True),
        precision=precision.name,
        what=what,
        pipeline="tensor" if pixel_array(split) is not None else "pil",
        backend=resolve_backend(backend, device),
    )
    view = "-hflip" if flip else ""
    path = Path(cache_dir) / f"{backbone.name}-{split.name}-{what}{view}-{key.digest()}.npz"
    if path.exists():
        feats = _load(path, len(indices), key)
        if feats is not None:
            log.info("feature cache hit: %s (%d x %d)", path, *feats.shape)
            return feats, path, True
    log.info(
        "feature cache: extracting %s features for %d %s images%s -> %s",
        backbone.name,
        len(indices),
        split.name,
        " (mirrored)" if flip else "",
        path,
    )
    forward = mirrored(FORWARDS[what]) if flip else FORWARDS[what]
    feats = predict_logits(
        backbone,
        split,
        transform,
        indices=indices,
        precision=precision,
        device=device,
        batch_size=batch_size,
        workers=workers,
        progress=progress,
        forward=forward,
        desc=f"features {split.name}{' mirrored' if flip else ''}",
        backend=backend,
        info=info,
    )

    def _write(f):  # type: ignore[no-untyped-def]
        np.savez(f, features=feats.astype(np.float32), key=np.asarray(json.dumps(key.fields())))

    atomic_write_with(path, _write)
    return feats, path, False


def _load(path: Path, n: int, key: FeatureKey) -> np.ndarray | None:
    try:
        with np.load(path, allow_pickle=False) as z:
            feats = z["features"]
            stored = json.loads(str(z["key"]))
    except Exception as e:
        log.warning("feature cache entry %s is unreadable (%s); rebuilding it", path, e)
        return None
    if stored != key.fields() or feats.ndim < 2 or len(feats) != n or not np.isfinite(feats).all():
        log.warning("feature cache entry %s does not match what it should hold; rebuilding it", path)
        return None
    return feats
