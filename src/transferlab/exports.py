"""``transferlab export``: a trained run as a self-contained model folder (safetensors or ONNX + a model card).

The folder holds the weights (``model.safetensors``, byte-for-byte the run's) or an ONNX graph
(``model.onnx``), and ``model_card.json``: architecture and head, class ids and names, the
preprocessing (input size, resize, crop, mean/std), the sha256 of the run's config.yaml, the run's
metrics and the transferlab version. `transferlab predict` loads it without the run directory.

ONNX goes through ``torch.onnx.export(..., dynamo=True)``, the torch.export-based exporter that is
torch's default since 2.9 (it needs ``onnxscript``); the TorchScript exporter still works in torch 2.14
but warns that it will be removed, so it is not used. The batch axis is dynamic. Right after export
the graph runs in ONNX Runtime on a few real images (from the run's data, found locally) at two batch
sizes, and its logits are compared with PyTorch's in fp32: the largest absolute difference goes into
the card, and a difference beyond ``atol`` is an error. Nothing is written until that check passes,
and every file is written atomically with the card last, so a folder with a model card is complete.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from transferlab._version import __version__
from transferlab.artifacts.folders import CARD_FILE, is_run_dir
from transferlab.data import open_dataset
from transferlab.data.base import subset_indices
from transferlab.data.names import class_names
from transferlab.data.transforms import normalize_batch
from transferlab.errors import ConfigError, TransferlabError, WeightsError
from transferlab.inference.engine import make_eval_transform
from transferlab.inference.entry import ModelEntry
from transferlab.io import atomic_write_bytes, atomic_write_json
from transferlab.models.heads import HeadSpec, TransferModel
from transferlab.models.preprocessing import Preprocessing
from transferlab.models.weights import META_CLASS_IDS, META_PREPROCESSING, check_compatible, read_weight_file
from transferlab.options import check, option
from transferlab.training.runs import load_run, load_run_config

log = logging.getLogger(__name__)

CARD_FORMAT = "transferlab-model-card"
CARD_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
ONNX_FILE = "model.onnx"
FORMATS = ("safetensors", "onnx")
ONNX_INPUT, ONNX_OUTPUT = "input", "logits"


class ExportError(TransferlabError):
    """An export could not be made or did not pass its check; nothing was written."""


@dataclass(frozen=True)
class ExportConfig:
    """What to export and how to check it. Invalid values fail here, naming the option."""

    run: Path = option(help="a finished run directory of `transferlab train`", flag="run", metavar="RUN_DIR")
    out: Path = option(help="output folder (created)", required=True)
    format: str = option(
        "safetensors",
        "safetensors (the weights, for transferlab predict) or onnx (needs pip install 'transferlab[onnx]')",
        choices=FORMATS,
    )
    #: Largest absolute logit difference between ONNX Runtime and PyTorch that passes the check.
    atol: float = option(
        1e-3, "onnx: largest absolute logit difference to PyTorch that passes the check", lo=0, hi=1e6, lo_open=True
    )
    #: Real images the ONNX check runs on.
    check_images: int = option(8, "onnx: real images the check runs on", lo=1, hi=10_000)
    #: Dataset for class names and the check images (default: the data the run was trained on).
    data: str | None = option(
        None, "dataset for class names and the check images, never downloaded", default_text="the run's own data"
    )
    split: str | None = option(None, "split the check images come from", default_text="val, else test, else train")

    def __post_init__(self) -> None:
        check(self)
        if not math.isfinite(self.atol):
            raise ConfigError(f"--atol must be a finite number, got {self.atol}")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def model_card(run_dir: Path, *, data: str | None = None) -> dict[str, Any]:
    """The card of a run: what the model is, how to feed it, what its outputs mean, where it came from."""
    cfg = load_run_config(run_dir)

    _, meta = read_weight_file(run_dir / WEIGHTS_FILE)
    if META_CLASS_IDS not in meta or META_PREPROCESSING not in meta:
        raise WeightsError(f"{run_dir / WEIGHTS_FILE} lacks its class ids or preprocessing metadata")
    class_ids = [str(c) for c in json.loads(meta[META_CLASS_IDS])]
    pre = Preprocessing.from_dict(json.loads(meta[META_PREPROCESSING]))
    size = cfg.img_size or pre.input_size
    transform = make_eval_transform(pre, size, cfg.crop, cfg.interpolation)
    metrics: dict[str, Any] = {}
    mpath = run_dir / "metrics.json"
    if mpath.is_file():
        m = json.loads(mpath.read_text(encoding="utf-8"))
        keys = ("dataset", "split", "n", "top1", "top1_ci", "top5", "nll", "best_epoch", "epochs_run", "strategy")
        metrics = {k: m[k] for k in keys if k in m}
    return {
        "format": CARD_FORMAT,
        "version": CARD_VERSION,
        "architecture": cfg.model,
        "head": str(cfg.head_spec()),
        "num_classes": len(class_ids),
        "class_ids": class_ids,
        "class_names": list(class_names(class_ids, [data, str(cfg.data)])),
        "preprocessing": pre.to_dict(),
        "eval": {"img_size": size, "crop": cfg.crop, "interpolation": cfg.interpolation, "transform": repr(transform)},
        "input": {
            "shape": ["batch", 3, size, size],
            "dtype": "float32",
            "layout": "NCHW, RGB",
            "normalization": "x = (pixel / 255 - mean) / std, with mean and std from preprocessing",
        },
        "output": "logits over class_ids (softmax for probabilities)",
        "training": {
            "config_sha256": _sha256((run_dir / "config.yaml").read_bytes()),
            "strategy": cfg.strategy,
            "weights": cfg.weights,
            "data": cfg.data,
            "epochs": cfg.epochs,
            "seed": cfg.seed,
        },
        "metrics": metrics,
        "source_run": str(run_dir.resolve()),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "versions": {"transferlab": __version__, "torch": torch.__version__},
        "files": {},
    }


def export_run(cfg: ExportConfig) -> dict[str, Any]:
    """Export ``cfg.run`` into ``cfg.out`` (created) and return the model card written there."""
    run_dir = Path(cfg.run)
    if not is_run_dir(run_dir):
        raise ConfigError(f"{run_dir} is not a finished run directory (needs config.yaml and model.safetensors)")
    out = Path(cfg.out)
    if out.resolve() == run_dir.resolve():
        raise ConfigError("--out must be another folder than the run directory")
    card = model_card(run_dir, data=cfg.data)
    weights = (run_dir / WEIGHTS_FILE).read_bytes()
    card["training"]["weights_sha256"] = _sha256(weights)
    if cfg.format == "safetensors":
        card["files"] = {WEIGHTS_FILE: {"sha256": _sha256(weights), "bytes": len(weights)}}
        atomic_write_bytes(out / WEIGHTS_FILE, weights)
    else:
        onnx_bytes, check = _export_onnx(run_dir, card, cfg)
        card["files"] = {ONNX_FILE: {"sha256": _sha256(onnx_bytes), "bytes": len(onnx_bytes)}}
        card["onnx"] = check
        atomic_write_bytes(out / ONNX_FILE, onnx_bytes)
    atomic_write_json(out / CARD_FILE, card)
    log.info("exported %s as %s to %s", run_dir, cfg.format, out)
    return card


def _need_onnx() -> tuple[Any, Any]:
    try:
        import onnx
        import onnxruntime as ort
    except ImportError as e:
        raise ExportError(
            f"ONNX export needs the optional packages onnx, onnxruntime and onnxscript ({e}); "
            "install them with: pip install 'transferlab[onnx]'"
        ) from e
    return onnx, ort


def ort_session(onnx_bytes: bytes) -> Any:
    """An ONNX Runtime CPU session using as many threads as torch does (one in the tests)."""
    _, ort = _need_onnx()
    so = ort.SessionOptions()
    so.intra_op_num_threads = max(1, torch.get_num_threads())
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(onnx_bytes, so, providers=["CPUExecutionProvider"])


def _check_batch(run_dir: Path, card: dict[str, Any], cfg: ExportConfig) -> tuple[torch.Tensor, str]:
    """A few real images of the run's data, preprocessed as the card says; random inputs only when the
    data cannot be found locally (said in the card)."""
    pre = Preprocessing.from_dict(card["preprocessing"])
    ev = card["eval"]
    tf = make_eval_transform(pre, ev["img_size"], ev["crop"], ev["interpolation"])
    spec = cfg.data or card["training"]["data"]
    try:
        source = open_dataset(spec, download=False)
        name = cfg.split or next(s for s in ("val", "test", "train") if s in source.splits)
        split = source.split(name)
        idx = subset_indices(len(split), cfg.check_images, seed=0)
        imgs = [tf(split.load(int(i))) for i in idx]
        x = normalize_batch(torch.stack(imgs), pre.mean, pre.std)
        return x, f"{len(imgs)} images of {source.location}/{name}"
    except (TransferlabError, OSError, StopIteration, AttributeError) as e:
        log.warning("export check: no real images (%s); using random inputs", e)
        g = torch.Generator().manual_seed(0)
        size = int(ev["img_size"])
        return torch.randn(cfg.check_images, 3, size, size, generator=g), f"{cfg.check_images} random inputs"


def _export_onnx(run_dir: Path, card: dict[str, Any], cfg: ExportConfig) -> tuple[bytes, dict[str, Any]]:
    """The ONNX graph of the run's model and the record of its check against PyTorch (raises on a mismatch)."""
    onnx, _ = _need_onnx()

    model = load_run(run_dir).model.float().eval()
    size = int(card["eval"]["img_size"])
    example = torch.zeros(2, 3, size, size)
    try:
        program = torch.onnx.export(
            model,
            (example,),
            None,
            dynamo=True,
            dynamic_shapes=({0: torch.export.Dim("batch")},),
            input_names=[ONNX_INPUT],
            output_names=[ONNX_OUTPUT],
            verbose=False,
        )
        proto = program.model_proto
        onnx.checker.check_model(proto)
        data = proto.SerializeToString()
    except ImportError as e:
        raise ExportError(f"ONNX export needs onnxscript ({e}); pip install 'transferlab[onnx]'") from e
    except Exception as e:  # torch.export and the translation fail in many ways for unusual modules
        raise ExportError(f"torch.onnx.export could not export {card['architecture']}: {type(e).__name__}: {e}") from e
    x, what = _check_batch(run_dir, card, cfg)
    sess = ort_session(data)
    with torch.inference_mode():
        ref = model(x).numpy()
    diffs = []
    for xb, rb in ((x, ref), (x[:1], ref[:1])):  # two batch sizes: the batch axis really is dynamic
        got = sess.run([ONNX_OUTPUT], {ONNX_INPUT: xb.numpy()})[0]
        if got.shape != rb.shape:
            raise ExportError(f"ONNX Runtime returned shape {got.shape} for a batch of {len(xb)}, expected {rb.shape}")
        diffs.append(float(np.max(np.abs(got.astype(np.float64) - rb.astype(np.float64)))))
    max_diff = max(diffs)
    check = {
        "file": ONNX_FILE,
        "exporter": f"torch.onnx.export(dynamo=True) (torch {torch.__version__}, torch.export + onnxscript)",
        "opset": next((int(o.version) for o in proto.opset_import if o.domain in ("", "ai.onnx")), None),
        "input": ONNX_INPUT,
        "output": ONNX_OUTPUT,
        "dynamic_axes": {ONNX_INPUT: {"0": "batch"}, ONNX_OUTPUT: {"0": "batch"}},
        "check": {"inputs": what, "batch_sizes": [len(x), 1], "max_abs_diff": max_diff, "atol": cfg.atol},
    }
    log.info("ONNX Runtime vs PyTorch (fp32) on %s: max abs logit difference %.3g", what, max_diff)
    if not max_diff <= cfg.atol:
        raise ExportError(
            f"the ONNX graph disagrees with PyTorch: max abs logit difference {max_diff:.3g} on {what} exceeds "
            f"--atol {cfg.atol:g}; nothing was written"
        )
    return data, check


