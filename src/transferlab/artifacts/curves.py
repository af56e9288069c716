"""Training curves (the seed's figures): loss and accuracy per epoch, train vs validation.

Matplotlib with the Agg backend, so plots render on headless machines and in CI.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path

from transferlab.io import atomic_write_bytes


def plot_curves(
    history: Sequence[dict[str, float]],
    path: Path,
    *,
    title: str = "",
    best_epoch: int | None = None,
    val_label: str = "val",
) -> None:
    """Write a two-panel PNG: loss and accuracy, train vs ``val_label``, per epoch; best epoch marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in history if r.get("epoch", 0) >= 1 or not math.isnan(r.get("train_loss", math.nan))]
    epochs = [int(r["epoch"]) for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), dpi=100)
    for ax, key, label in ((axes[0], "loss", "loss"), (axes[1], "acc", "top-1 accuracy")):
        ax.plot(epochs, [r[f"train_{key}"] for r in rows], "o-", ms=3, label="train")
        ax.plot(epochs, [r[f"val_{key}"] for r in rows], "s-", ms=3, label=val_label)
        if best_epoch is not None:
            ax.axvline(best_epoch, color="grey", ls="--", lw=1, label=f"best epoch ({best_epoch})")
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
