"""Held-out species (open set): which species, chosen how, and that training never sees them."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from mushroomclip.config import ConfigError, load_train_config
from mushroomclip.data.holdout import HoldoutError, _allocate, apply_holdout, choose_holdout
from mushroomclip.data.splits import load_splits, prepared_taxonomy
from mushroomclip.taxonomy import load_taxonomy
from tests.test_training import ROOT, tiny_overrides


def test_a_fraction_holds_out_a_stratified_seeded_draw_of_the_species():
    taxonomy = load_taxonomy()
    held = choose_holdout(taxonomy, ["0.1"], seed=0, present=taxonomy.classes)
    assert len(held) == 17  # round(0.1 * 169), as the issue states
    kinds = {taxonomy[c].edibility for c in held}
    assert {"edible", "poisonous", "deadly"} <= kinds
    assert held == [c for c in taxonomy.classes if c in held]  # table order
    assert held == choose_holdout(taxonomy, ["0.1"], seed=0, present=taxonomy.classes)
    assert held != choose_holdout(taxonomy, ["0.1"], seed=1, present=taxonomy.classes)


def test_strata_get_one_each_then_shares_by_size():
    # one each first, then the 6 left in proportion to the species left (4, 1, 0, 5 of 10): 2.4, 0.6, 0, 3.0;
    # floors give 2, 0, 0, 3 and the largest remainder (poisonous, .6) the last one
    assert _allocate({"edible": 5, "poisonous": 2, "deadly": 1, "other": 6}, 10) == {
        "edible": 3,
        "poisonous": 2,
        "deadly": 1,
        "other": 4,
    }
    assert _allocate({"edible": 5, "poisonous": 0, "deadly": 1, "other": 6}, 2) == {
        "edible": 1,
        "poisonous": 0,
        "deadly": 1,
        "other": 0,
    }


def test_a_list_is_taken_as_given_and_bad_entries_are_named():
    taxonomy = load_taxonomy()
    present = ["Amanita muscaria", "Boletus edulis", "Lobaria pulmonaria", "Amanita phalloides"]
    assert choose_holdout(taxonomy, ["Boletus edulis"], 0, present) == ["Boletus edulis"]
    with pytest.raises(HoldoutError, match="Cantharellus cibarius has no training images"):
        choose_holdout(taxonomy, ["Cantharellus cibarius"], 0, present)
    with pytest.raises(ValueError, match="'Boletus edulus' is not in the taxonomy"):
        choose_holdout(taxonomy, ["Boletus edulus"], 0, present)
    with pytest.raises(HoldoutError, match="keep at least 2"):
        choose_holdout(taxonomy, present[:3], 0, present)


def test_config_takes_a_fraction_or_a_list_and_refuses_other_numbers(tmp_path):
    cfg = load_train_config(ROOT / "configs/tiny.yaml", ["data.holdout_species=0.1", "data.holdout_seed=3"])
    assert cfg.data.holdout_species == ["0.1"] and cfg.data.holdout_seed == 3
    cfg = load_train_config(ROOT / "configs/tiny.yaml", ["data.holdout_species=[Boletus edulis, Amanita muscaria]"])
    assert cfg.data.holdout_species == ["Boletus edulis", "Amanita muscaria"]
    with pytest.raises(ConfigError, match=r"data.holdout_species 1.5 must be a fraction in \(0, 1\)"):
        load_train_config(ROOT / "configs/tiny.yaml", ["data.holdout_species=1.5"])

    # evaluation's errors name its own flag
    from mushroomclip.evaluation.zeroshot import EvaluationArguments

    with pytest.raises(ValueError, match=r"^--holdout-species 1.5 must be a fraction in \(0, 1\)"):
        EvaluationArguments(data=str(tmp_path), holdout_species="1.5")


def test_held_out_species_never_reach_training_or_validation(prepared):
    full = prepared_taxonomy(prepared[0])
    splits = load_splits(prepared[0])
    known_splits, holdout = apply_holdout(splits, full, ["0.34"], seed=0)  # 2 of the 6 species
    assert len(holdout.held_out) == 2
    for name in ("train", "validation", "test"):
        known_names = {holdout.known.classes[i] for i in known_splits[name]["label"]}
        assert known_names and not known_names & set(holdout.held_out)
        assert known_splits[name].features["label"].names == holdout.known.classes
        # every image is in exactly one of the two parts, with the same species name it had
        unknown_names = {full.classes[i] for i in holdout.unknown[name]["label"]}
        assert unknown_names == set(holdout.held_out)
        assert len(known_splits[name]) + len(holdout.unknown[name]) == len(splits[name])
        assert sorted([*known_splits[name]["source"], *holdout.unknown[name]["source"]]) == sorted(
            splits[name]["source"]
        )
        assert [holdout.known.classes[i] for i in known_splits[name]["label"]] == known_splits[name]["species"]
    assert len(holdout.known) == len(full) - 2 and holdout.known.raw.count(b"\n") == len(full) - 1


@pytest.fixture(scope="module")
def open_run(prepared, tmp_path_factory):
    """A tiny run with 2 of the 6 species held out: its folder and its open-set threshold."""
    from mushroomclip.training.trainer import run_training

    out = tmp_path_factory.mktemp("runs") / "open"
    overrides = tiny_overrides(prepared[0], out, **{"training.max_steps": 2, "training.eval_steps": 2})
    run_training(load_train_config(ROOT / "configs/tiny.yaml", [*overrides, "data.holdout_species=0.34"]))
    return out


def test_a_run_with_a_hold_out_trains_on_the_known_species_only_and_measures_the_open_set(open_run):
    out = open_run
    record = json.loads((out / "holdout_species.json").read_text())
    classes = json.loads((out / "classes.json").read_text())
    assert len(record["held_out"]) == 2 and record["unknown_images"]["test"] > 0
    assert not set(record["held_out"]) & (set(classes["species"]) | set(classes["trained_species"]))
    assert len(classes["species"]) == 167 and (out / "taxonomy.csv").read_bytes().count(b"\n") == 168
    # the run's own table indexes its class ids: it loads back as a 167-species classifier
    assert len(load_taxonomy(out / "taxonomy.csv")) == 167
    metrics = json.loads((out / "metrics.json").read_text())
    assert np.isfinite(metrics["test"]["miou"]) and Path(out / "README.md").is_file()
    # open set: the known test images against the held-out species' test images, every score, with intervals
    open_set = metrics["open_set"]
    assert open_set["unknown_images"] == record["unknown_images"]["test"] and open_set["held_out"] == record["held_out"]
    assert set(open_set["metrics"]) == {"msp", "max_logit", "energy", "max_cosine"}
    for row in open_set["metrics"].values():
        assert 0 <= row["auroc"] <= 1 and row["ci"]["auroc"][0] <= row["auroc"] <= row["ci"]["auroc"][1]
    assert (out / "open_set_roc.png").stat().st_size > 10_000
    # the threshold predict.py reads, chosen on the known validation images
    threshold = metrics["thresholds"]["unknown"]
    assert threshold["tpr"] == 0.95 and threshold["chosen_on"] == "validation" and 0 < threshold["threshold"] <= 1
    card = (out / "README.md").read_text()
    assert "held out" in card and "AUROC" in card and "n/a%" not in card


def test_a_run_holding_out_the_last_species_of_its_table_finishes(tmp_path):
    """On the real data every species of the table has photos, so a hold-out often includes one whose id is beyond
    the known species' table: the held-out test images carry such ids, and must never reach the known-species
    metrics (where they were out-of-range class ids: the run died after training, writing nothing)."""
    from mushroomclip.data.prepare import PrepareArguments, prepare
    from mushroomclip.data.synthetic import make_synthetic_download
    from mushroomclip.training.trainer import run_training

    full = load_taxonomy()
    deadly = next(s.label for s in full.species if s.edibility == "deadly")
    table = full.subset({full.classes[0], full.classes[60], full.classes[120], full.classes[-1], deadly})
    make_synthetic_download(tmp_path / "download", classes=5, per_class=12, size=32, seed=0, taxonomy=table)
    prepare(PrepareArguments(tmp_path / "download", tmp_path / "prepared", num_proc=1, progress=False))
    last = table.classes[-1]
    assert set(load_splits(tmp_path / "prepared")["test"]["species"]) == set(table.classes)
    assert full.id(last) == len(full) - 1  # the prepared ids index the bundled table: beyond the 168 known
    out = tmp_path / "run"
    overrides = tiny_overrides(tmp_path / "prepared", out, **{"training.max_steps": 2, "training.eval_steps": 2})
    held = [f"data.holdout_species=[{last}]", "run.unknown_tpr=0.8"]
    run_training(load_train_config(ROOT / "configs/tiny.yaml", [*overrides, *held]))
    metrics = json.loads((out / "metrics.json").read_text())
    # run.unknown_tpr sets predict.py's threshold only: the open-set metric stays FPR at 95% TPR, as every model's
    assert metrics["thresholds"]["unknown"]["tpr"] == 0.8 and metrics["open_set"]["tpr"] == 0.95
    assert (
        metrics["open_set"]["held_out"] == [last]
        and len(json.loads((out / "classes.json").read_text())["species"]) == len(full) - 1
    )
    assert metrics["open_set"]["unknown_images"] > 0 and np.isfinite(metrics["open_set"]["metrics"]["msp"]["auroc"])


def csv_rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_a_card_says_an_open_set_threshold_of_a_run_without_hold_out_was_not_measured():
    from mushroomclip.hub import describe_open_set

    assert describe_open_set({"test": {}}) == ""
    unknown = {"score": "msp", "threshold": 0.3, "tpr": 0.95, "chosen_on": "validation", "images": 9}
    text = describe_open_set({"thresholds": {"unknown": unknown}})
    assert text.startswith("\n\nBelow a top-1 probability of 30.0% (chosen on validation to keep 95% of known images)")
    assert text.endswith("was not measured (the run held out none).")


def test_predict_says_when_a_photo_falls_below_the_runs_open_set_threshold(open_run, prepared, capsys, tmp_path):
    import predict

    out = open_run
    threshold = json.loads((out / "metrics.json").read_text())["thresholds"]["unknown"]["threshold"]
    photos = sorted((prepared[0] / "test").rglob("*.jpg"))  # the held-out species too
    csv = tmp_path / "answers.csv"
    argv = [*map(str, photos), "--adapter", str(out), "--format", "json", "--top-k", "1", "--csv", str(csv)]
    assert predict.main(argv) == 0
    records = json.loads(capsys.readouterr().out)
    flags = {r["image"]: r["possibly_unknown"] for r in records}
    # every output gives the same answer: the JSON's is the CSV's (and the app's), genus back-off included
    answers = {row["image"]: (row["kind"], row["answer"]) for row in csv_rows(csv)}
    assert {r["image"]: (r["answer"]["kind"], r["answer"]["text"]) for r in records} == answers
    assert len(answers) == len(photos) and any(flags.values()), flags
    for r in records:  # probabilities are printed rounded: leave out the ones at the threshold
        if abs(r["predictions"][0]["probability"] - threshold) > 1e-3:
            assert flags[r["image"]] == (r["predictions"][0]["probability"] < threshold)


def evaluation_args(prepared, tmp_path, open_run, **changes):
    """evaluate_zero_shot.py's options for tiny-clip and the runs beside ``open_run``, quick settings."""
    from mushroomclip.evaluation.zeroshot import EvaluationArguments

    common = {"models": "tiny-clip", "text_type": "sci", "templates": "single", "shots": "", "num_workers": 0}
    return EvaluationArguments(
        data=str(prepared[0]),
        output=str(tmp_path / "results"),
        include_adapters=str(open_run.parent),
        **common,
        **changes,
    )


