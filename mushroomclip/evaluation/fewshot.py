"""Few-shot evaluation on frozen features: SimpleShot (as BioCLIP reports it) and a linear probe."""

from __future__ import annotations

import numpy as np
from sklearn.linear_model import LogisticRegression


def sample_support(labels: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Indices of ``k`` images per class (all of them where a class has fewer), drawn with ``seed``."""
    rng = np.random.default_rng(seed)
    picked = [rng.permutation(np.flatnonzero(labels == c))[:k] for c in np.unique(labels)]
    return np.sort(np.concatenate(picked))


def _l2(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def simpleshot_scores(
    support: np.ndarray, support_labels: np.ndarray, query: np.ndarray, num_classes: int
) -> np.ndarray:
    """SimpleShot: L2-normalise, subtract the support mean, re-normalise, nearest class centroid.

    Returns ``(Q, C)`` scores (negative Euclidean distance); classes without support score -inf.
    """
    support, query = _l2(support), _l2(query)
    mean = support.mean(axis=0, keepdims=True)
    support, query = _l2(support - mean), _l2(query - mean)
    classes = np.unique(support_labels)
    onehot = (support_labels[:, None] == classes[None, :]).astype(np.float64)
    centroids = (onehot.T @ support) / onehot.sum(axis=0)[:, None]
    # ||q - c||^2 = |q|^2 + |c|^2 - 2 q.c, vectorised over all queries and classes
    d2 = (query**2).sum(1)[:, None] + (centroids**2).sum(1)[None, :] - 2 * query @ centroids.T
    scores = np.full((len(query), num_classes), -np.inf)
    scores[:, classes] = -np.sqrt(np.maximum(d2, 0))
    return scores


def linear_probe_scores(
    train: np.ndarray, train_labels: np.ndarray, query: np.ndarray, num_classes: int, seed: int = 0, c: float = 1.0
) -> np.ndarray:
    """Multinomial logistic regression on L2-normalised frozen features; ``(Q, C)`` log-probabilities."""
    probe = LogisticRegression(C=c, max_iter=1000, random_state=seed)
    probe.fit(_l2(train), train_labels)
    scores = np.full((len(query), num_classes), -np.inf)
    scores[:, probe.classes_] = probe.predict_log_proba(_l2(query))
    return scores


def summarise_runs(runs: list[dict], keys: tuple[str, ...]) -> dict[str, dict[str, float]]:
    """Mean and standard deviation (over seeds) of each scalar metric in ``keys``."""
    out = {}
    for key in keys:
        values = np.array([r[key] for r in runs if r.get(key) is not None], dtype=float)
        if len(values):
            out[key] = {"mean": float(values.mean()), "std": float(values.std(ddof=0))}
    return out
