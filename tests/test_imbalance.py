"""Imbalanced training: the long-tailed training split, head/medium/tail figures, the logit-adjusted loss and the
class-balanced sampler."""

from __future__ import annotations

import json
import logging
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import chisquare

from mushroomclip.config import ConfigError, load_train_config
from mushroomclip.data.imbalance import apply_imbalance, resolve_imbalance, subsample, target_counts
from mushroomclip.data.splits import load_splits, prepared_taxonomy
from mushroomclip.metrics import frequency_groups, metrics_by_training_count
from mushroomclip.taxonomy import load_taxonomy
from mushroomclip.training.losses import LossInputs, danger_penalty, logit_adjustment, training_loss
from mushroomclip.training.trainer import SeededDrawSampler, class_balanced_weights
from tests.test_training import ROOT, tiny_overrides

# --- the long tail ---


def test_profiles_give_the_documented_counts():
    # exponential: floor(100 * 100 ** (-i / 4)) = 100, 31.6, 10, 3.16, 1
    assert target_counts("exponential", 100, 100, 5) == [100, 31, 10, 3, 1]
    # 500 * 10 ** (-1/3) = 232.07, 500 * 10 ** (-2/3) = 107.7, 500 / 10 = 50 (exactly, despite float rounding)
    assert target_counts("exponential", 10, 500, 4) == [500, 232, 107, 50]
    # never below one image: 100 / 1000 = 0.1 -> 1; 100 * 1000 ** -0.5 = 3.16 -> 3
    assert target_counts("exponential", 1000, 100, 3) == [100, 3, 1]
    assert target_counts("exponential", 100, 7, 1) == [7]
    # step: ceil(C / 2) keep n_max, floor(C / 2) keep floor(n_max / ratio)
    assert target_counts("step", 10, 100, 5) == [100, 100, 100, 10, 10]
    assert target_counts("step", 10, 100, 4) == [100, 100, 10, 10]
    assert target_counts("step", 1000, 100, 2) == [100, 1]


def _labels(counts: dict[int, int]) -> np.ndarray:
    """A training split's labels, classes interleaved (so rows of a class are not contiguous)."""
    rows = [c for c, n in counts.items() for _ in range(n)]
    return np.random.default_rng(123).permutation(rows)


def test_subsampling_follows_the_profile_exactly_and_is_deterministic_per_seed():
    taxonomy = load_taxonomy()
    labels = _labels({3: 100, 7: 100, 11: 100, 20: 100, 42: 100})
    spec = {"profile": "exponential", "ratio": 100, "seed": 0}
    result = subsample(labels, taxonomy, spec)
    ranked = np.random.default_rng(0).permutation([3, 7, 11, 20, 42])  # the documented ranking
    assert result.species == [taxonomy.classes[c] for c in ranked]
    assert result.requested == result.used == [100, 31, 10, 3, 1] and result.available == [100] * 5
    kept = labels[result.indices]
    assert [int((kept == c).sum()) for c in ranked] == [100, 31, 10, 3, 1]
    assert np.all(np.diff(result.indices) > 0)  # each row once, in the split's order
    again = subsample(labels, taxonomy, spec)
    assert np.array_equal(again.indices, result.indices)
    other = subsample(labels, taxonomy, spec | {"seed": 1})
    assert sorted(other.used) == sorted(result.used) and not np.array_equal(other.indices, result.indices)
    record = result.record()
    assert record["images_before"] == 500 and record["images_after"] == 145 and record["ratio_used"] == 100
    assert record["n_max"] == 100 and record["species"][1]["requested"] == 31


def test_on_already_imbalanced_data_the_plentiful_species_are_the_head_and_the_profile_stays_exact():
    taxonomy = load_taxonomy()
    labels = _labels({0: 40, 1: 12, 2: 40, 3: 40})
    for seed in range(5):  # ties (40, 40, 40) in the seeded order, the 12 last: the step profile fits exactly
        result = subsample(labels, taxonomy, {"profile": "step", "ratio": 4, "seed": seed})
        assert result.species[3] == taxonomy.classes[1] and result.requested == result.used == [40, 40, 10, 10]
        assert result.record()["ratio_used"] == 4
    # one species of 500 and nine of 60: 500 * 100 ** (-1/9) = 299 > 60, so n_max comes down to the largest
    # that the 60s can follow, 101 (101 * 100 ** (-1/9) = 60.5 -> 60; 102 would ask for 61), and then to 100, where
    # the tail's floor(n_max / 100) makes the ratio exactly 100 (101 / 1 is 101). A seeded rank put a 60 at the
    # head for some seeds and the kept ratio moved with the seed (12, 21, 60 for seeds 0, 1, 2).
    labels = _labels({c: 500 if c == 5 else 60 for c in range(10)})
    for seed in range(3):
        result = subsample(labels, taxonomy, {"profile": "exponential", "ratio": 100, "seed": seed})
        assert result.species[0] == taxonomy.classes[5] and result.requested[:2] == [100, 59]
        assert result.used == result.requested == target_counts("exponential", 100, 100, 10)
        assert result.record()["ratio_used"] == 100 and result.record()["n_max"] == 100
        kept = labels[result.indices]
        assert [int((kept == taxonomy.id(s)).sum()) for s in result.species] == result.used


