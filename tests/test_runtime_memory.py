"""runtime.reuse_freed_memory: freed tensor memory is reused instead of faulted back in (glibc only).

Each check runs in a fresh interpreter: glibc's heap state carries over within a process, so the
"without" numbers are only clean in a process that never entered the block.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from transferlab.runtime import _glibc, reuse_freed_memory

CPU = torch.device("cpu")
pytestmark = pytest.mark.skipif(_glibc() is None, reason="glibc's mallopt is not available here")

_SCRIPT = r"""
import json, os, resource, sys
import torch
from transferlab.runtime import reuse_freed_memory

MB = 48
def churn(rounds=10):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(rounds):
        t = torch.empty(MB * 2**20, dtype=torch.uint8)
        t.fill_(1)
        del t
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

# Page faults to touch one fresh tensor once (mapped anew by glibc's default, freed with munmap): one page each
# with 4 KB pages, fewer where the kernel maps anonymous memory in larger folios (multi-size THP).
out = {"pages": MB * 2**20 // resource.getpagesize(), "one_round": churn(1)}
if sys.argv[1] == "without":
    out["faults"] = churn()
else:
    with reuse_freed_memory(torch.device("cpu")) as applied:
        with reuse_freed_memory(torch.device("cpu")):
            churn()  # the heap grows to its working size over the first rounds
        out["applied"] = applied
        out["faults"] = churn()  # still in effect after the inner block ended
        base = rss_mb()
        t = torch.ones(400 * 2**20, dtype=torch.uint8)
        del t
        out["rss_kept_mb"] = rss_mb() - base
    out["rss_after_mb"] = rss_mb() - base
print(json.dumps(out))
"""


def _run(mode: str) -> dict[str, float]:
    p = subprocess.run([sys.executable, "-c", _SCRIPT, mode], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout.strip().splitlines()[-1])


def test_freed_memory_is_reused_inside_and_returned_after() -> None:
    without = _run("without")
    # mapped and unmapped each round: every round faults its memory in again
    assert without["faults"] > 8 * without["one_round"] > 0
    inside = _run("with")
    assert inside["applied"]
    # the same pages reused: not even a quarter of one round's worth of faults in ten rounds
    assert inside["faults"] < inside["one_round"] / 4
    assert inside["rss_kept_mb"] > 300  # a freed 400 MB tensor stays in the heap while the block runs
    assert inside["rss_after_mb"] < 100  # and goes back to the system when it ends


def test_opt_out_and_other_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRANSFERLAB_MALLOC", "default")
    with reuse_freed_memory(CPU) as applied:
        assert not applied
    monkeypatch.delenv("TRANSFERLAB_MALLOC")
    with reuse_freed_memory(torch.device("meta")) as applied:
        assert not applied
