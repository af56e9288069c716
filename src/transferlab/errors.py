"""Exceptions whose message is meant for the user.

The CLI prints ``str(err)`` of a :class:`TransferlabError` without a traceback, so every message must
say what was wrong (naming the file or option) and what to do about it.
"""


class TransferlabError(Exception):
    """Base class for errors the CLI reports as a one-paragraph message and exit status 2."""


class DataError(TransferlabError):
    """A dataset is missing, malformed, or cannot be found."""


class BadImageError(DataError):
    """One image file cannot be decoded. Carries the file's origin and the reason."""

    def __init__(self, origin: str, reason: str) -> None:
        super().__init__(f"{origin}: {reason}")
        self.origin = origin
        self.reason = reason


class TooFewClassesError(DataError):
    """A dataset (or its train split) has fewer than two classes, so no classifier can be trained or scored.

    Its own class so callers (a study's pre-flight, tests) can tell it from other data problems.
    """


class WeightsError(TransferlabError):
    """Pretrained weights are missing, unreadable or do not fit the model."""


class ConfigError(TransferlabError):
    """An option or config value is invalid."""


class TrainingInterrupted(BaseException):
    """SIGTERM or SIGINT stopped training after a complete step and a checkpoint.

    A ``BaseException`` like ``KeyboardInterrupt``: a request to stop must travel through every
    ``except Exception`` (a study must not carry on with its next member). The CLI exits with
    ``128 + signum`` (143 for SIGTERM, 130 for SIGINT), the status a shell reports for that signal.
    """

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        """``128 + signum``: what schedulers and shells expect from a process stopped by that signal."""
        return 128 + self.signum