def test_zero_shot_and_the_run_are_scored_on_the_same_open_set(open_run, prepared, tmp_path, caplog):
    """evaluate_zero_shot.py --holdout-species draws the run's hold-out again: the zero-shot head lists only the
    known species, the run is picked up by --include-adapters, and its open-set figures are the run's own."""
    from mushroomclip.evaluation.zeroshot import evaluate

    args = evaluation_args(prepared, tmp_path, open_run, holdout_species="0.34")
    with caplog.at_level("INFO", logger="mushroomclip"):
        rows = evaluate(args)
    assert [(r["model"], r["method"]) for r in rows] == [("tiny-clip", "zero-shot"), (f"lora-{open_run.name}", "LoRA")]
    # on the console each model's open-set line stands under that model's report, not above it
    lines = [m.strip().splitlines()[0] for m in caplog.messages if m.strip()]
    headers = [i for i, line in enumerate(lines) if line.endswith(" on test")]
    open_set = [i for i, line in enumerate(lines) if line.startswith("open set (")]
    assert len(headers) == len(open_set) == 2 and headers[0] < open_set[0] < headers[1] < open_set[1], lines
    assert lines[headers[1]] == f"{rows[1]['model']} LoRA adapter (sci, its own 1 template) on test"
    run_metrics = json.loads((open_run / "metrics.json").read_text())
    for row in rows:
        assert set(row["open_set"]) == {"msp", "max_logit", "energy", "max_cosine"}
    for score, metrics in rows[1]["open_set"].items():  # the same model on the same images
        for key in ("auroc", "fpr95", "oscr"):
            assert metrics[key] == pytest.approx(run_metrics["open_set"]["metrics"][score][key], abs=1e-6)
    assert rows[1]["miou"] == pytest.approx(run_metrics["test"]["miou"], abs=1e-6)
    zero_shot = json.loads((tmp_path / "results/zero_shot/tiny-clip/sci/metrics.json").read_text())
    held_out = json.loads((open_run / "holdout_species.json").read_text())["held_out"]
    assert len(zero_shot["metrics"]["confusion"]) == 167  # the known species' head
    assert (tmp_path / "results/zero_shot/tiny-clip/sci/open_set_roc.png").is_file()
    summary = (tmp_path / "results/summary.md").read_text()
    assert "## Open set: known vs held-out species" in summary and "--holdout-species 0.34" in summary
    assert json.loads((tmp_path / "results/zero_shot/tiny-clip/sci/open_set.json").read_text())["held_out"] == held_out


