"""``transferlab study``: run a whole transfer-learning study from one YAML spec, resumably.

A spec names the data, the members (each a ``transferlab train`` run or a zero-shot evaluation) and
the ensembles built from them. Members run one after another into ``OUT/members/<name>``, ensembles
into ``OUT/ensembles/<name>``, and the report into ``OUT/report``. Each finished folder carries a
``study.json`` with the sha256 of everything its result depends on (the resolved options, the data
fingerprint, the weights' identity and, for ``init_from``, the parent member's hash), so running the
same spec again reuses every unchanged member and an interrupted study carries on where it stopped
(a member cut off mid-training resumes from its newest checkpoint). A member whose inputs changed is
never overwritten silently: the study stops and says so, unless ``--replace-changed`` moves the old
folder to ``OUT/superseded/`` first.

Everything that can fail for lack of an input (a dataset that is missing offline, hub weights that
cannot be fetched, a weight file or parent run that does not exist, an unknown option) is checked for
every member before the first one starts.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from transferlab.artifacts.folders import is_study_dir
from transferlab.artifacts.lock import RunLock
from transferlab.artifacts.predictions import predictions_path, write_predictions
from transferlab.artifacts.summary import summarize
from transferlab.data import open_dataset
from transferlab.data.base import data_fingerprint
from transferlab.data.resolve import cache_dir as user_cache_dir
from transferlab.data.resolve import resolve_data
from transferlab.data.screen import refuse_too_few_classes
from transferlab.ensembles import EnsembleConfig, apply_ensemble, load_members, run_ensemble
from transferlab.errors import ConfigError, DataError, TransferlabError, WeightsError
from transferlab.evaluation import EvalConfig, evaluate
from transferlab.io import atomic_write_json, atomic_write_text, file_digest
from transferlab.metrics import log_softmax, paired_bootstrap, topk_correct
from transferlab.models.backbones import check_model_name, resolve_weight_source
from transferlab.models.weights import hub_cached_file, hub_offline, package_weight_file
from transferlab.options import check_keys
from transferlab.reports.render import ReportConfig, build_report
from transferlab.training.concat import ConcatConfig, fit_concat
from transferlab.training.config import TrainConfig
from transferlab.training.run import train

log = logging.getLogger(__name__)

__all__ = [
    "EnsembleSpec",
    "MemberSpec",
    "StudyResult",
    "StudySpec",
    "evaluate_study",
    "load_spec",
    "run_study",
]

KINDS = ("train", "zero-shot", "concat")
#: Options of a concat member (a probe on the features of earlier probe members side by side).
CONCAT_KEYS = ("members", "l2_grid", "seed")
ROLES = ("member", "pretrain")
TOP_KEYS = ("name", "description", "data", "report_split", "defaults", "members", "ensembles", "title")
#: EvalConfig fields a zero-shot member may not set: the study decides them (where it writes, which split,
#: zero-shot itself), or they contradict the feature cache a zero-shot member reads from (tta).
_ZERO_SHOT_FIXED = ("out", "run", "split", "zero_shot", "progress", "n_boot", "tta", "decoded_cache")
#: Options of a zero-shot member: the rest of ``transferlab evaluate``'s.
ZERO_SHOT_KEYS = tuple(f.name for f in fields(EvalConfig) if f.name not in _ZERO_SHOT_FIXED)
#: EnsembleConfig fields the study sets itself (the members by name and the method come first, from the spec).
_ENSEMBLE_FIXED = ("members", "method", "out", "split", "select_data", "select_split", "data", "n_boot")
#: Options of an ensemble: its method and members (by name), and the rest of ``transferlab ensemble``'s.
ENSEMBLE_KEYS = (
    "method",
    "members",
    "select",
    *(f.name for f in fields(EnsembleConfig) if f.name not in _ENSEMBLE_FIXED),
)
#: Where an ensemble is fitted: part of the report split, or the members' train holdout predictions.
SELECT_MODES = ("split", "holdout")
#: Set by the study itself; a spec that sets them is refused.
STUDY_OWNED = ("out", "resume", "progress")
#: Options that change how a run is executed but not its result: left out of the reuse hash.
NOT_HASHED = (
    "out",
    "resume",
    "progress",
    "workers",
    "cache_dir",
    "feature_batch_size",
    "checkpoint_every",
    "keep_checkpoints",
    "device",
    "batch_size_eval",
)
STUDY_FILE = "study.json"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


# --------------------------------------------------------------------------------------------------
# The spec


@dataclass(frozen=True)
class MemberSpec:
    """One member as written in the spec (defaults merged in for trained members)."""

    name: str
    kind: str
    role: str
    options: Mapping[str, Any]


@dataclass(frozen=True)
class EnsembleSpec:
    """One ensemble: a method over named members, with its fitting options."""

    name: str
    method: str
    members: tuple[str, ...]
    options: Mapping[str, Any]
    #: ``split``: fit on a stratified part of the report split, report on the rest; ``holdout``: fit on the
    #: members' predictions on their train holdout, report on all of the report split.
    select: str = "split"


@dataclass(frozen=True)
class StudySpec:
    """A parsed, validated study spec."""

    name: str
    data: str
    members: tuple[MemberSpec, ...]
    ensembles: tuple[EnsembleSpec, ...] = ()
    description: str = ""
    report_split: str = "val"
    title: str | None = None
    path: Path | None = None
    text: str = ""

    def member(self, name: str) -> MemberSpec:
        """The member called ``name``."""
        for m in self.members:
            if m.name == name:
                return m
        raise ConfigError(f"no member {name!r} in the study")

    @property
    def reported(self) -> tuple[MemberSpec, ...]:
        """Members evaluated on the study's data (the ones the report and the ensembles use)."""
        return tuple(m for m in self.members if m.role == "member")


