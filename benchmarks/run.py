"""transferlab against the plain docs-style script, side by side: ``make bench`` (or ``python benchmarks/run.py``).

Rows (each on the same model, images and batch size on both sides):

* ``eval``: Lite0 zero-shot at 224px over the first 2,000 Tiny ImageNet val images: images/s, top-1; against
  two baselines, the plain docs-style script (fp32) and the same loop with timm validate.py's best flags
  (``baseline.py eval --best-flags``: bf16 autocast, channels_last, crop-pct 1.0, bilinear), both ratios;
* ``head``: frozen backbone + linear head (random init, AdamW 1e-3), 10 epochs over the mini train split
  at 64px, then top-1 on all val images: wall time (transferlab's includes extracting the features);
* ``bnonly``: BatchNorm-only fine-tune with the seed head and shear/zoom/flip at 128px, RMSProp 1e-4:
  images/s over 20 timed steps after 3 warm-up steps, first and final loss;
* ``data``: the input pipeline alone at 224px: images/s, decoded cache vs PIL decoding per image;
* ``predict`` (not in the default set: it compares transferlab with itself): ``transferlab predict`` on a
  dataset split against ``transferlab evaluate`` on the same split, same model, images (a seeded subset of
  2,000 val images) and batch: images/s as each command reports it, and the top-1 both must agree on. The
  "baseline" column is ``evaluate``. The model is Lite0 zero-shot at 224px (``predict`` rebuilds it from a
  small ``evaluate`` output), or a run directory given with ``--predict-run``;
* ``features`` (not in the default set: about 15 minutes on 2 cores): a study's feature extraction, Lite0@224,
  Lite1@192 and Lite2@224 pre-logits over the mini copy's 25,000 images into an empty feature cache, with
  ``--backend torch`` (the "baseline" column: transferlab before it had a backend choice) against
  ``--backend auto``; seconds, the OpenVINO conversions included.

Every measurement is a fresh subprocess (``baseline.py`` or ``ours.py``), so peak RSS is per row and
nothing is shared but the disk cache. The two sides alternate (baseline first on odd repeats, transferlab
first on even ones) and the median over repeats is reported. Results go to
``benchmarks/results/<time>-<device>.json`` with every raw measurement and the machine description.

One-time costs are measured and reported separately, not hidden: building the decoded cache
(``prepare``) and, for the baseline, extracting the zip into an ImageFolder-style tree.

The same command runs on a CUDA machine unchanged (``--device auto`` picks the GPU on both sides).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

#: Row settings: full run, and the --quick smoke version (seconds; proves the harness, not the speed).
ROWS: dict[str, dict[str, Any]] = {
    "eval": {"size": 224, "limit": 2000, "batch": 32},
    "head": {"size": 64, "epochs": 10, "batch": 128},
    "bnonly": {"size": 128, "steps": 20, "warmup": 3, "batch": 64},
    "data": {"size": 224, "limit": 2000, "batch": 32},
    "predict": {"size": 224, "limit": 2000, "batch": 32},
    "features": {"size": 224, "batch": 32},
}
QUICK: dict[str, dict[str, Any]] = {
    "eval": {"size": 64, "limit": 48, "batch": 16},
    "head": {"size": 32, "epochs": 1, "batch": 32, "train_limit": 400, "val_limit": 100},
    "bnonly": {"size": 32, "steps": 2, "warmup": 1, "batch": 8},
    "data": {"size": 64, "limit": 48, "batch": 16},
    "predict": {"size": 64, "limit": 48, "batch": 16},
    "features": {"size": 64, "limit": 48, "batch": 16},
}
#: (metric, higher is better, goal for transferlab / baseline)
GOALS = {
    "eval": ("images_per_s", True, 3.0),
    "head": ("seconds", False, 10.0),
    "bnonly": ("images_per_s", True, 1.5),
    "data": ("images_per_s", True, None),
    # predict / evaluate: the same speed, give or take the noise of a shared machine.
    "predict": ("images_per_s", True, 0.9),
    # features: --backend auto at least 1.5x faster than --backend torch.
    "features": ("seconds", False, 1.5),
}
#: What the two sides of a row are, where they are not the plain script and transferlab.
SIDES = {
    "predict": {"baseline": "transferlab evaluate", "transferlab": "transferlab predict"},
    "features": {"baseline": "transferlab --backend torch", "transferlab": "transferlab --backend auto"},
}
DEFAULT_ROWS = "eval,head,bnonly,data"


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _machine() -> dict[str, Any]:
    import torch

    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            text = f.read()
        m = re.search(r"model name\s*:\s*(.+)", text)
        cpu = m.group(1).strip() if m else cpu
        bf16 = "avx512_bf16" in text or "amx_bf16" in text
    except OSError:
        bf16 = False
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu_bf16": bf16,
        "gpu": gpu,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def prepare(data: str, work: Path, model: str, quick: bool) -> dict[str, Any]:
    """Extract the zip for the baseline, write its list files, weights and class map; build our decoded cache."""
    from safetensors.torch import save_file

    from transferlab.data import open_dataset
    from transferlab.labels import imagenet_indices
    from transferlab.models.backbones import create_backbone

    source = open_dataset(data)
    location = Path(source.location)
    work.mkdir(parents=True, exist_ok=True)
    extracted = work / "extracted"
    info: dict[str, Any] = {"data": str(location)}
    if not (extracted / ".complete").exists():
        t0 = time.perf_counter()
        if location.is_dir():
            extracted = location  # already a folder tree: nothing to extract
        else:
            with zipfile.ZipFile(location) as zf:
                zf.extractall(extracted)
            (extracted / ".complete").write_text("ok\n")
        info["extract_seconds"] = round(time.perf_counter() - t0, 2)
    roots = [p.parent for p in extracted.rglob("wnids.txt")] if extracted != location else [location]
    if len(roots) != 1:
        raise SystemExit(f"expected one dataset root (wnids.txt) under {extracted}, found {roots}")
    droot = roots[0]
    for name in ("train", "val"):
        split = source.split(name)
        lines = [f"{droot / sid}\t{int(t)}" for sid, t in zip(split.sample_ids, split.targets, strict=True)]
        if quick and name == "train":
            step = max(1, len(lines) // QUICK["head"]["train_limit"])
            lines = lines[::step][: QUICK["head"]["train_limit"]]
        if quick and name == "val":
            lines = lines[: QUICK["head"]["val_limit"]]
        (work / f"{name}.txt").write_text("\n".join(lines) + "\n")
    backbone = create_backbone(model, "auto")
    weights = work / f"{model}.safetensors"
    save_file({k: v.contiguous() for k, v in backbone.model.state_dict().items()}, str(weights))
    (work / "class_map.json").write_text(json.dumps([int(i) for i in imagenet_indices(source.classes.ids)]))
    pre = backbone.preprocessing
    info.update(
        weights=str(weights),
        weights_source=backbone.weights,
        mean=",".join(str(v) for v in pre.mean),
        std=",".join(str(v) for v in pre.std),
    )
    info["prepare"] = _run([sys.executable, str(HERE / "ours.py"), "prepare", *_ours_common(data, work, model)])
    return info


def _ours_common(data: str, work: Path, model: str) -> list[str]:
    return ["--data", data, "--cache", str(work / "cache"), "--model", model]


def _run(cmd: list[str], timeout: float = 3600) -> dict[str, Any]:
    t0 = time.perf_counter()
    p = subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1"}
    )
    if p.returncode != 0:
        raise SystemExit(f"benchmark step failed ({p.returncode}): {' '.join(cmd)}\n{p.stderr[-4000:]}")
    lines = [ln for ln in p.stdout.splitlines() if ln.strip().startswith("{")]
    if not lines:
        raise SystemExit(f"no JSON result from {' '.join(cmd)}\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")
    out = json.loads(lines[-1])
    out["process_seconds"] = round(time.perf_counter() - t0, 2)
    return out


def _commands(
    row: str, s: dict[str, Any], info: dict[str, Any], work: Path, args: argparse.Namespace
) -> dict[str, list[str]]:
    py = sys.executable
    norm = ["--mean", info["mean"], "--std", info["std"]]
    common = ["--size", str(s["size"]), "--batch-size", str(s["batch"]), "--device", args.device]
    base = [py, str(HERE / "baseline.py"), row, *norm, *common, "--workers", str(args.workers)]
    ours = [py, str(HERE / "ours.py"), row, *_ours_common(args.data, work, args.model), *common]
    model = ["--model", args.model, "--weights", info["weights"]]
    if row == "eval":
        base += [*model, "--val-list", str(work / "val.txt"), "--class-map", str(work / "class_map.json")]
        base += ["--limit", str(s["limit"])]
        ours += ["--limit", str(s["limit"])]
        return {"baseline": base, "baseline_best": [*base, "--best-flags"], "transferlab": ours}
    elif row == "head":
        base += [*model, "--train-list", str(work / "train.txt"), "--val-list", str(work / "val.txt")]
        base += ["--epochs", str(s["epochs"]), "--lr", "1e-3"]
        ours += ["--epochs", str(s["epochs"]), "--lr", "1e-3"]
        if "train_limit" in s:
            ours += ["--train-limit", str(s["train_limit"]), "--val-limit", str(s["val_limit"])]
    elif row == "bnonly":
        base += [*model, "--train-list", str(work / "train.txt"), "--lr", "1e-4"]
        base += ["--steps", str(s["steps"]), "--warmup", str(s["warmup"])]
        ours += ["--steps", str(s["steps"]), "--warmup", str(s["warmup"]), "--lr", "1e-4"]
    elif row == "data":
        base += ["--val-list", str(work / "val.txt"), "--limit", str(s["limit"])]
        ours += ["--limit", str(s["limit"])]
    elif row == "features":
        ours = [py, str(HERE / "ours.py"), "features", *_ours_common(args.data, work, args.model), *common]
        ours += ["--limit", str(s["limit"])] if "limit" in s else []
        return {"baseline": [*ours, "--backend", "torch"], "transferlab": [*ours, "--backend", "auto"]}
    return {"baseline": base, "transferlab": ours}


def _predict_commands(s: dict[str, Any], work: Path, args: argparse.Namespace) -> dict[str, list[str]]:
    """The predict row: ``evaluate`` (its "baseline" side) and ``predict`` on the same val images, model and batch."""
    py = sys.executable
    common = [*_ours_common(args.data, work, args.model), "--batch-size", str(s["batch"]), "--device", args.device]
    common += ["--size", str(s["size"]), "--limit", str(s["limit"])]
    run = ["--run", str(args.predict_run)] if args.predict_run else []
    source = args.predict_run or _predictor_dir(work, s)
    return {
        "baseline": [py, str(HERE / "ours.py"), "evaluate", *common, *run],
        "transferlab": [py, str(HERE / "ours.py"), "predict", *common, "--source", str(source)],
    }


def _predictor_dir(work: Path, s: dict[str, Any]) -> Path:
    return work / f"predictor-{s['size']}"


def make_predictor(s: dict[str, Any], work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """A zero-shot ``evaluate`` output of 8 images at the row's size, for ``predict`` to rebuild the model from."""
    cmd = _predict_commands({**s, "limit": 8}, work, args)["baseline"]
    return _run([*cmd, "--out", str(_predictor_dir(work, s))])


