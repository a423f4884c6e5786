"""The answer a person reads: warnings for dangerous candidates, abstention, genus back-off, several photos
of one find fused into one answer, thresholds a run records, the CSV rows, and uploads that are not kept."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mushroomclip.prediction.answer import Thresholds, answer, csv_row, fuse_log_probs, predictions_csv, run_thresholds
from mushroomclip.taxonomy import load_taxonomy

CLASSES = [
    "Boletus edulis",
    "Boletus reticulatus",
    "Boletus rex-veris",
    "Amanita phalloides",
    "Amanita rubescens",
    "Amanita velosa",
    "Agaricus augustus",
]
DEFAULTS = Thresholds()


@pytest.fixture(scope="module")
def taxonomy():
    return load_taxonomy()


def probs(**by_species: float) -> np.ndarray:
    """A probability vector over CLASSES from ``edulis=0.9``-style keywords (epithets); the rest share what is left."""
    named = {
        c: by_species[c.split()[1].replace("-", "_")] for c in CLASSES if c.split()[1].replace("-", "_") in by_species
    }
    rest = (1 - sum(named.values())) / (len(CLASSES) - len(named))
    return np.array([named.get(c, rest) for c in CLASSES])


def test_confident_species_without_dangerous_candidates_has_no_warning(taxonomy):
    p = probs(edulis=0.9, reticulatus=0.03, rex_veris=0.03, augustus=0.02, rubescens=0.01, phalloides=0.005)
    result = answer(CLASSES, p, taxonomy, DEFAULTS)
    assert result.kind == "species" and result.headline == "Boletus edulis (porcini), 90%"
    assert [r.species for r in result.rows] == CLASSES[:3] + ["Agaricus augustus", "Amanita rubescens"]
    assert result.rows[0].lineage["genus"] == "Boletus" and result.rows[0].edibility == "edible"
    assert result.warning is None


def test_deadly_species_in_top5_warns_even_when_the_answer_is_edible(taxonomy):
    p = probs(edulis=0.9, reticulatus=0.03, rex_veris=0.03, augustus=0.02, phalloides=0.011, rubescens=0.005)
    result = answer(CLASSES, p, taxonomy, DEFAULTS)
    assert result.kind == "species" and result.rows[0].species == "Boletus edulis"
    assert result.warning == (
        "Lookalike of a deadly species (Amanita phalloides: deadly) — never eat on the basis of this app."
    )


def test_poisonous_only_candidates_warn_as_poisonous(taxonomy):
    classes = ["Agaricus augustus", "Agaricus xanthodermus"]
    result = answer(classes, np.array([0.7, 0.3]), taxonomy, DEFAULTS)
    assert result.warning.startswith("Lookalike of a poisonous species (Agaricus xanthodermus: poisonous)")


def test_uncertain_species_backs_off_to_a_certain_genus_naming_its_dangerous_members(taxonomy):
    p = probs(phalloides=0.30, rubescens=0.35, velosa=0.32)  # Amanita 0.97, no species reaches 0.5
    result = answer(CLASSES, p, taxonomy, DEFAULTS)
    assert result.kind == "genus" and math.isclose(result.probability, 0.97)
    assert result.headline == "Amanita sp., 97% — this genus includes Amanita phalloides"
    assert result.dangerous_members == ["Amanita phalloides"] and "deadly" in result.warning


def test_back_off_takes_the_most_probable_genus_even_when_the_top_species_is_elsewhere(taxonomy):
    p = probs(augustus=0.3, phalloides=0.2, rubescens=0.2, velosa=0.2)  # Agaricus is top, Amanita sums 0.6
    result = answer(CLASSES, p, taxonomy, Thresholds(species=0.5, genus=0.6))
    assert result.rows[0].species == "Agaricus augustus"
    assert result.kind == "genus" and result.headline.startswith("Amanita sp., 60%")


def test_uncertain_genus_backs_off_to_a_certain_family_naming_its_dangerous_members(taxonomy):
    # sheathed woodtuft or its deadly lookalike, funeral bell: no species or genus is certain, the family is
    classes = ["Kuehneromyces mutabilis", "Galerina marginata", "Hypholoma fasciculare", "Boletus edulis"]
    p = np.array([0.45, 0.25, 0.15, 0.15])  # Strophariaceae 0.85
    result = answer(classes, p, taxonomy, DEFAULTS)
    assert result.kind == "family" and math.isclose(result.probability, 0.85)
    assert result.headline == (
        "Strophariaceae (family), 85% — this family includes Galerina marginata, Hypholoma fasciculare"
    )
    assert result.dangerous_members == ["Galerina marginata", "Hypholoma fasciculare"]
    assert result.warning.startswith("Lookalike of deadly or poisonous species (Galerina marginata: deadly, Hypholoma")
    # the genus comes first where it is certain, and below the family threshold nothing is named
    assert answer(classes, p, taxonomy, Thresholds(genus=0.45)).headline == "Kuehneromyces sp., 45%"
    assert answer(classes, p, taxonomy, Thresholds(family=0.9)).kind == "not_sure"


def test_below_both_thresholds_the_answer_is_not_sure_and_names_the_closest(taxonomy):
    p = probs(edulis=0.3, phalloides=0.25)  # Boletus sums 0.3 + 2 * 0.09 = 0.48, Amanita 0.43
    result = answer(CLASSES, p, taxonomy, DEFAULTS)
    assert result.kind == "not_sure"
    assert result.headline == "Not sure — do not eat; closest: Boletus edulis (porcini), 30%"
    assert "deadly" in result.warning  # the death cap is still a candidate


def test_thresholds_are_inclusive_and_validated(taxonomy):
    p = probs(edulis=0.5)
    assert answer(CLASSES, p, taxonomy, Thresholds(species=0.5)).kind == "species"
    assert answer(CLASSES, p, taxonomy, Thresholds(species=0.51)).kind != "species"
    with pytest.raises(ValueError, match="species threshold"):
        Thresholds(species=0.0)


def test_below_the_runs_open_set_threshold_the_answer_is_possibly_unknown(taxonomy):
    open_set = Thresholds(unknown=0.7)
    p = probs(edulis=0.6)  # a species answer under the defaults, but below the open-set threshold
    assert answer(CLASSES, p, taxonomy, DEFAULTS).kind == "species"
    result = answer(CLASSES, p, taxonomy, open_set)
    assert result.kind == "unknown"
    assert result.headline == (
        "Possibly not one of the known species — do not eat; closest: Boletus edulis (porcini), 60%"
    )
    assert answer(CLASSES, probs(edulis=0.7), taxonomy, open_set).kind == "species"  # inclusive, as the others
    # a certain genus still backs off (an unknown Amanita is best named "Amanita sp.", its dangerous members listed),
    # saying that the species may be none the model knows
    result = answer(CLASSES, probs(phalloides=0.30, rubescens=0.35, velosa=0.32), taxonomy, open_set)
    assert result.kind == "genus" and result.headline.startswith(
        "Amanita sp., 97%, possibly a species outside the known ones — this genus includes Amanita phalloides"
    )
    assert (
        "possibly"
        not in answer(CLASSES, probs(phalloides=0.30, rubescens=0.35, velosa=0.32), taxonomy, DEFAULTS).headline
    )
    with pytest.raises(ValueError, match="unknown threshold"):
        Thresholds(unknown=1.5)


def test_fusion_is_the_renormalised_mean_of_log_probabilities():
    views = np.log([[0.5, 0.25, 0.25], [0.25, 0.5, 0.25]])
    geometric = np.array([math.sqrt(0.125), math.sqrt(0.125), 0.25])  # per class: sqrt(p1 * p2)
    np.testing.assert_allclose(fuse_log_probs(views), geometric / geometric.sum())
    np.testing.assert_allclose(fuse_log_probs(views[:1]), [0.5, 0.25, 0.25])  # one photo: unchanged


def test_fusion_lets_one_view_veto_a_species():
    views = np.log([[0.6, 0.4 - 1e-9, 1e-9], [1e-9, 0.5, 0.5 - 1e-9]])  # view 2 rules out class 0
    assert np.argmax(fuse_log_probs(views)) == 1


def test_thresholds_come_from_the_run_when_it_records_them(tmp_path):
    assert run_thresholds(tmp_path) == Thresholds()  # no metrics.json
    (tmp_path / "metrics.json").write_text(json.dumps({"oa": 0.5}))
    assert run_thresholds(tmp_path).source.startswith("documented defaults")
    (tmp_path / "metrics.json").write_text(json.dumps({"thresholds": {"species": 0.7, "genus": 0.9}}))
    recorded = run_thresholds(tmp_path)
    assert (recorded.species, recorded.genus) == (0.7, 0.9) and str(tmp_path) in recorded.source
    assert recorded.unknown is None and recorded.family == DEFAULTS.family  # a run from before family back-off
    (tmp_path / "metrics.json").write_text(json.dumps({"thresholds": {"species": 0.7, "genus": 0.9, "family": 0.95}}))
    assert run_thresholds(tmp_path).family == 0.95
    # a --max-danger threshold recorded before targets had a floor never makes answers bolder than the default
    old = {"species": 0.27, "genus": 0.8, "max_danger": 0.001, "coverage": 1.0, "chosen_on": "validation"}
    (tmp_path / "metrics.json").write_text(json.dumps({"thresholds": old}))
    floored = run_thresholds(tmp_path)
    assert (
        floored.species == DEFAULTS.species
        and "0.27 is below the default, so the default 0.5 applies" in floored.source
    )
    missed = old | {"species": 1.0, "dangerous_as_edible": 0.5}  # even answering nothing below 1.0 missed the target
    (tmp_path / "metrics.json").write_text(json.dumps({"thresholds": missed}))
    assert "target NOT met on validation (rate 50.0%)" in run_thresholds(tmp_path).source
    unknown = {"score": "msp", "threshold": 0.42, "tpr": 0.95, "chosen_on": "validation", "images": 9}
    (tmp_path / "metrics.json").write_text(json.dumps({"thresholds": {"unknown": unknown}}))  # run.unknown_tpr only
    recorded = run_thresholds(tmp_path)
    assert (recorded.species, recorded.genus, recorded.unknown) == (DEFAULTS.species, DEFAULTS.genus, 0.42)
    assert recorded.source.startswith("documented defaults; the run")  # species and genus: not the run's own
    assert "unknown-species threshold chosen on validation to keep 95% of known images, recorded by" in recorded.source


def test_predictions_csv_has_one_row_per_image_unreadable_ones_included(tmp_path, taxonomy):
    result = answer(CLASSES, probs(edulis=0.9), taxonomy, DEFAULTS)
    predictions_csv([csv_row("a.jpg", result), csv_row("b.txt", error="not an image")], tmp_path / "p.csv")
    rows = list(csv.DictReader(open(tmp_path / "p.csv")))
    assert [r["image"] for r in rows] == ["a.jpg", "b.txt"]
    assert rows[0]["top_species"].split(";")[0] == "Boletus edulis" and rows[0]["kind"] == "species"
    assert rows[1]["error"] == "not an image" and rows[1]["answer"] == ""
    assert rows[0]["thresholds"] == "species 0.5, genus 0.8, family 0.8" and rows[1]["thresholds"] == ""
    assert rows[0]["thresholds_source"] == DEFAULTS.source
    open_set = answer(CLASSES, probs(edulis=0.9), taxonomy, Thresholds(species=0.6, unknown=0.42, source="mine"))
    assert csv_row("c.jpg", open_set)["thresholds"] == "species 0.6, genus 0.8, family 0.8, unknown 0.42"


@pytest.fixture(scope="module")
def zero_shot():
    from mushroomclip.prediction.identify import load_model

    return load_model("zero-shot:tiny-clip")


def test_several_photos_give_the_fused_answer_and_bad_files_are_listed(zero_shot, tmp_path):
    from mushroomclip.prediction.identify import identify

    classifier, thresholds = zero_shot
    photos = []
    for i, colour in enumerate(["red", "green"]):
        photos.append(tmp_path / f"view{i}.png")
        Image.new("RGB", (40, 30), colour).save(photos[-1])
    (tmp_path / "notes.jpg").write_text("not a photo")
    result, problems = identify(classifier, [*photos, tmp_path / "notes.jpg"], thresholds)
    log_probs = classifier.logits(photos).double().log_softmax(dim=-1).numpy()
    expected = fuse_log_probs(log_probs)
    top = np.argsort(-expected, kind="stable")[:5]
    assert [r.species for r in result.rows] == [classifier.classes[i] for i in top]
    np.testing.assert_allclose([r.probability for r in result.rows], expected[top], rtol=1e-6)
    assert len(problems) == 1 and problems[0].startswith("notes.jpg: not usable as a photo")
    assert identify(classifier, [tmp_path / "notes.jpg"], thresholds)[0] is None


def test_decompression_bombs_are_refused(zero_shot, tmp_path):
    from mushroomclip.prediction.identify import identify

    bomb = tmp_path / "bomb.png"
    Image.new("1", (20000, 10000)).save(bomb)  # 200 M pixels in a few kB: over Pillow's limit
    result, problems = identify(zero_shot[0], [bomb], zero_shot[1])
    assert result is None and "decompression-bomb" in problems[0]


def test_a_folder_that_is_not_a_run_is_refused_by_name(tmp_path):
    from mushroomclip.prediction.identify import load_model

    with pytest.raises(ValueError, match="is not a run folder"):
        load_model(str(tmp_path))


@pytest.fixture(scope="module")
def untrained_run(tmp_path_factory):
    """A LoRA adapter on tiny-clip, saved as the trainer saves one (no training: its answers do not matter)."""
    from mushroomclip.models.backbones import load_backbone
    from mushroomclip.models.classifier import CLASSES_FILE, base_record, classes_record
    from mushroomclip.models.lora import add_lora

    run, taxonomy = tmp_path_factory.mktemp("runs") / "untrained", load_taxonomy()
    model = add_lora(load_backbone("tiny-clip").model, 4, 8, 0.0, ["vision"], ["q_proj"], False)
    model.peft_config["default"].base_model_name_or_path = "tiny-clip"
    model.save_pretrained(str(run), save_embedding_layers=False)
    (run / CLASSES_FILE).write_text(
        json.dumps(classes_record(taxonomy, "sci", ["a photo of {}."], base_record("tiny-clip"), None))
    )
    (run / "taxonomy.csv").write_bytes(taxonomy.raw)
    (run / "metrics.json").write_text(json.dumps({"thresholds": {"species": 0.6, "genus": 0.9}}))
    return run


def test_run_folders_and_hub_adapters_load_with_the_thresholds_they_record(untrained_run, tmp_path, monkeypatch):
    from fake_hub import use_offline_cache, write_snapshot

    from mushroomclip.prediction.identify import find_runs, load_model

    assert find_runs([untrained_run.parent, tmp_path / "absent"]) == [str(untrained_run)]
    classifier, thresholds = load_model(str(untrained_run))
    assert (thresholds.species, thresholds.genus) == (0.6, 0.9) and classifier.classes == load_taxonomy().classes
    cache = use_offline_cache(monkeypatch, tmp_path / "hub")
    files = {p.name: p.read_bytes() for p in untrained_run.iterdir() if p.is_file()}
    snapshot = write_snapshot(cache, "someone/mushroomclip-tiny", files)
    _, hub_thresholds = load_model("someone/mushroomclip-tiny")
    assert (hub_thresholds.species, hub_thresholds.genus) == (0.6, 0.9) and str(snapshot) in hub_thresholds.source


def test_a_model_that_cannot_load_is_a_message_on_the_page(tmp_path):
    from mushroomclip.prediction.identify import load_model
    from mushroomclip.prediction.webapp import model_answer_html

    page = model_answer_html(load_model, str(tmp_path), [])
    assert f"Model {tmp_path} cannot be used: {tmp_path} is not a run folder" in page


def test_answered_uploads_are_deleted_and_nothing_outside_the_upload_folder(tmp_path, monkeypatch):
    pytest.importorskip("gradio")
    from mushroomclip.prediction.webapp import forget_uploads

    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "uploads"))
    upload = tmp_path / "uploads" / "abc123" / "photo.jpg"
    upload.parent.mkdir(parents=True)
    upload.write_bytes(b"x")
    mine = tmp_path / "photo.jpg"
    mine.write_bytes(b"x")
    forget_uploads([str(upload), str(mine)])
    assert not upload.exists() and not upload.parent.exists() and mine.exists()


def test_space_folder_stages_a_runnable_space(tmp_path):
    import importlib.util

    import yaml

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("deploy", root / "spaces" / "deploy.py")
    deploy = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(deploy)
    deploy.stage(tmp_path)
    front = yaml.safe_load((tmp_path / "README.md").read_text().split("---")[1])
    assert front["sdk"] == "gradio" and (tmp_path / front["app_file"]).is_file()
    assert (tmp_path / "mushroomclip" / "prediction" / "webapp.py").is_file() and (
        tmp_path / "requirements.txt"
    ).is_file()
