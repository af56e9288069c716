"""Train-time augmentation whose randomness is a pure function of (seed, epoch, sample index).

Why not the usual global RNGs. A DataLoader worker's torch/numpy state depends on the worker id and on
how many samples that worker has already produced, so the augmentation a sample receives changes with
``--workers`` and cannot be replayed after a resume from a mid-run checkpoint. Here every sample gets its
own generator, :func:`sample_rng` ``(seed, epoch, index)``, and nothing else: the same run gives the same
pixels whatever the worker count, and resuming at epoch ``e`` replays epoch ``e`` exactly.

Order of operations (:class:`TrainTransform`): the image is first resized straight to ``size`` x ``size``
(no crop, like :class:`~transferlab.data.transforms.EvalTransform` with ``crop="none"``), then augmented
at that resolution. That is the order of the reference recipes: Keras' ``flow_from_directory`` resizes
to ``target_size`` on load before ``random_transform``, and timm applies RandAugment after its resize
crop. It also matters for TrivialAugmentWide, whose translations are absolute pixel counts (up to 32 px)
tuned for ~224 px inputs: on a 64 px source they would shift the content by half the image.

Batch-level mixing (:func:`mix_batch`) works on the float batch on the compute device and draws from an
explicit ``torch.Generator``, so it too is replayable when the caller seeds that generator per step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import v2

from transferlab.data.transforms import _PIL_INTERP
from transferlab.errors import ConfigError

AUG_MODES = ("none", "flip", "seed", "randaugment", "trivialaugment")

_INT63_MAX = (1 << 63) - 1


# --------------------------------------------------------------------------------------------------------------------
# Per-sample randomness


def _seed_sequence(seed: int, epoch: int, index: int) -> np.random.SeedSequence:
    """The one place the (seed, epoch, index) key becomes entropy, so both helpers below agree."""
    for name, value in (("seed", seed), ("epoch", epoch), ("index", index)):
        if int(value) < 0:
            # SeedSequence rejects negative entropy; say which argument was wrong instead of numpy's message.
            raise ValueError(f"{name} must be >= 0 for per-sample augmentation seeding, not {value}")
    return np.random.SeedSequence([int(seed), int(epoch), int(index)])


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """A fresh numpy Generator for one sample in one epoch.

    Built from ``SeedSequence([seed, epoch, index])``, whose hashing makes neighbouring keys (index 7
    vs 8, epoch 0 vs 1) statistically independent streams, unlike ``seed + index`` style arithmetic.
    """
    return np.random.Generator(np.random.PCG64(_seed_sequence(seed, epoch, index)))


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit integer from the same (seed, epoch, index) sequence, for APIs that take a torch seed.

    63 rather than 64 bits so that it is a valid non-negative ``int64`` wherever it travels.
    """
    word = _seed_sequence(seed, epoch, index).generate_state(1, dtype=np.uint64)[0]
    return int(word >> np.uint64(1))


# --------------------------------------------------------------------------------------------------------------------
# Keras ImageDataGenerator-style shear/zoom/flip


@dataclass(frozen=True)
class AffineParams:
    """One draw of :class:`SeedAugment`'s random parameters (kept separate so tests can force them).

    ``shear`` is in degrees; ``zx``/``zy`` are magnifications (> 1 enlarges the content); ``flip`` mirrors
    left-right after the affine warp.
    """

    shear: float = 0.0
    zx: float = 1.0
    zy: float = 1.0
    flip: bool = False

    @property
    def is_identity_warp(self) -> bool:
        """True when the affine part does nothing, so it can be skipped rather than resampled."""
        return self.shear == 0.0 and self.zx == 1.0 and self.zy == 1.0


