"""Vision-language backbones behind one small interface: HF ``CLIPModel`` and open_clip (BioCLIP).

``load_backbone("clip-b32")`` or ``load_backbone("bioclip")`` gives a :class:`Backbone` with
``encode_images`` / ``encode_texts`` (L2-normalised), ``logit_scale``, the model's own image
``preprocess`` and its ``tokenizer``. ``tiny-clip`` and ``tiny-openclip`` are randomly initialised,
built from configs, and need no network: tests and the offline demo use them.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from importlib import resources
from pathlib import Path

import torch
import torch.nn.functional as F
from torchvision import transforms as T

CONTEXT_LENGTH = 77
# OpenAI CLIP's normalisation; only the tiny offline models use it directly.
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


class ModelLoadError(RuntimeError):
    """A backbone could not be built or downloaded."""


@dataclass(frozen=True)
class ModelSpec:
    kind: str  # "hf" or "open_clip"
    source: str | None  # hub id / open_clip name; None for the tiny offline models
    pretrained: str | None = None  # open_clip pretrained tag
    description: str = ""
    tiny: bool = False


REGISTRY: dict[str, ModelSpec] = {
    "clip-b32": ModelSpec("hf", "openai/clip-vit-base-patch32", description="OpenAI CLIP ViT-B/32"),
    "clip-b16": ModelSpec("hf", "openai/clip-vit-base-patch16", description="OpenAI CLIP ViT-B/16"),
    "clip-l14": ModelSpec("hf", "openai/clip-vit-large-patch14", description="OpenAI CLIP ViT-L/14"),
    "bioclip": ModelSpec("open_clip", "hf-hub:imageomics/bioclip", description="BioCLIP ViT-B/16 (TreeOfLife-10M)"),
    "bioclip-2": ModelSpec("open_clip", "hf-hub:imageomics/bioclip-2", description="BioCLIP 2 ViT-L/14 (TreeOfLife-200M)"),
    "openclip-b32-laion2b": ModelSpec("open_clip", "ViT-B-32", "laion2b_s34b_b79k", description="OpenCLIP ViT-B/32 LAION-2B"),
    "tiny-clip": ModelSpec("hf", None, description="offline test model: HF CLIPConfig, 2 layers, width 32, random", tiny=True),
    "tiny-openclip": ModelSpec("open_clip", None, description="offline test model: open_clip ViT, 2 layers, width 32, random", tiny=True),
}  # fmt: skip


def resolve_spec(name: str) -> ModelSpec:
    """A registry name, ``hf:<hub id or folder>``, or ``open_clip:<name>[@<pretrained tag>]``."""
    if name in REGISTRY:
        return REGISTRY[name]
    if name.startswith("hf:"):
        return ModelSpec("hf", name[3:], description=name)
    if name.startswith("open_clip:"):
        arch, _, tag = name[len("open_clip:") :].partition("@")
        return ModelSpec("open_clip", arch, tag or None, description=name)
    raise ValueError(
        f"unknown model {name!r}; valid names: {', '.join(REGISTRY)}, "
        "or hf:<hub id or folder>, or open_clip:<architecture>[@<pretrained tag>]"
    )


@dataclass
class Backbone:
    """A CLIP-style model with its own preprocessing and tokenizer. Embeddings come out L2-normalised."""

    name: str
    kind: str
    model: torch.nn.Module
    preprocess: T.Compose  # PIL image -> normalised tensor, from the model's own config
    tokenize: object  # list[str] -> LongTensor (N, L), L <= 77
    cache_id: str  # identifies weights + preprocessing for on-disk caches
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32

    def to(self, device: str | torch.device, dtype: torch.dtype = torch.float32) -> Backbone:
        self.device, self.dtype = torch.device(device), dtype
        self.model.to(self.device, dtype)
        return self

    @cached_property
    def _pixel_stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mean, std)`` of ``preprocess``, for uint8 input: read once, not at every batch."""
        from mushroomclip.augment import pixel_stats

        mean, std = pixel_stats(self.preprocess)
        return torch.tensor(mean), torch.tensor(std)

    @property
    def logit_scale(self) -> float:
        return self.model.logit_scale.exp().item()

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """``(N, 3, H, W)`` preprocessed pixels, float (normalised) or uint8 (normalised here, on the device)."""
        if pixels.dtype == torch.uint8:
            from mushroomclip.augment import normalize

            pixels = normalize(pixels.to(self.device, non_blocking=True), *self._pixel_stats)
        pixels = pixels.to(self.device, self.dtype, non_blocking=True)
        if self.kind == "hf":
            features = self.model.get_image_features(pixel_values=pixels).pooler_output  # transformers 5.x
        else:
            features = self.model.encode_image(pixels)
        return F.normalize(features.float(), dim=-1)

    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        ids = self.tokenize(texts).to(self.device)
        if self.kind == "hf":
            features = self.model.get_text_features(input_ids=ids).pooler_output
        else:
            features = self.model.encode_text(ids)
        return F.normalize(features.float(), dim=-1)


