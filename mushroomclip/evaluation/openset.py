"""Open-set recognition: telling images of the known species from images of species the model never saw.

Every score is a "known-ness": higher means more likely one of the known species, and an image is accepted as
known when its score reaches a threshold. From ``(N, K)`` logits over the K known classes:

- ``msp``: the maximum softmax probability (Hendrycks & Gimpel 2017);
- ``max_logit``: the largest logit (Vaze et al. 2022, "a good closed-set classifier is all you need");
- ``energy``: ``logsumexp`` of the logits, i.e. the negative free energy at temperature 1 (Liu et al. 2020);
- ``max_cosine``: the largest cosine between the image and the known class prompts (CLIP-style heads: the
  logits divided by the logit scale).

Metrics, with the known images as the positive class: ``auroc`` (``sklearn.metrics.roc_auc_score``), ``fpr95``
(the share of unknown images accepted at the threshold that accepts 95% of the known ones) and ``oscr``, the
open-set classification rate of Dhamija et al. 2018 as used by Neal et al. 2018 and Vaze et al. 2022: the area
under the curve of the correct classification rate (known images accepted *and* classified correctly, over all
known images) against the false positive rate (unknown images accepted, over all unknown images), as the
threshold runs over every score. OSCR is at most the closed-set accuracy, which it reaches for a perfect
separation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.special import logsumexp, softmax
from sklearn.metrics import roc_auc_score

SCORES = ("msp", "max_logit", "energy", "max_cosine")
THRESHOLD_SCORE = "msp"  # what predict.py thresholds: the top-1 probability it already shows
DEFAULT_TPR = 0.95


def known_scores(logits: np.ndarray, logit_scale: float | None = None) -> dict[str, np.ndarray]:
    """Every score of :data:`SCORES` for ``(N, K)`` logits; ``max_cosine`` only with the head's ``logit_scale``
    (the factor that turned cosines into logits)."""
    logits = np.asarray(logits, dtype=np.float64)
    scores = {
        "msp": softmax(logits, axis=1).max(axis=1),
        "max_logit": logits.max(axis=1),
        "energy": logsumexp(logits, axis=1),
    }
    if logit_scale is not None:
        scores["max_cosine"] = scores["max_logit"] / logit_scale
    return scores


def auroc(known: np.ndarray, unknown: np.ndarray) -> float:
    """Area under the ROC curve of telling known (positive) from unknown images by the score."""
    labels = np.r_[np.ones(len(known)), np.zeros(len(unknown))]
    return float(roc_auc_score(labels, np.r_[known, unknown]))


def threshold_at_tpr(known: np.ndarray, tpr: float = DEFAULT_TPR) -> float:
    """The largest threshold that accepts (score >= threshold) at least ``tpr`` of the ``known`` scores."""
    if not 0 < tpr <= 1:
        raise ValueError(f"the true positive rate must be in (0, 1], got {tpr}")
    ordered = np.sort(np.asarray(known, dtype=np.float64))[::-1]
    keep = max(1, int(np.ceil(tpr * len(ordered) - 1e-9)))  # 0.55 * 100 is 55.000000000000007; at least one
    return float(ordered[keep - 1])


def fpr_at_tpr(known: np.ndarray, unknown: np.ndarray, tpr: float = DEFAULT_TPR) -> float:
    """The share of unknown images accepted at :func:`threshold_at_tpr` of the known ones."""
    return float((np.asarray(unknown) >= threshold_at_tpr(known, tpr)).mean())


def oscr(known: np.ndarray, correct: np.ndarray, unknown: np.ndarray) -> float:
    """Open-set classification rate: the area under (FPR, CCR) over every threshold (see the module docstring).

    At a threshold ``t`` (accept score >= t): CCR = known images accepted and classified correctly / known
    images, FPR = unknown images accepted / unknown images. The points run from (0, 0) (nothing accepted) to
    (1, closed-set accuracy) (everything accepted), joined by straight lines as ROC curves are.
    """
    known, unknown = np.asarray(known, dtype=np.float64), np.asarray(unknown, dtype=np.float64)
    values = np.r_[known, unknown]
    order = np.argsort(-values, kind="stable")  # descending: each distinct threshold accepts one more group
    ends = np.flatnonzero(np.r_[values[order][1:] != values[order][:-1], True])  # the last of each group
    correct_known = np.r_[np.asarray(correct, dtype=bool), np.zeros(len(unknown), dtype=bool)][order]
    is_unknown = np.r_[np.zeros(len(known), dtype=bool), np.ones(len(unknown), dtype=bool)][order]
    ccr = np.r_[0.0, np.cumsum(correct_known)[ends] / len(known)]
    fpr = np.r_[0.0, np.cumsum(is_unknown)[ends] / len(unknown)]
    return float(np.sum(np.diff(fpr) * (ccr[1:] + ccr[:-1]) / 2))


@dataclass(frozen=True)
class OpenSetScores:
    """One model's scores on known images (with whether each was classified correctly) and on unknown ones."""

    known: dict[str, np.ndarray]
    correct: np.ndarray
    unknown: dict[str, np.ndarray]

    @classmethod
    def from_logits(
        cls, known_logits: np.ndarray, known_labels: np.ndarray, unknown_logits: np.ndarray, logit_scale=None
    ) -> OpenSetScores:
        correct = np.asarray(known_logits).argmax(axis=1) == np.asarray(known_labels)
        return cls(known_scores(known_logits, logit_scale), correct, known_scores(unknown_logits, logit_scale))


