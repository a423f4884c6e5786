"""Each loss against a value worked out by hand on 2-D embeddings."""

import math
import re

import pytest
import torch

from mushroomclip.training.losses import LOSSES, LossInputs, class_text_loss, clip_loss, multi_positive_loss

E1, E2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
SCALE = torch.tensor(2.0)


def test_class_text_loss_by_hand():
    images = torch.stack([E1, E2])
    classes = torch.stack([E1, E2, -E1])  # 3 classes
    labels = torch.tensor([0, 2])
    # image 0: logits (2, 0, -2), label 0 -> -log(e^2 / (e^2 + 1 + e^-2))
    # image 1: logits (0, 2, 0), label 2 -> -log(1 / (1 + e^2 + 1))
    expected = (-math.log(math.exp(2) / (math.exp(2) + 1 + math.exp(-2))) - math.log(1 / (2 + math.exp(2)))) / 2
    assert class_text_loss(images, classes, labels, SCALE).item() == pytest.approx(expected, rel=1e-6)


def test_clip_loss_by_hand():
    images = torch.stack([E1, E2])
    texts = torch.stack([E1, E1])
    # logits [[2, 2], [0, 0]]: every row and column softmax is uniform or one-sided.
    # image->text: row 0 target 0: log 2; row 1 target 1: log 2
    # text->image: column 0 = (2, 0) target 0: -log(e^2/(e^2+1)); column 1 = (2, 0) target 1: -log(1/(e^2+1))
    i2t = math.log(2)
    t2i = (-math.log(math.exp(2) / (math.exp(2) + 1)) - math.log(1 / (math.exp(2) + 1))) / 2
    assert clip_loss(images, texts, SCALE).item() == pytest.approx((i2t + t2i) / 2, rel=1e-6)


def test_multi_positive_loss_by_hand_and_its_difference_from_clip():
    images = torch.stack([E1, E1, E2])
    texts = torch.stack([E1, E1, E2])
    labels = torch.tensor([5, 5, 9])  # the first two are the same species
    # rows 0 and 1: logits (2, 2, 0), targets (1/2, 1/2, 0): -log(e^2 / (2e^2 + 1)) each
    # row 2: logits (0, 0, 2), target (0, 0, 1): -log(e^2 / (2 + e^2)); symmetric, so both directions agree
    row01 = -math.log(math.exp(2) / (2 * math.exp(2) + 1))
    row2 = -math.log(math.exp(2) / (2 + math.exp(2)))
    expected = (2 * row01 + row2) / 3
    assert multi_positive_loss(images, texts, labels, SCALE).item() == pytest.approx(expected, rel=1e-6)


def test_multi_positive_reduces_to_clip_when_every_label_differs():
    images = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1)
    texts = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1)
    distinct = multi_positive_loss(images, texts, torch.arange(6), SCALE)
    assert distinct.item() == pytest.approx(clip_loss(images, texts, SCALE).item(), rel=1e-6)
    shared = multi_positive_loss(images, texts, torch.tensor([0, 0, 1, 1, 2, 2]), SCALE)
    assert shared.item() != pytest.approx(distinct.item(), rel=1e-3)


