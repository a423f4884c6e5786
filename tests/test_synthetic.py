import csv
from collections import Counter

import numpy as np
import pytest

from mushroomclip.data.prepare import PrepareArguments, prepare
from mushroomclip.data.splits import load_splits
from mushroomclip.data.synthetic import choose_species, make_synthetic_download
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