class SeedAugment:
    """The reference recipe's ``ImageDataGenerator(shear_range=0.2, zoom_range=0.2, horizontal_flip=True)``.

    Reading of the Keras 2 semantics, and where this differs:

    * ``shear_range`` is an angle in **degrees** (Keras 2 docs: "Shear angle in counter-clockwise direction
      in degrees"; ``apply_affine_transform`` calls ``np.deg2rad``). So the recipe's 0.2 is a 0.2 degree
      shear, a displacement of about 0.35% of the image height between top and bottom rows: nearly a
      no-op. It is reproduced as written, not "fixed" into a 0.2 rad (11.5 degree) shear. The shear is
      parallel to the x axis, ``x_out = x_in + tan(angle) * (y_in - cy)``; Keras' matrix
      ``[[1, -sin], [0, cos]]`` differs from a pure shear by under 1e-5 at this angle, and its sign
      convention does not matter for a range symmetric about 0.
    * ``zoom_range=z`` draws ``zx`` and ``zy`` independently from ``U[1 - z, 1 + z]``. Keras feeds them
      to an output-to-input coordinate map, so its ``zx = 1.2`` *shrinks* the content; here the factor
      is a magnification (> 1 enlarges). With a range symmetric about 1 the two differ only in a small
      skew of the distribution (E[1/U(0.8, 1.2)] = 1.014), not in the kind of augmentation.
    * one affine warp about the image centre, bilinear (Keras' ``interpolation_order=1``), with pixels
      outside the source taken from the nearest edge pixel (Keras' default ``fill_mode='nearest'``),
      then a left-right flip with probability 0.5, after the warp as in Keras' ``apply_transform``.

    All parameters are drawn from the ``rng`` passed to :meth:`__call__`, always in the same order and
    number, so the stream a sample consumes does not depend on the configuration.
    """

    def __init__(self, shear: float = 0.2, zoom: float = 0.2, hflip: bool = True) -> None:
        if shear < 0 or not math.isfinite(shear):
            raise ConfigError(f"shear must be a finite angle >= 0 in degrees, not {shear}")
        if not 0 <= zoom < 1:
            raise ConfigError(f"zoom must be in [0, 1) (factors are drawn from [1 - zoom, 1 + zoom]), not {zoom}")
        self.shear = float(shear)
        self.zoom = float(zoom)
        self.hflip = bool(hflip)

    def __repr__(self) -> str:
        return f"SeedAugment(shear={self.shear}, zoom={self.zoom}, hflip={self.hflip})"

    def sample_params(self, rng: np.random.Generator) -> AffineParams:
        """Draw shear, zx, zy and flip, consuming the same four draws whatever the settings."""
        u = rng.random(4)
        shear = (2.0 * u[0] - 1.0) * self.shear
        zx = 1.0 + (2.0 * u[1] - 1.0) * self.zoom
        zy = 1.0 + (2.0 * u[2] - 1.0) * self.zoom
        return AffineParams(shear=float(shear), zx=float(zx), zy=float(zy), flip=self.hflip and bool(u[3] < 0.5))

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> Image.Image:
        return self.apply(img, self.sample_params(rng))

    def apply(self, img: Image.Image, params: AffineParams) -> Image.Image:
        """Warp and maybe flip ``img`` with fixed ``params``; same size and mode out."""
        if img.mode not in ("L", "LA", "RGB", "RGBA"):
            raise ValueError(f"SeedAugment needs an 8-bit L/LA/RGB/RGBA image, not mode {img.mode!r}; convert it first")
        if params.is_identity_warp and not params.flip:
            return img.copy()
        arr = np.asarray(img, dtype=np.uint8)
        if not params.is_identity_warp:
            arr = _warp_edge(arr, params.shear, params.zx, params.zy)
        if params.flip:
            arr = arr[:, ::-1]
        return Image.fromarray(np.ascontiguousarray(arr))  # L, LA, RGB, RGBA inferred from the shape


