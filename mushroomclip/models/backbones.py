"""Vision-language backbones behind one small interface: HF ``CLIPModel`` and open_clip (BioCLIP).

``load_backbone("clip-b32")`` or ``load_backbone("bioclip")`` gives a :class:`Backbone` with
``encode_images`` / ``encode_texts`` (L2-normalised), ``logit_scale``, its ``tokenizer`` and its one image
``preprocess`` config (:class:`~mushroomclip.data.transforms.PreprocessConfig`), read from the model's own config
(HF image processor, open_clip ``preprocess_cfg``) and the source of every image transform. ``tiny-clip`` and
``tiny-openclip`` are randomly initialised, built from configs, and need no network: tests and the offline demo
use them.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from importlib import resources
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from huggingface_hub import try_to_load_from_cache
from open_clip.constants import HF_WEIGHTS_NAME
from open_clip.pretrained import _get_safe_alternatives
from open_clip.tokenizer import bytes_to_unicode
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer
from transformers.image_utils import pil_torch_interpolation_mapping

from mushroomclip.data.transforms import PreprocessConfig, normalize
from mushroomclip.models.weights import hub_file, hub_reachable, not_found, offline_note, weights_id

CONTEXT_LENGTH = 77


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
    "bioclip-2": ModelSpec(
        "open_clip", "hf-hub:imageomics/bioclip-2", description="BioCLIP 2 ViT-L/14 (TreeOfLife-200M)"
    ),
    "openclip-b32-laion2b": ModelSpec(
        "open_clip", "ViT-B-32", "laion2b_s34b_b79k", description="OpenCLIP ViT-B/32 LAION-2B"
    ),
    "tiny-clip": ModelSpec(
        "hf", None, description="offline test model: HF CLIPConfig, 2 layers, width 32, random", tiny=True
    ),
    "tiny-openclip": ModelSpec(
        "open_clip", None, description="offline test model: open_clip ViT, 2 layers, width 32, random", tiny=True
    ),
}


MIT_LICENSED = ("openai/clip-vit-", "imageomics/bioclip")  # OpenAI CLIP and BioCLIP (1 and 2): MIT


def known_license(base: str) -> str | None:
    """The license of a base model we know (registry name, Hub id, ``hf-hub:`` or ``convert:`` source); None
    for any other, whose license we cannot vouch for."""
    source = (REGISTRY[base].source or "") if base in REGISTRY else base
    source = source.removeprefix("convert:").removeprefix("hf-hub:")
    return "mit" if source.startswith(MIT_LICENSED) else None


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
    preprocess: PreprocessConfig  # from the model's own config; every image transform is built from it
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
        """``(mean, std)`` of ``preprocess`` as tensors, for uint8 input: made once, not at every batch."""
        return torch.tensor(self.preprocess.mean), torch.tensor(self.preprocess.std)

    @property
    def logit_scale(self) -> float:
        return self.model.logit_scale.exp().item()

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """``(N, 3, H, W)`` preprocessed pixels, float (normalised) or uint8 (normalised here, on the device)."""
        if pixels.dtype == torch.uint8:
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
    path = resources.files("open_clip").joinpath("bpe_simple_vocab_16e6.txt.gz")
    lines = gzip.decompress(path.read_bytes()).decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    merges = [tuple(line.split()) for line in lines]
    tokens = list(bytes_to_unicode().values())
    tokens += [t + "</w>" for t in tokens] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def offline_clip_tokenizer():
    """A ``transformers.CLIPTokenizer`` identical to openai/clip-vit-*'s, built without a download."""
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


def preprocess_from_image_processor(processor: CLIPImageProcessor) -> PreprocessConfig:
    """A Hugging Face CLIP image processor's resize, centre crop, resampling and mean/std, as it applies them."""
    crop = _size_value(processor.crop_size, "height"), _size_value(processor.crop_size, "width")
    short = _size_value(processor.size, "shortest_edge")
    squash = _size_value(processor.size, "height"), _size_value(processor.size, "width")
    return PreprocessConfig(
        size=crop,
        resize_size=short or (squash if all(squash) else crop[0]),
        interpolation=pil_torch_interpolation_mapping[processor.resample].value,
        mean=tuple(processor.image_mean),
        std=tuple(processor.image_std),
    )


