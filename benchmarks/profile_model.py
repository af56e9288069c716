"""Model-only throughput behind the benchmark's eval and bn-only rows: what each fast path buys on its own.

``python benchmarks/profile_model.py`` (random inputs, no data, about 2 minutes on 2 cores) prints images/s for

* inference at 224px, batch 32: the model as loaded, bf16 autocast + channels_last; then with BatchNorm
  folded (:func:`transferlab.models.fold.inference_copy`); then folded and run as two streams
  (:func:`transferlab.runtime.inference_streams`);
* one BatchNorm-only training step with the seed head at 128px, batch 64, RMSProp: fp32 NCHW (the
  baseline's numerics), fp32 channels_last, bf16 channels_last, and bf16 channels_last with the CPU
  training kernels of :mod:`transferlab.models.cpu_kernels` (transferlab's default where the CPU has bf16).

Repeats alternate between the variants and the median is printed, so a busy neighbour affects all alike.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from transferlab.models.backbones import create_backbone
from transferlab.models.cpu_kernels import cpu_training_kernels
from transferlab.models.fold import inference_copy
from transferlab.models.heads import TransferModel
from transferlab.models.strategies import apply_strategy, set_train_mode
from transferlab.runtime import inference_streams, resolve_precision
from transferlab.training.config import TrainConfig

CPU = torch.device("cpu")


def _rate(fn: Callable[[], None], images: int, iters: int) -> float:
    fn()  # warm-up: oneDNN builds its primitives on the first call
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return images * iters / (time.perf_counter() - t0)


def inference(model_name: str, repeats: int) -> dict[str, float]:
    precision = resolve_precision("auto", "auto", CPU)
    model = create_backbone(model_name, "auto").model.eval().to(memory_format=torch.channels_last)
    folded = inference_copy(model, 224, CPU, channels_last=True)
    x = torch.randn(32, 3, 224, 224).contiguous(memory_format=torch.channels_last)

    def forward(m: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
        def run(t: torch.Tensor) -> torch.Tensor:
            with torch.inference_mode(), precision.autocast():
                return m(t)

        return run

    def streams() -> None:
        with inference_streams(CPU) as run:
            run(forward(folded), x)

    variants = {
        "as loaded": lambda: forward(model)(x),
        "BatchNorm folded": lambda: forward(folded)(x),
        "folded + two streams": streams,
    }
    rates: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            rates[name].append(_rate(fn, 32, 3))
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
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    print(f"inference @224, batch 32, {resolve_precision('auto', 'auto', CPU).describe()}:")
    for name, rate in inference(args.model, args.repeats).items():
        print(f"  {name:24s} {rate:7.1f} img/s")
    print("bn-only training step @128, batch 64 (seed head, RMSProp):")
    for name, rate in bn_only_step(args.model, args.repeats).items():
        print(f"  {name:24s} {rate:7.1f} img/s")


if __name__ == "__main__":
    main()
