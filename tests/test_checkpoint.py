"""Checkpoints: exact resume (model, optimizer, RNG), crash safety of the writer, falling back past broken
checkpoints, pruning, and the run-directory lock.

Models are tiny (a few hundred parameters) so the whole file runs in a few seconds on a CPU. The tests of
the guarantees a user relies on (a cut or failed write, two runs in one directory) are in
tests/reliability/test_interruptions.py.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import random
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from transferlab.artifacts.lock import RunLock, RunLockedError
from transferlab.training.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
    step_name,
    verify_checkpoint,
)

LOGGER = "transferlab.training.checkpoint"

_gen = torch.Generator().manual_seed(1234)
X_VEC = torch.randn(64, 8, generator=_gen)
X_IMG = torch.randn(64, 3, 6, 6, generator=_gen)
Y = torch.randint(0, 3, (64,), generator=_gen)


def linear_model() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 3))


def conv_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Dropout(0.2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    )


MODELS: dict[str, tuple[Callable[[], nn.Module], torch.Tensor]] = {
    "linear": (linear_model, X_VEC),
    "conv": (conv_model, X_IMG),
}

OPTIMIZERS: dict[str, Callable[[Any], torch.optim.Optimizer]] = {
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=1e-2, momentum=0.9, centered=True),
    "sgd": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-4),
}


def train(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, steps: int) -> list[float]:
    """A few steps that draw from the global RNG (batch sampling, dropout), like real training."""
    model.train()
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, len(x), (16,))
        loss = F.cross_entropy(model(x[idx]), Y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def clone_state(sd: Any) -> Any:
    return copy.deepcopy(sd)


def assert_same(a: Any, b: Any, where: str = "") -> None:
    """Deep equality where tensors must be torch.equal and of the same dtype, and tuples stay tuples."""
    assert type(a) is type(b), f"{where}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert list(a) == list(b), f"{where}: keys {list(a)} != {list(b)}"
        for k in a:
            assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (u, v) in enumerate(zip(a, b, strict=True)):
            assert_same(u, v, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def quick_save(d: Path, name: str, step: int, **kw: Any) -> Path:
    torch.manual_seed(step)
    model = linear_model()
    return save_checkpoint(
        d, name, model_state=model.state_dict(), optimizer=None, scaler_state=None, state={"step": step, **kw}
    )


def files(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


# ------------------------------------------------------------------------------------ exact resume


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
@pytest.mark.parametrize("model_name", list(MODELS))
def test_resume_is_bit_identical(tmp_path: Path, model_name: str, opt_name: str) -> None:
    make_model, x = MODELS[model_name]
    torch.manual_seed(0)
    model = make_model()
    opt = OPTIMIZERS[opt_name](model.parameters())
    train(model, opt, x, 5)
    saved_opt = clone_state(opt.state_dict())
    state = {"step": 5, "epoch": 0, "batch_in_epoch": 5, "history": [{"loss": 1.5}], "early_stop": {"bad": 0}}
    path = save_checkpoint(
        tmp_path, "step-000005", model_state=model.state_dict(), optimizer=opt, scaler_state=None, state=state
    )
    assert path == tmp_path / "step-000005.safetensors"
    assert files(tmp_path) == ["step-000005.json", "step-000005.safetensors"]

    expected_losses = train(model, opt, x, 5)
    expected_weights = clone_state(model.state_dict())

    torch.manual_seed(99)  # a different init and RNG position: everything must come from the checkpoint
    fresh = make_model()
    fresh_opt = OPTIMIZERS[opt_name](fresh.parameters())
    loaded = load_checkpoint(tmp_path, "step-000005", optimizer=fresh_opt)
    fresh.load_state_dict(loaded.model_state)
    assert loaded.state == state
    assert loaded.name == "step-000005" and loaded.path == path
    assert_same(fresh_opt.state_dict(), saved_opt, "optimizer")

    assert train(fresh, fresh_opt, x, 5) == expected_losses
    assert_same(fresh.state_dict(), expected_weights, "model")


def test_adam_step_stays_a_tensor(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = linear_model()
    opt = torch.optim.Adam(model.parameters())
    train(model, opt, X_VEC, 3)
    save_checkpoint(tmp_path, "a", model_state=model.state_dict(), optimizer=opt, scaler_state=None, state={})
    meta = json.loads((tmp_path / "a.json").read_text())
    assert meta["optimizer"]["state"]["0"]["step"] == {"__tensor__": "optim.0.step"}
    assert meta["optimizer"]["param_groups"][0]["params"] == [0, 1, 2, 3]
    from safetensors import safe_open

    with safe_open(str(tmp_path / "a.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        assert f.get_tensor("optim.0.step").item() == 3.0
    assert {"model.0.weight", "optim.1.exp_avg", "optim.3.exp_avg_sq", "rng.torch_cpu"} <= keys


def test_python_number_entries_stay_numbers(tmp_path: Path) -> None:
    """Per-parameter state that is a Python number (not a tensor) goes to the JSON and comes back as is."""
    model = nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sd = opt.state_dict()
    sd["state"] = {0: {"step": 7, "ratio": 0.25, "flag": True, "buf": torch.arange(3.0)}}
    opt.load_state_dict(sd)
    save_checkpoint(tmp_path, "n", model_state=model.state_dict(), optimizer=opt, scaler_state=None, state={})
    meta = json.loads((tmp_path / "n.json").read_text())
    assert meta["optimizer"]["state"]["0"]["step"] == 7
    other = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.5)
    load_checkpoint(tmp_path, "n", optimizer=other, restore_rng=False)
    assert_same(other.state_dict(), opt.state_dict())


def test_model_tensors_round_trip_exactly(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = conv_model()
    model.train()
    model(X_IMG)  # BatchNorm running stats and the int64 num_batches_tracked
    sd = dict(model.state_dict())
    sd["half"] = torch.randn(3, 2).to(torch.bfloat16)
    sd["tied"] = sd["6.weight"]  # shares storage with another entry, like tied embeddings
    sd["view"] = sd["0.weight"][:, 1]  # a non-contiguous view
    sd["empty"] = torch.zeros(0, 4)
    save_checkpoint(tmp_path, "m", model_state=sd, optimizer=None, scaler_state=None, state={"step": 1})
    loaded = load_checkpoint(tmp_path, "m", restore_rng=False)
    assert list(loaded.model_state) == list(sd)
    for k, v in sd.items():
        got = loaded.model_state[k]
        assert got.dtype == v.dtype and torch.equal(got, v), k


def test_scaler_and_state_round_trip(tmp_path: Path) -> None:
    scaler = torch.amp.GradScaler("cpu")
    state = {"step": 3, "best": float("inf"), "nan": float("nan"), "path": "runs/x", "t": (1, 2)}
    save_checkpoint(tmp_path, "s", model_state={}, optimizer=None, scaler_state=scaler.state_dict(), state=state)
    loaded = load_checkpoint(tmp_path, "s", restore_rng=False)
    assert loaded.scaler_state == scaler.state_dict()
    assert loaded.state["best"] == float("inf") and loaded.state["nan"] != loaded.state["nan"]
    assert loaded.state["t"] == [1, 2]  # JSON has no tuples: documented
    restored = torch.amp.GradScaler("cpu")
    restored.load_state_dict(loaded.scaler_state)
    assert restored.state_dict() == scaler.state_dict()


@pytest.mark.parametrize(
    ("state", "match"),
    [
        ({"history": {3: 0.5}}, "key 3"),
        ({"loss": torch.tensor(1.0)}, "Tensor"),
        ({"obj": object()}, "object"),
    ],
)
def test_bad_state_is_refused_before_writing(tmp_path: Path, state: dict[str, Any], match: str) -> None:
    quick_save(tmp_path, "step-000001", 1)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(TypeError, match=match):
        save_checkpoint(tmp_path, "step-000001", model_state={}, optimizer=None, scaler_state=None, state=state)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_bad_names_are_refused(tmp_path: Path) -> None:
    for name in ("", ".hidden", "a/b", " x"):
        with pytest.raises(ValueError, match="checkpoint name"):
            quick_save(tmp_path, name, 1)


# ------------------------------------------------------------------------------------------- RNG


def test_rng_restore(tmp_path: Path) -> None:
    torch.manual_seed(5)
    np.random.seed(5)
    random.seed(5)
    random.gauss(0, 1)  # leaves a cached gaussian in Python's state...
    np.random.randn()  # ...and in NumPy's
    save_checkpoint(tmp_path, "r", model_state={}, optimizer=None, scaler_state=None, state={"step": 0})
    expected = (torch.rand(4), np.random.rand(4), np.random.randn(), random.random(), random.gauss(0, 1))
    for _ in range(3):  # move every generator on
        torch.rand(10), np.random.rand(10), random.random()

    load_checkpoint(tmp_path, "r", restore_rng=True)
    got = (torch.rand(4), np.random.rand(4), np.random.randn(), random.random(), random.gauss(0, 1))
    assert torch.equal(got[0], expected[0])
    np.testing.assert_array_equal(got[1], expected[1])
    assert got[2:] == expected[2:]


def test_rng_untouched_without_restore(tmp_path: Path) -> None:
    torch.manual_seed(5)
    save_checkpoint(tmp_path, "r", model_state={}, optimizer=None, scaler_state=None, state={})
    first = torch.rand(3)
    state = torch.get_rng_state()
    load_checkpoint(tmp_path, "r", restore_rng=False)
    assert torch.equal(torch.get_rng_state(), state)
    assert not torch.equal(torch.rand(3), first)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_resume_and_rng(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = linear_model().cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = X_VEC.cuda()
    y = Y.cuda()

    def steps(m: nn.Module, o: torch.optim.Optimizer) -> list[float]:
        out = []
        for _ in range(5):
            idx = torch.randint(0, 64, (16,), device="cuda")
            loss = F.cross_entropy(m(x[idx]), y[idx])
            o.zero_grad()
            loss.backward()
            o.step()
            out.append(loss.item())
        return out

    steps(model, opt)
    save_checkpoint(tmp_path, "g", model_state=model.state_dict(), optimizer=opt, scaler_state=None, state={})
    meta = json.loads((tmp_path / "g.json").read_text())
    assert len(meta["rng"]["cuda"]) == torch.cuda.device_count()
    expected = steps(model, opt)
    expected_w = clone_state(model.state_dict())
    torch.cuda.manual_seed_all(123)
    fresh = linear_model().cuda()
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    loaded = load_checkpoint(tmp_path, "g", optimizer=fresh_opt)
    fresh.load_state_dict(loaded.model_state)
    assert steps(fresh, fresh_opt) == expected
    assert_same(fresh.state_dict(), expected_w)


# ------------------------------------------------------------------------------- broken checkpoints


def test_corrupted_tensor_file(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    quick_save(tmp_path, "step-000005", 5)
    bad = quick_save(tmp_path, "step-000010", 10)
    data = bytearray(bad.read_bytes())
    data[-3] ^= 0xFF  # same size, different content
    bad.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"step-000010\.safetensors.*sha256"):
        verify_checkpoint(tmp_path, "step-000010")
    caplog.set_level(logging.WARNING, logger=LOGGER)
    assert latest_checkpoint(tmp_path) == "step-000005"
    assert any("step-000010" in r.getMessage() and "sha256" in r.getMessage() for r in caplog.records)


def test_garbage_manifest_and_missing_tensors(tmp_path: Path) -> None:
    quick_save(tmp_path, "a", 1)
    (tmp_path / "a.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"a\.json is not valid JSON"):
        load_checkpoint(tmp_path, "a")
    quick_save(tmp_path, "b", 1)
    (tmp_path / "b.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"b\.safetensors is missing"):
        load_checkpoint(tmp_path, "b")
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_checkpoint(tmp_path, "nope")


def test_future_format_version_is_refused(tmp_path: Path) -> None:
    quick_save(tmp_path, "a", 1)
    meta = json.loads((tmp_path / "a.json").read_text())
    meta["format_version"] = 99
    (tmp_path / "a.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="format version 99"):
        load_checkpoint(tmp_path, "a")


def test_wrong_optimizer_is_refused(tmp_path: Path) -> None:
    model = linear_model()
    opt = torch.optim.AdamW(model.parameters())
    train(model, opt, X_VEC, 1)
    save_checkpoint(tmp_path, "a", model_state=model.state_dict(), optimizer=opt, scaler_state=None, state={})
    with pytest.raises(CheckpointError, match="AdamW optimizer, not of a SGD"):
        load_checkpoint(tmp_path, "a", optimizer=torch.optim.SGD(linear_model().parameters(), lr=0.1))
    other = nn.Linear(8, 3)  # 2 parameters where the checkpoint has 4
    with pytest.raises(CheckpointError, match="does not fit"):
        load_checkpoint(tmp_path, "a", optimizer=torch.optim.AdamW(other.parameters()))
    save_checkpoint(tmp_path, "b", model_state={}, optimizer=None, scaler_state=None, state={})
    with pytest.raises(CheckpointError, match="without optimizer state"):
        load_checkpoint(tmp_path, "b", optimizer=torch.optim.AdamW(other.parameters()))


# ------------------------------------------------------------------------------------- latest, prune


def test_latest_sorts_by_recorded_step_then_mtime(tmp_path: Path) -> None:
    assert latest_checkpoint(tmp_path / "nowhere") is None
    assert latest_checkpoint(tmp_path) is None
    quick_save(tmp_path, "step-b", 30)
    quick_save(tmp_path, "step-a", 200)
    quick_save(tmp_path, "last", 500)  # another prefix
    assert latest_checkpoint(tmp_path) == "step-a"
    assert latest_checkpoint(tmp_path, prefix="last") == "last"
    assert latest_checkpoint(tmp_path, prefix="") == "last"

    quick_save(tmp_path, "step-c", 200)
    for suffix, t in ((".json", 1000), (".safetensors", 1000)):
        os.utime(tmp_path / f"step-a{suffix}", (t, t))
        os.utime(tmp_path / f"step-c{suffix}", (t + 5, t + 5))
    assert latest_checkpoint(tmp_path) == "step-c"
    os.utime(tmp_path / "step-a.json", (2000, 2000))
    assert latest_checkpoint(tmp_path) == "step-a"


def test_all_broken_gives_none(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    p = quick_save(tmp_path, "step-000001", 1)
    p.write_bytes(b"")
    caplog.set_level(logging.WARNING, logger=LOGGER)
    assert latest_checkpoint(tmp_path) is None
    assert "step-000001" in caplog.text


def test_prune_keeps_newest(tmp_path: Path) -> None:
    for s in range(1, 7):
        quick_save(tmp_path, step_name(s), s)
    quick_save(tmp_path, "best", 2)
    (tmp_path / ".step-000007.safetensors.k2j3h4.tmp").write_bytes(b"half")
    (tmp_path / ".step-000007.json.x8y9.tmp").write_text("{")
    (tmp_path / "notes.tmp").write_text("not ours")

    deleted = prune_checkpoints(tmp_path, "step", keep=2)
    assert sorted(deleted) == [step_name(s) for s in range(1, 5)]
    assert files(tmp_path) == [
        "best.json",
        "best.safetensors",
        "notes.tmp",
        "step-000005.json",
        "step-000005.safetensors",
        "step-000006.json",
        "step-000006.safetensors",
    ]
    assert prune_checkpoints(tmp_path, "step", keep=2) == []
    with pytest.raises(ValueError, match="keep"):
        prune_checkpoints(tmp_path, "step", keep=0)


def test_prune_never_counts_a_broken_newest(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    for s in range(1, 5):
        quick_save(tmp_path, step_name(s), s)
    newest = tmp_path / "step-000004.safetensors"
    newest.write_bytes(newest.read_bytes()[:10])
    caplog.set_level(logging.WARNING, logger=LOGGER)
    assert prune_checkpoints(tmp_path, "step", keep=1) == ["step-000002", "step-000001"]
    assert latest_checkpoint(tmp_path) == "step-000003"
    assert "step-000004" in caplog.text


# ------------------------------------------------------------------------------------------- RunLock


def _write_lock(run_dir: Path, **record: Any) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = run_dir / ".lock"
    lock.write_text(json.dumps(record))
    return lock


def test_runlock_removed_after_exception(tmp_path: Path) -> None:
    with pytest.raises(KeyError), RunLock(tmp_path):
        raise KeyError("boom")
    assert not (tmp_path / ".lock").exists()


def test_runlock_other_host_is_not_taken_over(tmp_path: Path) -> None:
    lock = _write_lock(tmp_path, pid=os.getpid(), hostname="elsewhere.invalid", started="2020-01-01T00:00:00+00:00")
    with pytest.raises(RunLockedError, match=r"elsewhere\.invalid.*delete"), RunLock(tmp_path):
        pass
    assert lock.exists()


def test_runlock_unreadable_old_lock_is_taken_over(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    lock = tmp_path / ".lock"
    lock.write_text("")
    os.utime(lock, (1000, 1000))
    caplog.set_level(logging.WARNING, logger=LOGGER)
    with RunLock(tmp_path):
        pass
    assert "unreadable" in caplog.text


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
def test_runlock_reused_pid_is_stale(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A lock naming a live pid that started long after the lock was written belongs to a dead run: it is taken
    over with a warning, and the new lock is this process's own (a fresh token, a current start time)."""
    old = _write_lock(
        tmp_path, pid=os.getpid(), hostname=socket.gethostname(), started="2001-01-01T00:00:00+00:00", token="old"
    )
    caplog.set_level(logging.WARNING, logger=LOGGER)
    with RunLock(tmp_path) as lock:
        record = json.loads(lock.path.read_text())
        assert record["token"] != "old" and not record["started"].startswith("2001-")
        assert record["pid"] == os.getpid()
    assert f"process {os.getpid()}, which is no longer running (stale since 2001-01-01" in caplog.text
    assert not old.exists() and not list(tmp_path.iterdir())
