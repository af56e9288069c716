"""transferlab: transfer learning for image classification, measured honestly.

``import transferlab as tl`` gives the Python API (:mod:`transferlab.api`): ``tl.open_dataset``, ``tl.train``,
``tl.evaluate``, ``tl.ensemble``, ``tl.study``, ``tl.predict``, ``tl.export``, ``tl.report`` and ``tl.load``, with
typed results
(``tl.Run``, ``tl.Evaluation``, ``tl.Ensemble``, ``tl.Study``, ``tl.Export``).
"""

from __future__ import annotations

from typing import Any

from transferlab._version import __version__

_API = (
    "Ensemble",
    "Evaluation",
    "Export",
    "Folder",
    "Run",
    "Study",
    "auto",
    "ensemble",
    "evaluate",
    "export",
    "load",
    "open_dataset",
    "predict",
    "report",
    "study",
    "train",
)
__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    """The API's names, imported on first use: ``import transferlab`` (and so every command's start, and the
    report, which never loads torch) stays light."""
    if name in _API:
        from transferlab import api  # lazy: the API imports torch and every stage

        return getattr(api, name)
    raise AttributeError(f"module 'transferlab' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
