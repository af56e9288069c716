"""``transferlab auto``: the best model for a dataset in the time given, and how sure it is.

The planner measures, on this machine, how fast each candidate backbone turns images into features (a few
batches of the data, through the same inference engine and backend the run will use), predicts what every
candidate costs, picks the portfolio that fits the budget, and runs it as a study (``OUT`` is a study folder:
reuse, resume and the report come from :mod:`transferlab.studies`).

The first phase's candidates, cheapest informative first:

* a tuned linear probe per backbone at its native resolution: multinomial logistic regression by L-BFGS
  on flip-averaged features, the penalty chosen on a class-stratified holdout of train and pulled towards
  the ImageNet rows where they apply, then refit on all of train (``--probe lbfgs --flip-features``);
* one probe on the chosen probes' cached features side by side (``kind: concat``);
* the zero-shot model of the first backbone (its ImageNet head on the dataset's classes: the features the
  probe cached, so it costs a pass over nothing).

A candidate whose predicted cost does not fit what is left of the budget is dropped, and the plan says so.
When the first phase has run, its probes' holdout scores decide the second: the backbone whose probe scores
best is offered more, cheapest first, while it fits (its probe at a larger input; LP-FT, a BatchNorm-only
fine-tune from the tuned probe's head, priced from a training step timed then), then the next backbone.
Last, ensembles (greedy and weighted) of every member with holdout predictions, fitted on them and reported
on the report split, which nothing was chosen on; the report's answer among the members is the plan's
highest holdout score, not the highest val score.

The study stops cleanly at the budget: a member that would start after it is skipped, everything finished
is kept. Then, on the cheapest probe's cached features, the label-budget curve: top-1 at 10/25/50/100% of the
train images per class and a power law ``err = a * n^-b`` fitted to it, with bootstrap intervals, says what
doubling the labels should buy. ``OUT/plan.json`` and ``OUT/labels.json`` (read by the report) hold both.
"""

from __future__ import annotations

import json
import logging
import platform
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from transferlab.artifacts.predictions import predictions_path, read_predictions
from transferlab.data import open_dataset
from transferlab.data.decoded import decode_split
from transferlab.data.resolve import DATA_HELP
from transferlab.data.resolve import cache_dir as user_cache_dir
from transferlab.errors import ConfigError, TransferlabError
from transferlab.inference.engine import BACKEND, make_eval_transform, predict_logits
from transferlab.inference.features import pre_logits
from transferlab.io import atomic_write_json, atomic_write_text
from transferlab.models.backbones import create_backbone
from transferlab.models.cpu_kernels import cpu_training_kernels
from transferlab.options import check, option
from transferlab.runtime import DEVICE, PRECISION, WORKERS, resolve_device, resolve_precision, reuse_freed_memory
from transferlab.studies import parse_spec, run_study
from transferlab.training.logistic import fit_logistic, logits_of
from transferlab.training.run import probe_features

log = logging.getLogger(__name__)

DEFAULT_MODELS = ("tf_efficientnet_lite0", "tf_efficientnet_lite1", "tf_efficientnet_lite2")
#: Fractions of the train images per class on the label-budget curve (the last one is all of train).
LABEL_FRACTIONS = (0.1, 0.25, 0.5, 1.0)
#: Images of the longer of the two timed passes per backbone (after a warm-up pass that also fills the
#: conversion cache).
MEASURE_IMAGES = 1024
#: Kept back from the budget for the ensembles, the label curve, the report and the slack between steps.
RESERVE_S = 45.0
#: A candidate is started only if its predicted cost fits this share of what is left (predictions err).
FIT_SHARE = 0.95
#: Loss-and-gradient evaluations of a tuned probe's penalty path plus its refit, as measured: Lite0@224 features
#: of the mini copy's 20,000 train images took 26 s (83 evaluations at this machine's matmul rate), and with
#: their mirrors (40,000 rows) 98 s (159); the larger is used.
FIT_EVALUATIONS = 160
#: Long feature passes run slower than the short timed ones: on the 2-core AMD EPYC the 50,000-image passes of
#: the demo ran at 0.93 (Lite0), 0.85 (Lite1) and 0.76 (Lite2) of the measured rate.
SUSTAINED_RATE = 0.85
#: The label-budget curve refits its probe at four label fractions: about this share of the probe's fit cost.
LABEL_CURVE_SHARE = 0.6
_BUDGET = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*$")


def parse_budget(text: str | float | int) -> float:
    """Seconds in ``90s``, ``20m``, ``1.5h`` or a bare number of seconds."""
    if isinstance(text, int | float) and not isinstance(text, bool):
        value, unit = float(text), "s"
    else:
        m = _BUDGET.match(str(text))
        if not m:
            raise ConfigError(f"--budget {text!r}: give a duration such as 90s, 20m or 1.5h")
        value, unit = float(m.group(1)), m.group(2) or "s"
    seconds = value * {"s": 1, "m": 60, "h": 3600}[unit]
    if not 10 <= seconds <= 7 * 24 * 3600:
        raise ConfigError(f"--budget {text!r}: must be between 10 s and a week")
    return seconds


