"""Supervised image classifiers: tiny-resnet, pretrained loads from fake Hub snapshots, LoRA, and a saved
run loaded back as a classifier."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
import torch
from fake_hub import use_offline_cache, write_snapshot

from mushroomclip.data.transforms import PreprocessConfig, normalize
from mushroomclip.models.backbones import ModelLoadError
from mushroomclip.models.supervised import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    TINY_RESNET,
    add_classifier_lora,
    build_classifier,
    load_supervised_classifier,
    save_classifier,
    supervised_record,
    tiny_resnet_config,
)
from mushroomclip.taxonomy import load_taxonomy

TAXONOMY = load_taxonomy()
CLASSES = TAXONOMY.classes
RESNET_REPO = "microsoft/resnet-50"  # its layout at test size: a ResNetForImageClassification of 10 classes
TIMM_REPO = "timm/test_resnet.r160_in1k"
# microsoft/resnet-50's preprocessor_config.json (legacy ConvNeXt feature extractor keys)
RESNET_PREPROCESSOR = {
    "crop_pct": 0.875,
    "do_normalize": True,
    "do_resize": True,
    "feature_extractor_type": "ConvNextFeatureExtractor",
    "image_mean": [0.485, 0.456, 0.406],
    "image_std": [0.229, 0.224, 0.225],
    "resample": 3,
    "size": 224,
}
BACKBONE_TENSOR = "resnet.embedder.embedder.convolution.weight"


def _saved_files(model) -> dict[str, bytes]:
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        return {name: (Path(tmp) / name).read_bytes() for name in ("config.json", "model.safetensors")}


def resnet_files(drop: str | None = None) -> dict[str, bytes]:
    """A 10-class tiny ResNetForImageClassification with microsoft/resnet-50's preprocessor; ``drop``: a tensor
    left out of the weight file."""
    from safetensors.torch import load, save
    from transformers import ResNetForImageClassification

    torch.manual_seed(1)
    files = _saved_files(ResNetForImageClassification(tiny_resnet_config([f"imagenet-{i}" for i in range(10)])))
    if drop is not None:
        state = load(files["model.safetensors"])
        del state[drop]
        files["model.safetensors"] = save(state, metadata={"format": "pt"})
    return files | {"preprocessor_config.json": json.dumps(RESNET_PREPROCESSOR).encode()}


def timm_files() -> dict[str, bytes]:
    """A timm Hub repo as ``timm``'s push_to_hub writes it: config.json (architecture, pretrained_cfg) + weights."""
    import timm
    from timm.models._hub import save_for_hf

    torch.manual_seed(2)
    with tempfile.TemporaryDirectory() as tmp:
        save_for_hf(timm.create_model("test_resnet", pretrained=False), tmp, safe_serialization=True)
        return {name: (Path(tmp) / name).read_bytes() for name in ("config.json", "model.safetensors")}


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    return use_offline_cache(monkeypatch, tmp_path / "hub")


def test_tiny_resnet_gives_one_logit_per_class():
    built = build_classifier(TINY_RESNET, CLASSES, pretrained=False)
    logits = built.model(pixel_values=torch.randn(3, 3, 32, 32)).logits
    assert logits.shape == (3, len(CLASSES)) and torch.isfinite(logits).all()
    assert built.record == {
        "base_model": TINY_RESNET,
        "pretrained": False,
        "weights": "random (seed 0)",
        "num_labels": len(CLASSES),
    }
    assert built.model.config.id2label[5] == CLASSES[5]
    # the same random backbone every time: a LoRA run on it can be loaded back
    again = build_classifier(TINY_RESNET, CLASSES, pretrained=False).model
    assert torch.equal(again.state_dict()[BACKBONE_TENSOR], built.model.state_dict()[BACKBONE_TENSOR])
    with pytest.raises(ModelLoadError, match="pretrained: false"):
        build_classifier(TINY_RESNET, CLASSES, pretrained=True)


