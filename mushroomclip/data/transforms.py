"""The image pipeline of training and evaluation: decode with libjpeg-turbo, resize and crop in uint8,
normalise on the device.

Every transform is built from the backbone's one :class:`PreprocessConfig` (its input size, resize, interpolation,
mean and std, read from the model's own config when it is loaded). Per image, in a DataLoader worker:
TorchCodec decodes the file (EXIF rotation applied, as the ``datasets`` Image feature does), then, for
training, RandomResizedCrop (bicubic, antialiased) and a horizontal flip at the model's input size, or, for
evaluation and prediction alike (:class:`EvalPixels`), the model's resize and centre crop, run on the uint8 tensor. Batches
travel as uint8, a quarter of float32's bytes, and become the model's normalised float input on the device
(:func:`normalize`; ``Backbone.encode_images`` and ``ContrastiveTrainer`` call it).

Measured on one CPU core (500 px JPEGs, 224 px crops): about 1 ms an image, against about 10 ms for the
PIL decode -> PIL crop -> ToTensor -> Normalize chain it replaces; the evaluation crops differ from that
chain's by at most one grey level in our checks. ``make bench-train`` and ``make bench-zero-shot`` measure it against
the model alone.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import os
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision.transforms import v2

from mushroomclip.data.image_jobs import EXIF_ORIENTATION

logger = logging.getLogger(__name__)

try:  # torchvision.io's image decoders moved here (torchvision 0.29)
    from torchcodec.decoders import decode_image as _codec_decode_image
except (ImportError, OSError, RuntimeError):  # a TorchCodec before 0.16 (none), or one built for another torch
    _codec_decode_image = None


def _decode_fast(encoded: torch.Tensor) -> torch.Tensor:
    """JPEG / PNG bytes as RGB pixels, EXIF orientation applied: TorchCodec's decoder, else (an older TorchCodec, or
    one that does not load with this torch) the same libjpeg-turbo / libpng decoder in torchvision.io."""
    if _codec_decode_image is not None:
        return _codec_decode_image(encoded, mode="RGB", output_dtype="auto")
    from torchvision.io import ImageReadMode
    from torchvision.io import decode_image as torchvision_decode_image

    return torchvision_decode_image(encoded, mode=ImageReadMode.RGB, apply_exif_orientation=True)


# JPEG and PNG, nearly all of the data, go through TorchCodec (libjpeg-turbo, libpng); anything else (WebP, BMP, TIFF, a JPEG
# flavour libjpeg-turbo refuses) through Pillow, which validated every image when the data was prepared.
_FAST_SIGNATURES = (b"\xff\xd8", b"\x89PNG")


class ImageError(ValueError):
    """An image that cannot be read or decoded, or is too large to decode safely. ``reason`` is the cause
    alone, for callers (``predict.py``) whose advice differs from the prepared-data hint in the message.
    Built from the message alone too, as DataLoader does when it re-raises a worker's error."""

    def __init__(self, message: str, where: str = "", reason: str = ""):
        super().__init__(message)
        self.where, self.reason = where, reason or message


def _image_error(where: str, reason: str, hint: str, action: str = "decode") -> ImageError:
    return ImageError(f"cannot {action} {where} ({reason}){hint}", where, reason)


_PREPARED_HINT = (
    ": the file changed or broke after the data was prepared: re-run data_scripts/prepare_kaggle.py, "
    "which skips and reports corrupt images"
)
_MOVED_HINT = ": was the prepared data folder moved or changed? Re-run data_scripts/prepare_kaggle.py"


