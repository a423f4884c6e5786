"""Open-set scores and metrics against scikit-learn and hand computations."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from mushroomclip.evaluation.openset import (
    OpenSetScores,
    auroc,
    fpr_at_tpr,
    known_scores,
    open_set_metrics,
    oscr,
    threshold_at_tpr,
    unknown_threshold,
)


def test_scores_by_hand():
    logits = np.array([[2.0, 0.0], [1.0, 1.0]])
    scores = known_scores(logits, logit_scale=10.0)
    assert scores["msp"] == pytest.approx([np.e**2 / (np.e**2 + 1), 0.5])
    assert scores["max_logit"] == pytest.approx([2.0, 1.0])
    assert scores["energy"] == pytest.approx([np.log(np.e**2 + 1), np.log(2 * np.e)])
    assert scores["max_cosine"] == pytest.approx([0.2, 0.1])
    assert "max_cosine" not in known_scores(logits)  # a supervised head has no cosines


def test_auroc_equals_scikit_learn_also_with_ties():
    rng = np.random.default_rng(0)
    known, unknown = rng.normal(1, 1, 200).round(1), rng.normal(0, 1, 150).round(1)  # rounding makes ties
    expected = roc_auc_score(np.r_[np.ones(200), np.zeros(150)], np.r_[known, unknown])
    assert auroc(known, unknown) == pytest.approx(expected, abs=1e-12)


def test_fpr_at_95_tpr_by_hand():
    known = np.arange(1, 21) / 20  # 0.05 .. 1.0: 95% of them (19) are >= 0.10
    assert threshold_at_tpr(known, 0.95) == pytest.approx(0.10)
    unknown = np.array([0.0, 0.05, 0.1, 0.5])  # 0.1 and 0.5 are accepted
    assert fpr_at_tpr(known, unknown, 0.95) == 0.5
    # the largest threshold that keeps the share: 55 of 100, though 0.55 * 100 is 55.000000000000007 in floats
    assert threshold_at_tpr(np.arange(1, 101) / 100, 0.55) == pytest.approx(0.46)
    assert threshold_at_tpr(np.array([0.9, 0.5, 0.1]), 1e-10) == 0.9  # a tiny rate keeps the best image, not none


def test_oscr_by_hand():
    # known: scores .9 (correct), .6 (wrong), .4 (correct); unknown: .7, .3
    known, correct, unknown = np.array([0.9, 0.6, 0.4]), np.array([True, False, True]), np.array([0.7, 0.3])
    # thresholds .9 .7 .6 .4 .3 -> (FPR, CCR): (0, 1/3) (1/2, 1/3) (1/2, 1/3) (1/2, 2/3) (1, 2/3), from (0, 0)
    # area: 0 (vertical) + 1/2 * 1/3 + 0 + 0 (vertical) + 1/2 * 2/3 = 1/2
    assert oscr(known, correct, unknown) == pytest.approx(0.5)
    # a perfect separation reaches the closed-set accuracy (2/3); a perfect inverse one reaches 0
    assert oscr(known, correct, np.array([0.1, 0.2])) == pytest.approx(2 / 3)
    assert oscr(known, correct, np.array([1.0, 0.95])) == pytest.approx(0.0)


def test_metrics_with_bootstrap_intervals_around_the_point():
    rng = np.random.default_rng(1)
    known_logits = rng.normal(0, 1, (80, 5)) + 3 * np.eye(5)[rng.integers(0, 5, 80)]
    labels = known_logits.argmax(1)
    labels[:10] = (labels[:10] + 1) % 5  # some mistakes
    scores = OpenSetScores.from_logits(known_logits, labels, rng.normal(0, 1, (40, 5)), logit_scale=100.0)
    metrics = open_set_metrics(scores, bootstrap=200, seed=0)
    assert set(metrics) == {"msp", "max_logit", "energy", "max_cosine"}
    for row in metrics.values():
        for key in ("auroc", "fpr95", "oscr"):
            low, high = row["ci"][key]
            assert low <= row[key] <= high and low < high
        assert row["oscr"] <= (known_logits.argmax(1) == labels).mean() + 1e-12
    assert metrics == open_set_metrics(scores, bootstrap=200, seed=0)  # seeded


def test_unknown_threshold_keeps_the_stated_share_of_known_validation_images():
    msp = np.linspace(0.2, 1.0, 100)
    record = unknown_threshold(msp, 0.95)
    assert (msp >= record["threshold"]).mean() == pytest.approx(0.95)
    assert record | {"threshold": None} == {
        "score": "msp",
        "threshold": None,
        "tpr": 0.95,
        "chosen_on": "validation",
        "images": 100,
    }