def test_n_max_gives_up_less_than_the_ratio_to_make_the_ratio_exact():
    taxonomy = load_taxonomy()
    # every species can follow n_max = 39 (39, 28, 20, ... 5, 3), but 39 / floor(3.9) = 13; 30 / 3 = 10
    labels = _labels(dict(zip(range(8), [39, 31, 31, 30, 30, 28, 27, 25])))
    result = subsample(labels, taxonomy, {"profile": "exponential", "ratio": 10, "seed": 0})
    assert result.requested == target_counts("exponential", 10, 30, 8) == [30, 21, 15, 11, 8, 5, 4, 3]
    assert result.record()["ratio_used"] == 10
    # 7 images cannot be cut 10 : 1: the largest n_max stays, and ratio_used says what the split has
    result = subsample(_labels({0: 7, 1: 7}), taxonomy, {"profile": "step", "ratio": 10, "seed": 0})
    assert result.used == [7, 1] and result.record()["ratio_used"] == 7


def test_only_the_training_split_is_subsampled(prepared):
    taxonomy = prepared_taxonomy(prepared[0])
    splits = load_splits(prepared[0])
    out, imbalance = apply_imbalance(splits, taxonomy, {"profile": "exponential", "ratio": 10, "seed": 0})
    for name in ("validation", "test"):
        assert out[name]["source"] == splits[name]["source"]
    counts = np.bincount(out["train"]["label"], minlength=len(taxonomy))
    assert sorted(counts[counts > 0], reverse=True) == sorted(imbalance.used, reverse=True)
    assert set(np.flatnonzero(counts)) == set(splits["train"]["label"])  # no species vanishes
    assert set(out["train"]["source"]) <= set(splits["train"]["source"])
    assert apply_imbalance(splits, taxonomy, None) == (splits, None)


def test_config_takes_the_mapping_fills_defaults_and_names_mistakes():
    cfg = load_train_config(ROOT / "configs/tiny_imbalance.yaml")
    assert cfg.data.imbalance == {"profile": "exponential", "ratio": 10, "seed": 0}
    cfg = load_train_config(ROOT / "configs/tiny.yaml", ["data.imbalance={profile: step}", "data.imbalance.ratio=50"])
    assert cfg.data.imbalance == {"profile": "step", "ratio": 50, "seed": 0}
    assert load_train_config(ROOT / "configs/tiny.yaml").data.imbalance is None
    assert resolve_imbalance({}) == {"profile": "exponential", "ratio": 100, "seed": 0}
    for override, message in (
        ("data.imbalance.ratoi=3", r"unknown key data.imbalance.ratoi; did you mean 'ratio'\?"),
        ("data.imbalance.profile=linear", "data.imbalance.profile must be exponential or step, got 'linear'"),
        ("data.imbalance.ratio=0.5", "data.imbalance.ratio must be a number of at least 1"),
        ("data.imbalance.seed=-1", "data.imbalance.seed must be an integer, 0 or more"),
        ("data.imbalance=100", "data.imbalance must be a mapping or null, got 100"),
        ("data.sampler=balanced", "data.sampler must be random or class_balanced, got 'balanced'"),
        ("loss.logit_adjust=-1", "loss.logit_adjust must be 0 .off. or more"),
        ("loss.name=multi_positive", "loss.logit_adjust needs the scores of every class"),
        ("data.sampler=class_balanced", "would count the imbalance twice.*choose one"),
    ):
        extra = ["loss.logit_adjust=1"] if override.startswith(("loss.name", "data.sampler=class")) else []
        with pytest.raises(ConfigError, match=message):
            load_train_config(ROOT / "configs/tiny.yaml", [override, *extra])


# --- head / medium / tail ---


