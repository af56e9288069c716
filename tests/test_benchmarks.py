"""The benchmark harness runs end to end (``benchmarks/run.py --quick``): both sides, every row, one JSON file.

The quick sizes prove that the commands, the shared image selection and the result file work, not the speed;
the speed numbers come from ``make bench`` and live in the README's performance table.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _quick_bench(mini_zip: Path, tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], Path, dict]:
    """``benchmarks/run.py --quick ARGS`` on the mini zip: the process, the results file and its content."""
    env = {**os.environ, "TRANSFERLAB_DATA": str(mini_zip.parent)}
    out = tmp_path / "results"
    p = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "run.py"),
            "--quick",
            *args,
            "--work",
            str(tmp_path),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=tmp_path,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    (path,) = out.glob("*-quick.json")
    return p, path, json.loads(path.read_text())


def test_quick_benchmark_writes_every_row_for_both_sides(mini_zip: Path, tmp_path: Path) -> None:
    p, path, doc = _quick_bench(mini_zip, tmp_path)
    rows = {r["row"]: r for r in doc["rows"]}
    assert set(rows) == {"eval", "head", "bnonly", "data"}
    for name, r in rows.items():
        assert r["baseline"] > 0 and r["transferlab"] > 0, name
        assert r["ratio"] > 0 and r["transferlab_peak_rss_mb"] > 100, name
        runs = doc["runs"][name]
        assert len(runs["baseline"]) == len(runs["transferlab"]) == 1
    # Both sides scored the same 48 val images with the same ImageNet weights and the same 64px input: the
    # decoded cache + batched resize must not change what the model sees beyond rounding.
    assert abs(rows["eval"]["delta_top1_pt"]) <= 100 * 3 / 48 + 1e-9
    assert rows["eval"]["baseline_top1"] > 0.05  # real weights on real images: far above 1/200
    for side in ("baseline", "transferlab"):
        assert math.isfinite(rows["bnonly"][f"{side}_final_loss"])
    assert "| eval |" in p.stdout and str(path) in p.stdout
    assert doc["machine"]["torch"] and doc["prepare"]["prepare"]["val_images"] == 5000


def test_quick_predict_row_compares_predict_with_evaluate(mini_zip: Path, tmp_path: Path) -> None:
    """The predict row (not in the default set): `predict` and `evaluate` on the same val images and model."""
    p, _, doc = _quick_bench(mini_zip, tmp_path, "--rows", "predict")
    (row,) = doc["rows"]
    assert row["row"] == "predict" and row["sides"]["baseline"] == "transferlab evaluate"
    assert row["baseline"] > 0 and row["transferlab"] > 0 and row["ratio"] > 0
    runs = doc["runs"]["predict"]
    assert runs["baseline"][0]["images"] == runs["transferlab"][0]["images"] == 48
    assert runs["transferlab"][0]["failed"] == 0
    # The same model over the same images in the same batches: the same predictions.
    assert row["baseline_top1"] == row["transferlab_top1"] > 0.05
    assert "| predict (transferlab predict vs transferlab evaluate) |" in p.stdout