def preprocess_from_open_clip(cfg: dict) -> PreprocessConfig:
    """An open_clip model's ``preprocess_cfg`` (``model.visual.preprocess_cfg``, what open_clip's own eval transform
    is built from); a ValueError for the resize modes the uint8 pipeline does not have."""
    height, width = cfg["size"] if isinstance(cfg["size"], (tuple, list)) else (cfg["size"],) * 2
    mode = cfg.get("resize_mode", "shortest")
    if mode == "longest" or (mode == "shortest" and height != width):
        raise ValueError(f"its preprocessing (resize_mode {mode!r}, size {height}x{width}) is not supported")
    # open_clip's eval transform is bicubic unless the config says bilinear ("random" is for training)
    interpolation = "bilinear" if cfg.get("interpolation") == "bilinear" else "bicubic"
    return PreprocessConfig(
        size=(height, width),
        resize_size=height if mode == "shortest" else (height, width),
        interpolation=interpolation,
        mean=tuple(cfg["mean"]),
        std=tuple(cfg["std"]),
    )


def _open_clip_preprocess(model, name: str, spec: ModelSpec) -> PreprocessConfig:
    try:
        return preprocess_from_open_clip(model.visual.preprocess_cfg)
    except ValueError as err:
        fix = "Use a model with square 'shortest' or 'squash' resizing"
        raise ModelLoadError(_load_error(name, spec.source, str(err), fix)) from None


def tiny_image_processor(image_size: int) -> CLIPImageProcessor:
    """OpenAI CLIP's image processor (bicubic, OpenAI mean/std) at another size: for the randomly initialised models."""
    return CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})


def tiny_clip_config():
    """2 layers, width 32, 32 px images: the offline HF test model (also the shape of ``tiny.yaml``)."""
    common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    return CLIPConfig(
        text_config=dict(
            common,
            vocab_size=49408,
            max_position_embeddings=CONTEXT_LENGTH,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=49407,
        ),
        vision_config=dict(common, image_size=32, patch_size=8),
        projection_dim=32,
    )


def _cache_id(name: str, source: str, weights: str, preprocess) -> str:
    """Caches are keyed by the weights actually loaded and the preprocessing, never by the model's name alone."""
    return hashlib.sha256(f"{name}|{source}|{weights}|{preprocess!r}".encode()).hexdigest()[:16]


def _size_value(size, key: str) -> int | None:
    """A side length from an image processor's size field: an int, a dict, or transformers 5's SizeDict."""
    if size is None or isinstance(size, int):
        return size
    return size.get(key) if isinstance(size, dict) else getattr(size, key, None)