def _median(runs: list[dict[str, Any]], key: str) -> float | None:
    vals = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(vals) if vals else None


def summarize(row: str, runs: dict[str, list[dict[str, Any]]], eval_ips: float | None) -> dict[str, Any]:
    """Median metric per side, the ratio (transferlab's advantage, > 1 is faster) and the goal check."""
    metric, higher, goal = GOALS[row]
    b, o = _median(runs["baseline"], metric), _median(runs["transferlab"], metric)
    ratio = None
    if b and o:
        ratio = o / b if higher else b / o
    out: dict[str, Any] = {
        "row": row,
        "metric": metric,
        "baseline": b,
        "transferlab": o,
        "ratio": None if ratio is None else round(ratio, 2),
        "goal": goal,
        "repeats": len(runs["transferlab"]),
        "baseline_peak_rss_mb": _median(runs["baseline"], "peak_rss_mb"),
        "baseline_workers_peak_rss_mb": _median(runs["baseline"], "children_peak_rss_mb"),
        "transferlab_peak_rss_mb": _median(runs["transferlab"], "peak_rss_mb"),
    }
    for key in ("top1", "first_loss", "final_loss"):
        if _median(runs["transferlab"], key) is not None:
            out[f"baseline_{key}"] = _median(runs["baseline"], key)
            out[f"transferlab_{key}"] = _median(runs["transferlab"], key)
    if row in SIDES:
        out["sides"] = SIDES[row]
    if row == "eval" and runs.get("baseline_best"):
        best = _median(runs["baseline_best"], metric)
        out["baseline_best"] = best
        out["ratio_best"] = round(o / best, 2) if o and best else None
        out["baseline_best_top1"] = _median(runs["baseline_best"], "top1")
        out["baseline_best_peak_rss_mb"] = _median(runs["baseline_best"], "peak_rss_mb")
    if row == "eval" and out.get("baseline_top1") is not None:
        # Top-1 against the plain baseline's: PyTorch fp32, the numbers every faster path must keep.
        out["delta_top1_pt"] = round(100 * (out["transferlab_top1"] - out["baseline_top1"]), 2)
        against = out.get("ratio_best") or ratio
        out["pass"] = bool(against and against >= goal and abs(out["delta_top1_pt"]) <= 0.2)
    elif row == "data":
        # The goal here: the pipeline feeds images >= 5x faster than the model consumes them in the eval row.
        out["vs_eval_consumption"] = round(o / eval_ips, 2) if o and eval_ips else None
        out["goal"] = "5x eval row"
        out["pass"] = bool(out["vs_eval_consumption"] and out["vs_eval_consumption"] >= 5)
    elif row == "predict":
        # The same model over the same images in the same batches: the same predictions, not merely close ones.
        same = out.get("baseline_top1") is not None and out["baseline_top1"] == out["transferlab_top1"]
        out["pass"] = bool(ratio and ratio >= goal and same)
    else:
        out["pass"] = bool(ratio and goal and ratio >= goal)
    return out


