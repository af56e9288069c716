"""The training loop: :func:`fit`, which reads top to bottom as its named steps (start, each epoch's steps,
the holdout pass, the epoch-end checkpoints, early stopping) around one :class:`FitState`.

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
from dataclasses import dataclass, field, fields
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
from transferlab.errors import TransferlabError
from transferlab.inference.engine import model_outputs
from transferlab.models.cpu_kernels import cpu_training_kernels
from transferlab.models.heads import TransferModel
from transferlab.models.strategies import apply_strategy, param_groups, set_train_mode, unfreeze
from transferlab.runtime import Precision, reuse_freed_memory
from transferlab.training.checkpoint import latest_checkpoint, load_checkpoint, prune_checkpoints, save_checkpoint
from transferlab.training.config import TrainConfig
from transferlab.training.hooks import FitHooks
from transferlab.training.interrupt import GracefulStop, ignore_stop_signals_in_worker, interrupted
from transferlab.training.optim import EarlyStopping, ScheduleSpec, build_optimizer, clip_gradients, lr_factor, set_lr
from transferlab.training.probe import epoch_order

log = logging.getLogger(__name__)


class NonFiniteLossError(TransferlabError):
    """The loss or the gradients became NaN/inf; training stopped before the optimizer step."""


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


@dataclass
class FitState:
    """Where training is: what a checkpoint carries besides the model, optimizer, loss scaler, early-stopping
    record and RNG states, so a resumed run continues exactly.

    ``pos`` counts the positions of the epoch's global data order already consumed (by every rank), ``sums``
    this rank's running (loss x n, correct, n) since the epoch began, ``accum`` the backward passes since the
    last optimizer step; ``step`` counts batches and ``opt_step`` optimizer steps, from the start of training.
    """

    epoch: int = 0
    pos: int = 0
    step: int = 0
    opt_step: int = 0
    sums: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])
    history: list[dict[str, float]] = field(default_factory=list)
    steps: list[dict[str, float]] = field(default_factory=list)
    unfrozen: bool = False
    accum: int = 0

    def to_checkpoint(self, sums: list[float], early_stop: dict[str, Any]) -> dict[str, Any]:
        """The checkpoint's ``state``, with the ranks' summed ``sums`` and the early-stopping record."""
        return {
            "epoch": self.epoch,
            "pos": self.pos,
            "step": self.step,
            "opt_step": self.opt_step,
            "sums": sums,
            "history": self.history,
            "steps": self.steps,
            "early_stop": early_stop,
            "unfrozen": self.unfrozen,
            "accum": self.accum,
        }

    @classmethod
    def from_checkpoint(cls, state: dict[str, Any]) -> FitState:
        """The state a checkpoint's ``state`` holds (its ``early_stop`` goes to :class:`EarlyStopping`)."""
        return cls(**{f.name: state[f.name] for f in fields(cls)})


