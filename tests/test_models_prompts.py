import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from mushroomclip.data.transforms import EvalPixels
from mushroomclip.models.backbones import ModelLoadError, load_backbone, offline_clip_tokenizer, resolve_spec
from mushroomclip.models.prompts import (
    OPENAI_TEMPLATES,
    cached_class_text_embeddings,
    class_prompts,
    class_text_embeddings,
    text_types,
)
from mushroomclip.taxonomy import load_taxonomy


@pytest.fixture(scope="module")
def tiny_clip():
    return load_backbone("tiny-clip")


def test_unknown_model_lists_the_valid_names():
    with pytest.raises(
        ValueError, match=r"unknown model 'clip-b23'; valid names: clip-b32, clip-b16, .*bioclip-2.*tiny-clip"
    ):
        resolve_spec("clip-b23")
    assert resolve_spec("open_clip:ViT-B-32@laion2b_s34b_b79k").pretrained == "laion2b_s34b_b79k"


def test_hub_model_offline_is_one_clear_error():
    with pytest.raises(
        ModelLoadError, match=r"could not load model 'clip-b32' \(openai/clip-vit-base-patch32\).*tiny-clip"
    ):
        load_backbone("clip-b32")


def test_offline_tokenizer_matches_open_clip_token_ids():
    import open_clip

    texts = [
        "a photo of Amanita muscaria.",
        "Fungi Basidiomycota ... with common name fly agaric",
        "it's 2 FLY-agarics!",
    ]
    ours = offline_clip_tokenizer()(texts, padding="max_length", max_length=77, return_tensors="pt")["input_ids"]
    ref = open_clip.get_tokenizer("ViT-B-16")(texts)
    real = ref != 0  # open_clip pads with 0, HF with <|endoftext|>
    assert torch.equal(ours[real], ref[real])


@pytest.mark.parametrize("eos_token_id", [49407, 2])  # 2: openai/clip-vit-*'s legacy config (argmax pooling)
def test_padding_to_the_longest_prompt_gives_the_same_text_embeddings_as_padding_to_77(eos_token_id):
    from transformers import CLIPModel

    from mushroomclip.models.backbones import tiny_clip_config

    torch.manual_seed(0)
    config = tiny_clip_config()
    config.text_config.eos_token_id = eos_token_id
    model = CLIPModel(config).eval()
    texts = ["fly agaric", "a photo of Fungi Basidiomycota Agaricomycetes Agaricales Amanita muscaria, fly agaric."]
    ids = load_backbone("tiny-clip").tokenize(texts)
    full = offline_clip_tokenizer()(texts, padding="max_length", max_length=77, return_tensors="pt")["input_ids"]
    assert ids.shape[1] == 30 and torch.equal(ids, full[:, : ids.shape[1]])
    with torch.no_grad():
        short, long = (model.get_text_features(input_ids=x).pooler_output for x in (ids, full))
    assert torch.allclose(short, long, atol=1e-5)


@pytest.mark.parametrize("name", ["tiny-clip", "tiny-openclip"])
def test_tiny_backbones_give_normalised_deterministic_embeddings(name):
    a, b = load_backbone(name), load_backbone(name)
    pixels = torch.stack([EvalPixels(a.preprocess)(Image.new("RGB", (90, 60), c)) for c in ((200, 0, 0), (0, 0, 200))])
    assert pixels.shape == (2, 3, 32, 32)  # the model's own image size, from its config
    images, texts = a.encode_images(pixels), a.encode_texts(["a photo of x.", "fly agaric"])
    assert images.shape == (2, 32) and texts.shape == (2, 32)
    assert torch.allclose(images.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert torch.equal(images, b.encode_images(pixels))  # same weights in every process
    assert a.cache_id == b.cache_id


def test_openai_templates_render_class_names_as_open_clips_own():
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    assert len(OPENAI_TEMPLATES) == 80 and OPENAI_TEMPLATES[0] == "a bad photo of a {}."
    tax = load_taxonomy()
    for species in ("Amanita muscaria", "Boletus edulis"):
        name = tax.text(species, "sci_com")
        ours = class_prompts(tax, "sci_com", OPENAI_TEMPLATES)[tax.id(species)]
        assert ours == [template(name) for template in OPENAI_IMAGENET_TEMPLATES]


def test_class_prompts_render_each_text_type_in_each_template():
    tax = load_taxonomy()
    prompts = class_prompts(tax, "sci_com", ["a photo of {}.", "itap of a {}."])
    assert prompts[tax.id("Amanita muscaria")] == [
        "a photo of Amanita muscaria with common name fly agaric.",
        "itap of a Amanita muscaria with common name fly agaric.",
    ]
    assert class_prompts(tax, "taxon", ["{}"])[tax.id("Boletus edulis")] == [
        "Fungi Basidiomycota Agaricomycetes Boletales Boletaceae Boletus edulis"
    ]
    assert text_types("all") == ["sci", "com", "taxon", "sci_com", "taxon_com"]
    with pytest.raises(ValueError, match="unknown text type"):
        text_types("sci,latin")


class CountingBackbone:
    """Wraps a backbone and counts text encodings: proves the cache is (not) used."""

    def __init__(self, inner):
        self.inner, self.calls = inner, 0
        self.name, self.cache_id = inner.name, inner.cache_id

    def encode_texts(self, texts):
        self.calls += 1
        return self.inner.encode_texts(texts)


def test_class_embedding_is_the_renormalised_mean_of_normalised_templates(tiny_clip):
    prompts = [
        ["a photo of Amanita muscaria.", "itap of a Amanita muscaria."],
        ["a photo of Boletus edulis.", "itap of a Boletus edulis."],
    ]
    got = class_text_embeddings(tiny_clip, prompts)
    for c, per_class in enumerate(prompts):
        with torch.no_grad():
            raw = tiny_clip.model.get_text_features(input_ids=tiny_clip.tokenize(per_class)).pooler_output
        expected = F.normalize(F.normalize(raw, dim=-1).mean(0), dim=0)
        assert torch.allclose(got[c], expected, atol=1e-6)
    assert torch.allclose(got.norm(dim=-1), torch.ones(2), atol=1e-6)


def test_text_embedding_cache_is_hit_then_invalidated_by_a_taxonomy_change(tiny_clip, tmp_path):
    backbone = CountingBackbone(tiny_clip)
    tax = load_taxonomy()
    first, hit1 = cached_class_text_embeddings(backbone, tax, "sci", "single", tmp_path)
    second, hit2 = cached_class_text_embeddings(backbone, tax, "sci", "single", tmp_path)
    assert (hit1, hit2) == (False, True) and torch.equal(first, second)
    calls = backbone.calls
    edited = tmp_path / "edited.csv"
    edited.write_bytes(tax.raw.replace(b"fly agaric", b"fly amanita"))
    third, hit3 = cached_class_text_embeddings(backbone, load_taxonomy(edited), "sci", "single", tmp_path)
    assert not hit3 and backbone.calls > calls
    _, hit4 = cached_class_text_embeddings(backbone, tax, "com", "single", tmp_path)
    assert not hit4  # another text type is another entry
    assert first.shape == (169, 32) and np.allclose(first.norm(dim=-1).numpy(), 1, atol=1e-5)
