"""Supervised image classifiers under the LoRA runs' Trainer: a loss of the LOSSES table on the network's own
class logits (``loss.danger_weight`` too), evaluation on those logits, checkpoints of the full model (or of the
adapter with its head).

Everything else (seeded draws and augmentation, NaN stop, precision, checkpoint/resume, the run folder)
is :class:`~mushroomclip.training.trainer.ContrastiveTrainer`'s: only what differs is overridden here.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from transformers import Trainer, set_seed

from mushroomclip.config import ConfigError, TrainConfig
from mushroomclip.data.transforms import PreprocessConfig, normalize, pixel_stats, train_images
from mushroomclip.evaluation.features import PreprocessedImages
from mushroomclip.metrics import classification_metrics
from mushroomclip.models.supervised import SupervisedModel, add_classifier_lora, build_classifier, supervised_record
from mushroomclip.taxonomy import Taxonomy
from mushroomclip.training.losses import LossInputs, loss_context, training_loss
from mushroomclip.training.trainer import (
    ContrastiveTrainer,
    LabelledPixels,
    collate,
    train_class_counts,
    train_draw_weights,
    trainer_arguments,
)


class ClassifierEvaluator:
    """The images a classifier scores (its evaluation preprocessing) and their metrics."""

    templates = None  # no class prompts: classes.json records none

    def __init__(self, preprocess: PreprocessConfig, taxonomy: Taxonomy):
        self.preprocess, self.taxonomy = preprocess, taxonomy

    def images(self, split) -> LabelledPixels:
        """A ``datasets`` split through the model's evaluation preprocessing (uint8, normalised on the device)."""
        return LabelledPixels(PreprocessedImages(split, self.preprocess))

    def metrics(self, labels: np.ndarray, scores: np.ndarray) -> dict:
        return classification_metrics(labels, scores, len(self.taxonomy), taxonomy=self.taxonomy)


def classifier_logits(model, pixels: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """``(B, C)`` fp32 logits of a batch (uint8 pixels normalised on the device with the model's mean/std)."""
    return model(pixel_values=normalize(pixels, mean, std)).logits.float()


class ClassifierTrainer(ContrastiveTrainer):
    """:class:`ContrastiveTrainer` for an ``AutoModelForImageClassification`` (or its peft model): the loss on its
    class logits, and those logits as evaluation scores."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, class_input_ids=None, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs["labels"]
        logits = classifier_logits(model, inputs["pixel_values"], self.pixel_mean, self.pixel_std)
        loss = training_loss(self.loss_name, LossInputs(None, None, labels, None, self.loss_context, logits=logits))
        return (loss, logits) if return_outputs else loss

    def create_optimizer(self, model=None):
        return Trainer.create_optimizer(self, model)  # no logit scale to clamp

    def evaluation_loop(self, *args, **kwargs):
        return Trainer.evaluation_loop(self, *args, **kwargs)  # no class text embeddings to compute first

    def cosine_scale(self) -> None:
        return None  # a head of its own: no cosines to class prompts

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """No loss; the logits are the network's own."""
        inputs = self._prepare_inputs(inputs)
        with torch.inference_mode(), self.accelerator.autocast():
            logits = classifier_logits(model, inputs["pixel_values"], self.pixel_mean, self.pixel_std)
        return None, logits, inputs["labels"]


def load_classifier_model(cfg: TrainConfig, taxonomy: Taxonomy) -> SupervisedModel:
    """``model.base`` as a classifier of ``taxonomy``'s classes (pretrained or from scratch), its head and any
    random initialisation following the run's seed."""
    set_seed(cfg.training.seed)
    return build_classifier(cfg.model.base, taxonomy.classes, cfg.model.pretrained)


def build_classifier_trainer(
    cfg: TrainConfig, built: SupervisedModel, taxonomy: Taxonomy, splits, checkpoints: Path
) -> tuple[ClassifierTrainer, dict]:
    """The model (LoRA-wrapped for ``model.finetune: lora``), its trainer and evaluator, and its classes.json record."""
    model = built.model
    if cfg.model.finetune == "lora":
        set_seed(cfg.training.seed)  # LoRA initialisation follows the run's seed
        lora = cfg.lora
        try:
            model = add_classifier_lora(
                model,
                lora.r,
                lora.alpha,
                lora.dropout,
                None if lora.target_modules == ["auto"] else lora.target_modules,
            )
        except ValueError as err:  # peft: no layer of that name
            raise ConfigError(
                f"lora.target_modules {lora.target_modules}: {err}; [auto] puts LoRA on every "
                "linear and convolution layer of the backbone"
            ) from None
    trainer = ClassifierTrainer(
        model=model,
        args=trainer_arguments(cfg.training, checkpoints),
        train_dataset=train_images(splits["train"], built.preprocess),  # uint8, normalised on the device
        eval_dataset=splits["validation"],
        data_collator=collate,
        loss_name=cfg.loss.name,
        loss_context=loss_context(taxonomy, cfg.loss, train_class_counts(splits["train"], len(taxonomy))),
        train_weights=train_draw_weights(cfg.data.sampler, splits["train"]["label"]),
        evaluator=ClassifierEvaluator(built.preprocess, taxonomy),
        pixel_stats=pixel_stats(built.preprocess),
        run_config=cfg.to_dict(),
    )
    return trainer, supervised_record(taxonomy, built, cfg.model.finetune)
