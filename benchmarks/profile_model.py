"""Model-only throughput behind the benchmark's eval and bn-only rows: what each fast path buys on its own.

``python benchmarks/profile_model.py`` (about 5 minutes on 2 cores; ``--skip-train`` for inference only) prints
images/s for

* inference at ``--size`` (224), batch 32, over the first ``--images`` (512) real images of the mini val split,
  resized and standardised as the engine does (the decoded cache), for each candidate backend:

  - torch as loaded, bf16 autocast + channels_last where the CPU has bf16 (else fp32);
  - torch with BatchNorm folded (:func:`transferlab.models.fold.inference_copy`) and two streams
    (:func:`transferlab.runtime.inference_streams`): ``--backend torch``;
  - ``torch.compile`` (inductor, ``freezing``) of the folded model, one stream (``--compile``; compiling
    takes minutes on 2 cores and is reported apart);
  - OpenVINO fp32 and bf16 with one and two streams, two streams as the engine runs them (each half batch in
    its own thread and infer request: ``--backend openvino``) and as an ``AsyncInferQueue`` of whole batches;
  - with ``--int8``: OpenVINO int8 after NNCF post-training quantisation on ``--calib`` (300) train images,
    accepted only when its top-1 over ``--int8-eval`` (5,000) val images is within 0.3 pt of OpenVINO fp32's
    (zero-shot through the dataset's ImageNet classes), which is printed;

* one BatchNorm-only training step with the seed head at 128px, batch 64, RMSProp: fp32 NCHW (the
  baseline's numerics), fp32 channels_last, bf16 channels_last, and bf16 channels_last with the CPU
  training kernels of :mod:`transferlab.models.cpu_kernels` (transferlab's default where the CPU has bf16).

Repeats alternate between the variants and the median is printed, so a busy neighbour affects all alike.
Needs the mini dataset (``TRANSFERLAB_DATA``) and its decoded cache (built on first use).
"""

from __future__ import annotations

import argparse
import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from transferlab.data import open_dataset
from transferlab.data.batched import eval_batch
from transferlab.data.decoded import decode_split, pixel_array
from transferlab.data.resolve import cache_dir
from transferlab.inference.engine import make_eval_transform
from transferlab.inference.openvino import OpenVinoRunner, _compile, _convert
from transferlab.labels import imagenet_indices
from transferlab.models.backbones import create_backbone
from transferlab.models.cpu_kernels import cpu_training_kernels
from transferlab.models.fold import inference_copy
from transferlab.models.heads import TransferModel
from transferlab.models.strategies import apply_strategy, set_train_mode
from transferlab.runtime import Precision, inference_streams, resolve_precision
from transferlab.training.config import TrainConfig

CPU = torch.device("cpu")
FP32 = Precision(dtype=None, channels_last=True, device_type="cpu")
BATCH = 32
#: int8 is accepted only this close to fp32 (top-1 points).
INT8_MAX_DROP_PT = 0.3


def cpu_name() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8")
    except OSError:
        return "unknown CPU"
    m = re.search(r"model name\s*:\s*(.+)", text)
    flags = [f for f in ("avx512_bf16", "amx_bf16", "avx512_vnni", "avx2") if f in text]
    return f"{m.group(1).strip() if m else 'unknown CPU'}, {torch.get_num_threads()} threads ({', '.join(flags)})"


def _rate(fn: Callable[[], None], images: int, iters: int) -> float:
    fn()  # warm-up: oneDNN builds its primitives on the first call
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return images * iters / (time.perf_counter() - t0)


def real_batches(model_name: str, size: int, split_name: str, n: int, offset: int = 0) -> tuple[list, np.ndarray, list]:
    """The first ``n`` images of the mini ``split_name``, as the engine feeds them (standardised, channels_last,
    batches of 32), with their targets and the dataset's ImageNet columns."""
    source = open_dataset("tiny-imagenet-mini")
    split = decode_split(source.split(split_name), cache_dir())
    pixels = pixel_array(split)
    assert pixels is not None
    pre = create_backbone(model_name, "auto").preprocessing
    tf = make_eval_transform(pre, size)
    idx = np.arange(offset, min(offset + n, len(split)))
    batches = []
    for s in range(0, len(idx), BATCH):
        u8 = torch.from_numpy(np.ascontiguousarray(pixels[idx[s : s + BATCH]])).permute(0, 3, 1, 2)
        batches.append(eval_batch(u8, tf, norm=(pre.mean, pre.std), channels_last=True))
    return batches, split.targets[idx], list(imagenet_indices(source.classes.ids))


