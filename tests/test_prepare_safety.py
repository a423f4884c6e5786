"""prepare loses nothing and claims nothing false: it removes only its own files, one run at a time,
marks a folder complete only at the very end, and reports every odd input as what it is."""

import csv
import fcntl
import importlib.util
import json
import os
import shutil
from pathlib import Path

import pytest
from PIL import Image

import mushroomclip.data.image_jobs as imaging
import mushroomclip.data.prepare as prepare_module
from mushroomclip.data.kaggle import PrepareError
from mushroomclip.data.prepare import LOCK_NAME, PrepareArguments, prepare
from mushroomclip.data.splits import load_splits
from mushroomclip.data.synthetic import make_synthetic_download

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def small_download(tmp_path) -> tuple[Path, dict]:
    """2 clean species, 6-9 images each: small enough for tests that prepare several times."""
    root = tmp_path / "dl"
    return root, make_synthetic_download(root, classes=2, per_class=6, size=32, seed=3)


def options(root: Path, out: Path, **kwargs) -> PrepareArguments:
    return PrepareArguments(root, out, **{"num_proc": 1, "progress": False, **kwargs})


def metadata(out: Path) -> list[dict]:
    rows = []
    for split in ("train", "validation", "test"):
        with (out / split / "metadata.csv").open(encoding="utf-8") as f:
            rows += [r | {"split": split} for r in csv.DictReader(f)]
    return rows


def skipped(report: dict, reason: str) -> list[dict]:
    return [s for s in report["skipped_items"] if s["reason"] == reason]


# 8. prepare removes only files it recorded as its own; a source inside the output is refused.


def test_source_inside_the_output_is_refused_and_left_intact(small_download, tmp_path):
    out = tmp_path / "par2"
    source = Path(shutil.copytree(small_download[0], out / "test" / "kaggle"))
    before = sorted(p for p in source.rglob("*") if p.is_file())
    with pytest.raises(PrepareError, match=r"source .* is inside --output"):
        prepare(options(source, out))
    assert sorted(p for p in source.rglob("*") if p.is_file()) == before
    assert not (out / "test" / "metadata.csv").exists()


def test_output_inside_the_images_folder_is_refused(small_download):
    root, _ = small_download
    with pytest.raises(PrepareError, match="must not be inside the source images folder"):
        prepare(options(root, root / "merged_dataset" / "prepared"))


def test_output_beside_the_images_in_the_download_folder_works(small_download):
    root, _ = small_download  # the README layout: --source data --output data/mushrooms
    report = prepare(options(root, root / "mushrooms"))
    assert report["images"]["test"] > 0 and (root / "merged_dataset").is_dir()


def test_a_users_file_in_the_output_is_never_removed(small_download, tmp_path):
    root, manifest = small_download
    out = tmp_path / "par"
    mine = [out / "train" / "Foo" / "mine.txt", out / "test" / manifest["species"][0] / "mine.jpg"]
    for path in mine:
        path.parent.mkdir(parents=True)
        path.write_text("my own notes")
    first = prepare(options(root, out))
    second = prepare(options(root, out, split="random", seed=5))  # a new protocol: stale images go
    assert all(p.read_text() == "my own notes" for p in mine)
    assert second["stale_files_removed"] > 0
    assert (
        first["unowned_files_left"]
        == second["unowned_files_left"]
        == [
            "test/" + manifest["species"][0] + "/mine.jpg",
            "train/Foo/mine.txt",
        ]
    )
    written = {(r["split"], r["file_name"]) for r in metadata(out)}
    for split in ("train", "validation", "test"):
        on_disk = {str(p.relative_to(out / split)) for p in (out / split).rglob("*") if p.is_file()}
        assert on_disk - {"metadata.csv", "Foo/mine.txt", manifest["species"][0] + "/mine.jpg"} == {
            f for s, f in written if s == split
        }


# 9. One run at a time; the cache never records a failure of the run's own writing; damaged outputs are re-made.


