"""The engine's OpenVINO backend: the same outputs as torch, a checked fallback, a conversion cache that is
never trusted when damaged and whose key follows the weights; ``--backend torch`` is the engine as it was."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

from transferlab.data import ArraySplit, ClassInfo
from transferlab.data.transforms import EvalTransform
from transferlab.errors import ConfigError
from transferlab.inference import openvino as ovb
from transferlab.inference.engine import model_outputs
from transferlab.inference.features import mirrored, pre_logits
from transferlab.inference.tta import tta_forward
from transferlab.runtime import Precision

needs_openvino = pytest.mark.skipif(
    ovb.openvino_version() is None, reason="openvino is not importable here (pip install openvino)"
)
CPU = torch.device("cpu")
FP32 = Precision(dtype=None, channels_last=False, device_type="cpu")
BF16_CL = Precision(dtype=torch.bfloat16, channels_last=True, device_type="cpu")
MEAN, STD = (0.5,) * 3, (0.25,) * 3


@pytest.fixture(scope="module")
def net() -> torch.nn.Module:
    """timm's tiny test_resnet with a random 1000-class head and non-trivial BatchNorm statistics."""
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", pretrained=False, num_classes=1000).eval()
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model


@pytest.fixture(scope="module")
def split() -> ArraySplit:
    """20 smooth random 32px images (a pixel array: the engine's batched path), resized to 64 for the model."""
    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, (20, 8, 8, 3)).astype(np.float32)
    images = np.kron(small, np.ones((1, 4, 4, 1), dtype=np.float32)).astype(np.uint8)
    return ArraySplit("val", images, [i % 2 for i in range(20)], ClassInfo(("a", "b"), ("a", "b")))


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("TRANSFERLAB_CACHE", str(tmp_path))
    return tmp_path / "openvino"


def _run(net, split, backend: str, precision: Precision = FP32, **kw):  # type: ignore[no-untyped-def]
    info: dict = {}
    out = model_outputs(
        net,
        split,
        EvalTransform(64, "bilinear", 0.875, "auto"),
        mean=MEAN,
        std=STD,
        indices=np.arange(len(split)),
        precision=precision,
        device=CPU,
        batch_size=8,
        workers=0,
        backend=backend,
        info=info,
        **kw,
    )
    return out, info


@needs_openvino
def test_openvino_gives_torchs_outputs_in_fp32(net, split, cache) -> None:
    ref, info_t = _run(net, split, "torch")
    out, info = _run(net, split, "openvino")
    assert info_t["backend"] == "torch" and info["backend"] == "openvino"
    assert info["conversion"] == "converted" and info["check_images"] == ovb.CHECK_IMAGES
    assert out.shape == ref.shape == (20, 1000)
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=1e-4)
    again, info2 = _run(net, split, "auto")  # auto picks OpenVINO on a CPU where it is installed
    assert info2["backend"] == "openvino" and info2["conversion"] == "cache hit"
    np.testing.assert_array_equal(again, out)


@needs_openvino
def test_openvino_bf16_channels_last_passes_its_check(net, split, cache) -> None:
    ref, _ = _run(net, split, "torch", FP32)
    out, info = _run(net, split, "openvino", BF16_CL)
    assert info["backend"] == "openvino" and info["precision"] == "bf16"
    assert info["check_error"] <= info["check_tolerance"]
    assert (out.argmax(1) == ref.argmax(1)).mean() >= 0.9


@needs_openvino
def test_feature_forward_and_tta_run_in_openvino(net, split, cache) -> None:
    feats_t, _ = _run(net, split, "torch", forward=pre_logits)
    feats, info = _run(net, split, "openvino", forward=pre_logits)
    assert info["backend"] == "openvino" and feats.shape == feats_t.shape
    np.testing.assert_allclose(feats, feats_t, atol=1e-4, rtol=1e-4)
    tta = tta_forward("flip", np.array([3, 7]))
    lp_t, _ = _run(net, split, "torch", forward=tta)
    lp, info = _run(net, split, "openvino", forward=tta)  # TTA runs around the converted logits model
    assert info["backend"] == "openvino" and lp.shape == (20, 2)
    np.testing.assert_allclose(lp, lp_t, atol=1e-4, rtol=1e-4)


@needs_openvino
def test_mirrored_features_run_in_openvino(net, split, cache) -> None:
    """The probe's flipped pass converts the plain feature forward and flips each batch before it runs."""
    feats_t, _ = _run(net, split, "torch", forward=mirrored(pre_logits))
    feats, info = _run(net, split, "openvino", forward=mirrored(pre_logits))
    assert info["backend"] == "openvino"
    np.testing.assert_allclose(feats, feats_t, atol=1e-4, rtol=1e-4)
    plain, _ = _run(net, split, "openvino", forward=pre_logits)
    assert np.abs(plain - feats).max() > 1e-3  # the images were mirrored, not passed through


