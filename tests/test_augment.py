"""Per-sample seeded augmentation: determinism by (seed, epoch, index), geometry, and batch mixing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from transferlab.data.augment import (
    AUG_MODES,
    AffineParams,
    SeedAugment,
    TrainTransform,
    mix_batch,
    sample_rng,
    sample_seed,
    soft_cross_entropy,
)
from transferlab.errors import ConfigError


def noise_image(size: int = 64, seed: int = 0) -> Image.Image:
    """A textured RGB image: any geometric change shows up in the pixels."""
    arr = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return Image.fromarray(arr, "RGB")


def square_image(size: int = 64, half: int = 8) -> Image.Image:
    """Black image with a white square of side 2*half centred on the image."""
    arr = np.zeros((size, size), dtype=np.uint8)
    c = size // 2
    arr[c - half : c + half, c - half : c + half] = 255
    return Image.fromarray(arr, "L")


def extent(img: Image.Image, axis: int) -> int:
    """Number of rows (axis=0) or columns (axis=1) where the bright square is present."""
    arr = np.asarray(img) > 127
    return int(arr.any(axis=1 - axis).sum())


# ---------------------------------------------------------------------------------------------------------------------
# sample_rng / sample_seed


def test_sample_rng_is_keyed_by_seed_epoch_index() -> None:
    a = sample_rng(3, 1, 7).random(8)
    assert np.array_equal(a, sample_rng(3, 1, 7).random(8))
    assert not np.array_equal(a, sample_rng(3, 1, 8).random(8))
    assert not np.array_equal(a, sample_rng(3, 2, 7).random(8))
    assert not np.array_equal(a, sample_rng(4, 1, 7).random(8))


def test_sample_seed_is_63_bit_and_keyed() -> None:
    s = sample_seed(0, 0, 0)
    assert s == sample_seed(0, 0, 0)
    assert 0 <= s < 2**63
    assert len({sample_seed(0, e, i) for e in range(3) for i in range(50)}) == 150
    torch.manual_seed(s)  # valid as a torch seed


def test_negative_key_is_refused() -> None:
    with pytest.raises(ValueError, match="index"):
        sample_rng(0, 0, -1)


# ---------------------------------------------------------------------------------------------------------------------
# SeedAugment


def test_seed_augment_without_shear_zoom_flip_is_identity() -> None:
    img = noise_image()
    aug = SeedAugment(shear=0.0, zoom=0.0, hflip=False)
    for i in range(5):
        out = aug(img, sample_rng(0, 0, i))
        assert out.size == img.size and out.mode == img.mode
        assert np.array_equal(np.asarray(out), np.asarray(img))


def test_identity_params_through_the_warp_path_are_exact() -> None:
    """The resampler itself must not blur: a 0-degree shear with unit zoom reproduces the pixels."""
    from transferlab.data.augment import _warp_edge

    arr = np.asarray(noise_image())
    assert np.array_equal(_warp_edge(arr, 0.0, 1.0, 1.0), arr)


def test_flip_only_mirrors_when_the_rng_says_flip() -> None:
    img = noise_image()
    src = np.asarray(img)
    aug = SeedAugment(shear=0.0, zoom=0.0, hflip=True)
    seen = set()
    for i in range(20):
        params = aug.sample_params(sample_rng(0, 0, i))
        out = np.asarray(aug(img, sample_rng(0, 0, i)))
        expected = src[:, ::-1] if params.flip else src
        assert np.array_equal(out, expected)
        seen.add(params.flip)
    assert seen == {True, False}


def test_zoom_above_one_enlarges_a_centred_square() -> None:
    img = square_image(64, half=8)  # 16 px square
    aug = SeedAugment()
    assert (extent(img, 0), extent(img, 1)) == (16, 16)
    big = aug.apply(img, AffineParams(zx=1.5, zy=1.0))
    assert extent(big, 1) == 24  # columns: 16 * 1.5
    assert extent(big, 0) == 16  # rows unchanged: zy = 1
    small = aug.apply(img, AffineParams(zx=0.5, zy=0.5))
    assert (extent(small, 0), extent(small, 1)) == (8, 8)
    # Edge replication: zooming out of a uniform-border image leaves no new colours at the border.
    assert np.asarray(small)[0].max() == 0


def test_zoom_out_replicates_edges() -> None:
    arr = np.zeros((32, 32, 3), dtype=np.uint8)
    arr[:, 0] = (200, 10, 10)  # red left column
    out = np.asarray(SeedAugment().apply(Image.fromarray(arr), AffineParams(zx=0.5, zy=0.5)))
    # The left quarter now lies outside the shrunk source and repeats its edge column, not black.
    assert (out[:, :7] == (200, 10, 10)).all()


def test_shear_moves_top_and_bottom_rows_opposite_ways() -> None:
    img = square_image(64, half=16)
    out = np.asarray(SeedAugment().apply(img, AffineParams(shear=20.0))) > 127
    top_cols = np.flatnonzero(out[17])
    bottom_cols = np.flatnonzero(out[46])
    assert top_cols.mean() < 31.5 < bottom_cols.mean()


def test_seed_augment_is_deterministic_per_key_and_keeps_size() -> None:
    img = noise_image(48)
    aug = SeedAugment(shear=10.0, zoom=0.2)
    a = np.asarray(aug(img, sample_rng(1, 0, 5)))
    assert a.shape == (48, 48, 3) and a.dtype == np.uint8
    assert np.array_equal(a, np.asarray(aug(img, sample_rng(1, 0, 5))))
    assert not np.array_equal(a, np.asarray(aug(img, sample_rng(1, 0, 6))))


# ---------------------------------------------------------------------------------------------------------------------
# TrainTransform


@pytest.mark.parametrize("aug", AUG_MODES)
def test_train_transform_shape_dtype(aug: str) -> None:
    out = TrainTransform(224, aug=aug)(noise_image(64), sample_rng(0, 0, 0))
    assert out.shape == (3, 224, 224) and out.dtype == torch.uint8
    assert TrainTransform(224, aug=aug).random_augmentation == (aug != "none")


def test_train_transform_none_matches_eval_transform_without_crop() -> None:
    from transferlab.data.transforms import EvalTransform

    img = noise_image(64)
    out = TrainTransform(96, aug="none")(img, sample_rng(0, 0, 0))
    ref = EvalTransform(96, interpolation="bilinear", crop="none")(img)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("aug", ["flip", "seed", "randaugment", "trivialaugment"])
def test_train_transform_deterministic_per_key(aug: str) -> None:
    t = TrainTransform(64, aug=aug)
    img = noise_image(64)
    a = t(img, sample_rng(0, 0, 1))
    assert torch.equal(a, t(img, sample_rng(0, 0, 1)))
    # Over a few keys some output must differ (a single pair may coincide, e.g. both unflipped).
    outs = [t(img, sample_rng(0, e, i)) for e in range(2) for i in range(4)]
    assert any(not torch.equal(outs[0], o) for o in outs[1:])


@pytest.mark.parametrize("aug", ["randaugment", "trivialaugment"])
def test_policies_ignore_and_preserve_the_global_torch_rng(aug: str) -> None:
    t = TrainTransform(64, aug=aug, hflip=False)
    img = noise_image(64)
    torch.manual_seed(123)
    a = t(img, sample_rng(5, 0, 0))
    after_a = torch.rand(3)
    torch.manual_seed(999)
    b = t(img, sample_rng(5, 0, 0))
    torch.manual_seed(123)
    assert torch.equal(a, b)  # global state did not leak in
    assert torch.equal(after_a, torch.rand(3))  # nor was it consumed
    outs = {t(img, sample_rng(s, 0, 0)).numpy().tobytes() for s in range(6)}
    assert len(outs) > 1  # different seeds give different policies/magnitudes


def test_invalid_aug_names_the_option() -> None:
    with pytest.raises(ConfigError, match=r"--aug.*randaugment"):
        TrainTransform(224, aug="autoaugment")
    with pytest.raises(ConfigError, match="--interpolation"):
        TrainTransform(224, interpolation="lanczos")
    with pytest.raises(ConfigError, match="--aug"):
        TrainTransform(224, aug="flip", hflip=False)


class _AugDataset(Dataset):
    """Module-level (picklable) dataset whose augmentation is keyed by (seed, epoch, index) only."""

    def __init__(self, aug: str, epoch: int) -> None:
        self.transform = TrainTransform(32, aug=aug)
        self.images = [noise_image(24, seed=i) for i in range(8)]
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, idx: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.images[idx], sample_rng(7, self.epoch, idx)), idx


def _load(aug: str, epoch: int, workers: int) -> list[torch.Tensor]:
    loader = DataLoader(_AugDataset(aug, epoch), batch_size=3, shuffle=False, num_workers=workers)
    return [x for x, _ in loader]


@pytest.mark.parametrize("aug", ["seed", "randaugment"])
def test_dataloader_worker_count_does_not_change_augmentation(aug: str) -> None:
    single = _load(aug, epoch=0, workers=0)
    multi = _load(aug, epoch=0, workers=2)
    assert len(single) == len(multi) == 3
    for a, b in zip(single, multi, strict=True):
        assert torch.equal(a, b)
    other_epoch = _load(aug, epoch=1, workers=0)
    assert any(not torch.equal(a, b) for a, b in zip(single, other_epoch, strict=True))


# ---------------------------------------------------------------------------------------------------------------------
# mix_batch / soft_cross_entropy


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _batch(b: int = 6, size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    # Each sample constant-valued with its own index, so pasted pixels can be traced to their source.
    x = torch.arange(b, dtype=torch.float32).view(b, 1, 1, 1).expand(b, 3, size, size).contiguous()
    y = torch.arange(b, dtype=torch.long)
    return x, y


@pytest.mark.parametrize("mixup,cutmix", [(0.2, 0.0), (0.0, 1.0), (0.8, 1.0)])
def test_mix_targets_sum_to_one(mixup: float, cutmix: float) -> None:
    x, y = _batch()
    for s in range(10):
        mixed, t = mix_batch(x, y, 10, mixup_alpha=mixup, cutmix_alpha=cutmix, label_smoothing=0.1, generator=_gen(s))
        assert mixed.shape == x.shape and t.shape == (6, 10)
        assert torch.allclose(t.sum(1), torch.ones(6))
        assert (t >= 0).all()


@pytest.mark.parametrize("mixup,cutmix,prob", [(0.0, 0.0, 1.0), (0.4, 1.0, 0.0)])
def test_no_mixing_returns_inputs_and_one_hot(mixup: float, cutmix: float, prob: float) -> None:
    x, y = _batch()
    mixed, t = mix_batch(x, y, 8, mixup_alpha=mixup, cutmix_alpha=cutmix, prob=prob, generator=_gen(0))
    assert torch.equal(mixed, x)
    assert torch.equal(t, F.one_hot(y, 8).float())
    _, ts = mix_batch(
        x, y, 8, mixup_alpha=mixup, cutmix_alpha=cutmix, prob=prob, label_smoothing=0.2, generator=_gen(0)
    )
    expected = torch.full((6, 8), 0.2 / 8)
    expected[torch.arange(6), y] = 1 - 0.2 + 0.2 / 8
    assert torch.allclose(ts, expected)


def test_mix_is_a_pure_function_of_the_generator() -> None:
    x = torch.randn(8, 3, 16, 16, generator=_gen(99))
    y = torch.randint(0, 5, (8,), generator=_gen(98))
    kw = {"mixup_alpha": 0.8, "cutmix_alpha": 1.0}
    a = mix_batch(x, y, 5, generator=_gen(1), **kw)
    b = mix_batch(x, y, 5, generator=_gen(1), **kw)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    others = [mix_batch(x, y, 5, generator=_gen(s), **kw) for s in range(2, 6)]
    assert any(not torch.equal(a[0], o[0]) for o in others)


def test_mixup_blends_with_the_flipped_batch() -> None:
    x, y = _batch(4)
    mixed, t = mix_batch(x, y, 4, mixup_alpha=0.4, cutmix_alpha=0.0, generator=_gen(3))
    lam = float(t[0, 0])
    assert 0.0 < lam < 1.0
    for i in range(4):
        partner = 3 - i
        assert torch.allclose(mixed[i], torch.full_like(mixed[i], lam * i + (1 - lam) * partner))
        assert torch.isclose(t[i, partner], torch.tensor(1 - lam))


def test_cutmix_lambda_is_the_unpasted_area_fraction() -> None:
    x, y = _batch(4, size=20)
    checked = 0
    for s in range(20):
        mixed, t = mix_batch(x, y, 4, mixup_alpha=0.0, cutmix_alpha=1.0, generator=_gen(s))
        for i in range(4):
            partner = 3 - i
            own = (mixed[i, 0] == i).float().mean()
            lam = t[i, i]
            assert torch.isclose(lam, own, atol=1e-6)
            assert torch.isclose(t[i, partner], 1 - own, atol=1e-6)
            assert torch.equal(mixed[i][mixed[i] != i], torch.full_like(mixed[i][mixed[i] != i], float(partner)))
        checked += bool(0 < float(t[0, 0]) < 1)
    assert checked > 0  # some draws actually pasted a box


def test_mix_validates_inputs() -> None:
    x, y = _batch()
    with pytest.raises(ValueError, match="float"):
        mix_batch(x.to(torch.uint8), y, 6, mixup_alpha=0.2, cutmix_alpha=0.0, generator=_gen(0))
    with pytest.raises(ValueError, match="int64"):
        mix_batch(x, y.int(), 6, mixup_alpha=0.2, cutmix_alpha=0.0, generator=_gen(0))


def test_soft_cross_entropy_matches_cross_entropy_on_one_hot() -> None:
    logits = torch.randn(7, 11, generator=_gen(0))
    y = torch.randint(0, 11, (7,), generator=_gen(1))
    one_hot = F.one_hot(y, 11).float()
    assert torch.allclose(soft_cross_entropy(logits, one_hot), F.cross_entropy(logits, y), atol=1e-6)
    assert torch.allclose(
        soft_cross_entropy(logits, one_hot, reduction="none"), F.cross_entropy(logits, y, reduction="none"), atol=1e-6
    )
    smooth = one_hot * 0.9 + 0.1 / 11
    assert torch.allclose(
        soft_cross_entropy(logits, smooth), F.cross_entropy(logits, y, label_smoothing=0.1), atol=1e-6
    )