def test_a_second_run_on_a_locked_output_is_one_clear_error(small_download, tmp_path):
    root, _ = small_download
    out = tmp_path / "out"
    out.mkdir()
    with (out / LOCK_NAME).open("a") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # another run is busy with this folder
        with pytest.raises(PrepareError, match=f"another prepare run is writing to {out}"):
            prepare(options(root, out))
    assert not (out / "train").exists()
    assert prepare(options(root, out))["images"]["train"] > 0  # released: the next run goes ahead


def test_the_cli_reports_a_busy_output_in_one_line(small_download, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("prepare_kaggle", ROOT / "data_scripts" / "prepare_kaggle.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    out = tmp_path / "out"
    out.mkdir()
    with (out / LOCK_NAME).open("a") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert cli.main(["--source", str(small_download[0]), "--output", str(out), "--no-progress"]) == 2
    assert (
        capsys.readouterr().err
        == f"error: another prepare run is writing to {out}; wait for it to finish, or choose another --output\n"
    )


def test_a_failed_write_is_an_error_and_never_cached_as_a_bad_image(small_download, tmp_path, monkeypatch):
    root, manifest = small_download
    out = tmp_path / "out"
    real_replace = os.replace
    calls = []

    def racing_replace(src, dst):  # another writer renamed our temporary file away
        calls.append(dst)
        if len(calls) == 3:
            raise FileNotFoundError(2, "No such file or directory", str(src))
        real_replace(src, dst)

    monkeypatch.setattr(imaging.os, "replace", racing_replace)
    with pytest.raises(PrepareError, match="cannot write .*No such file"):
        prepare(options(root, out, max_side=16))  # every image is re-encoded
    monkeypatch.undo()
    report = prepare(options(root, out, max_side=16))
    assert report["skipped"] == {} and report["unique_images"] == manifest["images"]
    assert report["reused_from_earlier_run"] == 2  # written before the failure


def test_a_failure_cached_by_an_older_version_is_not_trusted(small_download, tmp_path):
    root, manifest = small_download
    out = tmp_path / "out"
    out.mkdir()
    path, label = next(csv.reader((root / "val.csv").read_text().splitlines()[1:]))
    src = root / path.split("/kaggle/working/", 1)[1]
    record = {  # what the old race left: a good image cached as corrupt
        "src": str(src),
        "options": "resize:512:90",
        "size": src.stat().st_size,
        "mtime_ns": src.stat().st_mtime_ns,
        "dest_dir": str(out / "validation" / label),
        "result": {"status": "corrupt_image", "detail": "OSError: [Errno 2] No such file or directory"},
    }
    (out / ".prepare_cache.jsonl").write_text(json.dumps(record) + "\n")
    report = prepare(options(root, out))
    assert report["skipped"] == {} and report["unique_images"] == manifest["images"]


def test_a_damaged_output_file_is_made_again(small_download, tmp_path):
    root, _ = small_download
    out = tmp_path / "out"
    prepare(options(root, out))
    row = metadata(out)[0]
    dest, src = out / row["split"] / row["file_name"], root / row["source"]
    dest.write_bytes(src.read_bytes()[:100])  # half-written by a crash or a second writer
    report = prepare(options(root, out))
    assert report["processed"] == 1 and dest.read_bytes() == src.read_bytes()
    assert prepare(options(root, out))["processed"] == 0


# 10. Non-UTF-8 names are kept; the folder counts as complete only once prepare has finished.


@pytest.mark.parametrize("split", ["official", "random"])
def test_a_non_utf8_file_name_is_kept_under_a_utf8_name(small_download, tmp_path, split):
    root, manifest = small_download
    species = manifest["species"][0]
    photo = Path(os.fsdecode(os.fsencode(root / "merged_dataset" / species) + b"/caf\xe9.jpg"))
    Image.new("RGB", (32, 32), (5, 200, 5)).save(photo)
    with (root / "test.csv").open("ab") as f:  # a Latin-1 CSV row naming it
        f.write(b"/kaggle/working/merged_dataset/" + species.encode() + b"/caf\xe9.jpg," + species.encode() + b"\n")
    out = tmp_path / "out"
    report = prepare(options(root, out, split=split))
    row = next(r for r in metadata(out) if "caf" in r["file_name"])
    assert row["file_name"] == f"{species}/caf%E9.jpg" and row["source"] == f"merged_dataset/{species}/caf%E9.jpg"
    assert (out / row["split"] / row["file_name"]).read_bytes() == photo.read_bytes()
    assert report["unique_images"] == manifest["images"] + 1
    splits = load_splits(out)
    assert sum(len(s) for s in splits.values()) == manifest["images"] + 1


def test_two_sources_with_one_output_name_are_reported_not_overwritten(small_download, tmp_path):
    root, manifest = small_download
    species = manifest["species"][0]
    folder = os.fsencode(root / "merged_dataset" / species)
    latin1, literal = Path(os.fsdecode(folder + b"/caf\xe9.jpg")), Path(os.fsdecode(folder + b"/caf%E9.jpg"))
    Image.new("RGB", (32, 32), (5, 200, 5)).save(latin1)
    Image.new("RGB", (32, 32), (200, 5, 5)).save(literal)
    with (root / "test.csv").open("ab") as f:
        for name in (b"caf\xe9.jpg", b"caf%E9.jpg"):
            f.write(
                b"/kaggle/working/merged_dataset/" + species.encode() + b"/" + name + b"," + species.encode() + b"\n"
            )
    out = tmp_path / "out"
    report = prepare(options(root, out))
    [skip] = [s for s in report["skipped_items"] if s["reason"] == "name_collision"]
    assert "is taken by" in skip["detail"]
    rows = [r for r in metadata(out) if "caf" in r["file_name"]]
    assert len(rows) == 1 and report["unique_images"] == manifest["images"] + 1
    assert (out / rows[0]["split"] / rows[0]["file_name"]).read_bytes() in (latin1.read_bytes(), literal.read_bytes())


def test_a_csv_that_is_not_8_bit_text_is_refused_naming_it(small_download, tmp_path):
    root, _ = small_download
    (root / "val.csv").write_text((root / "val.csv").read_text(), encoding="utf-16")
    with pytest.raises(PrepareError, match=r"val.csv is not a readable CSV .*save it as UTF-8"):
        prepare(options(root, tmp_path / "out"))


class Killed(Exception):
    """Stands for a kill in the middle of a run."""


def test_an_interrupted_run_is_refused_by_load_splits(small_download, tmp_path, monkeypatch):
    root, _ = small_download
    out = tmp_path / "out"
    prepare(options(root, out))
    assert len(load_splits(out)["train"]) > 0
    real_write_outputs = prepare_module._write_outputs

    def crash_after_metadata(*args):
        real_write_outputs(*args)
        raise Killed

    monkeypatch.setattr(prepare_module, "_write_outputs", crash_after_metadata)
    with pytest.raises(Killed):
        prepare(options(root, out, split="random"))
    assert (out / "test" / "metadata.csv").is_file()
    with pytest.raises(FileNotFoundError, match=r"incomplete: .*was interrupted or failed.*prepare_kaggle.py"):
        load_splits(out)


# 12. Links and paths that lead out of the source are outside_source, followed only when asked.


def test_a_symlink_out_of_the_source_is_reported_not_followed(small_download, tmp_path):
    root, manifest = small_download
    elsewhere = tmp_path / "holiday.jpg"
    Image.new("RGB", (32, 32), (250, 0, 250)).save(elsewhere)
    link = root / "merged_dataset" / manifest["species"][1] / "zz_link.jpg"
    os.symlink(elsewhere, link)
    report = prepare(options(root, tmp_path / "out", split="random"))
    [item] = skipped(report, "outside_source")
    assert item["path"] == f"merged_dataset/{manifest['species'][1]}/zz_link.jpg" and str(elsewhere) in item["detail"]
    assert not any("zz_link" in r["file_name"] for r in metadata(tmp_path / "out"))
    followed = prepare(options(root, tmp_path / "followed", split="random", allow_outside_source=True))
    assert "outside_source" not in followed["skipped"]
    assert any("zz_link" in r["file_name"] for r in metadata(tmp_path / "followed"))


def test_a_csv_path_leading_out_of_the_source_is_outside_source(small_download, tmp_path):
    root, manifest = small_download
    Image.new("RGB", (32, 32), (250, 0, 250)).save(tmp_path / "secret.jpg")
    with (root / "test.csv").open("a", newline="") as f:
        csv.writer(f).writerow(["/kaggle/working/merged_dataset/../../secret.jpg", manifest["species"][0]])
    report = prepare(options(root, tmp_path / "out"))
    [item] = skipped(report, "outside_source")
    assert item["split"] == "test" and "missing_file" not in report["skipped"]
    assert not any("secret" in r["file_name"] for r in metadata(tmp_path / "out"))


# 17. Near-miss labels get a hint; the report is written even when nothing is usable.


def test_a_label_differing_only_by_case_or_underscores_suggests_the_species(small_download, tmp_path):
    root, manifest = small_download
    species = manifest["species"][0]
    rows = (root / "val.csv").read_text().splitlines()
    near_miss = species.lower().replace(" ", "_")
    (root / "val.csv").write_text("\n".join([rows[0], rows[1].replace(f",{species}", f",{near_miss}"), *rows[2:]]))
    report = prepare(options(root, tmp_path / "out"))
    [item] = skipped(report, "unknown_label")
    assert item["label"] == near_miss and f"did you mean {species!r}?" in item["detail"]


def test_when_nothing_is_usable_the_report_is_still_written(small_download, tmp_path):
    root, _ = small_download
    out = tmp_path / "out"
    prepare(options(root, out))  # a complete earlier run in the same folder
    for name in ("train.csv", "val.csv", "test.csv"):
        rows = list(csv.reader((root / name).read_text().splitlines()))
        with (root / name).open("w", newline="") as f:
            csv.writer(f).writerows([rows[0], *([p, label.upper()] for p, label in rows[1:])])
    with pytest.raises(PrepareError, match=r"no usable images .*unknown_label.*prepare_report.json"):
        prepare(options(root, out))
    report = json.loads((out / "prepare_report.json").read_text())
    assert report["complete"] is False and report["skipped"]["unknown_label"] > 0
    assert all("did you mean" in s["detail"] for s in report["skipped_items"])
    with pytest.raises(FileNotFoundError, match="incomplete"):
        load_splits(out)


def test_a_re_encoded_png_never_overwrites_a_jpeg_named_like_its_output(small_download, tmp_path):
    """``a.png`` too large for ``--max-side`` is written ``a.png.jpg``: a source of that name once lost its file."""
    root, manifest = small_download
    species = manifest["species"][0]
    folder = root / "merged_dataset" / species
    Image.new("RGB", (64, 64), (5, 200, 5)).save(folder / "a.png")  # re-encoded: larger than max_side 48
    Image.new("RGB", (32, 32), (200, 5, 5)).save(folder / "a.png.jpg", format="JPEG")
    with (root / "test.csv").open("a") as f:
        for name in ("a.png", "a.png.jpg"):
            f.write(f"/kaggle/working/merged_dataset/{species}/{name},{species}\n")
    report = prepare(options(root, tmp_path / "out", max_side=48))
    [skip] = [s for s in report["skipped_items"] if s["reason"] == "name_collision"]
    assert skip["path"].endswith("a.png.jpg") and "'a.png.jpg' is taken by" in skip["detail"]
    rows = [r for r in metadata(tmp_path / "out") if r["file_name"].startswith(f"{species}/a.png")]
    assert [r["file_name"] for r in rows] == [f"{species}/a.png.jpg"] and rows[0]["source"].endswith("/a.png")
    # copied byte for byte (no re-encoding), the two names cannot meet: both are kept
    report = prepare(options(root, tmp_path / "copied", copy_mode="copy"))
    assert not [s for s in report["skipped_items"] if s["reason"] == "name_collision"]
