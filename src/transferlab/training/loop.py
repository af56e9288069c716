"""The training loop: one plain function a person can read top to bottom.

What makes it trustworthy:

* the data order is a permutation drawn from (seed, epoch) and every augmentation from
  (seed, epoch, sample index), so neither the number of DataLoader workers nor an interruption
  changes what the model sees;
* checkpoints (every ``--checkpoint-every`` steps and at each epoch end) hold the model, optimizer,
  step, position inside the epoch and every RNG state, so ``--resume`` continues bit-exactly;
* the epoch kept is chosen on a holdout carved from the training split, and the reported numbers come
  from ``--report-split``, which nothing was chosen on;
* under ``torchrun`` the same code runs DistributedDataParallel, rank 0 alone writes, and evaluation
  gathers every sample exactly once;
* SIGTERM/SIGINT finish the current step and write a checkpoint before stopping, and a NaN/inf loss or
  gradient stops training before the optimizer step; under DDP the ranks agree on both every step, so
  they stop together and none waits forever (tests/reliability).
"""

from __future__ import annotations

import logging
import math
import os
import signal
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm.auto import tqdm

from transferlab.data.augment import TrainTransform, mix_batch, sample_rng, soft_cross_entropy
from transferlab.data.base import ImageSplit
from transferlab.data.batched import ArrayBatches, needs_serial, train_batch
from transferlab.data.decoded import pixel_array
from transferlab.data.transforms import EvalTransform, normalize_batch
from transferlab.errors import ConfigError, TransferlabError
from transferlab.inference.engine import model_outputs
from transferlab.models.cpu_kernels import cpu_training_kernels
from transferlab.models.heads import TransferModel
from transferlab.models.strategies import apply_strategy, param_groups, set_train_mode, unfreeze
from transferlab.runtime import Precision, reuse_freed_memory
from transferlab.training.checkpoint import latest_checkpoint, load_checkpoint, prune_checkpoints, save_checkpoint
from transferlab.training.config import TrainConfig
from transferlab.training.interrupt import GracefulStop, ignore_stop_signals_in_worker, interrupted
from transferlab.training.optim import EarlyStopping, ScheduleSpec, build_optimizer, clip_gradients, lr_factor, set_lr
from transferlab.training.probe import epoch_order

log = logging.getLogger(__name__)


class NonFiniteLossError(TransferlabError):
    """The loss or the gradients became NaN/inf; training stopped before the optimizer step."""


@dataclass(frozen=True)
class _Fault:
    step: int
    rank: int | None
    marker: Path | None = None

    def hits(self, step: int, rank: int) -> bool:
        return step == self.step and (self.rank is None or rank == self.rank)


def _test_faults() -> dict[str, _Fault]:
    """Fault injection for tests/reliability; inert unless one of these variables is set:

    * ``TRANSFERLAB_TEST_NAN_AT_STEP=STEP[:RANK]``: the loss of that (1-based) step becomes NaN, on RANK only
      if given (a fault one DDP rank sees and the other does not);
    * ``TRANSFERLAB_TEST_NAN_GRAD_AT_STEP=STEP``: a gradient of that step becomes NaN after backward (on every
      rank, as a real NaN gradient is after DDP's all-reduce);
    * ``TRANSFERLAB_TEST_CRASH_AT_STEP=STEP:RANK:MARKER``: the process dies (``os._exit(13)``) as that step
      starts, unless MARKER exists; it creates MARKER first, so the crash happens once.

    They exist because a real NaN or a real crash at a chosen step cannot be produced reliably from outside.
    """
    out: dict[str, _Fault] = {}
    forms = {"NAN_AT_STEP": "STEP[:RANK]", "NAN_GRAD_AT_STEP": "STEP", "CRASH_AT_STEP": "STEP:RANK:MARKER"}
    for key, form in forms.items():
        name = f"TRANSFERLAB_TEST_{key}"
        value = os.environ.get(name, "").strip()
        if not value:
            continue
        parts = value.split(":", 2)
        try:
            step = int(parts[0])
            rank = int(parts[1]) if len(parts) > 1 and parts[1] else None
        except ValueError:
            step = rank = -1
        if step < 1 or (rank is not None and rank < 0) or len(parts) > len(form.split(":")):
            raise ConfigError(
                f"{name}={value!r} is not {form} (STEP a step number from 1, RANK a process rank from 0); it is a "
                f"test-only fault injection: unset it for a normal run"
            )
        out[key] = _Fault(step, rank, Path(parts[2]) if len(parts) > 2 else None)
        log.warning("test fault injection active: %s=%s", name, value)
    return out


