"""Selective prediction: the confidence threshold, chosen on validation, below which no species is named.

The dangerous->edible rate is the one :mod:`mushroomclip.metrics` reports as ``dangerous_as_edible``: among the
images whose truth is deadly or poisonous, the share that receives a species answer naming an edible species.
A species answer is given when the top-1 probability reaches the threshold (``>=``, as
:func:`mushroomclip.prediction.answer.answer` compares); below it the image is abstained on ("not sure — do not
eat", or a genus or family back-off that lists its dangerous members), which never names an edible species. The
denominator is every dangerous image, answered or not, so with no abstention the rate equals
``dangerous_as_edible``. The error rate is the selective risk: wrong species among the answered images.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy import stats

from mushroomclip.prediction.answer import BACK_OFF, Thresholds
from mushroomclip.taxonomy import Taxonomy

#: The levels an answer names, in order (:func:`mushroomclip.prediction.answer.answer`); below all, it abstains.
LEVELS = ("species", *BACK_OFF)


@dataclass(frozen=True)
class RiskCoverage:
    """One point per distinct top-1 probability ``t`` (descending): what answering every image with
    confidence >= ``t`` gives. ``coverage`` grows along the arrays; ``danger`` never falls as it grows."""

    threshold: np.ndarray
    coverage: np.ndarray  # share of all images answered
    error: np.ndarray  # wrong species among the answered
    danger: np.ndarray  # dangerous->edible rate (see the module docstring)
    images: int
    dangerous_images: int


@dataclass(frozen=True)
class SelectiveThreshold:
    """The lowest threshold (largest coverage) whose validation dangerous->edible rate is at most ``max_danger``,
    never below ``floor`` (the default species threshold: a target must not make answers bolder than they are
    without one)."""

    threshold: float
    max_danger: float
    coverage: float
    danger: float
    error: float | None  # None when nothing is answered
    images: int
    dangerous_images: int
    floor: float = Thresholds.species
    allowed: float | None = None  # what the target alone allowed, where the floor is higher

    @property
    def met(self) -> bool:
        """Whether the target holds on validation (it cannot when even full abstention needs a threshold > 1)."""
        return self.danger <= self.max_danger

    @property
    def _set_by(self) -> str:
        """What set the threshold, for the summary: the floor, the target, or (not met) just the threshold."""
        return "floor" if self.allowed is not None else "target" if self.met else "threshold"

    @property
    def danger_upper95(self) -> float:
        """The one-sided 95% upper bound (Clopper-Pearson) of the dangerous->edible rate, from the validation
        split's dangerous images: with few of them a zero count cannot show a small target."""
        n = self.dangerous_images
        k = round(self.danger * n)
        return 1.0 if k >= n else float(stats.beta.ppf(0.95, k + 1, n - k))

    @property
    def verified(self) -> bool:
        """Whether validation shows the target: its 95% upper bound is at most ``max_danger``."""
        return self.danger_upper95 <= self.max_danger

    def summary(self) -> str:
        """One report line: "coverage at the target", what it costs, and what validation can show."""
        error = "n/a" if self.error is None else f"{100 * self.error:.1f}%"
        floor = (
            f" (the target alone allowed {self.allowed:.4f}; a species is never named below the default {self.floor:g})"
            if self.allowed is not None
            else ""
        )
        if not self.met:
            verdict = " — target NOT met: even answering nothing below 1.0 exceeds it"
        elif not self.verified and self.max_danger == 0:
            verdict = " — a target of 0 can never be shown by a sample; ask for a small positive rate such as 0.001"
        elif not self.verified:
            verdict = (
                f" — NOT shown by validation: with {self.dangerous_images} dangerous images the rate's 95% upper "
                f"bound is {100 * self.danger_upper95:.1f}%; more deadly and poisonous validation photos are needed"
            )
        else:
            verdict = f" (95% upper bound {100 * self.danger_upper95:.2f}%)"
        return (
            f"selective prediction: threshold {self.threshold:.4f}{floor} answers {100 * self.coverage:.1f}% of "
            f"{self.images} images (coverage at the {self._set_by}) with dangerous->edible {100 * self.danger:.2f}% of "
            f"{self.dangerous_images} dangerous images (target {100 * self.max_danger:g}%) and {error} wrong "
            f"species among the answered{verdict}"
        )

    def record(self, genus: float = Thresholds.genus, family: float = Thresholds.family) -> dict:
        """The run's ``metrics.json["thresholds"]`` (with the back-off thresholds ``genus`` and ``family``): read back
        by :func:`mushroomclip.prediction.answer.run_thresholds`."""
        return {
            "species": self.threshold,
            "genus": genus,
            "family": family,
            "chosen_on": "validation",
            "max_danger": self.max_danger,
            "floor": self.floor,
            "allowed_by_target": self.allowed,
            "coverage": self.coverage,
            "dangerous_as_edible": self.danger,
            "dangerous_as_edible_upper95": self.danger_upper95,
            "target_shown": self.verified,
            "error": self.error,
            "images": self.images,
            "dangerous_images": self.dangerous_images,
        }


