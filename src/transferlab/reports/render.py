"""``transferlab report``: a report rebuilt from run directories alone.

Everything comes from files that training and ensembling already wrote - ``metrics.json``,
``history.csv``, ``config.yaml``, ``predictions/<split>.npz``, ``weights.json`` - so a report can be
rebuilt anywhere, at any time, without a GPU, without the weights and without re-running anything.
No model is created or loaded (and torch is not even imported): the predictions files hold every
logit a figure needs.

Output: ``report.html``, one self-contained file that works offline (CSS inline, every figure a base64
PNG data URI, no scripts and no external references, so it can be mailed or archived), and
``report.md`` with the same content, its figures written to ``figures/`` and linked relatively. Both
are composed from one list of blocks, so they cannot drift apart.

Numbers are shown as they were measured: a run's row is its ``--report-split``; an ensemble's row is
the report half of its split (the other half fitted it), so an ensemble is compared with its members
through the paired bootstrap that ``transferlab ensemble`` recorded, never through rows measured on
different samples.
"""

from __future__ import annotations

import base64
import csv
import html
import json
import logging
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from transferlab._version import __version__
from transferlab.artifacts.folders import METRICS_FILE, folder_kind
from transferlab.artifacts.predictions import (
    PREDICTIONS_DIR,
    Predictions,
    find_predictions,
    prediction_splits,
    read_predictions,
)
from transferlab.artifacts.summary import ECE_BINS
from transferlab.errors import ConfigError, DataError
from transferlab.io import atomic_write_bytes, atomic_write_text
from transferlab.metrics import (
    bootstrap_ci,
    confusion_matrix,
    expected_calibration_error,
    most_confused,
    paired_bootstrap,
    per_class_accuracy,
)
from transferlab.options import option
from transferlab.reports import figures as F
from transferlab.reports.study_files import LabelCurve, Plan, PlanCandidate, read_labels, read_plan

log = logging.getLogger(__name__)

__all__ = [
    "EnsembleDir",
    "Predictions",
    "ReportConfig",
    "ReportInputs",
    "ReportResult",
    "RunDir",
    "build_report",
    "find_report_dirs",
    "load_inputs",
]

N_CONFUSED = 10
N_EXTREMES = 5
N_GRID = 24
_WHAT = (
    "pass run directories from `transferlab train`, ensemble folders from `transferlab ensemble`, or a folder "
    "holding them"
)


# --------------------------------------------------------------------------------------------------
# Inputs


@dataclass(frozen=True)
class ReportConfig:
    """What a report is built from. Invalid values fail here, naming the option."""

    dirs: tuple[str, ...] = option(
        help="a run directory (config.yaml, metrics.json, history.csv, predictions/<split>.npz), an ensemble folder "
        "(metrics.json with an ensemble block, weights.json), or a folder holding them (scanned one level down; "
        "folders without metrics.json, e.g. runs in progress, are skipped)",
        flag="dirs",
        nargs="+",
        metavar="DIR",
    )
    out: Path = option(help="output folder (created): report.html, report.md, figures/", required=True)
    data: str | None = option(
        None,
        "the dataset the runs were evaluated on, for class names (e.g. words.txt of Tiny ImageNet) and a grid of "
        "misclassified images: a folder, a .zip, CIFAR-10 batches, or a dataset name found in $TRANSFERLAB_DATA or "
        "the user cache; never downloaded",
        default_text="class ids, no images",
    )
    title: str | None = option(None, "title at the top of the report", default_text="Transfer-learning report")
    #: The resolved study spec (YAML text), shown under Provenance when the report belongs to a study.
    spec_text: str | None = None
    #: The study folder whose plan.json and labels.json (a planner's, optional) get their own sections. None: the
    #: folder holding the ``members/`` and ``ensembles/`` folders that ``dirs`` are in, when they all share one.
    study: Path | None = None

    def __post_init__(self) -> None:
        if not self.dirs:
            raise ConfigError(f"no directories given: {_WHAT}")
        out = Path(self.out)
        if out.exists() and not out.is_dir():
            raise ConfigError(f"--out {out} is a file; give a folder for report.html, report.md and figures/")
        if self.title is not None and not self.title.strip():
            raise ConfigError("--title is empty; leave it out for the default title")


@dataclass
class RunDir:
    """A training run directory, as read back from disk."""

    path: Path
    name: str
    metrics: dict[str, Any]
    preds: Predictions
    config_text: str | None
    config: dict[str, Any]
    history: list[dict[str, float]]

    @property
    def top1(self) -> float:
        return _num(self.metrics.get("top1"))

    @property
    def nll(self) -> float:
        return _num(self.metrics.get("nll"))

    @property
    def ece(self) -> float:
        """metrics.json's ECE, or the 15-bin ECE of the predictions file when it has none."""
        if isinstance(self.metrics.get("ece"), int | float):
            return float(self.metrics["ece"])
        return expected_calibration_error(self.preds.probs, self.preds.targets, ECE_BINS)

    @property
    def top1_ci(self) -> tuple[float, float]:
        """metrics.json's interval, or a bootstrap of the predictions file when it has none."""
        ci = self.metrics.get("top1_ci")
        if isinstance(ci, list) and len(ci) == 2 and all(isinstance(v, int | float) for v in ci):
            return float(ci[0]), float(ci[1])
        correct = np.argmax(self.preds.logits, axis=1) == self.preds.targets
        return bootstrap_ci(correct, seed=int(self.config.get("seed", 0) or 0))


@dataclass
class EnsembleDir:
    """An ensemble folder from ``transferlab ensemble``, as read back from disk."""

    path: Path
    name: str
    metrics: dict[str, Any]
    preds: Predictions
    weights: dict[str, Any] | None

    @property
    def block(self) -> dict[str, Any]:
        return self.metrics["ensemble"]

    @property
    def top1(self) -> float:
        return _num(self.block.get("top1"))

    @property
    def nll(self) -> float:
        return _num(self.block.get("nll"))

    @property
    def ece(self) -> float:
        if isinstance(self.block.get("ece"), int | float):
            return float(self.block["ece"])
        return expected_calibration_error(self.preds.probs, self.preds.targets, ECE_BINS)

    @property
    def members(self) -> list[dict[str, Any]]:
        return [m for m in self.metrics.get("members", []) if isinstance(m, dict)]


@dataclass
class ReportInputs:
    """Every run and ensemble found, in the order given."""

    runs: list[RunDir]
    ensembles: list[EnsembleDir]


@dataclass(frozen=True)
class ReportResult:
    """Where the report went and what it covers."""

    html: Path
    markdown: Path
    figures: tuple[Path, ...]
    runs: tuple[str, ...]
    ensembles: tuple[str, ...]
    best: str | None


def _num(x: Any) -> float:
    return float(x) if isinstance(x, int | float) and not isinstance(x, bool) else math.nan


