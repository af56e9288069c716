"""What kind of folder a path is, decided in one place from the files each command writes.

==============  ==========================================================================================
kind            what marks it
==============  ==========================================================================================
``study``       ``study.yaml`` and ``members/`` (``transferlab study``)
``export``      ``model_card.json`` (``transferlab export``)
``ensemble``    ``weights.json`` (``transferlab ensemble``; also each of a study's ``ensembles/<name>``)
``run``         ``config.yaml`` (``transferlab train``; finished once ``metrics.json`` is there, and its model
                can be loaded once ``model.safetensors`` is)
``evaluation``  ``metrics.json`` with predictions (``transferlab evaluate``)
==============  ==========================================================================================

The kinds are tried in that order, so a study is never mistaken for the runs inside it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from transferlab.artifacts.predictions import LEGACY_FILE, PREDICTIONS_DIR

Kind = Literal["study", "export", "ensemble", "run", "evaluation"]

STUDY_SPEC = "study.yaml"
MEMBERS_DIR = "members"
CARD_FILE = "model_card.json"
WEIGHTS_JSON = "weights.json"
CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.json"
MODEL_FILE = "model.safetensors"


def folder_kind(path: str | os.PathLike[str]) -> Kind | None:
    """The kind of folder ``path`` is (see the module docstring), or None for anything else."""
    p = Path(path)
    if not p.is_dir():
        return None
    if (p / STUDY_SPEC).is_file() and (p / MEMBERS_DIR).is_dir():
        return "study"
    if (p / CARD_FILE).is_file():
        return "export"
    if (p / WEIGHTS_JSON).is_file():
        return "ensemble"
    if (p / CONFIG_FILE).is_file():
        return "run"
    if (p / METRICS_FILE).is_file() and ((p / PREDICTIONS_DIR).is_dir() or (p / LEGACY_FILE).is_file()):
        return "evaluation"
    return None


def is_study_dir(path: str | os.PathLike[str]) -> bool:
    """True for a folder written by ``transferlab study``."""
    return folder_kind(path) == "study"


def is_ensemble_dir(path: str | os.PathLike[str]) -> bool:
    """True for a folder written by ``transferlab ensemble``."""
    return folder_kind(path) == "ensemble"


def is_run_dir(path: str | os.PathLike[str]) -> bool:
    """True for a training run whose model can be loaded (``config.yaml`` and ``model.safetensors``)."""
    return folder_kind(path) == "run" and (Path(path) / MODEL_FILE).is_file()


def has_model(path: str | os.PathLike[str]) -> bool:
    """True if a model can be rebuilt from ``path``: a loadable run, an export, or an evaluate output."""
    kind = folder_kind(path)
    return kind in ("export", "evaluation") or (kind == "run" and (Path(path) / MODEL_FILE).is_file())
