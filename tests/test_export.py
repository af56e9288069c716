"""transferlab export: safetensors + model card round trip, ONNX with onnxruntime agreement, refusals."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from builders import WNIDS, WORDS, jpeg_bytes, train_argv
from transferlab.cli import main
from transferlab.exports import CARD_FILE, ExportConfig, ExportError, export_run, load_exported
from transferlab.prediction import PredictConfig, predict
from transferlab.training.runs import load_run

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = ["--progress", "off", "--workers", "0", "--precision", "fp32"]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, train_ds: Path, in1k32: Path) -> Path:
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("runs") / "lp"
    try:
        assert main(train_argv(train_ds, in1k32, out, "--epochs", "3")) == 0
    finally:
        torch.set_num_threads(n)
    return out


def test_safetensors_export_round_trip_and_card(run: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "export"
    assert main(["export", str(run), "--format", "safetensors", "--out", str(out)]) == 0
    assert "wrote model.safetensors" in capsys.readouterr().out
    card = json.loads((out / CARD_FILE).read_text())
    assert card["architecture"] == "test_resnet" and card["head"] == "linear"
    assert card["class_ids"] == list(WNIDS) and card["class_names"] == [WORDS[w] for w in WNIDS]
    assert card["training"]["config_sha256"] == hashlib.sha256((run / "config.yaml").read_bytes()).hexdigest()
    assert card["preprocessing"]["input_size"] == 32 and card["eval"]["img_size"] == 32
    metrics = json.loads((run / "metrics.json").read_text())
    assert card["metrics"]["top1"] == metrics["top1"] and card["versions"]["transferlab"]
    assert (out / "model.safetensors").read_bytes() == (run / "model.safetensors").read_bytes()

    entry = load_exported(out)
    ref = load_run(run).model.eval()
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        assert torch.equal(entry.model(x), ref(x))  # identical logits, not merely close


def test_predict_from_an_export_without_the_run_directory(
    run: Path, train_ds: Path, tmp_path: Path, monkeypatch
) -> None:
    copy = tmp_path / "run-copy"
    shutil.copytree(run, copy)
    out = tmp_path / "export"
    export_run(ExportConfig(run=copy, out=out))
    cfg = dict(data=str(train_ds), split="val", workers=0, precision="fp32", progress=False)
    want = predict(PredictConfig(source=copy, **cfg))
    shutil.rmtree(copy)
    # No dataset either: names come from the card, so hide every other source of names.
    monkeypatch.setattr("transferlab.data.names.imagenet_lemmas", lambda: {})
    img = tmp_path / "x.jpg"
    img.write_bytes(jpeg_bytes((220, 30, 30)))
    alone = predict(PredictConfig(source=out, inputs=(str(img),), workers=0, precision="fp32"))
    assert alone.meta["predictor"] == "export"
    assert alone.predictions[0]["top_k"][0]["class_name"] in {WORDS[w] for w in WNIDS}
    got = predict(PredictConfig(source=out, **cfg))
    assert [r["top_k"] for r in got.predictions] == [r["top_k"] for r in want.predictions]

    # A damaged weights file is refused by its checksum, never loaded.
    data = bytearray((out / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (out / "model.safetensors").write_bytes(bytes(data))
    assert main(["predict", str(out), str(img), *FAST]) == 2


#: The ONNX tests need the optional extra (part of dev, so CI runs them).
needs_onnx = pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("onnx", "onnxruntime", "onnxscript")),
    reason="pip install 'transferlab[onnx]' for the ONNX tests",
)


@pytest.fixture(scope="module")
def onnx_export(run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("onnx") / "export"
    try:
        assert main(["export", str(run), "--format", "onnx", "--out", str(out), "--check-images", "5"]) == 0
    finally:
        torch.set_num_threads(n)
    return out


@needs_onnx
def test_onnx_export_agrees_with_pytorch(onnx_export: Path, run: Path, train_ds: Path) -> None:
    import onnx

    from transferlab.exports import ort_session

    card = json.loads((onnx_export / CARD_FILE).read_text())
    chk = card["onnx"]["check"]
    assert chk["max_abs_diff"] <= 1e-3 and chk["atol"] == 1e-3 and chk["batch_sizes"] == [5, 1]
    assert "images of" in chk["inputs"]  # real images of the run's data, not random inputs
    assert set(card["files"]) == {"model.onnx"}
    proto = onnx.load(str(onnx_export / "model.onnx"))
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # a named, dynamic batch axis
    sess = ort_session((onnx_export / "model.onnx").read_bytes())
    ref = load_run(run).model.eval()
    for b in (1, 3, 7):
        x = torch.randn(b, 3, 32, 32, generator=torch.Generator().manual_seed(b))
        with torch.inference_mode():
            want = ref(x).numpy()
        got = sess.run(["logits"], {"input": x.numpy()})[0]
        assert got.shape == (b, 3) and np.abs(got - want).max() <= 1e-3

    # predict runs the exported graph in onnxruntime, with the card's preprocessing.
    cfg = dict(data=str(train_ds), split="val", workers=0, precision="fp32", progress=False)
    a = predict(PredictConfig(source=onnx_export, **cfg))
    b = predict(PredictConfig(source=run, **cfg))
    pa = np.array([[t["prob"] for t in r["top_k"]] for r in a.predictions])
    pb = np.array([[t["prob"] for t in r["top_k"]] for r in b.predictions])
    np.testing.assert_allclose(pa, pb, atol=1e-4)


@needs_onnx
def test_onnx_beyond_tolerance_is_an_error_and_writes_nothing(
    onnx_export: Path, run: Path, tmp_path: Path, capsys
) -> None:
    card = json.loads((onnx_export / CARD_FILE).read_text())
    if card["onnx"]["check"]["max_abs_diff"] == 0.0:
        pytest.skip("onnxruntime matched PyTorch bit for bit; a tiny --atol cannot fail")
    out = tmp_path / "onnx"
    rc = main(["export", str(run), "--format", "onnx", "--out", str(out), "--atol", "1e-12", "--check-images", "2"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "exceeds --atol 1e-12" in err and "nothing was written" in err
    assert not out.exists()


@needs_onnx
def test_corrupted_onnx_graph_is_caught_and_an_earlier_export_kept(run: Path, tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "export"
    export_run(ExportConfig(run=run, out=out))  # an earlier, good export in the same folder
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    import transferlab.exports as ex

    real = ex.ort_session

    class Off:
        """A session whose outputs are off by 0.01, as a broken conversion would be."""

        def __init__(self, data: bytes) -> None:
            self.s = real(data)

        def run(self, names, feeds):  # type: ignore[no-untyped-def]
            return [y + 0.01 for y in self.s.run(names, feeds)]

    monkeypatch.setattr(ex, "ort_session", Off)
    with pytest.raises(ExportError, match="disagrees with PyTorch"):
        export_run(ExportConfig(run=run, out=out, format="onnx", check_images=2))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # untouched, no model.onnx


def test_missing_onnx_packages_are_named(run: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(ExportError, match=r"pip install 'transferlab\[onnx\]'"):
        export_run(ExportConfig(run=run, out=tmp_path / "x", format="onnx"))
    assert not (tmp_path / "x").exists()
