"""The report's figures, each a function from plain numbers to PNG bytes.

Returning bytes rather than writing files lets one figure go both into the self-contained HTML (as a
base64 data URI) and into ``figures/`` beside the Markdown, and keeps the figures testable without a
file system. Figures are drawn on a bare :class:`matplotlib.figure.Figure` with the Agg canvas: no
pyplot, so no global figure registry, no backend switching and no display is ever touched (headless
machines, CI, and a report built while another process plots).
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

# One palette for every figure, so "train", "holdout", "best" and "ensemble" mean the same colour
# everywhere in a report.
TRAIN = "#4c72b0"
HOLDOUT = "#dd8452"
BEST = "#2a9d8f"
ENSEMBLE = "#c44e52"
NEUTRAL = "#7f8c9a"
GOOD = "#2a9d8f"
BAD = "#c44e52"
GRID = "#e3e6ea"
TEXT = "#2b2f36"

# Rendered at 150 dpi and shown at 100 dpi worth of CSS pixels: sharp on high-density screens, and a
# figure's on-screen size still follows its size in inches.
DPI = 150
DISPLAY_DPI = 100


def _figure(width: float, height: float, dpi: int = DPI) -> Any:
    """A Figure on an Agg canvas with the report's typography."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _style(ax: Any) -> None:
    """Quiet axes: no top/right spines, light grid behind the data, readable tick labels."""
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    for side in ("left", "bottom"):
        ax.spines[side].set_color("#9aa1ab")
    ax.tick_params(colors=TEXT, labelsize=9)
    ax.grid(True, color=GRID, lw=0.8)
    ax.set_axisbelow(True)
    ax.xaxis.label.set_color(TEXT)
    ax.yaxis.label.set_color(TEXT)
    ax.title.set_color(TEXT)