def _read_json(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: cannot read it as JSON ({e}); the run may be incomplete - re-run it") from e
    if not isinstance(doc, dict):
        raise DataError(f"{path}: expected a JSON object of metrics; was it written by transferlab?")
    return doc


def _kind(path: Path) -> str | None:
    """``run`` (a training run or an evaluate output), ``ensemble``, or None for a folder that is neither or
    has no metrics.json yet (a run still in progress)."""
    if not (path / METRICS_FILE).is_file():
        return None
    kind = folder_kind(path)
    if kind == "ensemble":
        return "ensemble"
    return "run" if kind in ("run", "evaluation") else None


def find_report_dirs(specs: Sequence[str | Path]) -> list[tuple[str, Path]]:
    """(kind, folder) for every run or ensemble that ``specs`` name, in order, without duplicates.

    A spec that is itself a run or an ensemble is taken as is; any other folder is scanned one level
    down, and must hold at least one. Raises DataError naming the spec otherwise.
    """
    found: list[tuple[str, Path]] = []
    seen: set[Path] = set()

    def add(kind: str, p: Path) -> None:
        key = p.resolve()
        if key not in seen:
            seen.add(key)
            found.append((kind, p))

    for spec in specs:
        p = Path(spec)
        if not p.exists():
            raise DataError(f"{spec}: no such folder; {_WHAT}")
        if not p.is_dir():
            raise DataError(f"{spec}: not a folder; {_WHAT}")
        kind = _kind(p)
        if kind is not None:
            add(kind, p)
            continue
        inside = [(k, q) for q in sorted(p.iterdir()) if q.is_dir() and (k := _kind(q)) is not None]
        if not inside:
            if (p / "metrics.json").is_file():
                why = "it has a metrics.json but no config.yaml and no predictions"
            else:
                why = "it has no metrics.json and no subfolder with one (a run still in progress has none)"
            raise DataError(
                f"{spec}: not a run directory, an ensemble folder, or a folder holding them: {why}; {_WHAT}"
            )
        for k, q in inside:
            add(k, q)
    return found


def _read_predictions(path: Path | None, owner: Path, split: str) -> Predictions:
    """``owner``'s predictions on ``split``, checked (artifacts.predictions), so a broken file fails here, naming it."""
    if path is None:
        have = prediction_splits(owner)
        hint = f" (it has predictions for {', '.join(have)})" if have else ""
        raise DataError(
            f"{owner}: no {PREDICTIONS_DIR}/{split}.npz{hint}; the report needs the predictions on the split in "
            "metrics.json - re-run `transferlab train` / `transferlab ensemble` for this folder"
        )
    preds = read_predictions(path, labeled=True)
    if len(preds.targets) == 0:
        raise DataError(f"{path}: no samples; a report needs labeled predictions")
    preds.logits = preds.logits.astype(np.float64)
    return preds


def _read_history(path: Path) -> list[dict[str, float]]:
    if not path.is_file():
        return []
    try:
        with path.open(encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{path}: cannot read it as CSV ({e}); delete it to build the report without curves") from e
    out = []
    for r in rows:
        row: dict[str, float] = {}
        for k, v in r.items():
            if k is None:
                continue
            try:
                row[k] = float(v) if v not in (None, "") else math.nan
            except ValueError:
                row[k] = math.nan
        if math.isfinite(row.get("epoch", math.nan)):
            out.append(row)
    return out


def _load_run(path: Path, name: str) -> RunDir:
    import yaml

    metrics = _read_json(path / "metrics.json")
    if not isinstance(metrics.get("top1"), int | float):
        raise DataError(f"{path / 'metrics.json'}: has no top1; it is not a finished run's metrics - re-run it")
    split = str(metrics.get("split", "val"))
    preds = _read_predictions(find_predictions(path, split), path, split)
    config_text = None
    config: dict[str, Any] = {}
    cfg_path = path / "config.yaml"
    if cfg_path.is_file():
        config_text = cfg_path.read_text(encoding="utf-8", errors="replace")
        try:
            loaded = yaml.safe_load(config_text)
            config = loaded if isinstance(loaded, dict) else {}
        except yaml.YAMLError as e:
            log.warning("%s: cannot parse it (%s); shown as text only", cfg_path, e)
    return RunDir(path, name, metrics, preds, config_text, config, _read_history(path / "history.csv"))


def _load_ensemble(path: Path, name: str) -> EnsembleDir:
    metrics = _read_json(path / "metrics.json")
    if not isinstance(metrics.get("ensemble"), dict) or not isinstance(metrics["ensemble"].get("top1"), int | float):
        raise DataError(f"{path / 'metrics.json'}: no ensemble results in it; re-run `transferlab ensemble`")
    split = str(metrics.get("split", "val"))
    preds = _read_predictions(find_predictions(path, split), path, split)
    weights = _read_json(path / "weights.json") if (path / "weights.json").is_file() else None
    return EnsembleDir(path, name, metrics, preds, weights)


def _names(paths: Sequence[Path]) -> list[str]:
    """Folder names, prefixed with the parent's where two folders share a name."""
    base = [p.name or str(p) for p in paths]
    return [f"{p.parent.name}/{n}" if base.count(n) > 1 else n for p, n in zip(paths, base, strict=True)]


def load_inputs(specs: Sequence[str | Path]) -> ReportInputs:
    """Read every run and ensemble that ``specs`` name (see :func:`find_report_dirs`)."""
    found = find_report_dirs(specs)
    names = _names([p for _, p in found])
    runs, ensembles = [], []
    for (kind, p), name in zip(found, names, strict=True):
        if kind == "run":
            runs.append(_load_run(p, name))
        else:
            ensembles.append(_load_ensemble(p, name))
    log.info("report: %d run(s), %d ensemble(s)", len(runs), len(ensembles))
    return ReportInputs(runs, ensembles)


# --------------------------------------------------------------------------------------------------
# Document blocks: composed once, rendered to HTML and to Markdown


class Strong(str):
    """A span rendered in bold."""

    __slots__ = ()


@dataclass
class Heading:
    text: str
    level: int
    anchor: str


@dataclass
class Text:
    parts: tuple[str, ...]
    style: str = "p"
    """``p``, ``note`` (muted), ``warn`` (a warning box) or ``verdict`` (a highlighted sentence)."""


@dataclass
class Table:
    """Rows of plain-text cells; a newline in a cell starts a second, muted line (a space in Markdown)."""

    header: list[str]
    rows: list[list[str]]
    marked: frozenset[int] = frozenset()
    numeric: frozenset[int] = frozenset()
    kv: bool = False
    caption: str = ""
    flag_first: bool = False
    """The first column holds the marked rows' flag (★ best), drawn in the accent colour."""
    name: str = ""
    """Extra CSS class of the table (``summary`` gets its own column rules)."""


@dataclass
class Card:
    """One headline number: what it is, the number, and the fine print that makes it honest."""

    label: str
    value: str
    detail: str = ""
    tone: str = ""
    """``lead`` (the answer itself), ``good``, ``unsure``, ``bad`` or empty: the card's accent."""


@dataclass
class Cards:
    cards: list[Card]


@dataclass
class Fig:
    key: str
    png: bytes
    alt: str
    caption: str = ""


@dataclass
class FigRow:
    figs: list[Fig]


@dataclass
class Details:
    summary: str
    text: str
    lang: str = ""


Block = Heading | Text | Table | Fig | FigRow | Details | Cards


def _slug(text: str) -> str:
    s = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return s or "x"


class _Doc:
    """Blocks in order, with unique anchors and figure keys."""

    def __init__(self) -> None:
        self.blocks: list[Block] = []
        self._used: set[str] = set()

    def unique(self, base: str) -> str:
        key, i = _slug(base), 2
        while key in self._used:
            key = f"{_slug(base)}-{i}"
            i += 1
        self._used.add(key)
        return key

    def h(self, text: str, level: int = 2) -> None:
        self.blocks.append(Heading(text, level, self.unique(text)))

    def p(self, *parts: str, style: str = "p") -> None:
        self.blocks.append(Text(tuple(parts), style))

    def fig(self, key: str, png: bytes, alt: str, caption: str = "") -> Fig:
        return Fig(self.unique(key), png, alt, caption)

    def add(self, block: Block) -> None:
        self.blocks.append(block)


# --------------------------------------------------------------------------------------------------
# Formatting


def _pct(x: float, digits: int = 2) -> str:
    return "n/a" if not math.isfinite(x) else f"{100 * x:.{digits}f}%"


def _ci(lo: Any, hi: Any) -> str:
    if not isinstance(lo, int | float) or not isinstance(hi, int | float):
        return ""
    return f"{100 * lo:.2f}–{100 * hi:.2f}"


def _f(x: float, digits: int = 3) -> str:
    return "n/a" if not math.isfinite(x) else f"{x:.{digits}f}"


def _count(n: Any) -> str:
    if not isinstance(n, int | float):
        return "—"
    if n >= 1e6:
        return f"{n / 1e6:.2f}M"
    if n >= 1e3:
        return f"{n / 1e3:.1f}k"
    return f"{int(n)}"


def _dur(s: Any) -> str:
    if not isinstance(s, int | float) or not math.isfinite(s):
        return "—"
    if s < 60:
        return f"{s:.1f} s"
    if s < 3600:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.2f} h"


def _count_all(n: Any) -> str:
    """A whole count with thousands separators (2,500), or as given when it is not a number."""
    return f"{int(n):,}" if isinstance(n, int | float) and not isinstance(n, bool) else str(n)


def _signed(x: float) -> str:
    """Percentage points with an explicit sign and a real minus sign (−0.72, +1.20)."""
    return f"{100 * x:+.2f}".replace("-", "\u2212")


def _short(name: str) -> str:
    """The first synonym of a WordNet-style name ("goldfish, Carassius auratus" -> "goldfish")."""
    return name.split(",")[0].strip() or name


# --------------------------------------------------------------------------------------------------
# Class names and images


class _Classes:
    """Class names by id: from ``--data``, else from an ensemble's recorded per-class names, else the id."""

    def __init__(self, lookup: Mapping[str, str]) -> None:
        self.lookup = dict(lookup)

    def names(self, class_ids: Iterable[str]) -> list[str]:
        return [_short(self.lookup.get(c, c)) for c in class_ids]


def _class_lookup(source: Any, data: str | None, inputs: ReportInputs) -> dict[str, str]:
    lookup: dict[str, str] = {}
    for e in inputs.ensembles:
        for row in e.block.get("per_class", []) or []:
            if isinstance(row, dict) and isinstance(row.get("id"), str) and isinstance(row.get("name"), str):
                lookup.setdefault(row["id"], row["name"])
    if source is None:
        return lookup
    from_data = dict(zip(source.classes.ids, source.classes.names, strict=True))
    ours = {c for r in [*inputs.runs, *inputs.ensembles] for c in r.preds.class_ids.tolist()}
    if ours and not ours & set(from_data):
        example = sorted(ours)[0]
        raise ConfigError(
            f"--data {data}: none of the runs' class ids (e.g. {example}) is a class of {source.location}; pass the "
            "dataset the runs were trained on, or leave --data out"
        )
    lookup.update(from_data)
    return lookup


def _misclassified_tiles(
    preds: Predictions, source: Any, split: str, classes: _Classes, data: str | None
) -> tuple[list[F.Tile], int]:
    """The most confident mistakes as image tiles (and how many mistakes there are in all)."""
    probs = preds.probs
    pred = np.argmax(probs, axis=1)
    wrong = np.flatnonzero(pred != preds.targets)
    conf = probs[wrong, pred[wrong]]
    order = wrong[np.lexsort((wrong, -conf))]
    image_split = source.split(split)
    index = {sid: i for i, sid in enumerate(image_split.sample_ids)}
    if len(wrong) and not any(str(s) in index for s in preds.sample_ids[order[: N_GRID * 4]].tolist()):
        raise DataError(
            f"--data {data}: none of the sample ids of {preds.path} (e.g. {preds.sample_ids[order[0]]!r}) is in split "
            f"{split!r} of {source.location}; pass the dataset the runs were evaluated on"
        )
    names = classes.names(preds.class_ids.tolist())
    tiles: list[F.Tile] = []
    absent = 0
    for row in order:
        if len(tiles) == N_GRID:
            break
        sid = str(preds.sample_ids[row])
        if sid not in index:
            absent += 1
            continue
        try:
            img = image_split.load(index[sid])
        except DataError as e:
            log.warning("cannot show %s: %s", sid, e)
            continue
        tiles.append(F.Tile(img, names[preds.targets[row]], names[pred[row]], float(probs[row, pred[row]])))
    if absent:
        log.warning("%d mistakes of %s are not in %s/%s; skipped", absent, preds.path, source.location, split)
    return tiles, len(wrong)


# --------------------------------------------------------------------------------------------------
# Composition


def _verdict(e: EnsembleDir) -> tuple[str, str]:
    """(short table label, sentence) for "does the ensemble beat its best member", from metrics.json."""
    vs = e.metrics.get("vs_best_member") or {}
    best = (e.metrics.get("best_member") or {}).get("name", "its best member")
    gain, ci = vs.get("gain"), vs.get("gain_ci") or [None, None]
    n = (e.metrics.get("protocol") or {}).get("n_report") or e.block.get("n")
    if not isinstance(gain, int | float) or not all(isinstance(v, int | float) for v in ci):
        return "not measured", f"{e.name}: the comparison with the best member was not measured."
    lo, hi = ci
    p = vs.get("p_gain_positive")
    detail = (
        f"{_signed(gain)} points top-1 (95% interval {_signed(lo)} to {_signed(hi)}; paired bootstrap over the "
        f"same {_count_all(n)} report samples"
        + (f", the gain was positive in {100 * p:.0f}% of resamples" if isinstance(p, int | float) else "")
        + ")"
    )
    on = "the selection data" if (e.metrics.get("protocol") or {}).get("mode") == "select-data" else "the select half"
    who = f"its best member {best} (chosen on {on})"
    if lo > 0:
        return f"beats best member ({_signed(gain)}\u00a0pts)", f"{e.name} beats {who}: {detail}."
    if hi < 0:
        return f"worse than best member ({_signed(gain)}\u00a0pts)", f"{e.name} is worse than {who}: {detail}."
    return (
        f"no clear difference ({_signed(gain)}\u00a0pts)",
        f"{e.name} is not shown to beat {who}: {detail}. The interval includes zero, so the difference may be chance.",
    )


def _training(m: Mapping[str, Any]) -> str:
    """How a run was trained, then (second line) how many epochs and which one was kept."""
    strategy = str(m.get("strategy") or ("zero-shot (ImageNet head)" if m.get("mode") == "zero-shot" else "—"))
    if m.get("head") not in (None, "linear"):
        strategy += f", {str(m['head']).split(':')[0]} head"  # the full head spec is under Provenance
    if m.get("head_init"):
        strategy += f", head init {m['head_init']}"
    epochs = m.get("epochs_run")
    if epochs is None:
        return strategy
    ep = f"{epochs} epoch{'s' * (epochs != 1)}"
    if m.get("best_epoch") is not None:
        ep += f", kept {m['best_epoch']}"
    if m.get("stopped_early"):
        ep += ", stopped early"
    return f"{strategy}\n{ep}"


def _run_cells(r: RunDir) -> list[str]:
    """A run's summary cells, in the order of ``_SUMMARY_HEADER`` after the flag."""
    m = r.metrics
    lo, hi = r.top1_ci
    model = str(m.get("model", "—")) + (f"\n{m['img_size']} px" if m.get("img_size") else "")
    return [
        r.name,
        f"{_pct(r.top1)}\n({_ci(lo, hi)})",
        _pct(_num(m.get("top5"))),
        _f(r.nll),
        _f(r.ece),
        "—",
        model,
        _training(m),
        _count(m.get("params_trained", 0 if m.get("mode") == "zero-shot" else None)),
        _dur(m.get("wall_s", m.get("train_seconds"))),
        f"{m.get('split', '?')}\n{len(r.preds.targets):,}",
    ]


def _ensemble_where(e: EnsembleDir) -> str:
    """The samples an ensemble's numbers are on: the report half of its split when it was fitted on the other
    half (``protocol.mode`` "split", the only mode older folders have), else the split itself."""
    split = str(e.metrics.get("split", "?"))
    mode = (e.metrics.get("protocol") or {}).get("mode", "split")
    return f"report half of {split}" if mode == "split" else split


def _ensemble_on(e: EnsembleDir) -> str:
    """:func:`_ensemble_where` in a sentence: "the report half of val", or "val"."""
    where = _ensemble_where(e)
    return f"the {where}" if where.startswith("report half") else where


def _ensemble_cells(e: EnsembleDir, runs_by_name: Mapping[str, RunDir]) -> list[str]:
    b = e.block
    method = str(e.metrics.get("method", "?"))
    if e.metrics.get("temperature"):
        method += ", temperature-scaled"
    sizes = sorted(
        {runs_by_name[m["name"]].metrics.get("img_size") for m in e.members if m.get("name") in runs_by_name} - {None}
    )
    res = "" if not sizes else (f"\n{sizes[0]} px" if len(sizes) == 1 else f"\n{sizes[0]}-{sizes[-1]} px")
    lo, hi = (b.get("top1_ci") or [None, None])[:2]
    return [
        e.name,
        f"{_pct(e.top1)}\n({_ci(lo, hi)})",
        _pct(_num(b.get("top5"))),
        _f(e.nll),
        _f(e.ece),
        _verdict(e)[0],
        f"ensemble of {len(e.members)}{res}",
        method,
        "—",
        "—",
        f"{_ensemble_where(e)}\n{len(e.preds.targets):,}",
    ]


def _member_runs(e: EnsembleDir, runs: Sequence[RunDir]) -> list[int]:
    """Indices of the runs that are members of ``e`` (by predictions file, then by name)."""
    paths = set()
    for m in e.members + list((e.weights or {}).get("members", []) or []):
        if isinstance(m, dict) and isinstance(m.get("path"), str):
            paths.add(Path(m["path"]).resolve())
    names = {m.get("name") for m in e.members}
    return [i for i, r in enumerate(runs) if r.preds.path.resolve() in paths or r.name in names]


def _ordered_rows(inputs: ReportInputs) -> list[RunDir | EnsembleDir]:
    """Runs in the order given, each ensemble right after the last of its members that is shown."""
    after: dict[int, list[EnsembleDir]] = {}
    for e in inputs.ensembles:
        idx = _member_runs(e, inputs.runs)
        after.setdefault(max(idx) if idx else len(inputs.runs) - 1, []).append(e)
    out: list[RunDir | EnsembleDir] = list(after.get(-1, []))
    for i, r in enumerate(inputs.runs):
        out.append(r)
        out.extend(after.get(i, []))
    return out


def _best(items: Sequence[RunDir | EnsembleDir]) -> RunDir | EnsembleDir | None:
    ok = [x for x in items if math.isfinite(x.top1)]
    if not ok:
        return None
    return max(ok, key=lambda x: (x.top1, -x.nll if math.isfinite(x.nll) else -math.inf))


def _chosen_on_holdout(inputs: ReportInputs, plan: Plan | None) -> RunDir | None:
    """The member a planner's holdout scores pick (the highest holdout top-1 of those that ran and are in the
    report), or None without a plan: choosing the answer there keeps the report split unchosen-on."""
    if plan is None:
        return None
    runs = {r.name: r for r in inputs.runs}
    scored = [c for c in plan.candidates if c.holdout_top1 is not None and c.status == "ran" and c.name in runs]
    if not scored:
        return None
    return runs[max(scored, key=lambda c: float(c.holdout_top1 or 0.0)).name]


def _answer_row(inputs: ReportInputs, single: RunDir | None = None) -> RunDir | EnsembleDir | None:
    """The model the report answers with. Of the members: ``single`` (the planner's holdout choice) where given,
    else the highest top-1 (ties: lower NLL). An ensemble replaces it only if its paired bootstrap shows it
    beating its best member and its top-1 is higher; otherwise the simpler single model is the answer."""
    proven = [e for e in inputs.ensembles if ((e.metrics.get("vs_best_member") or {}).get("gain_ci") or [0])[0] > 0]
    pool = [single, *proven] if single is not None else [*inputs.runs, *proven]
    return _best(pool) or _best(inputs.ensembles)


# Accuracy, calibration and the verdict first, then how each row was obtained. Fourteen columns ran off a
# 1400 px window; the resolution now sits under the backbone, the epochs under the strategy, and the time
# summed over epochs went to Provenance (the wall time is the cost a reader compares).
_SUMMARY_HEADER = [
    "",
    "member",
    "top-1 (95% interval)",
    "top-5",
    "NLL",
    "ECE",
    "vs best member",
    "model",
    "training",
    "params trained",
    "wall time",
    "evaluated on",
]
_SUMMARY_NUMERIC = frozenset({2, 3, 4, 5, 9, 10})


def _summary(
    doc: _Doc, inputs: ReportInputs, best_row: RunDir | EnsembleDir | None, *, on_holdout: bool = False
) -> None:
    doc.h("Summary")
    runs_by_name = {r.name: r for r in inputs.runs}
    rows, marked = [], set()
    for i, x in enumerate(_ordered_rows(inputs)):
        cells = _run_cells(x) if isinstance(x, RunDir) else _ensemble_cells(x, runs_by_name)
        if x is best_row:
            marked.add(i)
        rows.append(["★ best" if x is best_row else "", *cells])
    doc.add(Table(_SUMMARY_HEADER, rows, frozenset(marked), _SUMMARY_NUMERIC, flag_first=True, name="summary"))
    how = (
        "of the members, the one with the highest top-1 on the train holdout (see Plan: val was not used to choose it)"
        if on_holdout
        else "the highest top-1 (ties: lower NLL)"
    )
    notes = [
        f"★ marks the answer: {how}; an ensemble only where the paired bootstrap shows it beating its best member. "
        "ECE: 15 equal-width confidence bins"
        + (", computed from the predictions file where metrics.json has none" if inputs.runs else "")
        + ". Wall time: the whole run, including loading, data checks and feature extraction (the time spent in "
        "epochs is under Provenance)."
    ]
    if inputs.ensembles:
        notes.append(
            "An ensemble is measured on the report half of its split (the other half fitted it), so its row and its "
            "members' rows cover different samples; the paired comparison below uses the same samples for both."
        )
    doc.p(" ".join(notes), style="note")
    if len(inputs.runs) >= 2 and not inputs.ensembles:  # with ensembles, the members are in their chart
        best_run = _best(inputs.runs)
        rows_iv = [
            F.Interval(r.name, r.top1, *r.top1_ci, kind="best" if r is best_run else "member") for r in inputs.runs
        ]
        png = F.interval_chart_png(rows_iv, title="Top-1 of each run on its own report split")
        doc.add(doc.fig("overview-top1", png, "top-1 accuracy of each run with 95% intervals", _overview_caption()))


def _overview_caption() -> str:
    return (
        "Points are top-1, whiskers the 95% bootstrap interval; the best run is highlighted. Overlapping intervals "
        "from independent bootstraps do not prove two runs equal - a paired test on the same samples is sharper."
    )


def _by_report_samples(ensembles: Sequence[EnsembleDir]) -> list[list[EnsembleDir]]:
    """Ensembles grouped by the samples they report on, in order: one chart can compare only those."""
    groups: dict[str, list[EnsembleDir]] = {}
    for e in ensembles:
        groups.setdefault(e.preds.ids_sha256, []).append(e)
    return list(groups.values())


def _gain_note(e: EnsembleDir) -> str:
    vs = e.metrics.get("vs_best_member") or {}
    gain = vs.get("gain")
    return f"({_signed(gain)} pts vs best member)" if isinstance(gain, int | float) else ""


def _ranking_bars(group: Sequence[EnsembleDir]) -> tuple[list[F.Bar], float | None, list[str]]:
    """Bars for the members (as measured on the group's report samples) and the ensembles, best first; the
    best single member's top-1 (the reference line) and its name(s)."""
    best_names = [str(n) for e in group if (n := (e.metrics.get("best_member") or {}).get("name"))]
    members: dict[str, F.Bar] = {}
    for e in group:
        for m in e.members:
            name = str(m.get("name"))
            lo, hi = (m.get("top1_ci") or [None, None])[:2]
            kind = "best" if name in best_names else "member"
            members.setdefault(name, F.Bar(name, _num(m.get("top1")), lo, hi, kind))
    ensembles = []
    for e in group:
        lo, hi = (e.block.get("top1_ci") or [None, None])[:2]
        method = str(e.metrics.get("method", "?"))
        label = e.name if method == e.name else f"{e.name} ({method})"
        ensembles.append(F.Bar(label, e.top1, lo, hi, "ensemble", _gain_note(e)))
    bars = sorted([*members.values(), *ensembles], key=lambda b: -b.value if math.isfinite(b.value) else math.inf)
    ref = next((b.value for b in bars if b.kind == "best"), None)
    return bars, ref, list(dict.fromkeys(best_names))


def _diversity(e: EnsembleDir) -> str:
    facts = []
    d = e.metrics.get("diversity") or {}
    if isinstance(d.get("mean_disagreement"), int | float):
        facts.append(f"members disagree on {100 * d['mean_disagreement']:.1f}% of samples on average")
    if isinstance(d.get("mean_error_correlation"), int | float):
        facts.append(f"mean error correlation {d['mean_error_correlation']:.2f}")
    return "; ".join(facts)


def _weights(e: EnsembleDir) -> str:
    w = e.metrics.get("weights")
    if not (isinstance(w, list) and len(w) == len(e.members) and e.metrics.get("method") != "mean"):
        return ""
    if not all(isinstance(x, int | float) for x in w):
        return ""
    return "Weights: " + ", ".join(f"{m.get('name')} {x:.2f}" for m, x in zip(e.members, w, strict=True)) + "."


def _ensembles(doc: _Doc, inputs: ReportInputs) -> None:
    if not inputs.ensembles:
        return
    doc.h("Ensembles vs members")
    in_chart: set[str] = set()
    for group in _by_report_samples(inputs.ensembles):
        bars, ref, best_names = _ranking_bars(group)
        in_chart.update(b.label for b in bars if b.kind != "ensemble")
        n = len(group[0].preds.targets)
        on = _ensemble_on(group[0])
        png = F.ranking_png(bars, title=f"Every model on the same {n:,} samples of {on}", reference=ref)
        doc.add(
            doc.fig(
                "top1-all-models",
                png,
                f"top-1 of {len(group)} ensemble(s) and their members on the same report samples, with 95% intervals",
                f"Bars: top-1 on {on} only, whiskers the 95% bootstrap interval, best first. The best single member "
                f"({', '.join(best_names) or 'not recorded'}) was chosen where the ensembles were fitted, not on these "
                "samples; the dashed line is its top-1. An ensemble's gain is the paired bootstrap over the same "
                "samples.",
            )
        )
    others = [r.name for r in inputs.runs if r.name not in in_chart]
    if others:
        doc.p(
            f"Not in the chart: {', '.join(others)} (not a member of these ensembles, so not measured on their report "
            "samples; see the summary table).",
            style="note",
        )
    for e in inputs.ensembles:
        doc.p(_verdict(e)[1], *([" ", _weights(e)] if _weights(e) else []))
    diversity = list(dict.fromkeys(d for e in inputs.ensembles if (d := _diversity(e))))
    if len(diversity) == 1:
        doc.p(f"Diversity: {diversity[0]}.", style="note")
    else:
        for e in inputs.ensembles:
            if _diversity(e):
                doc.p(f"Diversity of {e.name}: {_diversity(e)}.", style="note")


def _calibration(doc: _Doc, focus: RunDir | None, inputs: ReportInputs) -> None:
    items: list[RunDir | EnsembleDir] = ([focus] if focus is not None else []) + list(inputs.ensembles)
    if not items:
        return
    doc.h("Calibration")
    doc.p(
        "Reliability diagrams (15 equal-width confidence bins): a calibrated model's bars follow the diagonal; bars "
        "below it are over-confident. ECE is the sample-weighted mean gap.",
        style="note",
    )
    figs = []
    for x in items:
        label = f"{x.name} (best member)" if x is focus else f"{x.name} (ensemble)"
        png = F.reliability_png(x.preds.probs, x.preds.targets, n_bins=ECE_BINS, title=label, ece=x.ece)
        figs.append(doc.fig(f"reliability-{x.name}", png, f"reliability diagram of {label}"))
    doc.add(FigRow(figs))


def _confused_table(x: RunDir | EnsembleDir, classes: _Classes) -> Table:
    p = x.preds
    cm = confusion_matrix(p.logits, p.targets, len(p.class_ids))
    names = classes.names(p.class_ids.tolist())
    pairs = most_confused(cm, k=N_CONFUSED, class_ids=p.class_ids.tolist(), class_names=names)
    rows = [
        [str(e["true_name"]), str(e["predicted_name"]), str(e["count"]), _pct(float(e["rate"]), 0)]  # type: ignore[arg-type]
        for e in pairs
    ]
    return Table(["true class", "predicted as", "count", "share of the true class"], rows, numeric=frozenset({2, 3}))


def _errors(
    doc: _Doc,
    focus: RunDir | EnsembleDir | None,
    inputs: ReportInputs,
    classes: _Classes,
    source: Any,
    data: str | None,
) -> None:
    if focus is None:
        return
    doc.h(f"Where {focus.name} goes wrong")
    what = "best member" if isinstance(focus, RunDir) else "best ensemble"
    split = str(focus.metrics.get("split", "val"))
    where = split if isinstance(focus, RunDir) else _ensemble_on(focus)
    doc.p(f"The {what}, ", Strong(focus.name), f", on {where} ({len(focus.preds.targets):,} samples).", style="note")

    doc.h("Most confused class pairs", 3)
    table = _confused_table(focus, classes)
    if table.rows:
        doc.add(table)
    else:
        doc.p("No mistakes.", style="note")
    for e in inputs.ensembles:
        if e is focus:
            continue
        doc.p("Ensemble ", Strong(e.name), f" ({_ensemble_where(e)}):")
        doc.add(_confused_table(e, classes))

    doc.h("Best and worst classes", 3)
    p = focus.preds
    acc = per_class_accuracy(p.logits, p.targets, len(p.class_ids))
    counts = np.bincount(p.targets, minlength=len(p.class_ids))
    have = np.flatnonzero(counts > 0)
    names = classes.names(p.class_ids.tolist())
    by_best = have[np.lexsort((have, -counts[have], -acc[have]))]
    by_worst = have[np.lexsort((have, -counts[have], acc[have]))]
    k = min(N_EXTREMES, len(have) // 2) or min(N_EXTREMES, len(have))
    best = [(names[i], float(acc[i]), int(counts[i])) for i in by_best[:k]]
    worst_idx = [i for i in by_worst[:k] if i not in set(by_best[:k].tolist())]
    worst = [(names[i], float(acc[i]), int(counts[i])) for i in worst_idx]
    png = F.class_extremes_png(best, worst, title=f"{focus.name}: best {len(best)} and worst {len(worst)} classes")
    top_ties = int((acc[have] == acc[have].max()).sum())
    low_ties = int((acc[have] == acc[have].min()).sum())
    caption = (
        f"Per-class top-1 on {split} (n = samples of the class). Ties are broken by more samples, then class order"
    )
    if top_ties > k or low_ties > k:
        caption += f"; {top_ties} classes share the top accuracy and {low_ties} the bottom one"
    doc.add(doc.fig(f"classes-{focus.name}", png, f"best and worst classes of {focus.name}", caption + "."))

    doc.h("Misclassified images", 3)
    if source is None:
        doc.p("Pass --data to show images of misclassified samples.", style="note")
        return
    tiles, n_wrong = _misclassified_tiles(p, source, split, classes, data)
    if not tiles:
        doc.p("No misclassified samples could be shown.", style="note")
        return
    png = F.image_grid_png(tiles, columns=6)
    doc.add(
        doc.fig(
            f"misclassified-{focus.name}",
            png,
            f"misclassified {split} images of {focus.name}",
            f"The {len(tiles)} most confident mistakes of {focus.name} (of {n_wrong:,} on {split}): true class in "
            "green, prediction and its probability in red.",
        )
    )


def _curves(doc: _Doc, inputs: ReportInputs) -> None:
    if not inputs.runs:
        return
    doc.h("Training curves")
    doc.p(
        "Per epoch, train vs the holdout (a class-stratified part of train that picked the epoch kept; the reported "
        "split was never used for any choice). Epoch 0, where present, scores the head before training.",
        style="note",
    )
    for r in inputs.runs:
        doc.h(r.name, 3)
        if not r.history:
            doc.p(f"No history.csv in {r.path}.", style="note")
            continue
        m = r.metrics
        title = f"{r.name}: {m.get('model', '?')} {m.get('strategy', '')}"
        best = m.get("best_epoch")
        png = F.curves_png(r.history, best_epoch=best if isinstance(best, int) else None, title=title)
        doc.add(doc.fig(f"curves-{r.name}", png, f"loss and accuracy curves of {r.name}", str(m.get("selection", ""))))


# --------------------------------------------------------------------------------------------------
# The answer: one block a reader can stop after


def _tone(lo: float, hi: float) -> str:
    return "good" if lo > 0 else "bad" if hi < 0 else "unsure"


def _sure_ensemble(e: EnsembleDir) -> Card:
    vs = e.metrics.get("vs_best_member") or {}
    best = (e.metrics.get("best_member") or {}).get("name", "its best member")
    gain, ci = vs.get("gain"), vs.get("gain_ci") or [None, None]
    if not isinstance(gain, int | float) or not all(isinstance(v, int | float) for v in ci):
        return Card("vs best single member", "not measured", f"{best}: the ensemble recorded no paired comparison")
    n = (e.metrics.get("protocol") or {}).get("n_report") or e.block.get("n")
    return Card(
        "vs best single member",
        f"{_signed(gain)} pts",
        f"over {best}; 95% interval {_signed(ci[0])} to {_signed(ci[1])} (paired bootstrap, the same "
        f"{_count_all(n)} samples)",
        _tone(ci[0], ci[1]),
    )


def _aligned_correct(a: RunDir, b: RunDir) -> tuple[np.ndarray, np.ndarray] | None:
    """Per-sample top-1 hits of ``a`` and ``b`` on the same samples in the same order, or None when the two
    runs were not evaluated on the same samples (then no paired test is possible)."""
    ia, ib = a.preds.sample_ids, b.preds.sample_ids
    if len(ia) != len(ib) or set(ia.tolist()) != set(ib.tolist()):
        return None
    where = {s: i for i, s in enumerate(ib.tolist())}
    order = np.array([where[s] for s in ia.tolist()])
    if not np.array_equal(a.preds.targets, b.preds.targets[order]):
        return None
    hits_a = np.argmax(a.preds.logits, axis=1) == a.preds.targets
    hits_b = (np.argmax(b.preds.logits, axis=1) == b.preds.targets)[order]
    return hits_a.astype(np.float64), hits_b.astype(np.float64)


def _sure_run(r: RunDir, inputs: ReportInputs) -> Card | None:
    """The best run against the runner-up, paired on the same samples when they share them."""
    rest = [x for x in inputs.runs if x is not r]
    runner = _best(rest)
    if runner is None:
        return None
    pair = _aligned_correct(r, runner)
    if pair is None:
        return Card(
            "vs runner-up",
            f"{_signed(r.top1 - runner.top1)} pts",
            f"over {runner.name}, measured on other samples: no paired test, so the gap may be chance",
            "unsure",
        )
    t = paired_bootstrap(*pair, seed=0)
    lo, hi = t["ci"]  # type: ignore[misc]
    return Card(
        "vs runner-up",
        f"{_signed(float(t['gain']))} pts",  # type: ignore[arg-type]
        f"over {runner.name}; 95% interval {_signed(lo)} to {_signed(hi)} (paired bootstrap, the same "
        f"{len(pair[0]):,} samples)",
        _tone(lo, hi),
    )


def _run_cost(r: RunDir) -> tuple[float, float]:
    m = r.metrics
    wall = _num(m.get("wall_s", m.get("train_seconds")))
    params = _num(m.get("params_trained", 0 if m.get("mode") == "zero-shot" else None))
    return wall, params


def _cost_value(wall: float, params: float, sep: str = "\n") -> str:
    """Wall time, then (on a second line of a card) the parameters trained."""
    parts = [
        f"{_dur(wall)} wall" if math.isfinite(wall) else "",
        f"{_count(params)} params trained" if math.isfinite(params) else "",
    ]
    return sep.join(p for p in parts if p) or "not recorded"


def _used_members(e: EnsembleDir) -> list[str]:
    """The members an ensemble needs at inference: those with a non-zero weight, else all of them."""
    w = e.metrics.get("weights")
    names = [str(m.get("name")) for m in e.members]
    if isinstance(w, list) and len(w) == len(names) and all(isinstance(x, int | float) for x in w):
        used = [n for n, x in zip(names, w, strict=True) if x != 0]
        return used or names
    return names


def _cost_ensemble(e: EnsembleDir, inputs: ReportInputs) -> Card:
    runs = {r.name: r for r in inputs.runs}
    found = [runs[str(m.get("name"))] for m in e.members if str(m.get("name")) in runs]
    costs = [_run_cost(r) for r in found]
    wall = math.fsum(c[0] for c in costs) if costs and all(math.isfinite(c[0]) for c in costs) else math.nan
    params = math.fsum(c[1] for c in costs) if costs and all(math.isfinite(c[1]) for c in costs) else math.nan
    n = len(e.members)
    who = f"all {n} members" if len(found) == n else f"{len(found)} of its {n} members (the others are not here)"
    detail = f"{who} together"
    used = _used_members(e)
    if len(used) < n:
        detail += f"; at inference it needs {len(used)}: {', '.join(used)}"
    best = (e.metrics.get("best_member") or {}).get("name")
    if best in runs:
        detail += f". {best} alone: {_cost_value(*_run_cost(runs[best]), sep=', ')}"
    return Card("Cost", _cost_value(wall, params), detail)


def _cost_run(r: RunDir, inputs: ReportInputs | None = None) -> Card:
    m = r.metrics
    how = _training(m).replace("\n", ", ")
    feat = m.get("feature_seconds")
    extra = f"; feature extraction {_dur(feat)}" if isinstance(feat, int | float) else ""
    wall, params = _run_cost(r)
    # A probe on other runs' features (metrics.json lists them) costs what they cost too.
    parents = [Path(str(x)).name for x in m.get("members") or []] if isinstance(m.get("members"), list) else []
    runs = {x.name: x for x in (inputs.runs if inputs is not None else [])}
    found = [runs[x] for x in parents if x in runs]
    if found and len(found) == len(parents):
        for c in (_run_cost(x) for x in found):
            wall, params = wall + c[0], params + c[1]
        alone = _dur(_run_cost(r)[0])
        extra = f"; with the {len(found)} runs whose features it reads ({', '.join(parents)}); alone {alone}"
    return Card("Cost", _cost_value(wall, params), f"{how}{extra}")


def _answer_cards(best: RunDir | EnsembleDir, inputs: ReportInputs) -> list[Card]:
    split = str(best.metrics.get("split", "?"))
    if isinstance(best, EnsembleDir):
        what = f"ensemble of {len(best.members)} members, {best.metrics.get('method', '?')}"
        where, (lo, hi) = _ensemble_on(best), (best.block.get("top1_ci") or [None, None])[:2]
        sure: Card | None = _sure_ensemble(best)
        cost = _cost_ensemble(best, inputs)
    else:
        what = f"{best.metrics.get('model', '?')}, {_training(best.metrics).splitlines()[0]}"
        where, (lo, hi) = split, best.top1_ci
        sure = _sure_run(best, inputs)
        cost = _cost_run(best, inputs)
    n = len(best.preds.targets)
    interval = f"95% interval {_ci(lo, hi)}; " if _ci(lo, hi) else ""
    cards = [
        Card("Best model", best.name, what, "lead"),
        Card(f"Top-1 on {where}", _pct(best.top1), f"{interval}{n:,} samples"),
    ]
    return [*cards, *([sure] if sure is not None else []), cost]


def _answer(
    doc: _Doc,
    inputs: ReportInputs,
    best: RunDir | EnsembleDir | None,
    plan: Plan | None,
    labels: LabelCurve | None,
) -> None:
    if best is None:
        return
    doc.h("Answer")
    doc.add(Cards(_answer_cards(best, inputs)))
    if isinstance(best, EnsembleDir):
        doc.p(_verdict(best)[1], style="verdict")
    sentence = _labels_sentence(labels) if labels is not None else None
    if sentence:
        doc.p(Strong("More labels: "), sentence)
    if plan is not None and plan.actual_s is not None:
        budget = f" of a {_dur(plan.budget_s)} budget" if plan.budget_s is not None else ""
        doc.p(Strong("Plan: "), f"the study took {_dur(plan.actual_s)}{budget}; see Plan below.")


# --------------------------------------------------------------------------------------------------
# The planner's sections (plan.json, labels.json), shown only when the study folder has them


def _study_folder(cfg: ReportConfig) -> Path | None:
    """``cfg.study``, else the one folder that holds the ``members/`` and ``ensembles/`` folders of every
    directory given (a study's layout), else None."""
    if cfg.study is not None:
        return Path(cfg.study)
    parents = {Path(d).resolve().parent for d in cfg.dirs}
    if parents and all(p.name in ("members", "ensembles") for p in parents):
        roots = {p.parent for p in parents}
        if len(roots) == 1:
            return roots.pop()
    return None


def _pts(x: float, sign: bool = False) -> str:
    """Points of top-1 to one decimal (an explicit + with ``sign``), with a real minus sign."""
    return f"{100 * x:{'+' if sign else ''}.1f}".replace("-", "\u2212")


def _labels_sentence(labels: LabelCurve) -> str | None:
    f = labels.fit
    if f is None or f.doubling_gain is None:
        return None
    n = f.at_per_class if f.at_per_class is not None else labels.points[-1].per_class
    gain = _pts(f.doubling_gain, sign=True)
    sentence = f"Doubling the labels ({n:g} → {2 * n:g} per class) should add about {gain} pt top-1"
    if f.doubling_lo is not None and f.doubling_hi is not None:
        sentence += f" ({_pts(f.doubling_lo)} to {_pts(f.doubling_hi)})"
        if f.doubling_lo <= 0:
            sentence += "; the interval includes no gain at all"
    return sentence + "."


def _labels_section(doc: _Doc, labels: LabelCurve) -> None:
    doc.h("Would more labels help?")
    sentence = _labels_sentence(labels)
    if sentence:
        doc.p(sentence, style="verdict")
    f = labels.fit
    n_max = labels.points[-1].per_class
    drawable = f is not None and f.drawable
    gain_at = None if f is None else (f.at_per_class if f.at_per_class is not None else n_max)
    who = labels.member or "the member"
    png = F.labels_png(
        [F.LabelsPoint(p.per_class, p.top1, p.lo, p.hi) for p in labels.points],
        curve=f.top1 if drawable and f is not None else None,
        extend_to=2 * n_max,
        gain_at=gain_at if drawable else None,
        title=f"{who}: top-1 on {labels.split or 'the report split'} against labels per class",
    )
    caption = (
        f"{who}" + (f" ({labels.model})" if labels.model else "") + " retrained on a class-stratified share of the "
        "labels; points are top-1 with their 95% interval. "
    )
    if f is None:
        caption += "No curve was fitted."
    elif drawable:
        caption += (
            f"The curve is the fit {f.form} (a = {f.a:.3g}, b = {f.b:.3g}, c = {f.c:.3g}), solid over the measured "
            f"range and dashed beyond {n_max:g} labels per class, where it is an extrapolation."
        )
    else:
        caption += f"The fit ({f.form}) is not one this report can draw; its predicted gain is quoted above."
    alt = "top-1 against the number of labels per class, with the fitted curve"
    doc.add(doc.fig("labels-curve", png, alt, caption))


def _plan_budget(plan: Plan) -> str:
    parts = []
    if plan.budget_s is not None:
        parts.append(f"Budget {_dur(plan.budget_s)}")
    if plan.predicted_s is not None:
        parts.append(f"predicted {_dur(plan.predicted_s)}")
    if plan.actual_s is not None:
        took = f"took {_dur(plan.actual_s)}"
        if plan.budget_s:
            took += f" ({100 * plan.actual_s / plan.budget_s:.0f}% of the budget)"
        parts.append(took)
    line = "; ".join(parts) or "No budget recorded"
    return line + (f", on {plan.cpu}" if plan.cpu else "") + "."


def _plan_cost(c: PlanCandidate) -> str:
    if c.actual_s is None or c.predicted_s is None or c.predicted_s <= 0:
        return _dur(c.actual_s)
    return f"{_dur(c.actual_s)}\n({100 * (c.actual_s / c.predicted_s - 1):+.0f}%)".replace("-", "\u2212")


def _plan_section(doc: _Doc, plan: Plan) -> None:
    doc.h("Plan")
    doc.p(_plan_budget(plan))
    rows, marked = [], set()
    for i, c in enumerate(plan.candidates):
        if c.status == "chosen":
            marked.add(i)
        model = (c.model or "—") + (f" @ {c.img_size}" if c.img_size else "")
        top1 = "—" if c.holdout_top1 is None else _pct(c.holdout_top1)
        rows.append([c.name, model, c.kind or "—", _dur(c.predicted_s), _plan_cost(c), top1, c.status, c.why])
    header = ["candidate", "model @ size", "kind", "predicted cost", "actual cost", "holdout top-1", "status", "why"]
    doc.add(Table(header, rows, frozenset(marked), frozenset({3, 4, 5}), name="plan"))
    doc.p(
        "Costs are wall seconds as the planner predicted them before running and as measured; the holdout is part of "
        "train, so choosing on it leaves the report split untouched. Chosen rows are highlighted.",
        style="note",
    )
    for note in plan.notes:
        doc.p(note, style="note")


def _versions(v: Any) -> str:
    if not isinstance(v, dict):
        return "not recorded"
    return ", ".join(f"{k} {val}" for k, val in v.items())


def _times(m: Mapping[str, Any]) -> str:
    """Where a run's wall time went, as far as metrics.json says."""
    parts = [
        f"{_dur(m[k])} {what}"
        for k, what in (("wall_s", "wall"), ("feature_seconds", "feature extraction"), ("train_seconds", "in epochs"))
        if isinstance(m.get(k), int | float)
    ]
    return ", ".join(parts) or "not recorded"


def _fingerprint(m: Mapping[str, Any]) -> str:
    for key in ("data_fingerprint", "data_sha256", "fingerprint"):
        if isinstance(m.get(key), str):
            return str(m[key])
    return f"not recorded; data read from {m.get('data', 'an unrecorded location')}"


def _provenance(doc: _Doc, inputs: ReportInputs, cfg: ReportConfig, source: Any) -> None:
    doc.h("Provenance")
    doc.p(
        f"Built by transferlab {__version__} on {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')} from the files in "
        "each folder (no model was loaded)"
        + (f"; class names and images from {source.location}" if source is not None else "")
        + ".",
        style="note",
    )
    if cfg.spec_text is not None:
        doc.add(Details("study spec, resolved (every member's full options)", cfg.spec_text, "yaml"))
    for r in inputs.runs:
        m = r.metrics
        doc.h(r.name, 3)
        rows = [
            ["folder", str(r.path.resolve())],
            ["backbone", f"{m.get('model', '?')} ({m.get('weights', '?')})"],
            [
                "strategy",
                f"{m.get('strategy', '?')}, BN {m.get('bn', '?')}, {m.get('head', '?')} head, "
                f"head init {m.get('head_init', '?')}",
            ],
            ["data", f"{m.get('dataset', '?')} at {m.get('data', '?')}, {m.get('num_classes', '?')} classes"],
            ["data fingerprint", _fingerprint(m)],
            [
                "reported on",
                f"{m.get('split', '?')}, {len(r.preds.targets):,} samples (ids sha256 {r.preds.ids_sha256[:16]})",
            ],
            ["epoch selection", str(m.get("selection", "not recorded"))],
            ["time", _times(m)],
            ["seed", str(r.config.get("seed", "not recorded"))],
            [
                "precision / device",
                f"{m.get('precision', '?')}, {'channels_last' if m.get('channels_last') else 'NCHW'}, "
                f"{m.get('device', '?')}, world size {m.get('world_size', 1)}",
            ],
            ["versions", _versions(m.get("versions"))],
        ]
        for w in m.get("warnings") or []:
            rows.append(["warning", str(w)])
        doc.add(Table(["", ""], rows, kv=True))
        if r.config_text is not None:
            doc.add(Details(f"{r.name}/config.yaml (replay: transferlab train --config)", r.config_text, "yaml"))
        else:
            doc.p(f"No config.yaml in {r.path}.", style="note")
    for e in inputs.ensembles:
        m = e.metrics
        doc.h(e.name, 3)
        proto = m.get("protocol") or {}
        best = m.get("best_member") or {}
        rows = [
            ["folder", str(e.path.resolve())],
            ["method", f"{m.get('method', '?')}" + (", temperature scaling" if m.get("temperature") else "")],
            ["members", ", ".join(str(x.get("name")) for x in e.members)],
            ["fitted on", str(proto.get("select", "?"))],
            ["reported on", str(proto.get("report", "?")) + f" (ids sha256 {e.preds.ids_sha256[:16]})"],
            [
                "best member",
                f"{best.get('name', '?')}, chosen on {best.get('chosen_on', '?')} by {best.get('criterion', '?')}",
            ],
            ["comparison", str((m.get("vs_best_member") or {}).get("test", "?"))],
        ]
        if isinstance(proto.get("select_sample_ids_sha256"), str):
            rows.append(["select ids sha256", proto["select_sample_ids_sha256"][:16]])
        doc.add(Table(["", ""], rows, kv=True))
        if e.weights is not None:
            text = json.dumps(_elide(e.weights), indent=2)
            doc.add(Details(f"{e.name}/weights.json (long lists elided)", text, "json"))


def _elide(x: Any, limit: int = 20) -> Any:
    """``x`` with every list longer than ``limit`` replaced by a note of its length (class and sample ids)."""
    if isinstance(x, dict):
        return {k: _elide(v, limit) for k, v in x.items()}
    if isinstance(x, list):
        return f"[{len(x)} items]" if len(x) > limit else [_elide(v, limit) for v in x]
    return x


def _warnings(doc: _Doc, inputs: ReportInputs) -> None:
    seen: dict[str, list[str]] = {}
    for x in [*inputs.runs, *inputs.ensembles]:
        for w in x.metrics.get("warnings") or []:
            seen.setdefault(str(w), []).append(x.name)
    for w, who in seen.items():
        doc.p(Strong("Warning: "), f"{w[:1].upper()}{w[1:]} ({', '.join(who)}).", style="warn")


def _compose(inputs: ReportInputs, cfg: ReportConfig, source: Any) -> tuple[list[Block], str | None]:
    """The page as a reader wants it: the answer (which model, how good, how sure, at what cost) before the
    evidence, then the planner's own sections when the study folder has them, then the details."""
    doc = _Doc()
    classes = _Classes(_class_lookup(source, cfg.data, inputs))
    study = _study_folder(cfg)
    plan = read_plan(study) if study is not None else None
    labels = read_labels(study) if study is not None else None
    on_holdout = _chosen_on_holdout(inputs, plan)
    best_row = _answer_row(inputs, on_holdout)
    best_run = _best(inputs.runs)
    focus = best_run if best_run is not None else _best(inputs.ensembles)
    _answer(doc, inputs, best_row, plan, labels)
    _warnings(doc, inputs)
    _summary(doc, inputs, best_row, on_holdout=on_holdout is not None)
    _ensembles(doc, inputs)
    if labels is not None:
        _labels_section(doc, labels)
    if plan is not None:
        _plan_section(doc, plan)
    _calibration(doc, best_run if isinstance(best_run, RunDir) else None, inputs)
    _errors(doc, focus, inputs, classes, source, cfg.data)
    _curves(doc, inputs)
    _provenance(doc, inputs, cfg, source)
    return doc.blocks, None if best_row is None else best_row.name


# --------------------------------------------------------------------------------------------------
# Rendering

_CSS = """
:root{--fg:#1f2933;--muted:#667085;--line:#e4e7ec;--soft:#f6f7f9;--accent:#2a9d8f;--best:#e7f5f2}
*{box-sizing:border-box}
html{-webkit-text-size-adjust:100%}
body{margin:0;background:#fff;color:var(--fg);
font:15px/1.55 -apple-system,BlinkMacSystemFont,"Segoe UI",Roboto,"Helvetica Neue",Arial,"Noto Sans",sans-serif}
main{max-width:1240px;margin:0 auto;padding:36px 32px 72px}
h1{font-size:28px;line-height:1.2;margin:0 0 6px;letter-spacing:-.015em}
h2{font-size:20px;margin:44px 0 14px;padding-bottom:6px;border-bottom:1px solid var(--line);letter-spacing:-.01em}
h3{font-size:16px;margin:28px 0 10px}
p{margin:10px 0;max-width:80ch}
.sub{color:var(--muted);margin:0 0 18px}
nav{display:flex;flex-wrap:wrap;gap:6px 18px;font-size:14px;margin:0 0 8px;padding:10px 0;
border-top:1px solid var(--line);border-bottom:1px solid var(--line)}
nav a{color:var(--muted);text-decoration:none}
nav a:hover{color:var(--fg)}
.note{color:var(--muted);font-size:14px}
.warn{background:#fff8e6;border-left:4px solid #f0a500;padding:10px 14px;border-radius:4px;max-width:none}
.verdict{border-left:4px solid var(--accent);background:var(--soft);padding:10px 14px;border-radius:4px;max-width:none}
.tw{overflow-x:auto;margin:12px 0}
table{border-collapse:collapse;font-size:13.5px;font-variant-numeric:tabular-nums}
table.data{width:100%}
th{text-align:left;font-weight:600;font-size:12.5px;color:var(--muted);padding:8px 10px;
border-bottom:2px solid var(--line);vertical-align:bottom}
td{padding:7px 10px;border-bottom:1px solid var(--line);vertical-align:top}
.num{text-align:right}
td.num{white-space:nowrap}
.minor{color:var(--muted);font-size:12px;font-weight:400}
tbody tr:nth-child(even) td{background:#fbfbfc}
tr.best td{background:var(--best)!important;font-weight:600}
td.flag{color:var(--accent);white-space:nowrap;font-weight:700}
table.summary{font-size:13px}
table.summary th,table.summary td{padding:7px 7px}
table.summary td:nth-child(2){white-space:nowrap;font-weight:600}
table.summary td:nth-child(7){min-width:108px}
table.summary td:nth-child(9){min-width:150px}
.cards{display:grid;grid-template-columns:repeat(auto-fit,minmax(240px,1fr));gap:12px;margin:14px 0 16px}
.card{border:1px solid var(--line);border-top:4px solid var(--line);border-radius:8px;padding:12px 16px 14px}
.card .k{font-size:12.5px;color:var(--muted);font-weight:600}
.card .v{font-size:25px;font-weight:700;line-height:1.25;margin:3px 0 5px;font-variant-numeric:tabular-nums;
overflow-wrap:anywhere}
.card .d{font-size:13px;color:var(--muted);line-height:1.45}
.card .v .minor{font-size:14px;font-weight:600}
.card.lead{border-top-color:var(--accent);background:var(--best)}
.card.good{border-top-color:var(--accent)}
.card.unsure{border-top-color:#f0a500}
.card.bad{border-top-color:#c44e52}
.lead{font-size:17px;max-width:none}
table.kv td:first-child{color:var(--muted);white-space:nowrap;padding-right:18px}
table.kv td{border-bottom:1px solid var(--soft)}
figure{margin:14px 0 22px}
figure img{display:block;max-width:100%;height:auto;border:1px solid var(--line);border-radius:6px}
figcaption{color:var(--muted);font-size:13px;margin-top:6px;max-width:90ch}
.row{display:flex;flex-wrap:wrap;gap:8px 22px;align-items:flex-start}
.row figure{margin:8px 0}
details{margin:10px 0;border:1px solid var(--line);border-radius:6px;padding:6px 12px;background:#fff}
summary{cursor:pointer;font-weight:600;font-size:14px}
pre{background:var(--soft);padding:12px 14px;border-radius:4px;overflow-x:auto;font-size:12.5px;line-height:1.45}
code,pre{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,"Liberation Mono",monospace}
code{background:var(--soft);padding:0 4px;border-radius:3px;font-size:.92em}
footer{color:var(--muted);font-size:12.5px;margin-top:48px;border-top:1px solid var(--line);padding-top:10px}
@media print{main{max-width:none;padding:0}nav{display:none}details{border:none}h2{break-after:avoid}
figure{break-inside:avoid}}
"""


def _html_parts(parts: Iterable[str]) -> str:
    out = []
    for s in parts:
        e = html.escape(s, quote=False)
        out.append(f"<strong>{e}</strong>" if isinstance(s, Strong) else e)
    return "".join(out)


def _html_fig(f: Fig) -> str:
    data = base64.b64encode(f.png).decode("ascii")
    cap = f"<figcaption>{html.escape(f.caption)}</figcaption>" if f.caption else ""
    return (
        f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(f.alt)}" '
        f'width="{F.display_width(f.png)}">{cap}</figure>'
    )


def _html_cell(text: str) -> str:
    first, *more = text.split("\n")
    return html.escape(first) + "".join(f'<br><span class="minor">{html.escape(m)}</span>' for m in more)


def _html_table(b: Table) -> str:
    head = "".join(f"<th{' class=num' if j in b.numeric else ''}>{html.escape(h)}</th>" for j, h in enumerate(b.header))
    trs = []
    for i, row in enumerate(b.rows):
        tds = []
        for j, c in enumerate(row):
            cls = "num" if j in b.numeric else "flag" if (j == 0 and b.flag_first) else ""
            tds.append(f"<td{f' class={cls}' if cls else ''}>{_html_cell(c)}</td>")
        trs.append(f"<tr{' class=best' if i in b.marked else ''}>{''.join(tds)}</tr>")
    thead = "" if b.kv else f"<thead><tr>{head}</tr></thead>"
    cls = "kv" if b.kv else f"data {b.name}".strip()
    return f'<div class="tw"><table class="{cls}">{thead}<tbody>{"".join(trs)}</tbody></table></div>'


def _html_cards(b: Cards) -> str:
    out = []
    for c in b.cards:
        tone = f" {c.tone}" if c.tone else ""
        detail = f'<div class="d">{html.escape(c.detail)}</div>' if c.detail else ""
        out.append(
            f'<div class="card{tone}"><div class="k">{html.escape(c.label)}</div>'
            f'<div class="v">{_html_cell(c.value)}</div>{detail}</div>'
        )
    return f'<div class="cards">{"".join(out)}</div>'


def _html_block(b: Block) -> str:
    if isinstance(b, Heading):
        return f'<h{b.level} id="{b.anchor}">{html.escape(b.text)}</h{b.level}>'
    if isinstance(b, Text):
        cls = "" if b.style == "p" else f' class="{b.style}"'
        return f"<p{cls}>{_html_parts(b.parts)}</p>"
    if isinstance(b, Table):
        return _html_table(b)
    if isinstance(b, Fig):
        return _html_fig(b)
    if isinstance(b, FigRow):
        return f'<div class="row">{"".join(_html_fig(f) for f in b.figs)}</div>'
    if isinstance(b, Cards):
        return _html_cards(b)
    return (
        f"<details><summary>{html.escape(b.summary)}</summary><pre><code>{html.escape(b.text)}</code></pre></details>"
    )


def render_html(blocks: Sequence[Block], title: str, subtitle: str) -> str:
    """One self-contained HTML page: inline CSS, figures as data URIs, no scripts, no external links."""
    toc = "".join(
        f'<a href="#{b.anchor}">{html.escape(b.text)}</a>' for b in blocks if isinstance(b, Heading) and b.level == 2
    )
    body = [_html_block(b) for b in blocks]
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f'<meta name="generator" content="transferlab {__version__}">\n'
        f"<title>{html.escape(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n<main>\n"
        f'<h1>{html.escape(title)}</h1>\n<p class="sub">{html.escape(subtitle)}</p>\n<nav>{toc}</nav>\n'
        + "\n".join(body)
        + f"\n<footer>transferlab {__version__} · report built from run directories; no model was loaded.</footer>\n"
        "</main>\n</body>\n</html>\n"
    )


