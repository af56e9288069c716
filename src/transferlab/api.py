"""The Python API: ``import transferlab as tl``.

The same work as the command line, for notebooks and scripts, with typed results instead of printed
tables. Every function writes the same folder its command writes (``out``), so what a notebook trains
the CLI can evaluate, ensemble, report and export, and the other way round::

    import transferlab as tl

    lp = tl.train(model="tf_efficientnet_lite0", data="tiny-imagenet-mini", strategy="linear-probe", out="runs/lp")
    lp.metrics["top1"], lp.history[-1]
    tl.load("runs/lp").predict(["cat.jpg"])

Options are the command's, spelled as keyword arguments (``batch_size=64`` for ``--batch-size 64``);
an unknown or out-of-range one is a :class:`~transferlab.errors.ConfigError` naming it, before any work.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from transferlab import _API
from transferlab.artifacts.folders import CARD_FILE, folder_kind
from transferlab.artifacts.predictions import Predictions, find_predictions, prediction_splits, read_predictions
from transferlab.data import open_dataset as open_dataset  # re-exported: tl.open_dataset
from transferlab.ensembles import EnsembleConfig, run_ensemble
from transferlab.errors import ConfigError
from transferlab.evaluation import EvalConfig
from transferlab.evaluation import evaluate as _evaluate
from transferlab.exports import ExportConfig, export_run
from transferlab.options import check_keys
from transferlab.planner import AutoConfig, AutoResult, run_auto
from transferlab.prediction import PredictConfig, PredictResult
from transferlab.prediction import predict as _predict
from transferlab.reports.render import ReportConfig, ReportResult, build_report
from transferlab.studies import StudyResult, StudySpec, load_spec, run_study
from transferlab.training.config import TrainConfig
from transferlab.training.run import train as _train
from transferlab.training.runs import load_run, load_run_config

__all__ = list(_API)  # the names ``transferlab`` hands out on first use (transferlab/__init__.py)

PathLike = str | os.PathLike[str]


@dataclass(frozen=True)
class Folder:
    """A folder a transferlab command wrote; its files are read when asked for, so it is cheap to hold."""

    path: Path

    @property
    def metrics(self) -> dict[str, Any]:
        """``metrics.json``: the headline numbers (``top1``, ``top1_ci``, ``top5``, ``nll``, ``ece``, ...)."""
        return json.loads((self.path / "metrics.json").read_text(encoding="utf-8"))

    def predictions(self, split: str | None = None) -> Predictions:
        """The saved predictions on ``split`` (the split the folder reports on when None)."""
        split = split or str(self.metrics.get("split", "val"))
        found = find_predictions(self.path, split)
        if found is None:
            have = ", ".join(prediction_splits(self.path)) or "none"
            raise ConfigError(f"{self.path} holds no predictions for split {split!r} (it has: {have})")
        return read_predictions(found)

    def predict(self, images: Sequence[PathLike], *, top_k: int = 5, **options: Any) -> PredictResult:
        """Top-``top_k`` classes of image files or folders (``transferlab predict`` with this folder)."""
        return predict(self.path, images, top_k=top_k, **options)

    def __str__(self) -> str:
        return str(self.path)

    def __fspath__(self) -> str:
        return str(self.path)


@dataclass(frozen=True)
class Run(Folder):
    """A training run (``transferlab train``)."""

    @property
    def config(self) -> TrainConfig:
        """The run's options (``config.yaml``), as passed to :func:`train`."""
        return load_run_config(self.path)

    @property
    def history(self) -> list[dict[str, float]]:
        """One row per epoch (``history.csv``): train and holdout loss and accuracy, learning rate, time."""
        with (self.path / "history.csv").open(encoding="utf-8", newline="") as f:
            return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]

    def model(self) -> nn.Module:
        """The trained network (backbone and head), in eval mode on the CPU."""
        return load_run(self.path).model.eval()


@dataclass(frozen=True)
class Evaluation(Folder):
    """An evaluation (``transferlab evaluate``): zero-shot, a pretrained head, or a run on other data."""


@dataclass(frozen=True)
class Ensemble(Folder):
    """An ensemble (``transferlab ensemble``): fitted on one half of the split, reported on the other."""

    @property
    def weights(self) -> dict[str, Any]:
        """``weights.json``: the fitted combination and the members it applies to."""
        return json.loads((self.path / "weights.json").read_text(encoding="utf-8"))


@dataclass(frozen=True)
class Export(Folder):
    """An exported model (``transferlab export``), loadable without its run directory."""

    @property
    def card(self) -> dict[str, Any]:
        """``model_card.json``: architecture, classes, preprocessing, metrics, checksums."""
        return json.loads((self.path / CARD_FILE).read_text(encoding="utf-8"))


@dataclass(frozen=True)
class Study(Folder):
    """A study (``transferlab study``): its members, ensembles and report.

    ``outcome`` is what :func:`study` just did (each step trained, resumed, reused or evaluated, and its time);
    None for a study opened with :func:`load`.
    """

    outcome: StudyResult | None = field(default=None, compare=False, repr=False)

    def members(self) -> dict[str, Run | Evaluation]:
        """Every finished member by name."""
        return _children(self.path / "members")  # type: ignore[return-value]

    def ensembles(self) -> dict[str, Ensemble]:
        """Every finished ensemble by name."""
        return _children(self.path / "ensembles")  # type: ignore[return-value]

    @property
    def report(self) -> Path:
        """The HTML report."""
        return self.path / "report" / "report.html"


_KINDS: dict[str, type[Folder]] = {
    "run": Run,
    "evaluation": Evaluation,
    "ensemble": Ensemble,
    "export": Export,
    "study": Study,
}


