"""transferlab's side of the speed benchmark: the same four jobs as ``baseline.py``, through the library.

Plus ``evaluate`` and ``predict`` for the ``predict`` row, which compares transferlab with itself: the
``transferlab predict`` library call on a dataset split against ``transferlab evaluate`` on the same split;
and ``features`` for the ``features`` row: a study's feature extraction (Lite0@224, Lite1@192, Lite2@224 over
the mini copy's 25,000 images) with ``--backend torch`` (what transferlab did before it had a choice) against
``--backend auto``.

Every job runs what a user of transferlab runs, with the defaults a user gets: the decoded cache,
batched tensor resizing and augmentation, bf16 autocast + channels_last where the hardware supports it
(decided by :func:`transferlab.runtime.resolve_precision`, logged), and for the frozen-backbone row the
feature cache. Only the data selection is pinned so that both sides see the same images: the first
``--limit`` samples of a split in its order, which is the order of the list files ``run.py`` writes for
the baseline.

The jobs a user runs go through the Python API (``tl.train``, ``tl.evaluate``, ``tl.predict``), exactly as a
notebook would call them. Two rows time one component on purpose and so reach below it: ``eval`` (the inference
engine on the decoded val split, the model's forward passes only, like the baseline's timed loop) and ``data``
(the decoded cache's batch pipeline alone); ``prepare`` builds the decoded cache the other rows share.

Each subcommand prints one JSON object as the last line of stdout, with the same keys as the baseline's.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import resource
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

import transferlab as tl
from transferlab.data import open_dataset
from transferlab.data.batched import ArrayBatches, eval_batch
from transferlab.data.decoded import decode_split, pixel_array
from transferlab.inference.engine import make_eval_transform, predict_logits
from transferlab.labels import imagenet_indices
from transferlab.models.backbones import create_backbone
from transferlab.runtime import resolve_device, resolve_precision


def _rss() -> dict[str, float]:
    return {
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "children_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1),
    }


def _split(args: argparse.Namespace, name: str) -> Any:
    split = open_dataset(args.data).split(name)
    return decode_split(split, Path(args.cache))


def cmd_prepare(args: argparse.Namespace) -> dict[str, Any]:
    """Build the decoded cache of train and val (the one-time cost, reported separately)."""
    out: dict[str, Any] = {}
    for name in ("train", "val"):
        t0 = time.perf_counter()
        split = _split(args, name)
        out[f"{name}_seconds"] = round(time.perf_counter() - t0, 3)
        out[f"{name}_images"] = len(split)
        out[f"{name}_bytes"] = int(pixel_array(split).nbytes) if pixel_array(split) is not None else 0
    return out


def cmd_eval(args: argparse.Namespace) -> dict[str, Any]:
    device = resolve_device(args.device)
    precision = resolve_precision("auto", "auto", device)
    backbone = create_backbone(args.model, "auto")
    split = _split(args, "val")
    idx = np.arange(min(args.limit or len(split), len(split)))
    tf = make_eval_transform(backbone.preprocessing, args.size)
    t0 = time.perf_counter()
    engine: dict[str, Any] = {}
    logits = predict_logits(
        backbone,
        split,
        tf,
        indices=idx,
        precision=precision,
        device=device,
        batch_size=args.batch_size,
        progress=False,
        backend=args.backend,
        info=engine,
    )
    if device.type == "cuda":
        torch.cuda.synchronize()
    secs = time.perf_counter() - t0
    cols = imagenet_indices(open_dataset(args.data).classes.ids)
    top1 = float((logits[:, cols].argmax(1) == split.targets[idx]).mean())
    return {
        "images": len(idx),
        "seconds": round(secs, 3),
        "images_per_s": round(len(idx) / secs, 2),
        "top1": top1,
        "precision": precision.describe(),
        "backend": engine,
    }


#: The feature-extraction row: the backbones and resolutions of a study's linear probes (studies/quick.yaml and
#: ``transferlab auto``), over every image of the mini copy (train and val: 25,000).
FEATURE_MODELS = (("tf_efficientnet_lite0", 224), ("tf_efficientnet_lite1", 192), ("tf_efficientnet_lite2", 224))


def cmd_features(args: argparse.Namespace) -> dict[str, Any]:
    """Pre-logits features of ``FEATURE_MODELS`` over train + val into an empty feature cache (the decoded
    cache is ``prepare``'s; OpenVINO converts into an empty conversion cache, so its one-time cost counts)."""
    from transferlab.inference.features import cached_features

    device = resolve_device(args.device)
    precision = resolve_precision("auto", "auto", device)
    splits = {name: _split(args, name) for name in ("train", "val")}
    per: dict[str, Any] = {}
    images = 0
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["TRANSFERLAB_CACHE"] = tmp  # a fresh OpenVINO conversion cache
        t_all = time.perf_counter()
        for name, size in FEATURE_MODELS if args.limit is None else FEATURE_MODELS[:1]:
            backbone = create_backbone(name, "auto")
            tf = make_eval_transform(backbone.preprocessing, size)
            t0 = time.perf_counter()
            engine: dict[str, Any] = {}
            for split in splits.values():
                idx = np.arange(min(args.limit or len(split), len(split)))
                cached_features(
                    backbone,
                    split,
                    tf,
                    indices=idx,
                    precision=precision,
                    device=device,
                    cache_dir=Path(tmp) / "features",
                    batch_size=args.batch_size,
                    progress=False,
                    backend=args.backend,
                    info=engine,
                )
                images += len(idx)
            per[f"{name}@{size}"] = {"seconds": round(time.perf_counter() - t0, 2), "backend": engine}
        secs = time.perf_counter() - t_all
    return {"images": images, "seconds": round(secs, 3), "images_per_s": round(images / secs, 2), "models": per}


def cmd_evaluate(args: argparse.Namespace) -> dict[str, Any]:
    """``transferlab evaluate`` on the val split: a run directory (``--run``) or the model zero-shot.

    ``--out`` keeps the output folder, which ``predict`` can then rebuild the same model from. The decoded
    cache is the one ``prepare`` built. images/s is the command's own (metrics.json: the inference loop).
    """
    os.environ["TRANSFERLAB_CACHE"] = str(Path(args.cache).resolve())
    with contextlib.ExitStack() as stack:
        out = Path(args.out) if args.out else Path(stack.enter_context(tempfile.TemporaryDirectory())) / "eval"
        source = {"source": Path(args.run)} if args.run else {"model": args.model, "zero_shot": True}
        size = {} if args.run else {"img_size": args.size}  # a run is fed the way it was trained
        m = tl.evaluate(
            data=args.data,
            out=out,
            split="val",
            limit=args.limit,
            batch_size=args.batch_size,
            device=args.device,
            n_boot=0,
            progress=False,
            **source,
            **size,
        ).metrics
    return {
        "images": m["n"],
        "seconds": m["wall_s"],
        "images_per_s": m["images_per_s"],
        "top1": m["top1"],
        "precision": f"{m['precision']}, channels_last {m['channels_last']}",
        "pipeline": m["pipeline"],
    }


def cmd_predict(args: argparse.Namespace) -> dict[str, Any]:
    """``transferlab predict`` on the val split (``--data``, the same ``--limit`` subset as ``evaluate``) with
    the model of ``--source`` (a run, export or evaluate output). images/s is the command's own (its JSON meta)."""
    os.environ["TRANSFERLAB_CACHE"] = str(Path(args.cache).resolve())
    r = tl.predict(
        Path(args.source),
        (),
        data=args.data,
        split="val",
        limit=args.limit,
        batch_size=args.batch_size,
        device=args.device,
        progress=False,
    )
    m = r.meta
    return {
        "images": m["n_predicted"],
        "failed": m["n_failed"],
        "seconds": m["wall_s"],
        "images_per_s": m["images_per_s"],
        "top1": m["top1"],
        "precision": m["precision"],
    }


@contextlib.contextmanager
def _run_dirs(args: argparse.Namespace, **options: Any) -> Iterator[dict[str, Any]]:
    """``tl.train``'s options for a temporary run folder, with a fresh cache that shares only the decoded cache.

    The decoded cache is built once per dataset (``prepare``); the feature cache starts empty, so a
    measured wall time includes extracting every feature.
    """
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "cache"
        cache.mkdir()
        (cache / "decoded").symlink_to(Path(args.cache).resolve() / "decoded")
        yield dict(
            model=args.model,
            data=args.data,
            out=Path(tmp) / "run",
            img_size=args.size,
            lr=args.lr,
            batch_size=args.batch_size,
            cache_dir=cache,
            device=args.device,
            progress=False,
            **options,
        )


def cmd_head(args: argparse.Namespace) -> dict[str, Any]:
    with _run_dirs(
        args,
        strategy="linear-probe",
        head_init="random",
        epochs=args.epochs,
        optimizer="adamw",
        train_limit=args.train_limit,
        report_limit=args.val_limit,
    ) as options:
        t0 = time.perf_counter()
        m = tl.train(**options).metrics
        secs = time.perf_counter() - t0
    return {
        "seconds": round(secs, 3),
        "feature_seconds": m.get("feature_seconds"),
        "fit_seconds": m.get("fit_seconds"),
        "epochs": args.epochs,
        "images": m["n_fit"] + m["n_holdout"],
        "val_images": m["n"],
        "top1": m["top1"],
        "precision": m["precision"],
    }


def cmd_bnonly(args: argparse.Namespace) -> dict[str, Any]:
    steps_needed = args.warmup + args.steps
    holdout = 0.02
    limit = int(np.ceil(steps_needed * args.batch_size / (1 - holdout))) + 200 * 2  # class-stratified rounding
    stamps: list[tuple[float, float]] = []

    def on(kind: str, row: dict[str, float]) -> None:
        if kind == "step":
            if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()):
                torch.cuda.synchronize()
            stamps.append((time.perf_counter(), float(row["loss"])))

    with _run_dirs(
        args,
        strategy="bn-only",
        head="seed",
        aug="seed",
        epochs=1,
        optimizer="rmsprop",
        holdout=holdout,
        train_limit=limit,
        report_limit=args.batch_size,
    ) as options:
        m = tl.train(**options, callback=on).metrics
    if len(stamps) < steps_needed:
        raise SystemExit(f"only {len(stamps)} steps ran, {steps_needed} needed")
    t = [s[0] for s in stamps]
    losses = [s[1] for s in stamps[args.warmup : steps_needed]]
    # Step k's stamp is taken when step k is done, so K timed steps span stamps[W - 1] .. stamps[W + K - 1].
    secs = t[steps_needed - 1] - t[args.warmup - 1] if args.warmup > 0 else t[steps_needed - 1] - t[0]
    n_steps = args.steps if args.warmup > 0 else args.steps - 1
    w = min(10, len(losses))
    return {
        "steps": args.steps,
        "warmup": args.warmup,
        "images": n_steps * args.batch_size,
        "seconds": round(secs, 3),
        "images_per_s": round(n_steps * args.batch_size / secs, 2),
        "first_loss": float(np.mean(losses[:w])),
        "final_loss": float(np.mean(losses[-w:])),
        "precision": m["precision"],
    }


