import csv
import hashlib
import json
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mushroomclip.data.kaggle import PrepareError, reroot
from mushroomclip.data.prepare import PrepareArguments, prepare
from mushroomclip.data.synthetic import UNKNOWN_SPECIES, make_synthetic_download


def read_metadata(out: Path, split: str) -> list[dict]:
    with (out / split / "metadata.csv").open() as f:
        return list(csv.DictReader(f))


def csv_rows(root: Path, name: str) -> list[dict]:
    with (root / name).open() as f:
        return list(csv.DictReader(f))


def output_files(out: Path) -> dict[str, set[str]]:
    return {
        s: {str(p.relative_to(out / s)) for p in (out / s).rglob("*") if p.is_file() and p.name != "metadata.csv"}
        for s in ("train", "validation", "test")
    }


def sha1(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()


@pytest.mark.parametrize(
    ("csv_path", "expected"),
    [
        (
            "/kaggle/working/merged_dataset/Amanita muscaria/4180medium.jpeg",
            "merged_dataset/Amanita muscaria/4180medium.jpeg",
        ),
        ("/kaggle/input/mushrooms/merged_dataset/Amanita muscaria/1.jpg", "merged_dataset/Amanita muscaria/1.jpg"),
        ("merged_dataset/Amanita muscaria/1.jpg", "merged_dataset/Amanita muscaria/1.jpg"),
        ("C:\\data\\merged_dataset\\Amanita muscaria\\1.jpg", "merged_dataset/Amanita muscaria/1.jpg"),
    ],
)
def test_kaggle_paths_are_rerooted_onto_the_local_download(tmp_path, csv_path, expected):
    assert reroot(csv_path, tmp_path) == tmp_path / expected


def test_oversampled_train_csv_is_deduplicated(dirty_download, prepared):
    root, _ = dirty_download
    out, report = prepared
    rows = csv_rows(root, "train.csv")
    per_class = Counter(r["label"] for r in rows if r["label"] != UNKNOWN_SPECIES)
    assert len(set(per_class.values())) == 1  # the fixture really is oversampled like Kaggle's
    unique_paths = {r["image_path"] for r in rows}
    assert report["train_csv_rows"] == len(rows)
    train = read_metadata(out, "train")
    assert len(train) == len({r["file_name"] for r in train})  # no repeated rows
    # every repeat is gone: rows - unique paths, all of which were otherwise usable or skipped
    assert report["oversampling_repeats_removed"] == sum(
        n - 1 for n in Counter(r["image_path"] for r in rows).values() if n > 1
    ) - _repeats_of_skipped(rows, report)
    assert len(train) < len(unique_paths) < len(rows)


def _repeats_of_skipped(rows, report) -> int:
    skipped = {s["path"] for s in report["skipped_items"]} | {d["removed"] for d in report["duplicates"]}
    counts = Counter(r["image_path"].split("/kaggle/working/", 1)[1] for r in rows)
    return sum(counts[p] - 1 for p in skipped if p in counts)


def test_keep_oversampling_repeats_rows_not_files(dirty_download, tmp_path):
    root, _ = dirty_download
    report = prepare(PrepareArguments(root, tmp_path / "out", keep_oversampling=True, num_proc=1, progress=False))
    train = read_metadata(tmp_path / "out", "train")
    kept = {r["source"] for r in train}
    rows = [r["image_path"].split("/kaggle/working/", 1)[1] for r in csv_rows(root, "train.csv")]
    assert len(train) == sum(1 for p in rows if p in kept)  # one metadata row per train.csv row kept
    assert report["oversampling_repeats_removed"] == 0
    assert len(output_files(tmp_path / "out")["train"]) == len(kept)  # but each image stored once


def test_official_split_follows_the_csvs(dirty_download, prepared):
    root, _ = dirty_download
    out, report = prepared
    leaked = {d["removed"] for d in report["duplicates"]}
    skipped = {s["path"] for s in report["skipped_items"]}
    for split, name in (("train", "train.csv"), ("validation", "val.csv"), ("test", "test.csv")):
        expected = {r["image_path"].split("/kaggle/working/", 1)[1] for r in csv_rows(root, name)} - leaked - skipped
        assert {r["source"] for r in read_metadata(out, split)} == expected


def test_metadata_has_the_documented_columns_and_stable_label_ids(prepared):
    from mushroomclip.taxonomy import load_taxonomy

    out, _ = prepared
    tax = load_taxonomy()
    for row in read_metadata(out, "test"):
        assert list(row) == [
            "file_name",
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
        assert int(row["label"]) == tax.id(row["species"])
        assert row["taxonomy"] == tax.text(row["species"], "taxon")
        assert (out / "test" / row["file_name"]).is_file()
    assert (out / "taxonomy.csv").read_bytes() == tax.raw


def test_cross_split_duplicates_stay_only_in_the_higher_precedence_split(dirty_download, prepared):
    _, manifest = dirty_download
    out, report = prepared
    assert report["duplicates_removed"] == {"cross_split": 1, "within_split": 1}
    leak = next(d for d in report["duplicates"] if d["kind"] == "cross_split")
    assert (leak["kept_split"], leak["removed_split"]) == ("test", "train")
    hashes = {split: {sha1(out / split / f) for f in files} for split, files in output_files(out).items()}
    assert not hashes["train"] & hashes["test"] and not hashes["train"] & hashes["validation"]
    assert not hashes["validation"] & hashes["test"]
    assert sum(len(h) for h in hashes.values()) == report["unique_images"]  # no duplicate left anywhere


def test_same_file_listed_in_two_csvs_is_kept_once_in_test(download_copy, tmp_path):
    val = csv_rows(download_copy, "val.csv")
    with (download_copy / "test.csv").open("a", newline="") as f:
        csv.writer(f).writerow([val[0]["image_path"], val[0]["label"]])
    report = prepare(PrepareArguments(download_copy, tmp_path / "out", num_proc=1, progress=False))
    source = val[0]["image_path"].split("/kaggle/working/", 1)[1]
    assert source in {r["source"] for r in read_metadata(tmp_path / "out", "test")}
    assert source not in {r["source"] for r in read_metadata(tmp_path / "out", "validation")}
    assert report["duplicates_removed"]["cross_split"] == 2


def test_every_bad_input_is_skipped_and_reported(dirty_download, prepared):
    _, manifest = dirty_download
    out, report = prepared
    injected = manifest["injected"]
    expected = {
        k: injected[k] for k in ("corrupt_image", "not_an_image", "missing_file", "unknown_label", "empty_class")
    }
    assert report["skipped"] == expected
    on_disk = json.loads((out / "prepare_report.json").read_text())
    assert Counter(s["reason"] for s in on_disk["skipped_items"]) == Counter(expected)
    empty = next(s for s in on_disk["skipped_items"] if s["reason"] == "empty_class")
    assert empty["label"] == injected["empty_class_name"]
    assert all(s["path"] and s["detail"] for s in on_disk["skipped_items"])
    sources = {r["source"] for split in ("train", "validation", "test") for r in read_metadata(out, split)}
    bad = {s["path"] for s in on_disk["skipped_items"] if s["reason"] != "empty_class"}
    assert not sources & bad


def test_bad_csv_rows_are_skipped_not_fatal(download_copy, tmp_path):
    with (download_copy / "val.csv").open("a", newline="") as f:
        csv.writer(f).writerows([["", "Amanita muscaria"], ["/kaggle/working/merged_dataset/x/1.jpg", ""]])
    report = prepare(PrepareArguments(download_copy, tmp_path / "out", num_proc=1, progress=False))
    assert report["skipped"]["bad_csv_row"] == 2


def test_random_split_is_stratified_seeded_and_stable(tmp_path):
    root = tmp_path / "clean"
    make_synthetic_download(root, classes=5, per_class=40, size=16, seed=2)

    def files(seed, name):
        prepare(PrepareArguments(root, tmp_path / name, split="random", seed=seed, num_proc=1, progress=False))
        return {s: {r["source"] for r in read_metadata(tmp_path / name, s)} for s in ("train", "validation", "test")}

    a, b, c = files(42, "a"), files(42, "b"), files(7, "c")
    assert a == b  # same seed, same files
    assert a != c and all(len(a[s]) == len(c[s]) for s in a)
    per_class = Counter(p.parent.name for p in (root / "merged_dataset").rglob("*.jpg"))
    for label, n in per_class.items():
        counts = {s: sum(1 for f in a[s] if f.split("/")[1] == label) for s in a}
        tenth = round(0.1 * n)  # 80/10/10 inside every class
        assert counts == {"train": n - 2 * tenth, "validation": tenth, "test": tenth}


def test_random_split_needs_no_csvs(download_copy, tmp_path):
    for name in ("train.csv", "val.csv", "test.csv"):
        (download_copy / name).unlink()
    with pytest.raises(PrepareError, match="expected merged_dataset, train.csv, val.csv, test.csv.*--split random"):
        prepare(PrepareArguments(download_copy, tmp_path / "out", progress=False))
    report = prepare(PrepareArguments(download_copy, tmp_path / "out", split="random", num_proc=1, progress=False))
    assert report["images"]["test"] > 0


def test_download_one_level_down_is_found(dirty_download, tmp_path):
    wrapper = tmp_path / "unzipped"
    wrapper.mkdir()
    os.symlink(dirty_download[0], wrapper / "mushroom-species")
    report = prepare(PrepareArguments(wrapper, tmp_path / "out", num_proc=1, progress=False))
    assert report["source"] == str(wrapper / "mushroom-species")


def test_unrecognised_layout_and_missing_folder_are_clear_errors(tmp_path):
    (tmp_path / "random_stuff").mkdir()
    with pytest.raises(
        PrepareError, match="not a Kaggle 'Mushroom species recognition' download: expected merged_dataset"
    ):
        prepare(PrepareArguments(tmp_path, tmp_path / "out", progress=False))
    with pytest.raises(PrepareError, match="source folder .*nope does not exist"):
        prepare(PrepareArguments(tmp_path / "nope", tmp_path / "out", progress=False))


def test_nothing_usable_fails_with_the_reasons(tmp_path):
    root = tmp_path / "dl"
    make_synthetic_download(root, classes=2, per_class=3, size=16)
    for image in (root / "merged_dataset").rglob("*.jpg"):
        image.write_bytes(b"not a jpeg")
    with pytest.raises(PrepareError, match=r"no usable images .*\(not_an_image 6\)"):
        prepare(PrepareArguments(root, tmp_path / "out", num_proc=1, progress=False))


def test_custom_taxonomy_admits_an_unknown_species(download_copy, tmp_path):
    from mushroomclip.taxonomy import load_taxonomy

    table = tmp_path / "mine.csv"
    table.write_bytes(
        load_taxonomy().raw
        + b"Fakeus fungus,Fungi,Basidiomycota,Agaricomycetes,Agaricales,Fakeaceae,Fakeus,fake cap,edible,no,\n"
    )
    report = prepare(PrepareArguments(download_copy, tmp_path / "out", taxonomy=table, num_proc=1, progress=False))
    assert "unknown_label" not in report["skipped"]
    row = next(r for r in read_metadata(tmp_path / "out", "train") if r["species"] == UNKNOWN_SPECIES)
    assert int(row["label"]) == 169
    assert (tmp_path / "out" / "taxonomy.csv").read_bytes() == table.read_bytes()


def test_large_and_rotated_images_are_reencoded_small_ones_copied(tmp_path):
    root = tmp_path / "dl"
    make_synthetic_download(root, classes=2, per_class=6, size=32)
    folder = next((root / "merged_dataset").iterdir())
    big = Image.new("RGB", (1200, 800), (200, 30, 30))
    big.save(folder / "00000.jpg")  # listed in train.csv
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    Image.new("RGB", (40, 20), (0, 90, 0)).save(folder / "00001.jpg", exif=exif)
    Image.new("RGBA", (900, 300), (0, 0, 200, 128)).save(folder / "00002.png")
    (folder / "00002.jpg").unlink()
    for name in ("train.csv", "val.csv", "test.csv"):
        text = (root / name).read_text().replace(f"{folder.name}/00002.jpg", f"{folder.name}/00002.png")
        (root / name).write_text(text)
    out = tmp_path / "out"
    report = prepare(PrepareArguments(root, out, max_side=512, num_proc=1, progress=False))
    assert report["reencoded"] == 3
    found = {
        Path(r["source"]).name: out / split / r["file_name"]
        for split in ("train", "validation", "test")
        for r in read_metadata(out, split)
        if folder.name in r["source"]
    }
    assert Image.open(found["00000.jpg"]).size == (512, 341)
    assert Image.open(found["00001.jpg"]).size == (20, 40)  # upright, EXIF applied
    png = found["00002.png"]
    assert png.name == "00002.png.jpg" and Image.open(png).size == (512, 171) and Image.open(png).mode == "RGB"
    assert found["00003.jpg"].read_bytes() == (folder / "00003.jpg").read_bytes()  # small: byte-identical copy


def test_short_side_limit_scales_large_images_down_to_it(tmp_path):
    """--short-side (issue 13: training decodes fewer pixels): an image whose short side is larger is re-encoded with
    that side at the limit, EXIF rotation applied; the tighter of --max-side and --short-side wins; a smaller image
    is copied byte for byte; and a run with another limit re-encodes rather than reusing the first run's files."""
    root = tmp_path / "dl"
    make_synthetic_download(root, classes=2, per_class=6, size=32)
    folder = next((root / "merged_dataset").iterdir())
    Image.new("RGB", (1200, 800), (200, 30, 30)).save(folder / "00000.jpg")
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 600 x 400, shown 400 x 600
    Image.new("RGB", (600, 400), (0, 90, 0)).save(folder / "00001.jpg", exif=exif)
    Image.new("RGB", (300, 200), (0, 0, 90)).save(folder / "00002.jpg")
    out = tmp_path / "out"

    def sizes(**limits) -> dict:
        prepare(PrepareArguments(root, out, num_proc=1, progress=False, **limits))
        found = {
            Path(r["source"]).name: out / split / r["file_name"]
            for split in ("train", "validation", "test")
            for r in read_metadata(out, split)
            if folder.name in r["source"]
        }
        assert found["00003.jpg"].read_bytes() == (folder / "00003.jpg").read_bytes()
        return {name: Image.open(found[name]).size for name in ("00000.jpg", "00001.jpg", "00002.jpg")}

    assert sizes(short_side=256) == {"00000.jpg": (384, 256), "00001.jpg": (256, 384), "00002.jpg": (300, 200)}
    assert sizes(short_side=100) == {"00000.jpg": (150, 100), "00001.jpg": (100, 150), "00002.jpg": (150, 100)}
    assert sizes(max_side=300, short_side=256) == {
        "00000.jpg": (300, 200),
        "00001.jpg": (200, 300),
        "00002.jpg": (300, 200),
    }
    with pytest.raises(ValueError, match="--short-side re-encodes images: it needs --copy-mode resize"):
        PrepareArguments(root, out, short_side=256, copy_mode="copy")


def test_copy_and_link_modes_keep_bytes(dirty_download, tmp_path):
    root, _ = dirty_download
    for mode in ("copy", "link"):
        out = tmp_path / mode
        prepare(PrepareArguments(root, out, copy_mode=mode, num_proc=1, progress=False))
        row = read_metadata(out, "train")[0]
        dest, src = out / "train" / row["file_name"], root / row["source"]
        assert dest.read_bytes() == src.read_bytes()
        assert (os.stat(dest).st_ino == os.stat(src).st_ino) == (mode == "link")


def test_rerun_is_idempotent_and_skips_finished_files(dirty_download, tmp_path):
    root, _ = dirty_download
    out = tmp_path / "out"
    first = prepare(PrepareArguments(root, out, num_proc=2, progress=False))
    before = {s: (out / s / "metadata.csv").read_text() for s in ("train", "validation", "test")}
    files_before = output_files(out)
    second = prepare(PrepareArguments(root, out, num_proc=2, progress=False))
    assert first["processed"] > 0 and first["reused_from_earlier_run"] == 0
    assert second["processed"] == 0 and second["reused_from_earlier_run"] == first["processed"]
    assert {s: (out / s / "metadata.csv").read_text() for s in before} == before
    assert output_files(out) == files_before
    assert second["skipped"] == first["skipped"] and second["images"] == first["images"]


def test_changed_source_file_is_processed_again(download_copy, tmp_path):
    out = tmp_path / "out"
    prepare(PrepareArguments(download_copy, out, num_proc=1, progress=False))
    row = read_metadata(out, "train")[-1]  # a class without injected duplicates
    src = download_copy / row["source"]
    Image.new("RGB", (30, 30), (1, 2, 3)).save(src)
    report = prepare(PrepareArguments(download_copy, out, num_proc=1, progress=False))
    assert (out / "train" / row["file_name"]).read_bytes() == src.read_bytes()
    assert report["processed"] == 1 and report["reused_from_earlier_run"] > 0


def test_duplicate_that_stops_being_one_is_restored(download_copy, tmp_path):
    out = tmp_path / "out"
    first = prepare(PrepareArguments(download_copy, out, num_proc=1, progress=False))
    twin = next(d for d in first["duplicates"] if d["kind"] == "within_split")
    Image.new("RGB", (30, 30), (9, 9, 9)).save(download_copy / twin["kept"])  # the twins now differ
    second = prepare(PrepareArguments(download_copy, out, num_proc=1, progress=False))
    assert second["processed"] == 2  # the changed file, and its former twin written back
    assert "within_split" not in second["duplicates_removed"]
    assert twin["removed"] in {r["source"] for r in read_metadata(out, "train")}
    for split, files in output_files(out).items():
        assert files == {r["file_name"] for r in read_metadata(out, split)}


def test_switching_split_protocol_leaves_no_stale_files(dirty_download, tmp_path):
    root, _ = dirty_download
    out = tmp_path / "out"
    prepare(PrepareArguments(root, out, num_proc=1, progress=False))
    report = prepare(PrepareArguments(root, out, split="random", seed=3, num_proc=1, progress=False))
    assert report["stale_files_removed"] > 0
    for split, files in output_files(out).items():
        assert files == {r["file_name"] for r in read_metadata(out, split)}


def test_report_carries_provenance(prepared):
    out, _ = prepared
    report = json.loads((out / "prepare_report.json").read_text())
    prov = report["provenance"]
    assert prov["config"]["split"] == "official" and prov["seed"] == 42
    assert prov["versions"]["numpy"] == np.__version__ and "git_commit" in prov and prov["taxonomy_sha256"]
