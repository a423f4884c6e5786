"""What produced a result: resolved config, seed, package versions, git commit, command line.

Every result file MushroomCLIP writes carries this block, so a number can always be traced back.
"""

from __future__ import annotations

import datetime
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

PACKAGES = (
    "mushroomclip",
    "torch",
    "torchvision",
    "transformers",
    "accelerate",
    "peft",
    "datasets",
    "huggingface-hub",
    "open_clip_torch",
    "numpy",
    "pillow",
    "scikit-learn",
)


def package_versions(names: tuple[str, ...] = PACKAGES) -> dict[str, str | None]:
    """Installed versions, read from package metadata (nothing is imported)."""
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_commit(path: Path | None = None) -> str | None:
    """The project's commit, with ``-dirty`` when tracked files have uncommitted changes."""
    cwd = path or Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd, capture_output=True, text=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("-dirty" if dirty else "")


def run_provenance(config: dict, seed: int | None) -> dict:
    """The block written beside every result."""
    return {
        "config": config,
        "seed": seed,
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "git_commit": git_commit(),
        "versions": package_versions(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