def test_new_species_support_comes_from_their_training_photos_only():
    from mushroomclip.evaluation.novel import generalised_scores, novel_scores

    rng = np.random.default_rng(0)
    train_labels = np.repeat([0, 1, 2, 3], 6)  # 2 and 3 are the new species
    centres = 3 * rng.normal(size=(4, 8))
    train = centres[train_labels] + 0.1 * rng.normal(size=(24, 8))
    query = centres[[0, 2, 3]]  # a known species' photo and one of each new species
    new = np.array([2, 3])
    scores = novel_scores(train, train_labels, query, new, k=1, seed=0, classes=4)
    assert np.isinf(scores[:, [0, 1]]).all() and np.isfinite(scores[:, [2, 3]]).all()  # known species: no centroid
    scores = generalised_scores(train, train_labels, query, new, k=6, seed=0, classes=4)
    assert np.isfinite(scores).all() and list(scores.argmax(axis=1)) == [0, 2, 3]  # k=6: every photo of each


def test_generalised_accuracy_by_hand():
    from mushroomclip.evaluation.novel import generalised_accuracy

    labels = np.array([0, 0, 1, 1, 5, 5, 5, 6])  # 5 and 6 are new
    predicted = np.array([0, 1, 1, 1, 5, 0, 5, 6])  # known: 3 of 4 right; new: 3 of 4
    result = generalised_accuracy(labels, predicted, np.array([5, 6]))
    assert result == {"known_acc": 0.75, "new_acc": 0.75, "harmonic_mean": 0.75}
    result = generalised_accuracy(labels, np.array([0, 0, 1, 1, 0, 0, 0, 0]), np.array([5, 6]))
    assert result == {"known_acc": 1.0, "new_acc": 0.0, "harmonic_mean": 0.0}


