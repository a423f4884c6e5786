"""Classification metrics, all derived from one confusion matrix.

Conventions (they match scikit-learn's defaults, ``labels=None``):
- Macro means (mF1, mIoU, macro precision/recall) average over the classes *present*, those that
  occur in the truth or in the predictions. A class absent from both has no defined F1/IoU and is
  left out, so evaluating a 6-class subset against a 169-class head is not diluted by 163 zeros.
  A class that is only predicted (never true) is present and scores 0.
- Balanced accuracy averages recall over classes that occur in the truth.
- All values are fractions in [0, 1]; ``None`` where undefined (e.g. no deadly images).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from mushroomclip.taxonomy import DANGEROUS, HIGHER_RANKS, RANKS, Taxonomy

HEADLINE = ("oa", "top5", "mf1", "miou")
#: k of Bertinetto et al.'s "average hierarchical distance of top-k" (capped at the number of classes).
DISTANCE_TOP_K = (1, 5, 20)


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """``(C, C)`` counts; rows are the truth, columns the prediction."""
    flat = np.asarray(y_true, dtype=np.int64) * num_classes + np.asarray(y_pred, dtype=np.int64)
    return np.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den with 0 where den == 0 (scikit-learn's zero_division=0)."""
    out = np.zeros(np.shape(num), dtype=np.float64)
    np.divide(num, den, out=out, where=np.asarray(den) > 0)
    return out


def _per_class(cm: np.ndarray) -> dict[str, np.ndarray]:
    tp = np.diag(cm).astype(np.float64)
    support = cm.sum(axis=1)
    predicted = cm.sum(axis=0)
    return {
        "precision": _ratio(tp, predicted),
        "recall": _ratio(tp, support),
        "f1": _ratio(2 * tp, support + predicted),
        "iou": _ratio(tp, support + predicted - tp),
        "support": support,
        "present": (support + predicted) > 0,
    }


def _headline_from_confusion(cm: np.ndarray) -> dict[str, float]:
    pc = _per_class(cm)
    present, in_truth = pc["present"], pc["support"] > 0
    return {
        "oa": float(np.trace(cm) / max(cm.sum(), 1)),
        "balanced_acc": float(pc["recall"][in_truth].mean()) if in_truth.any() else 0.0,
        "mf1": float(pc["f1"][present].mean()) if present.any() else 0.0,
        "miou": float(pc["iou"][present].mean()) if present.any() else 0.0,
        "macro_precision": float(pc["precision"][present].mean()) if present.any() else 0.0,
        "macro_recall": float(pc["recall"][present].mean()) if present.any() else 0.0,
    }


def top_k_accuracy(y_true: np.ndarray, scores: np.ndarray, k: int = 5) -> float:
    """Share of rows whose true class is among the ``k`` highest scores (all of them if k >= C)."""
    k = min(k, scores.shape[1])
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    return float((top == np.asarray(y_true)[:, None]).any(axis=1).mean())


def hierarchical_distance_top_k(
    y_true: np.ndarray, scores: np.ndarray, lca_distance: np.ndarray, ks: tuple[int, ...] = DISTANCE_TOP_K
) -> dict[str, float]:
    """Bertinetto et al. 2020's "average hierarchical distance of top-k": per image, the mean LCA height between
    the truth and each of the k highest-scored classes, averaged over images; k capped at C. Equal scores rank the
    lower id first, except that a tie across the largest k's boundary keeps an arbitrary one of the tied classes."""
    ks = sorted({min(k, scores.shape[1]) for k in ks})
    top = np.argpartition(-scores, ks[-1] - 1, axis=1)[:, : ks[-1]]  # the k_max best, unordered: no full sort
    ranked = np.take_along_axis(top, np.lexsort((top, -np.take_along_axis(scores, top, axis=1)), axis=-1), axis=1)
    distance = lca_distance[np.asarray(y_true)[:, None], ranked]  # (N, k_max)
    return {f"top{k}": float(distance[:, :k].mean()) for k in ks}