def fit(
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
    hooks: FitHooks | None = None,
) -> FitResult:
    """Train ``model`` under ``cfg`` and leave the best epoch's weights in it.

    Checkpoints go to ``run_dir/checkpoints`` (``step-*``, ``last``, ``best``); with ``cfg.resume`` the
    newest complete one is continued exactly. ``callback(kind, row)`` sees every ``"step"`` row (as in
    steps.csv) and ``"epoch"`` row (as in history.csv) on rank 0 as it is recorded, e.g. for TensorBoard.

    ``stop`` (a :class:`~transferlab.training.interrupt.GracefulStop` the caller has entered) is read after every
    optimizer step and at each epoch end: once SIGTERM/SIGINT has arrived, a checkpoint is written and
    :class:`~transferlab.errors.TrainingInterrupted` raised. A NaN/inf loss or gradient raises
    :class:`NonFiniteLossError` before the optimizer step, so no checkpoint ever holds non-finite weights.

    ``hooks`` (a :class:`~transferlab.training.hooks.FitHooks`, by default one that does nothing) is called at
    fixed points of every step; the tests inject their faults through it.
    """
    # On a CPU in bf16, strided depthwise layers compute their backward in fp32 and ReLU6 keeps its output
    # instead of a clone: same values, ~35% faster BatchNorm-only steps on EfficientNet (models/cpu_kernels.py).
    # Parameters are shared, so the optimizer, checkpoints and DDP see the same tensors; the original layers
    # are back on return. reuse_freed_memory: glibc keeps freed activations for the next step instead of
    # returning them to the kernel and faulting them back in (88 -> 110 img/s on the same step).
    with reuse_freed_memory(device) as heap, cpu_training_kernels(model, precision.dtype, device) as swapped:
        _log_cpu_paths(heap, swapped)
        run = _Run(model, data, cfg, run_dir, precision, device, workers, d or Dist(), callback, stop, hooks)
        run.start()
        for epoch in range(run.st.epoch, cfg.epochs):
            run.begin_epoch(epoch)
            seconds = run.run_epoch(epoch)
            row = run.holdout_pass(epoch, seconds)
            run.end_epoch(epoch, row)
            if run.stops_early(epoch):
                break
        return run.finish()


def _log_cpu_paths(heap: bool, swapped: dict[str, int]) -> None:
    if heap:
        log.info("CPU memory: freed tensors stay in the heap for reuse (TRANSFERLAB_MALLOC=default opts out)")
    if swapped:
        log.info(
            "CPU bf16 training kernels: %d strided depthwise convolution(s) with an fp32 backward, "
            "%d ReLU6 keeping their output for backward",
            swapped.get("FastStridedDepthwise", 0),
            swapped.get("FastReLU6", 0),
        )