def _fmt(v: Any, nd: int = 1) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.{nd}f}"
    return str(v)


def table(rows: list[dict[str, Any]]) -> str:
    """A Markdown table of the summaries (the README's performance table is pasted from this)."""
    head = (
        "| row | metric | baseline | transferlab | ratio | goal | accuracy / loss (baseline -> transferlab) "
        "| peak RSS MB, main process (baseline / transferlab) | pass |"
    )
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        acc = ""
        if r.get("baseline_top1") is not None:
            acc = f"top-1 {100 * r['baseline_top1']:.2f}% -> {100 * r['transferlab_top1']:.2f}%"
        elif r.get("baseline_final_loss") is not None:
            base = f"{r['baseline_first_loss']:.3f}->{r['baseline_final_loss']:.3f}"
            ours = f"{r['transferlab_first_loss']:.3f}->{r['transferlab_final_loss']:.3f}"
            acc = f"loss {base} vs {ours}"
        ratio = _fmt(r["ratio"], 2) + "x"
        if r.get("ratio_best") is not None:
            ratio += f" (best flags {_fmt(r['baseline_best'])}: {_fmt(r['ratio_best'], 2)}x)"
        if r["row"] == "data":
            ratio += f" ({_fmt(r.get('vs_eval_consumption'), 1)}x eval row)"
        goal = r["goal"] if isinstance(r["goal"], str) else (f">= {r['goal']}x" if r["goal"] else "-")
        rss = f"{_fmt(r['baseline_peak_rss_mb'], 0)} / {_fmt(r['transferlab_peak_rss_mb'], 0)}"
        name = r["row"] if "sides" not in r else f"{r['row']} ({r['sides']['transferlab']} vs {r['sides']['baseline']})"
        lines.append(
            f"| {name} | {r['metric']} | {_fmt(r['baseline'])} | {_fmt(r['transferlab'])} | {ratio} | {goal} | "
            f"{acc} | {rss} | {'yes' if r['pass'] else 'NO'} |"
        )
    return "\n".join(lines)


