"""A graceful stop on SIGTERM and SIGINT: finish the current step, write a checkpoint, exit 143 / 130.

Pre-emptible machines and batch schedulers send SIGTERM some seconds before SIGKILL, and a person presses
Ctrl-C. Dying on the spot would throw away every step since the last checkpoint; instead the first signal
only raises a flag, which the training loop reads after each optimizer step: it writes the same mid-epoch
checkpoint ``--checkpoint-every`` writes and raises :class:`~transferlab.errors.TrainingInterrupted`,
which the CLI turns into exit status ``128 + signum``. ``--resume`` then continues exactly. A second
signal stops at once (the previous handler runs), for when the step itself hangs.

Under torchrun every rank gets the signal from the agent; the loop all-reduces the flag so that all ranks
stop after the same step (a rank that stopped alone would leave the others waiting in a collective).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from types import FrameType, TracebackType
from typing import Any

from transferlab.errors import TrainingInterrupted

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class GracefulStop:
    """Context manager: while inside, SIGTERM/SIGINT set :attr:`requested` instead of stopping the process.

    Handlers are installed only in the main thread (Python allows nothing else), a signal that was ignored
    before stays ignored, and the previous handlers are always restored on exit. A request that arrived after
    the loop's last look (say, while the best weights were loaded at the end) is delivered again on a clean
    exit, to the previous handler: outside the training loop a signal does what it always did (SIGINT raises
    KeyboardInterrupt, SIGTERM ends the process); the checkpoints are complete by then.
    """

    def __init__(self) -> None:
        self.requested: int | None = None
        # Set once a second signal has been passed on to the previous handler: it is not delivered again on exit.
        self._passed_on = False
        self._previous: dict[int, Any] = {}
        self._pid = os.getpid()

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                previous = signal.getsignal(sig)
                if previous is signal.SIG_IGN:
                    continue  # deliberately ignored (say, a background job's SIGINT): keep it that way
                self._previous[sig] = previous
                signal.signal(sig, self._handle)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._restore()
        if exc_type is None and self.requested is not None and not self._passed_on:
            os.kill(os.getpid(), self.requested)

    def _restore(self) -> None:
        previous, self._previous = self._previous, {}
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if os.getpid() != self._pid:
            return  # a forked DataLoader worker inherited this handler: the main process decides
        if self.requested is not None:
            log.warning("received %s again: stopping at once", signal.Signals(signum).name)
            self._restore()
            self._passed_on = True
            os.kill(os.getpid(), signum)  # now handled the way it was before training started
            return
        self.requested = signum
        log.warning(
            "received %s: finishing the current step, then writing a checkpoint and stopping (send it again to "
            "stop at once)",
            signal.Signals(signum).name,
        )


def ignore_stop_signals_in_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: Ctrl-C and a scheduler's SIGTERM often reach the whole process group,
    but only the main process should react (a worker dying of either turns a graceful stop into a crash:
    "DataLoader worker is killed by signal: Terminated"). The main process shuts its workers down when it
    exits, and a worker whose parent is gone exits by itself."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def interrupted(signum: int, step: int, epoch: int, checkpoint: str) -> TrainingInterrupted:
    """The exception the loop raises after writing ``checkpoint``, with the command that continues."""
    return TrainingInterrupted(
        signum,
        f"stopped by {signal.Signals(signum).name} after step {step} (epoch {epoch}); wrote the checkpoint "
        f"{checkpoint}. Continue exactly where it stopped with the same command and --resume (or "
        "`transferlab train --config RUN_DIR/config.yaml --resume`)",
    )
