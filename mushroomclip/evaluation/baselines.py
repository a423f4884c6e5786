"""Trivial reference points for any model: the majority class and colour-histogram nearest centroid.

python -m mushroomclip.evaluation.baselines --data demo/prepared --split test --output results/baselines
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from mushroomclip.data.splits import load_splits, prepared_taxonomy
from mushroomclip.evaluation.reporting import write_results
from mushroomclip.metrics import classification_metrics, format_report

BINS = 8  # per channel: 8 x 8 x 8 joint colour histogram


def colour_histograms(images, size: int = 64) -> np.ndarray:
    """``(N, BINS**3)`` L1-normalised joint RGB histograms of images shrunk to ``size`` pixels."""
    features = np.empty((len(images), BINS**3), dtype=np.float32)
    for i, image in enumerate(images):
        image = image.convert("RGB")
        image.thumbnail((size, size))
        q = np.asarray(image, dtype=np.int64) * BINS // 256
        flat = (q[..., 0] * BINS + q[..., 1]) * BINS + q[..., 2]
        hist = np.bincount(flat.ravel(), minlength=BINS**3)
        features[i] = hist / hist.sum()
    return features


def nearest_centroid_scores(
    train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, num_classes: int
) -> np.ndarray:
    """Negative Euclidean distance to each class centroid; classes without training images score -inf."""
    scores = np.full((len(test_x), num_classes), -np.inf, dtype=np.float64)
    classes = np.unique(train_y)
    centroids = np.stack([train_x[train_y == c].mean(axis=0) for c in classes])
    scores[:, classes] = -np.linalg.norm(test_x[:, None, :] - centroids[None], axis=2)
    return scores


def majority_scores(train_y: np.ndarray, n: int, num_classes: int) -> np.ndarray:
    """Every image scored by class frequency in the training split."""
    return np.tile(np.bincount(train_y, minlength=num_classes).astype(np.float64), (n, 1))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Evaluate the trivial baselines on a prepared data folder.")
    p.add_argument("--data", required=True, help="prepared folder (data_scripts/prepare_kaggle.py --output)")
    p.add_argument("--split", default="test", choices=("validation", "test"), help="split to evaluate on")
    p.add_argument("--output", default="results/baselines", help="where to write <baseline>/metrics.json and figures")
    p.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples for 95%% intervals (0: none)")
    args = p.parse_args(argv)

    try:
        splits = load_splits(args.data)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    taxonomy = prepared_taxonomy(args.data)
    train, evaluation = splits["train"], splits[args.split]
    train_y, eval_y = np.array(train["label"]), np.array(evaluation["label"])
    num_classes = len(taxonomy)
    scores = {
        "majority": majority_scores(train_y, len(eval_y), num_classes),
        "colour-histogram": nearest_centroid_scores(
            colour_histograms(train["image"]), train_y, colour_histograms(evaluation["image"]), num_classes
        ),
    }
    for name, s in scores.items():
        metrics = classification_metrics(eval_y, s, num_classes, taxonomy=taxonomy, bootstrap=args.bootstrap)
        write_results(Path(args.output) / name, metrics, taxonomy, vars(args), seed=0, name=name)
        print(format_report(metrics, title=f"\n{name} baseline on {args.split} ({len(eval_y)} images)"))
    print(f"\nresults in {args.output}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
