"""Resizing and augmentation on whole batches of uint8 tensors, for splits held as one pixel array.

The per-image path (:class:`~transferlab.data.transforms.EvalTransform`,
:class:`~transferlab.data.augment.TrainTransform`) resizes each 64px PIL image to 224 and only then
batches it: 128 small resamples, 128 tensor conversions and a worker-process round trip per batch. Here
the batch is gathered from the decoded array at its stored size (64px: 12 KB per image instead of 150
KB) and resized once, on the compute device, which also makes the GPU do the resampling.

The results follow the per-image transforms' semantics, not their bits:

* eval: the same crop policy (``auto`` crops only sources with pixels to spare) and
  interpolation choice (``upsample`` for sources smaller than the input, ``interpolation`` otherwise),
  with ``F.interpolate``; down-scaling is antialiased as PIL's is. Bilinear up-scaling agrees with PIL's
  to within a couple of grey levels (the pixel-centre conventions are the same);
* seed augmentation: the resize and the shear/zoom warp are one ``grid_sample`` straight from the
  stored image (one interpolation instead of two), with edge replication and the flip after the warp,
  as in :class:`~transferlab.data.augment.SeedAugment`;
* flip, none: exact flips of the resized batch;
* RandAugment / TrivialAugment: torchvision's policies apply one op to a whole batch, so they still run
  per sample, on tensors, seeded exactly as in the per-image path.

Per-sample randomness is drawn with :func:`~transferlab.data.augment.sample_rng` ``(seed, epoch, index)``
in the same order and number as the per-image path, so flips and warp parameters are the same draws.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F

from transferlab.data.augment import _INT63_MAX, EvalAsTrain, TrainTransform, sample_rng
from transferlab.data.transforms import EvalTransform, normalize_batch

#: Policies that torchvision applies per image with torch's global generator (run per sample here).
POLICY_AUGS = ("randaugment", "trivialaugment")
_MODES = {"bilinear": "bilinear", "bicubic": "bicubic", "nearest": "nearest-exact"}
_GRID_MODES = {"bilinear": "bilinear", "bicubic": "bicubic", "nearest": "nearest"}


def _interpolate(x: torch.Tensor, h: int, w: int, method: str) -> torch.Tensor:
    """float (B, C, H, W) -> (B, C, h, w); antialiased when shrinking, like PIL."""
    if x.shape[-2:] == (h, w):
        return x
    mode = _MODES[method]
    shrink = h < x.shape[-2] or w < x.shape[-1]
    if mode == "nearest-exact":
        return F.interpolate(x, size=(h, w), mode=mode)
    return F.interpolate(x, size=(h, w), mode=mode, align_corners=False, antialias=shrink)


Norm = tuple[tuple[float, ...], tuple[float, ...]]


def _standardize(x: torch.Tensor, norm: Norm | None, channels_last: bool) -> torch.Tensor:
    """uint8 -> float32, standardised with ``norm`` = (mean, std) in [0, 1] units when given.

    Standardising is a per-channel affine map and every resampling here (bilinear, bicubic, antialiased,
    grid_sample with edge replication) is a weighted average with weights summing to 1, so the two
    commute: doing it at the stored 64px instead of after up-scaling to 224 touches 12x fewer values and
    drops one full-size pass. ``channels_last`` here makes the resampled output channels_last too.
    """
    if norm is not None:
        return normalize_batch(x, norm[0], norm[1], channels_last=channels_last)
    xf = x.float()
    return xf.contiguous(memory_format=torch.channels_last) if channels_last else xf


def _clamp(x: torch.Tensor, norm: Norm | None) -> torch.Tensor:
    """Clip bicubic overshoot to the valid pixel range (0..255, or its standardised image)."""
    if norm is None:
        return x.clamp_(0.0, 255.0)
    m = torch.tensor(norm[0], dtype=x.dtype, device=x.device).view(1, -1, 1, 1) * 255.0
    s = torch.tensor(norm[1], dtype=x.dtype, device=x.device).view(1, -1, 1, 1) * 255.0
    return torch.minimum(torch.maximum(x, -m / s), (255.0 - m) / s)


def eval_batch(
    x: torch.Tensor, tf: EvalTransform, *, norm: Norm | None = None, channels_last: bool = False
) -> torch.Tensor:
    """uint8 (B, 3, h, w) -> float32 (B, 3, S, S), as ``tf`` would make each image.

    Pixel values 0..255, or standardised with ``norm`` = (mean, std) (what the model takes; see
    :func:`_standardize`).
    """
    h, w = x.shape[-2:]
    size = tf.size
    small = min(h, w) < size
    method = tf.upsample if small else tf.interpolation
    mode = tf.crop if tf.crop != "auto" else ("center" if min(h, w) >= tf.crop_threshold else "none")
    xf = _standardize(x, norm, channels_last)
    if mode == "none":
        out = _interpolate(xf, size, size, method)
    else:
        short = round(size / tf.crop_pct)
        scale = short / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        out = _interpolate(xf, nh, nw, method)
        top, left = (nh - size) // 2, (nw - size) // 2
        out = out[:, :, top : top + size, left : left + size]
        if channels_last:
            out = out.contiguous(memory_format=torch.channels_last)
    return _clamp(out, norm) if method == "bicubic" else out


def draw_params(tf: TrainTransform, seed: int, epoch: int, indices: Sequence[int]) -> list[tuple[float | int, ...]]:
    """Per-sample draws, the same ones :meth:`TrainTransform.__call__` makes from each sample's rng.

    ``seed``: (shear degrees, zx, zy, flip); ``flip``: (flip,); policies: (flip, torch seed); ``none``: ().
    """
    out: list[tuple[float | int, ...]] = []
    for i in indices:
        rng = sample_rng(seed, epoch, int(i))
        if tf.aug == "seed":
            p = tf._seed_aug.sample_params(rng)  # type: ignore[union-attr]
            out.append((p.shear, p.zx, p.zy, float(p.flip)))
        elif tf.aug == "flip":
            out.append((float(rng.random() < 0.5),))
        elif tf.aug in POLICY_AUGS:
            flip = float(rng.random() < 0.5)
            out.append((flip, int(rng.integers(0, _INT63_MAX))))  # an exact int: floats hold 53 bits
        else:
            out.append(())
    return out


def _warp_grid(params: torch.Tensor, size: int) -> torch.Tensor:
    """Sampling grid (B, S, S, 2) for shear/zoom about the centre then a flip, in [-1, 1] coordinates.

    Output pixel centres are ``(2j + 1) / S - 1`` (``align_corners=False``), so with identity
    parameters the grid is exactly a plain resize of the source to S x S. The square output makes the
    pixel-unit map of :class:`SeedAugment` (x' = zx (x + t y), y' = zy y about the centre) the same map in
    normalised units; sampling needs its inverse: y = y' / zy, x = x' / zx - t y.
    """
    dev = params.device
    c = (torch.arange(size, device=dev, dtype=torch.float32) * 2 + 1) / size - 1
    shear, zx, zy, flip = params.unbind(1)
    t = torch.tan(torch.deg2rad(shear))
    u = c.view(1, 1, size).expand(len(params), size, size)
    u = torch.where(flip.view(-1, 1, 1) > 0.5, -u, u)  # the flip mirrors the warped output
    v = c.view(1, size, 1)
    ys = v / zy.view(-1, 1, 1)
    xs = u / zx.view(-1, 1, 1) - t.view(-1, 1, 1) * ys
    return torch.stack([xs, ys.expand_as(xs)], dim=-1)


def train_batch(
    x: torch.Tensor,
    tf: TrainTransform | EvalAsTrain,
    seed: int,
    epoch: int,
    indices: Sequence[int],
    *,
    norm: Norm | None = None,
    channels_last: bool = False,
) -> torch.Tensor:
    """Augmented float32 (B, 3, S, S) batch from uint8 (B, 3, h, w) source pixels.

    ``tf`` is the run's train transform (its size, interpolation and policy are used), or
    :class:`EvalAsTrain` when the run trains without augmentation. Values 0..255, or standardised with ``norm``.
    """
    if isinstance(tf, EvalAsTrain):
        return eval_batch(x, tf.eval_transform, norm=norm, channels_last=channels_last)
    size = tf.size
    if tf.aug in POLICY_AUGS:
        out = _policies(x, tf, seed, epoch, indices)  # works on 0..255 pixels: standardised afterwards
        return _standardize(out, norm, channels_last) if norm is not None or channels_last else out.float()
    xf = _standardize(x, norm, False)
    if tf.aug == "seed":
        p = torch.tensor(draw_params(tf, seed, epoch, indices), dtype=torch.float32, device=x.device)
        if min(xf.shape[-2:]) > size:  # shrink first with antialiasing; a sampling grid would alias
            xf = _interpolate(xf, size, size, tf.interpolation)
        grid = _warp_grid(p, size)
        out = F.grid_sample(xf, grid, mode=_GRID_MODES[tf.interpolation], padding_mode="border", align_corners=False)
    else:
        out = _interpolate(xf, size, size, tf.interpolation)
        if tf.aug == "flip":
            out = _flip_where(out, draw_params(tf, seed, epoch, indices))
    if tf.interpolation == "bicubic":
        out = _clamp(out, norm)
    return out.contiguous(memory_format=torch.channels_last) if channels_last else out


def _flip_where(x: torch.Tensor, draws: Sequence[tuple[float | int, ...]]) -> torch.Tensor:
    """Mirror the samples whose first draw is a flip."""
    flips = torch.tensor([d[0] > 0.5 for d in draws], device=x.device)
    return torch.where(flips.view(-1, 1, 1, 1), x.flip(-1), x)


def _policies(x: torch.Tensor, tf: TrainTransform, seed: int, epoch: int, indices: Sequence[int]) -> torch.Tensor:
    """RandAugment / TrivialAugment per sample on uint8 tensors, seeded as in TrainTransform.__call__."""
    out = _interpolate(x.float(), tf.size, tf.size, tf.interpolation)
    if tf.interpolation == "bicubic":
        out = out.clamp_(0.0, 255.0)
    draws = draw_params(tf, seed, epoch, indices)
    if tf.hflip:
        out = _flip_where(out, draws)
    u8 = out.round_().to(torch.uint8)
    res = []
    for k, d in enumerate(draws):
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(int(d[1]))
            res.append(tf._policy(u8[k]))  # type: ignore[misc]
    return torch.stack(res)


def gather(images: np.ndarray, indices: np.ndarray, device: torch.device) -> torch.Tensor:
    """uint8 (B, 3, H, W) for ``images[indices]``, read in ascending order (sequential on a memmap).

    The batch is put back into the requested order afterwards; sorting only changes the read pattern.
    """
    order = np.argsort(indices, kind="stable")
    rows = np.empty((len(indices), *images.shape[1:]), dtype=np.uint8)
    rows[order] = images[indices[order]]
    t = torch.from_numpy(rows).permute(0, 3, 1, 2)
    return t.to(device, non_blocking=True) if device.type != "cpu" else t


def needs_serial(tf: object) -> bool:
    """True for the policies that reseed torch's global generator per sample (no background prefetch)."""
    return isinstance(tf, TrainTransform) and tf.aug in POLICY_AUGS


