"""Reading a finished run directory back: its config, its model, its predictions.

A run's ``model.safetensors`` holds a :class:`~transferlab.models.heads.TransferModel` state dict with
the preprocessing and class ids in its metadata, and ``config.yaml`` says how to rebuild the model.
Nothing here unpickles anything.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import yaml

from transferlab.artifacts.folders import is_run_dir
from transferlab.errors import ConfigError, WeightsError
from transferlab.models.backbones import Backbone
from transferlab.models.heads import TransferModel
from transferlab.models.preprocessing import Preprocessing
from transferlab.models.weights import META_CLASS_IDS, META_PREPROCESSING, check_compatible, read_weight_file
from transferlab.training.config import TrainConfig

log = logging.getLogger(__name__)


@dataclass
class LoadedRun:
    """A run's model, ready for inference, with what it needs to be fed and read."""

    model: TransferModel
    config: TrainConfig
    preprocessing: Preprocessing
    class_ids: tuple[str, ...]
    path: Path


def load_run_config(run_dir: str | Path) -> TrainConfig:
    """The resolved config a run was trained with."""
    p = Path(run_dir) / "config.yaml"
    try:
        d = yaml.safe_load(p.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{p} is not a readable run config: {e}") from e
    if not isinstance(d, dict):
        raise ConfigError(f"{p} does not hold a mapping of options")
    return TrainConfig.from_dict(d)


def load_run(run_dir: str | Path) -> LoadedRun:
    """Rebuild a run's model from its config and load its weights (strict, shape-checked)."""
    import timm

    run_dir = Path(run_dir)
    if not is_run_dir(run_dir):
        raise ConfigError(f"{run_dir} is not a finished run directory (needs config.yaml and model.safetensors)")
    cfg = load_run_config(run_dir)
    sd, meta = read_weight_file(run_dir / "model.safetensors")
    if META_CLASS_IDS not in meta or META_PREPROCESSING not in meta:
        raise WeightsError(f"{run_dir / 'model.safetensors'} lacks its class ids or preprocessing metadata")
    class_ids = tuple(json.loads(meta[META_CLASS_IDS]))
    pre = Preprocessing.from_dict(json.loads(meta[META_PREPROCESSING]))
    body = timm.create_model(cfg.model, pretrained=False)
    model = TransferModel.from_backbone(body, cfg.head_spec(), len(class_ids))
    check_compatible(model.state_dict(), sd, str(run_dir / "model.safetensors"))
    model.load_state_dict(sd)
    model.eval()
    return LoadedRun(model=model, config=cfg, preprocessing=pre, class_ids=class_ids, path=run_dir)


def backbone_from_run(run_dir: str | Path, model_name: str | None = None) -> Backbone:
    """The trained backbone of an earlier run (its head dropped), for ``--init-from`` cross-domain members."""
    run = load_run(run_dir)
    if model_name is not None and model_name != run.config.model:
        raise ConfigError(f"--init-from {run_dir} holds a {run.config.model}, not the --model {model_name}")
    body = run.model.backbone
    return Backbone(body, run.config.model, f"run {run_dir}", run.preprocessing, None)