def _validate(y_true, scores_or_pred, num_classes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    y_true = np.asarray(y_true)
    values = np.asarray(scores_or_pred)
    if y_true.ndim != 1 or len(y_true) == 0:
        raise ValueError(f"y_true must be a non-empty 1-D array of class ids, got shape {y_true.shape}")
    if values.ndim == 2:
        if values.shape != (len(y_true), num_classes):
            raise ValueError(
                f"scores must have shape (N, num_classes) = ({len(y_true)}, {num_classes}), got {values.shape}"
            )
        scores, y_pred = values, values.argmax(axis=1)
    elif values.ndim == 1 and len(values) == len(y_true):
        scores, y_pred = None, values
    else:
        raise ValueError(f"expected {len(y_true)} predictions or an (N, C) score matrix, got shape {values.shape}")
    for name, ids in (("y_true", y_true), ("predictions", y_pred)):
        if not np.issubdtype(ids.dtype, np.integer) or ids.min() < 0 or ids.max() >= num_classes:
            raise ValueError(
                f"{name} must be integer class ids in [0, {num_classes}), got {ids.dtype} in [{ids.min()}, {ids.max()}]"
            )
    return y_true.astype(np.int64), y_pred.astype(np.int64), scores


def _taxonomy_metrics(y_true: np.ndarray, y_pred: np.ndarray, taxonomy: Taxonomy) -> dict:
    codes = taxonomy.rank_codes
    rank_acc = {
        rank: float((codes[RANKS.index(rank)][y_true] == codes[RANKS.index(rank)][y_pred]).mean())
        for rank in HIGHER_RANKS
    }
    wrong = y_true != y_pred
    depth = taxonomy.lca_depth_matrix[y_true[wrong], y_pred[wrong]]
    true_edibility = taxonomy.edibility_of(y_true)
    pred_edibility = taxonomy.edibility_of(y_pred)
    dangerous = np.isin(true_edibility, DANGEROUS)
    deadly = true_edibility == "deadly"
    return {
        "rank_accuracy": rank_acc,
        # LCA depth counts shared ranks (7 = same species); severity counts the ranks climbed to
        # reach the common ancestor: 1 = right genus, wrong species ... 7 = another kingdom.
        "mistake_lca_depth": float(depth.mean()) if wrong.any() else None,
        "mistake_severity": float((len(RANKS) - depth).mean()) if wrong.any() else None,
        "dangerous_images": int(dangerous.sum()),
        "dangerous_as_edible": float((pred_edibility[dangerous] == "edible").mean()) if dangerous.any() else None,
        "deadly_images": int(deadly.sum()),
        "deadly_recall": float((y_pred[deadly] == y_true[deadly]).mean()) if deadly.any() else None,
    }


def bootstrap_ci(
    y_true: np.ndarray, y_pred: np.ndarray, num_classes: int, n_resamples: int = 1000, seed: int = 0
) -> dict[str, list[float]]:
    """95% percentile intervals of OA, mF1 and mIoU over ``n_resamples`` image resamples."""
    rng = np.random.default_rng(seed)
    flat = y_true * num_classes + y_pred
    samples = {"oa": [], "mf1": [], "miou": []}
    for _ in range(n_resamples):
        cm = np.bincount(flat[rng.integers(0, len(flat), len(flat))], minlength=num_classes**2)
        headline = _headline_from_confusion(cm.reshape(num_classes, num_classes))
        for key in samples:
            samples[key].append(headline[key])
    return {k: [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))] for k, v in samples.items()}


def classification_metrics(
    y_true,
    scores_or_pred,
    num_classes: int,
    taxonomy: Taxonomy | None = None,
    class_names: list[str] | None = None,
    bootstrap: int = 0,
    seed: int = 0,
) -> dict:
    """All metrics of one evaluation from labels and an (N, C) score matrix or N predicted ids.

    ``top5`` needs scores (it is ``None`` for bare predictions). With a ``taxonomy`` of
    ``num_classes`` species, adds rank-level accuracy, mistake severity and the safety metrics, and with
    scores also the average hierarchical distance of the top-1/5/20 (``hierarchical_distance_top_k``).
    ``bootstrap=B`` adds 95% intervals (``ci``) for OA/mF1/mIoU from B resamples.
    """
    y_true, y_pred, scores = _validate(y_true, scores_or_pred, num_classes)
    if taxonomy is not None and len(taxonomy) != num_classes:
        raise ValueError(f"taxonomy has {len(taxonomy)} species but num_classes is {num_classes}")
    names = class_names or (taxonomy.classes if taxonomy is not None else [str(i) for i in range(num_classes)])
    cm = confusion_matrix(y_true, y_pred, num_classes)
    pc = _per_class(cm)
    result = {
        **_headline_from_confusion(cm),
        "top5": top_k_accuracy(y_true, scores, 5) if scores is not None else None,
        "num_images": int(len(y_true)),
        "num_classes_present": int(pc["present"].sum()),
        "per_class": {
            names[c]: {key: float(pc[key][c]) for key in ("precision", "recall", "f1", "iou")}
            | {"support": int(pc["support"][c])}
            for c in np.flatnonzero(pc["present"])
        },
        "confusion": cm,
    }
    if taxonomy is not None:
        result.update(_taxonomy_metrics(y_true, y_pred, taxonomy))
        if scores is not None:
            result["hierarchical_distance_top_k"] = hierarchical_distance_top_k(
                y_true, scores, taxonomy.lca_distance_matrix
            )
    if bootstrap:
        result["ci"] = bootstrap_ci(y_true, y_pred, num_classes, bootstrap, seed)
    return result