# Underscores inside a word (tf_efficientnet_lite0) never start emphasis in CommonMark, so only those
# at a word's edge are escaped; the Markdown stays readable as plain text.
_MD_SPECIAL = re.compile(r"([\\`*\[\]|<>#]|(?<![A-Za-z0-9])_|_(?![A-Za-z0-9]))")


def _md(text: str) -> str:
    """Escape Markdown syntax in plain text (names like ``_x_`` or ``a|b`` stay literal)."""
    return _MD_SPECIAL.sub(r"\\\1", text).replace("\n", " ")


def _md_parts(parts: Iterable[str]) -> str:
    out = []
    for s in parts:
        if isinstance(s, Strong):
            out.append(f"**{_md(s.strip())}**" + (" " if s.endswith(" ") else ""))
        else:
            out.append(_md(s))
    return "".join(out)


def _md_fig(f: Fig, links: Mapping[str, str]) -> str:
    cap = f"\n\n*{_md(f.caption)}*" if f.caption else ""
    return f"![{_md(f.alt)}]({links[f.key]}){cap}"


def _md_lines(text: str) -> str:
    """A two-line cell on one line: "73.76% (72.12–75.40)", "tf_efficientnet_lite0 · 224 px"."""
    first, *more = text.split("\n")
    return first + "".join(f" {m}" if m.startswith("(") else f" · {m}" for m in more)