def to_png(fig: Any) -> bytes:
    """Render ``fig`` to PNG bytes without metadata, so the same numbers give the same file."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=fig.dpi, facecolor="white", metadata={"Software": None})
    return buf.getvalue()


def curves_png(
    history: Sequence[dict[str, float]],
    *,
    best_epoch: int | None = None,
    title: str = "",
    val_label: str = "holdout",
) -> bytes:
    """Loss and top-1 accuracy per epoch, train vs ``val_label``, with the kept epoch marked.

    Epoch 0 (a linear probe scores its initial head before training) is kept: for a head started from
    ImageNet rows it shows how much was there before any training. Missing values (NaN) leave gaps.
    """
    rows = sorted(history, key=lambda r: r.get("epoch", 0))
    epochs = np.array([r.get("epoch", math.nan) for r in rows], dtype=float)
    fig = _figure(9.0, 3.3)
    axes = fig.subplots(1, 2)
    for ax, key, label in ((axes[0], "loss", "loss (cross-entropy)"), (axes[1], "acc", "top-1 accuracy")):
        _style(ax)
        train = np.array([r.get(f"train_{key}", math.nan) for r in rows], dtype=float)
        val = np.array([r.get(f"val_{key}", math.nan) for r in rows], dtype=float)
        ax.plot(epochs, train, "o-", color=TRAIN, ms=3.5, lw=1.6, label="train")
        ax.plot(epochs, val, "s-", color=HOLDOUT, ms=3.5, lw=1.6, label=val_label)
        if best_epoch is not None and len(epochs):
            ax.axvline(best_epoch, color=BEST, ls="--", lw=1.2, label=f"kept epoch {best_epoch}")
            hit = np.flatnonzero(epochs == best_epoch)
            if len(hit) and np.isfinite(val[hit[0]]):
                ax.plot([best_epoch], [val[hit[0]]], "*", color=BEST, ms=12, zorder=5)
        if key == "acc":
            ax.yaxis.set_major_formatter(_percent_formatter())
        ax.set_xlabel("epoch")
        ax.set_title(label, fontsize=10, loc="left")
        if len(epochs) and np.all(np.isfinite(epochs)) and epochs.max() - epochs.min() <= 30:
            ax.set_xticks(np.arange(int(epochs.min()), int(epochs.max()) + 1, max(1, int(len(epochs) // 10) or 1)))
    axes[1].legend(fontsize=8, frameon=False, loc="lower right")
    if title:
        fig.suptitle(title, fontsize=11, color=TEXT, x=0.01, ha="left")
    return to_png(fig)


@dataclass(frozen=True)
class Interval:
    """One row of an interval chart: a value with its 95% interval (fractions in [0, 1])."""

    label: str
    value: float
    lo: float | None
    hi: float | None
    kind: str = "member"
    """``member``, ``best`` (highlighted) or ``ensemble``: decides the colour and marker."""


def interval_chart_png(rows: Sequence[Interval], *, title: str = "", xlabel: str = "top-1 accuracy") -> bytes:
    """Horizontal point-and-whisker chart of accuracies with 95% intervals, values written beside.

    Points with whiskers rather than bars: a bar starting at 0 makes a 1-point difference invisible
    and invites reading the bar length; what matters is where the intervals sit and whether they
    overlap.
    """
    colours = {"member": NEUTRAL, "best": BEST, "ensemble": ENSEMBLE}
    markers = {"member": "o", "best": "D", "ensemble": "s"}
    n = len(rows)
    fig = _figure(8.0, 0.9 + 0.42 * max(n, 1))
    ax = fig.subplots()
    _style(ax)
    ax.grid(True, axis="x", color=GRID)
    ax.grid(False, axis="y")
    lows = []
    highs = []
    for i, r in enumerate(rows):
        y = n - 1 - i
        c = colours.get(r.kind, NEUTRAL)
        if r.lo is not None and r.hi is not None and math.isfinite(r.lo) and math.isfinite(r.hi):
            ax.plot([r.lo, r.hi], [y, y], color=c, lw=2.4, solid_capstyle="round", alpha=0.85)
            lows.append(r.lo)
            highs.append(r.hi)
        ax.plot([r.value], [y], markers.get(r.kind, "o"), color=c, ms=8, zorder=3)
        lows.append(r.value)
        highs.append(r.value)
        ax.annotate(
            f"{100 * r.value:.2f}%",
            (r.hi if r.hi is not None and math.isfinite(r.hi) else r.value, y),
            xytext=(6, 0),
            textcoords="offset points",
            va="center",
            fontsize=9,
            color=TEXT,
        )
    ax.set_yticks(range(n))
    ax.set_yticklabels([r.label for r in reversed(rows)], fontsize=9)
    if lows:
        lo, hi = min(lows), max(highs)
        pad = max(0.01, 0.15 * (hi - lo))
        ax.set_xlim(max(0.0, lo - pad), min(1.0, hi + 2.2 * pad))
    ax.set_ylim(-0.7, n - 0.3)
    ax.xaxis.set_major_formatter(_percent_formatter())
    ax.set_xlabel(f"{xlabel} (95% interval)")
    if title:
        ax.set_title(title, fontsize=10, loc="left")
    return to_png(fig)


@dataclass(frozen=True)
class Bar:
    """One model in the ranking chart: top-1 with its 95% interval (fractions in [0, 1])."""

    label: str
    value: float
    lo: float | None
    hi: float | None
    kind: str = "member"
    """``member``, ``best`` (the best single member) or ``ensemble``: decides the colour."""
    note: str = ""
    """Written after the value, e.g. an ensemble's paired gain over the best member."""


def _finite(*xs: float | None) -> bool:
    return all(x is not None and math.isfinite(x) for x in xs)


