"""Device, precision and memory-format decisions, made once at start and logged.

bf16 autocast with channels_last more than doubles CPU throughput on CPUs with native bf16
(AVX512-BF16 or AMX): Lite0 at 224px goes from 29 to 134 images/s on the 2-core dev machine. On CPUs
without it, bf16 is emulated and slower than fp32, so ``auto`` only turns it on where it pays.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import logging
import os
import platform
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from transferlab._version import __version__
from transferlab.errors import ConfigError
from transferlab.options import Option

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
SWITCHES = ("auto", "on", "off")

# Where and how fast a model runs: the same four options for train, evaluate and predict.
WORKERS = Option("decoding processes; -1 = cores-1, at most 4", lo=-1, hi=256, group="runtime")
PRECISION = Option(
    "auto: bf16 autocast on GPUs and on CPUs with native bf16, else fp32", choices=PRECISIONS, group="runtime"
)
CHANNELS_LAST = Option(
    "channels_last memory format; auto = on with bf16/fp16 or a GPU", choices=SWITCHES, group="runtime"
)
DEVICE = Option("auto, cpu, cuda, cuda:1, ...", group="runtime")


@functools.cache
def cpu_has_bf16() -> bool:
    """True if this CPU executes bf16 natively (Linux: avx512_bf16 or amx_bf16 in /proc/cpuinfo)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_device(requested: str = "auto") -> torch.device:
    """``auto`` picks CUDA when available, else CPU; anything else is passed to torch.device."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(requested)
    except RuntimeError as e:
        raise ConfigError(f"--device {requested!r} is not a device torch understands: {e}") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {requested}: CUDA is not available on this machine; use --device cpu")
    return dev


@dataclass(frozen=True)
class Precision:
    """The numeric setup of a run: autocast dtype (None = fp32) and memory format."""

    dtype: torch.dtype | None
    channels_last: bool
    device_type: str

    @property
    def name(self) -> str:
        """``bf16``, ``fp16`` or ``fp32``."""
        return {torch.bfloat16: "bf16", torch.float16: "fp16", None: "fp32"}[self.dtype]

    def autocast(self) -> contextlib.AbstractContextManager[None]:
        """The autocast context for forward passes (a no-op for fp32)."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def describe(self) -> str:
        """One line for logs and reports."""
        return f"{self.name} autocast, {'channels_last' if self.channels_last else 'NCHW'} on {self.device_type}"