# ------------------------------------------------------------------------------------------------
# distributed helpers (no-ops in a single process)


@dataclass(frozen=True)
class Dist:
    """Rank and world size; ``world == 1`` outside torchrun."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        """Rank 0 alone writes files and logs progress."""
        return self.rank == 0

    @classmethod
    def from_env(cls) -> Dist:
        """Initialise the process group when launched by torchrun (gloo on CPU, nccl on GPU)."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        import torch.distributed as dist

        if not dist.is_initialized():
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0").strip()
            if attempt not in ("", "0") and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
                # torchrun --max-restarts: the agent keeps one TCPStore across restarts (TCPStore sharing, the
                # default), so a restarted group would read the dead group's addresses from it and fail with
                # "Gloo connectFullMesh failed ... Connection refused". A key prefix per attempt keeps them apart.
                store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, False)
                prefixed = dist.PrefixStore(f"transferlab/attempt_{attempt}", store)
                dist.init_process_group(backend, store=prefixed, rank=int(os.environ["RANK"]), world_size=world)
            else:
                dist.init_process_group(backend)
        return cls(dist.get_rank(), dist.get_world_size())


def _all_reduce_sum(values: list[float], d: Dist) -> list[float]:
    if d.world == 1:
        return values
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


# ------------------------------------------------------------------------------------------------
# data


