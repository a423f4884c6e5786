"""Offline Hugging Face cache snapshots with the file layout of the registered repos, at test size.

``HF_HUB_CACHE/models--ORG--NAME/{refs/main, snapshots/<commit>/<files>}`` as ``huggingface_hub`` writes
it (plain files instead of blob links, which the cache lookup accepts). Configs carry the real keys; the
models are narrow and shallow with random weights, so loading them runs the production code in a blink.
"""

from __future__ import annotations

import hashlib
import json
import math
from functools import lru_cache
from pathlib import Path

import torch

LOGIT_SCALE = 100.0  # stored in every fixture's weights; a randomly initialised CLIP has 1 / 0.07 = 14.3
OPENAI_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_STD = [0.26862954, 0.26130258, 0.27577711]

# openai/clip-vit-base-patch32's preprocessor_config.json, verbatim (legacy int sizes)
CLIP_B32_PREPROCESSOR = {
    "crop_size": 224,
    "do_center_crop": True,
    "do_normalize": True,
    "do_resize": True,
    "feature_extractor_type": "CLIPFeatureExtractor",
    "image_mean": OPENAI_MEAN,
    "image_std": OPENAI_STD,
    "resample": 3,
    "size": 224,
}

# imageomics/bioclip's open_clip_config.json (ViT-B/16 keys), narrowed; bioclip-2 is ViT-L/14's shape rules
TINY_BIOCLIP_MODEL_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
TINY_BIOCLIP2_MODEL_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 28, "layers": 2, "width": 32, "head_width": 16, "patch_size": 14},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


def write_snapshot(cache: Path, repo_id: str, files: dict[str, bytes], commit: str | None = None) -> Path:
    """Put ``files`` into the cache as the ``main`` revision of ``repo_id``; returns the snapshot folder."""
    commit = commit or hashlib.sha1(repo_id.encode() + b"".join(files.values())).hexdigest()
    repo = Path(cache) / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    for name, data in files.items():
        (snapshot / name).write_bytes(data)
    return snapshot


def use_offline_cache(monkeypatch, cache: Path) -> Path:
    """Point huggingface_hub and transformers at ``cache``, offline (both read these constants at call time)."""
    from huggingface_hub import constants

    cache.mkdir(parents=True, exist_ok=True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def _json(data: dict) -> bytes:
    return json.dumps(data, indent=2).encode()


def _safetensors(state_dict: dict) -> bytes:
    from safetensors.torch import save

    return save({k: v.contiguous() for k, v in state_dict.items()})


def clip_b32_files(seed: int = 0) -> dict[str, bytes]:
    """openai/clip-vit-base-patch32's files: CLIPModel config + weights, preprocessor, BPE tokenizer files."""
    return dict(_clip_b32_files(seed))  # a copy: callers edit it


@lru_cache(maxsize=2)
def _clip_b32_files(seed: int) -> dict[str, bytes]:
    import tempfile

    from transformers import CLIPModel

    from mushroomclip.models.backbones import _openai_bpe, offline_clip_tokenizer, tiny_clip_config

    config = tiny_clip_config()
    config.vision_config.image_size, config.vision_config.patch_size = 224, 32
    # the real repo's legacy token ids: eos 2 makes HF pool at the argmax token id, as for the real model
    config.text_config.bos_token_id, config.text_config.eos_token_id, config.text_config.pad_token_id = 0, 2, 1
    torch.manual_seed(seed)
    vocab, merges = _openai_bpe()
    files = {
        "preprocessor_config.json": _json(CLIP_B32_PREPROCESSOR),
        "vocab.json": _json(vocab),
        "merges.txt": ("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n").encode(),
        "special_tokens_map.json": _json(
            {
                "bos_token": "<|startoftext|>",
                "eos_token": "<|endoftext|>",
                "pad_token": "<|endoftext|>",
                "unk_token": "<|endoftext|>",
            }
        ),
    }
    model = CLIPModel(config)
    model.logit_scale.data.fill_(math.log(LOGIT_SCALE))
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        offline_clip_tokenizer().save_pretrained(tmp)
        for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
            files[name] = (Path(tmp) / name).read_bytes()
    return files


def open_clip_files(model_cfg: dict, seed: int = 0, weights: str = "open_clip_model.safetensors") -> dict[str, bytes]:
    """An open_clip Hub repo: ``open_clip_config.json`` (model_cfg + preprocess_cfg) and random weights."""
    import open_clip

    torch.manual_seed(seed)
    model = open_clip.CLIP(**json.loads(json.dumps(model_cfg)))
    model.logit_scale.data.fill_(math.log(LOGIT_SCALE))
    config = {"model_cfg": model_cfg, "preprocess_cfg": {"mean": OPENAI_MEAN, "std": OPENAI_STD}}
    if weights.endswith(".safetensors"):
        data = _safetensors(model.state_dict())
    else:
        import io

        buffer = io.BytesIO()
        torch.save(model.state_dict(), buffer)
        data = buffer.getvalue()
    return {"open_clip_config.json": _json(config), weights: data}


def truncated(data: bytes) -> bytes:
    """The first half of a file, as an interrupted download leaves it."""
    return data[: len(data) // 2]