def _children(d: Path) -> dict[str, Folder]:
    out = {}
    for p in sorted(d.iterdir()) if d.is_dir() else []:
        kind = folder_kind(p)
        if kind is not None and (p / "metrics.json").is_file():
            out[p.name] = _KINDS[kind](p)
    return out


def load(path: PathLike) -> Run | Evaluation | Ensemble | Study | Export:
    """Any folder transferlab writes, as its type (the kind is read from the files in it)."""
    p = Path(path)
    kind = folder_kind(p)
    if kind is None:
        raise ConfigError(
            f"{p} is not a folder transferlab wrote: expected a run (config.yaml), an evaluation (metrics.json and "
            "predictions/), an ensemble (weights.json), a study (study.yaml and members/) or an export "
            "(model_card.json)"
        )
    return _KINDS[kind](p)  # type: ignore[return-value]


def _config(cls: type, what: str, options: dict[str, Any]) -> Any:
    """``cls(**options)``, with an unknown option named (and the closest one suggested) instead of a TypeError."""
    check_keys(cls, options, where=what, noun="option", listing="the options are")
    return cls(**options)


def train(*, model: str, data: PathLike, out: PathLike, **options: Any) -> Run:
    """Adapt ``model`` to ``data`` (``transferlab train``) and return the finished run.

    ``options`` are :class:`~transferlab.training.config.TrainConfig`'s fields: ``strategy`` (``linear-probe``,
    ``bn-only``, ``full``, ``freeze-unfreeze``, ``scratch``), ``epochs``, ``lr``, ``head``, ``img_size``, ...
    ``bad_images``, ``tensorboard``, ``callback`` (called with ``("step" | "epoch", row)`` as training goes) and
    ``hooks`` (a :class:`~transferlab.training.hooks.FitHooks`, called at fixed points of every step) pass through.
    """
    extra = {k: options.pop(k) for k in ("bad_images", "callback", "tensorboard", "hooks") if k in options}
    cfg = _config(TrainConfig, "train", {"model": model, "data": str(data), "out": Path(out), **options})
    _train(cfg, **extra)
    return Run(Path(out))


def evaluate(
    source: PathLike | Folder | None = None,
    *,
    data: PathLike,
    out: PathLike,
    model: str | None = None,
    **options: Any,
) -> Evaluation:
    """Evaluate a pretrained ``model`` (``zero_shot=True`` for its ImageNet head) or a trained run folder
    ``source`` on ``data`` (``transferlab evaluate``); ``split`` defaults to ``val``."""
    if (source is None) == (model is None):
        raise ConfigError(
            "evaluate: give either a run folder (RUN_DIR; source in Python) or a pretrained model (--model; model= "
            "in Python), not both"
        )
    run = Path(source) if source is not None else None
    cfg = _config(EvalConfig, "evaluate", {"data": str(data), "out": Path(out), "model": model, "run": run, **options})
    _evaluate(cfg)
    return Evaluation(Path(out))


def ensemble(members: Sequence[PathLike | Folder], *, out: PathLike, method: str = "mean", **options: Any) -> Ensemble:
    """Combine the saved predictions of ``members`` (``transferlab ensemble``): ``mean``, ``vote``, ``weighted``,
    ``greedy`` or ``stack``, fitted on one half of the split and reported on the other."""
    specs = tuple(str(Path(m)) for m in members)
    cfg = _config(EnsembleConfig, "ensemble", {"members": specs, "out": Path(out), "method": method, **options})
    run_ensemble(cfg)
    return Ensemble(Path(out))


def study(spec: PathLike | StudySpec, *, out: PathLike, **options: Any) -> Study:
    """Run (or resume) a study spec (``transferlab study``): members, ensembles and the report."""
    loaded = spec if isinstance(spec, StudySpec) else load_spec(spec)
    outcome = run_study(loaded, Path(out), **options)
    return Study(Path(out), outcome)


def predict(source: PathLike | Folder, images: Sequence[PathLike], *, top_k: int = 5, **options: Any) -> PredictResult:
    """Top-``top_k`` classes of image files or folders with any run, export, ensemble or study
    (``transferlab predict``); an unreadable image is an error row, the others are still predicted."""
    inputs = tuple(str(i) for i in images)
    cfg = _config(PredictConfig, "predict", {"source": Path(source), "inputs": inputs, "top_k": top_k, **options})
    return _predict(cfg)


def export(run: PathLike | Folder, *, out: PathLike, format: str = "safetensors", **options: Any) -> Export:
    """Export a run's model with its model card (``transferlab export``): ``safetensors`` for :func:`predict`
    without the run directory, or ``onnx`` (checked against PyTorch in ONNX Runtime before anything is written)."""
    cfg = _config(ExportConfig, "export", {"run": Path(run), "out": Path(out), "format": format, **options})
    export_run(cfg)
    return Export(Path(out))


def auto(*, data: PathLike, out: PathLike, budget: str = "20m", **options: Any) -> AutoResult:
    """The best model for ``data`` in ``budget`` (``transferlab auto``): measure the candidates here, plan what
    fits, run it as a study into ``out`` and report. ``dry_run=True`` returns the plan without running it."""
    on_plan = options.pop("on_plan", None)
    cfg = _config(AutoConfig, "auto", {"data": str(data), "out": Path(out), "budget": budget, **options})
    return run_auto(cfg, on_plan=on_plan)


def report(folders: Sequence[PathLike | Folder], *, out: PathLike, **options: Any) -> ReportResult:
    """Build the HTML and Markdown report of runs, ensembles or folders of them (``transferlab report``);
    no model is loaded. ``data`` adds class names and a grid of misclassified images."""
    dirs = tuple(str(Path(f)) for f in folders)
    return build_report(_config(ReportConfig, "report", {"dirs": dirs, "out": Path(out), **options}))
