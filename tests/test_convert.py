import open_clip
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from mushroomclip.convert import (
    ConversionError,
    convert_open_clip,
    image_processor_from_open_clip,
    max_embedding_difference,
)
from mushroomclip.models import load_backbone, offline_clip_tokenizer

SHRUNK_L14 = dict(  # ViT-L-14's shape rules (patch 14, GELU), small enough for CPU tests
    embed_dim=48,
    vision_cfg=dict(image_size=56, layers=2, width=64, head_width=32, patch_size=14),
    text_cfg=dict(context_length=77, vocab_size=49408, width=48, heads=4, layers=2),
)


def random_open_clip(name, **kwargs):
    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=None, **kwargs)
    return model.eval(), preprocess


@pytest.mark.parametrize(
    ("name", "kwargs", "activation"),
    [("ViT-B-16", {"quick_gelu": True}, "quick_gelu"), ("ViT-L-14", SHRUNK_L14, "gelu")],
    ids=["vit-b16-quickgelu", "shrunk-vit-l14-gelu"],
)
def test_converted_model_matches_open_clip(name, kwargs, activation):
    model, _ = random_open_clip(name, **kwargs)
    hf = convert_open_clip(model)
    assert hf.config.vision_config.hidden_act == activation == hf.config.text_config.hidden_act  # read, not assumed
    tokens = open_clip.get_tokenizer(name)(["a photo of Amanita muscaria.", "Fungi Basidiomycota Agaricomycetes"])
    size = hf.config.vision_config.image_size
    assert max_embedding_difference(model, hf, tokens, torch.randn(3, 3, size, size)) <= 1e-4


def test_converted_folder_loads_as_an_hf_backbone_with_the_source_preprocessing(tmp_path):
    from transformers import CLIPProcessor

    model, preprocess = random_open_clip(
        "ViT-L-14", image_mean=(0.5, 0.4, 0.3), image_std=(0.2, 0.25, 0.3), **SHRUNK_L14
    )
    processor = CLIPProcessor(image_processor=image_processor_from_open_clip(model), tokenizer=offline_clip_tokenizer())
    assert list(processor.image_processor.image_mean) == [0.5, 0.4, 0.3]
    convert_open_clip(model).save_pretrained(tmp_path / "hf")
    processor.save_pretrained(tmp_path / "hf")
    backbone = load_backbone(f"hf:{tmp_path / 'hf'}")
    image = Image.new("RGB", (120, 80), (180, 120, 40))
    with torch.no_grad():
        reference = F.normalize(model.encode_image(preprocess(image)[None]), dim=-1)
        text_ref = F.normalize(model.encode_text(open_clip.get_tokenizer("ViT-L-14")(["fly agaric"])), dim=-1)
    assert (backbone.encode_images(backbone.preprocess(image)[None]) - reference).abs().max() <= 1e-4
    assert (backbone.encode_texts(["fly agaric"]) - text_ref).abs().max() <= 1e-4


def test_unsupported_models_are_refused_with_the_reason():
    with pytest.raises(ConversionError, match="not an OpenAI-architecture open_clip.CLIP"):
        convert_open_clip(torch.nn.Linear(2, 2))
    model, _ = random_open_clip("ViT-L-14", **SHRUNK_L14)
    model.text_pool_type = "last"
    with pytest.raises(ConversionError, match="text pooling other than argmax"):
        convert_open_clip(model)