@dataclass(frozen=True)
class AutoConfig:
    """What ``transferlab auto`` is asked: the data, the budget, the candidates. Invalid values fail here."""

    data: str = option(help=DATA_HELP, cli_default="tiny-imagenet-mini", default_text="tiny-imagenet-mini")
    out: Path = option(help="study folder (created; rerunning reuses what finished)", required=True)
    budget: str = option("20m", "wall-clock budget for everything, measurement included: 90s, 20m, 1.5h")
    models: tuple[str, ...] = option(
        DEFAULT_MODELS, "candidate backbones: timm names with weights here", nargs="+", metavar="MODEL"
    )
    weights: tuple[str, ...] | None = option(
        None,
        "weights of each of --models, in the same order (a file, hf-hub:..., auto)",
        nargs="+",
        metavar="WEIGHTS",
        default_text="auto for each",
    )
    dry_run: bool = option(False, "measure the candidates, print the plan and its predicted cost, run nothing")
    label_curve: bool = option(True, "measure how much more labels would help (the label-budget curve)", cli=False)
    lpft: bool = option(
        True,
        "offer LP-FT in the second phase: a BatchNorm-only fine-tune from a tuned probe's head (fixed statistics)",
        cli=False,
    )
    holdout: float = option(
        0.1, "fraction of each train class held out to choose on", lo=0, hi=0.5, lo_open=True, hi_open=True
    )
    seed: int = option(0, "seed for the holdout, subsets and bootstraps", lo=0, hi=2**63 - 1)
    backend: str = BACKEND.field("auto")
    precision: str = PRECISION.field("auto")
    device: str = DEVICE.field("auto")
    workers: int = WORKERS.field(-1)
    cache_dir: Path | None = option(
        None, "cache folder (decoded images, features, conversions)", default_text="the user cache"
    )
    progress: bool | None = None

    def __post_init__(self) -> None:
        check(self)
        parse_budget(self.budget)
        if not self.models:
            raise ConfigError("--models: give at least one backbone")
        if len(set(self.models)) != len(self.models):
            raise ConfigError(f"--models {' '.join(self.models)}: each backbone once")
        if self.weights is not None and len(self.weights) != len(self.models):
            raise ConfigError(
                f"--weights gives {len(self.weights)} sources for {len(self.models)} --models; give one per model"
            )

    def weights_of(self, model: str) -> str:
        """The weights source of ``model`` (``auto`` unless --weights names one)."""
        return "auto" if self.weights is None else self.weights[self.models.index(model)]

    @property
    def budget_s(self) -> float:
        return parse_budget(self.budget)