def open_set_metrics(
    scores: OpenSetScores, tpr: float = DEFAULT_TPR, bootstrap: int = 0, seed: int = 0
) -> dict[str, dict]:
    """``{score: {"auroc", "fpr95", "oscr", "ci": {metric: [low, high]}}}``; ``bootstrap`` resamples (0: no
    intervals) draw the known and the unknown images separately, with replacement, seeded by ``seed``."""
    if not len(scores.correct) or not len(next(iter(scores.unknown.values()))):
        raise ValueError("open-set metrics need both known and unknown images")
    out = {}
    for name, known in scores.known.items():
        unknown = scores.unknown[name]
        row = _point(known, scores.correct, unknown, tpr)
        if bootstrap:
            rng = np.random.default_rng(seed)
            draws = []
            for _ in range(bootstrap):
                k = rng.integers(0, len(known), len(known))
                u = rng.integers(0, len(unknown), len(unknown))
                draws.append(_point(known[k], scores.correct[k], unknown[u], tpr))
            row["ci"] = {
                metric: [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))]
                for metric in row
                for values in [[d[metric] for d in draws]]
            }
        out[name] = row
    return out


def _point(known, correct, unknown, tpr) -> dict[str, float]:
    return {
        "auroc": auroc(known, unknown),
        "fpr95": fpr_at_tpr(known, unknown, tpr),
        "oscr": oscr(known, correct, unknown),
    }


def unknown_threshold(validation_msp: np.ndarray, tpr: float = DEFAULT_TPR) -> dict:
    """The record predict.py reads (``metrics.json["thresholds"]["unknown"]``): the top-1 probability below which
    an answer says "possibly not one of the known species", chosen on the known validation images so that
    ``tpr`` of them are above it."""
    return {
        "score": THRESHOLD_SCORE,
        "threshold": threshold_at_tpr(validation_msp, tpr),
        "tpr": tpr,
        "chosen_on": "validation",
        "images": int(len(validation_msp)),
    }


def summary_line(metrics: dict[str, dict], unknown_images: int, known_images: int) -> str:
    """One report line: each score's AUROC / FPR95 / OSCR (with intervals where bootstrapped)."""

    def fmt(row, key):
        ci = row.get("ci", {}).get(key)
        return f"{100 * row[key]:.1f}" + (f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]" if ci else "")

    parts = [
        f"{name}: AUROC {fmt(row, 'auroc')}, FPR95 {fmt(row, 'fpr95')}, OSCR {fmt(row, 'oscr')}"
        for name, row in metrics.items()
    ]
    return f"open set ({known_images} known vs {unknown_images} unknown images): " + "; ".join(parts)