def ranking_png(rows: Sequence[Bar], *, title: str = "", reference: float | None = None) -> bytes:
    """Every model on one chart: horizontal top-1 bars with 95% whiskers, in the order given (best first).

    One chart instead of one per ensemble: the ensembles of a study share their members and their report
    samples, so separate charts repeat the same member rows and hide the comparison a reader wants,
    ensembles against each other. Bars start at 0 so their lengths compare honestly; ``reference`` (the
    best single member's top-1) is drawn as a dashed line across, so a gain of a point or two still shows.
    """
    colours = {"member": NEUTRAL, "best": BEST, "ensemble": ENSEMBLE}
    n = len(rows)
    fig = _figure(8.6, 1.15 + 0.36 * max(n, 1))
    ax = fig.subplots()
    _style(ax)
    ax.grid(True, axis="x", color=GRID)
    ax.grid(False, axis="y")
    tops = [0.0]
    for i, r in enumerate(rows):
        y = n - 1 - i
        c = colours.get(r.kind, NEUTRAL)
        value = r.value if math.isfinite(r.value) else 0.0
        ax.barh(y, value, height=0.66, color=c, alpha=0.88 if r.kind != "member" else 0.7)
        end = value
        if _finite(r.lo, r.hi):
            ax.plot([r.lo, r.hi], [y, y], color=TEXT, lw=1.3, solid_capstyle="butt")
            ax.plot([r.lo, r.lo], [y - 0.14, y + 0.14], color=TEXT, lw=1.1)
            ax.plot([r.hi, r.hi], [y - 0.14, y + 0.14], color=TEXT, lw=1.1)
            end = max(end, float(r.hi))  # type: ignore[arg-type]
        tops.append(end)
        text = f"{100 * r.value:.2f}%" + (f"  {r.note}" if r.note else "")
        ax.annotate(text, (end, y), xytext=(5, 0), textcoords="offset points", va="center", fontsize=8.5, color=TEXT)
    if reference is not None and math.isfinite(reference):
        ax.axvline(reference, color=BEST, ls="--", lw=1.1, zorder=4)
    ax.set_yticks(range(n))
    ax.set_yticklabels([r.label for r in reversed(rows)], fontsize=9)
    ax.set_ylim(-0.6, n - 0.4)
    ax.set_xlim(0, min(1.0, max(tops) * 1.25 + 0.02))
    ax.xaxis.set_major_formatter(_percent_formatter())
    ax.set_xlabel("top-1 accuracy (whiskers: 95% interval)")
    _ranking_legend(fig, {r.kind for r in rows}, reference)
    if title:
        ax.set_title(title, fontsize=10, loc="left")
    return to_png(fig)


