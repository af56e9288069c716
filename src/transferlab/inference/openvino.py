"""The OpenVINO backend of the inference engine: the same model, converted once, run by OpenVINO's CPU plugin.

Why. On a small CPU the model is what an inference pass costs, and OpenVINO is the runtime built for exactly
that: EfficientNet-Lite0 at 224px, batch 32, on the 2-core AMD EPYC dev machine (avx512_bf16) runs at ~285
images/s in OpenVINO bf16 with two streams against ~208 for transferlab's own torch path (folded BatchNorm,
bf16 autocast, channels_last, two streams); in fp32 OpenVINO gives ~233 images/s with outputs equal to
PyTorch's fp32 to 1e-5. ``benchmarks/profile_model.py`` measures the candidates side by side.

What runs. :func:`openvino_runner` converts the model as the engine would run it (``forward`` included when
it is one of the feature cache's, so pre-logits features come out of OpenVINO too; OpenVINO folds
BatchNorm into the convolutions itself, so an unfolded and a folded copy give the same graph), caches the
conversion on disk, compiles it for this CPU and checks it against PyTorch on real images of the run
before the first batch. Anything that goes wrong (openvino missing, a conversion error, a check beyond
tolerance) returns None with a warning, and the engine runs torch as it always did.

The conversion cache. ``<cache>/openvino/<model>-<digest>/`` holds the IR (``model.xml``/``model.bin``, fp32
weights) and ``entry.json``: the key (architecture, every weight tensor's sha256, forward, input size,
precision, OpenVINO and torch versions) and the sha256 of both IR files. An entry is used only if its key
is the one asked for and both files hash to what it recorded; otherwise it is rebuilt, with a warning. A
new entry is written into a temporary folder beside it and renamed into place, so a crash leaves either no
entry or a complete one.

The numerics guard. Before a run the compiled model and PyTorch (fp32, no autocast) see the same
``CHECK_IMAGES`` real images. The error is max |a - b| over max(1, max |reference|), as for the folded copy.
In fp32 it must be within ``FP32_TOL``; in bf16 within ``BF16_FACTOR`` times the error of PyTorch's own bf16
autocast on those images (at least ``BF16_FLOOR``): OpenVINO may be no further from fp32 than torch's bf16
is, give or take. Beyond that the converted model is dropped and torch runs.

Threads. One OpenVINO stream per half batch (``NUM_STREAMS`` 2 with two or more threads), the threads
torch would have used (``INFERENCE_NUM_THREADS``), pinned (``ENABLE_CPU_PINNING``). The engine's two
stream threads each hold their own infer request; the gather and resize of the decoded cache stay in those
threads at one torch thread each, so no more threads compute than there are cores.

Signal stacks. OpenVINO's CPU plugin installs an alternate signal stack of its own on the thread that compiles
a model and puts back the one it found when that model is destroyed. Two models destroyed in another order than
they were compiled leave the thread pointing at freed memory, and the next signal whose handler runs on the
alternate stack (every Python-level handler does; PyTorch's DataLoader installs one for SIGCHLD) kills the
process with SIGSEGV, typically when a child process exits. Every compile and every release of a compiled
model therefore runs inside :func:`signal_stack_kept`, which puts the calling thread's own stack back.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import gc
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from transferlab.data.resolve import cache_dir as user_cache_dir
from transferlab.errors import ConfigError
from transferlab.io import atomic_write_json
from transferlab.runtime import Precision

log = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "openvino")
FORMAT_VERSION = 1
#: Real images of the run the converted model is checked on before it runs.
CHECK_IMAGES = 8
#: fp32: the same bound as the folded copy's check (relative to the output scale).
FP32_TOL = 1e-3
#: bf16: at most this many times PyTorch's own bf16 error on the check images, and never less than the floor.
BF16_FACTOR = 2.0
BF16_FLOOR = 2e-2

Forward = Callable[[nn.Module, torch.Tensor], torch.Tensor]


class _SignalStack(ctypes.Structure):
    """glibc's ``stack_t`` on Linux (``sigaltstack(2)``)."""

    _fields_ = [("ss_sp", ctypes.c_void_p), ("ss_flags", ctypes.c_int), ("ss_size", ctypes.c_size_t)]


@contextlib.contextmanager
def signal_stack_kept() -> Iterator[None]:
    """Run the block, then give the calling thread back the alternate signal stack it had before (Linux; a
    no-op elsewhere). See "Signal stacks" in the module docstring for why OpenVINO calls need it."""
    if not sys.platform.startswith("linux"):
        yield
        return
    libc = ctypes.CDLL(None, use_errno=True)
    saved = _SignalStack()
    if libc.sigaltstack(None, ctypes.byref(saved)) != 0:
        yield
        return
    try:
        yield
    finally:
        libc.sigaltstack(ctypes.byref(saved), None)


