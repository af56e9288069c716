"""Inference: the batched engine (:mod:`~transferlab.inference.engine`) and test-time augmentation
(:mod:`~transferlab.inference.tta`), below every command that runs a model forward without training it."""