def _warp_edge(arr: np.ndarray, shear_deg: float, zx: float, zy: float) -> np.ndarray:
    """Bilinear affine warp about the centre with edge replication, (H, W[, C]) uint8 -> same.

    PIL's and torchvision's ``affine`` only fill the uncovered area with a constant colour; Keras'
    ``fill_mode='nearest'`` repeats the edge pixels instead, which keeps a zoomed-out image free of black
    borders. ``grid_sample(padding_mode="border")`` is exactly that (source coordinates clamped to the
    image), and at ~1 ms for 224x224x3 on one thread it is ~10x faster than the same gather in numpy.
    ``align_corners=True`` makes pixel centres the sample points, so a unit warp reproduces the input.
    """
    h, w = arr.shape[:2]
    cx, cy = (w - 1) / 2.0, (h - 1) / 2.0
    t = math.tan(math.radians(shear_deg))
    # Forward content map about the centre: [x', y'] = A [x, y], A = zoom @ shear = [[zx, zx*t], [0, zy]].
    # Sampling needs the inverse: y = y' / zy, x = x' / zx - t * y.
    yr = (torch.arange(h, dtype=torch.float64) - cy) / zy
    xs = (torch.arange(w, dtype=torch.float64) - cx)[None, :] / zx - t * yr[:, None] + cx
    ys = (yr + cy)[:, None].expand(h, w)
    # grid_sample wants [-1, 1] coordinates; a 1-pixel axis has only its centre, 0.
    gx = xs * (2.0 / (w - 1)) - 1.0 if w > 1 else torch.zeros_like(xs)
    gy = ys * (2.0 / (h - 1)) - 1.0 if h > 1 else torch.zeros_like(ys)
    grid = torch.stack([gx, gy], dim=-1).float()[None]
    # astype copies: PIL-backed arrays are read-only, which torch.from_numpy warns about.
    chw = torch.from_numpy(arr.reshape(h, w, -1).astype(np.float32)).permute(2, 0, 1)[None]
    out = F.grid_sample(chw, grid, mode="bilinear", padding_mode="border", align_corners=True)
    out = out[0].round_().clamp_(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    return out.reshape(arr.shape)


# --------------------------------------------------------------------------------------------------------------------
# The train transform


class TrainTransform:
    """PIL image + per-sample rng -> augmented uint8 CHW tensor at ``size`` x ``size``.

    The image is resized straight to ``size`` x ``size`` with ``interpolation`` (small images are not
    cropped, see :class:`~transferlab.data.transforms.EvalTransform`), then augmented (see the module
    docstring for why in that order):

    * ``none``: nothing; the output equals ``EvalTransform(size, crop="none")`` for the same resampling;
    * ``flip``: left-right flip with p=0.5 (needs ``hflip``);
    * ``seed``: :class:`SeedAugment` (the reference recipe's shear/zoom/flip);
    * ``randaugment`` / ``trivialaugment``: torchvision v2 ``RandAugment(num_ops, magnitude)`` /
      ``TrivialAugmentWide``, after a p=0.5 flip when ``hflip``. They draw from torch's global RNG, so
      they run inside ``torch.random.fork_rng(devices=[])`` with the CPU generator seeded from ``rng``:
      deterministic per sample, and the caller's torch RNG stream is left as it was. Only the CPU
      generator is touched (``torch.manual_seed`` would also reseed CUDA); not safe to call from several
      threads of one process at once, which DataLoader (processes) never does.

    Normalisation is left to :func:`~transferlab.data.transforms.normalize_batch`, as for eval.
    """

    def __init__(
        self,
        size: int,
        interpolation: str = "bilinear",
        aug: str = "seed",
        hflip: bool = True,
        *,
        shear: float = 0.2,
        zoom: float = 0.2,
        ra_num_ops: int = 2,
        ra_magnitude: int = 9,
    ) -> None:
        if aug not in AUG_MODES:
            raise ConfigError(f"--aug must be one of {', '.join(AUG_MODES)}, not {aug!r}")
        if interpolation not in _PIL_INTERP:
            raise ConfigError(f"--interpolation must be one of {', '.join(sorted(_PIL_INTERP))}, not {interpolation!r}")
        if aug == "flip" and not hflip:
            raise ConfigError("--aug flip with horizontal flips disabled does nothing; use --aug none")
        if int(size) < 1:
            raise ConfigError(f"image size must be >= 1, not {size}")
        self.size = int(size)
        self.interpolation = interpolation
        self.aug = aug
        self.hflip = bool(hflip)
        self._seed_aug = SeedAugment(shear=shear, zoom=zoom, hflip=hflip) if aug == "seed" else None
        # Bilinear for the policies' geometric ops (torchvision's default is nearest), as timm uses.
        self._policy: v2.Transform | None = None
        if aug == "randaugment":
            self._policy = v2.RandAugment(num_ops=ra_num_ops, magnitude=ra_magnitude, interpolation="bilinear")
        elif aug == "trivialaugment":
            self._policy = v2.TrivialAugmentWide(interpolation="bilinear")
        self.ra_num_ops = int(ra_num_ops)
        self.ra_magnitude = int(ra_magnitude)

    @property
    def random_augmentation(self) -> bool:
        """True when two passes over a sample give different pixels, so features cannot be cached."""
        return self.aug != "none"

    def __repr__(self) -> str:
        extra = ""
        if self._seed_aug is not None:
            extra = f", shear={self._seed_aug.shear}, zoom={self._seed_aug.zoom}"
        elif self.aug == "randaugment":
            extra = f", ra_num_ops={self.ra_num_ops}, ra_magnitude={self.ra_magnitude}"
        return (
            f"TrainTransform(size={self.size}, interpolation={self.interpolation!r}, aug={self.aug!r}, "
            f"hflip={self.hflip}{extra})"
        )

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> torch.Tensor:
        if img.mode != "RGB":
            img = img.convert("RGB")
        if img.size != (self.size, self.size):
            img = img.resize((self.size, self.size), _PIL_INTERP[self.interpolation])
        if self.aug == "flip":
            if rng.random() < 0.5:
                img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        elif self._seed_aug is not None:
            img = self._seed_aug(img, rng)
        elif self._policy is not None:
            flip = rng.random() < 0.5
            torch_seed = int(rng.integers(0, _INT63_MAX))
            if self.hflip and flip:
                img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            with torch.random.fork_rng(devices=[]):
                torch.default_generator.manual_seed(torch_seed)
                img = self._policy(img)
        arr = np.asarray(img, dtype=np.uint8)
        return torch.from_numpy(arr.copy()).permute(2, 0, 1)


class EvalAsTrain:
    """An eval transform in the training transform's ``(img, rng)`` signature (runs without augmentation).

    Without augmentation a model trains on exactly the images it is evaluated on (and that the feature
    cache computes), crop policy included; the per-sample generator is ignored.
    """

    random_augmentation = False

    def __init__(self, eval_transform: Any) -> None:
        self.eval_transform = eval_transform

    def __repr__(self) -> str:
        return f"EvalAsTrain({self.eval_transform!r})"

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> torch.Tensor:
        return self.eval_transform(img)


# --------------------------------------------------------------------------------------------------------------------
# Batch mixing


def _smoothed_one_hot(y: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    """timm's convention: the smoothing mass is spread over all classes, the true one included.

    float32 whatever the image dtype: targets from a bf16 batch would not sum to 1 to useful precision.
    """
    off = smoothing / num_classes
    out = torch.full((y.shape[0], num_classes), off, dtype=torch.float32, device=y.device)
    return out.scatter_(1, y.view(-1, 1), 1.0 - smoothing + off)


def _cutmix_box(lam: float, h: int, w: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """A box of area ~ (1 - lam) * h * w at a uniform centre, clipped to the image (so maybe smaller)."""
    cut = math.sqrt(1.0 - lam)
    ch, cw = int(h * cut), int(w * cut)
    cy, cx = int(rng.integers(0, h)), int(rng.integers(0, w))
    y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, h)
    x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, w)
    return y0, y1, x0, x1


def mix_batch(
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    *,
    mixup_alpha: float,
    cutmix_alpha: float,
    prob: float = 1.0,
    switch_prob: float = 0.5,
    label_smoothing: float = 0.0,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixup or CutMix a whole batch; returns (images, soft targets of shape (B, num_classes)).

    Like timm's ``Mixup`` in ``mode="batch"``: sample ``i`` is mixed with sample ``B - 1 - i`` (the batch
    flipped, so no permutation needs to be drawn or stored) with one lambda for the batch. With
    probability ``prob`` the batch is mixed at all; when both alphas are > 0, CutMix is chosen with
    ``switch_prob``, else whichever alpha is > 0. For CutMix lambda is recomputed from the pasted box
    after clipping it to the image, so the targets match the pixels. Targets are label-smoothed one-hots
    combined with the same lambda, so every row sums to 1.

    All randomness comes from ``generator`` (one 63-bit draw that seeds a numpy Generator, because
    ``torch.distributions.Beta`` cannot take a generator); the result is a pure function of its state.
    When nothing is mixed, ``x`` itself is returned (not a copy). Inputs are not modified.
    """
    if not x.is_floating_point() or x.ndim != 4:
        raise ValueError(f"mix_batch needs a float (B, C, H, W) batch, got {tuple(x.shape)} {x.dtype}")
    if y.ndim != 1 or y.shape[0] != x.shape[0] or y.dtype != torch.long:
        raise ValueError(f"mix_batch needs int64 labels of shape ({x.shape[0]},), got {tuple(y.shape)} {y.dtype}")
    if mixup_alpha < 0 or cutmix_alpha < 0:
        raise ValueError(f"mixup/cutmix alphas must be >= 0, got {mixup_alpha}, {cutmix_alpha}")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), not {label_smoothing}")

    draw = torch.randint(0, _INT63_MAX, (1,), generator=generator, device=generator.device)
    rng = np.random.default_rng(int(draw.item()))

    target = _smoothed_one_hot(y, num_classes, label_smoothing)
    do_mix = (mixup_alpha > 0 or cutmix_alpha > 0) and rng.random() < prob
    if not do_mix:
        return x, target

    use_cutmix = cutmix_alpha > 0 and (mixup_alpha <= 0 or rng.random() < switch_prob)
    lam = float(rng.beta(cutmix_alpha, cutmix_alpha) if use_cutmix else rng.beta(mixup_alpha, mixup_alpha))
    x_pair = x.flip(0)
    if use_cutmix:
        h, w = x.shape[-2:]
        y0, y1, x0, x1 = _cutmix_box(lam, h, w, rng)
        mixed = x.clone()
        mixed[:, :, y0:y1, x0:x1] = x_pair[:, :, y0:y1, x0:x1]
        lam = 1.0 - (y1 - y0) * (x1 - x0) / float(h * w)
    else:
        mixed = x * lam + x_pair * (1.0 - lam)
    return mixed, target * lam + target.flip(0) * (1.0 - lam)


def soft_cross_entropy(logits: torch.Tensor, soft_targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy against probability targets, computed in float32.

    float32 because the logits may come out of a bf16/fp16 autocast region, where log-softmax over
    hundreds of classes loses too much precision.
    """
    if logits.shape != soft_targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(soft_targets.shape)} differ in shape")
    loss = -(soft_targets.float() * F.log_softmax(logits.float(), dim=-1)).sum(dim=-1)
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    if reduction == "none":
        return loss
    raise ValueError(f"reduction must be mean, sum or none, not {reduction!r}")
