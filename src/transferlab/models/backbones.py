"""Build a timm backbone with weights from a chosen source, and the preprocessing that goes with them.

Everything downstream works through timm's model contract (``forward_features``, ``forward_head``,
``reset_classifier``), so any of timm's architectures can be used by name.
"""

from __future__ import annotations

import difflib
import json
import logging
from dataclasses import dataclass

import torch
from torch import nn

from transferlab.errors import ConfigError, WeightsError
from transferlab.labels import imagenet_synsets
from transferlab.models import smallcnn  # noqa: F401 - registers small_cnn with timm
from transferlab.models.preprocessing import Preprocessing
from transferlab.models.weights import (
    LITE_PACKAGES,
    META_CLASS_IDS,
    META_PREPROCESSING,
    WeightSpec,
    check_compatible,
    hub_cached,
    hub_cached_file,
    hub_offline,
    map_by_position,
    package_available,
    package_weight_file,
    read_weight_file,
)

log = logging.getLogger(__name__)


@dataclass
class Backbone:
    """A model ready to run, with where its weights came from and how to feed it."""

    model: nn.Module
    name: str
    weights: str
    preprocessing: Preprocessing
    #: What each output of the current head means (ImageNet synsets for an ImageNet head), or None.
    class_ids: tuple[str, ...] | None

    @property
    def num_classes(self) -> int:
        """Number of outputs of the current classifier head."""
        n = getattr(self.model, "num_classes", None)
        if n is None and self.class_ids is not None:
            return len(self.class_ids)
        return int(n or 0)

    @property
    def has_imagenet_head(self) -> bool:
        """True if the head predicts the ImageNet-1k classes in the standard order."""
        return self.class_ids is not None and self.class_ids == imagenet_synsets()


def check_model_name(name: str) -> None:
    """Raise a ConfigError with close matches when timm has no architecture ``name``."""
    import timm

    arch = name.split(".", 1)[0]
    if timm.is_model(arch):
        return
    close = difflib.get_close_matches(arch, timm.list_models(), n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else "; `transferlab models PATTERN` lists them"
    raise ConfigError(f"--model {name!r} is not a timm architecture{hint}")


def _default_preprocessing(model: nn.Module) -> Preprocessing:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return Preprocessing.from_timm(cfg)


def resolve_weight_source(name: str, weights: str | None) -> tuple[WeightSpec, str]:
    """The parsed ``--weights`` and where they really come from: ``auto`` becomes ``package`` for the
    Lite models with an offline package, else ``hub``. Shared by loading and by the study's pre-flight
    check, so both always agree on the source."""
    spec = WeightSpec.parse(weights)
    kind = spec.kind
    if kind == "auto":
        kind = "package" if name.split(".", 1)[0] in LITE_PACKAGES and "." not in name else "hub"
    return spec, kind


def create_backbone(name: str, weights: str | None = "auto") -> Backbone:
    """Create timm model ``name`` with weights from ``weights`` (see :mod:`transferlab.models.weights`).

    The head keeps the size the weights have (1,000 ImageNet classes for pretrained sources); adapting
    it to a dataset is the training step's job.
    """
    import timm

    check_model_name(name)
    spec, kind = resolve_weight_source(name, weights)
    arch = name.split(".", 1)[0]

    if kind == "none":
        model = timm.create_model(name, pretrained=False)
        return Backbone(model, name, "random init", _default_preprocessing(model), None)

    if kind == "package":
        path, desc = package_weight_file(arch)
        model = timm.create_model(name, pretrained=False)
        src, _ = read_weight_file(path)
        mapped = map_by_position(src, model.state_dict(), f"{desc} ({path.name})")
        model.load_state_dict(mapped, strict=True)
        log.info("loaded %s weights from %s", name, desc)
        return Backbone(model, name, desc, _default_preprocessing(model), imagenet_synsets())

    if kind == "hub":
        return _from_hub(name)

    assert spec.path is not None
    return _from_file(name, spec.path)


def _from_hub(name: str) -> Backbone:
    import timm

    probe = timm.create_model(name, pretrained=False)
    cfg = probe.pretrained_cfg or {}
    hub_id = cfg.get("hf_hub_id")
    where = f"the Hugging Face hub ({hub_id})" if hub_id else (cfg.get("url") or "timm's default location")
    cached = hub_cached_file(hub_id) if hub_offline() else None
    if hub_offline() and cached is None:
        raise WeightsError(
            f"pretrained weights for {name} are not in the local cache and the hub is switched off "
            "(HF_HUB_OFFLINE/TRANSFERLAB_OFFLINE is set). Either run once with network access and "
            f"those variables unset, so timm caches them from {where}, or pass --weights "
            f"/path/to/{name}.safetensors (or .pth)."
        )
    try:
        # Offline with a cached copy: hand timm the file itself, so no hub client is asked anything
        # (huggingface_hub reads HF_HUB_OFFLINE only at import, so TRANSFERLAB_OFFLINE alone would not stop it).
        overlay = {"file": str(cached)} if cached is not None else None
        model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay)
    except Exception as e:  # network, auth, missing file: all end in the same advice
        raise WeightsError(
            f"could not get pretrained weights for {name} from {where}: {type(e).__name__}: {e}. "
            f"Check network access, or pass --weights /path/to/{name}.safetensors (or .pth); "
            "set HF_HUB_OFFLINE=1 to skip network attempts."
        ) from e
    num = int(getattr(model, "num_classes", 0))
    class_ids = imagenet_synsets() if num == 1000 else None
    return Backbone(model, name, f"hub {where}", _default_preprocessing(model), class_ids)


