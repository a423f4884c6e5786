"""Selective prediction: the risk-coverage curve, the threshold chosen for a dangerous->edible target, its plot,
and the answer that abstains below it, on hand-made probabilities."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from test_metrics import TOY  # A1 deadly and A2 edible share a genus, B1 poisonous, C1 edible

from mushroomclip.evaluation.plots import save_risk_coverage_png
from mushroomclip.evaluation.selective import choose_threshold, risk_coverage, risk_coverage_top1
from mushroomclip.metrics import classification_metrics
from mushroomclip.prediction.answer import NOT_SURE_TEXT, answer, run_thresholds
from mushroomclip.taxonomy import load_taxonomy

A1, A2, B1, C1 = 0, 1, 2, 3
# truth, probabilities over (A1, A2, B1, C1); the comment gives the top-1 and its probability
CASES = [
    (A1, [0.90, 0.05, 0.03, 0.02]),  # right, 0.9
    (C1, [0.10, 0.10, 0.00, 0.80]),  # right, 0.8
    (B1, [0.10, 0.10, 0.75, 0.05]),  # right, 0.75
    (A1, [0.20, 0.70, 0.05, 0.05]),  # A2: wrong and deadly -> edible, 0.7
    (B1, [0.05, 0.05, 0.30, 0.60]),  # C1: wrong and poisonous -> edible, 0.6
    (A2, [0.00, 0.50, 0.00, 0.50]),  # A2 (tie: the lower id, as answer() ranks), right, 0.5
]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    path = tmp_path_factory.mktemp("toy") / "toy.csv"
    path.write_text(TOY)
    return load_taxonomy(path)


def case_arrays(cases=CASES):
    return np.array([p for _, p in cases]), np.array([y for y, _ in cases])


def test_risk_coverage_curve_by_hand(toy):
    probs, labels = case_arrays()
    curve = risk_coverage(probs, labels, toy)
    np.testing.assert_allclose(curve.threshold, [0.9, 0.8, 0.75, 0.7, 0.6, 0.5])
    np.testing.assert_allclose(curve.coverage, np.arange(1, 7) / 6)
    np.testing.assert_allclose(curve.error, [0, 0, 0, 1 / 4, 2 / 5, 2 / 6])
    # 4 dangerous images (A1 x2, B1 x2); answered as edible: the A1 at 0.7, the B1 at 0.6
    np.testing.assert_allclose(curve.danger, [0, 0, 0, 1 / 4, 2 / 4, 2 / 4])
    assert (curve.images, curve.dangerous_images) == (6, 4)
    # answering everything gives metrics.py's dangerous->edible rate
    assert curve.danger[-1] == classification_metrics(labels, probs, 4, taxonomy=toy)["dangerous_as_edible"]
    # the same from each image's top-1 probability and class alone (what predictions.parquet holds)
    top1 = risk_coverage_top1(probs.max(axis=1), probs.argmax(axis=1), labels, toy)
    for field in ("threshold", "coverage", "error", "danger"):
        np.testing.assert_array_equal(getattr(top1, field), getattr(curve, field))


@pytest.mark.parametrize(
    ("max_danger", "threshold", "coverage", "danger", "error"),
    [(0.001, 0.75, 3 / 6, 0.0, 0.0), (0.25, 0.7, 4 / 6, 1 / 4, 1 / 4), (0.5, 0.5, 1.0, 2 / 4, 2 / 6)],
)
def test_the_threshold_of_largest_coverage_meeting_the_target_is_chosen(
    toy, max_danger, threshold, coverage, danger, error
):
    chosen = choose_threshold(risk_coverage(*case_arrays(), toy), max_danger)
    assert (chosen.threshold, chosen.coverage, chosen.danger, chosen.error) == pytest.approx(
        (threshold, coverage, danger, error)
    )
    assert chosen.met and chosen.max_danger == max_danger


def test_a_target_never_makes_answers_bolder_than_the_default_threshold(toy, tmp_path):
    """At a 50% target the curve allows 0.5; with the floor 0.6 the threshold stays 0.6 and its rates are there."""
    curve = risk_coverage(*case_arrays(), toy)
    chosen = choose_threshold(curve, 0.5, floor=0.6)
    assert (chosen.threshold, chosen.allowed, chosen.floor) == (0.6, 0.5, 0.6)
    assert (chosen.coverage, chosen.danger, chosen.error) == pytest.approx((5 / 6, 2 / 4, 2 / 5))
    assert "threshold 0.6000 (the target alone allowed 0.5000; a species is never named below the default 0.6)" in (
        chosen.summary()
    )
    assert chosen.record(0.8, 0.8)["allowed_by_target"] == 0.5
    # predict.py reads the floored record back as it is: the floor kept, the coverage at it
    (tmp_path / "metrics.json").write_text(json.dumps({"thresholds": chosen.record()}))
    source = run_thresholds(tmp_path).source
    assert "the target allowed 0.5, and the default floor 0.6 was kept (coverage 83.3% at 0.6)" in source
    assert run_thresholds(tmp_path).species == 0.6 and "NOT met" not in source
    assert "answers 83.3% of 6 images (coverage at the floor)" in chosen.summary()  # not "at the target"
    # a floor above every confidence answers nothing; below the target's own threshold it changes nothing
    assert choose_threshold(curve, 0.5, floor=0.95).coverage == 0.0
    assert choose_threshold(curve, 0.001, floor=0.5).threshold == 0.75
    # a weak model whose most confident answer is already a dangerous->edible mistake: the target alone would
    # answer nothing above 0.3, which is still bolder than the default; the floor holds there too
    weak = risk_coverage(np.array([[0.25, 0.3, 0.2, 0.25]] * 2), np.array([A1, C1]), toy)  # A2 (edible) at 0.3
    chosen = choose_threshold(weak, 0.001)
    assert chosen.threshold == 0.5 and chosen.allowed == pytest.approx(0.3) and chosen.coverage == 0.0
    assert "a target of 0 can never be shown" in choose_threshold(curve, 0.0).summary()


def test_the_target_is_shown_only_when_validation_has_enough_dangerous_images():
    """Clopper-Pearson one-sided 95%: 0 of n bounds the rate by 1 - 0.05^(1/n) (the 'rule of three', ~3/n)."""
    from scipy import stats

    from mushroomclip.evaluation.selective import SelectiveThreshold

    def chosen(danger, n, target=0.001):
        return SelectiveThreshold(0.5, target, 0.9, danger, 0.1, images=10 * n, dangerous_images=n)

    assert chosen(0.0, 7).danger_upper95 == pytest.approx(1 - 0.05 ** (1 / 7))  # 34.8%: 7 images show little
    assert not chosen(0.0, 7).verified and "NOT shown by validation" in chosen(0.0, 7).summary()
    assert chosen(0.0, 3000).verified and "(95% upper bound 0.10%)" in chosen(0.0, 3000).summary()
    assert chosen(2 / 100, 100, 0.1).danger_upper95 == pytest.approx(stats.beta.ppf(0.95, 3, 98))


def test_equal_confidences_are_answered_together(toy):
    cases = [(A1, [0.9, 0.05, 0.03, 0.02]), (A2, [0.1, 0.8, 0.05, 0.05]), (A1, [0.1, 0.8, 0.05, 0.05])]
    curve = risk_coverage(*case_arrays(cases), toy)
    np.testing.assert_allclose(curve.threshold, [0.9, 0.8])  # 0.8 answers the edible right and the deadly wrong
    chosen = choose_threshold(curve, 0.1)
    assert chosen.threshold == 0.9 and chosen.coverage == pytest.approx(1 / 3)


def test_when_even_the_most_confident_answer_is_dangerous_nothing_is_answered(toy):
    cases = [(A1, [0.05, 0.9, 0.03, 0.02]), (C1, [0.1, 0.1, 0.0, 0.8])]
    chosen = choose_threshold(risk_coverage(*case_arrays(cases), toy), 0.001)
    assert chosen.threshold > 0.9 and chosen.coverage == 0 and chosen.error is None and chosen.met
    cases[0] = (A1, [0.0, 1.0, 0.0, 0.0])  # a threshold above 1 does not exist: the target is reported as not met
    chosen = choose_threshold(risk_coverage(*case_arrays(cases), toy), 0.001)
    assert chosen.threshold == 1.0 and chosen.danger == 1.0 and not chosen.met
    assert "(coverage at the threshold)" in chosen.summary() and "target NOT met" in chosen.summary()


def test_bad_inputs_are_clear_errors(toy):
    probs, labels = case_arrays()
    with pytest.raises(ValueError, match="no deadly or poisonous images"):
        risk_coverage(probs[[1, 5]], labels[[1, 5]], toy)
    with pytest.raises(ValueError, match=r"shape \(N, 4\)"):
        risk_coverage(probs[:, :3], labels, toy)
    with pytest.raises(ValueError, match="--max-danger must be in"):
        choose_threshold(risk_coverage(probs, labels, toy), 1.0)


def test_risk_coverage_png_is_written(toy, tmp_path):
    curve = risk_coverage(*case_arrays(), toy)
    path = save_risk_coverage_png(curve, tmp_path / "risk_coverage.png", choose_threshold(curve, 0.001))
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width > 500


def test_the_answer_abstains_below_the_validation_chosen_threshold(toy, tmp_path):
    chosen = choose_threshold(risk_coverage(*case_arrays(), toy), 0.001)
    (tmp_path / "metrics.json").write_text(json.dumps({"thresholds": chosen.record(0.85, 0.9)}))
    thresholds = run_thresholds(tmp_path)
    assert (thresholds.species, thresholds.genus, thresholds.family) == (0.75, 0.85, 0.9)
    assert (
        "chosen on validation for a dangerous->edible rate of at most 0.1% (coverage 50.0% at 0.75); NOT shown by "
        "validation: the rate's 95% upper bound there is 52.7%" in thresholds.source
    )
    classes = toy.classes
    confident = answer(classes, np.array([0.05, 0.05, 0.1, 0.8]), toy, thresholds)
    assert confident.kind == "species" and confident.headline.startswith("Cc one")
    # the A1 image that the validation threshold exists for: 0.7 on edible A2, genus Ab 0.9 -> back-off
    backed_off = answer(classes, np.array([0.2, 0.7, 0.05, 0.05]), toy, thresholds)
    assert backed_off.kind == "genus" and backed_off.headline == "Ab sp., 90% — this genus includes Ab one"
    assert "deadly" in backed_off.warning
    unsure = answer(classes, np.array([0.05, 0.7, 0.2, 0.05]), toy, thresholds)
    assert unsure.kind == "not_sure" and unsure.headline == f"{NOT_SURE_TEXT}; closest: Ab two (a-two), 70%"


def test_summary_states_coverage_at_the_target_and_whether_it_was_met(toy):
    chosen = choose_threshold(risk_coverage(*case_arrays(), toy), 0.001)
    assert chosen.summary() == (
        "selective prediction: threshold 0.7500 answers 50.0% of 6 images (coverage at the target) with "
        "dangerous->edible 0.00% of 4 dangerous images (target 0.1%) and 0.0% wrong species among the answered"
        " — NOT shown by validation: with 4 dangerous images the rate's 95% upper bound is 52.7%; more deadly and "
        "poisonous validation photos are needed"
    )
    cases = [(A1, [0.0, 1.0, 0.0, 0.0]), (C1, [0.1, 0.1, 0.0, 0.8])]
    assert "target NOT met" in choose_threshold(risk_coverage(*case_arrays(cases), toy), 0.001).summary()


@pytest.mark.parametrize("threshold", [0.9, 0.75, 0.7, 0.6, 0.5, 0.95])
def test_the_species_answers_at_a_threshold_are_the_curve_at_that_threshold(toy, threshold):
    """answer_outcomes' species answers (what a split's selective figures are) follow the risk-coverage curve."""
    from mushroomclip.evaluation.selective import answer_outcomes
    from mushroomclip.prediction.answer import Thresholds

    probs, labels = case_arrays()
    answers = answer_outcomes(probs, labels, toy, Thresholds(species=threshold))
    species, danger = answers["species"], answers["dangerous_as_edible"]
    curve = risk_coverage(probs, labels, toy)
    if threshold > curve.threshold[0]:  # nothing answered
        assert (species["share"], danger, species["right"]) == (0.0, 0.0, None)
        return
    i = np.flatnonzero(curve.threshold >= threshold)[-1]
    assert (species["share"], danger, 1 - species["right"]) == pytest.approx(
        (curve.coverage[i], curve.danger[i], curve.error[i])
    )


def test_evaluate_max_danger_chooses_on_validation_and_reports_the_evaluated_split(prepared, tmp_path):
    import pandas as pd

    from mushroomclip.evaluation.zeroshot import EvaluationArguments, evaluate

    args = EvaluationArguments(
        data=str(prepared[0]),
        models="tiny-clip",
        text_type="sci",
        templates="single",
        output=str(tmp_path),
        shots="",
        num_workers=0,
        max_danger=0.05,
    )
    [row] = evaluate(args)
    out = tmp_path / "zero_shot/tiny-clip/sci"
    record = json.loads((out / "selective.json").read_text())
    assert row["selective"] == record and record["chosen_on_validation"]["max_danger"] == 0.05
    assert record["chosen_on_validation"]["chosen_on"] == "validation"
    # the test figures are the chosen threshold applied to the test predictions evaluate wrote
    predictions = pd.read_parquet(out / "predictions.parquet")
    assert record["test"]["images"] == len(predictions)
    top1 = np.array([p[0] for p in predictions["top5_probs"]])
    threshold = record["chosen_on_validation"]["species"]
    assert record["test"]["coverage"] == pytest.approx((top1 >= threshold).mean(), abs=1e-6)
    assert threshold >= 0.5  # never bolder than the default
    # one definition of each rate: the selective table's test figures are the answers table's species answers
    assert row["answers"]["thresholds"]["species"] == threshold
    assert record["test"]["coverage"] == row["answers"]["species"]["share"]
    assert record["test"]["dangerous_as_edible"] == row["answers"]["dangerous_as_edible"]
    assert (out / "risk_coverage.png").stat().st_size > 10_000
    assert (
        "## Selective prediction: threshold chosen on validation for dangerous→edible ≤ 5%"
        in (tmp_path / "summary.md").read_text()
    )
    with pytest.raises(ValueError, match=r"--max-danger must be in \[0, 1\)"):
        EvaluationArguments(max_danger=1.5)


# What the answers with back-off give on a labelled split (the benchmark's "answers" table).


def test_answer_outcomes_are_answer_applied_to_every_image():
    """The vectorised count agrees with prediction.answer.answer image by image, at every level."""
    from mushroomclip.evaluation.selective import LEVELS, answer_outcomes
    from mushroomclip.prediction.answer import Thresholds

    full = load_taxonomy()
    taxonomy = full.subset(
        [s.label for s in full.species if s.family in ("Strophariaceae", "Amanitaceae", "Boletaceae", "Agaricaceae")]
    )
    rng = np.random.default_rng(0)
    n = 600
    probs = rng.dirichlet(np.full(len(taxonomy), 0.15), size=n)
    labels = rng.integers(0, len(taxonomy), size=n)
    for thresholds in (Thresholds(0.6, 0.5, family=0.6), Thresholds(0.6, 0.7, unknown=0.8, family=0.5), Thresholds()):
        got = answer_outcomes(probs, labels, taxonomy, thresholds)
        answers = [answer(taxonomy.classes, p, taxonomy, thresholds) for p in probs]
        kinds = np.array([a.kind if a.kind in LEVELS else "abstained" for a in answers])
        truth = [taxonomy.species[y] for y in labels]
        holds = np.array(
            [
                {
                    "species": a.rows[0].species == t.label,
                    "genus": a.headline.startswith(f"{t.genus} sp.,"),
                    "family": a.headline.startswith(f"{t.family} (family),"),
                }.get(a.kind, False)
                for a, t in zip(answers, truth)
            ]
        )
        for level in LEVELS:
            mask = kinds == level
            assert got[level]["share"] == pytest.approx(mask.mean())
            assert got[level]["right"] == (pytest.approx(holds[mask].mean()) if mask.any() else None)
        assert got["abstained"] == pytest.approx((kinds == "abstained").mean())
        assert got["right"] == pytest.approx(holds.mean())
        edible_named = np.array([a.kind == "species" and a.rows[0].edibility == "edible" for a in answers])
        dangerous = np.array([t.edibility in ("deadly", "poisonous") for t in truth])
        assert got["dangerous_as_edible"] == pytest.approx((edible_named & dangerous).sum() / dangerous.sum())
    # the first setting reaches every level, so each branch above was compared
    first = answer_outcomes(probs, labels, taxonomy, Thresholds(0.6, 0.5, family=0.6))
    assert all(first[level]["share"] > 0 for level in LEVELS) and first["abstained"] > 0


def test_answer_outcomes_by_hand(toy):
    from mushroomclip.evaluation.selective import answer_outcomes
    from mushroomclip.prediction.answer import Thresholds

    # at species 0.75, genus 0.85: the A1 at 0.7 on A2 backs off to genus Ab (0.9, right); the B1 at 0.6 on C1
    # and the A2 at 0.5 abstain (no genus or family reaches 0.85); the three above 0.75 are named, all right
    got = answer_outcomes(*case_arrays(), toy, Thresholds(0.75, 0.85, family=0.95))
    assert (got["species"]["share"], got["species"]["right"]) == (pytest.approx(3 / 6), 1.0)
    assert (got["genus"]["share"], got["genus"]["right"]) == (pytest.approx(1 / 6), 1.0)
    assert (got["family"]["share"], got["family"]["right"]) == (0.0, None)
    assert got["abstained"] == pytest.approx(2 / 6) and got["right"] == pytest.approx(4 / 6)
    assert got["dangerous_as_edible"] == 0.0 and got["dangerous_images"] == 4
    # answering every image as a species gives metrics.py's OA and dangerous->edible rate
    everything = answer_outcomes(*case_arrays(), toy, Thresholds(species=1e-9))
    metrics = classification_metrics(*reversed(case_arrays()), 4, taxonomy=toy)
    assert everything["species"]["share"] == 1.0 and everything["species"]["right"] == pytest.approx(metrics["oa"])
    assert everything["dangerous_as_edible"] == pytest.approx(metrics["dangerous_as_edible"])
