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

from mushroomclip.data.transforms import (
    DeviceEvalPixels,
    EvalPixels,
    background_worker,
    device_decodable,
    encoded_bytes,
)


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


class EncodedImages(torch.utils.data.Dataset):
    """A ``datasets`` split as (file bytes, label, path, device-decodable) rows: the workers only read files (and a
    JPEG's header, :func:`mushroomclip.data.transforms.device_decodable`), and
    :class:`mushroomclip.data.transforms.DeviceEvalPixels` decodes and preprocesses each batch on the device. Bytes,
    not tensors: DataLoader pickles them, where each tensor would hold a file descriptor of its own."""

    def __init__(self, split):
        self.split = split.select_columns(["image", "label"]).cast_column("image", Image(decode=False))

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int):
        row = self.split[index]
        data = encoded_bytes(row["image"])
        return data, row["label"], row["image"].get("path"), device_decodable(data)


def encoded_collate(rows: list[tuple]) -> tuple[list[bytes], torch.Tensor, list[str | None], list[bool]]:
    encoded, labels, paths, decodable = zip(*rows, strict=True)
    return list(encoded), torch.tensor(labels), list(paths), list(decodable)


def image_batches(
    split,
    preprocess,
    device,
    batch_size: int,
    num_workers: int,
    decode_on_device: bool = False,
    decoder: DeviceEvalPixels | None = None,
):
    """``(uint8 pixels, labels)`` batches of ``split`` for the model's evaluation input, in split order: decoded and
    preprocessed by DataLoader workers (:class:`PreprocessedImages`), or with ``decode_on_device`` read by the
    workers and decoded and preprocessed in batches on ``device`` (:class:`EncodedImages`; by ``decoder``, whose
    ``counts`` then say where each image was decoded, else a new one)."""
    device = torch.device(device)
    loader = torch.utils.data.DataLoader(
        EncodedImages(split) if decode_on_device else PreprocessedImages(split, preprocess),
        batch_size=batch_size,
        num_workers=num_workers,
        pin_memory=device.type == "cuda" and not decode_on_device,
        persistent_workers=False,
        worker_init_fn=background_worker,
        collate_fn=encoded_collate if decode_on_device else None,
    )
    if not decode_on_device:
        yield from loader
        return
    decoder = decoder or DeviceEvalPixels(preprocess, device)
    for encoded, labels, paths, decodable in loader:
        yield decoder(encoded, paths, decodable), labels


@torch.inference_mode()
def image_features(
    backbone,
    split,
    batch_size: int = 256,
    num_workers: int = 2,
    desc: str = "images",
    progress: bool = True,
    decode_on_device: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """``(N, D)`` float32 L2-normalised features and ``(N,)`` labels, in split order (a tqdm bar if ``progress``);
    ``decode_on_device``: see :func:`image_batches`."""
    batches = image_batches(split, backbone.preprocess, backbone.device, batch_size, num_workers, decode_on_device)
    total = -(-len(split) // batch_size)
    features, labels = [], []
    for pixels, label in tqdm(batches, desc=desc, unit="batch", total=total, disable=not progress):
        features.append(backbone.encode_images(pixels).cpu())
        labels.append(label)
    return torch.cat(features).numpy().astype(np.float32), torch.cat(labels).numpy()


def cached_image_features(
    backbone, split, fingerprint: str, cache_dir: str | Path | None, **kwargs
) -> tuple[np.ndarray, np.ndarray, bool]:
    """:func:`image_features`, stored under ``cache_dir``; returns (features, labels, hit).

    Keyed by ``backbone.cache_id`` (the weights actually loaded and the preprocessing), the split content and where
    the images are decoded (another JPEG decoder's pixels may differ slightly).
    """
    where = "|device-decoded" if kwargs.get("decode_on_device") else ""
    key = hashlib.sha256(f"{backbone.cache_id}|{fingerprint}{where}".encode()).hexdigest()[:24]
    path = Path(cache_dir) / f"images-{backbone.name}-{key}.npz" if cache_dir else None
    if path is not None and path.is_file():
        stored = np.load(path)
        return stored["features"], stored["labels"], True
    features, labels = image_features(backbone, split, **kwargs)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, features=features, labels=labels)
    return features, labels, False
