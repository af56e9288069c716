"""The batched inference engine: a model over a dataset split, as fast as this machine allows.

One loop serves evaluate, zero-shot, feature extraction and the feature cache: the decoded cache's
whole-batch gather (or per-image PIL decoding in DataLoader workers when a split has no decoded cache), resize
and standardisation as tensors, a copy of the model with BatchNorm folded into its convolutions, two inference
streams on a CPU, and glibc heap reuse. With ``backend`` ``auto`` or ``openvino`` the model itself runs in
OpenVINO's CPU runtime instead, converted once and checked against PyTorch first
(:mod:`transferlab.inference.openvino`); everything around it stays the same.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from transferlab.data import ImageSplit
from transferlab.data.batched import ArrayBatches, eval_batch
from transferlab.data.decoded import pixel_array
from transferlab.data.transforms import EvalTransform, normalize_batch
from transferlab.inference.openvino import (
    BACKENDS,
    CHECK_IMAGES,
    OpenVinoRunner,
    openvino_runner,
    resolve_backend,
)
from transferlab.models.backbones import Backbone
from transferlab.models.fold import inference_copy
from transferlab.models.preprocessing import Preprocessing
from transferlab.options import Option
from transferlab.runtime import Precision, eval_mode, inference_streams, reuse_freed_memory

log = logging.getLogger(__name__)

# Which runtime executes the model in evaluate, predict, feature extraction and TTA (training stays on torch).
BACKEND = Option(
    "inference backend: auto = OpenVINO on a CPU where it is installed and agrees with PyTorch on the data, else torch",
    choices=BACKENDS,
    group="runtime",
)


class _SplitDataset(Dataset):
    """Maps an ImageSplit through a transform; yields (uint8 image, index)."""

    def __init__(self, split: ImageSplit, transform: EvalTransform, indices: np.ndarray) -> None:
        self.split = split
        self.transform = transform
        self.indices = indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        j = int(self.indices[i])
        return self.transform(self.split.load(j)), j


def make_eval_transform(
    pre: Preprocessing, size: int, crop: str = "auto", interpolation: str = "auto"
) -> EvalTransform:
    """The eval transform for a backbone's preprocessing. ``interpolation='auto'`` keeps the weights'
    own method for down-scaling and uses bilinear for up-scaling; a named method is used for both."""
    if interpolation == "auto":
        return EvalTransform(size, pre.interpolation, pre.crop_pct, crop, upsample="auto")
    return EvalTransform(size, interpolation, pre.crop_pct, crop, upsample=interpolation)


def pipeline_name(split: ImageSplit) -> str:
    """How a split's images reach the model, for metrics and logs."""
    folder = getattr(split, "folder", None)
    if folder is not None:
        return f"decoded cache ({folder}), batched tensor resize"
    if pixel_array(split) is not None:
        return "in-memory array, batched tensor resize"
    return "PIL per image in DataLoader workers"