# --------------------------------------------------------------------------------------------------
# Loading an exported folder


def read_card(d: str | Path) -> dict[str, Any]:
    """An exported folder's model card, checked for its format."""
    p = Path(d) / CARD_FILE
    try:
        card = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConfigError(f"{p}: cannot read the model card ({e})") from e
    if not isinstance(card, dict) or card.get("format") != CARD_FORMAT:
        raise ConfigError(f"{p}: not a model card written by `transferlab export`")
    return card


class OnnxModule(nn.Module):
    """An ONNX Runtime session behind the ``model(x)`` call :mod:`transferlab.prediction` makes (CPU, fp32)."""

    def __init__(self, onnx_bytes: bytes) -> None:
        super().__init__()
        self.session = ort_session(onnx_bytes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.session.run([ONNX_OUTPUT], {ONNX_INPUT: x.detach().float().cpu().contiguous().numpy()})[0]
        return torch.from_numpy(out)


def _verified_bytes(d: Path, name: str, card: dict[str, Any]) -> bytes:
    p = d / name
    try:
        data = p.read_bytes()
    except OSError as e:
        raise WeightsError(f"{p}: cannot read it ({e})") from e
    want = (card.get("files") or {}).get(name, {}).get("sha256")
    if want is not None and _sha256(data) != want:
        raise WeightsError(f"{p}: its sha256 differs from the one in {CARD_FILE}; the file was changed or damaged")
    return data


def load_exported(d: str | Path) -> ModelEntry:
    """The model of an exported folder (safetensors via timm, or ONNX via ONNX Runtime), ready for predict."""
    import timm
    from safetensors.torch import load as load_safetensors

    d = Path(d)
    card = read_card(d)
    class_ids = tuple(str(c) for c in card["class_ids"])
    pre = Preprocessing.from_dict(card["preprocessing"])
    ev = card["eval"]
    files = card.get("files") or {}
    model: nn.Module
    if WEIGHTS_FILE in files:
        sd = load_safetensors(_verified_bytes(d, WEIGHTS_FILE, card))
        body = timm.create_model(card["architecture"], pretrained=False)
        model = TransferModel.from_backbone(body, HeadSpec.parse(card["head"]), len(class_ids))
        check_compatible(model.state_dict(), sd, str(d / WEIGHTS_FILE))
        model.load_state_dict(sd)
        model.eval()
        native = True
    elif ONNX_FILE in files:
        model = OnnxModule(_verified_bytes(d, ONNX_FILE, card))
        native = False
    else:
        raise ConfigError(f"{d / CARD_FILE} lists neither {WEIGHTS_FILE} nor {ONNX_FILE}")
    names = card.get("class_names")
    return ModelEntry(
        label=f"{card['architecture']} export {d.name}",
        model=model,
        preprocessing=pre,
        transform=make_eval_transform(pre, int(ev["img_size"]), ev["crop"], ev["interpolation"]),
        class_ids=class_ids,
        torch_native=native,
        class_names=tuple(str(n) for n in names) if isinstance(names, list) and len(names) == len(class_ids) else None,
    )