def _open_checked(data: bytes, where: str):
    """``PIL.Image.open`` (header only), refusing an image over Pillow's decompression-bomb limit
    (``Image.MAX_IMAGE_PIXELS``) before any decoder, Pillow's or torchvision's, allocates its pixels."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        size = re.search(r"\d+ pixels", str(err))
        raise _image_error(
            where,
            f"{size.group(0) if size else 'too many pixels'}: over Pillow's decompression-bomb "
            f"limit, PIL.Image.MAX_IMAGE_PIXELS = {Image.MAX_IMAGE_PIXELS}; downscale it",
            "",
        ) from None
    except UnidentifiedImageError:
        raise _image_error(where, "not an image file, or a format Pillow cannot read", _PREPARED_HINT) from None


def encoded_bytes(image: dict) -> bytes:
    """A ``datasets`` image cell's file bytes (``{"bytes", "path"}``, read from ``path`` when ``bytes`` is None); a
    file that cannot be read is an :class:`ImageError` naming it."""
    if image.get("bytes") is not None:
        return image["bytes"]
    try:
        return Path(image["path"]).read_bytes()
    except OSError as err:
        reason = type(err).__name__ + (f": {err.strerror}" if err.strerror else "")
        raise _image_error(image["path"], reason, _MOVED_HINT, action="read") from None


def decode_rgb(image) -> torch.Tensor:
    """A ``datasets`` image cell (``{"bytes", "path"}`` with ``decode=False``), a file path or a PIL image
    as a ``(3, H, W)`` uint8 tensor, upright (EXIF orientation applied). Anything unreadable, undecodable
    or over the decompression-bomb limit is an :class:`ImageError` naming it."""
    if isinstance(image, Image.Image):
        return _pil_rgb(image)
    if isinstance(image, (str, Path)):
        image = {"bytes": None, "path": str(image)}
    where = image.get("path") or "an in-memory image"
    data = encoded_bytes(image)
    try:
        with _open_checked(data, where) as pil:
            if data.startswith(_FAST_SIGNATURES):
                encoded = torch.frombuffer(bytearray(data), dtype=torch.uint8)
                with contextlib.suppress(RuntimeError):  # a flavour libjpeg-turbo refuses: Pillow below
                    pixels = _decode_fast(encoded)  # EXIF orientation applied
                    # a 16-bit PNG decodes to uint16: keep its 8 high bits, as for any other photo
                    return pixels if pixels.dtype == torch.uint8 else (pixels.to(torch.int32) >> 8).to(torch.uint8)
            return _pil_rgb(pil)
    except ImageError:
        raise
    except (OSError, SyntaxError, ValueError) as err:
        raise _image_error(where, f"{type(err).__name__}: {err}", _PREPARED_HINT) from None


def _pil_rgb(pil) -> torch.Tensor:
    """A PIL image as upright ``(3, H, W)`` uint8 RGB; 16/32-bit greyscale is scaled to 8 bits (Pillow's own
    conversion would clip it to white)."""
    pil = ImageOps.exif_transpose(pil)
    if pil.mode.startswith("I"):
        high = np.clip(np.asarray(pil).astype(np.int64), 0, 65535) >> 8
        pil = Image.fromarray(high.astype(np.uint8))  # 2-D uint8: mode L
    return v2.functional.pil_to_tensor(pil.convert("RGB"))


TENSOR_INTERPOLATIONS = ("nearest", "nearest-exact", "bilinear", "bicubic")


@dataclass(frozen=True)
class PreprocessConfig:
    """A backbone's image preprocessing, read from its own config when it is loaded (the HF image processor,
    open_clip's ``preprocess_cfg``): the one definition that training, evaluation and prediction build from."""

    size: tuple[int, int]  # (height, width) of the model's input: the centre crop, and the training crops
    resize_size: int | tuple[int, int]  # torchvision Resize: an int resizes the short side, (h, w) the whole image
    interpolation: str  # a torchvision InterpolationMode value: "bicubic", "bilinear", ...
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self):
        if self.interpolation not in TENSOR_INTERPOLATIONS:
            raise ValueError(
                f"image interpolation {self.interpolation!r} is not one of {', '.join(TENSOR_INTERPOLATIONS)}, "
                "the modes torchvision resizes uint8 tensors with"
            )


def pixel_stats(preprocess: PreprocessConfig) -> tuple[list[float], list[float]]:
    """The model's own ``(mean, std)``, for :func:`normalize`."""
    return list(preprocess.mean), list(preprocess.std)


def eval_transform(preprocess: PreprocessConfig) -> v2.Compose:
    """The model's evaluation preprocessing (resize, centre crop) as uint8 tensor ops; normalising runs later,
    on the device."""
    interpolation = v2.InterpolationMode(preprocess.interpolation)
    return v2.Compose(
        [
            v2.Resize(preprocess.resize_size, interpolation=interpolation, antialias=True),
            v2.CenterCrop(preprocess.size),
        ]
    )


class EvalPixels:
    """An image (file path, ``datasets`` cell or PIL image) as the model's evaluation input, for evaluation
    and prediction alike: upright (EXIF applied), then the model's resize and centre crop on uint8 (normalised
    later on the device)."""

    def __init__(self, preprocess: PreprocessConfig):
        self.transform = eval_transform(preprocess)

    def __call__(self, image) -> torch.Tensor:
        return self.transform(decode_rgb(image))


def device_decoder_name() -> str:
    """The batch JPEG decoder :class:`DeviceEvalPixels` uses: TorchCodec's where it loads, else torchvision.io's."""
    return "torchcodec" if _codec_decode_image is not None else "torchvision.io"


def _decode_jpegs(encoded: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """JPEG bytes as RGB pixels on ``device``, decoded as one batch (nvJPEG on a GPU), by
    :func:`device_decoder_name`'s decoder."""
    if _codec_decode_image is not None:
        from torchcodec.decoders import decode_jpeg

        return decode_jpeg(list(encoded), mode="RGB", device=device)
    with warnings.catch_warnings():  # deprecated in torchvision 0.29 in favour of TorchCodec's, used above
        warnings.simplefilter("ignore", DeprecationWarning)
        from torchvision.io import ImageReadMode, decode_jpeg

        return decode_jpeg(list(encoded), mode=ImageReadMode.RGB, device=device)


def device_decodable(data: bytes) -> bool:
    """Whether :class:`DeviceEvalPixels` can give ``data`` to the batch decoder as it is: a JPEG, within Pillow's
    decompression-bomb limit, without an EXIF rotation (torchvision's CUDA decoder ignores one). Anything else goes
    through :func:`decode_rgb` on the CPU, which applies the rotation or names what is wrong. Reads the header only:
    cheap enough for a DataLoader worker."""
    if not data.startswith(_FAST_SIGNATURES[0]):
        return False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                return image.getexif().get(EXIF_ORIENTATION, 1) == 1
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError, Image.DecompressionBombWarning):
        return False


class DeviceDecoderError(RuntimeError):
    """The device's JPEG decoder refused every JPEG of the first batch: it does not work here."""


class DeviceEvalPixels:
    """Encoded images (a file's bytes) as a batch of the model's evaluation input, made on ``device``: the JPEGs
    :func:`device_decodable` accepts are decoded together there (nvJPEG on a GPU), then :func:`eval_transform`'s
    resize and centre crop, the same ops as :class:`EvalPixels` runs per image in a worker. The rest, and a JPEG
    the device's decoder refuses (tried again on its own), go through :func:`decode_rgb` on the CPU; ``counts``
    says how many images went each way. If the decoder refuses every JPEG of the first batch, it does not work
    here: :class:`DeviceDecoderError`."""

    def __init__(self, preprocess: PreprocessConfig, device: str | torch.device):
        self.transform = eval_transform(preprocess)
        self.size = preprocess.size
        self.device = torch.device(device)
        self.counts = {"decoder": device_decoder_name(), "on_device": 0, "on_cpu": 0, "refused_by_device_decoder": 0}
        self.first_refusal: str | None = None

    def __call__(
        self, encoded: Sequence[bytes], paths: Sequence[str | None] = (), decodable: Sequence[bool] = ()
    ) -> torch.Tensor:
        paths = list(paths) or [None] * len(encoded)
        decodable = list(decodable) or [device_decodable(data) for data in encoded]
        pixels: list[torch.Tensor | None] = [None] * len(encoded)
        jpegs = [i for i, ok in enumerate(decodable) if ok]
        first = self.counts["on_device"] + self.counts["refused_by_device_decoder"] == 0
        self._decode_on_device(encoded, jpegs, paths, pixels)
        if first and jpegs and all(pixels[i] is None for i in jpegs):
            raise DeviceDecoderError(
                f"the {self.counts['decoder']} JPEG decoder on {self.device} refused every JPEG of the first batch "
                f"({self.first_refusal}): leave out --decode-on-device"
            )
        for i, image in enumerate(pixels):
            if image is None:
                pixels[i] = decode_rgb({"bytes": bytes(encoded[i]), "path": paths[i]}).to(self.device)
                self.counts["on_cpu"] += 1
        # images of one size are resized and cropped together: one kernel per size, not per image
        by_size: dict[tuple, list[int]] = {}
        for i, image in enumerate(pixels):
            by_size.setdefault(tuple(image.shape), []).append(i)
        out = torch.empty((len(pixels), 3, *self.size), dtype=torch.uint8, device=self.device)
        for indices in by_size.values():
            out[indices] = self.transform(torch.stack([pixels[i] for i in indices]))
        return out

    def _decode_on_device(self, encoded, indices: list[int], paths: list, pixels: list) -> None:
        """Decode ``indices`` as one batch into ``pixels``; if the decoder refuses the batch, each image on its own
        (a refused one stays None)."""
        if not indices:
            return
        tensors = [torch.frombuffer(bytearray(encoded[i]), dtype=torch.uint8) for i in indices]
        try:
            images = _decode_jpegs(tensors, self.device)
        except RuntimeError as err:
            if len(indices) > 1:
                for i in indices:
                    self._decode_on_device(encoded, [i], paths, pixels)
                return
            self.counts["refused_by_device_decoder"] += 1
            if self.first_refusal is None:
                self.first_refusal = f"{paths[indices[0]] or 'an image'}: {str(err).splitlines()[0]}"
                logger.warning("the device's JPEG decoder refused %s; it is decoded on the CPU", self.first_refusal)
            return
        for i, image in zip(indices, images, strict=True):
            pixels[i] = image
        self.counts["on_device"] += len(indices)


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def image_files(paths: list[str]) -> tuple[list[Path], list[str]]:
    """Files as given and, for each folder, the image files anywhere under it (by suffix, sorted, hidden
    ones left out); plus one message per argument that is neither a file nor a folder holding images."""
    files, problems = [], []
    for arg in map(Path, paths):
        if arg.is_dir():
            found = sorted(
                p
                for p in arg.rglob("*")
                if p.suffix.lower() in IMAGE_SUFFIXES
                and p.is_file()
                and not any(part.startswith(".") for part in p.relative_to(arg).parts)
            )
            files += found
            if not found:
                problems.append(f"no image files in folder {arg} (looked for {', '.join(IMAGE_SUFFIXES)})")
        elif arg.is_file():
            files.append(arg)
        else:
            problems.append(f"cannot read image {arg}: no such file or folder")
    return files, problems


class TrainAugment:
    """Image cell -> augmented ``(3, crop, crop)`` uint8 tensor: RandomResizedCrop (scale 0.5-1,
    bicubic) and a horizontal flip, at the model's crop size. Picklable, for DataLoader workers."""

    def __init__(self, preprocess: PreprocessConfig):
        self.ops = v2.Compose(
            [
                v2.RandomResizedCrop(
                    preprocess.size, scale=(0.5, 1.0), interpolation=v2.InterpolationMode.BICUBIC, antialias=True
                ),
                v2.RandomHorizontalFlip(),
            ]
        )

    def __call__(self, image) -> torch.Tensor:
        return self.ops(decode_rgb(image))

    def batch(self, rows: dict) -> dict:
        """``datasets.Dataset.with_transform`` adapter: ``{"image", "label"}`` -> ``{"pixel_values", "labels"}``."""
        return {"pixel_values": [self(im) for im in rows["image"]], "labels": rows["label"]}


def train_images(split, preprocess: PreprocessConfig):
    """A ``datasets`` split of ``image``/``label`` as augmented uint8 ``pixel_values`` + ``labels``.

    Images are read undecoded (``decode=False``) so that :func:`decode_rgb`, not Pillow, decodes them.
    """
    augment = TrainAugment(preprocess)
    split = split.select_columns(["image", "label"]).cast_column("image", datasets.Image(decode=False))
    return split.with_transform(augment.batch)


def normalize(
    pixels: torch.Tensor, mean: torch.Tensor | Sequence[float], std: torch.Tensor | Sequence[float]
) -> torch.Tensor:
    """uint8 ``(N, 3, H, W)`` -> the model's float input, ``(x / 255 - mean) / std``; float input passes through."""
    if pixels.dtype != torch.uint8:
        return pixels
    mean = torch.as_tensor(mean, dtype=torch.float32, device=pixels.device).view(1, -1, 1, 1)
    std = torch.as_tensor(std, dtype=torch.float32, device=pixels.device).view(1, -1, 1, 1)
    return (pixels.float() / 255.0 - mean) / std


WORKER_NICENESS = 10


def background_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: decode at a lower CPU priority than the process that drives the GPU,
    so that where every core is busy, launching the next kernels comes first."""
    with contextlib.suppress(OSError):
        os.nice(WORKER_NICENESS)


def _then_background(first, worker_id: int) -> None:
    if first is not None:
        first(worker_id)
    background_worker(worker_id)


def background_workers(first=None):
    """``first`` (e.g. Trainer's worker seeding), then :func:`background_worker`; picklable."""
    return functools.partial(_then_background, first)