def _ranking_legend(fig: Any, kinds: set[str], reference: float | None) -> None:
    """One row under the chart, outside the axes: inside, it would cover the short bars at the bottom."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    handles: list[Any] = []
    if "member" in kinds:
        handles.append(Patch(color=NEUTRAL, alpha=0.7, label="single member"))
    if "best" in kinds:
        handles.append(Patch(color=BEST, alpha=0.88, label="best single member"))
    if "ensemble" in kinds:
        handles.append(Patch(color=ENSEMBLE, alpha=0.88, label="ensemble"))
    if reference is not None and math.isfinite(reference):
        handles.append(Line2D([], [], color=BEST, ls="--", lw=1.1, label="best single member's top-1"))
    if handles:
        fig.legend(handles=handles, fontsize=8, frameon=False, loc="outside lower center", ncol=len(handles))


@dataclass(frozen=True)
class LabelsPoint:
    """Top-1 at ``n`` labels per class, with its 95% interval."""

    n: float
    top1: float
    lo: float | None = None
    hi: float | None = None


def labels_png(
    points: Sequence[LabelsPoint],
    *,
    curve: Any = None,
    extend_to: float | None = None,
    gain_at: float | None = None,
    title: str = "",
) -> bytes:
    """Top-1 against labels per class on a log axis: the measured points and the fitted curve.

    ``curve`` maps an array of n to predicted top-1; it is drawn solid over the measured range and dashed
    from the largest n to ``extend_to``, because beyond the data it is an extrapolation and should look
    like one. ``gain_at`` marks n and 2n on the curve, the step the report's sentence is about.
    """
    fig = _figure(7.2, 3.6)
    ax = fig.subplots()
    _style(ax)
    ns = np.array([p.n for p in points], dtype=float)
    top = np.array([p.top1 for p in points], dtype=float)
    lo = np.array([p.lo if p.lo is not None else p.top1 for p in points], dtype=float)
    hi = np.array([p.hi if p.hi is not None else p.top1 for p in points], dtype=float)
    if curve is not None and len(ns):
        solid = np.geomspace(ns.min(), ns.max(), 80)
        ax.plot(solid, curve(solid), "-", color=TRAIN, lw=1.6, label="fitted curve")
        if extend_to is not None and extend_to > ns.max():
            dashed = np.geomspace(ns.max(), extend_to, 40)
            ax.plot(dashed, curve(dashed), "--", color=TRAIN, lw=1.6, label="extrapolated")
        if gain_at is not None and gain_at > 0:
            at = np.array([gain_at, 2 * gain_at])
            ax.plot(at, curve(at), "D", color=BEST, ms=6, zorder=5, label=f"{gain_at:g} → {2 * gain_at:g} per class")
    ax.errorbar(
        ns, top, yerr=[top - lo, hi - top], fmt="o", color=HOLDOUT, ms=5, capsize=3, lw=1.2, zorder=4, label="measured"
    )
    ax.set_xscale("log")
    _labels_ticks(ax, ns, extend_to)
    ax.yaxis.set_major_formatter(_percent_formatter())
    ax.set_xlabel("labelled images per class (log scale)")
    ax.set_ylabel("top-1 accuracy")
    ax.legend(fontsize=8, frameon=False, loc="lower right")
    if title:
        ax.set_title(title, fontsize=10, loc="left")
    return to_png(fig)


def _labels_ticks(ax: Any, ns: np.ndarray, extend_to: float | None) -> None:
    """Ticks at the measured n (plus the extrapolation's end), written as plain numbers, not 10^k."""
    from matplotlib.ticker import NullFormatter

    ticks = sorted({*ns.tolist(), *([extend_to] if extend_to else [])})
    ax.set_xticks(ticks)
    ax.set_xticklabels([f"{t:g}" for t in ticks])
    ax.xaxis.set_minor_formatter(NullFormatter())


def reliability_bins(probs: np.ndarray, targets: np.ndarray, n_bins: int = 15) -> dict[str, np.ndarray]:
    """Per-bin counts, mean confidence and accuracy, binned as in ``metrics.expected_calibration_error``.

    Bin ``b`` holds top-1 confidences in ``(b/n_bins, (b+1)/n_bins]`` (0 goes to the first), so the
    diagram and the ECE number next to it describe the same bins.
    """
    p = np.asarray(probs, dtype=np.float64)
    t = np.asarray(targets)
    conf = p.max(axis=1) if len(t) else np.zeros(0)
    # Ties to the lower class index, like metrics.topk_correct.
    correct = (np.argmax(p, axis=1) == t).astype(np.float64) if len(t) else np.zeros(0)
    bins = np.clip(np.ceil(conf * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    counts = np.bincount(bins, minlength=n_bins).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        conf_mean = np.bincount(bins, weights=conf, minlength=n_bins) / counts
        acc = np.bincount(bins, weights=correct, minlength=n_bins) / counts
    return {"counts": counts, "confidence": conf_mean, "accuracy": acc}


def reliability_png(
    probs: np.ndarray, targets: np.ndarray, *, n_bins: int = 15, title: str = "", ece: float | None = None
) -> bytes:
    """Reliability diagram: accuracy per confidence bin against the diagonal, with the bin sizes below.

    Bars below the diagonal are over-confident bins; the gap is drawn in red so that the ECE (the
    sample-weighted mean gap) can be seen. The histogram below shows where the samples are: a large gap
    in an almost empty bin matters little.
    """
    b = reliability_bins(probs, targets, n_bins)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    left, width = edges[:-1], 1.0 / n_bins
    fig = _figure(4.4, 4.6)
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[3.2, 1])
    for ax in (top, bottom):
        _style(ax)
    has = b["counts"] > 0
    acc = np.where(has, b["accuracy"], 0.0)
    conf = np.where(has, b["confidence"], 0.0)
    top.bar(left, acc, width=width, align="edge", color="#8fb0dc", edgecolor="white", lw=0.8, label="accuracy")
    gap_lo = np.minimum(acc, conf)
    gap_h = np.abs(conf - acc)
    top.bar(
        left[has],
        gap_h[has],
        bottom=gap_lo[has],
        width=width,
        align="edge",
        facecolor=(0.77, 0.31, 0.32, 0.18),
        edgecolor=BAD,
        hatch="////",
        lw=0.6,
        label="gap to mean confidence",
    )
    top.hlines(conf[has], left[has], left[has] + width, color=TEXT, lw=1.2, label="mean confidence")
    top.plot([0, 1], [0, 1], "--", color="#6b7280", lw=1, label="perfect calibration")
    top.set_xlim(0, 1)
    top.set_ylim(0, 1)
    top.set_ylabel("accuracy")
    top.legend(fontsize=7.5, frameon=False, loc="upper left")
    heading = title
    if ece is not None and math.isfinite(ece):
        heading = f"{title}\nECE {ece:.3f} ({n_bins} bins)" if title else f"ECE {ece:.3f} ({n_bins} bins)"
    if heading:
        top.set_title(heading, fontsize=9.5, loc="left")
    bottom.bar(left, b["counts"], width=width, align="edge", color=NEUTRAL, edgecolor="white", lw=0.8)
    bottom.set_ylabel("samples", fontsize=9)
    bottom.set_xlabel("confidence (top-1 probability)")
    return to_png(fig)


def class_extremes_png(
    best: Sequence[tuple[str, float, int]], worst: Sequence[tuple[str, float, int]], *, title: str = ""
) -> bytes:
    """Horizontal bars of the best and worst classes' accuracy, ``(name, accuracy, n)`` each."""
    rows = [(name, acc, n, GOOD) for name, acc, n in best] + [(name, acc, n, BAD) for name, acc, n in worst]
    fig = _figure(7.5, 0.9 + 0.32 * max(len(rows), 1))
    ax = fig.subplots()
    _style(ax)
    ax.grid(True, axis="x", color=GRID)
    ax.grid(False, axis="y")
    ys = np.arange(len(rows))[::-1]
    for y, (_name, acc, n, colour) in zip(ys, rows, strict=True):
        ax.barh(y, acc, color=colour, height=0.7, alpha=0.9)
        ax.annotate(
            f"{100 * acc:.0f}%  (n={n})", (acc, y), xytext=(4, 0), textcoords="offset points", va="center", fontsize=8
        )
    if best and worst:
        ax.axhline(len(worst) - 0.5, color="#9aa1ab", lw=0.8, ls=":")
    ax.set_yticks(ys)
    ax.set_yticklabels([_short(r[0], 34) for r in rows], fontsize=9)
    ax.set_xlim(0, 1.18)
    ax.xaxis.set_major_formatter(_percent_formatter())
    ax.set_xlabel("top-1 accuracy of the class")
    if title:
        ax.set_title(title, fontsize=10, loc="left")
    return to_png(fig)


@dataclass(frozen=True)
class Tile:
    """One image of a grid with its caption lines."""

    image: Any
    """A PIL image (any mode; converted to RGB)."""
    true: str
    predicted: str
    confidence: float | None = None


def image_grid_png(tiles: Sequence[Tile], *, columns: int = 6, title: str = "") -> bytes:
    """A grid of images, each with its true class above (green) and the prediction below (red)."""
    n = max(len(tiles), 1)
    cols = min(columns, n)
    rows = math.ceil(n / cols)
    # 100 dpi: the images are small photographs (64 px for Tiny ImageNet) that PNG compresses poorly, so
    # rendering them finer only makes the report heavier.
    fig = _figure(1.65 * cols, 2.05 * rows + (0.3 if title else 0.0), dpi=DISPLAY_DPI)
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    for ax in axes:
        ax.axis("off")
    for ax, tile in zip(axes, tiles, strict=False):
        ax.axis("on")
        ax.set_xticks([])
        ax.set_yticks([])
        for side in ax.spines.values():
            side.set_visible(False)
        ax.imshow(np.asarray(tile.image.convert("RGB")), interpolation="bilinear")
        conf = "" if tile.confidence is None else f" ({100 * tile.confidence:.0f}%)"
        ax.set_title(f"true: {_short(tile.true, 22)}", fontsize=7.5, color=GOOD, loc="left", pad=3)
        ax.set_xlabel(f"pred: {_short(tile.predicted, 17)}{conf}", fontsize=7.5, color=BAD, loc="left", labelpad=3)
    if title:
        fig.suptitle(title, fontsize=10, color=TEXT, x=0.01, ha="left")
    return to_png(fig)


def _short(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def png_size(png: bytes) -> tuple[int, int]:
    """(width, height) in pixels from a PNG's IHDR chunk; raises ValueError for anything else."""
    if len(png) < 24 or png[:8] != b"\x89PNG\r\n\x1a\n" or png[12:16] != b"IHDR":
        raise ValueError("not a PNG")
    return int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")


def png_dpi(png: bytes) -> float:
    """The resolution recorded in a PNG's pHYs chunk (matplotlib writes it), else ``DPI``."""
    i = png.find(b"pHYs", 8, 4096)
    if i < 0 or png[i + 12] != 1:  # unit 1 = metre
        return float(DPI)
    return int.from_bytes(png[i + 4 : i + 8], "big") * 0.0254


def display_width(png: bytes) -> int:
    """The CSS width at which a figure shows at its size in inches (see ``DISPLAY_DPI``)."""
    return round(png_size(png)[0] * DISPLAY_DPI / png_dpi(png))


def _percent_formatter() -> Any:
    from matplotlib.ticker import FuncFormatter

    return FuncFormatter(lambda x, _pos: f"{100 * x:.0f}%")
