import pytest

from mushroomclip.data.splits import load_splits
from mushroomclip.taxonomy import load_taxonomy

COLUMNS = [
    "image",
    "label",
    "species",
    "kingdom",
    "phylum",
    "class",
    "order",
    "family",
    "genus",
    "common_name",
    "edibility",
    "taxonomy",
    "source",
]


def test_load_splits_gives_documented_columns_and_classlabel_names(prepared):
    out, report = prepared
    splits = load_splits(out)
    tax = load_taxonomy()
    assert set(splits) == {"train", "validation", "test"}
    for name, split in splits.items():
        assert split.column_names == COLUMNS
        assert split.features["label"].names == tax.classes  # all 169: ids are stable across data sets
        assert len(split) == report["images"][name]
    example = splits["test"][0]
    assert example["image"].size == (48, 48)
    assert splits["test"].features["label"].int2str(example["label"]) == example["species"]
    assert example["taxonomy"] == tax.text(example["species"], "taxon")


def test_load_splits_of_a_missing_folder_says_how_to_make_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"not a prepared MushroomCLIP data folder.*prepare_kaggle.py"):
        load_splits(tmp_path / "nothing")
