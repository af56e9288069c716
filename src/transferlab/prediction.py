"""``transferlab predict``: run what was trained on new images.

A *predictor* is rebuilt from any folder transferlab writes that holds (or points to) a model:

* a run directory of ``transferlab train`` (config.yaml + model.safetensors);
* an exported model folder of ``transferlab export`` (model_card.json + model.safetensors or model.onnx),
  which needs nothing else: no run directory, no config, no dataset;
* an ``evaluate`` output folder (a zero-shot or pretrained-head evaluation: the model is rebuilt from its
  metrics.json, with the same weights and resize options);
* an ensemble folder of ``transferlab ensemble`` (weights.json): each member is rebuilt from the folder its
  predictions came from, and the fitted combination (weights, temperatures, stacking) is applied to their
  outputs exactly as :meth:`~transferlab.ensembles.FittedEnsemble.log_probs` does on saved predictions;
* a study folder of ``transferlab study``: its best ensemble by the top-1 in its metrics.json (or
  ``--member NAME``).

Each network is fed with its own preprocessing (input size, resize method, crop policy, mean/std), so
members of different resolutions can be combined; images of any size and mode are decoded to RGB by
:func:`~transferlab.data.images.decode_image`. A file that cannot be read is recorded with the reason
and the others go on: a folder with one broken JPEG must not cost the predictions for the rest.

Test-time augmentation is :mod:`transferlab.inference.tta`.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from transferlab.artifacts.folders import CARD_FILE, folder_kind, has_model, is_ensemble_dir, is_run_dir, is_study_dir
from transferlab.artifacts.predictions import LEGACY_FILE, find_predictions, read_predictions
from transferlab.data import open_dataset
from transferlab.data.base import subset_indices
from transferlab.data.decoded import decode_split, pixel_array
from transferlab.data.images import IMAGE_SUFFIXES, decode_image, is_image_name
from transferlab.data.names import class_names
from transferlab.data.resolve import DATA_HELP, cache_dir
from transferlab.data.transforms import EvalTransform, normalize_batch
from transferlab.ensembles import load_fitted
from transferlab.errors import BadImageError, ConfigError, DataError
from transferlab.exports import load_exported
from transferlab.inference.engine import BACKEND, default_workers, make_eval_transform, model_outputs
from transferlab.inference.entry import ModelEntry
from transferlab.inference.tta import TTA, tta_forward, tta_log_probs, tta_view_count
from transferlab.io import atomic_write_json, atomic_write_text
from transferlab.labels import imagenet_indices
from transferlab.metrics import log_softmax
from transferlab.models.backbones import create_backbone
from transferlab.models.fold import inference_copy
from transferlab.options import check, option
from transferlab.runtime import (
    CHANNELS_LAST,
    DEVICE,
    PRECISION,
    WORKERS,
    Precision,
    inference_streams,
    resolve_device,
    resolve_precision,
    reuse_freed_memory,
)
from transferlab.training.runs import load_run

log = logging.getLogger(__name__)

OUTPUT_SUFFIXES = (".csv", ".json")


# --------------------------------------------------------------------------------------------------
# Predictors


@dataclass
class Predictor:
    """Everything :func:`predict` runs: one or more networks and, for an ensemble, the fitted combination."""

    source: Path
    kind: str
    entries: list[ModelEntry]
    class_ids: tuple[str, ...]
    class_names: tuple[str, ...]
    ensemble: Any = None  # a FittedEnsemble for ensembles
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def description(self) -> str:
        """One line for logs and output files."""
        what = ", ".join(e.label for e in self.entries)
        if self.ensemble is not None:
            return f"{self.kind} {self.source} ({self.ensemble.method} of {len(self.entries)}: {what})"
        return f"{self.kind} {self.source} ({what})"


def load_predictor(source: str | Path, *, member: str | None = None, data: str | None = None) -> Predictor:
    """Rebuild the model(s) a folder holds or points to (see the module docstring for the kinds).

    ``member`` picks a member or ensemble of a study folder by name. ``data`` is a dataset spec whose
    class names (e.g. Tiny ImageNet's words.txt) label the outputs; without it the names come from the
    data the model was trained on when that is available locally, else from ImageNet's WordNet lemmas
    for WordNet ids, else the ids are shown.
    """
    p = Path(source)
    if not p.exists():
        raise ConfigError(f"{p}: no such folder; pass a run, export, ensemble or study directory")
    if is_study_dir(p):
        return _from_study(p, member, data)
    if member is not None:
        raise ConfigError(f"--member {member}: only a study folder has members to pick from, and {p} is not one")
    if is_ensemble_dir(p):
        pred = _from_ensemble(p)
    else:
        entry, kind = load_entry(p)
        pred = Predictor(source=p, kind=kind, entries=[entry], class_ids=entry.class_ids, class_names=())
    pred.class_names = _predictor_names(pred, data)
    return pred


def load_entry(path: str | Path) -> tuple[ModelEntry, str]:
    """One network from a run directory, an exported model folder or an evaluate output; returns (entry, kind)."""
    d = Path(path)
    if is_run_dir(d):
        return entry_from_run(d), "run"
    if (d / CARD_FILE).is_file():
        return load_exported(d), "export"
    if folder_kind(d) == "evaluation":
        return _entry_from_evaluation(d), "evaluation"
    raise ConfigError(
        f"{d} holds no model transferlab can rebuild: expected a run directory (config.yaml + model.safetensors), "
        "an exported model (model_card.json), an evaluate output (metrics.json + predictions/), an ensemble "
        "(weights.json) or a study folder (study.yaml + members/)"
    )


def entry_from_run(run_dir: str | Path) -> ModelEntry:
    """A run's model with the resize options it was trained and reported with (config.yaml)."""
    run = load_run(run_dir)
    cfg = run.config
    size = cfg.img_size or run.preprocessing.input_size
    return ModelEntry(
        label=f"{cfg.model} run {Path(run_dir).name}",
        model=run.model,
        preprocessing=run.preprocessing,
        transform=make_eval_transform(run.preprocessing, size, cfg.crop, cfg.interpolation),
        class_ids=run.class_ids,
        name_sources=(str(cfg.data),),
    )


def _entry_from_evaluation(d: Path) -> ModelEntry:
    """The model an ``evaluate`` output was computed with, rebuilt from its metrics.json."""
    try:
        m = json.loads((d / "metrics.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DataError(f"{d / 'metrics.json'}: cannot read it ({e})") from e
    mode, cfg = m.get("mode"), m.get("config") or {}
    if mode == "run":
        run = Path(str(m.get("run")))
        if not run.is_absolute() and not run.exists():
            raise ConfigError(
                f"{d} was evaluated from the run {run}, which is not found from here; pass the run directory itself"
            )
        return entry_from_run(run)
    if mode not in ("zero-shot", "head") or not m.get("model"):
        raise ConfigError(f"{d}/metrics.json is not an evaluate output transferlab can rebuild a model from")

    found = find_predictions(d, str(m.get("split", "val")))
    if found is None:
        raise ConfigError(f"{d} holds no predictions/<split>.npz to read its class ids from; evaluate again")
    class_ids = tuple(str(c) for c in read_predictions(found).class_ids.tolist())
    bb = create_backbone(str(m["model"]), cfg.get("weights", "auto"))
    cols = imagenet_indices(class_ids) if mode == "zero-shot" else None
    if cols is None and bb.num_classes != len(class_ids):
        raise ConfigError(f"{d}: the rebuilt {m['model']} has {bb.num_classes} outputs, not {len(class_ids)}")
    pre = bb.preprocessing
    size = cfg.get("img_size") or pre.input_size
    return ModelEntry(
        label=f"{m['model']} {mode} {d.name}",
        model=bb.model,
        preprocessing=pre,
        transform=make_eval_transform(pre, int(size), cfg.get("crop", "auto"), cfg.get("interpolation", "auto")),
        class_ids=class_ids,
        cols=cols,
        name_sources=tuple(str(x) for x in (m.get("data"), cfg.get("data")) if x),
    )


def _member_dir(member: dict[str, Any], edir: Path) -> Path:
    """The folder a member's predictions came from (a run or evaluate output), where its model can be rebuilt."""
    tried: list[Path] = []
    path = Path(str(member.get("path", "")))
    if path.parent.name == "predictions":
        tried.append(path.parent.parent)
    elif path.name == LEGACY_FILE:
        tried.append(path.parent)
    spec = Path(str(member.get("spec", "")))
    tried.append(spec)
    # A study's ensemble sits in STUDY/ensembles/<name>; its members in STUDY/members/<name> (also after a move).
    tried.append(edir.resolve().parent.parent / "members" / str(member.get("name", "")))
    for d in tried:
        if has_model(d):
            return d
    raise ConfigError(
        f"ensemble {edir}: member {member.get('name')} cannot be rebuilt: none of "
        f"{', '.join(str(t) for t in tried)} holds its model (a run directory or evaluate output)"
    )


def _from_ensemble(edir: Path) -> Predictor:

    fitted, doc = load_fitted(edir / "weights.json")
    class_ids = tuple(str(c) for c in doc["class_ids"])
    entries = []
    for mem in doc["members"]:
        entry, _ = load_entry(_member_dir(mem, edir))
        if entry.class_ids != class_ids:
            raise DataError(
                f"ensemble {edir}: member {mem.get('name')}'s model predicts other classes than the ensemble was "
                "fitted on; rebuild the ensemble"
            )
        entries.append(entry)
    return Predictor(
        source=edir,
        kind="ensemble",
        entries=entries,
        class_ids=class_ids,
        class_names=(),
        ensemble=fitted,
        info={"method": fitted.method, "members": [m.get("name") for m in doc["members"]]},
    )


def _read_top1(d: Path) -> float | None:
    try:
        m = json.loads((d / "metrics.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    v = (m.get("ensemble") or {}).get("top1", m.get("top1"))
    return float(v) if isinstance(v, int | float) and math.isfinite(v) else None


def _from_study(sdir: Path, member: str | None, data: str | None) -> Predictor:
    """A study's best ensemble by top-1 (its own metrics.json), or the member/ensemble named by ``member``."""
    import yaml

    if member is not None:
        for sub in ("members", "ensembles"):
            d = sdir / sub / member
            if d.is_dir():
                pred = load_predictor(d, data=data)
                pred.info["study"] = {"dir": str(sdir), "chosen": member, "how": "--member"}
                return pred
        have = sorted(
            p.name for sub in ("members", "ensembles") if (sdir / sub).is_dir() for p in (sdir / sub).iterdir()
        )
        raise ConfigError(f"--member {member}: {sdir} has no member or ensemble of that name; it has {', '.join(have)}")
    scored: list[tuple[float, str, Path]] = []
    edir = sdir / "ensembles"
    for d in sorted(edir.iterdir()) if edir.is_dir() else []:
        top1 = _read_top1(d)
        if is_ensemble_dir(d) and top1 is not None:
            scored.append((top1, d.name, d))
    what = "ensemble"
    if not scored:
        doc = yaml.safe_load((sdir / "study.yaml").read_text(encoding="utf-8")) or {}
        roles = {n: (m or {}).get("role", "member") for n, m in (doc.get("members") or {}).items()}
        for d in sorted((sdir / "members").iterdir()):
            top1 = _read_top1(d)
            if roles.get(d.name, "member") == "member" and top1 is not None and has_model(d):
                scored.append((top1, d.name, d))
        what = "member"
    if not scored:
        raise DataError(f"{sdir}: no finished ensemble or member (with a metrics.json) to predict with")
    top1, name, d = max(scored, key=lambda t: t[0])
    log.info("study %s: predicting with its best %s %s (top-1 %.2f%% on its report data)", sdir, what, name, 100 * top1)
    pred = load_predictor(d, data=data)
    pred.info["study"] = {"dir": str(sdir), "chosen": name, "how": f"best {what} by top-1 ({top1:.4f})"}
    return pred


# --------------------------------------------------------------------------------------------------
# Class names


def _predictor_names(pred: Predictor, data: str | None) -> tuple[str, ...]:
    if data is None:
        for e in pred.entries:
            if e.class_names is not None and e.class_ids == pred.class_ids:
                return e.class_names
    sources = [data] + [s for e in pred.entries for s in e.name_sources]
    return class_names(pred.class_ids, sources)


# --------------------------------------------------------------------------------------------------
# Inputs


@dataclass(frozen=True)
class InputItem:
    """One thing to predict: a file, or sample ``index`` of a dataset split; ``error`` when known unreadable."""

    path: str
    file: str | None = None
    index: int | None = None
    label: str | None = None
    error: str | None = None


def collect_inputs(paths: Sequence[str | Path]) -> list[InputItem]:
    """Files as given, folders searched recursively for image suffixes (sorted), duplicates dropped.

    A path that does not exist becomes an item with an error, reported with the others' results.
    """
    items: list[InputItem] = []
    seen: set[str] = set()

    def add(item: InputItem) -> None:
        key = str(Path(item.file).resolve()) if item.file else item.path
        if key not in seen:
            seen.add(key)
            items.append(item)

    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.is_file() and is_image_name(f.name))
            if not files:
                log.warning("%s: no image files (%s) in this folder", p, ", ".join(_suffix_list()))
            for f in files:
                add(InputItem(path=str(f), file=str(f)))
        elif p.is_file():
            add(InputItem(path=str(p), file=str(p)))
        else:
            add(InputItem(path=str(p), error="no such file or folder"))
    return items


def _suffix_list() -> list[str]:

    return list(IMAGE_SUFFIXES)


class _InputImages(Dataset):
    """Decodes each input once and applies every network's transform; a failure becomes a reason, not an error."""

    def __init__(self, items: Sequence[InputItem], transforms: Sequence[EvalTransform], split: Any = None) -> None:
        self.items = list(items)
        self.transforms = list(transforms)
        self.split = split

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[int, list[torch.Tensor] | None, str | None]:
        it = self.items[i]
        if it.error is not None:
            return i, None, it.error
        try:
            if it.index is not None:  # a split without a pixel array, or a sample its decoded cache could not decode
                img = self.split.load(it.index)
            else:
                assert it.file is not None
                img = decode_image(Path(it.file).read_bytes(), it.path)
            return i, [tf(img).float() for tf in self.transforms], None
        except BadImageError as e:
            return i, None, e.reason
        except OSError as e:
            return i, None, f"cannot read: {e.strerror or e}"
        except Exception as e:  # one odd file must not cost the predictions for the others
            return i, None, f"{type(e).__name__}: {e}"


def _collate(batch: list[Any]) -> list[Any]:
    return batch


# --------------------------------------------------------------------------------------------------
# Running


@dataclass(frozen=True)
class PredictConfig:
    """Everything a prediction depends on. Invalid values fail here with a sentence naming the option."""

    source: Path = option(
        help="run directory, exported model folder, evaluate output, ensemble folder (weights.json) or study folder",
        flag="source",
        metavar="SOURCE",
    )
    inputs: tuple[str, ...] = option(
        (),
        "image files, or folders searched recursively for image files (.jpg, .png, ...)",
        flag="inputs",
        nargs="*",
        metavar="INPUT",
    )
    data: str | None = option(
        None, "also predict a dataset split (with --split); its class names label the output: " + DATA_HELP
    )
    split: str = option("test", "split of --data to predict")
    limit: int | None = option(None, "a seeded random subset of the --data split", lo=1, hi=10**12, default_text="all")
    seed: int = option(0, "seed for --limit", lo=0, hi=2**63 - 1)
    top_k: int = option(5, "classes listed per image", lo=1, hi=100_000)
    tta: str = TTA.field(
        "none",
        help="test-time augmentation: average probabilities over the image and its mirror (flip), plus 4 corner and "
        "the center crop at 0.875 of the side (flip+crops)",
    )
    member: str | None = option(
        None,
        "study folders only: predict with this member or ensemble",
        default_text="the best ensemble by top-1",
    )
    out: Path | None = option(
        None,
        "write the rows to this .csv (path, top-k ids, names, probabilities, error) or .json file",
        default_text="print the top classes",
    )
    batch_size: int = option(32, "images per forward pass", lo=1, hi=1 << 16)
    workers: int = WORKERS.field(-1, group=None)
    precision: str = PRECISION.field("auto", group=None)
    channels_last: str = CHANNELS_LAST.field("auto", group=None)
    device: str = DEVICE.field("auto", group=None)
    progress: bool | None = None
    backend: str = BACKEND.field("torch", group=None)

    def __post_init__(self) -> None:
        check(self)
        if not self.inputs and self.data is None:
            raise ConfigError("nothing to predict: give image files or folders, or --data PATH --split NAME")
        if self.out is not None and Path(self.out).suffix.lower() not in OUTPUT_SUFFIXES:
            raise ConfigError(f"--out {self.out}: the file name must end in .csv or .json")


@dataclass
class PredictResult:
    """Per-input results in input order: ``rows[i]`` has ``path`` and either ``top_k`` or ``error``."""

    rows: list[dict[str, Any]]
    meta: dict[str, Any]

    @property
    def errors(self) -> list[tuple[str, str]]:
        """(path, reason) of every input that could not be read."""
        return [(r["path"], r["error"]) for r in self.rows if "error" in r]

    @property
    def predictions(self) -> list[dict[str, Any]]:
        """The rows that were predicted."""
        return [r for r in self.rows if "error" not in r]


def _prepare(entry: ModelEntry, device: torch.device, precision: Precision) -> None:
    if not entry.torch_native:
        return
    entry.model.to(device).eval()
    if precision.channels_last:
        entry.model.to(memory_format=torch.channels_last)
    # The same BatchNorm folding as `evaluate`, so both give the same numbers (and run as fast).
    entry.model = inference_copy(entry.model, entry.transform.size, device, channels_last=precision.channels_last)


@torch.inference_mode()
def entry_outputs(
    entry: ModelEntry, x_uint8: torch.Tensor, *, tta: str, precision: Precision, device: torch.device
) -> np.ndarray:
    """(B, C) outputs of one network for a uint8 batch: logits without TTA, log mean probabilities with it."""
    native = entry.torch_native
    dev = device if native else torch.device("cpu")
    pre = entry.preprocessing
    x = normalize_batch(x_uint8.to(dev), pre.mean, pre.std, channels_last=native and precision.channels_last)
    cols = None if entry.cols is None else torch.as_tensor(entry.cols, dtype=torch.long, device=dev)
    with precision.autocast() if native else nullcontext():
        if tta == "none":
            y = entry.model(x).float()
            if cols is not None:
                y = y.index_select(1, cols)
        else:
            y = tta_log_probs(entry.model, x, tta, cols)
    return y.float().cpu().numpy()


def combine(pred: Predictor, outputs: Sequence[np.ndarray]) -> np.ndarray:
    """(N, C) log-probabilities from each network's outputs: a log-softmax, or the fitted ensemble."""
    if pred.ensemble is not None:
        return pred.ensemble.log_probs(np.stack(outputs))
    return log_softmax(np.asarray(outputs[0], dtype=np.float64))


def dataset_items(
    data: str, split_name: str, *, limit: int | None = None, seed: int = 0
) -> tuple[list[InputItem], Any]:
    """The samples of a dataset split as inputs (a seeded subset with ``limit``), and the split itself."""
    source = open_dataset(data)
    split = decode_split(source.split(split_name), cache_dir())  # the pixels `evaluate` and `train` read
    idx = subset_indices(len(split), limit, seed)
    labeled = split.labeled
    ids = source.classes.ids
    items = [
        InputItem(path=split.origin(int(i)), index=int(i), label=ids[int(split.targets[i])] if labeled else None)
        for i in idx
    ]
    return items, split


def _outputs(run: Callable[..., torch.Tensor], e: ModelEntry, x: torch.Tensor, **opts: Any) -> np.ndarray:
    """:func:`entry_outputs` of a batch, as two inference streams on a CPU like ``evaluate`` (an ONNX Runtime
    session brings its own threads)."""

    def one(part: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(entry_outputs(e, part, **opts))

    return (run(one, x) if e.torch_native else one(x)).numpy()


def _top_k(p: np.ndarray, k: int, class_ids: Sequence[str], names: Sequence[str]) -> list[dict[str, Any]]:
    """The ``k`` most probable classes of one row of probabilities (ties to the lower index)."""
    top = np.argsort(-p, kind="stable")[:k]
    return [{"class_index": int(c), "class_id": class_ids[c], "class_name": names[c], "prob": float(p[c])} for c in top]


def predict(cfg: PredictConfig, predictor: Predictor | None = None) -> PredictResult:
    """Predict every input of ``cfg`` and, with ``cfg.out``, write the rows (CSV or JSON) atomically.

    The samples of a dataset split held as one pixel array (the decoded cache, CIFAR-10) go through the
    batched inference engine exactly as ``evaluate`` runs them (:func:`~transferlab.inference.engine.model_outputs`:
    whole-batch gather, resize and standardisation as tensors, two streams), so both give the same numbers at
    the same speed; files, folders, samples the decoded cache could not decode (``split.bad``) and splits of
    mixed sizes are decoded one by one. Inputs that cannot be read are kept as rows with an ``error`` (the
    reason) and do not stop the others; the caller decides the exit status from :attr:`PredictResult.errors`.
    """
    pred = predictor or load_predictor(cfg.source, member=cfg.member, data=cfg.data)
    items: list[InputItem] = collect_inputs(cfg.inputs) if cfg.inputs else []
    split = None
    if cfg.data is not None:
        more, split = dataset_items(cfg.data, cfg.split, limit=cfg.limit, seed=cfg.seed)
        items += more
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, cfg.channels_last, device)
    for e in pred.entries:
        _prepare(e, device, precision)
    native = any(e.torch_native for e in pred.entries)
    how = precision.describe() if native else "fp32 in ONNX Runtime on cpu"
    log.info("predicting %d input(s) with %s, TTA %s, %s", len(items), pred.description, cfg.tta, how)
    run = _Run(cfg, pred, items, device, precision)
    batched, one_by_one = _route(items, split)
    t0 = time.perf_counter()
    with reuse_freed_memory(device):
        if batched:
            run.split_pass(split, batched)
        if one_by_one:
            run.image_pass(one_by_one, split)
    wall = time.perf_counter() - t0
    result = PredictResult(rows=[r for r in run.rows if r is not None], meta=_meta(cfg, pred, run, native, wall))
    if cfg.out is not None:
        write_result(Path(cfg.out), result)
    return result


def _route(items: Sequence[InputItem], split: Any) -> tuple[list[int], list[int]]:
    """Positions of the items the engine runs in batches (decodable samples of a pixel-array split), and the rest."""
    pixels = None if split is None else pixel_array(split)
    bad = getattr(split, "bad", {})
    batched: list[int] = []
    rest: list[int] = []
    for pos, it in enumerate(items):
        fast = pixels is not None and it.error is None and it.index is not None and it.index not in bad
        (batched if fast else rest).append(pos)
    return batched, rest


#: ONNX Runtime models run in fp32 on the CPU, NCHW.
_ONNX_PRECISION = Precision(dtype=None, channels_last=False, device_type="cpu")


class _Run:
    """The rows of one :func:`predict` call, filled in by its batched and its per-image pass."""

    def __init__(
        self, cfg: PredictConfig, pred: Predictor, items: list[InputItem], device: torch.device, precision: Precision
    ) -> None:
        self.cfg, self.pred, self.items = cfg, pred, items
        self.device, self.precision = device, precision
        self.k = min(cfg.top_k, len(pred.class_ids))
        self.names = pred.class_names or pred.class_ids
        self.rows: list[dict[str, Any] | None] = [None] * len(items)
        self.n_ok = 0

    def _fill(self, positions: Sequence[int], log_probs: np.ndarray) -> None:
        for i, p in zip(positions, np.exp(log_probs), strict=True):
            row = {"path": self.items[i].path, **_label(self.items[i])}
            self.rows[i] = {**row, "top_k": _top_k(p, self.k, self.pred.class_ids, self.names)}
        self.n_ok += len(positions)

    def _fail(self, i: int, err: str) -> None:
        log.warning("%s: %s", self.items[i].path, err)
        self.rows[i] = {"path": self.items[i].path, **_label(self.items[i]), "error": err}

    def split_pass(self, split: Any, positions: Sequence[int]) -> None:
        """The engine over the split's samples at ``positions``: each network once, then the combination."""
        indices = np.array([self.items[i].index for i in positions], dtype=np.int64)
        outs = [self._engine(e, split, indices) for e in self.pred.entries]
        self._fill(positions, combine(self.pred, outs))

    def _engine(self, e: ModelEntry, split: Any, indices: np.ndarray) -> np.ndarray:
        """One network's outputs for ``split[indices]`` (what :func:`entry_outputs` gives per batch), from the
        engine: logits, restricted to ``cols``, or TTA's log mean probabilities; ``evaluate``'s numbers."""
        cols, forward = e.cols, None
        if self.cfg.tta != "none":
            forward = tta_forward(self.cfg.tta, cols)  # keeps the columns itself, before averaging the views
            cols = None
        native = e.torch_native
        out = model_outputs(
            e.model,
            split,
            e.transform,
            mean=e.preprocessing.mean,
            std=e.preprocessing.std,
            indices=indices,
            precision=self.precision if native else _ONNX_PRECISION,
            device=self.device if native else torch.device("cpu"),
            batch_size=self.cfg.batch_size,
            workers=0,
            progress=self.cfg.progress,
            forward=forward,
            desc="predict",
            fold=False,  # _prepare folded it already
            streams=native,
            backend=self.cfg.backend if native else "torch",
        )
        return out if cols is None else out[:, cols]

    def image_pass(self, positions: Sequence[int], split: Any) -> None:
        """Decode the inputs at ``positions`` one by one in DataLoader workers; failures become rows with a reason."""
        cfg = self.cfg
        workers = default_workers() if cfg.workers < 0 else cfg.workers
        loader = DataLoader(
            _InputImages([self.items[i] for i in positions], [e.transform for e in self.pred.entries], split),
            batch_size=cfg.batch_size,
            shuffle=False,
            num_workers=min(workers, max(0, len(positions) // cfg.batch_size)),
            collate_fn=_collate,
        )
        disable = None if cfg.progress is None else not cfg.progress
        opts = {"tta": cfg.tta, "precision": self.precision, "device": self.device}
        with inference_streams(self.device) as run:
            for batch in tqdm(loader, desc="predict", unit="batch", disable=disable, leave=False):
                ok = [(positions[j], views) for j, views, err in batch if err is None]
                for j, _, err in batch:
                    if err is not None:
                        self._fail(positions[j], err)
                if ok:
                    outs = [
                        _outputs(run, e, torch.stack([v[n] for _, v in ok]), **opts)
                        for n, e in enumerate(self.pred.entries)
                    ]
                    self._fill([i for i, _ in ok], combine(self.pred, outs))


def _meta(cfg: PredictConfig, pred: Predictor, run: _Run, native: bool, wall: float) -> dict[str, Any]:
    """The result's description: what predicted what, how, how fast, and the top-1 on labeled inputs."""
    n_ok, n = run.n_ok, len(run.items)
    meta: dict[str, Any] = {
        "source": str(cfg.source),
        "predictor": pred.kind,
        "description": pred.description,
        **({"study": pred.info["study"]} if "study" in pred.info else {}),
        "class_ids": list(pred.class_ids),
        "tta": cfg.tta,
        "tta_views": tta_view_count(cfg.tta),
        "top_k": run.k,
        "n_inputs": n,
        "n_predicted": n_ok,
        "n_failed": n - n_ok,
        "data": None if cfg.data is None else {"spec": cfg.data, "split": cfg.split, "limit": cfg.limit},
        "precision": run.precision.name if native else "fp32 (ONNX Runtime)",
        "device": str(run.device) if native else "cpu",
        "wall_s": round(wall, 3),
        "images_per_s": round(n_ok / wall, 2) if wall > 0 else None,
    }
    labeled = [r for r in run.rows if r is not None and "label" in r and "top_k" in r]
    if labeled:
        meta["labeled"] = len(labeled)
        meta["top1"] = sum(r["top_k"][0]["class_id"] == r["label"] for r in labeled) / len(labeled)
    return meta


def _label(item: InputItem) -> dict[str, str]:
    return {} if item.label is None else {"label": item.label}


def write_result(path: Path, result: PredictResult) -> None:
    """Write the rows as ``.json`` (meta, predictions, errors) or ``.csv`` (one row per input), atomically.

    CSV columns: path, label (when the inputs were a labeled split), then ``top{r}_id``, ``top{r}_name``,
    ``top{r}_prob`` for each rank r, and ``error`` (empty for predicted rows, the reason otherwise).
    """
    suffix = path.suffix.lower()
    if suffix == ".json":
        atomic_write_json(
            path,
            {
                **result.meta,
                "predictions": result.predictions,
                "errors": [{"path": p, "reason": why} for p, why in result.errors],
            },
        )
        return
    if suffix != ".csv":
        raise ConfigError(f"--out {path}: the file name must end in .csv or .json")
    k = int(result.meta["top_k"])
    has_label = any("label" in r for r in result.rows)
    cols = ["path", *(["label"] if has_label else [])]
    for r in range(1, k + 1):
        cols += [f"top{r}_id", f"top{r}_name", f"top{r}_prob"]
    cols.append("error")
    buf = io.StringIO()
    wr = csv.writer(buf, lineterminator="\n")
    wr.writerow(cols)
    for row in result.rows:
        line = [row["path"], *([row.get("label", "")] if has_label else [])]
        tops = row.get("top_k", [])
        for r in range(k):
            if r < len(tops):
                line += [tops[r]["class_id"], tops[r]["class_name"], f"{tops[r]['prob']:.6f}"]
            else:
                line += ["", "", ""]
        line.append(row.get("error", ""))
        wr.writerow(line)
    atomic_write_text(path, buf.getvalue())