def default_workers() -> int:
    """Decode in one or more worker processes, leaving at least one core to the model."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(4, n - 1))


def predict_logits(backbone: Backbone, split: ImageSplit, transform: EvalTransform, **options: Any) -> np.ndarray:
    """:func:`model_outputs` of a pretrained backbone, standardised with its own preprocessing."""
    pre = backbone.preprocessing
    out = model_outputs(backbone.model, split, transform, mean=pre.mean, std=pre.std, **options)
    return out if len(out) else np.empty((0, backbone.num_classes), dtype=np.float32)


@torch.inference_mode()
def model_outputs(
    model: torch.nn.Module,
    split: ImageSplit,
    transform: EvalTransform,
    *,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    indices: np.ndarray,
    precision: Precision,
    device: torch.device,
    batch_size: int = 64,
    workers: int = 1,
    progress: bool | None = None,
    forward: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor] | None = None,
    desc: str | None = None,
    worker_init_fn: Callable[[int], None] | None = None,
    fold: bool = True,
    streams: bool = True,
    backend: str = "torch",
    info: dict[str, Any] | None = None,
) -> np.ndarray:
    """Run ``model`` over ``split[indices]`` and return float32 outputs in that order.

    The one inference loop: evaluation, zero-shot, feature extraction, the training loop's holdout pass and
    predict on a dataset split all come here. ``forward(model, x)`` replaces ``model(x)``, e.g. to return
    pre-logits features for the feature cache or TTA's log mean probabilities; the output width is taken from
    the first batch. ``worker_init_fn`` runs in each DataLoader worker of the per-image path (training passes
    one that leaves SIGTERM/SIGINT to the main process). ``fold=False`` for a model that already is an
    :func:`~transferlab.models.fold.inference_copy` (predict folds each network once for all its inputs);
    ``streams=False`` runs each batch whole, in this thread (an ONNX Runtime session brings its own threads).
    ``backend`` (``auto``, ``torch``, ``openvino``): see :mod:`transferlab.inference.openvino`; torch runs
    wherever OpenVINO is not installed, not on this device, or does not agree with PyTorch on the first
    images. ``info``, when given, is filled with what ran (backend, precision, streams, conversion cache).
    """
    model = model.to(device)
    if precision.channels_last:
        model = model.to(memory_format=torch.channels_last)
    pixels = pixel_array(split)
    runner = None
    if len(indices) and resolve_backend(backend, device) == "openvino":
        runner = _converted(model, forward, split, transform, indices, pixels, (mean, std), precision, device, streams)
    model = _torch_model(model, runner, fold, transform.size, device, precision, streams, info)
    loader = _batches(split, transform, indices, pixels, batch_size, device, workers, worker_init_fn)
    out: np.ndarray | None = None
    pos = 0
    disable = None if progress is None else not progress

    def run_model(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            if pixels is not None:
                # Standardised (and made channels_last) at the stored size, then resized: see batched.py.
                x = eval_batch(x, transform, norm=(mean, std), channels_last=precision.channels_last)
            if runner is not None:
                return runner.run(forward, x)
            with precision.autocast():
                return (model(x) if forward is None else forward(model, x)).float()

    # The runner's OpenVINO objects are released when the loop ends, here, not when garbage collection finds them.
    with _released(runner), eval_mode(model), reuse_freed_memory(device), _streams(device, streams) as run:
        for batch in tqdm(loader, desc=desc or f"eval {split.name}", unit="batch", disable=disable, leave=False):
            x = batch[0].to(device, non_blocking=True)
            if pixels is None:
                x = normalize_batch(x, mean, std, channels_last=precision.channels_last)
            y = run(run_model, x).cpu().numpy()
            if out is None:
                out = np.empty((len(indices), *y.shape[1:]), dtype=np.float32)
            out[pos : pos + len(y)] = y
            pos += len(y)
    if out is None:
        return np.empty((0, 0), dtype=np.float32)  # no samples: the width is unknown
    return out


@contextmanager
def _released(runner: OpenVinoRunner | None) -> Iterator[None]:
    try:
        yield
    finally:
        if runner is not None:
            runner.close()


def _converted(
    model: torch.nn.Module,
    forward: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor] | None,
    split: ImageSplit,
    transform: EvalTransform,
    indices: np.ndarray,
    pixels: np.ndarray | None,
    norm: tuple[Any, Any],
    precision: Precision,
    device: torch.device,
    streams: bool,
) -> OpenVinoRunner | None:
    """The OpenVINO runner for this model, checked on the run's first images (None: torch runs)."""
    check = _check_batch(split, transform, indices, pixels, norm[0], norm[1], precision, device)
    with eval_mode(model):
        return openvino_runner(model, forward, size=transform.size, precision=precision, check=check, streams=streams)


def _torch_model(
    model: torch.nn.Module,
    runner: OpenVinoRunner | None,
    fold: bool,
    size: int,
    device: torch.device,
    precision: Precision,
    streams: bool,
    info: dict[str, Any] | None,
) -> torch.nn.Module:
    """The model torch runs (BatchNorm folded with ``fold``) when OpenVINO does not; logs which backend runs
    (OpenVINO's runner logged its own line) and fills ``info`` with it."""
    if runner is not None:
        what = runner.info
    else:
        if fold:
            # A copy with BatchNorm folded into the convolutions: the same function, ~30% faster on a CPU.
            model = inference_copy(model, size, device, channels_last=precision.channels_last)
        what = {"backend": "torch", "precision": precision.name, "streams": 2 if streams else 1}
        log.info("inference backend: torch, %s, %s", precision.describe(), "two streams" if streams else "one stream")
    if info is not None:
        info.update(what)
    return model


def _check_batch(
    split: ImageSplit,
    transform: EvalTransform,
    indices: np.ndarray,
    pixels: np.ndarray | None,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    precision: Precision,
    device: torch.device,
) -> torch.Tensor:
    """The first few images of the run, standardised exactly as the model will see them (the OpenVINO check)."""
    first = indices[:CHECK_IMAGES]
    x = next(iter(_batches(split, transform, first, pixels, len(first), device, 0, None)))[0].to(device)
    if pixels is not None:
        return eval_batch(x, transform, norm=(mean, std), channels_last=precision.channels_last)
    return normalize_batch(x, mean, std, channels_last=precision.channels_last)


@contextmanager
def _streams(device: torch.device, two: bool) -> Iterator[Callable[[Callable[..., torch.Tensor], torch.Tensor], Any]]:
    """:func:`~transferlab.runtime.inference_streams`, or with ``two=False`` a ``run(fn, x)`` that is ``fn(x)``."""
    if not two:
        yield lambda fn, x: fn(x)
        return
    with inference_streams(device) as run:
        yield run


def _batches(
    split: ImageSplit,
    transform: EvalTransform,
    indices: np.ndarray,
    pixels: np.ndarray | None,
    batch_size: int,
    device: torch.device,
    workers: int,
    worker_init_fn: Callable[[int], None] | None,
) -> Iterable[Any]:
    """Batches whose first element is the uint8 images of ``split[indices]``, in that order."""
    if pixels is not None:  # decoded cache: whole batches resized as tensors, no worker processes
        return ArrayBatches(
            pixels,
            split.targets,
            indices,
            range(len(indices)),
            batch_size,
            lambda u8, _idx: u8,  # resized inside each inference stream (model_outputs), in parallel
            device,
        )
    return DataLoader(
        _SplitDataset(split, transform, indices),
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
        worker_init_fn=worker_init_fn if workers else None,
    )
