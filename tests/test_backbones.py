"""Model names, the backbone listing, the ImageNet label map and Preprocessing. All offline and fast."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import timm
from timm.data import ImageNetInfo

from transferlab.errors import ConfigError, DataError
from transferlab.labels import imagenet_indices, imagenet_synsets, is_imagenet_subset
from transferlab.models.backbones import Backbone, check_model_name, create_backbone, list_backbones
from transferlab.models.preprocessing import IMAGENET_MEAN, IMAGENET_STD, Preprocessing

# --------------------------------------------------------------------------------------------------
# check_model_name


@pytest.mark.parametrize("name", ["resnet50", "resnet50.a1_in1k", "tf_efficientnet_lite0", "test_resnet"])
def test_check_model_name_accepts_timm_names(name: str) -> None:
    check_model_name(name)


@pytest.mark.parametrize("typo", ["resnet5O", "resnt50", "resnet50x"])
def test_check_model_name_suggests(typo: str) -> None:
    with pytest.raises(ConfigError) as ei:
        check_model_name(typo)
    msg = str(ei.value)
    assert repr(typo) in msg
    assert "did you mean" in msg
    suggestions = msg.split("did you mean", 1)[1]
    assert "resnet50" in [s.strip(" ?,") for s in suggestions.split(",")]


def test_check_model_name_with_tag_typo() -> None:
    with pytest.raises(ConfigError, match=r"did you mean.*resnet50"):
        check_model_name("resnt50.a1_in1k")


def test_check_model_name_without_close_match_points_to_listing() -> None:
    with pytest.raises(ConfigError) as ei:
        check_model_name("qqqqzzzz")
    assert "did you mean" not in str(ei.value)
    assert "transferlab models" in str(ei.value)


def test_create_backbone_checks_the_name_first() -> None:
    with pytest.raises(ConfigError, match="resnet50"):
        create_backbone("resnt50", "none")


# --------------------------------------------------------------------------------------------------
# list_backbones


def test_list_backbones_marks_packaged_lites() -> None:
    rows = dict(list_backbones("tf_efficientnet_lite*"))
    assert set(rows) == set(timm.list_models("tf_efficientnet_lite*"))
    for n in ("tf_efficientnet_lite0", "tf_efficientnet_lite1", "tf_efficientnet_lite2"):
        assert rows[n] == "package"
    for n in ("tf_efficientnet_lite3", "tf_efficientnet_lite4"):
        assert rows[n] != "package"


def test_list_backbones_pattern_filters() -> None:
    rows = list_backbones("resnet5*")
    names = [n for n, _ in rows]
    assert "resnet50" in names
    assert all(n.startswith("resnet5") for n in names)
    assert all(avail in ("", "hub-cache") for _, avail in rows)


# --------------------------------------------------------------------------------------------------
# create_backbone("none") and Backbone


def test_random_init_backbone() -> None:
    b = create_backbone("test_resnet", "none")
    assert b.weights == "random init"
    assert b.class_ids is None
    assert b.has_imagenet_head is False
    assert b.num_classes == 1000
    assert b.preprocessing == Preprocessing.from_timm(b.model.pretrained_cfg)


def test_has_imagenet_head_needs_the_exact_synset_order() -> None:
    model = timm.create_model("test_resnet", pretrained=False)
    pre = Preprocessing()
    syn = imagenet_synsets()
    assert Backbone(model, "m", "w", pre, syn).has_imagenet_head
    assert not Backbone(model, "m", "w", pre, syn[::-1]).has_imagenet_head
    assert not Backbone(model, "m", "w", pre, syn[:10]).has_imagenet_head
    assert not Backbone(model, "m", "w", pre, None).has_imagenet_head


# --------------------------------------------------------------------------------------------------
# imagenet


def test_imagenet_synsets_match_timm() -> None:
    syn = imagenet_synsets()
    assert isinstance(syn, tuple)
    assert len(syn) == 1000
    assert len(set(syn)) == 1000
    assert all(s.startswith("n") and len(s) == 9 and s[1:].isdigit() for s in syn)
    assert list(syn) == list(ImageNetInfo("imagenet-1k").label_names())
    assert syn[0] == "n01440764" and syn[-1] == "n15075141"  # tench ... toilet tissue


def test_is_imagenet_subset() -> None:
    assert is_imagenet_subset(["n01443537", "n02124075"])
    assert is_imagenet_subset(list(imagenet_synsets()))
    assert not is_imagenet_subset(["n01443537", "n99999999"])
    assert not is_imagenet_subset(["airplane", "cat"])
    assert not is_imagenet_subset([])


def test_imagenet_indices() -> None:
    syn = imagenet_synsets()
    ids = [syn[7], syn[0], syn[999]]
    idx = imagenet_indices(ids)
    assert idx.dtype == np.int64
    assert idx.tolist() == [7, 0, 999]


def test_imagenet_indices_names_the_foreign_class() -> None:
    with pytest.raises(DataError) as ei:
        imagenet_indices(["n01443537", "n99999999", "cat"])
    msg = str(ei.value)
    assert "n99999999" in msg and "cat" in msg
    assert "2 of 3" in msg
    assert "n01443537" not in msg


# --------------------------------------------------------------------------------------------------
# Preprocessing


def test_preprocessing_defaults() -> None:
    p = Preprocessing()
    assert (p.input_size, p.interpolation, p.crop_pct) == (224, "bicubic", 0.875)
    assert p.mean == IMAGENET_MEAN and p.std == IMAGENET_STD


def test_from_timm_pretrained_cfg_object_and_dict() -> None:
    cfg = timm.models.get_pretrained_cfg("tf_efficientnet_lite2")
    p = Preprocessing.from_timm(cfg)
    assert p.input_size == cfg.input_size[-1] == 260
    assert p.interpolation == cfg.interpolation
    assert p.mean == tuple(cfg.mean) == (0.5, 0.5, 0.5)
    assert p.std == tuple(cfg.std)
    assert math.isclose(p.crop_pct, cfg.crop_pct)
    assert Preprocessing.from_timm(cfg.to_dict()) == p

    r50 = timm.create_model("resnet50", pretrained=False).pretrained_cfg  # a dict
    q = Preprocessing.from_timm(r50)
    assert (q.input_size, q.interpolation, q.crop_pct) == (224, "bicubic", 0.95)
    assert q.mean == IMAGENET_MEAN


def test_from_timm_fallbacks() -> None:
    assert Preprocessing.from_timm({}) == Preprocessing()
    p = Preprocessing.from_timm({"input_size": (3, 96, 96), "interpolation": "lanczos", "crop_pct": None})
    assert (p.input_size, p.interpolation, p.crop_pct) == (96, "bicubic", 0.875)


def test_to_dict_from_dict_round_trip() -> None:
    p = Preprocessing(input_size=160, interpolation="bilinear", mean=(0.1, 0.2, 0.3), std=(0.4, 0.5, 0.6), crop_pct=1)
    d = p.to_dict()
    assert d == {
        "input_size": 160,
        "interpolation": "bilinear",
        "mean": [0.1, 0.2, 0.3],
        "std": [0.4, 0.5, 0.6],
        "crop_pct": 1.0,
    }
    back = Preprocessing.from_dict(json.loads(json.dumps(d)))
    assert back == p
    assert isinstance(back.mean, tuple) and isinstance(back.std, tuple)
    assert hash(back) == hash(p)
    assert Preprocessing.from_dict({}) == Preprocessing()


def test_lists_are_normalised_to_tuples() -> None:
    p = Preprocessing(mean=[0.1, 0.2, 0.3], std=[1, 1, 1])  # type: ignore[arg-type]
    assert p.mean == (0.1, 0.2, 0.3) and p.std == (1.0, 1.0, 1.0)
    assert p == Preprocessing(mean=(0.1, 0.2, 0.3), std=(1.0, 1.0, 1.0))
    hash(p)


@pytest.mark.parametrize(
    "kw",
    [
        {"input_size": 4},
        {"input_size": 0},
        {"input_size": 224.5},
        {"input_size": "224"},
        {"input_size": True},
        {"interpolation": "lanczos"},
        {"crop_pct": 0.0},
        {"crop_pct": 1.5},
        {"crop_pct": float("nan")},
        {"crop_pct": "big"},
        {"mean": (0.5, 0.5)},
        {"std": (0.5, 0.5, 0.5, 0.5)},
        {"std": (0.5, 0.0, 0.5)},
        {"std": (0.5, -1.0, 0.5)},
        {"std": (float("nan"), 1.0, 1.0)},
        {"mean": (float("inf"), 0.0, 0.0)},
        {"mean": ("a", "b", "c")},
        {"mean": None},
    ],
)
def test_invalid_values_raise_value_error(kw: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        Preprocessing(**kw)  # type: ignore[arg-type]
    d = {**Preprocessing().to_dict(), **kw}
    with pytest.raises(ValueError):
        Preprocessing.from_dict(d)


def test_from_dict_rejects_unknown_keys() -> None:
    with pytest.raises(ValueError, match=r"unknown preprocessing keys.*size"):
        Preprocessing.from_dict({"size": 224})
