"""Class prompts and their text embeddings, the BioCLIP way.

Each class is rendered in a text type (``sci``, ``com``, ``taxon``, ``sci_com``, ``taxon_com``, see
:meth:`Taxonomy.text`) and put into every template of a set; the class embedding is the re-normalised
mean of the L2-normalised template embeddings. Embeddings are cached on disk per
(model, text type, templates, taxonomy).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from mushroomclip.taxonomy import TEXT_TYPES, Taxonomy

# The 80 prompt templates of OpenAI CLIP's ImageNet zero-shot evaluation (as used by open_clip and BioCLIP).
OPENAI_TEMPLATES = [
    "a bad photo of a {}.", "a photo of many {}.", "a sculpture of a {}.", "a photo of the hard to see {}.",
    "a low resolution photo of the {}.", "a rendering of a {}.", "graffiti of a {}.", "a bad photo of the {}.",
    "a cropped photo of the {}.", "a tattoo of a {}.", "the embroidered {}.", "a photo of a hard to see {}.",
    "a bright photo of a {}.", "a photo of a clean {}.", "a photo of a dirty {}.", "a dark photo of the {}.",
    "a drawing of a {}.", "a photo of my {}.", "the plastic {}.", "a photo of the cool {}.",
    "a close-up photo of a {}.", "a black and white photo of the {}.", "a painting of the {}.", "a painting of a {}.",
    "a pixelated photo of the {}.", "a sculpture of the {}.", "a bright photo of the {}.", "a cropped photo of a {}.",
    "a plastic {}.", "a photo of the dirty {}.", "a jpeg corrupted photo of a {}.", "a blurry photo of the {}.",
    "a photo of the {}.", "a good photo of the {}.", "a rendering of the {}.", "a {} in a video game.",
    "a photo of one {}.", "a doodle of a {}.", "a close-up photo of the {}.", "a photo of a {}.",
    "the origami {}.", "the {} in a video game.", "a sketch of a {}.", "a doodle of the {}.",
    "a origami {}.", "a low resolution photo of a {}.", "the toy {}.", "a rendition of the {}.",
    "a photo of the clean {}.", "a photo of a large {}.", "a rendition of a {}.", "a photo of a nice {}.",
    "a photo of a weird {}.", "a blurry photo of a {}.", "a cartoon {}.", "art of a {}.",
    "a sketch of the {}.", "a embroidered {}.", "a pixelated photo of a {}.", "itap of the {}.",
    "a jpeg corrupted photo of the {}.", "a good photo of a {}.", "a plushie {}.", "a photo of the nice {}.",
    "a photo of the small {}.", "a photo of the weird {}.", "the cartoon {}.", "art of the {}.",
    "a drawing of the {}.", "a photo of the large {}.", "a black and white photo of a {}.", "the plushie {}.",
    "a dark photo of a {}.", "itap of a {}.", "graffiti of the {}.", "a toy {}.",
    "itap of my {}.", "a photo of a cool {}.", "a photo of a small {}.", "a tattoo of the {}.",
]  # fmt: skip
TEMPLATE_SETS: dict[str, list[str]] = {"single": ["a photo of {}."], "openai": OPENAI_TEMPLATES}


def templates_for(name: str) -> list[str]:
    if name not in TEMPLATE_SETS:
        raise ValueError(f"unknown template set {name!r}; choose one of {', '.join(TEMPLATE_SETS)}")
    return TEMPLATE_SETS[name]


def text_types(spec: str) -> list[str]:
    """``"all"`` or a comma-separated list of text types, validated."""
    names = list(TEXT_TYPES) if spec == "all" else [t.strip() for t in spec.split(",") if t.strip()]
    unknown = [t for t in names if t not in TEXT_TYPES]
    if unknown or not names:
        raise ValueError(
            f"unknown text type(s) {', '.join(unknown) or spec!r}; choose from {', '.join(TEXT_TYPES)} or all"
        )
    return names


def class_prompts(taxonomy: Taxonomy, text_type: str, templates: list[str]) -> list[list[str]]:
    """``prompts[c][t]``: class c rendered in ``text_type`` inside template t."""
    return [[template.format(taxonomy.text(label, text_type)) for template in templates] for label in taxonomy.classes]


@torch.inference_mode()
def class_text_embeddings(backbone, prompts: list[list[str]], batch_size: int = 1024) -> torch.Tensor:
    """``(C, D)``: per class, normalise each template's embedding, average, re-normalise."""
    flat = [p for per_class in prompts for p in per_class]
    chunks = [backbone.encode_texts(flat[i : i + batch_size]) for i in range(0, len(flat), batch_size)]
    per_template = torch.cat(chunks).view(len(prompts), len(prompts[0]), -1)  # already L2-normalised
    return F.normalize(per_template.mean(dim=1), dim=-1).cpu()


def cached_class_text_embeddings(
    backbone, taxonomy: Taxonomy, text_type: str, template_set: str, cache_dir: str | Path | None
) -> tuple[torch.Tensor, bool]:
    """Class embeddings from ``cache_dir`` if computed before for the same key; returns (embeddings, cache_hit).

    The key covers the model (``backbone.cache_id``: the weights actually loaded and the preprocessing), text
    type, the template strings and the taxonomy's SHA-256, so new weights, an edited taxonomy or template
    invalidate the entry.
    """
    templates = templates_for(template_set)
    key_data = {
        "model": backbone.cache_id,
        "text_type": text_type,
        "templates": templates,
        "taxonomy": taxonomy.fingerprint,
    }
    key = hashlib.sha256(json.dumps(key_data, sort_keys=True).encode()).hexdigest()[:24]
    path = Path(cache_dir) / f"text-{backbone.name}-{text_type}-{template_set}-{key}.pt" if cache_dir else None
    if path is not None and path.is_file():
        return torch.load(path), True
    embeddings = class_text_embeddings(backbone, class_prompts(taxonomy, text_type, templates))
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(embeddings, path)
    return embeddings, False