@needs_openvino
def test_a_mismatch_drops_openvino_and_torch_runs(net, split, cache, monkeypatch, caplog) -> None:
    ref, _ = _run(net, split, "torch")
    real = ovb.OpenVinoRunner.__call__
    monkeypatch.setattr(ovb.OpenVinoRunner, "__call__", lambda self, x: real(self, x) + 0.5)
    with caplog.at_level(logging.WARNING, logger="transferlab.inference.openvino"):
        out, info = _run(net, split, "openvino")
    assert "differs from PyTorch" in caplog.text and "running it in torch" in caplog.text
    assert info["backend"] == "torch"
    np.testing.assert_array_equal(out, ref)  # exactly the torch backend's numbers


@needs_openvino
def test_a_conversion_error_falls_back_to_torch(net, split, cache, monkeypatch, caplog) -> None:
    ref, _ = _run(net, split, "torch")

    def broken(*_a, **_k):  # type: ignore[no-untyped-def]
        raise RuntimeError("no such op")

    monkeypatch.setattr(ovb, "_convert", broken)
    with caplog.at_level(logging.WARNING, logger="transferlab.inference.openvino"):
        out, info = _run(net, split, "auto")
    assert "could not convert" in caplog.text and info["backend"] == "torch"
    np.testing.assert_array_equal(out, ref)