def measure(row: str, cmds: dict[str, list[str]], reps: int) -> dict[str, list[dict[str, Any]]]:
    """``reps`` alternating runs of every side (baseline first on odd repeats, transferlab first on even ones)."""
    runs: dict[str, list[dict[str, Any]]] = {side: [] for side in cmds}
    for k in range(reps):
        order = list(cmds) if k % 2 == 0 else list(reversed(cmds))
        for side in order:
            _log(f"[{row} {k + 1}/{reps}] {side} ...")
            res = _run(cmds[side])
            runs[side].append(res)
            metric = GOALS[row][0]
            _log(f"[{row} {k + 1}/{reps}] {side}: {metric} {res.get(metric)}")
    return runs


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument(
        "--rows", default=DEFAULT_ROWS, help=f"comma-separated rows of {', '.join(ROWS)} (default: {DEFAULT_ROWS})"
    )
    p.add_argument("--repeats", type=int, default=3, help="alternating repeats per row (default: 3)")
    p.add_argument(
        "--head-repeats",
        type=int,
        default=1,
        help="repeats of the head row, whose baseline alone takes ~15 min on 2 cores (default: 1)",
    )
    p.add_argument("--data", default="tiny-imagenet-mini", help="dataset spec or path (default: tiny-imagenet-mini)")
    p.add_argument("--model", default="tf_efficientnet_lite0")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--workers", type=int, default=2, help="the baseline's DataLoader workers (default: 2)")
    p.add_argument("--work", type=Path, default=HERE / ".work", help="scratch folder (extracted images, caches)")
    p.add_argument("--out", type=Path, default=HERE / "results", help="where the JSON result goes")
    p.add_argument(
        "--predict-run", type=Path, default=None, help="the predict row's model: a run directory (default: zero-shot)"
    )
    p.add_argument("--quick", action="store_true", help="tiny sizes: checks the harness in seconds, proves no speed")
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        p.error(f"unknown row(s) {unknown}; choose from {', '.join(ROWS)}")
    settings = QUICK if args.quick else ROWS
    work = args.work / ("quick" if args.quick else "full")
    _log(f"preparing {work} ...")
    info = prepare(args.data, work, args.model, args.quick)
    raw: dict[str, dict[str, list[dict[str, Any]]]] = {}
    summaries: list[dict[str, Any]] = []
    eval_ips = None
    for row in rows:
        if row == "predict":
            if args.predict_run is None:
                info["predictor"] = make_predictor(settings[row], work, args)
            cmds = _predict_commands(settings[row], work, args)
        else:
            cmds = _commands(row, settings[row], info, work, args)
        reps = 1 if args.quick else (args.head_repeats if row == "head" else args.repeats)
        runs = raw[row] = measure(row, cmds, reps)
        if row == "eval":
            eval_ips = _median(runs["transferlab"], "images_per_s")
        elif row == "data" and eval_ips is None:
            # The data row's goal is relative to the eval row's consumption: measure it if eval did not run.
            eval_ips = _median(
                [_run(_commands("eval", settings["eval"], info, work, args)["transferlab"])], "images_per_s"
            )
        summaries.append(summarize(row, runs, eval_ips))
    text = table(summaries)
    print(text)
    machine = _machine()
    result = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "quick": args.quick,
        "machine": machine,
        "settings": {r: settings[r] for r in rows},
        "baseline_workers": args.workers,
        "prepare": info,
        "rows": summaries,
        "runs": raw,
        "table": text,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    device = machine["gpu"] or f"cpu{machine['cores']}"
    slug = re.sub(r"[^A-Za-z0-9]+", "-", device).strip("-").lower()
    path = args.out / f"{time.strftime('%Y%m%d-%H%M%S')}-{slug}{'-quick' if args.quick else ''}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    os.replace(tmp, path)
    print(f"\nwrote {path}")
    return 0 if args.quick or all(r["pass"] for r in summaries) else 1


if __name__ == "__main__":
    sys.exit(main())
