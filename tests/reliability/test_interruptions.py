"""Interruptions: SIGKILL, SIGTERM and SIGINT in the middle of training, a checkpoint write that fails or is
cut in half, two runs in one directory, and a study stopped between members. Finished work is never lost,
and a resumed run ends with exactly the weights of an uninterrupted one."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import pytest
import torch

from builders import (
    WNIDS,
    assert_default_path,
    cifar_files,
    default_train_argv,
    jpeg_bytes,
    requires_native_bf16,
    train_argv,
    write_folder,
)
from test_checkpoint import LOGGER, quick_save
from test_study import _spec, _study, _summary, _write
from transferlab.artifacts.lock import RunLock, RunLockedError
from transferlab.cli import main
from transferlab.errors import TrainingInterrupted, TransferlabError
from transferlab.models.weights import read_weight_file
from transferlab.training import checkpoint as ckpt
from transferlab.training.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    load_checkpoint,
    verify_checkpoint,
)
from transferlab.training.interrupt import GracefulStop

pytestmark = pytest.mark.usefixtures("one_thread")
REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
#: 24 fit images at batch 6: 4 steps per epoch; a step checkpoint every 2 steps, none pruned. On the CPU
#: also where a GPU is present, so the in-process reference and the subprocesses compute the same way. Every
#: run here takes the default precision (bf16 autocast + channels_last + the swapped training kernels + heap
#: reuse on this CPU), the path users run: see builders.default_train_argv.
ARGS = (
    "--device",
    "cpu",
    "--strategy",
    "bn-only",
    "--head",
    "seed",
    "--aug",
    "seed",
    "--epochs",
    "4",
    "--checkpoint-every",
    "2",
    "--keep-checkpoints",
    "50",
    "--lr",
    "3e-3",
)
#: Timing columns of history rows: the only values a resumed run may record differently.
TIMING = ("seconds", "images_per_s")


#: ``reference(kind)`` -> (the uninterrupted run directory, its data path and extra options)
Reference = Callable[[str], tuple[Path, tuple[str, ...]]]


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "transferlab", *args]


def _start(argv: list[str], **popen: Any) -> subprocess.Popen[bytes]:
    # SIGINT back to its default in the child, even when the test itself runs as a background job (where it
    # is inherited as ignored, and GracefulStop deliberately leaves an ignored signal ignored).
    popen.setdefault("preexec_fn", lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    return subprocess.Popen(_cli(*argv), env=ENV, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, **popen)


def _wait_for(path: Path, proc: subprocess.Popen[bytes], timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and not path.exists() and proc.poll() is None:
        time.sleep(0.005)


def _resume(argv: list[str]) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(_cli(*argv, "--resume"), env=ENV, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resuming from" in res.stderr
    return res


def _children(pid: int) -> list[int]:
    """Live child processes of ``pid`` (Linux /proc)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            # "pid (comm) state ppid ...": comm may hold spaces, so split after its closing parenthesis
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(stat.parent.name))
    return out


def _without_timing(state: dict[str, Any]) -> dict[str, Any]:
    history = [{k: v for k, v in row.items() if k not in TIMING} for row in state["history"]]
    return {**state, "history": history}