def _torch(m: torch.nn.Module, precision: Precision) -> Callable[[torch.Tensor], torch.Tensor]:
    def fwd(t: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode(), precision.autocast():
            return m(t).float()

    return fwd


def _ov(ov_model: object, precision: Precision, streams: int) -> tuple[OpenVinoRunner, object]:
    threads = torch.get_num_threads()
    compiled = _compile(ov_model, precision, True, streams, threads)
    return OpenVinoRunner(compiled, nhwc=True, fwd="logits", info={}), compiled


def _queue(compiled: object, batches: list) -> Callable[[], None]:
    import openvino as ov

    def go() -> None:
        q = ov.AsyncInferQueue(compiled, 2)
        for b in batches:
            q.start_async({0: np.ascontiguousarray(b.permute(0, 2, 3, 1).numpy())})
        q.wait_all()

    return go


def _over(fn: Callable[[torch.Tensor], torch.Tensor], batches: list, streams: bool = False) -> Callable[[], None]:
    """One pass over ``batches``; with ``streams`` as the engine runs it (each half batch in its own thread)."""

    def go() -> None:
        if not streams:
            for b in batches:
                fn(b)
            return
        with inference_streams(CPU) as run:
            for b in batches:
                run(fn, b)

    return go


def int8_model(model_name: str, ov_model: object, size: int, calib: int) -> object:
    """NNCF post-training quantisation of ``ov_model`` on the first ``calib`` images of a seeded train shuffle."""
    import nncf

    source = open_dataset("tiny-imagenet-mini")
    split = decode_split(source.split("train"), cache_dir())
    pixels = pixel_array(split)
    pre = create_backbone(model_name, "auto").preprocessing
    tf = make_eval_transform(pre, size)
    idx = np.sort(np.random.default_rng(0).permutation(len(split))[:calib])
    items = []
    for s in range(0, len(idx), BATCH):
        u8 = torch.from_numpy(np.ascontiguousarray(pixels[idx[s : s + BATCH]])).permute(0, 3, 1, 2)
        items.append(eval_batch(u8, tf, norm=(pre.mean, pre.std)).contiguous().numpy())
    return nncf.quantize(ov_model, nncf.Dataset(items), subset_size=calib)


def top1(run: Callable[[torch.Tensor], torch.Tensor], batches: list, targets: np.ndarray, cols: list) -> float:
    preds = np.concatenate([run(b)[:, cols].argmax(1).numpy() for b in batches])
    return float((preds == targets[: len(preds)]).mean())


def inference(args: argparse.Namespace) -> dict[str, float]:
    precision = resolve_precision("auto", "auto", CPU)
    model = create_backbone(args.model, "auto").model.eval().to(memory_format=torch.channels_last)
    folded = inference_copy(model, args.size, CPU, channels_last=True)
    batches, _, _ = real_batches(args.model, args.size, "val", args.images)
    n = sum(len(b) for b in batches)
    variants: dict[str, Callable[[], None]] = {
        f"torch as loaded ({precision.name})": _over(_torch(model, precision), batches),
        f"torch folded + 2 streams ({precision.name})": _over(_torch(folded, precision), batches, streams=True),
    }
    if args.compile:
        import torch._inductor.config as inductor

        inductor.freezing = True
        compiled_torch = torch.compile(folded, backend="inductor")
        t0 = time.perf_counter()
        _torch(compiled_torch, precision)(batches[0])
        print(f"  (torch.compile inductor freezing: first call {time.perf_counter() - t0:.0f} s)")
        variants[f"torch.compile inductor freezing ({precision.name})"] = _over(
            _torch(compiled_torch, precision), batches
        )
    t0 = time.perf_counter()
    ov_model = _convert(model, None, args.size)
    print(f"  (OpenVINO conversion {time.perf_counter() - t0:.1f} s)")
    precisions = [FP32] + ([precision] if precision.dtype is not None else [])
    keep = []
    for p in precisions:
        one, _ = _ov(ov_model, p, 1)
        two, compiled2 = _ov(ov_model, p, 2)
        keep += [one, two]
        variants[f"OpenVINO {p.name} 1 stream"] = _over(one, batches)
        variants[f"OpenVINO {p.name} 2 streams (engine)"] = _over(two, batches, streams=True)
        variants[f"OpenVINO {p.name} 2 streams (async queue)"] = _queue(compiled2, batches)
    if args.int8:
        q8 = int8_model(args.model, ov_model, args.size, args.calib)
        r8, _ = _ov(q8, precision, 2)  # int8 where quantised, the rest in the CPU's best float precision
        variants[f"OpenVINO int8 (NNCF, rest {precision.name}) 2 streams (engine)"] = _over(r8, batches, streams=True)
        fp32_runner, _ = _ov(ov_model, FP32, 2)
        ev, targets, cols = real_batches(args.model, args.size, "val", args.int8_eval)
        a32 = top1(fp32_runner, ev, targets, cols)
        a8 = top1(r8, ev, targets, cols)
        ok = abs(a8 - a32) * 100 <= INT8_MAX_DROP_PT
        print(
            f"  int8 top-1 {100 * a8:.2f}% vs fp32 {100 * a32:.2f}% on {len(targets)} val images: "
            f"{'accepted' if ok else 'REJECTED'} (within {INT8_MAX_DROP_PT} pt required)"
        )
    rates: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(args.repeats):
        for name, fn in variants.items():
            rates[name].append(_rate(fn, n, 1))
    return {name: statistics.median(v) for name, v in rates.items()}


def bn_only_step(model_name: str, repeats: int) -> dict[str, float]:
    cfg = TrainConfig(model=model_name, data="-", out="-", strategy="bn-only", head="seed", optimizer="rmsprop")
    x = torch.randn(64, 3, 128, 128)
    y = torch.randint(0, 200, (64,))

    alive: list[object] = []

    def make(bf16: bool, cl: bool, kernels: bool = False) -> Callable[[], None]:
        model = TransferModel.from_backbone(create_backbone(model_name, "auto").model, cfg.head_spec(), 200)
        spec = cfg.strategy_spec()
        apply_strategy(model, spec)
        set_train_mode(model, spec)
        inp = x
        if cl:
            model = model.to(memory_format=torch.channels_last)
            inp = x.contiguous(memory_format=torch.channels_last)
        opt = torch.optim.RMSprop([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        if kernels:  # swapped for good in this throwaway model (train() swaps them back after fitting)
            swap = cpu_training_kernels(model, torch.bfloat16, CPU)
            swap.__enter__()
            alive.append(swap)  # a dropped context would close its generator, which swaps the layers back

        def step() -> None:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                out = model(inp)
            F.cross_entropy(out.float(), y).backward()
            opt.step()
            opt.zero_grad()

        return step

    variants = {"fp32 NCHW": make(False, False), "fp32 channels_last": make(False, True)}
    if resolve_precision("auto", "auto", CPU).dtype is not None:
        variants["bf16 channels_last"] = make(True, True)
        variants["bf16 cl + CPU kernels"] = make(True, True, kernels=True)
    rates: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            rates[name].append(_rate(fn, 64, 3))
    return {name: statistics.median(v) for name, v in rates.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--model", default="tf_efficientnet_lite0")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--images", type=int, default=512, help="real val images per timed pass (default: 512)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--compile", action="store_true", help="also torch.compile (inductor, freezing): minutes")
    p.add_argument("--int8", action="store_true", help="also NNCF int8, with its top-1 check against fp32")
    p.add_argument("--calib", type=int, default=300, help="int8 calibration images from train (default: 300)")
    p.add_argument("--int8-eval", type=int, default=5000, help="val images for the int8 top-1 check (default: 5000)")
    p.add_argument("--skip-train", action="store_true", help="inference candidates only")
    args = p.parse_args()
    print(f"CPU: {cpu_name()}")
    print(f"inference {args.model} @{args.size}, batch {BATCH}, {args.images} real val images per pass:")
    for name, rate in inference(args).items():
        print(f"  {name:44s} {rate:7.1f} img/s")
    if args.skip_train:
        return
    print("bn-only training step @128, batch 64 (seed head, RMSProp):")
    for name, rate in bn_only_step(args.model, args.repeats).items():
        print(f"  {name:24s} {rate:7.1f} img/s")


if __name__ == "__main__":
    main()
