"""Per-channel mean and standard deviation of a training set (``--standardize dataset``).

Computed once over the decoded images at their stored size and cached as JSON keyed by the samples'
fingerprint, so every later run on the same data reuses it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from transferlab.data.base import ImageSplit, split_fingerprint
from transferlab.io import atomic_write_json

log = logging.getLogger(__name__)


def channel_stats(
    split: ImageSplit, indices: np.ndarray, *, cache_dir: Path | None = None
) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """Mean and std of each RGB channel over ``split[indices]``, in [0, 1] units."""
    path = None
    if cache_dir is not None:
        path = Path(cache_dir) / f"stats-{split_fingerprint(split, indices)[:24]}.json"
        if path.exists():
            try:
                d = json.loads(path.read_text())
                return tuple(d["mean"]), tuple(d["std"])  # type: ignore[return-value]
            except (OSError, ValueError, KeyError) as e:
                log.warning("ignoring unreadable stats cache %s (%s)", path, e)
    s = np.zeros(3)
    s2 = np.zeros(3)
    n = 0
    for i in indices:
        a = np.asarray(split.load(int(i)), dtype=np.float64).reshape(-1, 3) / 255.0
        s += a.sum(0)
        s2 += (a * a).sum(0)
        n += len(a)
    if n == 0:
        raise ValueError("no images to compute channel statistics from")
    mean = s / n
    std = np.sqrt(np.maximum(s2 / n - mean * mean, 1e-12))
    out = (tuple(float(v) for v in mean), tuple(float(v) for v in std))
    if path is not None:
        atomic_write_json(path, {"mean": out[0], "std": out[1], "n_pixels": n})
    return out  # type: ignore[return-value]
