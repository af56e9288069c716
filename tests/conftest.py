"""Test-wide setup: no network, ever, and where the real mini dataset is."""

from __future__ import annotations

import os

# Must be set before huggingface_hub is imported anywhere: tests never reach a hub.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFERLAB_OFFLINE"] = "1"
os.environ.setdefault("TQDM_DISABLE", "1")
# Caches (features, image checks, downloads) go to a per-session temp folder, never the user's home.
# The folder made here is removed when the session ends (pytest_unconfigure); one given by the caller is kept.
if "TRANSFERLAB_CACHE" not in os.environ:
    import tempfile

    os.environ["TRANSFERLAB_CACHE"] = tempfile.mkdtemp(prefix="transferlab-test-cache-")

from pathlib import Path

import pytest

from builders import tiny_imagenet_files, write_folder, write_zip

REPO = Path(__file__).resolve().parents[1]
MINI_NAME = "tiny-imagenet-200-mini.zip"


def find_mini_zip() -> Path | None:
    """The real mini Tiny ImageNet zip: $TRANSFERLAB_DATA folders, then ../shared/datasets."""
    dirs = [d for d in os.environ.get("TRANSFERLAB_DATA", "").split(os.pathsep) if d]
    dirs.append(str(REPO.parent / "shared" / "datasets"))
    for d in dirs:
        p = Path(d) / MINI_NAME
        if p.is_file():
            return p
    return None


def pytest_unconfigure(config: pytest.Config) -> None:
    """Remove the session's own cache folder (about 100 MB of decoded images and features per run)."""
    import shutil
    import tempfile

    cache = Path(os.environ.get("TRANSFERLAB_CACHE", ""))
    if cache.name.startswith("transferlab-test-cache-") and cache.parent == Path(tempfile.gettempdir()):
        shutil.rmtree(cache, ignore_errors=True)


@pytest.fixture(scope="session")
def mini_zip() -> Path:
    """Path to the real mini Tiny ImageNet zip (read-only); skips where it is absent."""
    p = find_mini_zip()
    if p is None:
        if os.environ.get("CI"):
            pytest.fail(f"{MINI_NAME} not found in $TRANSFERLAB_DATA or ../shared/datasets; CI must provide it")
        pytest.skip(f"{MINI_NAME} not available")
    return p


@pytest.fixture
def tiny_folder(tmp_path: Path) -> Path:
    """A small synthetic Tiny ImageNet in the official folder layout (3 classes)."""
    return write_folder(tmp_path / "tiny-imagenet-200", tiny_imagenet_files())


@pytest.fixture
def tiny_zip(tmp_path: Path) -> Path:
    """The same small dataset as an official-layout zip (top folder tiny-imagenet-200/)."""
    return write_zip(tmp_path / "tiny-imagenet-200.zip", tiny_imagenet_files())


@pytest.fixture
def one_thread():
    """Tiny models are dominated by thread overhead: one torch thread is faster and steadier on 2 cores."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def train_ds(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3-class Tiny ImageNet folder with 10 train and 4 val images per class."""
    root = tmp_path_factory.mktemp("ds") / "tiny-imagenet-200"
    return write_folder(root, tiny_imagenet_files(n_train=10, n_val_per_class=4, n_test=1))


@pytest.fixture(scope="module")
def in1k32(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """timm's tiny test_resnet with a random ImageNet-1k head at 32px, saved as safetensors."""
    from builders import imagenet_test_resnet

    return imagenet_test_resnet(tmp_path_factory.mktemp("w") / "test_resnet_in1k.safetensors", 32)[0]


@pytest.fixture(autouse=True)
def _restore_logging():
    from builders import logging_restored

    with logging_restored():
        yield