def test_head_medium_and_tail_thirds_by_hand():
    # 7 classes with training images (class 7 has none); ties keep the lower id first: 4 (50), 0 (40), 2 (40) |
    # 1 (20), 6 (10) | 3 (5), 5 (5)
    counts = np.array([40, 20, 40, 5, 50, 5, 10, 0])
    groups = frequency_groups(counts)
    assert [g.tolist() for g in groups.values()] == [[4, 0, 2], [1, 6], [3, 5]]
    cm = np.zeros((8, 8), dtype=int)
    cm[4, 4], cm[0, 0], cm[0, 1] = 5, 3, 1  # head: class 2 has no test image
    cm[1, 1], cm[6, 6], cm[6, 4] = 2, 1, 1
    cm[3, 3], cm[3, 0], cm[5, 5] = 1, 1, 0  # class 5 neither true nor predicted in this split
    by = metrics_by_training_count(cm, counts)
    # head: 8 of 9 images right; F1 of 4 = 2*5/(5+6), of 0 = 2*3/(4+4); 2 is absent
    assert by["head"] == {
        "classes": 3,
        "train_images": [40, 50],
        "images": 9,
        "accuracy": pytest.approx(8 / 9),
        "mf1": pytest.approx((10 / 11 + 6 / 8) / 2),
    }
    # medium: 3 of 4; F1 of 1 = 2*2/(2+3) (one false positive from class 0), of 6 = 2*1/(2+1)
    assert by["medium"]["accuracy"] == pytest.approx(3 / 4)
    assert by["medium"]["mf1"] == pytest.approx((4 / 5 + 2 / 3) / 2)
    # tail: 1 of 2; class 3 F1 = 2*1/(2+1), class 5 absent
    assert by["tail"]["accuracy"] == pytest.approx(1 / 2) and by["tail"]["mf1"] == pytest.approx(2 / 3)
    assert by["tail"]["train_images"] == [5, 5] and by["tail"]["classes"] == 2
    # equal counts stay in one third, the one of their run's middle place: a step profile's two levels are the
    # head and the tail (by place alone the medium third held 500, 5, 5), balanced data is all medium
    groups = frequency_groups([500] * 5 + [5] * 5)
    assert [g.tolist() for g in groups.values()] == [[0, 1, 2, 3, 4], [], [5, 6, 7, 8, 9]]
    assert [g.tolist() for g in frequency_groups([7] * 4).values()] == [[], [0, 1, 2, 3], []]
    for c in range(2, 13):  # a step profile: its two levels are the head and the tail whatever the number of species
        counts = target_counts("step", 10, 100, c)
        groups = frequency_groups(counts)
        assert [len(g) for g in groups.values()] == [c - c // 2, 0, c // 2], c
    # 9, then 6 x 6 over places 1-6 (middle 3, in the medium third of places 3-5), then 2
    assert [g.tolist() for g in frequency_groups([9, 6, 6, 6, 6, 6, 6, 2]).values()] == [[0], [1, 2, 3, 4, 5, 6], [7]]
    empty = metrics_by_training_count(np.zeros((2, 2), dtype=int), [3, 0])
    assert (
        empty["medium"]["classes"] == 1
        and empty["head"]["classes"] == 0
        and empty["tail"]
        == {
            "classes": 0,
            "train_images": None,
            "images": 0,
            "accuracy": None,
            "mf1": None,
        }
    )


# --- logit adjustment ---


def test_logit_adjusted_loss_by_hand():
    # logits (1, 0), label 0, training counts (3, 1), tau 1: adjusted logits (1 + log 3/4, log 1/4), so the loss is
    # log(1 + exp(log 1/4 - 1 - log 3/4)) = log(1 + e^-1 / 3)
    context = {"logit_adjustment": logit_adjustment([3, 1], 1.0)}
    batch = LossInputs(None, None, torch.tensor([0]), None, context, logits=torch.tensor([[1.0, 0.0]]))
    expected = math.log(1 + math.exp(-1) / 3)
    assert training_loss("cross_entropy", batch).item() == pytest.approx(expected, rel=1e-6)
    assert 0.1156 < expected < 0.1157
    # tau scales the adjustment; a class without training images counts as one image
    assert torch.allclose(logit_adjustment([3, 1, 0], 2.0), 2.0 * torch.log(torch.tensor([3 / 5, 1 / 5, 1 / 5])))


def test_logit_adjustment_applies_to_clip_class_prompt_logits_and_not_to_the_danger_term():
    from mushroomclip.training.losses import hierarchy_tensors

    taxonomy = load_taxonomy()
    generator = torch.Generator().manual_seed(0)
    images = F.normalize(torch.randn(5, 8, generator=generator), dim=-1)
    texts = F.normalize(torch.randn(len(taxonomy), 8, generator=generator), dim=-1)
    labels, scale = torch.tensor([0, 1, 1, 2, 3]), torch.tensor(10.0)
    counts = np.zeros(len(taxonomy))
    counts[:4] = [50, 20, 5, 1]
    adjustment = logit_adjustment(counts, 1.5)
    logits = scale * images @ texts.T
    batch = LossInputs(images, texts, labels, scale, {"logit_adjustment": adjustment})
    assert torch.allclose(training_loss("class_text", batch), F.cross_entropy(logits + adjustment, labels))
    assert not torch.allclose(training_loss("class_text", batch), F.cross_entropy(logits, labels))
    tensors = hierarchy_tensors(taxonomy)
    batch.context |= {"danger_weight": 2.0, "hierarchy": tensors}
    danger = danger_penalty(logits, labels, tensors.dangerous, tensors.edible)
    assert danger > 0
    assert torch.allclose(
        training_loss("class_text", batch), F.cross_entropy(logits + adjustment, labels) + 2.0 * danger
    )


# --- class-balanced sampling ---


def test_class_balanced_draws_make_every_class_equally_likely_and_are_deterministic_per_epoch():
    labels = np.array([0] * 90 + [1] * 9 + [2] * 1)
    weights = class_balanced_weights(labels)
    assert weights[0] == pytest.approx(1 / 90) and weights[99] == 1.0
    sampler = SeededDrawSampler(len(labels), seed=3, weights=weights)
    draws = []
    for epoch in range(30):
        sampler.set_epoch(epoch)
        draws += [index for index, _ in sampler]
    assert len(draws) == 3000
    per_class = np.bincount(labels[draws], minlength=3)
    # uniform over the 3 classes (1000 each expected; a random sampler would give 2700 / 270 / 30)
    assert chisquare(per_class).pvalue > 0.01, per_class
    assert per_class.min() > 900
    # a pure function of (seed, epoch): what --resume relies on
    again = SeededDrawSampler(len(labels), seed=3, weights=weights)
    again.set_epoch(29)
    sampler.set_epoch(29)
    assert list(again) == list(sampler)
    again.set_epoch(28)
    assert list(again) != list(sampler)
    with pytest.raises(ValueError, match="sampler weights must be 100 non-negative numbers"):
        SeededDrawSampler(100, 0, weights=np.zeros(100))


# --- one run ---


def test_an_imbalanced_run_records_its_counts_groups_and_plot(prepared, tmp_path, caplog):
    from mushroomclip.data.splits import load_splits
    from mushroomclip.hub import model_card
    from mushroomclip.models.classifier import data_mismatch
    from mushroomclip.training.trainer import run_training

    out = tmp_path / "long-tail"
    overrides = tiny_overrides(prepared[0], out, **{"training.max_steps": 2, "training.eval_steps": 2})
    extra = ["data.sampler=class_balanced", "lora.towers=[vision]"]  # frozen text: faster
    cfg = load_train_config(ROOT / "configs/tiny_imbalance.yaml", [*overrides, *extra])
    with caplog.at_level(logging.INFO, logger="mushroomclip"):
        run_training(cfg)
    counts = json.loads((out / "class_counts.json").read_text())
    assert (counts["profile"], counts["ratio"], counts["seed"]) == ("exponential", 10, 0)
    assert len(counts["species"]) == 6 and all(s["used"] >= 1 for s in counts["species"])
    data = json.loads((out / "data.json").read_text())
    assert data["images"]["train"] == counts["images_after"] < counts["images_before"]
    metrics = json.loads((out / "metrics.json").read_text())
    for split in ("validation_best", "test"):
        groups = metrics[split]["by_training_count"]
        assert [g["classes"] for g in groups.values()] == [2, 2, 2]
        assert sum(g["images"] for g in groups.values()) == len(load_splits(prepared[0])[split.split("_")[0]])
    assert (out / "accuracy_by_training_count.png").stat().st_size > 0
    test_groups = metrics["test"]["by_training_count"]
    line = f"test by training images (head / medium / tail): accuracy {100 * test_groups['head']['accuracy']:.1f} / "
    assert line in caplog.text  # the run's summary says how the rare species fare
    assert "subsampled to an artificial long tail (exponential profile, ratio 10, seed 0" in model_card(out).text
    assert load_train_config(out / "config.yaml").to_dict() == cfg.to_dict()
    # the run still fits the benchmark's --include-adapters (same species as the data's training split)
    classes = json.loads((out / "classes.json").read_text())
    species = {classes["species"][i] for i in load_splits(prepared[0])["train"]["label"]}
    assert data_mismatch(classes, classes["species"], species) is None
