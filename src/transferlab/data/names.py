"""Human-readable class names for class ids, from whatever is at hand locally."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from transferlab.data import open_dataset
from transferlab.errors import TransferlabError
from transferlab.labels import imagenet_lemmas

log = logging.getLogger(__name__)


def class_names(class_ids: Sequence[str], sources: Sequence[str | None] = ()) -> tuple[str, ...]:
    """Names for ``class_ids``: from the first dataset in ``sources`` found locally that names them (never
    downloaded), else ImageNet's WordNet lemmas for WordNet ids, else the id itself."""
    lemmas = imagenet_lemmas()
    for s in sources:
        if not s:
            continue
        try:
            classes = open_dataset(s, download=False).classes
        except (TransferlabError, OSError, ValueError) as e:
            log.debug("class names: %s not usable (%s)", s, e)
            continue
        lookup = dict(zip(classes.ids, classes.names, strict=True))
        if any(c in lookup for c in class_ids):
            return tuple(str(lookup.get(c) or lemmas.get(c) or c) for c in class_ids)
    return tuple(lemmas.get(c, c) for c in class_ids)