def test_losses_have_gradients_for_both_towers():
    images = torch.nn.functional.normalize(torch.randn(4, 8, requires_grad=True), dim=-1)
    texts = torch.nn.functional.normalize(torch.randn(4, 8, requires_grad=True), dim=-1)
    labels = torch.tensor([0, 0, 1, 2])
    for loss in (
        clip_loss(images, texts, SCALE),
        multi_positive_loss(images, texts, labels, SCALE),
        class_text_loss(images, texts, labels, SCALE),
    ):
        grads = torch.autograd.grad(loss, [images, texts])
        assert all(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("loss_name", ["class_text", "clip", "multi_positive"])
def test_frozen_text_tower_reuses_class_embeddings_with_the_same_loss_and_gradients(loss_name, tmp_path):
    from transformers import TrainingArguments

    from mushroomclip.models.backbones import load_backbone
    from mushroomclip.models.lora import add_lora
    from mushroomclip.training.trainer import ContrastiveTrainer

    backbone = load_backbone("tiny-clip")
    model = add_lora(backbone.model, 4, 8, 0.0, ["vision"], ["q_proj", "v_proj"], False).train()
    ids = backbone.tokenize(["Amanita muscaria", "Boletus edulis", "Cantharellus cibarius", "Morchella esculenta"])
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    trainer = ContrastiveTrainer(model=model, args=args, class_input_ids=ids, loss_name=loss_name, evaluator=None)
    assert trainer.text_frozen  # LoRA on the vision tower only
    torch.manual_seed(0)
    inputs = {"pixel_values": torch.randn(6, 3, 32, 32), "labels": torch.tensor([0, 1, 1, 2, 3, 0])}

    def loss_and_grads():
        model.zero_grad()
        loss = trainer.compute_loss(model, inputs)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]

    cached, cached_grads = loss_and_grads()
    assert trainer._class_text_embeds.shape == (4, 32)
    trainer.text_frozen = False  # every step through the text tower, as with LoRA on both towers
    full, full_grads = loss_and_grads()
    assert torch.allclose(cached, full, atol=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(cached_grads, full_grads))
    both = add_lora(load_backbone("tiny-clip").model, 4, 8, 0.0, ["vision", "text"], ["q_proj", "v_proj"], False)
    assert not ContrastiveTrainer(
        model=both, args=args, class_input_ids=ids, loss_name=loss_name, evaluator=None
    ).text_frozen


def test_zero_shot_logits_keep_the_logit_scale_and_scores_in_fp32_under_bf16_autocast():
    from mushroomclip.training.trainer import zero_shot_logits

    images = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    classes = torch.nn.functional.normalize(torch.randn(3, 8), dim=-1)
    logit_scale = torch.nn.Parameter(torch.tensor(math.log(100)))  # CLIP's trained value, the clamp's bound
    expected = 100 * images.double() @ classes.double().T
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = zero_shot_logits(images, classes, logit_scale)
        naive = logit_scale.exp() * images @ classes.T  # the product in bf16: 2-3 significant digits
    assert logits.dtype == torch.float32 and torch.allclose(logits.double(), expected, rtol=1e-5)
    assert not torch.allclose(naive.double(), expected, rtol=1e-3)  # what the fp32 guard is for


def test_every_loss_of_the_table_is_its_function_on_the_inputs():
    images = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    texts = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    labels = torch.tensor([0, 0, 1, 3])
    batch = LossInputs(images, texts, labels, SCALE)
    assert set(LOSSES) == {
        "class_text",
        "clip",
        "multi_positive",
        "hierarchical_soft",
        "hierarchical_xent",
        "cross_entropy",
    }
    assert torch.equal(LOSSES["class_text"](batch), class_text_loss(images, texts, labels, SCALE))
    assert torch.equal(LOSSES["clip"](batch), clip_loss(images, texts, SCALE))
    assert torch.equal(LOSSES["multi_positive"](batch), multi_positive_loss(images, texts, labels, SCALE))
    assert torch.equal(batch.class_logits(), SCALE * images @ texts.T)
    # a supervised classifier's own logits: cross_entropy reads them, as every loss on class logits does
    logits = torch.randn(4, 5)
    on_logits = LossInputs(None, None, labels, None, logits=logits)
    assert torch.equal(on_logits.class_logits(), logits)
    assert torch.equal(LOSSES["cross_entropy"](on_logits), torch.nn.functional.cross_entropy(logits, labels))


