import csv
import importlib.util
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mushroomclip.data.prepare import PrepareArguments, prepare
from mushroomclip.data.splits import load_splits
from mushroomclip.data.synthetic import choose_genus_groups, choose_species, make_synthetic_download
from mushroomclip.evaluation.baselines import colour_histograms, nearest_centroid_scores
from mushroomclip.metrics import classification_metrics
from mushroomclip.taxonomy import load_taxonomy


def test_download_has_the_kaggle_layout(tmp_path):
    manifest = make_synthetic_download(tmp_path / "dl", classes=4, per_class=12, size=16)
    with (tmp_path / "dl" / "train.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["image_path", "label"]
    assert all(r["image_path"].startswith("/kaggle/working/merged_dataset/" + r["label"] + "/") for r in rows)
    assert len(set(Counter(r["label"] for r in rows).values())) == 1  # oversampled to equal counts
    assert len(rows) > manifest["per_split"]["train"]
    assert sorted(p.name for p in (tmp_path / "dl" / "merged_dataset").iterdir()) == manifest["species"]


def test_same_seed_same_bytes(tmp_path):
    make_synthetic_download(tmp_path / "a", classes=3, per_class=5, size=16, seed=4)
    make_synthetic_download(tmp_path / "b", classes=3, per_class=5, size=16, seed=4)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert files and all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)


def test_species_choice_spreads_over_the_table_and_includes_a_deadly_one():
    tax = load_taxonomy()
    picked = choose_species(tax, 6)
    assert len(set(picked)) == 6 and len({tax[s].family for s in picked}) >= 4
    assert any(tax[s].edibility == "deadly" for s in picked)
    with pytest.raises(ValueError, match="--classes must be between 1 and 169"):
        choose_species(tax, 170)


def test_classes_are_learnable_from_pixels(tmp_path):
    make_synthetic_download(tmp_path / "dl", classes=8, per_class=30, size=32, seed=5)
    prepare(PrepareArguments(tmp_path / "dl", tmp_path / "out", num_proc=1, progress=False))
    splits = load_splits(tmp_path / "out")
    train, test = splits["train"], splits["test"]
    scores = nearest_centroid_scores(
        colour_histograms(train["image"]), np.array(train["label"]), colour_histograms(test["image"]), 169
    )
    m = classification_metrics(np.array(test["label"]), scores, 169)
    assert m["oa"] > 0.6  # chance is 1/8


def test_genus_signal_draws_genus_groups_with_a_deadly_species():
    tax = load_taxonomy()
    picked = choose_genus_groups(tax, 8)
    genera = Counter(tax[s].genus for s in picked)
    assert len(picked) == 8 and len(genera) == 4 and set(genera.values()) == {2}
    assert any(tax[s].edibility == "deadly" for s in picked)
    assert choose_species(tax, 8) != picked  # the default choice is untouched
    with pytest.raises(ValueError, match="--classes must be between 2 and 101 with --genus-signal"):
        choose_genus_groups(tax, 102)


def test_genus_signal_gives_each_genus_one_colour_family_in_the_pixels(tmp_path):
    tax = load_taxonomy()
    script = Path(__file__).resolve().parents[1] / "data_scripts" / "make_synthetic.py"
    spec = importlib.util.spec_from_file_location("make_synthetic", script)
    make_synthetic = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_synthetic)
    argv = ["--output", str(tmp_path / "dl"), "--classes", "6", "--per-class", "6", "--size", "32", "--num-proc", "1"]
    assert make_synthetic.main([*argv, "--genus-signal"]) == 0
    manifest = json.loads((tmp_path / "dl" / "synthetic_manifest.json").read_text())
    assert manifest["genus_signal"] == {s: tax[s].genus for s in manifest["species"]}

    def shape_colour(species: str) -> np.ndarray:
        """Mean RGB of the saturated (shape) pixels over a species' images."""
        pixels = np.concatenate(
            [
                np.asarray(Image.open(p).convert("RGB"), dtype=float).reshape(-1, 3)
                for p in (tmp_path / "dl" / "merged_dataset" / species).glob("*.jpg")
            ]
        )
        return pixels[pixels.max(1) - pixels.min(1) > 80].mean(0)

    colours = {s: shape_colour(s) for s in manifest["species"]}
    pairs = [(a, b) for a in colours for b in colours if a < b]
    same = [np.linalg.norm(colours[a] - colours[b]) for a, b in pairs if tax[a].genus == tax[b].genus]
    other = [np.linalg.norm(colours[a] - colours[b]) for a, b in pairs if tax[a].genus != tax[b].genus]
    assert len(same) == 3 and max(same) < min(other)
    assert make_synthetic.main([*argv, "--genus-signal", "--classes", "1"]) == 2
