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
from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

from mushroomclip.taxonomy import TEXT_TYPES, Taxonomy

# The 80 prompt templates of OpenAI CLIP's ImageNet zero-shot evaluation, as open_clip ships them (and BioCLIP uses
# them); open_clip's are functions of the class name, ours format strings (they key the embedding caches).
OPENAI_TEMPLATES = [template("{}") for template in OPENAI_IMAGENET_TEMPLATES]
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