def test_pretrained_snapshot_loads_its_backbone_with_a_new_head(hub_cache):
    from safetensors.torch import load

    snapshot = write_snapshot(hub_cache, RESNET_REPO, resnet_files())
    stored = load((snapshot / "model.safetensors").read_bytes())
    built = build_classifier(RESNET_REPO, CLASSES[:4])
    state = built.model.state_dict()
    assert torch.equal(state[BACKBONE_TENSOR], stored[BACKBONE_TENSOR])  # ImageNet weights, not random ones
    assert state["classifier.1.weight"].shape == (4, 32) and stored["classifier.1.weight"].shape == (10, 32)
    assert built.record == {
        "base_model": RESNET_REPO,
        "pretrained": True,
        "weights": f"commit {snapshot.name}",
        "num_labels": 4,
    }
    # microsoft/resnet-50's processor: short side int(224 / 0.875) = 256, centre crop 224, bicubic
    assert built.preprocess == PreprocessConfig(
        size=(224, 224), resize_size=256, interpolation="bicubic", mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)
    )
    scratch = build_classifier(RESNET_REPO, CLASSES[:4], pretrained=False)
    assert not torch.equal(scratch.model.state_dict()[BACKBONE_TENSOR], stored[BACKBONE_TENSOR])
    assert scratch.record["pretrained"] is False and snapshot.name in scratch.record["weights"]


def test_snapshot_missing_a_backbone_tensor_is_refused_in_one_line(hub_cache):
    write_snapshot(hub_cache, RESNET_REPO, resnet_files(drop=BACKBONE_TENSOR))
    with pytest.raises(ModelLoadError) as err:
        build_classifier(RESNET_REPO, CLASSES[:4])
    message = str(err.value)
    assert "\n" not in message and RESNET_REPO in message and "model.safetensors" in message
    assert f"lacks {BACKBONE_TENSOR}" in message


def _truncated_weights() -> dict[str, bytes]:
    files = resnet_files()
    return files | {"model.safetensors": files["model.safetensors"][:1000]}


@pytest.mark.parametrize(
    "files, pretrained, expected",
    [
        (None, True, "HF_HUB_OFFLINE"),  # not in the cache, and offline
        (_truncated_weights, True, "cannot be read"),  # an interrupted download
        (lambda: resnet_files() | {"config.json": b'{"model_type": "gpt2"}'}, False, "not an image classifier"),
    ],
)
def test_unusable_repo_is_one_line_naming_it(hub_cache, files, pretrained, expected):
    if files is not None:
        write_snapshot(hub_cache, RESNET_REPO, files())
    with pytest.raises(ModelLoadError) as err:
        build_classifier(RESNET_REPO, CLASSES[:4], pretrained=pretrained)
    assert "\n" not in str(err.value) and RESNET_REPO in str(err.value) and expected in str(err.value)


def test_a_local_folder_without_its_image_processor_is_told_what_it_lacks(tmp_path):
    """No network advice for a folder (a merged or fully fine-tuned model saved without preprocessor_config.json)."""
    files = resnet_files()
    del files["preprocessor_config.json"]
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    with pytest.raises(ModelLoadError) as err:
        build_classifier(str(tmp_path), CLASSES[:4], pretrained=True)
    message = str(err.value)
    assert "\n" not in message and "the folder has no usable preprocessor config" in message
    assert "preprocessor_config.json" in message and "hf auth login" not in message


def test_timm_snapshot_loads_through_the_timm_wrapper(hub_cache):
    from safetensors.torch import load

    snapshot = write_snapshot(hub_cache, TIMM_REPO, timm_files())
    stored = load((snapshot / "model.safetensors").read_bytes())
    built = build_classifier(TIMM_REPO, CLASSES[:3])
    state = built.model.state_dict()
    assert torch.equal(state["timm_model.conv1.0.weight"], stored["conv1.0.weight"])
    assert state["timm_model.fc.weight"].shape[0] == 3
    # timm's eval transform: short side floor(160 / 0.95) = 168, centre crop 160, bilinear, mean/std 0.5
    assert built.preprocess == PreprocessConfig(
        size=(160, 160), resize_size=168, interpolation="bilinear", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)
    )
    assert built.model(pixel_values=torch.randn(2, 3, 160, 160)).logits.shape == (2, 3)


