"""Hostile and mismatched files: a pickle that would run code (weights .pth, CIFAR batches) is refused and
the code never runs (each payload tries to create a file; it must not exist afterwards), and weights of
the wrong architecture or class count are an error naming the first mismatching tensor, never a partial
load. Checkpoints are safetensors + JSON and are never unpickled at all (tests/test_checkpoint.py)."""

from __future__ import annotations

import builtins
import os
import pathlib
import pickle
import re
from pathlib import Path

import pytest
import timm
import torch
import yaml

from builders import WNIDS, cifar_files, train_argv, write_folder
from test_cifar10 import ROWS, _batch_rows, _files, _Hostile
from test_cifar10 import _write as write_cifar
from test_weights import first_mismatch, random_model
from transferlab.cli import main
from transferlab.data.cifar10 import load_cifar10
from transferlab.errors import DataError, WeightsError
from transferlab.models.backbones import create_backbone
from transferlab.models.heads import HeadSpec, TransferModel
from transferlab.models.preprocessing import Preprocessing
from transferlab.models.weights import read_weight_file, save_weights
from transferlab.training.config import TrainConfig
from transferlab.training.runs import load_run

pytestmark = pytest.mark.usefixtures("one_thread")


# --- pickles that would run code --------------------------------------------------------------------