def risk_coverage(probs: np.ndarray, labels: np.ndarray, taxonomy: Taxonomy) -> RiskCoverage:
    """The risk-coverage curve of thresholding the top-1 probability of ``probs`` ``(N, C)`` against ``labels``."""
    probs, labels = np.asarray(probs, dtype=np.float64), np.asarray(labels)
    if probs.ndim != 2 or probs.shape != (len(labels), len(taxonomy)) or len(labels) == 0:
        raise ValueError(
            f"probabilities must have shape (N, {len(taxonomy)}) with one row per label, got {probs.shape} "
            f"for {len(labels)} labels"
        )
    predicted = probs.argmax(axis=1)
    return risk_coverage_top1(probs[np.arange(len(labels)), predicted], predicted, labels, taxonomy)


def risk_coverage_top1(confidence: np.ndarray, predicted: np.ndarray, labels: np.ndarray, taxonomy: Taxonomy):
    """:func:`risk_coverage` from each image's top-1 probability and class (e.g. a predictions.parquet)."""
    confidence, predicted, labels = map(np.asarray, (confidence, predicted, labels))
    dangerous = taxonomy.dangerous_mask[labels]
    if not dangerous.any():
        raise ValueError(
            "the validation split has no deadly or poisonous images, so a dangerous->edible rate cannot be "
            "measured; choose the threshold on a split that has some"
        )
    order = np.argsort(-confidence, kind="stable")
    sorted_conf = confidence[order]
    # the last image of each run of equal confidences: a threshold answers all of them or none
    ends = np.flatnonzero(np.r_[sorted_conf[1:] != sorted_conf[:-1], True])
    answered = ends + 1
    wrong = np.cumsum(predicted[order] != labels[order])[ends]
    to_edible = np.cumsum(dangerous[order] & taxonomy.edible_mask[predicted[order]])[ends]
    return RiskCoverage(
        threshold=sorted_conf[ends],
        coverage=answered / len(labels),
        error=wrong / answered,
        danger=to_edible / dangerous.sum(),
        images=len(labels),
        dangerous_images=int(dangerous.sum()),
    )


def choose_threshold(curve: RiskCoverage, max_danger: float, floor: float = Thresholds.species) -> SelectiveThreshold:
    """The threshold of largest coverage whose dangerous->edible rate is at most ``max_danger`` (e.g. 0.001), and
    ``floor`` wherever the target alone would allow a lower one: by default the default species threshold, so a
    target never names a species that the default would not."""
    if not 0.0 <= max_danger < 1.0:
        raise ValueError(f"--max-danger must be in [0, 1), got {max_danger}")
    common = {"max_danger": max_danger, "images": curve.images, "dangerous_images": curve.dangerous_images}
    feasible = np.flatnonzero(curve.danger <= max_danger)  # a prefix: danger never falls as coverage grows
    if len(feasible):
        i = feasible[-1]
        allowed, rates = float(curve.threshold[i]), (curve.coverage[i], curve.danger[i], curve.error[i])
    else:  # even the most confident images reach the target only by answering none: a threshold just above them
        allowed, rates = float(np.nextafter(curve.threshold[0], np.inf)), (0.0, 0.0, None)
        if allowed > 1.0:  # no such threshold: the target is reported as not met
            allowed, rates = 1.0, (curve.coverage[0], curve.danger[0], curve.error[0])
    if allowed >= floor:
        coverage, danger, error = rates
        return SelectiveThreshold(
            allowed,
            coverage=float(coverage),
            danger=float(danger),
            **common,
            floor=floor,
            error=None if error is None else float(error),
        )
    # the floor answers the curve's points at or above it: a prefix of the feasible ones
    at_floor = np.flatnonzero(curve.threshold >= floor)
    rates = {"coverage": 0.0, "danger": 0.0, "error": None}
    if len(at_floor):
        j = at_floor[-1]
        rates = {"coverage": float(curve.coverage[j]), "danger": float(curve.danger[j]), "error": float(curve.error[j])}
    return SelectiveThreshold(float(floor), **rates, **common, floor=floor, allowed=allowed)