class ArrayBatches:
    """``(x, y, pos)`` batches over ``positions`` of a pixel array, like a DataLoader over the same positions.

    ``x = make(uint8 batch, sample indices)`` is the processed float batch. With ``prefetch`` (the default
    when the model runs on a GPU) the next batch is prepared in a background thread while the caller works
    on the current one. On a CPU the model's own threads already use every core and a second thread only
    competes with them (measured on 2 cores: no gain), so callers pass ``prefetch=False`` there. Never
    with RandAugment/TrivialAugment: they reseed torch's global generator per sample, which must not
    happen while the model's dropout draws from it in the main thread.
    """

    def __init__(
        self,
        images: np.ndarray,
        targets: np.ndarray,
        indices: np.ndarray,
        positions: Sequence[int],
        batch_size: int,
        make: Callable[[torch.Tensor, np.ndarray], torch.Tensor],
        device: torch.device,
        *,
        prefetch: bool | None = None,
    ) -> None:
        self.images, self.targets, self.indices = images, targets, np.asarray(indices)
        self.positions = np.asarray(positions, dtype=np.int64)
        self.batch_size, self.make, self.device = batch_size, make, device
        self.prefetch = device.type != "cpu" if prefetch is None else prefetch

    def __len__(self) -> int:
        return math.ceil(len(self.positions) / self.batch_size)

    def _batch(self, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        pos = self.positions[k * self.batch_size : (k + 1) * self.batch_size]
        idx = self.indices[pos]
        x = self.make(gather(self.images, idx, self.device), idx)
        return x, torch.from_numpy(self.targets[idx].astype(np.int64)), torch.from_numpy(pos)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        n = len(self)
        if not self.prefetch or n < 2:
            for k in range(n):
                yield self._batch(k)
            return
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="batches") as pool:
            pending = pool.submit(self._batch, 0)
            for k in range(n):
                current = pending
                if k + 1 < n:
                    pending = pool.submit(self._batch, k + 1)
                yield current.result()