def to_jsonable(metrics: dict) -> dict:
    """The metrics dict with NumPy values turned into plain lists and numbers."""

    def convert(value):
        if isinstance(value, dict):
            return {k: convert(v) for k, v in value.items()}
        if isinstance(value, np.ndarray):
            return value.tolist()
        if isinstance(value, np.generic):
            return value.item()
        return value

    return convert(metrics)


def save_json(path: str | Path, value) -> None:
    """``value`` (metrics, records; numpy values included) as indented JSON: every result file is written so."""
    Path(path).write_text(json.dumps(to_jsonable(value), indent=2))


def format_report(metrics: dict, title: str = "") -> str:
    """A short human-readable block: headline numbers, ranks and safety."""

    def pct(v):
        return "  n/a" if v is None else f"{100 * v:5.1f}"

    lines = [title] if title else []
    lines.append("  ".join(f"{k.upper()} {pct(metrics.get(k))}" for k in (*HEADLINE, "balanced_acc")))
    if "ci" in metrics:
        lines.append(
            "95% CI  " + "  ".join(f"{k.upper()} [{pct(lo)}, {pct(hi)}]" for k, (lo, hi) in metrics["ci"].items())
        )
    if "rank_accuracy" in metrics:
        lines.append("rank accuracy  " + "  ".join(f"{r} {pct(v)}" for r, v in metrics["rank_accuracy"].items()))
        if "hierarchical_distance_top_k" in metrics:
            lines.append(
                "average hierarchical distance  "
                + "  ".join(f"{k} {v:.2f}" for k, v in metrics["hierarchical_distance_top_k"].items())
                + " ranks"
            )
        sev = metrics["mistake_severity"]
        lines.append(
            f"safety  dangerous->edible {pct(metrics['dangerous_as_edible'])} of {metrics['dangerous_images']} images"
            f"  deadly recall {pct(metrics['deadly_recall'])} of {metrics['deadly_images']}"
            f"  mistake severity {'n/a' if sev is None else f'{sev:.2f}'} ranks"
        )
    return "\n".join(lines)


FREQUENCY_GROUPS = ("head", "medium", "tail")


def frequency_groups(train_counts) -> dict[str, np.ndarray]:
    """The classes with training images, most images first (ties: lower class id first), cut into thirds:
    ``head``, ``medium``, ``tail`` (``numpy.array_split``: sizes differ by at most one, the larger ones first).
    Classes with equal counts stay together: those with the most images are the head, those with the fewest the
    tail (a step profile's two levels, whatever C), the runs between in the third of their middle place (the earlier
    of two). A balanced split (every count equal) is all ``medium``: it has no head or tail to speak of."""
    counts = np.asarray(train_counts)
    trained = np.flatnonzero(counts > 0)
    order = trained[np.argsort(-counts[trained], kind="stable")]
    ranked = counts[order]
    if not len(order) or ranked[0] == ranked[-1]:
        return {name: order if name == "medium" else order[:0] for name in FREQUENCY_GROUPS}
    third = np.repeat(np.arange(3), [len(part) for part in np.array_split(order, 3)])  # each place's third
    starts = np.flatnonzero(np.r_[True, ranked[1:] != ranked[:-1]])
    group = np.empty(len(order), dtype=int)
    ends = [*starts[1:], len(order)]
    for start, end in zip(starts, ends):
        group[start:end] = third[(start + end - 1) // 2]
    group[: ends[0]], group[starts[-1] :] = 0, 2  # the most and the fewest images: always the head and the tail
    return {name: order[group == g] for g, name in enumerate(FREQUENCY_GROUPS)}


def metrics_by_training_count(confusion: np.ndarray, train_counts) -> dict[str, dict]:
    """Accuracy and mF1 of the head / medium / tail thirds of the classes by training images
    (:func:`frequency_groups`), from one evaluation's confusion matrix.

    A group's ``accuracy`` is its images' share answered correctly, its ``mf1`` the mean F1 of its classes present in
    the evaluation (in the truth or the predictions, as mF1 everywhere), every class's F1 taken from the whole
    confusion matrix (a head class's images answered as a tail class are false positives of that tail class);
    ``None`` where a group has no image or no class present. ``train_images`` is the group's range of training images
    per class.
    """
    cm = np.asarray(confusion)
    pc = _per_class(cm)
    counts = np.asarray(train_counts)
    out = {}
    for name, ids in frequency_groups(counts).items():
        images = int(pc["support"][ids].sum())
        present = ids[pc["present"][ids]]
        out[name] = {
            "classes": len(ids),
            "train_images": [int(counts[ids].min()), int(counts[ids].max())] if len(ids) else None,
            "images": images,
            "accuracy": float(np.diag(cm)[ids].sum() / images) if images else None,
            "mf1": float(pc["f1"][present].mean()) if len(present) else None,
        }
    return out
