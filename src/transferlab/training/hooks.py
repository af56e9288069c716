"""Hooks into the training step: the points where a caller may watch or change what one step does.

:class:`FitHooks` is the no-op default that :func:`~transferlab.training.loop.fit` uses; a subclass
overrides the points it needs. The tests inject their faults this way (a NaN loss or gradient at a chosen
step, a crash of one DDP rank: tests/fault_hooks.py), because a real NaN or crash at a chosen step cannot be
produced reliably from outside.

A process the tests only start (the CLI, ``torchrun``) gets its hooks from one variable, read once when
:func:`~transferlab.training.run.train` starts (never inside a step)::

    TRANSFERLAB_HOOKS=MODULE:FACTORY[:ARGUMENT]

imports MODULE and uses ``FACTORY(ARGUMENT)`` (``FACTORY()`` without one), which must return a
:class:`FitHooks`. A value that cannot be used is a :class:`~transferlab.errors.ConfigError` naming it.
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Mapping

import torch
from torch import nn

from transferlab.errors import ConfigError

log = logging.getLogger(__name__)

#: The environment variable naming a hooks factory (see the module docstring).
HOOKS_ENV = "TRANSFERLAB_HOOKS"


class FitHooks:
    """Every point of a training step a caller may hook into; each method here does nothing.

    ``step`` is the 1-based number of the step the call belongs to and ``rank`` the process rank (0 outside
    torchrun). Hooks run on every rank.
    """

    def before_step(self, step: int, rank: int) -> None:
        """A batch has arrived; nothing of step ``step`` has run yet."""

    def after_loss(self, step: int, rank: int, loss: torch.Tensor) -> torch.Tensor:
        """The loss of ``step``, before it is checked for NaN/inf and before backward; returns the loss to use."""
        return loss

    def before_optimizer_step(self, step: int, rank: int, params: list[nn.Parameter]) -> None:
        """The gradients of the trainable ``params`` are final (accumulated, all-reduced, unscaled); next come
        clipping, the NaN/inf check and the optimizer step. ``step`` is the last step that ran backward."""


def hooks_from_env(environ: Mapping[str, str] | None = None) -> FitHooks | None:
    """The hooks ``TRANSFERLAB_HOOKS`` names, or None where it is unset or empty.

    Raises:
        ConfigError: the module or factory cannot be found, the factory refuses its argument, or it returns
            something that is not a :class:`FitHooks`.
    """
    value = (os.environ if environ is None else environ).get(HOOKS_ENV, "").strip()
    if not value:
        return None
    parts = value.split(":", 2)
    if len(parts) < 2 or not parts[0] or not parts[1]:
        raise _bad(value, "it is not MODULE:FACTORY[:ARGUMENT]")
    module_name, factory_name = parts[0], parts[1]
    args = parts[2:]
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise _bad(value, f"cannot import {module_name!r} ({e})") from e
    factory = getattr(module, factory_name, None)
    if not callable(factory):
        raise _bad(value, f"{module_name} has no callable {factory_name!r}")
    try:
        hooks = factory(*args)
    except (ConfigError, TypeError, ValueError) as e:
        raise _bad(value, str(e)) from e
    if not isinstance(hooks, FitHooks):
        raise _bad(value, f"{factory_name} returned a {type(hooks).__name__}, not a FitHooks")
    log.warning("training hooks active: %s=%s (%s)", HOOKS_ENV, value, type(hooks).__name__)
    return hooks


def _bad(value: str, why: str) -> ConfigError:
    return ConfigError(
        f"{HOOKS_ENV}={value!r}: {why}. It names test-only hooks into the training loop: unset it for a normal run"
    )