def openvino_version() -> str | None:
    """The installed OpenVINO's version, or None where it is not importable."""
    try:
        import openvino
    except Exception:  # ImportError, or a broken wheel raising anything on import
        return None
    return str(openvino.get_version())


def resolve_backend(requested: str, device: torch.device) -> str:
    """``torch`` or ``openvino`` for a run on ``device``: ``auto`` picks OpenVINO on a CPU where it is installed.

    GPUs stay on torch. ``openvino`` asked for where it is not installed is a :class:`ConfigError`; asked for
    on a GPU it is a warning and torch.
    """
    if requested not in BACKENDS:
        raise ConfigError(f"--backend must be one of {', '.join(BACKENDS)}, not {requested!r}")
    if requested == "torch":
        return "torch"
    if device.type != "cpu":
        if requested == "openvino":
            log.warning("--backend openvino runs on CPUs; %s stays on torch", device)
        return "torch"
    if openvino_version() is None:
        if requested == "openvino":
            raise ConfigError("--backend openvino: the openvino package is not installed (pip install openvino)")
        return "torch"
    return "openvino"


def weights_digest(model: nn.Module) -> str:
    """sha256 over every parameter and buffer (name, dtype, shape, bytes) of ``model``, classifier included."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def architecture(model: nn.Module) -> str:
    """The class and the module tree (``repr``: every layer with its settings), hashed."""
    cls = type(model)
    return f"{cls.__module__}.{cls.__qualname__}:{hashlib.sha256(repr(model).encode()).hexdigest()[:16]}"


def forward_name(forward: Forward | None) -> str | None:
    """The name a converted ``forward`` is keyed by, or None when it cannot be converted.

    ``None`` (logits) and module-level functions (the feature cache's ``pre_logits``/``feature_map``) are
    converted with the model; a closure (TTA's) is not: it is named by what it captures, not by its name.
    """
    if forward is None:
        return "logits"
    qual = getattr(forward, "__qualname__", "")
    if "<locals>" in qual or not qual:
        return None
    return f"{forward.__module__}.{qual}"


def wraps_model(forward: Forward | None) -> bool:
    """True for a ``forward`` that only calls ``model(view)`` (TTA): it can run around the converted logits."""
    return bool(getattr(forward, "calls_model_only", False))


@dataclasses.dataclass(frozen=True)
class ConversionKey:
    """What a converted model depends on."""

    architecture: str
    weights: str
    forward: str
    input_size: int
    precision: str
    openvino: str
    torch: str

    def digest(self) -> str:
        blob = json.dumps(dataclasses.asdict(self) | {"format": FORMAT_VERSION}, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:24]


def conversion_key(model: nn.Module, fwd: str, size: int, precision: Precision) -> ConversionKey:
    return ConversionKey(
        architecture=architecture(model),
        weights=weights_digest(model),
        forward=fwd,
        input_size=int(size),
        precision=precision.name,
        openvino=openvino_version() or "",
        torch=torch.__version__,
    )


class _Forward(nn.Module):
    """``forward(model, x)`` (or ``model(x)``) as one module, in float32, for tracing."""

    def __init__(self, model: nn.Module, forward: Forward | None) -> None:
        super().__init__()
        self.model = model
        self.fn = forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x) if self.fn is None else self.fn(self.model, x)
        return out.float()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _entry_dir(root: Path, model: nn.Module, key: ConversionKey) -> Path:
    return root / f"{type(model).__name__.lower()}-{key.digest()}"


def _load_entry(entry: Path, key: ConversionKey) -> Any | None:
    """The cached ov.Model of ``entry`` if it is complete and is the one ``key`` asks for, else None (warned)."""
    import openvino as ov

    try:
        meta = json.loads((entry / "entry.json").read_text(encoding="utf-8"))
        if meta.get("key") != dataclasses.asdict(key) or meta.get("format") != FORMAT_VERSION:
            raise ValueError("its key is not the one asked for")
        for name in ("model.xml", "model.bin"):
            if _sha256(entry / name) != meta["files"][name]:
                raise ValueError(f"{name} does not hash to what the entry recorded")
        return ov.Core().read_model(str(entry / "model.xml"))
    except Exception as e:
        log.warning("OpenVINO conversion cache entry %s is damaged (%s); rebuilding it", entry, e)
        return None


def _convert(model: nn.Module, forward: Forward | None, size: int) -> Any:
    import openvino as ov

    example = torch.zeros(1, 3, size, size)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings about data-dependent branches in timm's padding helpers
        ov_model = ov.convert_model(_Forward(model, forward).eval(), example_input=example)
    ov_model.reshape({0: ov.PartialShape([-1, 3, size, size])})
    return ov_model


def _store(entry: Path, ov_model: Any, key: ConversionKey) -> None:
    """Write the IR and its ``entry.json`` into a temporary folder, then rename it to ``entry``."""
    import openvino as ov

    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=entry.parent))
    try:
        ov.save_model(ov_model, str(tmp / "model.xml"), compress_to_fp16=False)
        files = {name: _sha256(tmp / name) for name in ("model.xml", "model.bin")}
        atomic_write_json(
            tmp / "entry.json", {"format": FORMAT_VERSION, "key": dataclasses.asdict(key), "files": files}
        )
        if entry.exists():  # a damaged entry: move it aside first (a rename over a non-empty folder fails)
            old = entry.with_name(f".{entry.name}.old-{os.getpid()}-{time.monotonic_ns()}")
            os.replace(entry, old)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(tmp, entry)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def converted_model(
    model: nn.Module, forward: Forward | None, fwd: str, size: int, precision: Precision, root: Path
) -> tuple[Any, Path, bool]:
    """The ov.Model of ``forward(model, x)`` for ``size`` inputs: from the cache when valid, else converted and
    stored. Returns (model, entry folder, whether it was a cache hit)."""
    key = conversion_key(model, fwd, size, precision)
    entry = _entry_dir(root, model, key)
    if (entry / "entry.json").exists() or entry.exists():
        ov_model = _load_entry(entry, key)
        if ov_model is not None:
            return ov_model, entry, True
    ov_model = _convert(model, forward, size)
    _store(entry, ov_model, key)
    return ov_model, entry, False


class OpenVinoRunner:
    """A compiled model that takes a standardised float (B, 3, S, S) torch tensor and returns float32 outputs.

    Thread-safe: each calling thread gets its own infer request, so the engine's two stream threads run in
    OpenVINO's two streams at once (``infer`` releases the GIL).
    """

    def __init__(self, compiled: Any, *, nhwc: bool, fwd: str, info: dict[str, Any]) -> None:
        self.compiled = compiled
        self.nhwc = nhwc
        #: ``logits``: the converted model is the plain model, so a TTA forward can run around it.
        self.fwd = fwd
        self.info = info
        #: Flip each batch left-right before it runs (the engine asked for the features of mirrored inputs).
        self.mirror = False
        self._requests: dict[int, Any] = {}
        self._lock = threading.Lock()

    def close(self) -> None:
        """Release the infer requests and the compiled model now, in the calling thread, instead of whenever the
        garbage collector or a stream thread's exit gets to them (OpenVINO objects torn down at such points
        took the process down)."""
        with self._lock, signal_stack_kept():
            self._requests.clear()
            self.compiled = None
            gc.collect()  # anything else that still held them goes now, inside the guard

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        tid = threading.get_ident()
        with self._lock:
            req = self._requests.get(tid)
            if req is None:
                req = self._requests[tid] = self.compiled.create_infer_request()
        a = x.detach().float()
        if self.mirror:
            a = torch.flip(a, dims=[3])
        if self.nhwc:
            a = a.permute(0, 2, 3, 1)  # a channels_last tensor is contiguous NHWC memory: no copy
        arr = np.ascontiguousarray(a.numpy())
        out = req.infer({0: arr}, share_inputs=True)
        return torch.from_numpy(np.array(next(iter(out.values())), dtype=np.float32, copy=True))

    def run(self, forward: Forward | None, x: torch.Tensor) -> torch.Tensor:
        """What ``forward(model, x)`` gives in the torch path: the converted forward, or TTA around the logits."""
        if forward is None or self.fwd != "logits":
            return self(x)
        return forward(self, x).float()  # type: ignore[arg-type]


def _compile(ov_model: Any, precision: Precision, nhwc: bool, streams: int, threads: int) -> Any:
    import openvino as ov

    if nhwc:
        from openvino.preprocess import PrePostProcessor

        ppp = PrePostProcessor(ov_model.clone())  # the processor edits the model it is given
        ppp.input().tensor().set_layout(ov.Layout("NHWC"))
        ppp.input().model().set_layout(ov.Layout("NCHW"))
        ov_model = ppp.build()
    config = {
        "INFERENCE_PRECISION_HINT": "bf16" if precision.name == "bf16" else "f32",
        "PERFORMANCE_HINT": "THROUGHPUT",
        "NUM_STREAMS": str(streams),
        "INFERENCE_NUM_THREADS": str(threads),
        "ENABLE_CPU_PINNING": "YES",
    }
    with signal_stack_kept():
        return ov.Core().compile_model(ov_model, "CPU", config)


def _relative_error(a: torch.Tensor, ref: torch.Tensor) -> float:
    if a.shape != ref.shape:
        return float("inf")
    return float((a.float() - ref.float()).abs().max()) / max(1.0, float(ref.abs().max()))


def numerics_check(
    runner: Callable[[torch.Tensor], torch.Tensor],
    model: nn.Module,
    forward: Forward | None,
    x: torch.Tensor,
    precision: Precision,
) -> tuple[bool, float, float]:
    """(passed, error, tolerance) of ``runner`` against PyTorch fp32 on the check batch ``x`` (see the module doc)."""
    with torch.inference_mode():
        ref = (model(x) if forward is None else forward(model, x)).float()
        got = runner(x)
        if precision.dtype is None:
            tol = FP32_TOL
        else:
            with precision.autocast():
                low = (model(x) if forward is None else forward(model, x)).float()
            tol = max(BF16_FLOOR, BF16_FACTOR * _relative_error(low, ref))
    err = _relative_error(got, ref) if bool(torch.isfinite(got).all()) else float("inf")
    return err <= tol, err, tol


def openvino_runner(
    model: nn.Module,
    forward: Forward | None,
    *,
    size: int,
    precision: Precision,
    check: torch.Tensor,
    streams: bool = True,
    cache_dir: Path | None = None,
) -> OpenVinoRunner | None:
    """``model`` (with ``forward``) converted, compiled and checked on ``check``; None where torch must run.

    ``check`` is a few real images of the run, standardised as the model sees them.
    """
    inner = getattr(forward, "mirror_of", None)
    if inner is not None:  # the features of mirrored inputs: convert the plain forward, flip before it runs
        runner = openvino_runner(
            model, inner, size=size, precision=precision, check=check, streams=streams, cache_dir=cache_dir
        )
        if runner is not None:
            runner.mirror = True
        return runner
    fwd = forward_name(forward)
    if fwd is None and wraps_model(forward):
        fwd = "logits"
        convert_forward = None
    else:
        convert_forward = forward
    if fwd is None:
        log.info("inference backend: torch (OpenVINO cannot convert this forward function)")
        return None
    root = Path(cache_dir) if cache_dir is not None else user_cache_dir() / "openvino"
    threads = max(1, torch.get_num_threads())
    n_streams = 2 if streams and threads >= 2 else 1
    nhwc = precision.channels_last
    model.eval()  # the engine runs it in eval mode too; ``check`` compares in it
    try:
        t0 = time.perf_counter()
        ov_model, entry, hit = converted_model(model, convert_forward, fwd, size, precision, root)
        compiled = _compile(ov_model, precision, nhwc, n_streams, threads)
        setup_s = time.perf_counter() - t0
    except Exception as e:
        log.warning(
            "OpenVINO could not convert %s (%s: %s); running it in torch", type(model).__name__, type(e).__name__, e
        )
        return None
    info = {
        "backend": "openvino",
        "openvino": openvino_version(),
        "precision": precision.name,
        "streams": n_streams,
        "threads": threads,
        "conversion": "cache hit" if hit else "converted",
        "entry": str(entry),
        "setup_s": round(setup_s, 3),
    }
    runner = OpenVinoRunner(compiled, nhwc=nhwc, fwd=fwd, info=info)
    del compiled  # the runner owns it now and releases it in close(), inside the signal-stack guard
    check_fwd = None if fwd == "logits" else forward
    ok, err, tol = numerics_check(runner, model, check_fwd, check, precision)
    info.update(check_images=len(check), check_error=err, check_tolerance=tol)
    if not ok:
        log.warning(
            "OpenVINO's %s %s differs from PyTorch on %d images of the data (error %.3g > tolerance %.3g); "
            "running it in torch",
            precision.name,
            type(model).__name__,
            len(check),
            err,
            tol,
        )
        runner.close()
        return None
    log.info(
        "inference backend: openvino %s, %s, %d stream(s) x %d thread(s) pinned, conversion %s (%s, %.1f s); "
        "check on %d images: error %.2g <= %.2g",
        info["openvino"],
        precision.name,
        n_streams,
        max(1, threads // n_streams),
        "from the cache" if hit else "new",
        entry,
        setup_s,
        len(check),
        err,
        tol,
    )
    return runner
