"""A network ready for inference: the model, how to feed it, and what its outputs mean."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from torch import nn

from transferlab.data.transforms import EvalTransform
from transferlab.models.preprocessing import Preprocessing


@dataclass
class ModelEntry:
    """One network, how to feed it, and what its outputs mean."""

    label: str
    model: nn.Module
    preprocessing: Preprocessing
    transform: EvalTransform
    #: Class ids of the outputs after ``cols`` is applied.
    class_ids: tuple[str, ...]
    #: Output columns kept (zero-shot: the dataset's classes among ImageNet-1k's), or None for all.
    cols: np.ndarray | None = None
    #: False for an ONNX Runtime model: no autocast, no channels_last, always CPU fp32.
    torch_native: bool = True
    #: Where the class names could be looked up (dataset specs), best first.
    name_sources: tuple[str, ...] = ()
    class_names: tuple[str, ...] | None = None
