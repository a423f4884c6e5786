"""Contrastive losses for fine-tuning on labelled species (inputs: L2-normalised embeddings).

A batch holds many images of the same species, so vanilla CLIP InfoNCE (targets = arange) punishes
pairs that are in fact positives. ``class_text`` (default) scores each image against the text
embeddings of *all* classes and applies cross-entropy on the label: exact under DDP without gathering,
and the same head zero-shot evaluation uses. ``clip`` is vanilla symmetric InfoNCE, for parity with
earlier work; ``multi_positive`` treats every same-label pair as a positive. Under DDP the trainer
gives these two the whole global batch (:func:`mushroomclip.training.collectives.gather_batch`), so their value
and gradients do not depend on the number of GPUs.

``LOSSES`` maps each ``loss.name`` to a function of one :class:`LossInputs`; a new loss is one more entry
(a loss on class logits, e.g. a hierarchical one, reads :meth:`LossInputs.class_logits` and ``context``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F


@dataclass
class LossInputs:
    """What a loss is given: L2-normalised embeddings, the labels, the logit scale and the run's context."""

    image: torch.Tensor  # (B, D)
    text: torch.Tensor  # (C, D) every class prompt; (B, D) each image's own prompt for PAIRED_LOSSES
    labels: torch.Tensor  # (B,) class ids
    logit_scale: torch.Tensor  # exp(logit_scale), a scalar
    context: dict[str, Any] = field(default_factory=dict)  # what a loss needs beyond the batch, e.g. "taxonomy"

    def class_logits(self) -> torch.Tensor:
        """``(B, C)`` scaled cosine similarities of every image with every class prompt."""
        return self.logit_scale * self.image @ self.text.T


def class_text_loss(
    image_emb: torch.Tensor, class_emb: torch.Tensor, labels: torch.Tensor, logit_scale: torch.Tensor
) -> torch.Tensor:
    """Cross-entropy of ``scale * image @ class_text.T`` (B x C) against the class ids."""
    return F.cross_entropy(logit_scale * image_emb @ class_emb.T, labels)


def clip_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE with the i-th text as the only positive of the i-th image."""
    logits = logit_scale * image_emb @ text_emb.T
    targets = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2


def multi_positive_loss(
    image_emb: torch.Tensor, text_emb: torch.Tensor, labels: torch.Tensor, logit_scale: torch.Tensor
) -> torch.Tensor:
    """Symmetric InfoNCE whose target distribution is uniform over all same-label pairs."""
    logits = logit_scale * image_emb @ text_emb.T
    positives = (labels[:, None] == labels[None, :]).float()
    targets = positives / positives.sum(dim=1, keepdim=True)
    image_to_text = -(targets * F.log_softmax(logits, dim=1)).sum(1).mean()
    text_to_image = -(targets * F.log_softmax(logits.T, dim=1)).sum(1).mean()  # positives is symmetric
    return (image_to_text + text_to_image) / 2


LOSSES: dict[str, Callable[[LossInputs], torch.Tensor]] = {
    "class_text": lambda x: class_text_loss(x.image, x.text, x.labels, x.logit_scale),
    "clip": lambda x: clip_loss(x.image, x.text, x.logit_scale),
    "multi_positive": lambda x: multi_positive_loss(x.image, x.text, x.labels, x.logit_scale),
}
# Losses of images against per-image texts (each image's own class prompt): the trainer encodes those and
# gathers the whole global batch on every rank; every other loss gets the (C, D) embeddings of all classes.
PAIRED_LOSSES = frozenset({"clip", "multi_positive"})