@needs_openvino
@pytest.mark.parametrize("damage", ["bin", "entry"])
def test_a_damaged_cache_entry_is_rebuilt(net, split, cache, caplog, damage) -> None:
    first, info = _run(net, split, "openvino")
    entry = Path(info["entry"])
    assert entry.parent == cache and info["conversion"] == "converted"
    if damage == "bin":  # same size, one weight's bytes changed: only the digest notices
        data = bytearray((entry / "model.bin").read_bytes())
        data[len(data) // 2 : len(data) // 2 + 8] = b"\x7f" * 8
        (entry / "model.bin").write_bytes(bytes(data))
    else:  # a truncated entry.json (a crash can't leave one: it is written atomically; a disk fault can)
        (entry / "entry.json").write_text("{")
    with caplog.at_level(logging.WARNING, logger="transferlab.inference.openvino"):
        out, info2 = _run(net, split, "openvino")
    assert "is damaged" in caplog.text and "rebuilding it" in caplog.text
    assert info2["backend"] == "openvino" and info2["conversion"] == "converted"
    np.testing.assert_array_equal(out, first)
    _, info3 = _run(net, split, "openvino")
    assert info3["conversion"] == "cache hit"
    assert [p.name for p in cache.iterdir()] == [entry.name]  # no temporary or moved-aside folders left


def test_the_key_follows_every_weight_and_the_setup(net) -> None:
    key = ovb.conversion_key(net, "logits", 64, FP32)
    assert ovb.conversion_key(net, "logits", 64, FP32) == key
    changed = timm.create_model("test_resnet", pretrained=False, num_classes=1000).eval()
    changed.load_state_dict(net.state_dict())
    assert ovb.conversion_key(changed, "logits", 64, FP32).digest() == key.digest()
    with torch.no_grad():
        buf = dict(changed.named_buffers())["bn1.running_var"]
        buf[0] += 1e-3  # one element of one buffer
    assert ovb.conversion_key(changed, "logits", 64, FP32).digest() != key.digest()
    with torch.no_grad():
        changed.load_state_dict(net.state_dict())
        next(changed.parameters()).view(-1)[0] += 1e-6  # one element of one weight
    assert ovb.conversion_key(changed, "logits", 64, FP32).digest() != key.digest()
    assert ovb.conversion_key(net, "logits", 96, FP32).digest() != key.digest()
    assert ovb.conversion_key(net, "logits", 64, BF16_CL).digest() != key.digest()
    assert ovb.conversion_key(net, "x.pre_logits", 64, FP32).digest() != key.digest()
    other = timm.create_model("test_resnet", pretrained=False, num_classes=10).eval()
    assert ovb.architecture(other) != ovb.architecture(net)


def test_torch_backend_never_touches_openvino(net, split, cache, monkeypatch) -> None:
    default = model_outputs(
        net,
        split,
        EvalTransform(64, "bilinear", 0.875, "auto"),
        mean=MEAN,
        std=STD,
        indices=np.arange(len(split)),
        precision=FP32,
        device=CPU,
        batch_size=8,
        workers=0,
    )

    def no(*_a, **_k):  # type: ignore[no-untyped-def]
        raise AssertionError("the torch backend must not convert anything")

    monkeypatch.setattr(ovb, "openvino_runner", no)
    monkeypatch.setattr("transferlab.inference.engine.openvino_runner", no)
    out, info = _run(net, split, "torch")
    assert info == {"backend": "torch", "precision": "fp32", "streams": 2}
    np.testing.assert_array_equal(out, default)
    assert not cache.exists()


def test_backend_choice(monkeypatch) -> None:
    assert ovb.resolve_backend("torch", CPU) == "torch"
    assert ovb.resolve_backend("auto", torch.device("cuda")) == "torch"  # GPUs stay on torch
    assert ovb.resolve_backend("openvino", torch.device("cuda")) == "torch"
    with pytest.raises(ConfigError, match="--backend must be one of"):
        ovb.resolve_backend("onnx", CPU)
    monkeypatch.setattr(ovb, "openvino_version", lambda: None)
    assert ovb.resolve_backend("auto", CPU) == "torch"
    with pytest.raises(ConfigError, match="not installed"):
        ovb.resolve_backend("openvino", CPU)


def test_backend_is_one_option_for_evaluate_predict_and_train(tmp_path: Path) -> None:
    from transferlab.cli import build_parser
    from transferlab.evaluation import EvalConfig
    from transferlab.prediction import PredictConfig
    from transferlab.training.config import TrainConfig

    for argv in (
        ["evaluate", "--model", "m", "--out", str(tmp_path), "--backend", "openvino"],
        ["predict", str(tmp_path), "x.jpg", "--backend", "openvino"],
        ["train", "--model", "m", "--out", str(tmp_path), "--backend", "openvino"],
    ):
        assert build_parser(argv[0]).parse_args(argv).backend == "openvino"
    with pytest.raises(ConfigError, match="--backend must be one of auto, torch, openvino"):
        EvalConfig(data="d", out=tmp_path, model="m", backend="onnx")
    with pytest.raises(ConfigError, match="--backend"):
        PredictConfig(source=tmp_path, inputs=("x.jpg",), backend="openvino2")
    with pytest.raises(ConfigError, match="--backend"):
        TrainConfig(model="m", data="d", out=tmp_path, backend="ov")


@needs_openvino
def test_compiling_twice_from_one_converted_model(net, cache) -> None:
    """The NHWC input layout is added to a copy: the converted model itself stays NCHW (profile_model compiles
    one conversion in several configurations)."""
    ov_model, _, _ = ovb.converted_model(net, None, "logits", 64, BF16_CL, cache)
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    outs = []
    for _ in range(2):
        compiled = ovb._compile(ov_model, BF16_CL, True, 1, 1)
        outs.append(ovb.OpenVinoRunner(compiled, nhwc=True, fwd="logits", info={})(x))
    torch.testing.assert_close(outs[0], outs[1])


_TWO_MODELS_THEN_A_CHILD = """
import signal, subprocess, sys
import torch
from transferlab.inference import openvino as ovb
from transferlab.runtime import Precision

# PyTorch's DataLoader installs a Python SIGCHLD handler like this one (Python handlers run on the thread's
# alternate signal stack); a child exiting then delivers SIGCHLD to this thread.
signal.signal(signal.SIGCHLD, lambda *a: None)
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Flatten()).eval()
bf16 = Precision(dtype=torch.bfloat16, channels_last=True, device_type="cpu")
x = torch.randn(4, 3, 16, 16)
first = ovb.openvino_runner(model, None, size=16, precision=bf16, check=x, cache_dir=sys.argv[1])
second = ovb.openvino_runner(model, None, size=16, precision=bf16, check=x, cache_dir=sys.argv[1])
assert first is not None and second is not None
first.close()  # released in the order they were made, not the reverse
second.close()
for _ in range(5):
    subprocess.run(["true"], check=True)
print("ok")
"""


@needs_openvino
def test_releasing_two_models_out_of_order_leaves_no_dangling_signal_stack(tmp_path: Path) -> None:
    """Without the guard around OpenVINO's compile and release, the thread is left with a freed alternate signal
    stack and the first SIGCHLD kills the process (SIGSEGV, exit -11): the full suite died this way."""
    import subprocess
    import sys

    script = tmp_path / "two_models.py"
    script.write_text(_TWO_MODELS_THEN_A_CHILD, encoding="utf-8")
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "cache")], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
    assert proc.stdout.strip().endswith("ok")