class _Run:
    """One :func:`fit` call: what stays fixed (model, data, config, process), what training changes (the
    optimizer, the wrapped forward pass, :class:`FitState`), and the steps ``fit`` is made of, in the order it
    calls them."""

    optimizer: torch.optim.Optimizer
    fwd: Callable[[torch.Tensor], torch.Tensor]

    def __init__(
        self,
        model: TransferModel,
        data: FitData,
        cfg: TrainConfig,
        run_dir: Path,
        precision: Precision,
        device: torch.device,
        workers: int,
        d: Dist,
        callback: Callable[[str, dict[str, float]], None] | None,
        stop: GracefulStop | None,
        hooks: FitHooks | None,
    ) -> None:
        self.model, self.data, self.cfg, self.d = model, data, cfg, d
        self.precision, self.device, self.workers = precision, device, workers
        self.callback, self.stop, self.hooks = callback, stop, hooks or FitHooks()
        self.spec = cfg.strategy_spec()
        self.ckpt_dir = run_dir / "checkpoints"
        steps_per_epoch = math.ceil(len(EpochSampler(len(data.train), cfg.seed, world=d.world)) / cfg.batch_size)
        self.total_opt_steps = math.ceil(steps_per_epoch / cfg.accum_steps) * cfg.epochs
        self.schedule = ScheduleSpec(
            cfg.schedule, warmup_steps=cfg.warmup_steps, step_size=cfg.step_size, gamma=cfg.gamma
        )
        self.stopper = EarlyStopping(cfg.early_stop, patience=cfg.patience)
        self.st = FitState()
        # fp16 needs loss scaling against gradient underflow; bf16 and fp32 do not (the scaler is then a no-op).
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision.dtype == torch.float16)
        self.sampler = EpochSampler(len(data.train), cfg.seed, weights=data.sample_weights, rank=d.rank, world=d.world)
        self.pixels = pixel_array(data.train.split)
        self.mix = cfg.mixup > 0 or cfg.cutmix > 0
        self.quiet = (None if cfg.progress is None else not cfg.progress) if d.main else True

    # -------------------------------------------------------------------------------------------- start

    def start(self) -> None:
        """The model on its device under the strategy, its optimizer, the checkpoint continued (``--resume``;
        it restores every RNG state, so nothing may draw from them between here and the first step), then the
        DDP/compile wrap."""
        model = self.model
        model.to(self.device)
        if self.precision.channels_last:
            model.to(memory_format=torch.channels_last)
        apply_strategy(model, self.spec)
        resume_from = latest_checkpoint(self.ckpt_dir, prefix="") if self.cfg.resume else None
        if resume_from is not None:
            peek = load_checkpoint(self.ckpt_dir, resume_from, restore_rng=False)
            if peek.state.get("unfrozen"):
                unfreeze(model, self.spec)  # before the optimizer is built, so it holds the unfrozen parameters
        self.optimizer = self._make_optimizer()
        if resume_from is not None:
            self._resume(resume_from)
        elif self.cfg.resume:
            log.info("--resume: no checkpoint in %s, starting fresh", self.ckpt_dir)
        self._wrap_model()
        log.info(
            "input pipeline: %s",
            "decoded cache, batched tensor resize/augmentation"
            if self.pixels is not None
            else f"PIL per image in {self.workers} DataLoader worker(s)",
        )

    def _make_optimizer(self) -> torch.optim.Optimizer:
        cfg = self.cfg
        return build_optimizer(param_groups(self.model, self.spec, cfg.lr), cfg.optimizer, cfg.lr, cfg.weight_decay)

    def _resume(self, name: str) -> None:
        ck = load_checkpoint(self.ckpt_dir, name, optimizer=self.optimizer, restore_rng=True)
        self.model.load_state_dict(ck.model_state)
        if ck.scaler_state and self.scaler.is_enabled():
            self.scaler.load_state_dict(ck.scaler_state)
        self.st = FitState.from_checkpoint(ck.state)
        if not self.d.main:
            self.st.sums = [0.0, 0.0, 0.0]  # the checkpoint holds every rank's total: rank 0 alone continues it
        self.stopper.load_state_dict(ck.state["early_stop"])
        log.info("resuming from %s: epoch %d, position %d, step %d", ck.path, self.st.epoch, self.st.pos, self.st.step)

    def _wrap_model(self) -> None:
        ddp_model: nn.Module = self.model
        if self.d.world > 1:
            ddp_model = nn.parallel.DistributedDataParallel(self.model, find_unused_parameters=False)
        self.fwd = _maybe_compile(ddp_model, self.cfg.compile)

    # -------------------------------------------------------------------------------------------- epoch

    def begin_epoch(self, epoch: int) -> None:
        """Unfreeze on schedule (``freeze-unfreeze``: a new optimizer over the new parameters), set the
        strategy's train mode and the epoch's data order, from ``st.pos`` on a resume."""
        spec, st = self.spec, self.st
        if spec.name == "freeze-unfreeze" and epoch >= (spec.unfreeze_epoch or 0) and not st.unfrozen:
            unfreeze(self.model, spec)
            st.unfrozen = True
            self.optimizer = self._make_optimizer()
            self._wrap_model()
        set_train_mode(self.model, spec)
        self.data.train.epoch = epoch
        self.sampler.set_epoch(epoch, st.pos)

    def run_epoch(self, epoch: int) -> float:
        """Every training step of ``epoch``, then the optimizer step of a last partial accumulation. Returns
        the seconds it took."""
        t0 = time.perf_counter()
        desc = f"epoch {epoch + 1}/{self.cfg.epochs}"
        bar = tqdm(self._batches(epoch), desc=desc, unit="step", leave=False, disable=self.quiet)
        for x, y, _ in bar:
            loss, asked_to_stop = self.train_step(x, y, epoch)
            bar.set_postfix(loss=f"{loss:.3f}")
            self._checkpoint_or_stop(epoch, asked_to_stop)
        if self.st.accum:
            self.optimizer_step()  # the epoch's last, partial accumulation
        return time.perf_counter() - t0

    def _batches(self, epoch: int) -> Iterable[Any]:
        """The epoch's batches (images, targets, positions) in the sampler's order."""
        data, cfg = self.data, self.cfg
        if self.pixels is None:
            return DataLoader(
                data.train,
                batch_size=cfg.batch_size,
                sampler=self.sampler,
                num_workers=self.workers,
                generator=torch.Generator().manual_seed(cfg.seed),
                persistent_workers=False,
                worker_init_fn=ignore_stop_signals_in_worker if self.workers else None,
            )
        # The same positions the DataLoader would visit, as whole batches gathered from the decoded array and
        # augmented with the same per-sample draws (see transferlab.data.batched).
        return ArrayBatches(
            self.pixels,
            data.train.split.targets,
            data.train.indices,
            list(self.sampler),
            cfg.batch_size,
            lambda u8, idx: train_batch(
                u8,
                data.train.transform,
                data.train.seed,
                epoch,
                idx,
                norm=(data.mean, data.std),
                channels_last=self.precision.channels_last,
            ),
            self.device,
            prefetch=False if needs_serial(data.train.transform) else None,
        )

    # -------------------------------------------------------------------------------------------- step

    def train_step(self, x: torch.Tensor, y: torch.Tensor, epoch: int) -> tuple[float, bool]:
        """One batch: forward, loss, the NaN/inf check every rank agrees on, backward, and the optimizer step
        once ``--accum-steps`` batches are in. Returns the loss and whether some rank was asked to stop."""
        st, rank = self.st, self.d.rank
        self.hooks.before_step(st.step + 1, rank)
        x, y, soft = self._to_device(x, y, epoch)
        with self.precision.autocast():
            logits = self.fwd(x)
        logits = logits.float()
        if soft is not None:
            loss = soft_cross_entropy(logits, soft)
        else:
            cfg = self.cfg
            loss = F.cross_entropy(logits, y, weight=self.data.class_weights, label_smoothing=cfg.label_smoothing)
        loss = self.hooks.after_loss(st.step + 1, rank, loss)
        asked_to_stop = self._check_finite(loss, epoch)
        self.scaler.scale(loss / self.cfg.accum_steps).backward()
        st.step += 1
        value, n = float(loss.detach()), len(y)
        hits = float((logits.argmax(1) == y).sum())
        st.sums = [st.sums[0] + value * n, st.sums[1] + hits, st.sums[2] + n]
        st.pos += n * self.d.world
        st.accum += 1
        if st.accum == self.cfg.accum_steps:
            self.optimizer_step()
        st.steps.append(
            {"step": st.step, "epoch": epoch + 1, "loss": value, "lr": self.optimizer.param_groups[-1]["lr"]}
        )
        if self.callback is not None and self.d.main:
            self.callback("step", st.steps[-1])
        return value, asked_to_stop

    def _to_device(self, x: torch.Tensor, y: torch.Tensor, epoch: int) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """The batch on the device and standardised, MixUp/CutMix applied when asked: (images, targets, the
        mixed soft targets or None)."""
        data, cfg = self.data, self.cfg
        x = x.to(self.device, non_blocking=True)
        if self.pixels is None:  # the batched path standardised at the stored size already
            x = normalize_batch(x, data.mean, data.std, channels_last=self.precision.channels_last)
        y = y.to(self.device)
        if not self.mix:
            return x, y, None
        seed = np.random.SeedSequence([cfg.seed, epoch, self.st.step]).generate_state(1)[0]
        x, soft = mix_batch(
            x,
            y,
            data.num_classes,
            mixup_alpha=cfg.mixup,
            cutmix_alpha=cfg.cutmix,
            label_smoothing=cfg.label_smoothing,
            generator=torch.Generator().manual_seed(int(seed)),
        )
        return x, y, soft

    def _check_finite(self, loss: torch.Tensor, epoch: int) -> bool:
        """Raise :class:`NonFiniteLossError` on every rank if some rank's loss is NaN/inf; else whether some
        rank was asked to stop."""
        local_bad = not bool(torch.isfinite(loss))
        any_bad, asked_to_stop = self._agree(local_bad)
        if any_bad:
            what = f"the loss became {float(loss.detach())}" if local_bad else "the loss became NaN/inf on another rank"
            raise NonFiniteLossError(
                f"{what} at step {self.st.step + 1} (epoch {epoch + 1}); stopped before the optimizer "
                f"step, the last checkpoint in {self.ckpt_dir} is intact. Lower --lr, set --clip-grad, or use "
                "--precision fp32"
            )
        return asked_to_stop

    def _agree(self, nonfinite: bool) -> tuple[bool, bool]:
        """(some rank's loss is not finite, some rank was asked to stop), the same on every rank.

        One tiny all-reduce per step under DDP: a NaN that one rank sees, or a signal that reaches one rank
        first, must stop all of them at the same step, or the others would wait forever in the next
        collective. No-op in a single process.
        """
        asked = self.stop is not None and self.stop.requested is not None
        if self.d.world == 1:
            return nonfinite, asked
        import torch.distributed as dist

        dev = self.device if dist.get_backend() == "nccl" else torch.device("cpu")
        t = torch.tensor([float(nonfinite), float(asked)], device=dev)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t[0] > 0), bool(t[1] > 0)

    def optimizer_step(self) -> None:
        """Clip, refuse NaN/inf gradients, set the scheduled learning rate and step."""
        scaler, optimizer, st = self.scaler, self.optimizer, self.st
        scaler.unscale_(optimizer)  # clip and check the true gradients, not the fp16-scaled ones
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.hooks.before_optimizer_step(st.step, self.d.rank, trainable)
        norm = clip_gradients(trainable, self.cfg.clip_grad)
        if norm is None and not scaler.is_enabled():
            # Checked even without clipping: one NaN gradient turns every weight it touches into NaN, and
            # the next checkpoint would save them. After DDP's all-reduce every rank holds the same gradients,
            # so every rank stops here together.
            grads = [p.grad for p in trainable if p.grad is not None]
            norm = float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0
        # With fp16 loss scaling an overflow is expected now and then: the scaler skips that step.
        if norm is not None and not math.isfinite(norm) and not scaler.is_enabled():
            raise NonFiniteLossError(
                f"the gradient norm became {norm} at step {st.step}; stopped before the "
                "optimizer step, the last checkpoint is intact"
            )
        set_lr(optimizer, lr_factor(st.opt_step, self.total_opt_steps, self.schedule))
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        st.opt_step += 1
        st.accum = 0

    def _checkpoint_or_stop(self, epoch: int, asked_to_stop: bool) -> None:
        """Between optimizer steps only (accumulated gradients are never lost): the ``--checkpoint-every``
        checkpoint, and the stop a signal asked for."""
        st, every = self.st, self.cfg.checkpoint_every
        due = bool(every) and st.step % every == 0
        if due and st.accum == 0:
            self._save_step_checkpoint(f"step-{st.step:08d}")
        if self.d.world == 1:  # a single process may look again: a signal during this step counts
            asked_to_stop = self.stop is not None and self.stop.requested is not None
        if asked_to_stop and st.accum == 0:
            self._stop_after(f"step-{st.step:08d}", written=due, epoch=epoch + 1)

    # -------------------------------------------------------------------------------------------- epoch end

    def holdout_pass(self, epoch: int, seconds: float) -> dict[str, float]:
        """The epoch's history row: its train loss and accuracy over every rank, and the holdout's."""
        data, cfg, d = self.data, self.cfg, self.d
        loss_sum, hit_sum, count = _all_reduce_sum(self.st.sums, d)
        hold_logits = predict(
            self.model,
            data.holdout,
            mean=data.mean,
            std=data.std,
            precision=self.precision,
            device=self.device,
            batch_size=cfg.batch_size,
            workers=self.workers,
            d=d,
            progress=cfg.progress,
        )
        val_loss, val_acc = _score(hold_logits, data.holdout.split.targets[data.holdout.indices])
        row = {
            "epoch": epoch + 1,
            "train_loss": loss_sum / max(count, 1),
            "train_acc": hit_sum / max(count, 1),
            "val_loss": val_loss,
            "val_acc": val_acc,
            "lr": self.optimizer.param_groups[-1]["lr"],
            "seconds": seconds,
            "images_per_s": (count - 0) / max(seconds, 1e-9),
        }
        self.st.history.append(row)
        if self.callback is not None and d.main:
            self.callback("epoch", row)
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
        return row

    def end_epoch(self, epoch: int, row: dict[str, float]) -> None:
        """Record the epoch for early stopping, write ``best`` (if it improved) and ``last``, and stop if a
        signal arrived."""
        metric = row["val_loss"] if self.cfg.early_stop == "val_loss" else row["val_acc"]
        improved = self.stopper.update(metric, epoch + 1)
        st = self.st
        st.epoch, st.pos, st.sums = epoch + 1, 0, [0.0, 0.0, 0.0]
        if improved:
            self._save_checkpoint("best")
        self._save_checkpoint("last")
        if self._agree(False)[1]:
            self._stop_after("last", written=True, epoch=epoch + 1)

    def stops_early(self, epoch: int) -> bool:
        """Whether early stopping ends training after ``epoch``."""
        if self.stopper.should_stop:
            cfg = self.cfg
            log.info(
                "early stopping after epoch %d: no improvement of %s for %s epochs",
                epoch + 1,
                cfg.early_stop,
                cfg.patience,
            )
        return self.stopper.should_stop

    def finish(self) -> FitResult:
        """The best epoch's weights back in the model, and what training recorded."""
        best = load_checkpoint(self.ckpt_dir, "best", restore_rng=False)
        self.model.load_state_dict(best.model_state)
        st = self.st
        return FitResult(
            history=st.history,
            best_epoch=self.stopper.best_epoch or len(st.history),
            steps=st.steps,
            stopped_early=self.stopper.should_stop,
        )

    # -------------------------------------------------------------------------------------------- checkpoints

    def _save_checkpoint(self, name: str) -> None:
        # Every rank takes part: the running train-loss sums are per rank, the checkpoint keeps their total
        # (and on resume only rank 0 starts from it, the others from zero).
        d = self.d
        state = self.st.to_checkpoint(_all_reduce_sum(self.st.sums, d), self.stopper.state_dict())
        if d.main:
            save_checkpoint(
                self.ckpt_dir,
                name,
                model_state=self.model.state_dict(),
                optimizer=self.optimizer,
                scaler_state=self.scaler.state_dict() if self.scaler.is_enabled() else None,
                state=state,
            )
        if d.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def _save_step_checkpoint(self, name: str) -> None:
        """A mid-training checkpoint, keeping the newest ``--keep-checkpoints`` of them."""
        self._save_checkpoint(name)
        if self.d.main:
            prune_checkpoints(self.ckpt_dir, "step-", keep=self.cfg.keep_checkpoints)

    def _stop_after(self, name: str, *, written: bool, epoch: int) -> None:
        """Write checkpoint ``name`` unless it was just written, then raise TrainingInterrupted."""
        if not written:
            self._save_step_checkpoint(name)
        # A rank the signal has not reached yet (DDP) reports SIGTERM, what torchrun's agent sends.
        stop = self.stop
        signum = stop.requested if stop is not None and stop.requested is not None else int(signal.SIGTERM)
        raise interrupted(signum, self.st.step, epoch, str(self.ckpt_dir / name))
