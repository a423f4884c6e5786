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

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from mushroomclip.taxonomy import Taxonomy


@dataclass
class LossInputs:
    """What a loss is given: L2-normalised embeddings, the labels, the logit scale and the run's context; for a
    supervised classifier, its class logits instead of embeddings."""

    image: torch.Tensor | None  # (B, D)
    text: torch.Tensor | None  # (C, D) every class prompt; (B, D) each image's own prompt for PAIRED_LOSSES
    labels: torch.Tensor  # (B,) class ids
    logit_scale: torch.Tensor | None  # exp(logit_scale), a scalar
    context: dict[str, Any] = field(default_factory=dict)  # what a loss needs beyond the batch, e.g. "taxonomy"
    logits: torch.Tensor | None = None  # (B, C) a supervised classifier's own class logits

    def class_logits(self) -> torch.Tensor:
        """``(B, C)`` class logits: a classifier's own, or the scaled cosine similarities of every image with every
        class prompt."""
        return self.logits if self.logits is not None else self.logit_scale * self.image @ self.text.T


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


# Taxonomy- and safety-aware terms on class logits ``(B, C)`` (supervised heads, or CLIP's image-vs-all-class-prompt
# logits): Bertinetto et al. 2020, "Making Better Mistakes" (arXiv 1912.09393), and a cost-sensitive danger term.


def _log_softmax(logits: torch.Tensor) -> torch.Tensor:
    """Log-probabilities over the classes in at least float32 (bf16 logits would round the subtree sums)."""
    return logits.log_softmax(dim=1, dtype=torch.promote_types(logits.dtype, torch.float32))


@dataclass(frozen=True)
class HierarchyTensors:
    """The taxonomy as the tensors these losses take; build once per run with :func:`hierarchy_tensors`."""

    lca_distance: torch.Tensor  # (C, C) float: height of the lowest common ancestor, 0 for the same species
    lineage: torch.Tensor  # (C, R) long: each class's node id at every rank, kingdom first
    dangerous: torch.Tensor  # (C,) bool: deadly or poisonous
    edible: torch.Tensor  # (C,) bool

    def to(self, device: torch.device | str) -> HierarchyTensors:
        return HierarchyTensors(
            self.lca_distance.to(device), self.lineage.to(device), self.dangerous.to(device), self.edible.to(device)
        )


