"""Optional TensorBoard view of a training run (``transferlab train --tensorboard``).

``history.csv``, ``steps.csv`` and ``metrics.json`` stay the record of a run; this writes the same
numbers as TensorBoard events under ``RUN_DIR/tensorboard/`` so a long run can be watched live and
runs compared side by side:

* ``step/loss``, ``step/lr``: every optimizer step of the image loop (x = step);
* ``epoch/train_loss``, ``epoch/train_acc``, ``epoch/val_loss``, ``epoch/val_acc``, ``epoch/lr``,
  ``epoch/images_per_s``: every epoch (x = epoch; ``val`` is the holdout, as in history.csv);
* the ``curves`` image (curves.png) and the hyper-parameters with the final metrics (HPARAMS tab).

The feature-cache linear probe trains its head in seconds, so its epochs are written when it ends.
After ``--resume`` the events of steps after the checkpoint are purged, so the curves do not double.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from transferlab.errors import ConfigError

log = logging.getLogger(__name__)

EPOCH_KEYS = ("train_loss", "train_acc", "val_loss", "val_acc", "lr", "images_per_s")


def _summary_writer_class() -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:  # torch raises ImportError when the tensorboard package is absent
        raise ConfigError(
            f"--tensorboard needs the optional tensorboard package ({e}); "
            "install it with: pip install 'transferlab[tensorboard]'"
        ) from e
    return SummaryWriter


class TensorBoardLog:
    """Writes a run's steps, epochs, curves and hyper-parameters as TensorBoard events.

    Its :meth:`record` is the callback :func:`transferlab.training.loop.fit` calls; the writer is opened
    on the first event, so that after a resume the first step is known and later stale events purged.
    """

    def __init__(self, log_dir: str | Path) -> None:
        self._cls = _summary_writer_class()  # fails before any training when the package is missing
        self.log_dir = Path(log_dir)
        self._writer: Any = None

    def _w(self, first_step: int | None = None) -> Any:
        if self._writer is None:
            purge = first_step if first_step is not None and first_step > 1 else None
            self._writer = self._cls(log_dir=str(self.log_dir), purge_step=purge)
        return self._writer

    def record(self, kind: str, row: Mapping[str, Any]) -> None:
        """Log one ``step`` row (step, loss, lr) or ``epoch`` row (a history.csv row)."""
        if kind == "step":
            step = int(row["step"])
            w = self._w(step)
            for key in ("loss", "lr"):
                if _finite(row.get(key)):
                    w.add_scalar(f"step/{key}", float(row[key]), step)
        elif kind == "epoch":
            epoch = int(row["epoch"])
            w = self._w()
            for key in EPOCH_KEYS:
                if _finite(row.get(key)):
                    w.add_scalar(f"epoch/{key}", float(row[key]), epoch)
            w.flush()  # an interrupted run keeps its finished epochs
        else:
            raise ValueError(f"unknown TensorBoard record kind {kind!r}")

    def finish(
        self, *, curves: Path | None, hparams: Mapping[str, Any], metrics: Mapping[str, Any], step: int = 0
    ) -> None:
        """Add the curves figure and the hyper-parameters with the final metrics, then close the files."""
        import numpy as np
        from torch.utils.tensorboard.summary import hparams as hparams_summary

        w = self._w()
        if curves is not None and Path(curves).is_file():
            from PIL import Image

            with Image.open(curves) as img:
                w.add_image("curves", np.asarray(img.convert("RGB")), step, dataformats="HWC")
        hp = {k: _hparam_value(v) for k, v in hparams.items()}
        mt = {f"hparam/{k}": float(v) for k, v in metrics.items() if _finite(v)}
        exp, ssi, sei = hparams_summary(hp, mt)
        fw = w._get_file_writer()
        for s in (exp, ssi, sei):
            fw.add_summary(s)
        for k, v in mt.items():
            w.add_scalar(k, v, step)
        self.close()
        log.info("TensorBoard events in %s (tensorboard --logdir %s)", self.log_dir, self.log_dir)

    def close(self) -> None:
        """Flush and close the event file (safe to call twice)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def _finite(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _hparam_value(v: Any) -> bool | int | float | str:
    """TensorBoard's hparams take bools, numbers and strings only: paths and None become text."""
    if isinstance(v, bool | int | float | str):
        return v
    return "none" if v is None else str(v)