def _from_file(name: str, path) -> Backbone:  # type: ignore[no-untyped-def]
    import timm

    sd, meta = read_weight_file(path)
    probe = timm.create_model(name, pretrained=False)
    head = probe.pretrained_cfg.get("classifier") if probe.pretrained_cfg else None
    num_classes = None
    if isinstance(head, str) and f"{head}.weight" in sd:
        num_classes = int(sd[f"{head}.weight"].shape[0])
    model = (
        probe
        if num_classes in (None, probe.num_classes)
        else timm.create_model(name, pretrained=False, num_classes=num_classes)
    )
    check_compatible(model.state_dict(), sd, str(path))
    model.load_state_dict(sd, strict=True)

    pre = _default_preprocessing(model)
    if META_PREPROCESSING in meta:
        try:
            pre = Preprocessing.from_dict(json.loads(meta[META_PREPROCESSING]))
        except (ValueError, TypeError) as e:
            raise WeightsError(f"{path}: bad {META_PREPROCESSING} metadata: {e}") from e
    else:
        log.info("%s carries no preprocessing; using timm's default for %s", path, name)
    class_ids: tuple[str, ...] | None = None
    if META_CLASS_IDS in meta:
        try:
            ids = json.loads(meta[META_CLASS_IDS])
        except ValueError as e:
            raise WeightsError(f"{path}: bad {META_CLASS_IDS} metadata: {e}") from e
        if not isinstance(ids, list) or not all(isinstance(c, str) for c in ids):
            raise WeightsError(f"{path}: bad {META_CLASS_IDS} metadata: expected a JSON list of strings")
        if len(ids) != model.num_classes:
            raise WeightsError(
                f"{path}: {META_CLASS_IDS} metadata names {len(ids)} classes but the head has "
                f"{model.num_classes} outputs"
            )
        class_ids = tuple(ids)
    elif model.num_classes == 1000:
        class_ids = imagenet_synsets()
    return Backbone(model, name, f"file {path}", pre, class_ids)


def list_backbones(pattern: str = "*") -> list[tuple[str, str]]:
    """timm architectures matching ``pattern`` with where their weights can come from offline.

    Returns (name, availability) with availability ``package``, ``hub-cache`` or ``""``.
    """
    import timm

    out = []
    for n in timm.list_models(pattern):
        if package_available(n):
            out.append((n, "package"))
            continue
        avail = ""
        try:
            cfg = timm.models.get_pretrained_cfg(n)
            if cfg is not None and hub_cached(getattr(cfg, "hf_hub_id", None)):
                avail = "hub-cache"
        except Exception:
            avail = ""
        out.append((n, avail))
    return out


def to_channels_last(model: nn.Module) -> nn.Module:
    """Convert conv weights to channels_last (faster convolutions on CPU and tensor cores)."""
    return model.to(memory_format=torch.channels_last)