def _load_hf(name: str, spec: ModelSpec, random_weights: bool) -> Backbone:
    if spec.tiny or random_weights:
        torch.manual_seed(0)  # the same random weights in every process: caches and tests rely on it
        config = tiny_clip_config() if spec.tiny else CLIPConfig()  # CLIPConfig() is the ViT-B/32 shape
        model = CLIPModel(config).eval()
        preprocess = preprocess_from_image_processor(tiny_image_processor(config.vision_config.image_size))
        tokenizer = offline_clip_tokenizer()
        cache_id = f"{name}:random:{hashlib.sha256(config.to_json_string().encode()).hexdigest()[:12]}"
    else:
        # Offline, use the local cache only: otherwise every file is retried with back-off for a minute.
        folder = Path(spec.source).is_dir()
        local_only = not folder and not hub_reachable()
        try:
            model, info = CLIPModel.from_pretrained(spec.source, local_files_only=local_only, output_loading_info=True)
            processor = CLIPImageProcessor.from_pretrained(spec.source, local_files_only=local_only)
            tokenizer = CLIPTokenizer.from_pretrained(spec.source, local_files_only=local_only)
        except Exception as err:  # OSError: a file is missing; others: a truncated or corrupt file
            if not isinstance(err, OSError):
                problem = f"its files cannot be read ({_first_line(err)})"
                raise ModelLoadError(_load_error(name, spec.source, problem, REDOWNLOAD)) from None
            problem = _first_line(err) + (f"; {offline_note()}" if local_only else "")
            raise ModelLoadError(_load_error(name, spec.source, problem)) from None
        if info["missing_keys"]:  # transformers would initialise them randomly, with a warning only
            missing = sorted(info["missing_keys"])
            listed = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
            problem = f"its weight file lacks {len(missing)} of the tensors config.json asks for ({listed})"
            raise ModelLoadError(_load_error(name, spec.source, problem, "Download or convert the model again"))
        preprocess = preprocess_from_image_processor(processor)
        cache_id = _cache_id(name, spec.source, _hf_weights_id(spec.source, folder), preprocess)
    return Backbone(name, "hf", model.eval(), preprocess, _hf_tokenize(tokenizer), cache_id)


def _hf_weights_id(source: str, folder: bool) -> str:
    """A folder's weight files by content; a Hub model by the commit of its cached snapshot."""
    if folder:
        files = sorted(f for pattern in ("*.safetensors", "*.bin") for f in Path(source).glob(pattern))
        return " ".join(weights_id(f) for f in files)
    return weights_id(try_to_load_from_cache(source, "config.json"))


TINY_OPENCLIP = dict(
    embed_dim=32,
    vision_cfg=dict(image_size=32, layers=2, width=32, head_width=16, patch_size=8),
    text_cfg=dict(context_length=CONTEXT_LENGTH, vocab_size=49408, width=32, heads=2, layers=2),
)


def _load_open_clip(name: str, spec: ModelSpec, random_weights: bool) -> Backbone:
    if not (spec.tiny or random_weights):
        model, preprocess, tokenizer, weights = load_open_clip(name, spec)
        cache_id = _cache_id(name, spec.source, weights_id(weights), preprocess)
        return Backbone(name, "open_clip", model, preprocess, tokenizer, cache_id)
    source, kwargs = ("ViT-B-16", TINY_OPENCLIP) if spec.tiny else (spec.source, {})
    if source.startswith("hf-hub:"):  # its config only: open_clip would fetch the weights too, then not use them
        source = f"local-dir:{_open_clip_config_dir(name, spec, not hub_reachable())}"
    torch.manual_seed(0)  # the same random weights in every process: caches and tests rely on it
    try:
        model = open_clip.create_model(source, load_weights=False, **kwargs)
        tokenizer = open_clip.get_tokenizer(source)
    except (OSError, RuntimeError) as err:
        raise ModelLoadError(_load_error(name, spec.source, _first_line(err))) from None
    preprocess = _open_clip_preprocess(model, name, spec)
    cache_id = f"{name}:{spec.source}:random:{json.dumps(TINY_OPENCLIP) if spec.tiny else ''}"
    return Backbone(
        name, "open_clip", model.eval(), preprocess, tokenizer, hashlib.sha256(cache_id.encode()).hexdigest()[:16]
    )