def hierarchy_tensors(taxonomy: Taxonomy, device: torch.device | str | None = None) -> HierarchyTensors:
    """:class:`HierarchyTensors` of ``taxonomy``'s classes (class id = row of the table), on ``device``."""

    def tensor(array: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
        return torch.as_tensor(np.ascontiguousarray(array), dtype=dtype, device=device)

    return HierarchyTensors(
        lca_distance=tensor(taxonomy.lca_distance_matrix, torch.float32),
        lineage=tensor(taxonomy.lineage_codes, torch.long),
        dangerous=tensor(taxonomy.dangerous_mask, torch.bool),
        edible=tensor(taxonomy.edible_mask, torch.bool),
    )


def hierarchical_soft_loss(
    logits: torch.Tensor, labels: torch.Tensor, lca_distance: torch.Tensor, beta: float
) -> torch.Tensor:
    """Cross-entropy against soft labels whose mass on class j is proportional to exp(-beta * d(y, j)).

    d is the LCA height divided by its largest value (as the authors' code does, so ``beta`` reads as in the
    paper's tables, 4 to 30); a large ``beta`` gives back plain cross-entropy.
    """
    distance = lca_distance[labels] / lca_distance.max().clamp(min=1)
    targets = torch.softmax(-beta * distance, dim=1)
    return -(targets * _log_softmax(logits)).sum(dim=1).mean()


def hierarchical_xent_loss(
    logits: torch.Tensor, labels: torch.Tensor, lineage: torch.Tensor, alpha: float
) -> torch.Tensor:
    """HXE: -sum over the label's lineage of w(C) * log p(C | parent of C), with a flat softmax over the leaves.

    p(C | parent) is the summed probability of the leaves under C over that under its parent (the root's is 1).
    w(C) = exp(-alpha * depth(C)), depth counting edges from the root (kingdom 1 ... species ``R``): the
    authors' released code, which weights the coarse levels most as the paper describes ("discounting
    information down the hierarchy"); the paper's formula writes it exp(-alpha * h(C)) with the leaf as C^(0).
    Unlike that code the weights are not divided by their sum over the whole tree (a constant factor), so
    ``alpha = 0`` is exactly cross-entropy.
    """
    log_p = _log_softmax(logits)  # (B, C)
    under = lineage[labels].unsqueeze(2) == lineage.T.unsqueeze(0)  # (B, R, C): leaves under the label's node
    log_node = torch.logsumexp(log_p.unsqueeze(1).masked_fill(~under, float("-inf")), dim=2)  # (B, R)
    log_parent = F.pad(log_node[:, :-1], (1, 0))  # the root holds all the mass: log 1 = 0
    depth = torch.arange(1, lineage.shape[1] + 1, device=logits.device, dtype=log_p.dtype)
    return -((log_node - log_parent) * torch.exp(-alpha * depth)).sum(dim=1).mean()


def danger_penalty(
    logits: torch.Tensor, labels: torch.Tensor, dangerous: torch.Tensor, edible: torch.Tensor
) -> torch.Tensor:
    """Mean over the batch of the softmax mass on edible species for images whose truth is deadly or poisonous
    (0 for every other image): (1/B) * sum_i [y_i dangerous] * sum_{j edible} p_ij. Scaled by ``loss.danger_weight``
    and added to the main loss, it pushes a dangerous species' images away from every edible answer."""
    probs = _log_softmax(logits).exp()
    return (probs @ edible.to(probs.dtype) * dangerous[labels]).mean()


def _hierarchy(x: LossInputs) -> HierarchyTensors:
    """The run's :class:`HierarchyTensors` (``context["hierarchy"]``), moved once to the batch's device."""
    tensors = x.context["hierarchy"]
    if tensors.lca_distance.device != x.labels.device:  # labels: a classifier's batch has no image embeddings
        tensors = x.context["hierarchy"] = tensors.to(x.labels.device)
    return tensors


LOSSES: dict[str, Callable[[LossInputs], torch.Tensor]] = {
    # class_text_loss, written on class_logits() so that training_loss can hand it logit-adjusted logits
    "class_text": lambda x: F.cross_entropy(x.class_logits(), x.labels),
    "clip": lambda x: clip_loss(x.image, x.text, x.logit_scale),
    "multi_positive": lambda x: multi_positive_loss(x.image, x.text, x.labels, x.logit_scale),
    "hierarchical_soft": lambda x: hierarchical_soft_loss(
        x.class_logits(), x.labels, _hierarchy(x).lca_distance, x.context["beta"]
    ),
    "hierarchical_xent": lambda x: hierarchical_xent_loss(
        x.class_logits(), x.labels, _hierarchy(x).lineage, x.context["alpha"]
    ),
    # a supervised classifier's own logits (on CLIP's class-prompt logits the same loss is class_text)
    "cross_entropy": lambda x: F.cross_entropy(x.class_logits(), x.labels),
}
# Losses of images against per-image texts (each image's own class prompt): the trainer encodes those and
# gathers the whole global batch on every rank; every other loss gets the (C, D) embeddings of all classes.
PAIRED_LOSSES = frozenset({"clip", "multi_positive"})
# Which losses each kind of model can train with (model.type): CLIP's read its embeddings, a classifier has logits.
CLIP_ONLY, SUPERVISED_ONLY = PAIRED_LOSSES | {"class_text"}, frozenset({"cross_entropy"})


def logit_adjustment(train_counts, tau: float) -> torch.Tensor:
    """``(C,)`` ``tau * log(prior)`` of Menon et al. 2021 ("Long-tail learning via logit adjustment", eq. 11), the
    prior being the training split's class frequencies; a class without training images counts as one image, so
    that its term stays finite (the constant it adds to every class's log-prior cancels in the softmax)."""
    counts = np.maximum(np.asarray(train_counts, dtype=np.float64), 1.0)
    return torch.as_tensor(tau * np.log(counts / counts.sum()), dtype=torch.float32)


def training_loss(name: str, x: LossInputs) -> torch.Tensor:
    """``LOSSES[name]``, on the logit-adjusted class logits when ``context["logit_adjustment"]`` is set (logits +
    tau * log prior: Menon et al.'s loss; predictions keep the plain logits), plus ``context["danger_weight"]`` times
    :func:`danger_penalty` (of the plain logits) when that weight is set."""
    adjustment = x.context.get("logit_adjustment")
    main = x
    if adjustment is not None:
        if name in PAIRED_LOSSES:
            raise ValueError(f"loss.logit_adjust needs the scores of every class, which {name} does not compute")
        if adjustment.device != x.labels.device:
            adjustment = x.context["logit_adjustment"] = adjustment.to(x.labels.device)
        logits = x.class_logits()
        x = dataclasses.replace(x, logits=logits)  # computed once, also for the danger term
        main = dataclasses.replace(x, logits=logits + adjustment.to(logits.dtype))
    loss = LOSSES[name](main)
    if weight := x.context.get("danger_weight", 0.0):
        tensors = _hierarchy(x)
        loss = loss + weight * danger_penalty(x.class_logits(), x.labels, tensors.dangerous, tensors.edible)
    return loss


def loss_context(taxonomy: Taxonomy, loss, train_counts=None) -> dict:
    """``LossInputs.context`` of a run: its taxonomy, as tensors too, and the loss's hyper-parameters
    (``loss``: the config's :class:`~mushroomclip.config.LossArguments`); ``train_counts``, the training split's
    images per class, for ``loss.logit_adjust``."""
    tau = getattr(loss, "logit_adjust", 0.0)
    if tau and train_counts is None:
        raise ValueError("loss.logit_adjust needs the training split's class counts")
    return {
        "taxonomy": taxonomy,
        "hierarchy": hierarchy_tensors(taxonomy),
        "beta": loss.beta,
        "alpha": loss.alpha,
        "danger_weight": loss.danger_weight,
        "logit_adjustment": logit_adjustment(train_counts, tau) if tau else None,
    }