def _md_table(b: Table) -> str:
    header = ["field", "value"] if b.kv else b.header
    lines = ["| " + " | ".join(_md(h) for h in header) + " |"]
    lines.append("| " + " | ".join("---:" if j in b.numeric else "---" for j in range(len(header))) + " |")
    for i, row in enumerate(b.rows):
        cells = [_md(_md_lines(c)) for c in row]
        if i in b.marked:
            cells = [f"**{c}**" if c else c for c in cells]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _md_cards(b: Cards) -> str:
    return "\n".join(
        f"- **{_md(c.label)}:** {_md(_md_lines(c.value))}" + (f" — {_md(c.detail)}" if c.detail else "")
        for c in b.cards
    )


def _md_details(b: Details) -> str:
    ticks = max((len(m) for m in re.findall(r"`+", b.text)), default=0)
    fence = "`" * max(3, ticks + 1)
    return (
        f"<details><summary>{html.escape(b.summary)}</summary>\n\n{fence}{b.lang}\n{b.text.rstrip()}\n{fence}"
        "\n\n</details>"
    )


def _md_block(b: Block, links: Mapping[str, str]) -> str:
    if isinstance(b, Heading):
        return f"{'#' * b.level} {_md(b.text)}"
    if isinstance(b, Text):
        text = _md_parts(b.parts)
        return f"> {text}" if b.style in ("warn", "verdict", "lead") else f"*{text}*" if b.style == "note" else text
    if isinstance(b, Table):
        return _md_table(b)
    if isinstance(b, Fig):
        return _md_fig(b, links)
    if isinstance(b, FigRow):
        return "\n\n".join(_md_fig(f, links) for f in b.figs)
    if isinstance(b, Cards):
        return _md_cards(b)
    return _md_details(b)