class TouchOnUnpickle:
    """Unpickling this creates ``marker``: the classic code-execution payload, made harmless."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


class SystemOnUnpickle:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, (f"touch '{self.marker}'",))


@pytest.mark.parametrize("payload", [TouchOnUnpickle, SystemOnUnpickle])
@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_hostile_pth_is_refused_and_not_run(tmp_path: Path, payload, writer: str) -> None:  # type: ignore[no-untyped-def]
    marker = tmp_path / "pwned"
    obj = {"x": payload(marker)}
    path = tmp_path / "evil.pth"
    if writer == "torch.save":
        torch.save(obj, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(obj, f, protocol=2)
    # the payload is live: a plain unpickle (of a copy aimed elsewhere) runs it
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(payload(control)))
    assert control.exists()

    with pytest.raises(WeightsError, match="refusing") as ei:
        create_backbone("test_resnet", path)
    assert not marker.exists()
    msg = str(ei.value)
    assert str(path) in msg and ".safetensors" in msg
    # torch's advice to retry with weights_only=False must not be passed on to the user
    assert "weights_only" not in msg
    with pytest.raises(WeightsError, match="refusing"):
        read_weight_file(path)
    assert not marker.exists()


def test_hostile_pth_through_the_cli_is_refused(
    train_ds: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "checkpoint.pth"
    torch.save({"state_dict": TouchOnUnpickle(marker)}, evil)
    assert main(train_argv(train_ds, evil, tmp_path / "run", "--epochs", "1")) == 2
    err = capsys.readouterr().err
    assert "refusing" in err and str(evil) in err
    assert not marker.exists()
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("kind", ["os.system", "builtins.exec"])
def test_hostile_cifar_batch_is_refused(tmp_path: Path, kind: str) -> None:
    marker = tmp_path / "pwned"
    if kind == "os.system":
        payload = _Hostile(os.system, f"touch '{marker}'")
        refused = rf"{os.system.__module__}\.system"
    else:
        payload = _Hostile(builtins.exec, f"open({str(marker)!r}, 'w').write('x')")
        refused = r"(builtins|__builtin__)\.exec"  # protocol 2 writes the Python 2 name
    data, labels = _batch_rows("data_batch_4", ROWS["data_batch_4"])
    raw = pickle.dumps({b"data": data, b"labels": labels, b"filenames": payload}, protocol=2)
    root = write_cifar(tmp_path / "d", _files({"data_batch_4": raw}))
    with pytest.raises(DataError, match=r"refusing to unpickle") as ei:
        load_cifar10(root)
    msg = str(ei.value)
    assert re.search(rf"refusing to unpickle {refused} from ", msg), msg
    assert str(root / "data_batch_4") in msg
    assert not marker.exists()


def test_hostile_cifar_meta_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    meta = pickle.dumps({b"label_names": _Hostile(os.system, f"touch '{marker}'")}, protocol=2)
    with pytest.raises(DataError, match=r"refusing to unpickle .* from .*batches\.meta"):
        load_cifar10(write_cifar(tmp_path / "d", _files({"batches.meta": meta})))
    assert not marker.exists()


def test_strict_md5_checked_before_unpickling(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    raw = pickle.dumps({b"data": _Hostile(os.system, f"touch '{marker}'")}, protocol=2)
    root = write_cifar(tmp_path / "d", _files({"data_batch_1": raw}))
    with pytest.raises(DataError, match=r"data_batch_1 has md5"):
        load_cifar10(root, verify="strict")
    assert not marker.exists()


def test_hostile_cifar_batch_through_the_cli_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    marker = tmp_path / "pwned"
    files = cifar_files(n_per_batch=4)
    files["data_batch_2"] = pickle.dumps({b"data": TouchOnUnpickle(marker)}, protocol=2)
    root = write_folder(tmp_path / "cifar-10-batches-py", files)
    assert main(["data", "check", str(root), "--workers", "1"]) == 2
    assert "refusing to unpickle" in capsys.readouterr().err
    assert not marker.exists()


# --- weights that do not fit ------------------------------------------------------------------------


def test_wrong_shape_tensor_is_named(tmp_path: Path) -> None:
    sd = dict(random_model("test_resnet").state_dict())
    key = "layer2.0.conv1.weight"
    assert key in sd
    sd[key] = torch.zeros(*sd[key].shape[:-1], sd[key].shape[-1] + 2)
    path = tmp_path / "w.pth"
    torch.save(sd, path)
    with pytest.raises(WeightsError, match=rf"'{key}' has shape") as ei:
        create_backbone("test_resnet", path)
    assert str(path) in str(ei.value)


def test_small_wrong_architecture_names_first_mismatch(tmp_path: Path) -> None:
    r18 = dict(random_model("resnet18").state_dict())
    path = tmp_path / "r18.pth"
    torch.save(r18, path)
    target = timm.create_model("resnet34", pretrained=False).state_dict()
    key = first_mismatch(target, r18)
    with pytest.raises(WeightsError, match=rf"'{key}'"):
        create_backbone("resnet34", path)


def test_class_ids_metadata_travels_and_is_checked(tmp_path: Path) -> None:
    model = random_model("test_resnet", num_classes=3)
    ids = ["n02124075", "n01443537", "n04067472"]
    ok = tmp_path / "ok.safetensors"
    save_weights(ok, model.state_dict(), class_ids=ids)
    b = create_backbone("test_resnet", ok)
    assert b.class_ids == tuple(ids)
    assert b.has_imagenet_head is False
    bad = tmp_path / "bad.safetensors"
    save_weights(bad, model.state_dict(), class_ids=ids[:2])
    with pytest.raises(WeightsError, match="names 2 classes but the head has 3"):
        create_backbone("test_resnet", bad)


def test_run_weights_of_another_class_count_name_the_head_tensor(tmp_path: Path) -> None:
    """A run directory whose model.safetensors has a 4-class head but names 3 classes (a file copied over
    from another run): loading names the first tensor that does not fit instead of loading part of it."""
    run = tmp_path / "run"
    run.mkdir()
    cfg = TrainConfig(model="test_resnet", data="tiny-imagenet", out=run, strategy="full")
    (run / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    four = TransferModel.from_backbone(timm.create_model("test_resnet"), HeadSpec.parse("linear"), 4)
    save_weights(run / "model.safetensors", four.state_dict(), preprocessing=Preprocessing(), class_ids=list(WNIDS))
    with pytest.raises(WeightsError, match=r"'head\.fc\.weight' has shape \(4, \d+\) but the model expects \(3, "):
        load_run(run)