def load_spec(path: str | os.PathLike[str]) -> StudySpec:
    """Read and validate a study spec. Every error names the file and the key, and says what to do."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"study spec {p}: cannot read it ({e.strerror or e})") from e
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"study spec {p}: not valid YAML ({e})") from e
    return parse_spec(doc, where=str(p), text=text, path=p)


def parse_spec(doc: Any, *, where: str = "study spec", text: str = "", path: Path | None = None) -> StudySpec:
    """Validate a spec already read from YAML (see :func:`load_spec`)."""
    if not isinstance(doc, dict):
        raise ConfigError(f"{where}: expected a mapping with name, data, members (and optionally ensembles)")
    check_keys(TOP_KEYS, doc, where=where, listing="allowed:")
    for k in ("name", "data", "members"):
        if k not in doc:
            raise ConfigError(f"{where}: the key {k!r} is required")
    name = str(doc["name"])
    if not _NAME.match(name):
        raise ConfigError(f"{where}: name {name!r} must be letters, digits, '.', '_' or '-' (it names folders)")
    data = str(doc["data"])
    report_split = str(doc.get("report_split", "val"))
    members = _parse_members(doc, where, data, report_split)
    return StudySpec(
        name=name,
        data=data,
        members=members,
        ensembles=_parse_ensembles(doc, where, members),
        description=str(doc.get("description", "")),
        report_split=report_split,
        title=None if doc.get("title") is None else str(doc["title"]),
        path=path,
        text=text,
    )


def _parse_defaults(doc: dict[str, Any], where: str) -> dict[str, Any]:
    """``defaults``: `transferlab train` options every trained member starts from."""
    defaults = doc.get("defaults") or {}
    if not isinstance(defaults, dict):
        raise ConfigError(f"{where}: defaults must be a mapping of `transferlab train` options")
    for k in defaults:
        if k in STUDY_OWNED:
            raise ConfigError(f"{where}: defaults.{k} is set by the study itself; remove it")
    check_keys(TrainConfig, defaults, where=f"{where}: defaults", listing="allowed:")
    return defaults


def _parse_members(doc: dict[str, Any], where: str, data: str, report_split: str) -> tuple[MemberSpec, ...]:
    defaults = _parse_defaults(doc, where)
    raw = doc["members"]
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f"{where}: members must be a non-empty mapping of name -> options")
    members: list[MemberSpec] = []
    for mname, opts in raw.items():
        mwhere = f"{where}: member {str(mname)!r}"
        m = _parse_member(str(mname), dict(opts or {}), mwhere, defaults, (data, report_split))
        for x in m.options.get("members", ()) if m.kind == "concat" else ():
            prior = next((p for p in members if p.name == x), None)
            if prior is None or prior.kind != "train":
                raise ConfigError(f"{mwhere}: members: {x!r} must be a probe member listed before this one")
        for key in ("init_from", "head_from"):
            parent = m.options.get(key)
            if isinstance(parent, str) and parent in raw and parent not in {x.name for x in members}:
                raise ConfigError(f"{mwhere}: {key} {parent!r} must be listed before this member")
        members.append(m)
    return tuple(members)


def _parse_member(
    name: str, opts: dict[str, Any], where: str, defaults: dict[str, Any], study: tuple[str, str]
) -> MemberSpec:
    """One member: its kind and role, options checked against the command it runs, defaults merged in
    (``study``: the study's data and report split)."""
    data, report_split = study
    if not _NAME.match(name):
        raise ConfigError(f"{where}: names must be letters, digits, '.', '_' or '-' (they name folders)")
    kind, role = _kind_and_role(opts, where)
    if kind == "concat":
        mem = opts.get("members")
        if not isinstance(mem, list | tuple) or len(mem) < 2:
            raise ConfigError(f"{where}: a concat member needs members: a list of at least two probe members")
        return MemberSpec(name, kind, role, opts)
    if kind == "train":
        opts = {**defaults, **opts}
        if "model" not in opts:
            raise ConfigError(f"{where}: model is required (here or in defaults)")
        opts.setdefault("report_split", report_split)
    else:
        if "model" not in opts:
            raise ConfigError(f"{where}: a zero-shot member needs model")
        if "cache_dir" in defaults:
            opts.setdefault("cache_dir", defaults["cache_dir"])
    opts.setdefault("data", data)
    if role == "member" and str(opts.get("data")) != data:
        raise ConfigError(
            f"{where}: it trains on {opts.get('data')!r}, not the study's data {data!r}; mark it role: pretrain "
            "(used only through init_from) or give it the study's data"
        )
    return MemberSpec(name, kind, role, opts)


def _kind_and_role(opts: dict[str, Any], where: str) -> tuple[str, str]:
    """Pop and check a member's kind and role, then check its other keys against that kind's options."""
    kind = str(opts.pop("kind", "train"))
    role = str(opts.pop("role", "member"))
    if kind not in KINDS:
        raise ConfigError(f"{where}: kind must be one of {', '.join(KINDS)}, not {kind!r}")
    if role not in ROLES:
        raise ConfigError(f"{where}: role must be one of {', '.join(ROLES)}, not {role!r}")
    for k in opts:
        if k in STUDY_OWNED:
            raise ConfigError(f"{where}: {k} is set by the study itself; remove it")
    keys = {"train": [f.name for f in fields(TrainConfig)], "concat": list(CONCAT_KEYS)}.get(kind, list(ZERO_SHOT_KEYS))
    check_keys((*keys, "kind", "role"), opts, where=where, listing="allowed:")
    return kind, role


def _parse_ensembles(doc: dict[str, Any], where: str, members: Sequence[MemberSpec]) -> tuple[EnsembleSpec, ...]:
    raw = doc.get("ensembles") or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: ensembles must be a mapping of name -> options")
    names = [m.name for m in members]
    reported = [m.name for m in members if m.role == "member"]
    out: list[EnsembleSpec] = []
    for ename, eopts in raw.items():
        ename = str(ename)
        ewhere = f"{where}: ensemble {ename!r}"
        if not _NAME.match(ename):
            raise ConfigError(f"{ewhere}: names must be letters, digits, '.', '_' or '-' (they name folders)")
        if ename in names:
            raise ConfigError(f"{ewhere}: a member has the same name; names must be unique")
        eopts = dict(eopts or {})
        check_keys(ENSEMBLE_KEYS, eopts, where=ewhere, listing="allowed:")
        method = str(eopts.pop("method", ename))
        select = str(eopts.pop("select", "split"))
        mem = tuple(str(x) for x in (eopts.pop("members", None) or reported))
        check_keys(names, mem, where=f"{ewhere}: members", listing="allowed:")
        for x in mem:
            if x not in reported:
                raise ConfigError(f"{ewhere}: {x!r} is a pretrain member (other data); it cannot be ensembled")
        if len(mem) < 2:
            raise ConfigError(f"{ewhere}: an ensemble needs at least two members, got {len(mem)}")
        _check_select(select, mem, members, ewhere)
        out.append(EnsembleSpec(ename, method, mem, eopts, select))
    return tuple(out)


def _check_select(select: str, names: Sequence[str], members: Sequence[MemberSpec], where: str) -> None:
    """``select: holdout`` needs every member's train-holdout predictions, which only trained and concat members
    write."""
    if select not in SELECT_MODES:
        raise ConfigError(f"{where}: select must be one of {', '.join(SELECT_MODES)}, not {select!r}")
    if select != "holdout":
        return
    for x in names:
        m = next(m for m in members if m.name == x)
        if m.kind not in ("train", "concat"):
            raise ConfigError(
                f"{where}: select holdout fits on the members' train holdout predictions, and {x!r} is a "
                f"{m.kind} member (it has none); leave it out of this ensemble or use select: split"
            )


# --------------------------------------------------------------------------------------------------
# Resolution: configs, inputs, hashes (and every check that can fail before work starts)


@dataclass
class Resolved:
    """A member or ensemble ready to run: its config object, folder and reuse hash."""

    name: str
    kind: str  # train | zero-shot | ensemble
    role: str
    dir: Path
    config: Any
    identity: dict[str, Any]
    hash: str = ""
    members: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        blob = json.dumps(self.identity, sort_keys=True, default=str).encode()
        self.hash = hashlib.sha256(blob).hexdigest()


def weights_identity(model: str, weights: str | None) -> str:
    """What the result of ``--weights`` depends on, or a WeightsError saying what to provide.

    Checked before any work: a package that is not installed, a file that does not exist, or hub weights
    that are neither cached nor reachable stop the study at once instead of after an hour of training.
    """
    check_model_name(model)
    spec, kind = resolve_weight_source(model, weights)
    arch = model.split(".", 1)[0]
    if kind == "none":
        return "none"
    if kind == "package":
        _, desc = package_weight_file(arch)
        return desc
    if kind == "file":
        assert spec.path is not None
        return f"file sha256:{file_digest(spec.path)}"
    import timm

    cfg = timm.create_model(model, pretrained=False).pretrained_cfg or {}
    hub_id = cfg.get("hf_hub_id")
    cached = hub_cached_file(hub_id)
    if cached is not None:
        return f"hub {hub_id} (cached {cached.name})"
    advice = (
        f"provide the weights as a file: weights: /path/to/{model}.safetensors (or .pth) in the spec, or run once "
        f"with network access so timm caches them"
    )
    if hub_offline():
        raise WeightsError(
            f"{model}: pretrained weights are not in the local cache and the hub is switched off "
            f"(HF_HUB_OFFLINE/TRANSFERLAB_OFFLINE); {advice}"
        )
    if not _hub_reachable(hub_id):
        raise WeightsError(
            f"{model}: pretrained weights are not cached and the Hugging Face hub cannot be reached; {advice}"
        )
    return f"hub {hub_id}"


def _hub_reachable(hub_id: str | None, timeout: float = 5.0) -> bool:
    """One HEAD request to the hub (HF_ENDPOINT respected) with a short timeout."""
    import urllib.error
    import urllib.request

    if not hub_id:
        return False
    base = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    req = urllib.request.Request(f"{base}/api/models/{hub_id}", method="HEAD")
    try:
        with urllib.request.urlopen(req, timeout=timeout):
            return True
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _hashed_options(cfg: Any, skip: Sequence[str] = ()) -> dict[str, Any]:
    """The options that decide a member's result: every field that is not at its default.

    Leaving defaults out means a new option added to transferlab later (at its default) does not make
    every finished member of every study look changed.
    """
    from dataclasses import MISSING

    out: dict[str, Any] = {}
    for f in fields(cfg):
        if f.name in NOT_HASHED or f.name in skip:
            continue
        v = getattr(cfg, f.name)
        default = f.default if f.default is not MISSING else MISSING
        if default is not MISSING and v == default:
            continue
        out[f.name] = str(v) if isinstance(v, Path) else v
    return out


class _DataInfo:
    """Each data spec resolved once: its path and fingerprints per split list."""

    def __init__(self, progress: bool | None) -> None:
        self._sources: dict[str, Any] = {}
        self._fp: dict[tuple[str, tuple[str, ...]], str] = {}
        self.progress = progress

    def source(self, spec: str) -> Any:

        if spec not in self._sources:
            # Downloads (when the dataset has an official source and the network is allowed) happen here,
            # before any member trains; offline, a missing dataset fails here with every place searched.
            path = resolve_data(spec, download=True, progress=self.progress)
            self._sources[spec] = open_dataset(path, download=False)
        return self._sources[spec]

    def fingerprint(self, spec: str, splits: Sequence[str]) -> str:

        key = (spec, tuple(splits))
        if key not in self._fp:
            src = self.source(spec)
            for s in splits:
                src.split(s)  # a missing split fails here, naming what the dataset has
            self._fp[key] = data_fingerprint(src, splits)
        return self._fp[key]

    def require_classes(self, spec: str, fit_split: str | None, action: str) -> None:
        """A one-class dataset fails the pre-flight, as it would fail the member later (after others ran)."""
        refuse_too_few_classes(self.source(spec), fit_split, action)


def resolve(spec: StudySpec, out: Path, *, progress: bool | None = None) -> list[Resolved]:
    """Turn the spec into runnable configs and reuse hashes, checking every input first.

    All problems are collected and raised together, so one attempt shows everything that is missing.
    """
    data = _DataInfo(progress)
    problems: list[str] = []
    by_name: dict[str, Resolved] = {}
    failed: set[str] = set()
    for m in spec.members:
        try:
            by_name[m.name] = _resolve_member(m, spec, out / "members" / m.name, data, by_name, failed)
        except (TransferlabError, TypeError) as e:
            problems.append(f"member {m.name}: {e}")
            failed.add(m.name)
    if problems:
        raise ConfigError("the study cannot start; nothing was run:\n  - " + "\n  - ".join(problems))
    return [*by_name.values(), *(_resolve_ensemble(e, spec, out, by_name) for e in spec.ensembles)]


class _Collect:
    """Calls a check and keeps its error instead of raising: data and weights are checked independently,
    so one attempt lists everything missing."""

    def __init__(self) -> None:
        self.errors: list[str] = []

    def __call__(self, fn: Any, *a: Any) -> Any:
        try:
            return fn(*a)
        except TransferlabError as e:
            self.errors.append(str(e))
            return None


def _resolve_member(
    m: MemberSpec,
    spec: StudySpec,
    d: Path,
    data: _DataInfo,
    by_name: Mapping[str, Resolved],
    failed: set[str],
) -> Resolved:
    check = _Collect()
    opts = dict(m.options)
    if m.kind == "train":
        head_parent = _resolve_parent(opts, by_name, failed, "head_from")
        cfg, ident = _resolve_train(opts, d, data, _resolve_parent(opts, by_name, failed), check)
        if head_parent is not None:
            ident["head_from"] = head_parent
    elif m.kind == "concat":
        names = [str(x) for x in opts.pop("members")]
        if failed.intersection(names):
            raise ConfigError(f"its members {', '.join(sorted(failed.intersection(names)))} cannot start (see above)")
        cfg = ConcatConfig(members=tuple(by_name[x].dir for x in names), out=d, **opts)
        ident = {"kind": "concat", "options": opts, "members": [[x, by_name[x].hash] for x in names]}
        return Resolved(m.name, m.kind, m.role, d, cfg, ident, members=tuple(names))
    else:
        cfg, ident = _resolve_zero_shot(opts, spec, d, data, check)
    if check.errors:
        raise ConfigError("; ".join(check.errors))
    return Resolved(m.name, m.kind, m.role, d, cfg, ident)


def _resolve_parent(
    opts: dict[str, Any], by_name: Mapping[str, Resolved], failed: set[str], key: str = "init_from"
) -> str | None:
    """``init_from`` (or ``head_from``): point it at the parent member's folder (or check the run directory
    named) and return what the child's result depends on, the parent's hash; None without a parent."""
    parent = opts.get(key)
    if parent is None:
        return None
    if str(parent) in failed:
        raise ConfigError(f"{key} {parent}: that member cannot start (see above)")
    if str(parent) in by_name:
        opts[key] = str(by_name[str(parent)].dir)
        return by_name[str(parent)].hash
    pdir = Path(str(parent)).expanduser()
    if not (pdir / "model.safetensors").is_file():
        raise ConfigError(
            f"{key} {parent}: neither a member of this study nor a run directory with a model.safetensors"
        )
    return "file sha256:" + file_digest(pdir / "model.safetensors")


def _resolve_train(
    opts: dict[str, Any], d: Path, data: _DataInfo, parent_hash: str | None, check: _Collect
) -> tuple[TrainConfig, dict[str, Any]]:
    cfg = TrainConfig.from_dict({**opts, "out": str(d), "resume": True, "progress": data.progress})
    fp = check(data.fingerprint, cfg.data, ["train", cfg.report_split])
    if fp is not None:
        check(data.require_classes, cfg.data, "train", "transferlab study")
    if cfg.init_from is not None:
        wid = "init_from"  # the parent's weights, already in its hash
    elif cfg.strategy == "scratch":
        wid = "none"  # scratch always starts from random init
    else:
        wid = check(weights_identity, cfg.model, cfg.weights)
    ident = {
        "kind": "train",
        "config": _hashed_options(cfg, skip=("init_from", "head_from")),
        "data": fp,
        "weights": wid,
        "init_from": parent_hash,
    }
    return cfg, ident


def _resolve_zero_shot(
    opts: dict[str, Any], spec: StudySpec, d: Path, data: _DataInfo, check: _Collect
) -> tuple[EvalConfig, dict[str, Any]]:
    # Zero-shot reads pooled features from the cache the linear probes fill (same backbone, same images, same
    # transform): listed after such a probe it costs no forward pass.
    opts["cache_dir"] = Path(str(opts.get("cache_dir") or user_cache_dir()))
    cfg = EvalConfig(
        data=str(opts.pop("data")),
        out=d,
        model=str(opts.pop("model")),
        split=spec.report_split,
        zero_shot=True,
        progress=data.progress,
        **opts,
    )
    fp = check(data.fingerprint, cfg.data, [cfg.split])
    if fp is not None:
        check(data.require_classes, cfg.data, None, "transferlab study")
    wid = check(weights_identity, cfg.model or "", cfg.weights)
    ident = {
        "kind": "zero-shot",
        "config": _hashed_options(cfg, skip=("batch_size",)),
        "data": fp,
        "weights": wid,
    }
    return cfg, ident


def _resolve_ensemble(e: EnsembleSpec, spec: StudySpec, out: Path, by_name: Mapping[str, Resolved]) -> Resolved:
    d = out / "ensembles" / e.name
    dirs = tuple(str(by_name[x].dir) for x in e.members)
    select = {"select_data": dirs, "select_split": "holdout"} if e.select == "holdout" else {}
    try:
        cfg = EnsembleConfig(
            members=dirs, out=d, method=e.method, split=spec.report_split, data=spec.data, **select, **dict(e.options)
        )
    except (TransferlabError, TypeError) as err:
        raise ConfigError(f"ensemble {e.name}: {err}") from err
    ident = {
        "kind": "ensemble",
        "method": e.method,
        "options": dict(e.options),
        "members": [[x, by_name[x].hash] for x in e.members],
        "split": spec.report_split,
        **({"select": e.select} if e.select != "split" else {}),
    }
    return Resolved(e.name, "ensemble", "ensemble", d, cfg, ident, members=e.members)


# --------------------------------------------------------------------------------------------------
# Running


@dataclass
class StepRecord:
    """What happened to one member or ensemble in this invocation."""

    name: str
    kind: str
    status: str  # trained | resumed | reused | evaluated
    seconds: float
    top1: float | None
    dir: Path


@dataclass
class StudyResult:
    """The outcome of :func:`run_study`."""

    out: Path
    report: Path | None
    steps: list[StepRecord] = field(default_factory=list)
    wall_s: float = 0.0


def _read_marker(d: Path) -> dict[str, Any] | None:
    f = d / STUDY_FILE
    if not f.is_file():
        return None
    try:
        doc = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return doc if isinstance(doc, dict) else None


def _state(r: Resolved) -> str:
    """``new``, ``done`` (reusable), ``partial`` (same inputs, unfinished) or ``changed``/``foreign``."""
    if not r.dir.exists() or not any(r.dir.iterdir()):
        return "new"
    marker = _read_marker(r.dir)
    if marker is None:
        return "foreign"
    if marker.get("hash") != r.hash:
        return "changed"
    if marker.get("status") == "done" and (r.dir / "metrics.json").is_file():
        return "done"
    return "partial"


def _changed_keys(r: Resolved) -> str:
    old = (_read_marker(r.dir) or {}).get("identity") or {}
    new = r.identity
    diffs = []
    for k in sorted(set(old) | set(new)):
        if k == "config" and isinstance(old.get(k), dict) and isinstance(new.get(k), dict):
            for ck in sorted(set(old[k]) | set(new[k])):
                if old[k].get(ck) != new[k].get(ck):
                    diffs.append(f"{ck}: {old[k].get(ck)!r} -> {new[k].get(ck)!r}")
        elif old.get(k) != new.get(k):
            diffs.append(f"{k} changed")
    return "; ".join(diffs[:6]) or "its inputs changed"


def _mark(r: Resolved, status: str, **extra: Any) -> None:
    atomic_write_json(
        r.dir / STUDY_FILE,
        {
            "name": r.name,
            "kind": r.kind,
            "role": r.role,
            "hash": r.hash,
            "status": status,
            "updated": datetime.now(UTC).isoformat(timespec="seconds"),
            "identity": r.identity,
            **extra,
        },
    )


def _top1(d: Path) -> float | None:
    try:
        m = json.loads((d / "metrics.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    v = m.get("top1", (m.get("ensemble") or {}).get("top1"))
    return float(v) if isinstance(v, int | float) else None


def resolved_yaml(spec: StudySpec, items: Sequence[Resolved]) -> str:
    """The spec with every member's full options (defaults filled in): what exactly ran."""
    doc: dict[str, Any] = {"name": spec.name, "data": spec.data, "report_split": spec.report_split, "members": {}}
    if spec.description:
        doc["description"] = spec.description
    for r in items:
        if r.kind == "ensemble":
            doc.setdefault("ensembles", {})[r.name] = {
                "method": r.identity["method"],
                "members": list(r.members),
                **r.identity["options"],
                "hash": r.hash[:16],
            }
            continue
        if r.kind == "train":
            opts = {k: v for k, v in r.config.to_dict().items() if k not in ("progress",)}
        elif r.kind == "concat":
            opts = {"members": list(r.members), **r.identity["options"]}
        else:
            opts = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(r.config).items() if k != "progress"}
        doc["members"][r.name] = {
            "kind": r.kind,
            "role": r.role,
            **opts,
            "inputs": {k: v for k, v in r.identity.items() if k not in ("config", "kind")},
            "hash": r.hash[:16],
        }
    return yaml.safe_dump(doc, sort_keys=False, width=120)


def run_study(
    spec: StudySpec,
    out: str | os.PathLike[str],
    *,
    replace_changed: bool = False,
    progress: bool | None = None,
    report: bool = True,
    deadline: float | None = None,
    before_report: Callable[[StudyResult], None] | None = None,
) -> StudyResult:
    """Run (or resume) ``spec`` into ``out``; see the module docstring for the layout and reuse rules.

    ``deadline`` (a :func:`time.perf_counter` value): a member or ensemble that would start after it is
    skipped (recorded as such, nothing of it written), so a budgeted caller stops cleanly with everything
    that finished; an ensemble whose members were skipped is skipped too. ``before_report(result)`` runs
    after the last step and before the report is built (a caller adds its own files to the study folder)."""
    t0 = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with RunLock(out):
        items = resolve(spec, out, progress=progress)
        # Check every folder before anything runs: a conflict found after an hour of training helps no one.
        conflicts = []
        for r in items:
            st = _state(r)
            if st == "foreign":
                conflicts.append(f"{r.dir} exists but was not written by this study (no {STUDY_FILE})")
            elif st == "changed" and not replace_changed:
                conflicts.append(f"{r.name}: {_changed_keys(r)}")
        if conflicts:
            raise ConfigError(
                f"{out} holds results that this spec would overwrite:\n  - "
                + "\n  - ".join(conflicts)
                + "\nRe-run with --replace-changed to move the old folders to "
                f"{out / 'superseded'} and redo them, choose another --out, or restore the spec"
            )
        atomic_write_text(out / "spec.yaml", spec.text or yaml.safe_dump({"name": spec.name}))
        atomic_write_text(out / "study.yaml", resolved_yaml(spec, items))
        result = StudyResult(out=out, report=None)
        n = len(items)
        skipped: set[str] = set()
        for i, r in enumerate(items, 1):
            late = deadline is not None and time.perf_counter() >= deadline and _state(r) != "done"
            if late or skipped.intersection(r.members):
                why = "the budget ran out" if late else "a member was skipped"
                log.warning("[%d/%d] %s %s: skipped (%s)", i, n, r.kind, r.name, why)
                skipped.add(r.name)
                result.steps.append(StepRecord(r.name, r.kind, "skipped", 0.0, None, r.dir))
                continue
            result.steps.append(_run_one(r, i, n, out, progress))
        if before_report is not None:
            before_report(result)
        finished = [r for r in items if r.name not in skipped]
        if report and any(r.role == "member" for r in finished):
            result.report = _report(spec, finished, out)
        elif report:
            log.warning("no member finished before the deadline: no report")
        result.wall_s = time.perf_counter() - t0
        _write_summary(spec, result)
    return result


def _run_one(r: Resolved, i: int, n: int, out: Path, progress: bool | None) -> StepRecord:
    st = _state(r)
    what = f"[{i}/{n}] {r.kind} {r.name}"
    if st == "done":
        log.info("%s: unchanged since it ran; reused (%s)", what, r.dir)
        return StepRecord(r.name, r.kind, "reused", 0.0, _top1(r.dir), r.dir)
    if st == "changed":
        dest = out / "superseded" / f"{r.name}-{datetime.now(UTC).strftime('%Y%m%dT%H%M%S')}"
        dest.parent.mkdir(parents=True, exist_ok=True)
        log.warning("%s: inputs changed (%s); moving the old folder to %s", what, _changed_keys(r), dest)
        shutil.move(str(r.dir), str(dest))
        st = "new"
    status = "resumed" if st == "partial" else ("trained" if r.kind == "train" else "evaluated")
    log.info("%s: %s -> %s", what, "resuming" if st == "partial" else "starting", r.dir)
    r.dir.mkdir(parents=True, exist_ok=True)
    _mark(r, "running")
    t0 = time.perf_counter()
    if r.kind == "train":
        train(r.config)
    elif r.kind == "zero-shot":
        evaluate(r.config)
    elif r.kind == "concat":
        fit_concat(r.config)
    else:
        if st == "partial":  # ensembles take seconds: redo from scratch rather than trust a half-written folder
            for f in ("metrics.json", "weights.json"):
                (r.dir / f).unlink(missing_ok=True)
        run_ensemble(r.config)
    secs = time.perf_counter() - t0
    _mark(r, "done", seconds=round(secs, 2))
    top1 = _top1(r.dir)
    log.info("%s: done in %.0f s%s", what, secs, f", top-1 {100 * top1:.2f}%" if top1 is not None else "")
    return StepRecord(r.name, r.kind, status, secs, top1, r.dir)


def _report(spec: StudySpec, items: Sequence[Resolved], out: Path) -> Path:

    dirs = [str(r.dir) for r in items if r.role == "member"] + [str(r.dir) for r in items if r.kind == "ensemble"]
    res = build_report(
        ReportConfig(
            dirs=tuple(dirs),
            out=out / "report",
            data=spec.data,
            title=spec.title or f"Study {spec.name}",
            spec_text=(out / "study.yaml").read_text(encoding="utf-8"),
        )
    )
    return res.html


def _write_summary(spec: StudySpec, result: StudyResult) -> None:
    atomic_write_json(
        result.out / "summary.json",
        {
            "study": spec.name,
            "finished": datetime.now(UTC).isoformat(timespec="seconds"),
            "wall_s": round(result.wall_s, 2),
            "report": None if result.report is None else str(result.report),
            "steps": [
                {
                    "name": s.name,
                    "kind": s.kind,
                    "status": s.status,
                    "seconds": round(s.seconds, 2),
                    "top1": s.top1,
                    "dir": str(s.dir),
                }
                for s in result.steps
            ],
        },
    )


# --------------------------------------------------------------------------------------------------
# Re-evaluation on new data: every member, every ensemble with its fitted combination, nothing refit


def evaluate_study(
    study_dir: str | os.PathLike[str],
    *,
    data: str,
    split: str,
    out: str | os.PathLike[str],
    runtime: Mapping[str, Any] | None = None,
    n_boot: int = 1000,
    report: bool = True,
) -> dict[str, Any]:
    """Evaluate every reported member of a finished study on ``data``/``split`` and re-apply every ensemble.

    Members write the usual evaluate outputs to ``out/members/<name>``; each ensemble's fitted
    combination (``weights.json``) is applied to those predictions without refitting and written to
    ``out/ensembles/<name>`` in the same format as ``transferlab ensemble``. Samples the ensemble was
    fitted on are counted and flagged, so a re-evaluation on the study's own data is not mistaken for a
    held-out one. Returns the summary also written to ``out/summary.json``.
    """
    sdir = Path(study_dir)
    if not is_study_dir(sdir):
        raise DataError(f"{sdir}: not a study folder (no study.yaml and members/); run `transferlab study` first")
    doc = yaml.safe_load((sdir / "study.yaml").read_text(encoding="utf-8")) or {}
    out = Path(out)
    rt = dict(runtime or {})
    members = [(n, m) for n, m in (doc.get("members") or {}).items() if m.get("role", "member") == "member"]
    if not members:
        raise DataError(f"{sdir}/study.yaml lists no members evaluated on the study's data")
    rows: dict[str, dict[str, Any]] = {}
    for name, m in members:
        mdir = sdir / "members" / name
        if not (mdir / "metrics.json").is_file():
            raise DataError(f"member {name} in {sdir} has not finished (no metrics.json); finish the study first")
        mout = out / "members" / name
        if m.get("kind") == "zero-shot":
            keep = {k: m[k] for k in ("weights", "img_size", "crop", "interpolation", "seed") if k in m}
            cfg = EvalConfig(
                data=data, out=mout, model=m["model"], split=split, zero_shot=True, n_boot=n_boot, **keep, **rt
            )
        else:
            cfg = EvalConfig(data=data, out=mout, run=mdir, split=split, n_boot=n_boot, **rt)
        log.info("member %s on %s/%s", name, data, split)
        rows[name] = evaluate(cfg)
    ens_rows: dict[str, dict[str, Any]] = {}
    edir = sdir / "ensembles"
    for e in sorted(p for p in edir.iterdir() if (p / "weights.json").is_file()) if edir.is_dir() else []:
        ens_rows[e.name] = _apply_saved_ensemble(e, out, split, n_boot=n_boot, data=data)
    summary = {
        "study": str(sdir.resolve()),
        "data": data,
        "split": split,
        "members": {k: {"top1": v["top1"], "top1_ci": v["top1_ci"], "n": v["n"]} for k, v in rows.items()},
        "ensembles": {
            k: {x: v[x] for x in ("top1", "top1_ci", "n", "n_fitted_on", "warning") if x in v}
            for k, v in ens_rows.items()
        },
    }
    if ens_rows:
        best = max(ens_rows, key=lambda k: ens_rows[k]["top1"])
        summary["best_ensemble"] = {"name": best, "top1": ens_rows[best]["top1"]}
    atomic_write_json(out / "summary.json", summary)
    if report:
        dirs = [str(out / "members" / n) for n, _ in members] + [str(out / "ensembles" / k) for k in ens_rows]
        res = build_report(
            ReportConfig(
                dirs=tuple(dirs), out=out / "report", data=data, title=f"{doc.get('name', sdir.name)} on {split}"
            )
        )
        summary["report"] = str(res.html)
    return summary


def _apply_saved_ensemble(edir: Path, out: Path, split: str, *, n_boot: int, data: str) -> dict[str, Any]:
    """Re-apply the ensemble in ``edir`` to the members' new predictions under ``out/members``."""
    import math

    import numpy as np

    wdoc = json.loads((edir / "weights.json").read_text(encoding="utf-8"))
    names = [m["name"] for m in wdoc["members"]]
    files = [out / "members" / n for n in names]
    probs = apply_ensemble(edir / "weights.json", files, split=split)
    mem = load_members(files, split)
    targets, ids = mem[0].targets, mem[0].sample_ids
    lp = np.log(np.maximum(probs, np.finfo(np.float64).tiny))
    head = summarize(lp, targets, n_boot=n_boot, seed=0)
    old = json.loads((edir / "metrics.json").read_text(encoding="utf-8")) if (edir / "metrics.json").is_file() else {}
    best_name = (old.get("best_member") or {}).get("name", names[0])
    bi = names.index(best_name) if best_name in names else 0
    member_rows = []
    for n, m in zip(names, mem, strict=True):
        mlp = log_softmax(m.logits.astype(np.float64))
        member_rows.append(
            {
                "name": n,
                "path": str(m.path.resolve()),
                "split": "report",
                **summarize(mlp, targets, n_boot=n_boot, seed=0),
            }
        )
    pb = paired_bootstrap(
        topk_correct(lp, targets, 1),
        topk_correct(log_softmax(mem[bi].logits.astype(np.float64)), targets, 1),
        n_boot=n_boot,
        seed=0,
    )
    sel = set((wdoc.get("protocol") or {}).get("select_sample_ids") or [])
    in_select = int(sum(1 for s in ids.tolist() if s in sel))
    # mean and vote have no parameters: the select half only named the best member, so their numbers here are
    # not optimistic. Everything else (weights, greedy counts, stacking, temperatures) was fitted there.
    fitted = wdoc.get("method") not in ("mean", "vote") or bool(wdoc.get("temperature"))
    overlap = in_select if fitted else 0
    protocol = {
        "mode": "apply",
        "select": f"fitted in the study ({edir}); nothing refit",
        "report": f"all {len(targets)} samples of {data}/{split}",
        "n_report": len(targets),
        "n_fitted_on": overlap,
        "n_in_select": in_select,
    }
    metrics: dict[str, Any] = {
        "method": wdoc.get("method"),
        "temperature": wdoc.get("temperature"),
        "split": split,
        "numbers_from": f"all {len(targets)} samples of {data}/{split}",
        "fitted_on": f"the study's selection data ({edir}/weights.json); nothing refit here",
        "protocol": protocol,
        "num_classes": len(mem[0].class_ids),
        "ensemble": {**head, "split": "report"},
        "members": member_rows,
        "best_member": {
            "index": bi,
            "name": names[bi],
            "chosen_on": "the study's selection data",
            "criterion": "top1, then nll",
        },
        "vs_best_member": {
            "split": "report",
            "metric": "top1",
            "test": "paired bootstrap over the same resampled samples",
            "gain": pb["gain"],
            "gain_ci": pb["ci"],
            "p_gain_positive": pb["p_gain_positive"],
            "n_boot": pb["n_boot"],
            "seed": 0,
        },
    }
    if overlap:
        metrics["warning"] = (
            f"{overlap} of these {len(targets)} samples were used to fit this ensemble in the study; its number here "
            "is optimistic - evaluate on data the study never saw"
        )
    dest = out / "ensembles" / edir.name
    ids_cls = tuple(mem[0].class_ids.tolist())
    floor = math.log(np.finfo(np.float32).tiny)
    write_predictions(predictions_path(dest, split), np.maximum(lp, floor), targets, ids.tolist(), ids_cls)
    # The fitted combination travels along, so the report shows what was applied.
    atomic_write_text(dest / "weights.json", (edir / "weights.json").read_text(encoding="utf-8"))
    atomic_write_json(dest / "metrics.json", json.loads(json.dumps(metrics, default=float)))
    return {**head, "n_fitted_on": overlap, **({"warning": metrics["warning"]} if overlap else {})}
