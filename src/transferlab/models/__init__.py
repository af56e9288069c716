"""Backbones, their weights and preprocessing, and the ImageNet label map."""
