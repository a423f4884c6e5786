"""Taxonomy tensors and the taxonomy- and safety-aware losses (Bertinetto et al. 2020 soft labels and HXE, the
danger term) and the average hierarchical distance of top-k, checked against hand computations and plain loop references built from the species' lineages."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_metrics import TOY  # A1/A2 share a genus, B1 another family of the order, C1 another phylum

from mushroomclip.metrics import classification_metrics, format_report, hierarchical_distance_top_k
from mushroomclip.taxonomy import RANKS, load_taxonomy
from mushroomclip.training.losses import (
    danger_penalty,
    hierarchical_soft_loss,
    hierarchical_xent_loss,
    hierarchy_tensors,
)


@pytest.fixture(scope="module")
def taxonomy():
    return load_taxonomy()


@pytest.fixture(scope="module")
def tensors(taxonomy):
    return hierarchy_tensors(taxonomy)


def lca_height(a: tuple[str, ...], b: tuple[str, ...]) -> int:
    """Ranks climbed from the leaves to the lowest common ancestor of two lineages (a plain loop)."""
    shared = 0
    while shared < len(a) and a[shared] == b[shared]:
        shared += 1
    return len(a) - shared


def test_lca_distance_is_the_height_of_the_lowest_common_ancestor(taxonomy, tensors):
    d = tensors.lca_distance
    ids = {name: taxonomy.id(name) for name in ("Amanita phalloides", "Amanita muscaria", "Agaricus augustus")}
    assert d[ids["Amanita phalloides"], ids["Amanita phalloides"]] == 0
    assert d[ids["Amanita phalloides"], ids["Amanita muscaria"]] == 1  # same genus
    assert d[ids["Amanita phalloides"], ids["Agaricus augustus"]] == 3  # same order (Agaricales)
    lineages = [s.lineage for s in taxonomy.species]
    expected = [[lca_height(a, b) for b in lineages] for a in lineages]
    np.testing.assert_array_equal(d.numpy(), expected)


def test_lineage_and_safety_masks_follow_the_table(taxonomy, tensors):
    assert tensors.lineage.shape == (len(taxonomy), len(RANKS))
    for rank in range(len(RANKS)):
        names = [s.lineage[: rank + 1] for s in taxonomy.species]
        codes = tensors.lineage[:, rank].tolist()
        assert all((codes[i] == codes[j]) == (names[i] == names[j]) for i in range(0, 169, 7) for j in range(169))
    edibility = [s.edibility for s in taxonomy.species]
    assert tensors.dangerous.tolist() == [e in ("deadly", "poisonous") for e in edibility]
    assert tensors.edible.tolist() == [e == "edible" for e in edibility]


# A 3-level toy tree (family > genus > species) over 4 classes:
#   family 0: genus 0 {class 0, class 1}, genus 1 {class 2};  family 1: genus 2 {class 3}
TOY_LINEAGE = torch.tensor([[0, 0, 0], [0, 0, 1], [0, 1, 2], [1, 2, 3]])
TOY_PROBS = torch.tensor([[0.1, 0.2, 0.3, 0.4]])


def test_hxe_equals_a_hand_computation_on_a_three_level_tree():
    alpha = 0.5
    # label 0: p(family 0) = 0.6, p(genus 0 | family 0) = 0.3 / 0.6, p(class 0 | genus 0) = 0.1 / 0.3
    expected = -(
        math.exp(-alpha) * math.log(0.6) + math.exp(-2 * alpha) * math.log(0.5) + math.exp(-3 * alpha) * math.log(1 / 3)
    )
    loss = hierarchical_xent_loss(TOY_PROBS.log(), torch.tensor([0]), TOY_LINEAGE, alpha)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    # label 3 is alone in its family and genus: only the top level (p = 0.4) costs anything
    loss = hierarchical_xent_loss(TOY_PROBS.log(), torch.tensor([3]), TOY_LINEAGE, alpha)
    assert loss.item() == pytest.approx(-math.exp(-alpha) * math.log(0.4), rel=1e-6)


def test_hxe_with_alpha_zero_is_cross_entropy(tensors):
    logits, labels = torch.randn(6, 169, generator=torch.Generator().manual_seed(0)), torch.arange(0, 169, 30)
    hxe = hierarchical_xent_loss(logits, labels, tensors.lineage, 0.0)
    assert hxe.item() == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-5)


def reference_hxe(probs: np.ndarray, labels: list[int], lineages: list[tuple], alpha: float) -> float:
    """HXE by loops over images and ranks, summing leaf probabilities under each ancestor by name."""
    total = 0.0
    for p, y in zip(probs, labels):
        parent_mass = 1.0
        for depth in range(1, len(lineages[y]) + 1):
            mass = sum(p[j] for j, lin in enumerate(lineages) if lin[:depth] == lineages[y][:depth])
            total -= math.exp(-alpha * depth) * math.log(mass / parent_mass)
            parent_mass = mass
    return total / len(labels)


def reference_soft(probs: np.ndarray, labels: list[int], lineages: list[tuple], beta: float) -> float:
    """Soft-label cross-entropy by loops: target_j proportional to exp(-beta * height(y, j) / max height)."""
    heights = [[lca_height(a, b) for b in lineages] for a in lineages]
    top = max(max(row) for row in heights)
    total = 0.0
    for p, y in zip(probs, labels):
        weights = [math.exp(-beta * h / top) for h in heights[y]]
        total -= sum(w / sum(weights) * math.log(pj) for w, pj in zip(weights, p))
    return total / len(labels)


@pytest.mark.parametrize("hyper", [0.0, 0.3, 2.0])
def test_both_losses_equal_loop_references_on_the_bundled_tree(taxonomy, tensors, hyper):
    logits = 3 * torch.randn(5, len(taxonomy), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    labels = [
        taxonomy.id(n)
        for n in ("Amanita phalloides", "Boletus edulis", "Amanita muscaria", "Agaricus augustus", taxonomy.classes[-1])
    ]
    probs = logits.softmax(dim=1).numpy()
    lineages = [s.lineage for s in taxonomy.species]
    y = torch.tensor(labels)
    hxe = hierarchical_xent_loss(logits, y, tensors.lineage, hyper).item()
    assert hxe == pytest.approx(reference_hxe(probs, labels, lineages, hyper), rel=1e-5)
    soft = hierarchical_soft_loss(logits, y, tensors.lca_distance, 5 * hyper).item()
    assert soft == pytest.approx(reference_soft(probs, labels, lineages, 5 * hyper), rel=1e-5)


def test_soft_labels_become_cross_entropy_as_beta_grows(tensors):
    logits, labels = torch.randn(4, 169, generator=torch.Generator().manual_seed(2)), torch.tensor([0, 11, 12, 100])
    xent = F.cross_entropy(logits, labels).item()
    gaps = [abs(hierarchical_soft_loss(logits, labels, tensors.lca_distance, b).item() - xent) for b in (5, 20, 1e4)]
    assert gaps[0] > gaps[1] > gaps[2] and gaps[2] < 1e-5


def test_danger_penalty_is_the_edible_mass_on_dangerous_truths_averaged_over_the_batch():
    dangerous, edible = torch.tensor([False, True, True, False]), torch.tensor([True, False, False, True])
    probs = torch.tensor([[0.5, 0.2, 0.1, 0.2], [0.3, 0.4, 0.1, 0.2], [0.1, 0.1, 0.7, 0.1]])
    labels = torch.tensor([0, 1, 2])  # edible truth: 0; dangerous truths: edible mass 0.3 + 0.2, 0.1 + 0.1
    loss = danger_penalty(probs.log(), labels, dangerous, edible)
    assert loss.item() == pytest.approx((0 + 0.5 + 0.2) / 3, rel=1e-6)
    assert danger_penalty(probs.log(), torch.tensor([0, 3, 0]), dangerous, edible).item() == 0.0


def test_gradients_are_finite_even_for_confident_logits(tensors):
    logits = torch.randn(9, 169, generator=torch.Generator().manual_seed(3)) * 50
    logits.requires_grad_(True)
    labels = torch.arange(0, 169, 21)
    total = (
        hierarchical_xent_loss(logits, labels, tensors.lineage, 0.4)
        + hierarchical_soft_loss(logits, labels, tensors.lca_distance, 10.0)
        + danger_penalty(logits, labels, tensors.dangerous, tensors.edible)
    )
    total.backward()
    assert torch.isfinite(total) and torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_average_hierarchical_distance_of_top_k_on_a_hand_checked_case(tmp_path):
    path = tmp_path / "toy.csv"
    path.write_text(TOY)
    tax = load_taxonomy(path)
    # LCA heights: A1-A2 1 (genus), A1-B1 and A2-B1 3 (order), C1 to anything else 6 (kingdom)
    scores = np.array(
        [
            [0.4, 0.1, 0.3, 0.2],  # truth A1; ranked A1, B1, C1, A2: 0, 3, 6, 1
            [0.1, 0.5, 0.1, 0.3],
        ]
    )  # truth C1; ranked A2, C1, A1, B1 (tie: lower id first): 6, 0, 6, 6
    y = np.array([0, 3])
    m = classification_metrics(y, scores, 4, taxonomy=tax)
    # k = 5 and 20 are capped at the 4 classes
    assert m["hierarchical_distance_top_k"] == pytest.approx({"top1": (0 + 6) / 2, "top4": (10 / 4 + 18 / 4) / 2})
    distance = hierarchical_distance_top_k(y, scores, tax.lca_distance_matrix, ks=(2,))
    assert distance == pytest.approx({"top2": ((0 + 3) / 2 + (6 + 0) / 2) / 2})
    assert "average hierarchical distance  top1 3.00  top4 3.50 ranks" in format_report(m)
    assert "hierarchical_distance_top_k" not in classification_metrics(y, scores.argmax(1), 4, taxonomy=tax)


def test_hierarchical_distance_of_top_k_equals_a_loop_reference(taxonomy):
    rng = np.random.default_rng(4)
    scores, y = rng.random((30, len(taxonomy))), rng.integers(0, len(taxonomy), 30)
    lineages = [s.lineage for s in taxonomy.species]
    expected = {}
    for k in (1, 5, 20):
        per_image = [
            np.mean([lca_height(lineages[t], lineages[j]) for j in sorted(range(len(row)), key=lambda j: -row[j])[:k]])
            for t, row in zip(y, scores)
        ]
        expected[f"top{k}"] = np.mean(per_image)
    assert hierarchical_distance_top_k(y, scores, taxonomy.lca_distance_matrix) == pytest.approx(expected)