# --- tokenizer -----------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _openai_bpe() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """OpenAI CLIP's BPE vocabulary and merges, rebuilt from the copy bundled with open_clip (no network)."""
    from open_clip.tokenizer import bytes_to_unicode

    path = resources.files("open_clip").joinpath("bpe_simple_vocab_16e6.txt.gz")
    lines = gzip.decompress(path.read_bytes()).decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    merges = [tuple(line.split()) for line in lines]
    tokens = list(bytes_to_unicode().values())
    tokens += [t + "</w>" for t in tokens] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def offline_clip_tokenizer():
    """A ``transformers.CLIPTokenizer`` identical to openai/clip-vit-*'s, built without a download."""
    from transformers import CLIPTokenizer

    vocab, merges = _openai_bpe()
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=CONTEXT_LENGTH)


def _hf_tokenize(tokenizer):
    """Token ids padded to the longest text, not to 77: mushroom prompts are ~30 tokens long.

    Exact for CLIP's text tower: attention is causal and the embedding is read at the first
    end-of-text token, so the padding after it never reaches the output. Training encodes every
    class prompt each step, so this cuts the text tower's cost by more than half.
    """

    def tokenize(texts: list[str]) -> torch.Tensor:
        return tokenizer(texts, padding="longest", truncation=True, max_length=CONTEXT_LENGTH, return_tensors="pt")[
            "input_ids"
        ]

    return tokenize


# --- builders ------------------------------------------------------------------------------------


def to_rgb(image):
    return image.convert("RGB")