@dataclass
class Candidate:
    """One thing the planner may run, with its predicted cost and, once run, what it cost and scored."""

    name: str
    kind: str  # probe, zero-shot, ensemble
    model: str
    img_size: int | None
    predicted_s: float
    options: dict[str, Any] = field(default_factory=dict)
    status: str = "planned"  # chosen, dropped, ran, skipped, failed
    why: str = ""
    actual_s: float | None = None
    holdout_top1: float | None = None
    #: Of ``predicted_s``, the head's fit (what the label-budget curve repeats at smaller label counts).
    fit_s: float = 0.0
    #: A second-phase offer's probe: what its holdout score is compared with.
    base: str | None = None

    def row(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("options")
        d.pop("fit_s")
        d.pop("base")
        d["predicted_s"] = round(self.predicted_s, 1)
        return d


@dataclass
class Measurement:
    """Throughput of one backbone's feature pass on this machine, and what its passes cost besides."""

    model: str
    img_size: int
    images_per_s: float
    setup_s: float
    dim: int
    backend: str
    num_classes: int
    #: Training images per second (forward, backward, BatchNorm-only step) in torch, measured for the backbone
    #: LP-FT would fine-tune; None where it was not measured.
    train_images_per_s: float | None = None


@dataclass
class Plan:
    """The candidates (chosen and dropped), the measurements behind them, and the predicted total."""

    budget_s: float
    n_train: int
    n_report: int
    measurements: list[Measurement]
    candidates: list[Candidate]
    spent_s: float  # before the study starts: opening the data, decoding, measuring
    cpu: str
    notes: list[str] = field(default_factory=list)
    #: Float32 matmul rate measured here (prices the probes' fits, in the second phase too).
    flops: float = 1e11
    n_classes: int = 0

    @property
    def chosen(self) -> list[Candidate]:
        """The candidates the plan runs (whatever became of them since)."""
        return [c for c in self.candidates if c.status in ("chosen", "ran", "skipped", "failed")]

    @property
    def predicted_s(self) -> float:
        return self.spent_s + sum(c.predicted_s for c in self.chosen) + RESERVE_S

    def to_dict(self, actual_s: float | None = None) -> dict[str, Any]:
        return {
            "budget_s": round(self.budget_s, 1),
            "predicted_s": round(self.predicted_s, 1),
            "actual_s": None if actual_s is None else round(actual_s, 1),
            "cpu": self.cpu,
            "n_train": self.n_train,
            "n_report": self.n_report,
            "measured": [asdict(m) for m in self.measurements],
            "candidates": [c.row() for c in self.candidates],
            "notes": self.notes,
        }


def cpu_name() -> str:
    """The CPU model, for every speed figure the plan records."""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# --------------------------------------------------------------------------------------------------
# Measuring


def _fit_seconds(n: int, dim: int, classes: int, flops: float) -> float:
    """Predicted seconds of a tuned probe on ``n`` rows: the penalty path and the refit cost about
    ``FIT_EVALUATIONS`` full-batch loss-and-gradient evaluations, three ``n x dim x classes`` matmuls each."""
    return FIT_EVALUATIONS * 3 * 2.0 * n * dim * classes / flops + 2.0


def _pass_seconds(views: int, images: int, rate: float, setup_s: float) -> float:
    """Predicted seconds of the feature passes of a probe: one per split and view (train, report; and their
    mirrors), at the sustained share of the measured ``rate``, each with its own ``setup_s``."""
    return views * images / (SUSTAINED_RATE * rate) + 2 * views * setup_s


def _fits(c: Candidate, left: float, chosen: str, dropped: str | None = None) -> Candidate:
    """Choose ``c`` where its predicted cost fits :data:`FIT_SHARE` of what is ``left``, else drop it; ``chosen``
    (and ``dropped``, when the default does not say enough) is the why the plan records."""
    if c.predicted_s <= FIT_SHARE * left:
        c.status, c.why = "chosen", f"{chosen}: predicted {c.predicted_s:.0f} s of {left:.0f} s left"
    else:
        c.status = "dropped"
        c.why = dropped or f"predicted {c.predicted_s:.0f} s, only {max(left, 0):.0f} s left"
    return c


def _matmul_flops() -> float:
    """Float32 matmul rate of this machine (what the L-BFGS probe spends its time in)."""
    import torch

    a, b = torch.randn(4096, 1280), torch.randn(1280, 200)
    a @ b
    t0 = time.perf_counter()
    for _ in range(10):
        a @ b
    return 10 * 2.0 * 4096 * 1280 * 200 / max(time.perf_counter() - t0, 1e-6)


def measure_training(cfg: AutoConfig, backbone: Any, size: int, steps: int = 3, batch: int = 32) -> float:
    """Images per second of a BatchNorm-only training step (bf16 autocast where the CPU has it, channels_last,
    and the training loop's CPU kernels and heap reuse) on random inputs of ``size`` at LP-FT's batch size: what
    one LP-FT epoch would cost. One warm-up step, then ``steps`` timed. ``backbone`` is changed (trained a
    little): pass one that is not needed afterwards. Without the loop's CPU paths and at batch 16 the step
    measured 37 images/s for Lite0 @224 where the LP-FT epoch then ran at 85."""
    import torch

    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, "auto", device)
    net = backbone.model.to(device).train()
    for p in net.parameters():
        p.requires_grad_(False)
    bn = [p for m in net.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for p in m.parameters()]
    for p in bn:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(bn, lr=1e-6)
    x = torch.randn(batch, 3, size, size, device=device)
    if precision.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
        net = net.to(memory_format=torch.channels_last)

    def step() -> None:
        with precision.autocast():
            loss = net(x).float().logsumexp(1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    with reuse_freed_memory(device), cpu_training_kernels(net, precision.dtype, device):
        step()
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        secs = time.perf_counter() - t0
    return round(steps * batch / max(secs, 1e-6), 1)


def measure_backbone(cfg: AutoConfig, backbone: Any, split: Any) -> Measurement:
    """Images per second of ``backbone``'s pooled-feature pass at its native resolution on real images of
    ``split``, through the engine and backend the run will use; a warm-up batch first (it also fills the
    conversion cache the run then hits)."""
    model = backbone.name
    size = backbone.preprocessing.input_size
    tf = make_eval_transform(backbone.preprocessing, size)
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, "auto", device)
    rng = np.random.default_rng(cfg.seed)
    # Two timed passes of different sizes, each with its own setup (compile, numerics check) as every feature pass of
    # the run has: their difference is the rate, the rest is the setup. A split smaller than the sample is
    # measured on repeats of its images (the rate is what matters).
    n = MEASURE_IMAGES
    idx = rng.choice(len(split), size=n, replace=len(split) < n)
    kw = dict(precision=precision, device=device, batch_size=32, forward=pre_logits, progress=False)
    info: dict[str, Any] = {}
    # A first pass warms up what happens once per process (kernel selection, the conversion cache's entry).
    feats = predict_logits(backbone, split, tf, indices=np.sort(idx[:32]), backend=cfg.backend, info=info, **kw)
    t1 = time.perf_counter()
    predict_logits(backbone, split, tf, indices=np.sort(idx[: n // 8]), backend=cfg.backend, **kw)
    t2 = time.perf_counter()
    predict_logits(backbone, split, tf, indices=np.sort(idx), backend=cfg.backend, **kw)
    t3 = time.perf_counter()
    rate = (n - n // 8) / max((t3 - t2) - (t2 - t1), 1e-3)
    setup = max(0.0, (t2 - t1) - (n // 8) / rate)
    return Measurement(
        model=model,
        img_size=size,
        images_per_s=round(rate, 1),
        setup_s=round(setup, 2),
        dim=int(feats.shape[1]),
        backend=str(info.get("backend", "torch")),
        num_classes=backbone.num_classes,
    )


# --------------------------------------------------------------------------------------------------
# Planning


def probe_options(cfg: AutoConfig, m: Measurement) -> dict[str, Any]:
    """The study member of a tuned probe on ``m``'s backbone."""
    return {
        "model": m.model,
        "weights": cfg.weights_of(m.model),
        "strategy": "linear-probe",
        "probe": "lbfgs",
        "flip_features": True,
        "img_size": m.img_size,
        "holdout": cfg.holdout,
        "backend": cfg.backend,
    }


def probe_variants(
    cfg: AutoConfig, m: Measurement, n_train: int, n_report: int, n_classes: int, flops: float
) -> tuple[Candidate, Candidate]:
    """The tuned probe on ``m``'s backbone with and without mirrored features, each with its predicted cost."""
    variants = []
    for flip in (True, False):
        views = 2 if flip else 1
        fit = _fit_seconds(views * n_train, m.dim, n_classes, flops)
        passes = _pass_seconds(views, n_train + n_report, m.images_per_s, m.setup_s)
        opts = probe_options(cfg, m) | {"flip_features": flip}
        variants.append(
            Candidate(f"{_short(m.model)}-probe", "probe", m.model, m.img_size, passes + fit, opts, fit_s=fit)
        )
    return variants[0], variants[1]


def _pick(flipped: Candidate, plain: Candidate, left: float) -> Candidate:
    """The mirrored-features probe where it fits what is left, else the plain one, else the plain one dropped."""
    if _fits(flipped, left, "fits").status == "chosen":
        return flipped
    return _fits(plain, left, f"without mirrored features ({flipped.predicted_s:.0f} s with them)")


def _zero_shot(cfg: AutoConfig, first: Measurement, probes: list[Candidate]) -> Candidate:
    """The first backbone's ImageNet head on the dataset's classes, reading its probe's cached features."""
    zs = Candidate(f"{_short(first.model)}-zero-shot", "zero-shot", first.model, first.img_size, 5.0)
    zs.options = {
        "kind": "zero-shot",
        "model": first.model,
        "weights": cfg.weights_of(first.model),
        "img_size": first.img_size,
        "backend": cfg.backend,
        **_run_options(cfg),
    }
    probe = next(c for c in probes if c.model == first.model)
    if first.num_classes != 1000:
        zs.status, zs.why = "dropped", "the backbone has no ImageNet-1k head"
    elif probe.status != "chosen":
        zs.status, zs.why = "dropped", "reads the features of its backbone's probe, which did not fit"
    else:
        zs.status, zs.why = "chosen", "the pretrained model as it is (reads its probe's cached features)"
    return zs


#: Seconds a concatenated probe spends per member run before fitting (reading its cached features back).
CONCAT_SETUP_S = 10.0


def _concat(
    probes: list[Candidate], dims: dict[str, int], n_train: int, n_classes: int, flops: float, left: float
) -> Candidate | None:
    """One probe on the chosen probes' features side by side (those with the first one's mirrored-features
    setting), if at least two such probes ran and its fit fits what is left."""
    chosen = [c for c in probes if c.status == "chosen"]
    if len(chosen) < 2:
        return None
    flip = chosen[0].options["flip_features"]
    same = [c for c in chosen if c.options["flip_features"] == flip]
    c = Candidate("concat-probe", "concat", " + ".join(x.model for x in same), None, 0.0)
    c.options = {"kind": "concat", "members": [x.name for x in same]}
    if len(same) < 2:
        c.status, c.why = "dropped", "needs two probes with the same mirrored-features setting"
        return c
    rows = (2 if flip else 1) * n_train
    c.predicted_s = CONCAT_SETUP_S * len(same) + _fit_seconds(rows, sum(dims[x.name] for x in same), n_classes, flops)
    return _fits(c, left, f"one probe on {len(same)} backbones' cached features")


#: LP-FT's epochs and learning rate: one pass, small steps from the tuned head (AdamW, cosine).
LPFT_EPOCHS = 1
LPFT_LR = 1e-4


def _lpft(cfg: AutoConfig, m: Measurement, probe: Candidate, n_train: int, n_report: int, left: float) -> Candidate:
    """A BatchNorm-only fine-tune of ``m``'s backbone starting from its tuned probe's head (Kumar et al. 2022):
    the measured training step times one epoch over the fit rows, plus the holdout and report passes in torch."""
    c = Candidate(f"{_short(m.model)}-lpft", "lp-ft", m.model, m.img_size, 0.0)
    c.options = {
        "model": m.model,
        "weights": cfg.weights_of(m.model),
        "strategy": "bn-only",
        # BatchNorm's affine parameters train, its ImageNet statistics stay: measured on Lite0 @224 from the tuned
        # probe's head, one epoch gave 74.70% on val with fixed statistics and 56.08% with batch statistics
        # (the probe: 71.86%), which move the features out from under the head the probe fitted.
        "bn": "frozen-stats",
        "head_from": probe.name,
        "img_size": m.img_size,
        "holdout": cfg.holdout,
        "aug": "flip",
        "optimizer": "adamw",
        "lr": LPFT_LR,
        "schedule": "cosine",
        "epochs": LPFT_EPOCHS,
        "batch_size": 32,
    }
    if probe.status not in ("chosen", "ran") or not m.train_images_per_s:
        c.status, c.why = "dropped", "not measured" if not m.train_images_per_s else "its probe did not run"
        return c
    c.predicted_s = _lpft_seconds(cfg, m, n_train, n_report, m.train_images_per_s)
    per_epoch = n_train * (1 - cfg.holdout) / m.train_images_per_s
    dropped = (
        f"one epoch needs about {per_epoch:.0f} s at {m.train_images_per_s:.0f} training images/s, "
        f"only {max(left, 0):.0f} s left"
    )
    return _fits(c, left, f"fine-tunes from {probe.name}'s head", dropped)


def _lpft_seconds(cfg: AutoConfig, m: Measurement, n_train: int, n_report: int, train_rate: float) -> float:
    """Predicted seconds of LP-FT on ``m``'s backbone at ``train_rate`` training images per second: its epochs
    over the fit rows, then the eval passes, which run in torch inside the training loop (the holdout twice: each
    epoch, then the kept epoch's predictions) at about a third of the feature pass's rate, as measured."""
    fit_rows = n_train * (1 - cfg.holdout)
    evals = 2 * n_train * cfg.holdout + n_report
    return LPFT_EPOCHS * fit_rows / train_rate + evals / (m.images_per_s / 3) + 20


#: A training step is at most this share of the feature pass's rate (measured: 1/12 for Lite0 @224 on 2 CPU
#: cores): what bounds LP-FT's cost from below before its training step is timed.
TRAIN_RATE_BOUND = 1 / 4


def _lpft_floor(cfg: AutoConfig, m: Measurement, n_train: int, n_report: int) -> float:
    """The least LP-FT on ``m``'s backbone can cost: below this, timing its training step is not worth it."""
    return _lpft_seconds(cfg, m, n_train, n_report, TRAIN_RATE_BOUND * m.images_per_s)


#: The second phase's larger input: this factor on the native size, rounded to a multiple of 32.
LARGER_FACTOR = 1.25


def larger_size(size: int) -> int:
    """The next input size the second phase tries for a backbone: 224 -> 288, 240 -> 288, 260 -> 320."""
    return max(size + 32, round(size * LARGER_FACTOR / 32) * 32)


def _larger(m: Measurement, probe: Candidate, n_train: int, n_report: int, left: float) -> Candidate:
    """``probe`` again at a larger input (Tiny ImageNet's 64 px images are upsampled: ImageNet backbones often
    see them better larger), priced at the measured rate scaled by the pixel count; the fit costs the same."""
    size = larger_size(m.img_size)
    rate = m.images_per_s * (m.img_size / size) ** 2
    views = 2 if probe.options.get("flip_features") else 1
    passes = _pass_seconds(views, n_train + n_report, rate, m.setup_s)
    c = Candidate(f"{probe.name}-{size}", "probe", m.model, size, passes + probe.fit_s, fit_s=probe.fit_s)
    c.options = probe.options | {"img_size": size}
    dropped = f"predicted {c.predicted_s:.0f} s at {size} px, only {max(left, 0):.0f} s left"
    return _fits(c, left, f"{probe.name} at {size} px", dropped)


def _lpft_offer(
    cfg: AutoConfig, m: Measurement, probe: Candidate, n_train: int, n_report: int, floor: float, left: float
) -> Candidate:
    """LP-FT as the second phase offers it: where its training step was not timed (LP-FT could not fit even
    at a fast one), the why says how much it would need at least."""
    c = _lpft(cfg, m, probe, n_train, n_report, left)
    if m.train_images_per_s is None and FIT_SHARE * left < floor:
        c.why = f"needs at least {floor:.0f} s even at a fast training step, only {max(left, 0):.0f} s left"
    return c


def offer_kind(c: Candidate) -> str:
    """Which kind of second-phase offer ``c`` is: what the holdout rules in or out as a whole."""
    return "LP-FT" if c.kind == "lp-ft" else "a larger input"


def choose_more(
    cfg: AutoConfig,
    plan: Plan,
    left: float,
    train_rate: Callable[[Measurement], float | None] | None = None,
    ruled_out: dict[str, str] | None = None,
) -> list[Candidate]:
    """The second phase: what the first phase left of the budget goes where the holdout says it pays. The probes
    that ran are ranked by their holdout top-1; the best one's backbone is offered, cheapest first, its probe at
    a larger input and LP-FT from its head; then the next backbone's, while anything fits. ``train_rate(m)``
    measures a backbone's training step when LP-FT is first priced for it (a few seconds, only when needed).
    ``ruled_out`` maps an :func:`offer_kind` to why the holdout says it does not pay here: such offers are
    listed as dropped, with that reason."""
    ruled_out = ruled_out or {}
    ranked = sorted(
        (c for c in plan.candidates if c.kind == "probe" and c.status == "ran" and c.holdout_top1 is not None),
        key=lambda c: -float(c.holdout_top1 or 0.0),
    )
    by_model = {m.model: m for m in plan.measurements}
    taken = {c.name for c in plan.candidates}
    out: list[Candidate] = []
    for probe in ranked:
        m = by_model.get(probe.model)
        if m is None or probe.img_size != m.img_size:
            continue
        offers: list[Callable[[float], Candidate]] = [partial(_larger, m, probe, plan.n_train, plan.n_report)]
        if cfg.lpft:
            floor = _lpft_floor(cfg, m, plan.n_train, plan.n_report)
            # timed only while nothing is chosen yet: the caller runs the first chosen offer, then asks again
            timing = "LP-FT" not in ruled_out and train_rate is not None and not any(c.status == "chosen" for c in out)
            if m.train_images_per_s is None and timing and FIT_SHARE * left >= floor:
                m.train_images_per_s = train_rate(m)
            offers.append(partial(_lpft_offer, cfg, m, probe, plan.n_train, plan.n_report, floor))
        # cheapest first, each decided against what is left once the ones before it are taken
        for make in sorted(offers, key=lambda f: f(left).predicted_s):
            c = make(left)
            c.base = probe.name
            if c.name in taken:
                continue
            if offer_kind(c) in ruled_out:
                c.status, c.why = "dropped", ruled_out[offer_kind(c)]
            score = 100 * float(probe.holdout_top1 or 0)
            c.why = f"second phase, {probe.name} is #{ranked.index(probe) + 1} on the holdout ({score:.2f}%): {c.why}"
            if c.status == "chosen":
                left -= c.predicted_s
            out.append(c)
    return out


def _ensembles(probes: list[Candidate]) -> list[Candidate]:
    """Greedy and weighted ensembles of the chosen (or already run) members, fitted on their train-holdout
    predictions."""
    chosen = [c.name for c in probes if c.status in ("chosen", "ran")]
    out = []
    for method in ("greedy", "weighted"):
        e = Candidate(method, "ensemble", f"ensemble of {len(chosen)}", None, 3.0)
        e.options = {"method": method, "members": chosen, "select": "holdout"}
        if len(chosen) >= 2:
            e.status, e.why = "chosen", "fitted on the members' train-holdout predictions; val stays untouched"
        else:
            e.status, e.why = "dropped", "needs two members with holdout predictions"
        out.append(e)
    return out


def choose(
    cfg: AutoConfig,
    measurements: list[Measurement],
    n_train: int,
    n_report: int,
    n_classes: int,
    spent_s: float,
    flops: float,
) -> list[Candidate]:
    """Every candidate with its predicted cost, chosen or dropped (with why) to fit the budget: the backbones'
    probes cheapest first (each with mirrored features where they fit), then the zero-shot model and the
    ensembles, which cost seconds."""
    left = cfg.budget_s - spent_s - RESERVE_S
    variants = [probe_variants(cfg, m, n_train, n_report, n_classes, flops) for m in measurements]
    probes: list[Candidate] = []
    curve: Candidate | None = None
    for flipped, plain in sorted(variants, key=lambda v: v[0].predicted_s):
        c = _pick(flipped, plain, left)
        if c.status == "chosen":
            left -= c.predicted_s
            if curve is None and cfg.label_curve:  # on the cheapest probe, reserved before the next backbone
                curve = Candidate("label-curve", "labels", c.model, c.img_size, LABEL_CURVE_SHARE * c.fit_s)
                curve.status, curve.why = "chosen", f"refits {c.name} at 10/25/50/100% of the labels per class"
                left -= curve.predicted_s
        probes.append(c)
    dims = {f"{_short(m.model)}-probe": m.dim for m in measurements}
    concat = _concat(probes, dims, n_train, n_classes, flops, left)
    if concat is not None and concat.status == "chosen":
        left -= concat.predicted_s
    joint = [*probes, *([concat] if concat is not None else [])]
    return [*joint, _zero_shot(cfg, measurements[0], probes), *_ensembles(joint), *([curve] if curve else [])]


def _run_options(cfg: AutoConfig) -> dict[str, Any]:
    """How every member runs (the same for trained and zero-shot members)."""
    opts: dict[str, Any] = {"precision": cfg.precision, "device": cfg.device, "workers": cfg.workers}
    if cfg.cache_dir is not None:
        opts["cache_dir"] = str(cfg.cache_dir)
    return opts


def _short(model: str) -> str:
    return model.replace("tf_efficientnet_", "").replace("_", "-")


def spec_doc(cfg: AutoConfig, plan: Plan, *, ensembles: bool = True) -> dict[str, Any]:
    """The study spec of the chosen candidates (without the ensembles: the first phase's)."""
    members = {c.name: dict(c.options) for c in plan.chosen if c.kind in ("probe", "concat", "lp-ft", "zero-shot")}
    combos = {c.name: dict(c.options) for c in plan.chosen if c.kind == "ensemble"} if ensembles else {}
    return {
        "name": "auto",
        "description": f"transferlab auto: the best model in {cfg.budget} on {cfg.data}",
        "data": cfg.data,
        "report_split": "val",
        "defaults": {"seed": cfg.seed, **_run_options(cfg)},
        "members": members,
        "ensembles": combos,
    }


def make_plan(cfg: AutoConfig, t_start: float) -> Plan:
    """Open the data (decoding it once into the cache), measure every candidate backbone, choose."""

    cache = Path(cfg.cache_dir) if cfg.cache_dir else user_cache_dir()
    source = open_dataset(cfg.data)
    train = source.split("train")
    report = source.split("val")
    # Every member reads the decoded cache; building it now (a dry run too: it is kept) makes the measurement
    # read the images the way the run will.
    train = decode_split(train, cache, progress=cfg.progress)
    report = decode_split(report, cache, progress=cfg.progress)
    measurements = []
    for model in cfg.models:
        log.info("auto: measuring %s on %d images of %s", model, MEASURE_IMAGES, source.name)
        backbone = create_backbone(model, cfg.weights_of(model))
        m = measure_backbone(cfg, backbone, train)
        log.info(
            "auto: %s@%d: %.0f images/s (%s), setup %.1f s", model, m.img_size, m.images_per_s, m.backend, m.setup_s
        )
        measurements.append(m)
    flops = _matmul_flops()
    spent = time.perf_counter() - t_start
    plan = Plan(
        budget_s=cfg.budget_s,
        n_train=len(train),
        n_report=len(report),
        measurements=measurements,
        candidates=choose(cfg, measurements, len(train), len(report), len(source.classes), spent, flops),
        spent_s=spent,
        cpu=cpu_name(),
        flops=flops,
        n_classes=len(source.classes),
    )
    plan.notes.append(
        f"measured on {plan.cpu}: opening, decoding and measuring took {spent:.0f} s of the {cfg.budget_s:.0f} s budget"
    )
    plan.notes.append(
        "what the first phase leaves goes, in a second phase, to the backbone whose probe scores best on the "
        "train holdout: its probe at a larger input, then LP-FT from its head, cheapest first, while they fit"
    )
    return plan


# --------------------------------------------------------------------------------------------------
# The label-budget curve


def _per_class_subset(y: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
    keep = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        keep.append(rng.choice(idx, size=min(per_class, len(idx)), replace=False))
    return np.sort(np.concatenate(keep))


def fit_power_law(n: np.ndarray, err: np.ndarray) -> tuple[float, float]:
    """(a, b) of ``err = a * n^-b`` by least squares in log-log space."""
    slope, intercept = np.polyfit(np.log(n), np.log(np.clip(err, 1e-6, None)), 1)
    return float(np.exp(intercept)), float(-slope)


def label_curve(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_report: np.ndarray,
    y_report: np.ndarray,
    num_classes: int,
    *,
    l2: float,
    prior: tuple[np.ndarray, np.ndarray] | None,
    x_mirror: np.ndarray | None = None,
    fractions: tuple[float, ...] = LABEL_FRACTIONS,
    seeds: int = 2,
    n_boot: int = 500,
    seed: int = 0,
) -> dict[str, Any]:
    """Top-1 on the report rows of the probe refit on ``fraction`` of each train class (averaged over ``seeds``
    draws below 100%), with bootstrap intervals over the report rows, and the power law through it: what
    doubling the labels per class should add, with the interval of that over the same bootstrap. With
    ``x_mirror`` (the train images' mirrored features) a chosen image brings its mirror, as in the probe."""

    counts = np.bincount(y_train, minlength=num_classes)
    full = int(np.median(counts[counts > 0]))
    correct = []  # (F, N) per-row correctness, averaged over the draws
    per_class = []
    for frac in fractions:
        k = max(1, round(frac * full))
        draws = 1 if frac >= 1.0 else seeds
        hits = np.zeros(len(y_report))
        for s in range(draws):
            rng = np.random.default_rng([seed, s, k])
            idx = np.arange(len(y_train)) if frac >= 1.0 else _per_class_subset(y_train, k, rng)
            x, y = x_train[idx], y_train[idx]
            if x_mirror is not None:
                x, y = np.concatenate([x, x_mirror[idx]]), np.concatenate([y, y])
            w, b, _ = fit_logistic(x, y, num_classes, l2=l2, prior=prior)
            hits += logits_of((w, b), x_report).argmax(1) == y_report
        correct.append(hits / draws)
        per_class.append(k)
    c = np.stack(correct)
    n = np.asarray(per_class, dtype=np.float64)
    rng = np.random.default_rng(seed)
    boot = c[:, rng.integers(0, c.shape[1], (n_boot, c.shape[1]))].mean(axis=2)  # (F, B)
    acc = c.mean(axis=1)
    a, b = fit_power_law(n, 1 - acc)
    gains = []
    for j in range(boot.shape[1]):
        aj, bj = fit_power_law(n, 1 - boot[:, j])
        gains.append(aj * n[-1] ** -bj * (1 - 2.0**-bj))
    lo_g, hi_g = np.percentile(gains, [2.5, 97.5])
    return {
        "points": [
            {
                "fraction": float(f),
                "per_class": int(k),
                "top1": float(acc[i]),
                "lo": float(np.percentile(boot[i], 2.5)),
                "hi": float(np.percentile(boot[i], 97.5)),
            }
            for i, (f, k) in enumerate(zip(fractions, per_class, strict=True))
        ],
        "fit": {
            "form": "err = a * n^-b",
            "a": a,
            "b": b,
            "c": 0.0,
            "doubling_gain": float(a * n[-1] ** -b * (1 - 2.0**-b)),
            "doubling_lo": float(lo_g),
            "doubling_hi": float(hi_g),
            "at_per_class": int(n[-1]),
        },
    }


# --------------------------------------------------------------------------------------------------
# Running


@dataclass
class AutoResult:
    """What ``auto`` did: the plan (with actual costs), the study folder, its report."""

    plan: Plan
    out: Path
    report: Path | None = None
    wall_s: float = 0.0
    labels: dict[str, Any] | None = None


def _holdout_top1(d: Path) -> float | None:

    p = predictions_path(d, "holdout")
    if not p.exists():
        return None
    pred = read_predictions(p)
    return float((pred.logits.argmax(1) == pred.targets).mean())


def run_auto(cfg: AutoConfig, *, on_plan: Callable[[Plan], None] | None = None) -> AutoResult:
    """Plan, then (unless ``dry_run``) run the plan as a study into ``cfg.out`` within the budget: the first
    phase's members, then a second phase chosen on their holdout scores with what is left, then the ensembles
    of all of them, the label-budget curve and the report."""

    t0 = time.perf_counter()
    deadline = t0 + cfg.budget_s
    plan = make_plan(cfg, t0)
    if on_plan is not None:
        on_plan(plan)
    out = Path(cfg.out)
    if cfg.dry_run:
        return AutoResult(plan=plan, out=out, wall_s=time.perf_counter() - t0)
    if not plan.chosen:
        raise ConfigError(
            f"--budget {cfg.budget}: no candidate fits ({'; '.join(c.name + ': ' + c.why for c in plan.candidates)}); "
            "give a larger budget or fewer --models"
        )
    by_name = {c.name: c for c in plan.candidates}
    result = AutoResult(plan=plan, out=out)
    out.mkdir(parents=True, exist_ok=True)

    first = _as_spec(cfg, plan, ensembles=False)
    atomic_write_text(out / "auto.json", first.text)
    _record_steps(run_study(first, out, progress=cfg.progress, deadline=deadline, report=False), by_name)
    _second_phase(cfg, plan, deadline, out)
    by_name = {c.name: c for c in plan.candidates}

    def before_report(study: Any) -> None:
        _record_steps(study, by_name)
        curve = by_name.get("label-curve")
        if curve is not None:
            t = time.perf_counter()
            result.labels = _label_curve_for(cfg, plan, out)
            curve.actual_s = round(time.perf_counter() - t, 1)
            curve.status = "ran" if result.labels is not None else "failed"
            if result.labels is not None:
                atomic_write_json(out / "labels.json", result.labels)
        atomic_write_json(out / "plan.json", plan.to_dict(actual_s=time.perf_counter() - t0))

    spec = _as_spec(cfg, plan)
    atomic_write_text(out / "auto.json", spec.text)
    study = run_study(spec, out, progress=cfg.progress, deadline=deadline, before_report=before_report)
    result.report = study.report
    result.wall_s = time.perf_counter() - t0
    atomic_write_json(out / "plan.json", plan.to_dict(actual_s=result.wall_s))
    return result


def _as_spec(cfg: AutoConfig, plan: Plan, *, ensembles: bool = True) -> Any:
    doc = spec_doc(cfg, plan, ensembles=ensembles)
    text = json.dumps(doc, indent=2)
    return parse_spec(doc, where="auto plan", text=text)


def _second_phase(cfg: AutoConfig, plan: Plan, deadline: float, out: Path) -> None:
    """Run the second phase one offer at a time with what the first left (the label curve and the reserve kept
    back): after each, its holdout top-1 against its probe's says whether that kind of offer pays here, and
    one that does not is not offered again. Then rebuild the ensembles over every member with holdout
    predictions."""
    curve = next((c for c in plan.candidates if c.kind == "labels" and c.status == "chosen"), None)
    kept_back = RESERVE_S + (curve.predicted_s if curve else 0.0)
    ruled_out: dict[str, str] = {}

    def train_rate(m: Measurement) -> float | None:
        log.info("auto: measuring a BatchNorm-only training step of %s@%d", m.model, m.img_size)
        try:
            return measure_training(cfg, create_backbone(m.model, cfg.weights_of(m.model)), m.img_size)
        except (RuntimeError, TransferlabError) as e:  # pricing LP-FT must not end the run
            log.warning("auto: could not time a training step of %s (%s); no LP-FT", m.model, e)
            return None

    offers: list[Candidate] = []
    while True:
        left = deadline - time.perf_counter() - kept_back
        offers = choose_more(cfg, plan, left, train_rate, ruled_out) if left > 0 else []
        nxt = next((c for c in offers if c.status == "chosen"), None)
        if nxt is None:
            break
        log.info("auto: %s: %s", nxt.name, nxt.why)
        plan.candidates.append(nxt)
        study = run_study(
            _as_spec(cfg, plan, ensembles=False), out, progress=cfg.progress, deadline=deadline, report=False
        )
        _record_steps(study, {nxt.name: nxt})
        base = next(c for c in plan.candidates if c.name == nxt.base)
        if nxt.status != "ran" or nxt.holdout_top1 is None or base.holdout_top1 is None:
            continue
        if nxt.holdout_top1 <= base.holdout_top1:
            why = (
                f"the holdout says {offer_kind(nxt)} does not pay here: {nxt.name} {100 * nxt.holdout_top1:.2f}%, "
                f"{base.name} {100 * base.holdout_top1:.2f}%"
            )
            ruled_out[offer_kind(nxt)] = why
            plan.notes.append(f"second phase: {why}")
    for c in offers:
        log.info("auto: %s: %s (%s)", c.name, c.status, c.why)
    if not any(c.base for c in plan.candidates):
        plan.notes.append(f"second phase: {max(left, 0):.0f} s were left, not enough for any offer")
    members = [c for c in plan.candidates if c.kind in ("probe", "concat", "lp-ft") and c.status in ("chosen", "ran")]
    keep = [c for c in plan.candidates if c.kind not in ("ensemble", "labels")]
    plan.candidates = [*keep, *offers, *_ensembles(members), *([curve] if curve else [])]


def _record_steps(study: Any, by_name: dict[str, Candidate]) -> None:
    """Put each step's status, actual cost and (for probes) holdout top-1 on its candidate."""
    for step in study.steps:
        c = by_name.get(step.name)
        if c is None or (step.status == "reused" and c.actual_s is not None):  # what the first phase recorded
            continue
        c.status = {"skipped": "skipped", "failed": "failed"}.get(step.status, "ran")
        c.actual_s = round(step.seconds, 1)
        if step.status == "skipped":
            c.why = "the budget ran out before it could start"
        elif c.kind in ("probe", "concat", "lp-ft"):
            c.holdout_top1 = _holdout_top1(step.dir)


def _label_curve_for(cfg: AutoConfig, plan: Plan, out: Path) -> dict[str, Any] | None:
    """The label-budget curve of the cheapest probe that ran (its cached features, its chosen penalty)."""

    ran = [c for c in plan.candidates if c.kind == "probe" and c.status == "ran"]
    if not ran:
        return None
    best = min(ran, key=lambda c: c.predicted_s)
    d = out / "members" / best.name
    try:
        metrics = json.loads((d / "metrics.json").read_text(encoding="utf-8"))
        l2 = float(metrics["probe"]["l2"])
        f = probe_features(d)
    except (OSError, KeyError, ValueError, TypeError, TransferlabError) as e:
        log.warning("auto: no label-budget curve (%s: %s)", type(e).__name__, e)
        return None
    t0 = time.perf_counter()
    curve = label_curve(
        f.x_train,
        f.y_train,
        f.x_report,
        f.y_report,
        f.num_classes,
        l2=l2,
        prior=f.prior,
        x_mirror=f.x_train_mirror,
        seed=cfg.seed,
    )
    log.info("auto: label-budget curve of %s in %.0f s", best.name, time.perf_counter() - t0)
    return {"member": best.name, "model": best.model, "split": "val", **curve}
