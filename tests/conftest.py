"""Shared tiny worlds: a 6-species fake Kaggle download (with every kind of bad input) and its prepared output."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

# Tests never touch the network, and keep Hugging Face caches out of the user's home.
os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="offline", TQDM_DISABLE="1")


@pytest.fixture(scope="session", autouse=True)
def _isolated_hf_cache(tmp_path_factory):
    os.environ["HF_HOME"] = str(tmp_path_factory.mktemp("hf_home"))
    os.environ["HF_DATASETS_CACHE"] = str(Path(os.environ["HF_HOME"]) / "datasets")


@pytest.fixture(scope="session")
def dirty_download(tmp_path_factory) -> tuple[Path, dict]:
    """6 species, ~30 images each, 2 truncated JPEGs and one of every other bad input. Read-only."""
    from mushroomclip.data.synthetic import make_synthetic_download

    root = tmp_path_factory.mktemp("kaggle") / "download"
    manifest = make_synthetic_download(root, classes=6, per_class=30, size=48, seed=1, corrupt=2, dirty=True)
    return root, manifest


@pytest.fixture(scope="session")
def prepared(dirty_download, tmp_path_factory) -> tuple[Path, dict]:
    """The dirty download prepared with default options. Read-only."""
    from mushroomclip.data.prepare import PrepareArguments, prepare

    out = tmp_path_factory.mktemp("prepared") / "out"
    report = prepare(PrepareArguments(dirty_download[0], out, num_proc=2, progress=False))
    return out, report


@pytest.fixture
def download_copy(dirty_download, tmp_path) -> Path:
    """A private copy of the dirty download, for tests that modify it."""
    return Path(shutil.copytree(dirty_download[0], tmp_path / "download"))