def cmd_data(args: argparse.Namespace) -> dict[str, Any]:
    device = resolve_device(args.device)
    backbone_pre = create_backbone(args.model, "auto").preprocessing
    split = _split(args, "val")
    idx = np.arange(min(args.limit or len(split), len(split)))
    tf = make_eval_transform(backbone_pre, args.size)
    pixels = pixel_array(split)
    assert pixels is not None, "the decoded cache was not used"
    batches = ArrayBatches(
        pixels, split.targets, idx, range(len(idx)), args.batch_size, lambda u8, _i: eval_batch(u8, tf), device
    )
    t0 = time.perf_counter()
    n = 0
    for x, _, _ in batches:
        n += len(x)
    if device.type == "cuda":
        torch.cuda.synchronize()
    secs = time.perf_counter() - t0
    return {"images": n, "seconds": round(secs, 3), "images_per_s": round(n / secs, 2)}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    sub = p.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--data", required=True, help="the dataset (zip, folder or name) transferlab reads")
    common.add_argument("--cache", required=True, help="cache root holding decoded/ (built by `prepare`)")
    common.add_argument("--model", default="tf_efficientnet_lite0")
    common.add_argument("--size", type=int, default=224)
    common.add_argument("--batch-size", type=int, default=64)
    common.add_argument("--device", default="auto")
    common.add_argument("--threads", type=int, default=None)
    common.add_argument("--backend", default="auto", help="the engine's backend for eval and features (default: auto)")
    for name in ("prepare", "eval", "head", "bnonly", "data", "evaluate", "predict", "features"):
        sp = sub.add_parser(name, parents=[common])
        if name in ("eval", "data", "evaluate", "predict", "features"):
            sp.add_argument("--limit", type=int, default=None)
        if name == "evaluate":
            sp.add_argument("--run", default=None, help="a run directory (default: --model zero-shot)")
            sp.add_argument("--out", default=None, help="keep the evaluate output here (a predictor for `predict`)")
        if name == "predict":
            sp.add_argument("--source", required=True, help="a run, export or evaluate output folder")
        if name == "head":
            sp.add_argument("--epochs", type=int, default=10)
            sp.add_argument("--lr", type=float, default=1e-3)
            sp.add_argument("--train-limit", type=int, default=None, help="a seeded subset of train (smoke runs)")
            sp.add_argument("--val-limit", type=int, default=None, help="a seeded subset of val (smoke runs)")
        if name == "bnonly":
            sp.add_argument("--steps", type=int, default=50)
            sp.add_argument("--warmup", type=int, default=5)
            sp.add_argument("--lr", type=float, default=1e-4)
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    if args.threads:
        torch.set_num_threads(args.threads)
    commands = {
        "prepare": cmd_prepare,
        "eval": cmd_eval,
        "head": cmd_head,
        "bnonly": cmd_bnonly,
        "data": cmd_data,
        "evaluate": cmd_evaluate,
        "predict": cmd_predict,
        "features": cmd_features,
    }
    out = {**commands[args.command](args)}
    out.update(
        command=args.command,
        model=args.model,
        size=args.size,
        batch_size=args.batch_size,
        device=str(resolve_device(args.device)),
        torch_threads=torch.get_num_threads(),
        **_rss(),
    )
    print(json.dumps(out))


if __name__ == "__main__":
    main()
