"""open_clip -> ``transformers.CLIPModel`` conversion, so BioCLIP can be fine-tuned like any HF CLIP.

    python -m mushroomclip.models.convert --model hf-hub:imageomics/bioclip --output models/bioclip-hf

Supports OpenAI-architecture open_clip models (ViT towers, class-token pooling, argmax text pooling,
OpenAI BPE tokenizer). The activation (QuickGELU or GELU) and the image mean/std are read from the
source model, never assumed. The source must load with its real weights; ``--check`` reloads the
written folder and, independently, the source, and compares their embeddings on the same inputs.

The folder carries ``conversion.json`` (source, pretrained tag, weights, converter version): a run trained
on it records the portable base ``convert:<source>``, which :func:`converted_folder` re-creates on any
machine (once, cached). ``--push-to-hub USER/NAME`` publishes the folder, for ``model.base_hub_id``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

import huggingface_hub
import open_clip
import open_clip.transformer as oct
import torch
import torch.nn.functional as F
from huggingface_hub import ModelCard, ModelCardData, constants
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

from mushroomclip.models.backbones import (
    REGISTRY,
    ModelLoadError,
    ModelSpec,
    known_license,
    load_open_clip,
    offline_clip_tokenizer,
    open_clip_weights,
    preprocess_from_open_clip,
)
from mushroomclip.models.weights import weights_id

logger = logging.getLogger(__name__)


class ConversionError(ValueError):
    """The open_clip model uses a feature HF CLIPModel cannot represent exactly."""


def _activation(block) -> str:
    act = block.mlp.gelu
    if isinstance(act, oct.QuickGELU):
        return "quick_gelu"
    if isinstance(act, torch.nn.GELU) and act.approximate == "none":
        return "gelu"
    raise ConversionError(f"unsupported MLP activation {type(act).__name__}")


def _check_convertible(model) -> None:
    if not isinstance(model, open_clip.CLIP):
        raise ConversionError(
            f"{type(model).__name__} is not an OpenAI-architecture open_clip.CLIP (custom text towers are not supported)"
        )
    visual = model.visual
    problems = {
        "a timm or ResNet image tower": not hasattr(visual, "conv1") or not hasattr(visual, "transformer"),
        "an attentional pooler": getattr(visual, "attn_pool", None) is not None,
        "pooling other than the class token": getattr(visual, "pool_type", "tok") != "tok",
        "layer norm after pooling": getattr(visual, "final_ln_after_pool", False),
        "text pooling other than argmax (EOT token)": getattr(model, "text_pool_type", "argmax") != "argmax",
        "layer scale": any(
            hasattr(b, "ls_1") and not isinstance(b.ls_1, torch.nn.Identity) for b in visual.transformer.resblocks
        ),
    }
    found = [name for name, present in problems.items() if present]
    if found:
        raise ConversionError(f"cannot convert exactly: the model has {', '.join(found)}")


def _tower_config(transformer, width: int) -> dict:
    block = transformer.resblocks[0]
    return dict(
        hidden_size=width,
        intermediate_size=block.mlp.c_fc.out_features,
        num_hidden_layers=len(transformer.resblocks),
        num_attention_heads=block.attn.num_heads,
        hidden_act=_activation(block),
        layer_norm_eps=block.ln_1.eps,
    )


def hf_config_from_open_clip(model):
    _check_convertible(model)
    visual = model.visual
    vision = _tower_config(visual.transformer, visual.conv1.out_channels) | dict(
        image_size=visual.image_size[0] if isinstance(visual.image_size, tuple) else visual.image_size,
        patch_size=visual.conv1.kernel_size[0],
    )
    text = _tower_config(model.transformer, model.token_embedding.embedding_dim) | dict(
        vocab_size=model.token_embedding.num_embeddings,
        max_position_embeddings=model.positional_embedding.shape[0],
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )
    # projection_dim in the towers too: CLIPVisionModelWithProjection / CLIPTextModelWithProjection read it there
    projection_dim = model.text_projection.shape[1]
    text["projection_dim"] = vision["projection_dim"] = projection_dim
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection_dim)


def _blocks(sd: dict, src: str, dst: str, layers: int) -> dict:
    out = {}
    for i in range(layers):
        s, d = f"{src}.{i}", f"{dst}.{i}"
        q, k, v = sd[f"{s}.attn.in_proj_weight"].chunk(3)
        qb, kb, vb = sd[f"{s}.attn.in_proj_bias"].chunk(3)
        out |= {
            f"{d}.self_attn.q_proj.weight": q,
            f"{d}.self_attn.k_proj.weight": k,
            f"{d}.self_attn.v_proj.weight": v,
            f"{d}.self_attn.q_proj.bias": qb,
            f"{d}.self_attn.k_proj.bias": kb,
            f"{d}.self_attn.v_proj.bias": vb,
            f"{d}.self_attn.out_proj.weight": sd[f"{s}.attn.out_proj.weight"],
            f"{d}.self_attn.out_proj.bias": sd[f"{s}.attn.out_proj.bias"],
            f"{d}.layer_norm1.weight": sd[f"{s}.ln_1.weight"],
            f"{d}.layer_norm1.bias": sd[f"{s}.ln_1.bias"],
            f"{d}.layer_norm2.weight": sd[f"{s}.ln_2.weight"],
            f"{d}.layer_norm2.bias": sd[f"{s}.ln_2.bias"],
            f"{d}.mlp.fc1.weight": sd[f"{s}.mlp.c_fc.weight"],
            f"{d}.mlp.fc1.bias": sd[f"{s}.mlp.c_fc.bias"],
            f"{d}.mlp.fc2.weight": sd[f"{s}.mlp.c_proj.weight"],
            f"{d}.mlp.fc2.bias": sd[f"{s}.mlp.c_proj.bias"],
        }
    return out


class _ReadKeys(dict):
    """A state dict that records which keys were read, so a conversion can prove it used every tensor."""

    def __init__(self, *args):
        super().__init__(*args)
        self.read: set[str] = set()

    def __getitem__(self, key: str):
        self.read.add(key)
        return super().__getitem__(key)


def convert_state_dict(sd: dict, config) -> dict:
    """open_clip CLIP state dict -> HF CLIPModel state dict (q/k/v split, projections transposed)."""
    out = {
        "logit_scale": sd["logit_scale"],
        "text_model.embeddings.token_embedding.weight": sd["token_embedding.weight"],
        "text_model.embeddings.position_embedding.weight": sd["positional_embedding"],
        "text_model.final_layer_norm.weight": sd["ln_final.weight"],
        "text_model.final_layer_norm.bias": sd["ln_final.bias"],
        "text_projection.weight": sd["text_projection"].T,
        "vision_model.embeddings.class_embedding": sd["visual.class_embedding"],
        "vision_model.embeddings.patch_embedding.weight": sd["visual.conv1.weight"],
        "vision_model.embeddings.position_embedding.weight": sd["visual.positional_embedding"],
        "vision_model.pre_layrnorm.weight": sd["visual.ln_pre.weight"],  # sic: HF's name
        "vision_model.pre_layrnorm.bias": sd["visual.ln_pre.bias"],
        "vision_model.post_layernorm.weight": sd["visual.ln_post.weight"],
        "vision_model.post_layernorm.bias": sd["visual.ln_post.bias"],
        "visual_projection.weight": sd["visual.proj"].T,
    }
    out |= _blocks(sd, "transformer.resblocks", "text_model.encoder.layers", config.text_config.num_hidden_layers)
    out |= _blocks(
        sd, "visual.transformer.resblocks", "vision_model.encoder.layers", config.vision_config.num_hidden_layers
    )
    return {k: v.detach().clone().contiguous() for k, v in out.items()}


def convert_open_clip(model):
    """An HF ``CLIPModel`` with the open_clip model's weights; raises :class:`ConversionError` if inexact."""
    config = hf_config_from_open_clip(model)
    source = _ReadKeys(model.state_dict())
    converted = convert_state_dict(source, config)
    unmapped = sorted(set(source) - source.read)
    if unmapped:  # e.g. SigLIP's logit_bias: HF CLIPModel has no place for it, and dropping it changes the model
        raise ConversionError(f"source tensors with no counterpart in CLIPModel: {', '.join(unmapped[:5])}")
    hf = CLIPModel(config).eval()
    missing, unexpected = hf.load_state_dict(converted, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]  # buffers HF rebuilds itself
    if missing or unexpected:
        raise ConversionError(f"state dict mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return hf


def image_processor_from_open_clip(model):
    """The ``CLIPImageProcessor`` that applies the open_clip model's own preprocessing, so that the converted folder
    loads with the source's :class:`~mushroomclip.data.transforms.PreprocessConfig`."""
    cfg = model.visual.preprocess_cfg
    if cfg.get("resize_mode", "shortest") != "shortest" or cfg.get("interpolation", "bicubic") != "bicubic":
        raise ConversionError(f"preprocessing {cfg} is not CLIP's shortest-side bicubic resize + centre crop")
    try:
        preprocess = preprocess_from_open_clip(cfg)
    except ValueError as err:
        raise ConversionError(str(err)) from None
    return CLIPImageProcessor(
        size={"shortest_edge": preprocess.resize_size},
        crop_size=dict(zip(("height", "width"), preprocess.size)),
        image_mean=list(preprocess.mean),
        image_std=list(preprocess.std),
        resample=3,
        do_convert_rgb=True,
    )


@torch.inference_mode()
def max_embedding_difference(
    open_clip_model, hf_model, tokens: torch.Tensor, pixels: torch.Tensor, hf_tokens: torch.Tensor | None = None
) -> float:
    """Largest absolute difference between the two models' L2-normalised image and text embeddings.

    ``hf_tokens``: the same texts through the HF model's own tokenizer (default: ``tokens``).
    """
    hf_tokens = tokens if hf_tokens is None else hf_tokens
    ours_img = F.normalize(hf_model.get_image_features(pixel_values=pixels).pooler_output, dim=-1)
    ours_txt = F.normalize(hf_model.get_text_features(input_ids=hf_tokens).pooler_output, dim=-1)
    ref_img = F.normalize(open_clip_model.encode_image(pixels), dim=-1)
    ref_txt = F.normalize(open_clip_model.encode_text(tokens), dim=-1)
    return max((ours_img - ref_img).abs().max().item(), (ours_txt - ref_txt).abs().max().item())


CHECK_TEXTS = ["a photo of Amanita muscaria.", "Fungi Basidiomycota Agaricomycetes Agaricales Amanitaceae Amanita"]
CHECK_TOLERANCE = 1e-3  # fp32 rounding stays orders of magnitude below; a wrong mapping is ~0.1


def source_spec(model: str, pretrained: str | None):
    """The open_clip model to convert: a registered name (``bioclip``) or an open_clip name with its tag."""
    spec = REGISTRY.get(model)
    if spec is not None and spec.kind == "open_clip" and not spec.tiny:
        return spec
    return ModelSpec("open_clip", model, pretrained, description=model)


def check_folder(name: str, spec, folder: Path) -> float:
    """Embedding difference between the saved HF folder, reloaded, and the source loaded again on its own."""
    reference, _, tokenize, _ = load_open_clip(name, spec)
    hf = CLIPModel.from_pretrained(folder).eval()
    hf_tokens = CLIPTokenizer.from_pretrained(folder)(
        CHECK_TEXTS, padding="max_length", max_length=reference.context_length, return_tensors="pt"
    )["input_ids"]
    size = hf.config.vision_config.image_size
    pixels = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    return max_embedding_difference(reference, hf, tokenize(CHECK_TEXTS), pixels, hf_tokens)


# --- the recipe: a converted folder says what it was made from, so another machine can make it again ------

RECIPE_FILE = "conversion.json"
CONVERTER_VERSION = 1  # raise when a change to this module changes the converted weights
PREFIX = "convert:"


def recipe(spec, weights: str) -> dict:
    """What a converted folder was made from: the open_clip source, its tag, the converter and the weights."""
    return {
        "source": spec.source,
        "pretrained": spec.pretrained,
        "converter": CONVERTER_VERSION,
        "weights": weights_id(weights),
    }


def read_recipe(folder: str | Path) -> dict | None:
    """The recipe of a folder written by this module; None for any other folder."""
    path = Path(folder) / RECIPE_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def recipe_base(rec: dict) -> str:
    """A portable name of the base a recipe makes: ``convert:<open_clip source>[@<pretrained tag>]``."""
    return PREFIX + rec["source"] + (f"@{rec['pretrained']}" if rec.get("pretrained") else "")


def _spec_of_base(base: str):
    source, _, tag = base.removeprefix(PREFIX).partition("@")
    return ModelSpec("open_clip", source, tag or None, description=base)


def convert_source(name: str, spec):
    """``(CLIPModel, CLIPProcessor, weight file)`` of an open_clip model; ModelLoadError / ConversionError."""
    model, _, tokenizer, weights = load_open_clip(name, spec)  # the real weights, or an error
    if not isinstance(tokenizer, open_clip.tokenizer.SimpleTokenizer):
        raise ConversionError("only models with OpenAI CLIP's BPE tokenizer can be converted")
    hf = convert_open_clip(model)
    processor = CLIPProcessor(image_processor=image_processor_from_open_clip(model), tokenizer=offline_clip_tokenizer())
    return hf, processor, weights


def save_converted(hf, processor, rec: dict, out: Path) -> None:
    """Model, processor, model card, and the recipe last (a folder with a recipe is complete)."""
    hf.save_pretrained(out)
    processor.save_pretrained(out)
    (out / "README.md").write_text(str(converted_card(rec)))
    (out / RECIPE_FILE).write_text(json.dumps(rec, indent=2))


def converted_cache() -> Path:
    """Where bases converted on demand live: ``$HF_HOME/mushroomclip/converted``."""
    return Path(os.environ.get("HF_HOME") or constants.HF_HOME) / "mushroomclip" / "converted"


def converted_folder(base: str, expected_weights: str | None = None) -> Path:
    """The folder of a ``convert:`` base, converted on first use and reused afterwards (keyed by the source's
    weights, so new weights on the Hub make a new folder); a one-line ModelLoadError where it cannot be made."""
    spec = _spec_of_base(base)
    found = weights_id(open_clip_weights(base, spec))
    if expected_weights is not None and found != expected_weights:
        logger.warning(
            f"{base}: the adapter was trained on the weights of {expected_weights}, the source now "
            f"has {found}; predictions may differ from the run's metrics"
        )
    key = hashlib.sha256(f"{spec.source}|{spec.pretrained}|{CONVERTER_VERSION}|{found}".encode()).hexdigest()[:16]
    folder = converted_cache() / key
    if read_recipe(folder) is not None:
        return folder
    try:
        hf, processor, weights = convert_source(base, spec)
    except ConversionError as err:
        raise ModelLoadError(f"could not convert {base}: {err}") from None
    partial = folder.with_name(f"{key}.partial-{os.getpid()}")
    save_converted(hf, processor, recipe(spec, weights), partial)
    try:
        partial.rename(folder)
    except OSError:  # another process finished first
        shutil.rmtree(partial)
    logger.info(f"converted {base} into {folder}")
    return folder


def converted_card(rec: dict):
    """The card of a converted base: what it is, what it was made from, and the source's license."""
    source = rec["source"]
    repo = source.removeprefix("hf-hub:") if source.startswith("hf-hub:") else None
    title = repo or f"open_clip {source} ({rec.get('pretrained')})"
    named = f"[{repo}](https://huggingface.co/{repo})" if repo else f"`{title}`"
    license_ = known_license(source)
    data = ModelCardData(
        base_model=repo,
        library_name="transformers",
        license=license_ or "other",
        pipeline_tag="zero-shot-image-classification",
        tags=["clip", "open_clip", "mushroomclip"],
    )
    terms = (
        f"the {license_.upper()} license, as the source" if license_ else "the source model's license (see its card)"
    )
    return ModelCard(f"""---
{data.to_yaml()}
---

# {title} as a transformers CLIPModel

The weights of {named} ({rec["weights"]}), converted exactly from open_clip to `transformers.CLIPModel`
with `python -m mushroomclip.models.convert` (converter version {rec["converter"]}): no training, no new weights.
All credit for the model goes to its authors; cite them as its card asks. Use under {terms}.

```python
from transformers import CLIPModel, CLIPProcessor

model = CLIPModel.from_pretrained("REPO_ID")
processor = CLIPProcessor.from_pretrained("REPO_ID")
```

`conversion.json` records the source, its weights and the converter version.
""")


def push_converted(folder: str | Path, repo_id: str, private: bool = False, api=None) -> str:
    """Upload a converted folder (weights, processor, card with ``REPO_ID`` filled in, recipe); the repo URL."""
    from mushroomclip.hub import PushError, upload_errors  # here, not at the top: mushroomclip.hub imports this one

    folder = Path(folder)
    api = api or huggingface_hub.HfApi()  # token: HF_TOKEN or the hf auth login cache
    with tempfile.TemporaryDirectory() as staging:
        for path in folder.iterdir():
            if path.is_file():
                shutil.copy2(path, staging)
        card = Path(staging, "README.md")
        card.write_text(card.read_text().replace("REPO_ID", repo_id))
        try:
            url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
            api.upload_folder(
                folder_path=staging,
                repo_id=repo_id,
                repo_type="model",
                commit_message=f"{folder.name}: converted with mushroomclip.models.convert",
            )
        except upload_errors() as err:
            cause = (str(err).strip().splitlines() or [""])[0][:200]
            raise PushError(
                f"could not push {folder} to {repo_id} ({type(err).__name__}: {cause}); check the "
                "network and the login (HF_TOKEN or hf auth login)"
            ) from None
    return str(url)


if __name__ == "__main__":  # python -m mushroomclip.models.convert: the `mushroomclip convert` command
    from mushroomclip.commands.convert import main  # not at the top: commands.convert imports this module

    sys.exit(main())
