"""Image features of a prepared split: batched, with DataLoader workers, cached on disk.

Computed once per (model, split content) and reused by zero-shot, few-shot and the linear probe, so a
k x seed few-shot sweep costs seconds.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
from datasets import Image
from tqdm.auto import tqdm

from mushroomclip.data.transforms import EvalPixels, background_worker


class PreprocessedImages(torch.utils.data.Dataset):
    """A ``datasets`` split as (pixels, label) pairs through :class:`mushroomclip.data.transforms.EvalPixels`, the one
    evaluation image path that ``predict.py`` and the app use too (uint8, built from the backbone's ``preprocess``
    config, normalised later on the device)."""

    def __init__(self, split, preprocess):
        # undecoded, so that decode_rgb (EXIF applied) and not the datasets feature decodes each image
        self.split = split.select_columns(["image", "label"]).cast_column("image", Image(decode=False))
        self.pixels = EvalPixels(preprocess)

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int):
        row = self.split[index]
        return self.pixels(row["image"]), row["label"]


@torch.inference_mode()
def image_features(
    backbone, split, batch_size: int = 256, num_workers: int = 2, desc: str = "images", progress: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """``(N, D)`` float32 L2-normalised features and ``(N,)`` labels, in split order (a tqdm bar if ``progress``)."""
    loader = torch.utils.data.DataLoader(
        PreprocessedImages(split, backbone.preprocess),
        batch_size=batch_size,
        num_workers=num_workers,
        pin_memory=backbone.device.type == "cuda",
        persistent_workers=False,
        worker_init_fn=background_worker,
    )
    features, labels = [], []
    for pixels, label in tqdm(loader, desc=desc, unit="batch", disable=not progress):
        features.append(backbone.encode_images(pixels).cpu())
        labels.append(label)
    return torch.cat(features).numpy().astype(np.float32), torch.cat(labels).numpy()


def cached_image_features(
    backbone, split, fingerprint: str, cache_dir: str | Path | None, **kwargs
) -> tuple[np.ndarray, np.ndarray, bool]:
    """:func:`image_features`, stored under ``cache_dir``; returns (features, labels, hit).

    Keyed by ``backbone.cache_id`` (the weights actually loaded and the preprocessing) and the split content.
    """
    key = hashlib.sha256(f"{backbone.cache_id}|{fingerprint}".encode()).hexdigest()[:24]
    path = Path(cache_dir) / f"images-{backbone.name}-{key}.npz" if cache_dir else None
    if path is not None and path.is_file():
        stored = np.load(path)
        return stored["features"], stored["labels"], True
    features, labels = image_features(backbone, split, **kwargs)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, features=features, labels=labels)
    return features, labels, False
