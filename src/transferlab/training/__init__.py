"""Training: the feature cache and head training on frozen features (more strategies in progress)."""