def test_compute_loss_dispatches_through_the_table_with_class_logits_and_context(tmp_path, monkeypatch):
    """A loss on class logits (as a hierarchical one would be) is one more entry of LOSSES."""
    from transformers import TrainingArguments

    from mushroomclip.models.backbones import load_backbone
    from mushroomclip.models.lora import add_lora
    from mushroomclip.training import losses
    from mushroomclip.training.trainer import ContrastiveTrainer

    seen = []

    def on_class_logits(batch: LossInputs) -> torch.Tensor:
        seen.append((batch.class_logits().shape, batch.labels.tolist(), batch.context))
        return torch.nn.functional.cross_entropy(batch.class_logits(), batch.labels) * 0 + 7

    monkeypatch.setitem(losses.LOSSES, "on_class_logits", on_class_logits)
    backbone = load_backbone("tiny-clip")
    model = add_lora(backbone.model, 4, 8, 0.0, ["vision", "text"], ["q_proj", "v_proj"], False)
    ids = backbone.tokenize(["Amanita muscaria", "Boletus edulis", "Cantharellus cibarius"])
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    trainer = ContrastiveTrainer(
        model=model,
        args=args,
        class_input_ids=ids,
        loss_name="on_class_logits",
        evaluator=None,
        loss_context={"taxonomy": "the run's table"},
    )
    inputs = {"pixel_values": torch.randn(5, 3, 32, 32), "labels": torch.tensor([0, 2, 1, 1, 0])}
    assert trainer.compute_loss(model, inputs).item() == 7
    assert seen == [((5, 3), [0, 2, 1, 1, 0], {"taxonomy": "the run's table"})]  # (B, C): every class's prompt


def toy_taxonomy():
    """Four bundled species: deadly, edible, edible, poisonous (class ids in that order)."""
    from mushroomclip.taxonomy import Taxonomy, load_taxonomy

    full = load_taxonomy()
    names = ["Amanita phalloides", "Amanita rubescens", "Boletus edulis", "Amanita muscaria"]
    return Taxonomy([full.species[full.id(name)] for name in names], "toy", b"toy")


def test_hierarchical_losses_and_the_danger_term_are_table_entries_on_the_class_logits():
    from mushroomclip.training.losses import (
        danger_penalty,
        hierarchical_soft_loss,
        hierarchical_xent_loss,
        hierarchy_tensors,
        loss_context,
        training_loss,
    )

    taxonomy = toy_taxonomy()
    loss_args = type("LossArguments", (), {"beta": 7.0, "alpha": 0.3, "danger_weight": 0.0})
    images = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1)
    texts = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    labels = torch.tensor([0, 1, 2, 3, 0, 3])
    batch = LossInputs(images, texts, labels, SCALE, loss_context(taxonomy, loss_args))
    logits, tensors = SCALE * images @ texts.T, hierarchy_tensors(taxonomy)
    soft = hierarchical_soft_loss(logits, labels, tensors.lca_distance, 7.0)
    hxe = hierarchical_xent_loss(logits, labels, tensors.lineage, 0.3)
    assert torch.allclose(LOSSES["hierarchical_soft"](batch), soft) and torch.allclose(
        LOSSES["hierarchical_xent"](batch), hxe
    )
    assert torch.equal(training_loss("hierarchical_soft", batch), LOSSES["hierarchical_soft"](batch))  # weight 0: off
    batch.context["danger_weight"] = 2.0
    # by hand: the edible mass (classes 1, 2) of the images whose truth is deadly or poisonous (0, 3, 0, 3)
    probs = logits.softmax(dim=1)
    by_hand = sum(probs[i, 1] + probs[i, 2] for i in (0, 3, 4, 5)) / 6
    assert torch.allclose(danger_penalty(logits, labels, tensors.dangerous, tensors.edible), by_hand)
    assert torch.allclose(training_loss("hierarchical_xent", batch), hxe + 2.0 * by_hand)
    assert torch.allclose(
        training_loss("class_text", batch), class_text_loss(images, texts, labels, SCALE) + 2.0 * by_hand
    )


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("loss.danger_weight=-1", "loss.danger_weight must be 0 (off) or more"),
        ("loss.beta=0", "loss.beta must be positive"),
        ("loss.alpha=-0.5", "loss.alpha must be 0 or more"),
        ("loss.name=hierarchical_sfot", "loss.name must be one of class_text, clip, multi_positive, hierarchical_soft"),
    ],
)
def test_loss_settings_a_run_cannot_use_are_config_errors(override, message):
    from pathlib import Path

    from mushroomclip.config import ConfigError, load_train_config

    with pytest.raises(ConfigError, match=re.escape(message)):
        load_train_config(Path(__file__).parents[1] / "configs/tiny.yaml", [override])
    with pytest.raises(ConfigError, match="loss.danger_weight needs the scores of every class"):
        load_train_config(Path(__file__).parents[1] / "configs/tiny.yaml", ["loss.name=clip", "loss.danger_weight=1"])