def assert_same_run(ref: Path, run: Path) -> None:
    """The two runs ended identically: every tensor of the final checkpoint (model weights, optimizer state,
    RNG states) and of model.safetensors is bit-identical (torch.equal), the optimizer's structure and the
    loop's state (step, position, history without timings, early stopping) are equal, and so is the per-step
    loss log."""
    a_ck, _ = read_weight_file(ref / "checkpoints" / "last.safetensors")
    b_ck, _ = read_weight_file(run / "checkpoints" / "last.safetensors")
    assert a_ck.keys() == b_ck.keys()
    assert any(k.startswith("optim.") for k in a_ck) and any(k.startswith("model.") for k in a_ck)
    for k in a_ck:
        assert torch.equal(a_ck[k], b_ck[k]), k
    a_meta = verify_checkpoint(ref / "checkpoints", "last")
    b_meta = verify_checkpoint(run / "checkpoints", "last")
    assert a_meta["optimizer"] == b_meta["optimizer"] and a_meta["rng"] == b_meta["rng"]
    assert _without_timing(a_meta["state"]) == _without_timing(b_meta["state"])
    a, _ = read_weight_file(ref / "model.safetensors")
    b, _ = read_weight_file(run / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert (ref / "steps.csv").read_text() == (run / "steps.csv").read_text()


@pytest.fixture(scope="module")
def mixed_ds(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An ImageFolder (``train/<class>``, ``val/<class>``) of images of many sizes: no single array holds them,
    so the decoded cache steps aside and the per-image PIL path (DataLoader, optionally with workers) runs."""
    files: dict[str, bytes] = {}
    for k, wnid in enumerate(WNIDS):
        color = [30, 30, 30]
        color[k] = 220
        for split, n in (("train", 10), ("val", 4)):
            for i in range(n):
                files[f"{split}/{wnid}/{i}.jpg"] = jpeg_bytes(tuple(color), size=36 + 4 * i + k)  # type: ignore[arg-type]
    return write_folder(tmp_path_factory.mktemp("mixed") / "mixed-sizes", files)


@pytest.fixture(scope="module")
def reference(train_ds: Path, dirty_ds: Path, mixed_ds: Path, tmp_path_factory: pytest.TempPathFactory) -> Reference:
    """``reference(kind)``: the uninterrupted run every interrupted one must end up equal to, and its data and
    options; kind ``clean`` (train_ds, decoded cache), ``skip`` (dirty_ds with --bad-images skip) or
    ``per-image`` (mixed_ds: the per-image PIL path). Each is trained once, in this process."""
    runs: dict[str, tuple[Path, tuple[str, ...]]] = {}
    data = {"clean": (train_ds, ()), "skip": (dirty_ds, ("--bad-images", "skip")), "per-image": (mixed_ds, ())}

    def get(kind: str) -> tuple[Path, tuple[str, ...]]:
        if kind not in runs:
            ds, extra = data[kind]
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            ref = tmp_path_factory.mktemp(f"reference-{kind}") / "ref"
            assert main(default_train_argv(ds, ref, *ARGS, *extra)) == 0
            torch.set_num_threads(threads)
            m = json.loads((ref / "metrics.json").read_text())
            assert (m["precision"], m["channels_last"]) == ("bf16", True)
            runs[kind] = ref, (str(ds), *extra)
        return runs[kind]

    return get


# ------------------------------------------------------------------------------------- SIGKILL, signals


@requires_native_bf16
def test_sigkill_then_resume_from_a_mid_epoch_checkpoint_is_exact(reference: Reference, tmp_path: Path) -> None:
    ref, (ds, *_) = reference("clean")
    run = tmp_path / "killed"
    argv = default_train_argv(Path(ds), run, *ARGS)
    proc = _start(argv)
    ckpts = run / "checkpoints"
    # Kill as soon as the checkpoint at the end of epoch 2 (step 8) is complete, with half the run to go.
    _wait_for(ckpts / "step-00000008.json", proc)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, err.decode()[-3000:]
    assert not (run / "metrics.json").exists(), "the run finished before it could be killed"
    assert_default_path(err.decode())

    # A kill during a checkpoint write leaves a tensor file cut short. Do that to every checkpoint newer than
    # step 6 (the middle of epoch 2: step-8, and last/best if the epoch's end was reached), so that the resume
    # must name and skip them and start from a position inside an epoch, not from an epoch boundary.
    cut = []
    for manifest in sorted(ckpts.glob("*.json")):
        if json.loads(manifest.read_text())["state"]["step"] > 6:
            tensors = manifest.with_suffix(".safetensors")
            tensors.write_bytes(tensors.read_bytes()[: tensors.stat().st_size // 2])
            cut.append(manifest.stem)
    assert "step-00000008" in cut
    res = _resume(argv)
    for name in cut:
        assert f"skipping checkpoint {name}" in res.stderr and str(ckpts / f"{name}.safetensors") in res.stderr
    m = re.search(r"resuming from (\S+): epoch (\d+), position (\d+), step (\d+)", res.stderr)
    assert m, res.stderr[-3000:]
    assert Path(m.group(1)).name == "step-00000006.safetensors"
    assert (int(m.group(2)), int(m.group(3)), int(m.group(4))) == (1, 12, 6)  # 2 of epoch 2's 4 batches done
    assert_default_path(res.stderr, run)
    assert_same_run(ref, run)


@requires_native_bf16
@pytest.mark.parametrize(
    ("sig", "kind"),
    [(signal.SIGTERM, "clean"), (signal.SIGINT, "clean"), (signal.SIGTERM, "skip"), (signal.SIGINT, "per-image")],
    ids=["SIGTERM", "SIGINT", "SIGTERM-bad-images-skip", "SIGINT-per-image-path"],
)
def test_signal_finishes_the_step_checkpoints_and_exits(
    sig: signal.Signals, kind: str, reference: Reference, tmp_path: Path
) -> None:
    """The third case resumes a run that left broken images out: the same ones, so the same data order. The
    fourth runs the per-image PIL path (mixed sizes), where the decoded cache does not apply."""
    ref, (ds, *extra) = reference(kind)
    run = tmp_path / "stopped"
    argv = default_train_argv(Path(ds), run, *ARGS, *extra)
    proc = _start(argv)
    _wait_for(run / "checkpoints" / "step-00000002.json", proc)
    proc.send_signal(sig)
    _, err_bytes = proc.communicate(timeout=120)
    err = err_bytes.decode()
    assert proc.returncode == 128 + sig, err[-3000:]  # 143 for SIGTERM, 130 for SIGINT
    assert not (run / "metrics.json").exists(), "the run finished before the signal arrived"
    m = re.search(rf"stopped by {sig.name} after step (\d+) \(epoch \d\); wrote the checkpoint (\S+)\.", err)
    assert m, err[-3000:]
    step, written = int(m.group(1)), Path(m.group(2))
    assert written.name == f"step-{step:08d}"
    meta = verify_checkpoint(written.parent, written.name)  # complete, sha256 verified
    assert meta["state"]["step"] == step
    assert latest_checkpoint(written.parent, prefix="") == written.name
    pipeline = "PIL per image in 0 DataLoader worker(s)" if kind == "per-image" else "decoded cache"
    assert f"input pipeline: {pipeline}" in err, err[-3000:]
    res = _resume(argv)
    assert f"input pipeline: {pipeline}" in res.stderr
    assert_same_run(ref, run)


@requires_native_bf16
def test_sigterm_to_the_process_group_with_dataloader_workers(reference: Reference, tmp_path: Path) -> None:
    """Schedulers signal the whole process group: workers must not die first and turn the stop into a crash.
    On the per-image path (mixed sizes), where worker processes really run; the resumed run, also with a
    worker, ends exactly as the reference did with none (the data order does not depend on workers)."""
    ref, (ds, *extra) = reference("per-image")
    run = tmp_path / "group"
    argv = default_train_argv(Path(ds), run, *ARGS, *extra, "--workers", "1")
    # its own process group, so killpg reaches it and its workers only
    proc = _start(argv, start_new_session=True, preexec_fn=None)
    workers: set[int] = set()
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not (run / "checkpoints" / "step-00000002.json").exists():
        workers.update(_children(proc.pid))
        time.sleep(0.005)
    workers.update(_children(proc.pid))
    assert workers, "no DataLoader worker process was started"
    os.killpg(proc.pid, signal.SIGTERM)
    _, err_bytes = proc.communicate(timeout=120)
    err = err_bytes.decode()
    assert proc.returncode == 143, err[-3000:]
    assert "input pipeline: PIL per image in 1 DataLoader worker(s)" in err
    assert "killed by signal" not in err and re.search(r"stopped by SIGTERM after step \d+", err), err[-3000:]
    _resume(argv)
    assert_same_run(ref, run)


def test_graceful_stop_sets_a_flag_and_restores_the_handlers() -> None:
    received: list[int] = []

    def previous(signum: int, frame: object) -> None:
        received.append(signum)

    before = signal.signal(signal.SIGTERM, previous)
    try:
        with GracefulStop() as stop:
            os.kill(os.getpid(), signal.SIGTERM)  # handled at once in the main thread: only a flag is set
            assert stop.requested == signal.SIGTERM and received == []
        # Not acted on inside (the loop had finished): delivered again to the previous handler on exit.
        assert received == [signal.SIGTERM]
        assert signal.getsignal(signal.SIGTERM) is previous
    finally:
        signal.signal(signal.SIGTERM, before)
    assert TrainingInterrupted(signal.SIGTERM, "x").exit_code == 143
    assert TrainingInterrupted(signal.SIGINT, "x").exit_code == 130


def test_a_second_signal_stops_at_once() -> None:
    """The first SIGINT/SIGTERM only sets the flag; a second one, for a step that hangs, is handled at once the way
    it was before training started: for SIGINT that is Python's KeyboardInterrupt, raised inside the block."""
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    with pytest.raises(KeyboardInterrupt), GracefulStop() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested == signal.SIGINT  # still running: the loop would finish its step
        os.kill(os.getpid(), signal.SIGINT)
        pytest.fail("the second SIGINT did not stop at once")
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler

    received: list[int] = []
    before = signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
    try:
        with GracefulStop():
            os.kill(os.getpid(), signal.SIGTERM)
            assert received == []
            os.kill(os.getpid(), signal.SIGTERM)
            assert received == [signal.SIGTERM]  # delivered to the previous handler at once, inside the block
    finally:
        signal.signal(signal.SIGTERM, before)
    assert received == [signal.SIGTERM]  # and not a second time on exit


# ------------------------------------------------------------------------ checkpoints cut or not written


def test_checkpoint_cut_in_half_is_skipped_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    quick_save(tmp_path, "step-000005", 5)
    bad = quick_save(tmp_path, "step-000010", 10)
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2])

    with pytest.raises(CheckpointError, match=r"step-000010\.safetensors.*truncated") as err:
        load_checkpoint(tmp_path, "step-000010")
    assert isinstance(err.value, TransferlabError)

    caplog.set_level(logging.WARNING, logger=LOGGER)
    assert latest_checkpoint(tmp_path) == "step-000005"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and str(bad) in warnings[0] and "truncated" in warnings[0]


