"""Fixtures shared by the reliability tests (the repository-wide ones are in tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from builders import dirty_tiny_imagenet_files, write_folder


@pytest.fixture(scope="module")
def dirty_ds(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``train_ds`` plus every kind of broken image (4 in train, 1 in val) and two odd but valid ones."""
    return write_folder(tmp_path_factory.mktemp("dirty") / "tiny-imagenet-200", dirty_tiny_imagenet_files())
