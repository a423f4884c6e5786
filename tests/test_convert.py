import open_clip
import pytest
import torch
import torch.nn.functional as F
from fake_hub import LOGIT_SCALE, TINY_BIOCLIP2_MODEL_CFG, open_clip_files, use_offline_cache, write_snapshot
from PIL import Image

from mushroomclip.commands.convert import main as convert_main
from mushroomclip.data.transforms import EvalPixels
from mushroomclip.models.backbones import load_backbone, offline_clip_tokenizer, preprocess_from_open_clip
from mushroomclip.models.convert import (
    ConversionError,
    convert_open_clip,
    image_processor_from_open_clip,
    max_embedding_difference,
)

SHRUNK_L14 = dict(  # ViT-L-14's shape rules (patch 14, GELU), small enough for CPU tests
    embed_dim=48,
    vision_cfg=dict(image_size=56, layers=2, width=64, head_width=32, patch_size=14),
    text_cfg=dict(context_length=77, vocab_size=49408, width=48, heads=4, layers=2),
)


SHRUNK_B16 = dict(  # ViT-B-16's shape rules (patch 16), narrowed
    embed_dim=32,
    vision_cfg=dict(image_size=32, layers=2, width=32, head_width=16, patch_size=16),
    text_cfg=dict(context_length=77, vocab_size=49408, width=32, heads=2, layers=2),
)


def random_open_clip(name, **kwargs):
    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=None, **kwargs)
    return model.eval(), preprocess


@pytest.mark.parametrize(
    ("name", "kwargs", "activation"),
    [("ViT-B-16", {"quick_gelu": True, **SHRUNK_B16}, "quick_gelu"), ("ViT-L-14", SHRUNK_L14, "gelu")],
    ids=["shrunk-vit-b16-quickgelu", "shrunk-vit-l14-gelu"],
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
    assert backbone.preprocess == preprocess_from_open_clip(model.visual.preprocess_cfg)
    assert (backbone.encode_images(EvalPixels(backbone.preprocess)(image)[None]) - reference).abs().max() <= 1e-4
    assert (backbone.encode_texts(["fly agaric"]) - text_ref).abs().max() <= 1e-4


def test_unsupported_models_are_refused_with_the_reason():
    with pytest.raises(ConversionError, match="not an OpenAI-architecture open_clip.CLIP"):
        convert_open_clip(torch.nn.Linear(2, 2))
    model, _ = random_open_clip("ViT-L-14", **SHRUNK_L14)
    model.text_pool_type = "last"
    with pytest.raises(ConversionError, match="text pooling other than argmax"):
        convert_open_clip(model)


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    return use_offline_cache(monkeypatch, tmp_path / "hub")


def _bioclip2_snapshot(cache, weights=True):
    files = open_clip_files(TINY_BIOCLIP2_MODEL_CFG)
    if not weights:
        files.pop("open_clip_model.safetensors")
    write_snapshot(cache, "imageomics/bioclip-2", files)


def test_convert_refuses_a_source_without_weights_in_one_line(hub_cache, tmp_path, capsys):
    _bioclip2_snapshot(hub_cache, weights=False)
    out = tmp_path / "out"
    assert convert_main(["--model", "hf-hub:imageomics/bioclip-2", "--output", str(out), "--check"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "imageomics/bioclip-2" in err and "open_clip_model.safetensors" in err
    assert not out.exists()  # no folder of random weights


def test_convert_check_compares_the_reloaded_folder_with_the_source(hub_cache, tmp_path, capsys):
    from transformers import CLIPModel

    _bioclip2_snapshot(hub_cache)
    out = tmp_path / "out"
    assert convert_main(["--model", "bioclip-2", "--output", str(out), "--check"]) == 0
    difference = float(capsys.readouterr().out.strip().rsplit(" ", 1)[1])
    assert difference <= 1e-4
    assert CLIPModel.from_pretrained(out).logit_scale.exp().item() == pytest.approx(LOGIT_SCALE, rel=1e-5)


def test_convert_check_fails_when_the_conversion_does_not_reproduce_the_source(hub_cache, tmp_path, monkeypatch):
    import mushroomclip.models.convert as convert

    real = convert.convert_open_clip

    def altering(model):  # a converter bug: it edits the source it was given, so comparing with that proves nothing
        with torch.no_grad():
            model.visual.proj.mul_(-1)
        return real(model)

    monkeypatch.setattr(convert, "convert_open_clip", altering)
    _bioclip2_snapshot(hub_cache)
    assert convert_main(["--model", "hf-hub:imageomics/bioclip-2", "--output", str(tmp_path / "out"), "--check"]) == 1


def test_source_tensors_without_a_place_in_clipmodel_are_refused():
    model, _ = random_open_clip("ViT-L-14", init_logit_bias=-10.0, **SHRUNK_L14)
    with pytest.raises(ConversionError, match="logit_bias"):
        convert_open_clip(model)


def test_converted_towers_load_as_clip_models_with_projection(tmp_path):
    from transformers import CLIPTextModelWithProjection, CLIPVisionModelWithProjection

    model, _ = random_open_clip("ViT-L-14", **SHRUNK_L14)
    hf = convert_open_clip(model)
    hf.save_pretrained(tmp_path)
    vision = CLIPVisionModelWithProjection.from_pretrained(tmp_path).eval()
    text = CLIPTextModelWithProjection.from_pretrained(tmp_path).eval()
    pixels = torch.randn(2, 3, 56, 56)
    tokens = open_clip.get_tokenizer("ViT-L-14")(["fly agaric"])
    with torch.no_grad():
        assert torch.allclose(
            vision(pixel_values=pixels).image_embeds,
            hf.get_image_features(pixel_values=pixels).pooler_output,
            atol=1e-5,
        )
        assert torch.allclose(
            text(input_ids=tokens).text_embeds, hf.get_text_features(input_ids=tokens).pooler_output, atol=1e-5
        )


def test_lora_bioclip2_config_trains_the_folder_its_conversion_command_writes():
    from pathlib import Path

    from mushroomclip.config import load_train_config

    path = Path(__file__).parents[1] / "configs/lora_bioclip2.yaml"
    cfg = load_train_config(path)
    assert f"--output {cfg.model.base} " in path.read_text()  # the header's convert command
    assert (cfg.training.bf16, cfg.lora.towers, cfg.loss.name) == (True, ["vision", "text"], "class_text")
