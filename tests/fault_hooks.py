"""Faults the reliability tests inject into the training loop, as :class:`~transferlab.training.hooks.FitHooks`.

A NaN or a crash at a chosen step cannot be produced reliably from outside (a huge learning rate diverges at
some step or never), so the tests put one there through the loop's hooks. A test that runs training in its
own process passes the hooks to ``train(hooks=...)``; one that goes through the CLI or ``torchrun`` names a
factory here in ``TRANSFERLAB_HOOKS`` (:func:`spec`, :func:`env`), which the run reads once at its start:

* ``nan_loss:STEP[:RANK]``: the loss of that (1-based) step becomes NaN, on RANK only if given (a fault one
  DDP rank sees and the other does not);
* ``nan_grad:STEP``: a gradient of that step becomes NaN before the optimizer step (on every rank, as a real
  NaN gradient is after DDP's all-reduce);
* ``crash:STEP:RANK:MARKER``: the process dies (``os._exit(13)``) as that step starts on RANK, unless MARKER
  exists; it creates MARKER first, so the crash happens once.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import nn

from transferlab.training.hooks import HOOKS_ENV, FitHooks

log = logging.getLogger(__name__)
HERE = Path(__file__).resolve().parent


class NanLoss(FitHooks):
    """The loss of ``step`` becomes NaN (on ``rank`` only, if given)."""

    def __init__(self, step: int, rank: int | None = None) -> None:
        self.step, self.rank = step, rank

    def after_loss(self, step: int, rank: int, loss: torch.Tensor) -> torch.Tensor:
        if step == self.step and self.rank in (None, rank):
            return loss * float("nan")
        return loss


class NanGrad(FitHooks):
    """A gradient of ``step`` becomes NaN just before the optimizer step (if one follows that step)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def before_optimizer_step(self, step: int, rank: int, params: list[nn.Parameter]) -> None:
        if step == self.step:
            grad = next(p for p in params if p.grad is not None).grad
            assert grad is not None
            grad.view(-1)[0] = float("nan")


class CrashOnce(FitHooks):
    """The process dies as ``step`` starts on ``rank``, the first time only (``marker`` records it)."""

    def __init__(self, step: int, rank: int, marker: Path) -> None:
        self.step, self.rank, self.marker = step, rank, marker

    def before_step(self, step: int, rank: int) -> None:
        if step == self.step and rank == self.rank and not self.marker.exists():
            self.marker.touch()
            log.error("test fault injection: crashing at step %d on rank %d", step, rank)
            os._exit(13)


# ------------------------------------------------------------------------------------------------
# the factories TRANSFERLAB_HOOKS names (their one argument is the text after FACTORY:)


def nan_loss(arg: str) -> NanLoss:
    step, rank = _step_rank(arg, "STEP[:RANK]", parts=2)
    return NanLoss(step, rank)


def nan_grad(arg: str) -> NanGrad:
    step, _ = _step_rank(arg, "STEP", parts=1)
    return NanGrad(step)


def crash(arg: str) -> CrashOnce:
    fields = arg.split(":", 2)
    step, rank = _step_rank(":".join(fields[:2]), "STEP:RANK:MARKER", parts=2, whole=arg)
    if rank is None or len(fields) < 3 or not fields[2]:
        raise ValueError(_form(arg, "STEP:RANK:MARKER"))
    return CrashOnce(step, rank, Path(fields[2]))


def _step_rank(arg: str, form: str, *, parts: int, whole: str | None = None) -> tuple[int, int | None]:
    """STEP (from 1) and an optional RANK (from 0) from ``STEP[:RANK]``, at most ``parts`` fields."""
    fields = arg.split(":")
    try:
        step = int(fields[0])
        rank = int(fields[1]) if len(fields) > 1 else None
    except ValueError:
        step, rank = -1, None
    if step < 1 or (rank is not None and rank < 0) or len(fields) > parts:
        raise ValueError(_form(whole or arg, form))
    return step, rank


def _form(arg: str, form: str) -> str:
    return f"{arg!r} is not {form} (STEP a step number from 1, RANK a process rank from 0)"


def spec(factory: str, arg: str) -> str:
    """The ``TRANSFERLAB_HOOKS`` value that makes ``factory(arg)`` here."""
    return f"{__name__}:{factory}:{arg}"


def env(factory: str, arg: str, base: dict[str, str] | None = None) -> dict[str, str]:
    """``base`` (default: this process's environment) plus what a child process needs to run with
    ``factory(arg)``: ``TRANSFERLAB_HOOKS`` and this folder on its ``PYTHONPATH``."""
    out = dict(os.environ if base is None else base)
    path = [str(HERE), *filter(None, out.get("PYTHONPATH", "").split(os.pathsep))]
    return {**out, HOOKS_ENV: spec(factory, arg), "PYTHONPATH": os.pathsep.join(path)}