class EpochSampler(Sampler[int]):
    """A permutation of ``n`` positions from (seed, epoch), sharded ``rank::world``, starting at ``start``.

    ``start`` counts positions of the *global* order already consumed (resume mid-epoch). With
    ``weights`` (balanced sampling) the epoch draws ``n`` positions with replacement instead.
    """

    def __init__(self, n: int, seed: int, *, weights: np.ndarray | None = None, rank: int = 0, world: int = 1) -> None:
        self.n, self.seed, self.weights, self.rank, self.world = n, seed, weights, rank, world
        self.epoch = 0
        self.start = 0

    def order(self, epoch: int) -> np.ndarray:
        """The global order of positions for ``epoch``."""
        if self.weights is None:
            return epoch_order(self.n, self.seed, epoch)
        rng = np.random.default_rng([self.seed, epoch, 8])
        p = self.weights / self.weights.sum()
        return rng.choice(self.n, size=self.n, replace=True, p=p)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Choose the epoch (and the position to start from) before iterating."""
        self.epoch, self.start = epoch, start

    def __iter__(self) -> Iterator[int]:
        order = self.order(self.epoch)
        # Drop a tail so every rank gets the same number of steps (DDP needs equal step counts).
        usable = (len(order) // self.world) * self.world
        order = order[:usable]
        return iter(order[self.start + self.rank : usable : self.world].tolist())

    def __len__(self) -> int:
        usable = (self.n // self.world) * self.world
        return max(0, (usable - self.start) // self.world)


class TrainImages(Dataset):
    """Training samples: ``split[indices[pos]]`` augmented with randomness from (seed, epoch, index)."""

    def __init__(self, split: ImageSplit, indices: np.ndarray, transform: TrainTransform, seed: int) -> None:
        self.split, self.indices, self.transform, self.seed = split, indices, transform, seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, pos: int) -> tuple[torch.Tensor, int, int]:
        i = int(self.indices[pos])
        img = self.transform(self.split.load(i), sample_rng(self.seed, self.epoch, i))
        return img, int(self.split.targets[i]), pos


@dataclass(frozen=True)
class EvalImages:
    """Samples evaluated with the deterministic eval transform (the engine loads and batches them)."""

    split: ImageSplit
    indices: np.ndarray
    transform: EvalTransform

    def __len__(self) -> int:
        return len(self.indices)


# ------------------------------------------------------------------------------------------------
# evaluation (exact under DDP: every sample once, gathered in order)


def predict(
    model: nn.Module,
    data: EvalImages,
    *,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    precision: Precision,
    device: torch.device,
    batch_size: int,
    workers: int,
    d: Dist,
    progress: bool | None = None,
) -> np.ndarray:
    """Logits for every sample of ``data`` in order, through the inference engine (folded BatchNorm, two
    streams, heap reuse); each rank computes ``rank::world`` and every rank gets them all, gathered."""
    mine = np.arange(d.rank, len(data), d.world)
    logits = model_outputs(
        model,
        data.split,
        data.transform,
        mean=mean,
        std=std,
        indices=np.asarray(data.indices)[mine],
        precision=precision,
        device=device,
        batch_size=batch_size,
        workers=workers,
        progress=progress if d.main else False,
        desc="eval",
        worker_init_fn=ignore_stop_signals_in_worker,
    )
    if d.world > 1:
        import torch.distributed as dist  # lazy: torch.distributed only under torchrun

        gathered: list[Any] = [None] * d.world
        dist.all_gather_object(gathered, (mine, logits))
        log_all = np.concatenate([g[1] for g in gathered if len(g[1])])
        out = np.empty((len(data), log_all.shape[1]), dtype=np.float32)
        out[np.concatenate([g[0] for g in gathered])] = log_all
        return out
    return logits


def _maybe_compile(model: nn.Module, enabled: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    """``torch.compile(model)`` for ``--compile``, else the model itself (its parameters are shared either way)."""
    if not enabled:
        return model
    log.info("compiling the training forward pass with torch.compile (the first steps include the compile)")
    return torch.compile(model)  # type: ignore[return-value]


def _score(logits: np.ndarray, targets: np.ndarray) -> tuple[float, float]:
    t = torch.from_numpy(logits)
    y = torch.from_numpy(targets.astype(np.int64))
    return float(F.cross_entropy(t, y)), float((t.argmax(1) == y).float().mean())


# ------------------------------------------------------------------------------------------------
# the loop


@dataclass
class FitData:
    """What the loop trains and selects on."""

    train: TrainImages
    holdout: EvalImages
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_weights: torch.Tensor | None = None
    sample_weights: np.ndarray | None = None


@dataclass
class FitResult:
    """History and the epoch whose weights were kept."""

    history: list[dict[str, float]]
    best_epoch: int
    steps: list[dict[str, float]]
    stopped_early: bool


def fit(  # noqa: C901, PLR0915
    model: TransferModel,
    data: FitData,
    cfg: TrainConfig,
    *,
    run_dir: Path,
    precision: Precision,
    device: torch.device,
    workers: int,
    d: Dist | None = None,
    callback: Callable[[str, dict[str, float]], None] | None = None,
    stop: GracefulStop | None = None,
) -> FitResult:
    """Train ``model`` under ``cfg`` and leave the best epoch's weights in it.

    Checkpoints go to ``run_dir/checkpoints`` (``step-*``, ``last``, ``best``); with ``cfg.resume`` the
    newest complete one is continued exactly. ``callback(kind, row)`` sees every ``"step"`` row (as in
    steps.csv) and ``"epoch"`` row (as in history.csv) on rank 0 as it is recorded, e.g. for TensorBoard.

    ``stop`` (a :class:`~transferlab.training.interrupt.GracefulStop` the caller has entered) is read after every
    optimizer step and at each epoch end: once SIGTERM/SIGINT has arrived, a checkpoint is written and
    :class:`~transferlab.errors.TrainingInterrupted` raised. A NaN/inf loss or gradient raises
    :class:`NonFiniteLossError` before the optimizer step, so no checkpoint ever holds non-finite weights.
    """
    # On a CPU in bf16, strided depthwise layers compute their backward in fp32 and ReLU6 keeps its output
    # instead of a clone: same values, ~35% faster BatchNorm-only steps on EfficientNet (models/cpu_kernels.py).
    # Parameters are shared, so the optimizer, checkpoints and DDP see the same tensors; the original layers
    # are back on return. reuse_freed_memory: glibc keeps freed activations for the next step instead of
    # returning them to the kernel and faulting them back in (88 -> 110 img/s on the same step).
    with reuse_freed_memory(device) as heap, cpu_training_kernels(model, precision.dtype, device) as swapped:
        if heap:
            log.info("CPU memory: freed tensors stay in the heap for reuse (TRANSFERLAB_MALLOC=default opts out)")
        if swapped:
            log.info(
                "CPU bf16 training kernels: %d strided depthwise convolution(s) with an fp32 backward, "
                "%d ReLU6 keeping their output for backward",
                swapped.get("FastStridedDepthwise", 0),
                swapped.get("FastReLU6", 0),
            )

        d = d or Dist()
        spec = cfg.strategy_spec()
        ckpt_dir = run_dir / "checkpoints"
        model.to(device)
        if precision.channels_last:
            model.to(memory_format=torch.channels_last)
        apply_strategy(model, spec)

        steps_per_epoch = math.ceil(len(EpochSampler(len(data.train), cfg.seed, world=d.world)) / cfg.batch_size)
        opt_steps_per_epoch = math.ceil(steps_per_epoch / cfg.accum_steps)
        total_opt_steps = opt_steps_per_epoch * cfg.epochs
        schedule = ScheduleSpec(cfg.schedule, warmup_steps=cfg.warmup_steps, step_size=cfg.step_size, gamma=cfg.gamma)
        stopper = EarlyStopping(cfg.early_stop, patience=cfg.patience)

        # State that a checkpoint carries besides model/optimizer/RNG.
        state: dict[str, Any] = {
            "epoch": 0,
            "pos": 0,
            "step": 0,
            "opt_step": 0,
            "sums": [0.0, 0.0, 0.0],
            "history": [],
            "steps": [],
            "early_stop": stopper.state_dict(),
            "unfrozen": False,
            "accum": 0,
        }
        resume_from = latest_checkpoint(ckpt_dir, prefix="") if cfg.resume else None
        if resume_from is not None:
            peek = load_checkpoint(ckpt_dir, resume_from, restore_rng=False)
            if peek.state.get("unfrozen"):
                unfreeze(model, spec)

        def make_optimizer() -> torch.optim.Optimizer:
            return build_optimizer(param_groups(model, spec, cfg.lr), cfg.optimizer, cfg.lr, cfg.weight_decay)

        optimizer = make_optimizer()
        # fp16 needs loss scaling against gradient underflow; bf16 and fp32 do not (the scaler is then a no-op).
        scaler = torch.amp.GradScaler(device.type, enabled=precision.dtype == torch.float16)
        if resume_from is not None:
            ck = load_checkpoint(ckpt_dir, resume_from, optimizer=optimizer, restore_rng=True)
            model.load_state_dict(ck.model_state)
            if ck.scaler_state and scaler.is_enabled():
                scaler.load_state_dict(ck.scaler_state)
            state = ck.state
            if not d.main:
                state["sums"] = [0.0, 0.0, 0.0]
            stopper.load_state_dict(state["early_stop"])
            log.info(
                "resuming from %s: epoch %d, position %d, step %d", ck.path, state["epoch"], state["pos"], state["step"]
            )
        elif cfg.resume:
            log.info("--resume: no checkpoint in %s, starting fresh", ckpt_dir)

        ddp_model: nn.Module = model
        if d.world > 1:
            ddp_model = nn.parallel.DistributedDataParallel(model, find_unused_parameters=False)
        fwd = _maybe_compile(ddp_model, cfg.compile)
        pixels = pixel_array(data.train.split)
        log.info(
            "input pipeline: %s",
            "decoded cache, batched tensor resize/augmentation"
            if pixels is not None
            else f"PIL per image in {workers} DataLoader worker(s)",
        )

        sampler = EpochSampler(len(data.train), cfg.seed, weights=data.sample_weights, rank=d.rank, world=d.world)
        disable = (None if cfg.progress is None else not cfg.progress) if d.main else True
        mix = cfg.mixup > 0 or cfg.cutmix > 0

        def checkpoint(name: str) -> None:
            # Every rank takes part: the running train-loss sums are per rank, the checkpoint keeps their total
            # (and on resume only rank 0 starts from it, the others from zero).
            snapshot = {**state, "sums": _all_reduce_sum(state["sums"], d), "early_stop": stopper.state_dict()}
            if d.main:
                save_checkpoint(
                    ckpt_dir,
                    name,
                    model_state=model.state_dict(),
                    optimizer=optimizer,
                    scaler_state=scaler.state_dict() if scaler.is_enabled() else None,
                    state=snapshot,
                )
            if d.world > 1:
                import torch.distributed as dist

                dist.barrier()

        faults = _test_faults()

        def agree(nonfinite: bool) -> tuple[bool, bool]:
            """(some rank's loss is not finite, some rank was asked to stop), the same on every rank.

            One tiny all-reduce per step under DDP: a NaN that one rank sees, or a signal that reaches one rank
            first, must stop all of them at the same step, or the others would wait forever in the next
            collective. No-op in a single process.
            """
            asked = stop is not None and stop.requested is not None
            if d.world == 1:
                return nonfinite, asked
            import torch.distributed as dist

            dev = device if dist.get_backend() == "nccl" else torch.device("cpu")
            t = torch.tensor([float(nonfinite), float(asked)], device=dev)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            return bool(t[0] > 0), bool(t[1] > 0)

        def stop_after(name: str, *, written: bool, epoch: int) -> None:
            """Write checkpoint ``name`` unless it was just written, then raise TrainingInterrupted."""
            if not written:
                checkpoint(name)
                if d.main:
                    prune_checkpoints(ckpt_dir, "step-", keep=cfg.keep_checkpoints)
            # A rank the signal has not reached yet (DDP) reports SIGTERM, what torchrun's agent sends.
            signum = stop.requested if stop is not None and stop.requested is not None else int(signal.SIGTERM)
            raise interrupted(signum, state["step"], epoch, str(ckpt_dir / name))

        def optimizer_step() -> None:
            scaler.unscale_(optimizer)  # clip and check the true gradients, not the fp16-scaled ones
            trainable = [p for p in model.parameters() if p.requires_grad]
            if "NAN_GRAD_AT_STEP" in faults and faults["NAN_GRAD_AT_STEP"].step == state["step"]:
                next(p for p in trainable if p.grad is not None).grad.view(-1)[0] = float("nan")
            norm = clip_gradients(trainable, cfg.clip_grad)
            if norm is None and not scaler.is_enabled():
                # Checked even without clipping: one NaN gradient turns every weight it touches into NaN, and
                # the next checkpoint would save them. After DDP's all-reduce every rank holds the same gradients,
                # so every rank stops here together.
                grads = [p.grad for p in trainable if p.grad is not None]
                norm = float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0
            # With fp16 loss scaling an overflow is expected now and then: the scaler skips that step.
            if norm is not None and not math.isfinite(norm) and not scaler.is_enabled():
                raise NonFiniteLossError(
                    f"the gradient norm became {norm} at step {state['step']}; stopped before the "
                    "optimizer step, the last checkpoint is intact"
                )
            set_lr(optimizer, lr_factor(state["opt_step"], total_opt_steps, schedule))
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            state["opt_step"] += 1
            state["accum"] = 0

        for epoch in range(state["epoch"], cfg.epochs):
            if spec.name == "freeze-unfreeze" and epoch >= (spec.unfreeze_epoch or 0) and not state["unfrozen"]:
                unfreeze(model, spec)
                state["unfrozen"] = True
                optimizer = make_optimizer()
                if d.world > 1:
                    ddp_model = nn.parallel.DistributedDataParallel(model, find_unused_parameters=False)
                fwd = _maybe_compile(ddp_model, cfg.compile)
            set_train_mode(model, spec)
            data.train.epoch = epoch
            sampler.set_epoch(epoch, state["pos"])
            loader: Iterable[Any]
            if pixels is not None:
                # The same positions the DataLoader would visit, as whole batches gathered from the decoded
                # array and augmented with the same per-sample draws (see transferlab.data.batched).
                loader = ArrayBatches(
                    pixels,
                    data.train.split.targets,
                    data.train.indices,
                    list(sampler),
                    cfg.batch_size,
                    lambda u8, idx, epoch=epoch: train_batch(
                        u8,
                        data.train.transform,
                        data.train.seed,
                        epoch,
                        idx,
                        norm=(data.mean, data.std),
                        channels_last=precision.channels_last,
                    ),
                    device,
                    prefetch=False if needs_serial(data.train.transform) else None,
                )
            else:
                loader = DataLoader(
                    data.train,
                    batch_size=cfg.batch_size,
                    sampler=sampler,
                    num_workers=workers,
                    generator=torch.Generator().manual_seed(cfg.seed),
                    persistent_workers=False,
                    worker_init_fn=ignore_stop_signals_in_worker if workers else None,
                )
            t0 = time.perf_counter()
            bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="step", leave=False, disable=disable)
            for x, y, _ in bar:
                if "CRASH_AT_STEP" in faults and faults["CRASH_AT_STEP"].hits(state["step"] + 1, d.rank):
                    marker = faults["CRASH_AT_STEP"].marker
                    if marker is None or not marker.exists():
                        if marker is not None:
                            marker.touch()
                        log.error("test fault injection: crashing at step %d on rank %d", state["step"] + 1, d.rank)
                        os._exit(13)
                x = x.to(device, non_blocking=True)
                if pixels is None:  # the batched path standardised at the stored size already
                    x = normalize_batch(x, data.mean, data.std, channels_last=precision.channels_last)
                y = y.to(device)
                if mix:
                    gen = torch.Generator().manual_seed(
                        int(np.random.SeedSequence([cfg.seed, epoch, state["step"]]).generate_state(1)[0])
                    )
                    x, soft = mix_batch(
                        x,
                        y,
                        data.num_classes,
                        mixup_alpha=cfg.mixup,
                        cutmix_alpha=cfg.cutmix,
                        label_smoothing=cfg.label_smoothing,
                        generator=gen,
                    )
                with precision.autocast():
                    logits = fwd(x)
                logits = logits.float()
                if mix:
                    loss = soft_cross_entropy(logits, soft)
                else:
                    loss = F.cross_entropy(logits, y, weight=data.class_weights, label_smoothing=cfg.label_smoothing)
                if "NAN_AT_STEP" in faults and faults["NAN_AT_STEP"].hits(state["step"] + 1, d.rank):
                    loss = loss * float("nan")
                local_bad = not bool(torch.isfinite(loss))
                any_bad, asked_to_stop = agree(local_bad)
                if any_bad:
                    what = "the loss became NaN/inf on another rank"
                    if local_bad:
                        what = f"the loss became {float(loss.detach())}"
                    raise NonFiniteLossError(
                        f"{what} at step {state['step'] + 1} (epoch {epoch + 1}); stopped before the optimizer "
                        f"step, the last checkpoint in {ckpt_dir} is intact. Lower --lr, set --clip-grad, or use "
                        "--precision fp32"
                    )
                scaler.scale(loss / cfg.accum_steps).backward()
                state["step"] += 1
                n = len(y)
                hits = float((logits.argmax(1) == y).sum())
                state["sums"] = [
                    state["sums"][0] + float(loss.detach()) * n,
                    state["sums"][1] + hits,
                    state["sums"][2] + n,
                ]
                state["pos"] += n * d.world
                state["accum"] += 1
                if state["accum"] == cfg.accum_steps:
                    optimizer_step()
                state["steps"].append(
                    {
                        "step": state["step"],
                        "epoch": epoch + 1,
                        "loss": float(loss.detach()),
                        "lr": optimizer.param_groups[-1]["lr"],
                    }
                )
                if callback is not None and d.main:
                    callback("step", state["steps"][-1])
                bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
                # Checkpoints only fall between optimizer steps: accumulated gradients are never lost.
                if cfg.checkpoint_every and state["step"] % cfg.checkpoint_every == 0 and state["accum"] == 0:
                    checkpoint(f"step-{state['step']:08d}")
                    if d.main:
                        prune_checkpoints(ckpt_dir, "step-", keep=cfg.keep_checkpoints)
                if d.world == 1:  # a single process may look again: a signal during this step counts
                    asked_to_stop = stop is not None and stop.requested is not None
                if asked_to_stop and state["accum"] == 0:
                    every = cfg.checkpoint_every
                    written = bool(every) and state["step"] % every == 0
                    stop_after(f"step-{state['step']:08d}", written=written, epoch=epoch + 1)
            if state["accum"]:
                optimizer_step()  # the epoch's last, partial accumulation
            secs = time.perf_counter() - t0
            loss_sum, hit_sum, count = _all_reduce_sum(state["sums"], d)
            hold_logits = predict(
                model,
                data.holdout,
                mean=data.mean,
                std=data.std,
                precision=precision,
                device=device,
                batch_size=cfg.batch_size,
                workers=workers,
                d=d,
                progress=cfg.progress,
            )
            hold_targets = data.holdout.split.targets[data.holdout.indices]
            val_loss, val_acc = _score(hold_logits, hold_targets)
            row = {
                "epoch": epoch + 1,
                "train_loss": loss_sum / max(count, 1),
                "train_acc": hit_sum / max(count, 1),
                "val_loss": val_loss,
                "val_acc": val_acc,
                "lr": optimizer.param_groups[-1]["lr"],
                "seconds": secs,
                "images_per_s": (count - 0) / max(secs, 1e-9),
            }
            state["history"].append(row)
            if callback is not None and d.main:
                callback("epoch", row)
            if d.main:
                log.info(
                    "epoch %d/%d: train loss %.4f acc %.4f | holdout loss %.4f acc %.4f | %.0f img/s",
                    epoch + 1,
                    cfg.epochs,
                    row["train_loss"],
                    row["train_acc"],
                    val_loss,
                    val_acc,
                    row["images_per_s"],
                )
            improved = stopper.update(val_loss if cfg.early_stop == "val_loss" else val_acc, epoch + 1)
            state.update(epoch=epoch + 1, pos=0, sums=[0.0, 0.0, 0.0])
            if improved:
                checkpoint("best")
            checkpoint("last")
            if agree(False)[1]:
                stop_after("last", written=True, epoch=epoch + 1)
            if stopper.should_stop:
                log.info(
                    "early stopping after epoch %d: no improvement of %s for %s epochs",
                    epoch + 1,
                    cfg.early_stop,
                    cfg.patience,
                )
                break

        best = load_checkpoint(ckpt_dir, "best", restore_rng=False)
        model.load_state_dict(best.model_state)
        return FitResult(
            history=state["history"],
            best_epoch=stopper.best_epoch or len(state["history"]),
            steps=state["steps"],
            stopped_early=stopper.should_stop,
        )