def clip_transform(image_size: int, mean, std, resize: int | None = None) -> T.Compose:
    """CLIP evaluation preprocessing: bicubic resize of the short side, centre crop, normalise."""
    return T.Compose(
        [
            T.Resize(resize or image_size, interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(image_size),
            T.Lambda(to_rgb),
            T.ToTensor(),
            T.Normalize(mean, std),
        ]
    )


def tiny_clip_config():
    """2 layers, width 32, 32 px images: the offline HF test model (also the shape of ``tiny.yaml``)."""
    from transformers import CLIPConfig

    common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    return CLIPConfig(
        text_config=dict(common, vocab_size=49408, max_position_embeddings=CONTEXT_LENGTH, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407),
        vision_config=dict(common, image_size=32, patch_size=8),
        projection_dim=32,
    )  # fmt: skip


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face Hub can be reached: one TCP connection, no retries (DNS failure is instant)."""
    import os
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("0", "", "false"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _size_value(size, key: str) -> int | None:
    """A side length from an image processor's size field: an int, a dict, or transformers 5's SizeDict."""
    if size is None or isinstance(size, int):
        return size
    return size.get(key) if isinstance(size, dict) else getattr(size, key, None)


def _load_hf(name: str, spec: ModelSpec, random_weights: bool) -> Backbone:
    from transformers import CLIPConfig, CLIPModel

    if spec.tiny or random_weights:
        torch.manual_seed(0)  # the same random weights in every process: caches and tests rely on it
        config = tiny_clip_config() if spec.tiny else CLIPConfig()  # CLIPConfig() is the ViT-B/32 shape
        model = CLIPModel(config).eval()
        vision = config.vision_config
        preprocess = clip_transform(vision.image_size, OPENAI_MEAN, OPENAI_STD)
        tokenizer = offline_clip_tokenizer()
        cache_id = f"{name}:random:{hashlib.sha256(config.to_json_string().encode()).hexdigest()[:12]}"
    else:
        from transformers import CLIPImageProcessor, CLIPTokenizer

        # Offline, use the local cache only: otherwise every file is retried with back-off for a minute.
        local_only = not Path(spec.source).is_dir() and not hub_reachable()
        try:
            model = CLIPModel.from_pretrained(spec.source, local_files_only=local_only).eval()
            processor = CLIPImageProcessor.from_pretrained(spec.source, local_files_only=local_only)
            tokenizer = CLIPTokenizer.from_pretrained(spec.source, local_files_only=local_only)
        except OSError as err:
            raise ModelLoadError(_download_hint(name, spec.source, err)) from None
        crop = _size_value(processor.crop_size, "height")
        short = _size_value(processor.size, "shortest_edge") or crop
        preprocess = clip_transform(crop, processor.image_mean, processor.image_std, resize=short)
        cache_id = f"{name}:{spec.source}:{getattr(model.config, '_commit_hash', None) or 'local'}"
    return Backbone(name, "hf", model, preprocess, _hf_tokenize(tokenizer), cache_id)


TINY_OPENCLIP = dict(
    embed_dim=32,
    vision_cfg=dict(image_size=32, layers=2, width=32, head_width=16, patch_size=8),
    text_cfg=dict(context_length=CONTEXT_LENGTH, vocab_size=49408, width=32, heads=2, layers=2),
)


def _load_open_clip(name: str, spec: ModelSpec, random_weights: bool) -> Backbone:
    import open_clip

    try:
        if spec.tiny:
            torch.manual_seed(0)
            model, _, preprocess = open_clip.create_model_and_transforms("ViT-B-16", pretrained=None, **TINY_OPENCLIP)
            tokenizer = open_clip.get_tokenizer("ViT-B-16")
        else:
            if not random_weights and not _open_clip_cached(spec) and not hub_reachable():
                raise OSError("the Hugging Face Hub cannot be reached and the weights are not in the local cache")
            pretrained = None if random_weights else spec.pretrained
            if random_weights:
                torch.manual_seed(0)
            model, _, preprocess = open_clip.create_model_and_transforms(
                spec.source, pretrained=pretrained, load_weights=not random_weights
            )
            tokenizer = open_clip.get_tokenizer(spec.source)
    except (OSError, RuntimeError) as err:
        raise ModelLoadError(_download_hint(name, spec.source, err)) from None
    weights = "random" if (spec.tiny or random_weights) else spec.pretrained or "hub"
    cache_id = f"{name}:{spec.source}:{weights}:{json.dumps(TINY_OPENCLIP) if spec.tiny else ''}"
    return Backbone(
        name, "open_clip", model.eval(), preprocess, tokenizer, hashlib.sha256(cache_id.encode()).hexdigest()[:16]
    )


def _open_clip_cached(spec: ModelSpec) -> bool:
    """Whether an ``hf-hub:`` open_clip model's config is in the local Hub cache (plain tags: unknown, so False)."""
    from huggingface_hub import try_to_load_from_cache

    if not spec.source.startswith("hf-hub:"):
        return False
    return isinstance(try_to_load_from_cache(spec.source[len("hf-hub:") :], "open_clip_config.json"), str)


def _download_hint(name: str, source: str | None, err: Exception) -> str:
    first = str(err).strip().splitlines()[0].rstrip(".") if str(err).strip() else type(err).__name__
    return (
        f"could not load model {name!r} ({source}): {first}. Check the network and the Hugging Face login "
        "(huggingface-cli login), or use the offline test models tiny-clip / tiny-openclip."
    )


def load_backbone(
    name: str, device: str = "cpu", dtype: torch.dtype = torch.float32, random_weights: bool = False
) -> Backbone:
    """Build a registered (or ``hf:`` / ``open_clip:``) backbone on ``device``.

    ``random_weights=True`` keeps the architecture but skips the download (benchmarks, offline checks).
    """
    spec = resolve_spec(name)
    loader = _load_hf if spec.kind == "hf" else _load_open_clip
    return loader(name, spec, random_weights).to(device, dtype)


def list_models() -> str:
    return "\n".join(f"  {name:<22} {spec.description}" for name, spec in REGISTRY.items())