def test_novel_command_writes_both_backbones_every_k_and_the_figure(open_run, tmp_path, capsys):
    from mushroomclip.commands.novel import main

    out = tmp_path / "novel"
    argv = ["--run", str(open_run), "--shots", "1,5,10", "--seeds", "2", "--num-workers", "0", "--output", str(out)]
    assert main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    keys = {(r["backbone"], r["setting"], r["k"]) for r in summary["rows"]}
    assert keys == {(b, s, k) for b in ("original", "fine-tuned") for s in ("novel", "generalised") for k in (1, 5, 10)}
    assert summary["notes"] and "pipeline check" in summary["notes"][0]  # tiny-clip: random weights
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["results"]["fine-tuned"]["novel"]["5"]["runs"]) == 2 and "git_commit" in json.dumps(metrics)
    assert (out / "novel_species.png").stat().st_size > 10_000
    assert "## Generalised: known + new species together" in (out / "summary.md").read_text()


def test_novel_on_a_run_without_hold_out_is_one_line(tmp_path, capsys):
    from mushroomclip.commands.novel import main

    (tmp_path / "config.yaml").write_text("data: {path: x}\n")
    assert main(["--run", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith(f"error: {tmp_path} held out no species (no holdout_species.json)")


def test_a_run_left_out_for_its_hold_out_is_told_how_to_join(open_run, prepared, tmp_path):
    """Evaluated without the run's hold-out, the run is skipped with the options that would score it."""
    from mushroomclip.evaluation.zeroshot import evaluate

    args = evaluation_args(prepared, tmp_path, open_run)
    assert [r["model"] for r in evaluate(args)] == ["tiny-clip"]
    summary = (tmp_path / "results/summary.md").read_text()
    assert (
        f"> skipped {open_run}: its 167 classes are not this data's 169-species taxonomy; it held out 2 species "
        "(holdout_species.json): evaluate with --holdout-species 0.34 --holdout-seed 0 to score it"
    ) in summary