def test_missing_manifest_is_not_complete(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    quick_save(tmp_path, "step-000005", 5)
    quick_save(tmp_path, "step-000010", 10)
    (tmp_path / "step-000010.json").unlink()  # the writer was killed between the two files
    with pytest.raises(CheckpointError, match=r"step-000010\.json is missing"):
        load_checkpoint(tmp_path, "step-000010")
    caplog.set_level(logging.WARNING, logger=LOGGER)
    assert latest_checkpoint(tmp_path) == "step-000005"
    assert any("step-000010" in r.getMessage() and "missing" in r.getMessage() for r in caplog.records)


def _failing_atomic_open(fail_in: str) -> Callable[..., contextlib.AbstractContextManager[IO[Any]]]:
    """An atomic_open whose file ending in ``fail_in`` gets half its data written, then hits a full disk."""
    real = ckpt.atomic_open

    class HalfThenFail:
        def __init__(self, f: IO[Any]) -> None:
            self.f = f

        def write(self, data: Any) -> int:
            self.f.write(data[: len(data) // 2])
            self.f.flush()
            raise OSError(28, "No space left on device")

    @contextlib.contextmanager
    def fake(path: Any, mode: str = "wb") -> Iterator[Any]:
        with real(path, mode) as f:
            yield HalfThenFail(f) if str(path).endswith(fail_in) else f

    return fake


@pytest.mark.parametrize("fail_in", [".safetensors", ".json"], ids=["tensors", "manifest"])
@pytest.mark.parametrize("same_name", [False, True], ids=["new-name", "same-name"])
def test_failing_writer_keeps_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fail_in: str, same_name: bool
) -> None:
    quick_save(tmp_path, "step-000005", 5)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    monkeypatch.setattr(ckpt, "atomic_open", _failing_atomic_open(fail_in))
    name = "step-000005" if same_name else "step-000010"  # "last" and "best" are overwritten every epoch
    with pytest.raises(OSError, match="No space"):
        quick_save(tmp_path, name, 10)
    monkeypatch.undo()

    # Byte-identical, nothing half-new, no temp files: both files are complete before either is renamed.
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    assert latest_checkpoint(tmp_path) == "step-000005"
    load_checkpoint(tmp_path, "step-000005", restore_rng=False)


# ----------------------------------------------------------------------------- two runs, one directory


def _write_lock(run_dir: Path, **record: Any) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = run_dir / ".lock"
    lock.write_text(json.dumps(record))
    return lock


def test_runlock_excludes_second_holder(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with RunLock(run) as lock:
        record = json.loads(lock.path.read_text())
        assert record["pid"] == os.getpid()
        assert record["hostname"] == socket.gethostname()
        assert dt.datetime.fromisoformat(record["started"])
        with pytest.raises(RunLockedError, match=rf"process {os.getpid()}\b") as err, RunLock(run):
            pass
        assert isinstance(err.value, TransferlabError)
        assert lock.path.exists()  # the failed attempt did not remove the holder's lock
    assert not (run / ".lock").exists()
    with RunLock(run):  # free again
        pass


def test_runlock_takes_over_dead_pid(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # reaped: its pid names no process now
    _write_lock(tmp_path, pid=dead.pid, hostname=socket.gethostname(), started="2020-01-01T00:00:00+00:00")
    caplog.set_level(logging.WARNING, logger=LOGGER)
    with RunLock(tmp_path) as lock:
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()
    assert str(dead.pid) in caplog.text and "no longer running" in caplog.text
    assert not (tmp_path / ".lock").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".lock")]


def test_second_run_in_the_same_directory_stops_at_once(
    train_ds: Path, in1k32: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    owner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        now = dt.datetime.now(dt.UTC).isoformat()
        _write_lock(run, pid=owner.pid, hostname=socket.gethostname(), started=now, token="x")
        t0 = time.monotonic()
        assert main(train_argv(train_ds, in1k32, run, "--epochs", "1")) == 2
        assert time.monotonic() - t0 < 10
        err = capsys.readouterr().err
        assert f"in use by process {owner.pid}" in err and str(run) in err
        assert [p.name for p in run.iterdir()] == [".lock"]  # nothing written
    finally:
        owner.kill()
        owner.wait()
    # The owner is gone: its lock is stale, taken over with a warning, and the run goes ahead.
    assert main(train_argv(train_ds, in1k32, run, "--epochs", "1")) == 0
    err = capsys.readouterr().err
    assert f"process {owner.pid}, which is no longer running" in err
    assert not (run / ".lock").exists()


# ---------------------------------------------------------------------------------------------- studies


@pytest.fixture(scope="module")
def cifar(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_folder(tmp_path_factory.mktemp("c") / "cifar-10-batches-py", cifar_files(n_per_batch=12))


def test_interrupted_study_resumes_without_retraining(
    train_ds: Path, in1k32: Path, cifar: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import transferlab.studies as run_mod  # the module whose `train` the study calls (patched there)

    spec = _write(tmp_path / "s.yaml", _spec(train_ds, in1k32, cifar, tmp_path / "cache"))
    real = run_mod.train
    calls: list[str] = []

    def dies_on_second(cfg):  # type: ignore[no-untyped-def]
        calls.append(Path(cfg.out).name)
        if len(calls) == 2:
            raise KeyboardInterrupt  # Ctrl-C while the second trained member runs
        return real(cfg)

    monkeypatch.setattr(run_mod, "train", dies_on_second)
    assert _study(spec, tmp_path / "out") == 130
    assert calls == ["probe", "bn"]
    marker = json.loads((tmp_path / "out" / "members" / "bn" / "study.json").read_text())
    assert marker["status"] == "running"
    monkeypatch.setattr(run_mod, "train", real)
    assert _study(spec, tmp_path / "out") == 0
    steps = _summary(tmp_path / "out")
    assert steps["zs"]["status"] == "reused" and steps["probe"]["status"] == "reused"
    assert steps["bn"]["status"] == "resumed" and steps["cnn-head"]["status"] == "trained"