def render_markdown(blocks: Sequence[Block], title: str, subtitle: str, links: Mapping[str, str]) -> str:
    """The same content as Markdown; ``links`` maps a figure key to its relative PNG path."""
    out = [f"# {_md(title)}", f"*{_md(subtitle)}*", *(_md_block(b, links) for b in blocks)]
    return "\n\n".join(out) + "\n"


# --------------------------------------------------------------------------------------------------
# Entry point


def _figures(blocks: Sequence[Block]) -> list[Fig]:
    out: list[Fig] = []
    for b in blocks:
        if isinstance(b, Fig):
            out.append(b)
        elif isinstance(b, FigRow):
            out.extend(b.figs)
    return out


def build_report(cfg: ReportConfig) -> ReportResult:
    """Read the folders in ``cfg.dirs`` and write ``report.html``, ``report.md`` and ``figures/`` to ``cfg.out``.

    Files are written atomically, figures first and the HTML last, so a report.html that exists is
    complete. PNGs in ``figures/`` that an earlier report wrote under other names are left alone.
    """
    inputs = load_inputs(cfg.dirs)
    source = None
    if cfg.data is not None:
        from transferlab.data import open_dataset  # lazy: only with --data; report itself never loads torch

        # A report never downloads: --data names the copy the runs were evaluated on.
        source = open_dataset(cfg.data, download=False)
    blocks, best = _compose(inputs, cfg, source)
    n_runs, n_ens = len(inputs.runs), len(inputs.ensembles)
    title = cfg.title or "Transfer-learning report"
    datasets = sorted({str(x.metrics.get("dataset")) for x in inputs.runs if x.metrics.get("dataset")})
    subtitle = (
        f"{n_runs} run{'s' * (n_runs != 1)}"
        + (f", {n_ens} ensemble{'s' * (n_ens != 1)}" if n_ens else "")
        + (f" on {', '.join(datasets)}" if datasets else "")
        + (f" · best: {best}" if best else "")
        + f" · built {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}"
    )
    out = Path(cfg.out)
    figs = _figures(blocks)
    links: dict[str, str] = {}
    paths: list[Path] = []
    for f in figs:
        rel = f"figures/{f.key}.png"
        atomic_write_bytes(out / rel, f.png)
        links[f.key] = rel
        paths.append(out / rel)
    atomic_write_text(out / "report.md", render_markdown(blocks, title, subtitle, links))
    atomic_write_text(out / "report.html", render_html(blocks, title, subtitle))
    log.info("wrote %s, report.md and %d figures", out / "report.html", len(figs))
    return ReportResult(
        html=out / "report.html",
        markdown=out / "report.md",
        figures=tuple(paths),
        runs=tuple(r.name for r in inputs.runs),
        ensembles=tuple(e.name for e in inputs.ensembles),
        best=best,
    )
