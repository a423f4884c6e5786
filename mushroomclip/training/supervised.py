"""Supervised image classifiers under the LoRA runs' Trainer: the loss on the network's own class logits,
evaluation on those logits, checkpoints of the full model (or of the adapter with its head).

Everything else (seeded draws and augmentation, NaN stop, precision, checkpoint/resume, the run folder)
is :class:`~mushroomclip.training.trainer.ContrastiveTrainer`'s: only what differs is overridden here.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from transformers import Trainer

from mushroomclip.data.transforms import normalize
from mushroomclip.metrics import classification_metrics
from mushroomclip.training.trainer import ContrastiveTrainer, LabelledPixels


class ClassifierEvaluator:
    """The images a classifier scores (its evaluation preprocessing) and their metrics."""

    def __init__(self, preprocess, taxonomy):
        self.preprocess, self.taxonomy = preprocess, taxonomy

    def images(self, split) -> LabelledPixels:
        """A ``datasets`` split through the model's evaluation preprocessing (uint8, normalised on the device)."""
        from mushroomclip.evaluation.features import PreprocessedImages

        return LabelledPixels(PreprocessedImages(split, self.preprocess))

    def metrics(self, labels: np.ndarray, scores: np.ndarray) -> dict:
        return classification_metrics(labels, scores, len(self.taxonomy), taxonomy=self.taxonomy)


def classifier_logits(model, pixels: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """``(B, C)`` fp32 logits of a batch (uint8 pixels normalised on the device with the model's mean/std)."""
    return model(pixel_values=normalize(pixels, mean, std)).logits.float()


class ClassifierTrainer(ContrastiveTrainer):
    """:class:`ContrastiveTrainer` for an ``AutoModelForImageClassification`` (or its peft model): cross-entropy
    on the logits, and the logits as evaluation scores."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, class_input_ids=None, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        logits = classifier_logits(model, inputs["pixel_values"], self.pixel_mean, self.pixel_std)
        loss = F.cross_entropy(logits, inputs["labels"])
        return (loss, logits) if return_outputs else loss

    def create_optimizer(self, model=None):
        return Trainer.create_optimizer(self, model)  # no logit scale to clamp

    def evaluation_loop(self, *args, **kwargs):
        return Trainer.evaluation_loop(self, *args, **kwargs)  # no class text embeddings to compute first

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """No loss; the logits are the network's own."""
        inputs = self._prepare_inputs(inputs)
        with torch.inference_mode(), self.accelerator.autocast():
            logits = classifier_logits(model, inputs["pixel_values"], self.pixel_mean, self.pixel_std)
        return None, logits, inputs["labels"]