def _train_step(model, steps: int = 2) -> None:
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model.train()
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(
            model(pixel_values=torch.randn(4, 3, 32, 32)).logits, torch.tensor([0, 1, 2, 3])
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def test_lora_trains_only_the_adapters_and_the_head():
    torch.manual_seed(0)
    built = build_classifier(TINY_RESNET, CLASSES, pretrained=False)
    before = {k: v.clone() for k, v in built.model.state_dict().items()}
    model = add_classifier_lora(built.model, r=4, alpha=8, dropout=0.0)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or "modules_to_save" in n for n in trainable)
    assert any("convolution.lora_A" in n for n in trainable) and any("classifier" in n for n in trainable)
    _train_step(model)
    after = model.get_base_model().state_dict()
    # the frozen backbone, BatchNorm statistics included, is exactly the one it started from
    for key in ("resnet.embedder.embedder.normalization.running_mean", BACKBONE_TENSOR):
        assert torch.equal(after[key.replace("convolution.weight", "convolution.base_layer.weight")], before[key])


@pytest.mark.parametrize("finetune", ["full", "lora"])
def test_saved_run_loads_back_with_the_same_logits(tmp_path, finetune):
    from PIL import Image

    torch.manual_seed(0)
    built = build_classifier(TINY_RESNET, CLASSES, pretrained=False)
    model = add_classifier_lora(built.model, 4, 8, 0.0) if finetune == "lora" else built.model
    _train_step(model)  # moves BatchNorm statistics of a full fine-tune: they must be saved too
    record = supervised_record(TAXONOMY, built, finetune)
    save_classifier(tmp_path / "run", model, record, TAXONOMY)
    classifier = load_supervised_classifier(str(tmp_path / "run"), species=CLASSES)
    image = tmp_path / "photo.png"
    Image.new("RGB", (50, 40), (200, 120, 30)).save(image)
    pixels = classifier.pixels(str(image))
    assert pixels.shape == (3, 32, 32) and pixels.dtype == torch.uint8
    expected = model.eval()(pixel_values=normalize(pixels[None], IMAGENET_MEAN, IMAGENET_STD)).logits
    assert torch.allclose(classifier.logits([str(image)]), expected, atol=1e-4)
    [top] = classifier.predict([str(image)], top_k=3)
    assert len(top) == 3 and top[0].probability >= top[1].probability >= top[2].probability
    assert classifier.classes == CLASSES and classifier.record["pretrained"] is False


def test_course_reference_rows_are_labelled_quoted_and_report_only_what_the_course_did():
    from mushroomclip.evaluation.references import REFERENCE_NOTE, reference_rows
    from mushroomclip.evaluation.zeroshot import summary_markdown

    rows = reference_rows()
    assert [r["model"] for r in rows] == [f"ResNet{n} (course)" for n in (18, 34, 50, 101, 152)]
    assert all(r["quoted"] and "quoted, not reproduced" in r["method"] for r in rows)
    assert (rows[2]["miou"], rows[2]["mf1"], rows[2]["oa"]) == pytest.approx((0.734, 0.840, 0.874))
    assert rows[2]["top5"] is None  # the course reports no top-5: n/a, never a number of ours
    table = summary_markdown(rows, "benchmark", [REFERENCE_NOTE])
    assert (
        "| ResNet50 (course) | supervised, from scratch: quoted, not reproduced | - | 87.4 | n/a | 84.0 | 73.4 |"
        in table
    )


def test_evaluation_features_of_a_supervised_run_are_its_logits(tmp_path, prepared):
    from datasets import Image

    from mushroomclip.data.splits import load_splits
    from mushroomclip.evaluation.features import image_features

    built = build_classifier(TINY_RESNET, CLASSES, pretrained=False)
    save_classifier(tmp_path / "run", built.model, supervised_record(TAXONOMY, built, "full"), TAXONOMY)
    classifier = load_supervised_classifier(str(tmp_path / "run"))
    split = load_splits(prepared[0])["test"]
    scores, labels = image_features(classifier, split, batch_size=8, num_workers=0, progress=False)
    cells = split.cast_column("image", Image(decode=False))["image"]
    assert scores.shape == (len(split), len(CLASSES)) and list(labels) == split["label"]
    assert torch.allclose(torch.from_numpy(scores), classifier.logits(cells), atol=1e-5)
