"""open_clip -> ``transformers.CLIPModel`` conversion, so BioCLIP can be fine-tuned like any HF CLIP.

    python -m mushroomclip.convert --model hf-hub:imageomics/bioclip --output models/bioclip-hf

Supports OpenAI-architecture open_clip models (ViT towers, class-token pooling, argmax text pooling,
OpenAI BPE tokenizer). The activation (QuickGELU or GELU) and the image mean/std are read from the
source model, never assumed. ``--check`` compares both models' embeddings on the same inputs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch


class ConversionError(ValueError):
    """The open_clip model uses a feature HF CLIPModel cannot represent exactly."""


def _activation(block) -> str:
    import open_clip.transformer as oct

    act = block.mlp.gelu
    if isinstance(act, oct.QuickGELU):
        return "quick_gelu"
    if isinstance(act, torch.nn.GELU) and act.approximate == "none":
        return "gelu"
    raise ConversionError(f"unsupported MLP activation {type(act).__name__}")


def _check_convertible(model) -> None:
    import open_clip

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
        hidden_size=width, intermediate_size=block.mlp.c_fc.out_features, num_hidden_layers=len(transformer.resblocks),
        num_attention_heads=block.attn.num_heads, hidden_act=_activation(block), layer_norm_eps=block.ln_1.eps,
    )  # fmt: skip


def hf_config_from_open_clip(model):
    from transformers import CLIPConfig

    _check_convertible(model)
    visual = model.visual
    vision = _tower_config(visual.transformer, visual.conv1.out_channels) | dict(
        image_size=visual.image_size[0] if isinstance(visual.image_size, tuple) else visual.image_size,
        patch_size=visual.conv1.kernel_size[0],
    )
    text = _tower_config(model.transformer, model.token_embedding.embedding_dim) | dict(
        vocab_size=model.token_embedding.num_embeddings, max_position_embeddings=model.positional_embedding.shape[0],
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
    )  # fmt: skip
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=model.text_projection.shape[1])


def _blocks(sd: dict, src: str, dst: str, layers: int) -> dict:
    out = {}
    for i in range(layers):
        s, d = f"{src}.{i}", f"{dst}.{i}"
        q, k, v = sd[f"{s}.attn.in_proj_weight"].chunk(3)
        qb, kb, vb = sd[f"{s}.attn.in_proj_bias"].chunk(3)
        out |= {
            f"{d}.self_attn.q_proj.weight": q, f"{d}.self_attn.k_proj.weight": k, f"{d}.self_attn.v_proj.weight": v,
            f"{d}.self_attn.q_proj.bias": qb, f"{d}.self_attn.k_proj.bias": kb, f"{d}.self_attn.v_proj.bias": vb,
            f"{d}.self_attn.out_proj.weight": sd[f"{s}.attn.out_proj.weight"],
            f"{d}.self_attn.out_proj.bias": sd[f"{s}.attn.out_proj.bias"],
            f"{d}.layer_norm1.weight": sd[f"{s}.ln_1.weight"], f"{d}.layer_norm1.bias": sd[f"{s}.ln_1.bias"],
            f"{d}.layer_norm2.weight": sd[f"{s}.ln_2.weight"], f"{d}.layer_norm2.bias": sd[f"{s}.ln_2.bias"],
            f"{d}.mlp.fc1.weight": sd[f"{s}.mlp.c_fc.weight"], f"{d}.mlp.fc1.bias": sd[f"{s}.mlp.c_fc.bias"],
            f"{d}.mlp.fc2.weight": sd[f"{s}.mlp.c_proj.weight"], f"{d}.mlp.fc2.bias": sd[f"{s}.mlp.c_proj.bias"],
        }  # fmt: skip
    return out


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
    from transformers import CLIPModel

    config = hf_config_from_open_clip(model)
    hf = CLIPModel(config).eval()
    missing, unexpected = hf.load_state_dict(convert_state_dict(model.state_dict(), config), strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]  # buffers HF rebuilds itself
    if missing or unexpected:
        raise ConversionError(f"state dict mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return hf


def image_processor_from_open_clip(model):
    from transformers import CLIPImageProcessor

    cfg = model.visual.preprocess_cfg
    size = cfg["size"][0] if isinstance(cfg["size"], (tuple, list)) else cfg["size"]
    if cfg.get("resize_mode", "shortest") != "shortest" or cfg.get("interpolation", "bicubic") != "bicubic":
        raise ConversionError(f"preprocessing {cfg} is not CLIP's shortest-side bicubic resize + centre crop")
    return CLIPImageProcessor(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size},
        image_mean=list(cfg["mean"]), image_std=list(cfg["std"]), resample=3, do_convert_rgb=True,
    )  # fmt: skip


@torch.inference_mode()
def max_embedding_difference(open_clip_model, hf_model, tokens: torch.Tensor, pixels: torch.Tensor) -> float:
    """Largest absolute difference between the two models' L2-normalised image and text embeddings."""
    import torch.nn.functional as F

    ours_img = F.normalize(hf_model.get_image_features(pixel_values=pixels).pooler_output, dim=-1)
    ours_txt = F.normalize(hf_model.get_text_features(input_ids=tokens).pooler_output, dim=-1)
    ref_img = F.normalize(open_clip_model.encode_image(pixels), dim=-1)
    ref_txt = F.normalize(open_clip_model.encode_text(tokens), dim=-1)
    return max((ours_img - ref_img).abs().max().item(), (ours_txt - ref_txt).abs().max().item())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description="Convert an open_clip model (e.g. BioCLIP) into a transformers CLIPModel folder."
    )
    p.add_argument("--model", required=True, help="open_clip name (hf-hub:imageomics/bioclip, ViT-B-16, ...)")
    p.add_argument("--pretrained", default=None, help="open_clip pretrained tag for plain architecture names")
    p.add_argument("--output", required=True, help="folder to write the CLIPModel, image processor and tokenizer to")
    p.add_argument(
        "--check",
        action="store_true",
        help="compare embeddings of both models on random inputs and print the difference",
    )
    args = p.parse_args(argv)

    import open_clip
    from transformers import CLIPProcessor

    from mushroomclip.models import offline_clip_tokenizer

    try:
        model, _, _ = open_clip.create_model_and_transforms(args.model, pretrained=args.pretrained)
        if not isinstance(open_clip.get_tokenizer(args.model), open_clip.tokenizer.SimpleTokenizer):
            raise ConversionError("only models with OpenAI CLIP's BPE tokenizer can be converted")
        hf = convert_open_clip(model.eval())
        processor = CLIPProcessor(
            image_processor=image_processor_from_open_clip(model), tokenizer=offline_clip_tokenizer()
        )
    except (ConversionError, OSError, RuntimeError) as err:
        print(f"error: could not convert {args.model}: {err}", file=sys.stderr)
        return 2
    out = Path(args.output)
    hf.save_pretrained(out)
    processor.save_pretrained(out)
    print(f"wrote {out} (vision {hf.config.vision_config.hidden_act}, mean {processor.image_processor.image_mean})")
    if args.check:
        tokens = open_clip.get_tokenizer(args.model)(["a photo of Amanita muscaria.", "Fungi Basidiomycota"])
        size = hf.config.vision_config.image_size
        diff = max_embedding_difference(model, hf, tokens, torch.randn(2, 3, size, size))
        print(f"max |difference| of normalised embeddings: {diff:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