def probabilities(scores) -> np.ndarray:
    """Class probabilities (float64 softmax) of logits or scaled cosine scores."""
    return torch.softmax(torch.as_tensor(scores, dtype=torch.float64), dim=1).numpy()


def choose_on_validation(scores, labels: np.ndarray, taxonomy: Taxonomy, max_danger: float):
    """``(risk-coverage curve, chosen threshold)`` of a validation split's scores for a dangerous->edible target
    (:func:`choose_threshold`); a ValueError when the split has no deadly or poisonous image."""
    curve = risk_coverage(probabilities(scores), labels, taxonomy)
    return curve, choose_threshold(curve, max_danger)


def answer_outcomes(probs: np.ndarray, labels: np.ndarray, taxonomy: Taxonomy, thresholds: Thresholds) -> dict:
    """What :func:`mushroomclip.prediction.answer.answer` tells a person about each image of a labelled split,
    counted without a loop: the share of images answered at each level (species, genus back-off, family
    back-off; the rest abstain: "not sure" or "possibly not one of the known species"), how often that answer
    holds (the true species, or a taxon that contains it), and the dangerous->edible rate of the answers (only a
    species answer can name an edible species; over every deadly or poisonous image)."""
    probs, labels = np.asarray(probs, dtype=np.float64), np.asarray(labels)
    if probs.ndim != 2 or probs.shape != (len(labels), len(taxonomy)) or len(labels) == 0:
        raise ValueError(f"probabilities must have shape (N, {len(taxonomy)}) for N > 0 labels, got {probs.shape}")
    rows = np.arange(len(labels))
    top = probs.argmax(axis=1)  # the first of equal maxima, as answer()'s stable ranking
    top_p = probs[rows, top]
    maybe_unknown = top_p < thresholds.unknown if thresholds.unknown is not None else np.zeros(len(labels), bool)
    named = {"species": (top_p >= thresholds.species) & ~maybe_unknown}
    right = {"species": top == labels}
    undecided = ~named["species"]
    for rank in BACK_OFF:
        # taxa by name, sorted, as prediction.answer.rank_probabilities sums them
        _, taxon = np.unique([getattr(s, rank) for s in taxonomy.species], return_inverse=True)
        sums = probs @ np.eye(taxon.max() + 1)[taxon]  # (N, taxa): each taxon's summed probability
        best = sums.argmax(axis=1)
        named[rank] = undecided & (sums[rows, best] >= getattr(thresholds, rank))
        right[rank] = best == taxon[labels]
        undecided &= ~named[rank]
    dangerous = taxonomy.dangerous_mask[labels]
    to_edible = dangerous & named["species"] & taxonomy.edible_mask[top]
    out = {
        "thresholds": {
            "species": thresholds.species,
            "genus": thresholds.genus,
            "family": thresholds.family,
            "unknown": thresholds.unknown,
            "source": thresholds.source,
        },
        "images": int(len(labels)),
        "dangerous_images": int(dangerous.sum()),
    }
    for level in LEVELS:
        mask = named[level]
        out[level] = {
            "share": float(mask.mean()),
            "right": float(right[level][mask].mean()) if mask.any() else None,
        }
    out["abstained"] = float(undecided.mean())
    out["right"] = float(sum((named[level] & right[level]).sum() for level in LEVELS) / len(labels))
    out["dangerous_as_edible"] = float(to_edible.sum() / dangerous.sum()) if dangerous.any() else None
    return out