def _open_clip_weight_files(name: str, spec: ModelSpec) -> tuple[str, list[str], dict]:
    """(Hub repo, weight file names in open_clip's order of preference, the tag's preprocessing) of a model."""
    if spec.source.startswith("hf-hub:"):
        return spec.source[len("hf-hub:") :], [*_get_safe_alternatives(HF_WEIGHTS_NAME), HF_WEIGHTS_NAME], {}
    tag = open_clip.get_pretrained_cfg(spec.source, spec.pretrained or "")
    if not tag.get("hf_hub"):
        tags = ", ".join(open_clip.list_pretrained_tags_by_model(spec.source)) or "none"
        raise ModelLoadError(
            f"could not load model {name!r}: open_clip has no pretrained weights {spec.pretrained!r} for "
            f"{spec.source!r} (its tags: {tags}); name one as open_clip:{spec.source}@<tag>"
        )
    repo_id, filename = os.path.split(tag["hf_hub"])
    filename = filename or HF_WEIGHTS_NAME
    preprocess = {k: tag[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in tag}
    return repo_id, [*_get_safe_alternatives(filename), filename], preprocess


def load_open_clip(name: str, spec: ModelSpec):
    """``(model, preprocess config, tokenizer, weight file)`` of a pretrained open_clip model; never random weights.

    Files come from the local Hugging Face cache when the Hub is out of reach. A missing config or weight
    file, or one that cannot be read, is a one-line :class:`ModelLoadError` naming the repo and the file.
    """
    weights = open_clip_weights(name, spec)
    _, _, tag_preprocess = _open_clip_weight_files(name, spec)
    hub = spec.source.startswith("hf-hub:")
    # The resolved files, by path: open_clip itself would ask the Hub again, and fall back to random weights.
    source = f"local-dir:{Path(weights).parent}" if hub else spec.source
    kwargs = {} if hub else dict(pretrained=weights, force_preprocess_cfg=tag_preprocess)
    try:
        model = open_clip.create_model(source, require_pretrained=True, **kwargs)
        tokenizer = open_clip.get_tokenizer(source)
    except Exception as err:  # safetensors' header errors, torch.load's unpickling errors, shape mismatches
        problem = f"the weight file {weights} cannot be loaded ({_first_line(err)})"
        raise ModelLoadError(_load_error(name, spec.source, problem, REDOWNLOAD)) from None
    return model.eval(), _open_clip_preprocess(model, name, spec), tokenizer, weights


def open_clip_weights(name: str, spec: ModelSpec) -> str:
    """Local path of a pretrained open_clip model's weight file (and, for ``hf-hub:``, its config beside it),
    from the Hub or, out of its reach, the local cache; a one-line :class:`ModelLoadError` where there is none."""
    repo_id, weight_files, _ = _open_clip_weight_files(name, spec)
    local_only = not hub_reachable()
    if spec.source.startswith("hf-hub:"):
        _open_clip_config_dir(name, spec, local_only)
    try:
        weights = next(filter(None, (hub_file(repo_id, f, local_only) for f in weight_files)), None)
    except OSError as err:  # the repo is private, gated or misspelt; an HTTP error
        raise ModelLoadError(_load_error(name, spec.source, _first_line(err))) from None
    if weights is None:
        problem = not_found(f"the weights ({' / '.join(weight_files)})", repo_id, local_only)
        raise ModelLoadError(_load_error(name, spec.source, problem))
    return weights


def _open_clip_config_dir(name: str, spec: ModelSpec, local_only: bool) -> Path:
    """The snapshot folder with an ``hf-hub:`` model's ``open_clip_config.json``, fetched unless ``local_only``."""
    repo_id = spec.source[len("hf-hub:") :]
    try:
        config = hub_file(repo_id, "open_clip_config.json", local_only)
    except OSError as err:  # the repo is private, gated or misspelt; an HTTP error
        raise ModelLoadError(_load_error(name, spec.source, _first_line(err))) from None
    if config is None:
        problem = not_found("the config open_clip_config.json", repo_id, local_only, verb="is")
        raise ModelLoadError(_load_error(name, spec.source, problem))
    return Path(config).parent


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0].rstrip(".") if text else type(err).__name__


REDOWNLOAD = "An interrupted download leaves such files: delete the model from the Hugging Face cache and load again"
NETWORK_FIX = "Check the network and the Hugging Face login (hf auth login), or use the offline test models tiny-clip / tiny-openclip"


def _load_error(name: str, source: str | None, problem: str, fix: str = NETWORK_FIX) -> str:
    return f"could not load model {name!r} ({source}): {problem}. {fix}."


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
