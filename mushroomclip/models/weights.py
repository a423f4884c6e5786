"""Pretrained files from the Hugging Face Hub or its local cache, and what identifies the weights loaded.

Reachability is asked through huggingface_hub's own session, so ``HF_ENDPOINT``, ``HTTPS_PROXY`` and
``HF_HUB_OFFLINE`` mean here what they mean to downloads. Caches of embeddings are keyed by
:func:`weights_id`: the snapshot's commit, or the weight file's SHA-256, never a model's name.
"""

from __future__ import annotations

import hashlib
import os
from functools import lru_cache
from pathlib import Path

from huggingface_hub import constants, hf_hub_download
from huggingface_hub.errors import EntryNotFoundError
from huggingface_hub.utils import get_session


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hub answers one request within ``timeout`` s, sent through huggingface_hub's own session.

    So ``HF_ENDPOINT``, ``HTTPS_PROXY`` and ``HF_HUB_OFFLINE`` apply exactly as they do to downloads; no retries.
    """
    if offline_by_env():
        return False
    try:
        get_session().head(constants.ENDPOINT, timeout=timeout)
        return True
    except Exception:  # httpx's connect/proxy/timeout errors, huggingface_hub's OfflineModeIsEnabled
        return False


def offline_by_env() -> bool:
    return constants.is_offline_mode() or os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("0", "", "false")


def hub_file(repo_id: str, filename: str, local_only: bool) -> str | None:
    """Local path of a Hub file (downloaded unless ``local_only``), or None where the repo or cache lacks it."""
    try:
        return hf_hub_download(repo_id, filename, local_files_only=local_only)
    except EntryNotFoundError:  # also LocalEntryNotFoundError: not cached, and no download allowed or possible
        return None


def not_found(what: str, repo_id: str, local_only: bool, verb: str = "are") -> str:
    """Why ``what`` could not be had: the Hub repo lacks it, or it is not cached and the Hub is out of reach."""
    if not local_only:
        return f"{what} of {repo_id} {verb} neither on the Hub nor in the local Hugging Face cache"
    return f"{what} of {repo_id} {verb} not in the local Hugging Face cache ({constants.HF_HUB_CACHE}) and {_unreachable()}"


def offline_note() -> str:
    """For errors of loads that only searched the cache: why, and which cache."""
    return f"{_unreachable()}, so only the local Hugging Face cache ({constants.HF_HUB_CACHE}) was searched"


def _unreachable() -> str:
    return (
        "the Hub cannot be reached ("
        + ("HF_HUB_OFFLINE is set" if offline_by_env() else f"no answer from {constants.ENDPOINT}")
        + ")"
    )


def weights_id(path: str | Path) -> str:
    """What identifies loaded weights: the Hub commit of a cached snapshot file, else the file's SHA-256."""
    path = Path(path)
    if path.parent.parent.name == "snapshots" and path.parents[2].name.startswith("models--"):
        return f"commit {path.parent.name}"
    stat = path.stat()
    return f"sha256 {_file_sha256(str(path.resolve()), stat.st_size, stat.st_mtime_ns)}"


@lru_cache(maxsize=16)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    """SHA-256 of a file, memoised per (path, size, mtime) so a process hashes a weight file once."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()