def resolve_precision(precision: str, channels_last: str, device: torch.device) -> Precision:
    """Decide autocast dtype and memory format from the user's choice and the hardware."""
    if precision not in PRECISIONS:
        raise ConfigError(f"--precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    if channels_last not in SWITCHES:
        raise ConfigError(f"--channels-last must be one of {', '.join(SWITCHES)}, not {channels_last!r}")
    dtype: torch.dtype | None
    if precision == "auto":
        if device.type == "cuda":
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        elif device.type == "cpu" and cpu_has_bf16():
            dtype = torch.bfloat16
        else:
            dtype = None
    elif precision == "fp32":
        dtype = None
    elif precision == "fp16":
        if device.type == "cpu":
            raise ConfigError("--precision fp16 is slow and poorly supported on CPU; use bf16 or fp32")
        dtype = torch.float16
    else:
        dtype = torch.bfloat16
    cl = (dtype is not None or device.type == "cuda") if channels_last == "auto" else channels_last == "on"
    return Precision(dtype, cl, device.type)


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Put ``model`` in eval mode for the block and restore its previous mode after."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


Forward = Callable[[torch.Tensor], torch.Tensor]


@contextlib.contextmanager
def inference_streams(device: torch.device) -> Iterator[Callable[[Forward, torch.Tensor], torch.Tensor]]:
    """A ``run(fn, x)`` that evaluates ``fn`` on ``x``, on a CPU as two halves in two threads.

    Why. A small network's layers are too small to keep every core busy through torch's intra-op
    threads alone (each op splits, synchronises, splits again). Two streams with half the threads each
    overlap those gaps: EfficientNet-Lite0 at 224px, batch 32, bf16 on the 2-core dev machine, 91 -> 101
    images/s. Inference only: results are the same per image, as the batch is only split. ``fn`` runs in
    a worker thread, so it must enter ``torch.inference_mode()`` and autocast itself (both are
    thread-local). On a GPU, or with one thread, ``run`` is ``fn(x)``. torch's intra-op thread count is
    restored on exit.
    """
    from concurrent.futures import ThreadPoolExecutor

    threads = torch.get_num_threads()
    if device.type != "cpu" or threads < 2:
        yield lambda fn, x: fn(x)
        return
    per = max(1, threads // 2)

    def in_stream(fn: Forward, part: torch.Tensor) -> torch.Tensor:
        torch.set_num_threads(per)  # this thread's OpenMP team size
        return fn(part)

    def run(fn: Forward, x: torch.Tensor) -> torch.Tensor:
        if len(x) < 2:
            return fn(x)
        futures = [pool.submit(in_stream, fn, part) for part in x.chunk(2)]
        return torch.cat([f.result() for f in futures])

    torch.set_num_threads(per)
    try:
        with ThreadPoolExecutor(max_workers=2, thread_name_prefix="infer") as pool:
            yield run
    finally:
        torch.set_num_threads(threads)


# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_GLIBC_MMAP_MAX_DEFAULT = 65536
_GLIBC_TRIM_DEFAULT = 128 * 1024
_heap_lock = threading.Lock()
_heap_depth = 0


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """The C library if it is glibc (it has mallopt and malloc_trim), else None (musl, macOS, Windows)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 - only glibc has it
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        return libc
    except (OSError, AttributeError):
        return None


@contextlib.contextmanager
def reuse_freed_memory(device: torch.device) -> Iterator[bool]:
    """On a CPU with glibc: within the block, freed tensor memory stays in the heap for the next batch.

    Why. glibc serves every allocation above its mmap threshold (at most 32 MB) with a fresh ``mmap`` and
    unmaps it on free, and trims the heap top eagerly. A CPU training step allocates and frees the same
    activation-sized tensors (50 MB for one Lite0 layer at 128px, batch 64) every step, so each one comes
    back as new pages the kernel must fault in and zero: 3.8 million page faults in 27 Lite0 BatchNorm-only
    steps, about a fifth of the step time. With mmap off and trimming at 2 GB the same run took 0.4 million,
    and ran at 110 instead of 88 images/s (``benchmarks/run.py --rows bnonly``); peak memory did not change,
    since the memory is reused rather than added. This is what tcmalloc/jemalloc give PyTorch on CPUs, without
    preloading a library. On exit the defaults are restored and the unused heap is returned to the system,
    so the process does not keep its peak after training. Yields whether the setting was applied.

    ``TRANSFERLAB_MALLOC=default`` in the environment leaves glibc alone. Re-entrant and thread-safe: the
    outermost block restores.
    """
    global _heap_depth
    libc = _glibc() if device.type == "cpu" and os.environ.get("TRANSFERLAB_MALLOC", "") != "default" else None
    if libc is None:
        yield False
        return
    with _heap_lock:
        if _heap_depth == 0:
            libc.mallopt(_M_MMAP_MAX, 0)
            libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)
        _heap_depth += 1
    try:
        yield True
    finally:
        with _heap_lock:
            _heap_depth -= 1
            if _heap_depth == 0:
                libc.mallopt(_M_MMAP_MAX, _GLIBC_MMAP_MAX_DEFAULT)
                libc.mallopt(_M_TRIM_THRESHOLD, _GLIBC_TRIM_DEFAULT)
                libc.malloc_trim(0)


def versions() -> dict[str, str]:
    """Versions that decide the numbers (for provenance in metrics and reports)."""
    import timm  # deliberately lazy: timm takes a second to import, and runtime is imported by every command

    return {
        "transferlab": __version__,
        "torch": torch.__version__,
        "timm": timm.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }
