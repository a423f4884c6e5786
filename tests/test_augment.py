"""The training image pipeline: torchvision decoding, uint8 augmentation, normalisation on the device."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from mushroomclip.data.transforms import (
    EvalPixels,
    PreprocessConfig,
    TrainAugment,
    decode_rgb,
    normalize,
    pixel_stats,
    train_images,
)
from mushroomclip.models.backbones import (
    ModelLoadError,
    load_backbone,
    preprocess_from_image_processor,
    preprocess_from_open_clip,
    tiny_image_processor,
)


def encoded(image: Image.Image, fmt: str, **save) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **save)
    return buf.getvalue()


def gradient(w: int = 40, h: int = 24) -> Image.Image:
    return Image.frombytes(
        "RGB", (w, h), bytes((x * 5 + c * 60) % 256 for _ in range(h) for x in range(w) for c in range(3))
    )


def square(size: int, mean, std) -> PreprocessConfig:
    return PreprocessConfig(size=(size, size), resize_size=size, interpolation="bicubic", mean=mean, std=std)


@pytest.mark.parametrize("fmt", ["PNG", "BMP", "WEBP"])
def test_lossless_formats_decode_to_the_same_pixels_as_pillow(fmt):
    image = gradient()
    pixels = decode_rgb({"bytes": encoded(image, fmt, **({"lossless": True} if fmt == "WEBP" else {})), "path": None})
    assert pixels.dtype == torch.uint8 and pixels.shape == (3, 24, 40)
    assert torch.equal(pixels, T.PILToTensor()(image))


def test_jpeg_decodes_close_to_pillow_and_gray_or_rgba_become_rgb():
    image = gradient()
    pixels = decode_rgb({"bytes": encoded(image, "JPEG", quality=95), "path": None})
    pil = T.PILToTensor()(Image.open(io.BytesIO(encoded(image, "JPEG", quality=95))).convert("RGB"))
    assert pixels.shape == pil.shape and (pixels.int() - pil.int()).abs().max() <= 3  # libjpeg versions differ
    assert decode_rgb({"bytes": encoded(image.convert("L"), "PNG"), "path": None}).shape == (3, 24, 40)
    assert decode_rgb({"bytes": encoded(image.convert("RGBA"), "PNG"), "path": None}).shape == (3, 24, 40)
    assert torch.equal(decode_rgb(image), T.PILToTensor()(image))  # an already decoded PIL image


def test_exif_rotation_is_applied_as_the_datasets_image_feature_does():
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    data = encoded(gradient(), "JPEG", quality=95, exif=exif)
    assert decode_rgb({"bytes": data, "path": None}).shape == (3, 40, 24)


def test_without_torchcodecs_image_decoders_torchvision_decodes_the_same_pixels(monkeypatch):
    """With an older torch (pyproject allows 2.9) TorchCodec's image decoders may be missing (before 0.16) or not
    load (built for another torch): torchvision.io's decoder (the same libjpeg-turbo / libpng) gives the same pixels."""
    import warnings

    from mushroomclip.data import transforms

    exif = Image.Exif()
    exif[0x0112] = 6
    photos = [
        encoded(gradient(), "JPEG", quality=95, exif=exif),
        encoded(gradient(), "PNG"),
        encoded(gradient().convert("L"), "PNG"),
        encoded(Image.fromarray(np.arange(24 * 40, dtype=np.uint16).reshape(24, 40) * 60), "PNG"),  # 16-bit
    ]
    expected = [decode_rgb({"bytes": data, "path": None}) for data in photos]
    monkeypatch.setattr(transforms, "_codec_decode_image", None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torchvision 0.29 deprecates its decoders
        for data, pixels in zip(photos, expected, strict=True):
            assert torch.equal(decode_rgb({"bytes": data, "path": None}), pixels)


def test_corrupt_file_is_a_clear_error_naming_it(tmp_path):
    path = tmp_path / "broken.jpg"
    path.write_bytes(encoded(gradient(), "JPEG")[:60])
    with pytest.raises(ValueError, match=r"cannot decode .*broken\.jpg.*prepare_kaggle"):
        decode_rgb({"bytes": None, "path": str(path)})


def test_device_normalisation_equals_the_models_own_to_tensor_and_normalize():
    preprocess = square(32, (0.48, 0.45, 0.40), (0.26, 0.26, 0.27))
    image = gradient(32, 32)
    mean, std = pixel_stats(preprocess)
    ours = normalize(T.PILToTensor()(image)[None], torch.tensor(mean), torch.tensor(std))
    reference = T.Compose([T.ToTensor(), T.Normalize(mean, std)])(image)[None]
    assert ours.dtype == torch.float32 and torch.allclose(ours, reference, atol=1e-6)
    assert normalize(reference, torch.tensor(mean), torch.tensor(std)) is reference  # float input passes through


def test_augmented_training_batches_are_uint8_crops_at_the_models_size(prepared):
    from mushroomclip.data.splits import load_splits

    preprocess = square(32, (0.5,) * 3, (0.5,) * 3)
    split = load_splits(prepared[0])["train"]
    rows = train_images(split, preprocess)[:4]
    assert [tuple(p.shape) for p in rows["pixel_values"]] == [(3, 32, 32)] * 4
    assert all(p.dtype == torch.uint8 for p in rows["pixel_values"]) and rows["labels"] == split["label"][:4]
    torch.manual_seed(0)
    a = TrainAugment(preprocess)(gradient(64, 48))
    torch.manual_seed(0)
    assert torch.equal(a, TrainAugment(preprocess)(gradient(64, 48)))  # augmentation follows the seed


def _grey_levels(pixels: torch.Tensor, reference: torch.Tensor, preprocess: PreprocessConfig) -> float:
    """The largest difference between our uint8 crop, normalised, and a library's float input, in 0-255 grey levels."""
    ours = normalize(pixels[None], torch.tensor(preprocess.mean), torch.tensor(preprocess.std))
    return float(((ours - reference).abs() * torch.tensor(preprocess.std).view(1, 3, 1, 1)).max() * 255)


@pytest.mark.parametrize("size", ["shortest_edge", "height_width"])
@pytest.mark.parametrize("resample", [Image.Resampling.BICUBIC, Image.Resampling.BILINEAR])
def test_evaluation_pixels_equal_the_hf_image_processors_own(size, resample):
    from transformers import CLIPImageProcessor

    sizes = {"shortest_edge": {"shortest_edge": 40}, "height_width": {"height": 40, "width": 36}}[size]
    processor = CLIPImageProcessor(
        size=sizes,
        crop_size={"height": 32, "width": 28},
        resample=resample,
        image_mean=[0.5, 0.4, 0.3],
        image_std=[0.2, 0.25, 0.3],
    )
    preprocess = preprocess_from_image_processor(processor)
    assert preprocess.size == (32, 28) and preprocess.mean == (0.5, 0.4, 0.3) and preprocess.std == (0.2, 0.25, 0.3)
    reference = processor(images=gradient(90, 60), return_tensors="pt")["pixel_values"]
    pixels = EvalPixels(preprocess)(gradient(90, 60))
    assert pixels.dtype == torch.uint8 and pixels.shape == reference.shape[1:]
    assert _grey_levels(pixels, reference, preprocess) < 1e-3  # the processor resizes with torchvision too


@pytest.mark.parametrize("resize_mode", ["shortest", "squash"])
def test_evaluation_pixels_match_open_clips_own_transform(resize_mode):
    from open_clip.transform import PreprocessCfg, image_transform_v2

    cfg = dict(load_backbone("tiny-openclip").model.visual.preprocess_cfg, resize_mode=resize_mode)
    reference = image_transform_v2(PreprocessCfg(**cfg), is_train=False)(gradient(90, 60))[None]
    preprocess = preprocess_from_open_clip(cfg)
    pixels = EvalPixels(preprocess)(gradient(90, 60))
    assert pixels.shape == reference.shape[1:] == (3, 32, 32)
    assert _grey_levels(pixels, reference, preprocess) <= 1 + 1e-3  # Pillow's resampling rounds differently


@pytest.mark.parametrize("model", ["tiny-clip", "tiny-openclip"])
def test_every_transform_is_built_from_the_backbones_one_preprocess_config(model, prepared):
    from mushroomclip.data.splits import load_splits

    backbone = load_backbone(model)
    preprocess = backbone.preprocess
    if model == "tiny-clip":  # the randomly initialised HF model carries OpenAI CLIP's processor, at its size
        assert preprocess == preprocess_from_image_processor(tiny_image_processor(32))
    else:
        assert preprocess == preprocess_from_open_clip(backbone.model.visual.preprocess_cfg)
    smaller = PreprocessConfig(**{**vars(preprocess), "size": (16, 16), "resize_size": 20})  # the transforms follow it
    split = load_splits(prepared[0])["train"]
    assert train_images(split, smaller)[0]["pixel_values"].shape == (3, 16, 16)
    assert EvalPixels(smaller)(gradient(90, 60)).shape == (3, 16, 16)
    assert pixel_stats(smaller) == (list(preprocess.mean), list(preprocess.std))


def test_preprocessing_the_uint8_pipeline_cannot_apply_is_a_clear_error():
    with pytest.raises(ValueError, match="image interpolation 'lanczos' is not one of nearest, .*bicubic"):
        PreprocessConfig(size=(32, 32), resize_size=32, interpolation="lanczos", mean=(0.5,) * 3, std=(0.5,) * 3)
    with pytest.raises(ValueError, match=r"resize_mode 'longest', size 32x32\) is not supported"):
        preprocess_from_open_clip({"size": 32, "resize_mode": "longest", "mean": (0.5,) * 3, "std": (0.5,) * 3})
    from types import SimpleNamespace

    from mushroomclip.models.backbones import _open_clip_preprocess, resolve_spec

    longest = SimpleNamespace(visual=SimpleNamespace(preprocess_cfg={"size": 32, "resize_mode": "longest"}))
    with pytest.raises(ModelLoadError, match=r"could not load model 'open_clip:X' \(X\): its preprocessing .*longest"):
        _open_clip_preprocess(longest, "open_clip:X", resolve_spec("open_clip:X"))


class _Niceness(torch.utils.data.Dataset):
    def __len__(self):
        return 1

    def __getitem__(self, index):
        import os

        return os.nice(0), os.environ.get("MUSHROOMCLIP_TEST_SEEDED", "")


def _mark_seeded(worker_id):
    import os

    os.environ["MUSHROOMCLIP_TEST_SEEDED"] = f"worker {worker_id}"


def test_loader_workers_decode_at_lower_priority_after_the_trainers_own_init():
    import os

    from mushroomclip.data.transforms import WORKER_NICENESS, background_workers

    loader = torch.utils.data.DataLoader(_Niceness(), num_workers=1, worker_init_fn=background_workers(_mark_seeded))
    [(niceness, seeded)] = [(int(n), s) for n, [s] in loader]
    assert niceness == min(19, os.nice(0) + WORKER_NICENESS) and seeded == "worker 0"


def test_missing_file_is_a_clear_error_naming_it(tmp_path):
    with pytest.raises(ValueError, match=r"cannot read .*gone\.jpg.*prepare_kaggle"):
        decode_rgb({"bytes": None, "path": str(tmp_path / "gone.jpg")})


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width`` x ``height`` pixels: a decompression bomb's signature."""
    import struct
    import zlib

    small = encoded(Image.new("RGB", (1, 1)), "PNG")
    ihdr = struct.pack(">II", width, height) + small[24:29]  # IHDR data: bytes 16-29, its CRC 29-33
    return small[:16] + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr)) + small[33:]


def test_decompression_bomb_is_refused_from_its_header_before_any_decoder_runs(monkeypatch):
    import mushroomclip.data.transforms as augment

    def no_decoding(*args, **kwargs):
        raise AssertionError("torchvision decoded an image over the pixel limit")

    monkeypatch.setattr(augment, "_decode_fast", no_decoding)
    with pytest.raises(augment.ImageError, match="400000000 pixels: over Pillow's decompression-bomb limit") as err:
        decode_rgb({"bytes": png_claiming(20000, 20000), "path": "bomb.png"})
    assert err.value.where == "bomb.png" and "MAX_IMAGE_PIXELS" in err.value.reason
    # Pillow only warns between the limit and twice the limit; decoding refuses there too
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(augment.ImageError, match="1500 pixels: over"):
        decode_rgb({"bytes": encoded(gradient(50, 30), "JPEG"), "path": "big.jpg"})


def test_not_an_image_is_a_clear_error_with_a_short_reason(tmp_path):
    from mushroomclip.data.transforms import ImageError

    path = tmp_path / "notes.jpg"
    path.write_text("not a photo")
    with pytest.raises(ImageError, match=r"cannot decode .*notes\.jpg \(not an image file") as err:
        decode_rgb(path)  # a plain path, as predict.py passes it
    assert err.value.reason == "not an image file, or a format Pillow cannot read"


def test_image_files_expands_folders_recursively_in_sorted_order(tmp_path):
    from mushroomclip.data.transforms import image_files

    for name in ("b/2.JPG", "b/1.png", "a.jpeg", "notes.txt", ".hidden/x.jpg", "b/.y.jpg"):
        (tmp_path / "photos" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "photos" / name).write_bytes(b"")
    (tmp_path / "empty").mkdir()
    single = tmp_path / "photos" / "notes.txt"
    files, problems = image_files([str(tmp_path / "photos"), str(single), str(tmp_path / "empty"), "nope.jpg"])
    assert [p.relative_to(tmp_path / "photos").as_posix() for p in files] == [
        "a.jpeg",
        "b/1.png",
        "b/2.JPG",
        "notes.txt",
    ]
    assert problems == [
        f"no image files in folder {tmp_path / 'empty'} (looked for .jpg, .jpeg, .png, .webp, .bmp, .gif, .tif, .tiff)",
        "cannot read image nope.jpg: no such file or folder",
    ]


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_a_16_bit_greyscale_photo_decodes_to_its_8_high_bits(fmt):
    """A 16-bit PNG decodes to uint16 in torchvision and clips to white in Pillow's own conversion."""
    import io

    import numpy as np
    from PIL import Image

    grey16 = (np.arange(48 * 40).reshape(48, 40) * 31).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(grey16).save(buf, format=fmt)
    pixels = decode_rgb({"bytes": buf.getvalue(), "path": None})
    assert pixels.dtype == torch.uint8 and pixels.shape == (3, 48, 40)
    expected = torch.from_numpy((grey16 >> 8).astype(np.uint8))
    assert all(torch.equal(channel, expected) for channel in pixels)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_jpeg_and_png_decode_through_torchcodec_to_torchvisions_former_pixels(fmt):
    """torchvision 0.29 deprecates its image decoders for TorchCodec's: the same pixels, no warning to silence."""
    import warnings

    from torchvision.io import ImageReadMode
    from torchvision.io import decode_image as torchvision_decode

    from mushroomclip.data import transforms

    assert transforms._codec_decode_image.__module__.startswith("torchcodec")  # this torch has them
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encoded(gradient(), fmt, **({"quality": 90, "exif": exif} if fmt == "JPEG" else {}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        before = torchvision_decode(
            torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB, apply_exif_orientation=True
        )
    assert torch.equal(decode_rgb({"bytes": data, "path": None}), before)


def _photos() -> list[bytes]:
    """JPEGs (two of one size), an EXIF-rotated JPEG, a greyscale JPEG, a PNG and a WebP: what a prepared folder can
    hold."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return [
        encoded(gradient(90, 60), "JPEG", quality=90),
        encoded(gradient(90, 60).transpose(Image.Transpose.FLIP_LEFT_RIGHT), "JPEG", quality=90),
        encoded(gradient(64, 48), "JPEG", quality=95, exif=exif),
        encoded(gradient(50, 70).convert("L"), "JPEG"),
        encoded(gradient(80, 40), "PNG"),
        encoded(gradient(40, 80), "WEBP", lossless=True),
    ]


@pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")  # torchvision 0.29's, without TorchCodec
@pytest.mark.parametrize("torchcodec", [True, False])
def test_device_decoding_gives_the_workers_pixels(monkeypatch, torchcodec):
    """--decode-on-device (issue 13): a batch of encoded images decoded and preprocessed on the device equals
    EvalPixels' per-image result; on the CPU the decoder is the same libjpeg-turbo, so exactly (with TorchCodec
    and with torchvision.io's decoder). The EXIF-rotated JPEG, the PNG and the WebP take the CPU path (torchvision's
    CUDA decoder would ignore the rotation), and the counts say so."""
    from mushroomclip.data import transforms
    from mushroomclip.data.transforms import DeviceEvalPixels, device_decodable

    preprocess = square(32, (0.5,) * 3, (0.5,) * 3)
    photos = _photos()
    expected = torch.stack([EvalPixels(preprocess)({"bytes": data, "path": None}) for data in photos])
    if not torchcodec:
        monkeypatch.setattr(transforms, "_codec_decode_image", None)
    assert [device_decodable(data) for data in photos] == [True, True, False, True, False, False]
    decoder = DeviceEvalPixels(preprocess, "cpu")
    pixels = decoder(photos)
    assert pixels.dtype == torch.uint8 and pixels.shape == (6, 3, 32, 32)
    assert torch.equal(pixels, expected)
    assert decoder.counts == {
        "decoder": "torchcodec" if torchcodec else "torchvision.io",
        "on_device": 3,
        "on_cpu": 3,
        "refused_by_device_decoder": 0,
    }


def test_a_jpeg_the_device_decoder_refuses_alone_is_decoded_on_the_cpu(monkeypatch, caplog):
    """A batch the device's decoder refuses is tried again image by image: only the refused JPEG takes the CPU path
    (with a warning naming it), and it is counted. A decoder that refuses every JPEG of the first batch does not
    work here: a clear error, not a silent run on the CPU reported as decoded on the device."""
    from mushroomclip.data import transforms
    from mushroomclip.data.transforms import DeviceDecoderError, DeviceEvalPixels

    preprocess = square(32, (0.5,) * 3, (0.5,) * 3)
    photos = _photos()
    refused = photos[1]
    real = transforms._decode_jpegs

    def picky(encoded, device):
        if any(bytes(e.numpy()) == refused for e in encoded):
            raise RuntimeError("nvjpeg: unsupported")
        return real(encoded, device)

    monkeypatch.setattr(transforms, "_decode_jpegs", picky)
    decoder = DeviceEvalPixels(preprocess, "cpu")
    expected = torch.stack([EvalPixels(preprocess)({"bytes": data, "path": None}) for data in photos])
    assert torch.equal(decoder(photos, [f"{i}.jpg" for i in range(6)]), expected)
    assert (decoder.counts["on_device"], decoder.counts["on_cpu"], decoder.counts["refused_by_device_decoder"]) == (
        2,
        4,
        1,
    )
    assert "refused 1.jpg: nvjpeg: unsupported" in caplog.text

    def broken(encoded, device):
        raise RuntimeError("not compiled with nvjpeg")

    monkeypatch.setattr(transforms, "_decode_jpegs", broken)
    with pytest.raises(DeviceDecoderError, match="refused every JPEG of the first batch .*not compiled with nvjpeg"):
        DeviceEvalPixels(preprocess, "cpu")(photos)


def test_device_decoding_of_a_broken_jpeg_names_it(tmp_path):
    """One broken JPEG in a batch: the batch decoder refuses it, each image is decoded on its own, and the broken one
    is the same one-line error as on the workers' path, naming the file."""
    from mushroomclip.data.transforms import DeviceEvalPixels, ImageError

    photos = _photos()[:2] + [encoded(gradient(), "JPEG")[:60]]  # the third: cut short
    with pytest.raises(ImageError, match=r"cannot decode .*broken\.jpg.*prepare_kaggle"):
        DeviceEvalPixels(square(32, (0.5,) * 3, (0.5,) * 3), "cpu")(photos, [None, None, str(tmp_path / "broken.jpg")])
