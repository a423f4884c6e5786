"""The Kaggle "Mushroom species recognition" download: its layout, its CSVs, and which image goes to which split.

Version 2 of the data set::

    ROOT/train.csv, ROOT/val.csv, ROOT/test.csv     image_path,label (image_path under /kaggle/working/)
    ROOT/merged_dataset/<species>/<image>           the photos; <species> equals the CSV label
"""

from __future__ import annotations

import csv
import difflib
import io
import os
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mushroomclip.data.image_jobs import utf8_safe
from mushroomclip.taxonomy import Taxonomy

SPLITS = ("train", "validation", "test")
CSV_FOR_SPLIT = {"train": "train.csv", "validation": "val.csv", "test": "test.csv"}
#: When one image is in several splits it stays in the first of these: the test split never loses images.
PRECEDENCE = ("test", "validation", "train")
IMAGES_DIR = "merged_dataset"
KAGGLE_PREFIX = "/kaggle/working/"


class PrepareError(RuntimeError):
    """The source is not a recognisable Kaggle download, or nothing usable is left."""


@dataclass
class Entry:
    """One unique source image and where it goes."""

    src: Path
    label: str
    split: str
    rows: int = 1  # train.csv rows naming this file (kept as repeats with --keep-oversampling)
    result: dict = field(default_factory=dict)


def reroot(image_path: str, root: Path) -> Path:
    """Map a CSV ``image_path`` onto the local download.

    ``/kaggle/working/merged_dataset/X/1.jpg`` and ``/kaggle/input/any/merged_dataset/X/1.jpg`` ->
    ``root/merged_dataset/X/1.jpg``; relative paths are taken relative to ``root``.
    """
    path = image_path.strip().replace("\\", "/")
    if KAGGLE_PREFIX in path:
        return root / path.split(KAGGLE_PREFIX, 1)[1]
    marker = f"/{IMAGES_DIR}/"
    if marker in f"/{path}":
        return root / IMAGES_DIR / f"/{path}".split(marker, 1)[1]
    return Path(path) if path.startswith("/") else root / path


def find_root(source: Path, split: str) -> Path:
    """The folder holding ``merged_dataset/`` (and the CSVs): ``source`` itself or one level down."""
    if not source.is_dir():
        raise PrepareError(
            f"source folder {source} does not exist; download the data with "
            f"`kaggle datasets download zlatan599/mushroom1/2 -p {source} --unzip` (see docs/data.md)"
        )
    needed = [IMAGES_DIR] + (list(CSV_FOR_SPLIT.values()) if split == "official" else [])
    candidates = [source] + sorted(p for p in source.iterdir() if p.is_dir())
    for root in candidates:
        if all((root / name).exists() for name in needed):
            return root
    found = ", ".join(sorted(p.name for p in source.iterdir())[:10]) or "nothing"
    raise PrepareError(
        f"{source} is not a Kaggle 'Mushroom species recognition' download: expected "
        f"{', '.join(needed)} in it (or in one sub-folder), found {found}"
        + (". Without the CSVs, use --split random." if split == "official" else "")
    )


def _read_csv(path: Path) -> list[dict]:
    # Bytes that are not UTF-8 (a Latin-1 CSV) come through as the same escapes the file system uses,
    # so a path in such a CSV still finds its file; names are made UTF-8-safe on output.
    with path.open(newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
        text = f.read()
    if "\x00" in text:
        raise PrepareError(f"{path} is not a readable CSV (it holds NUL bytes, as UTF-16 text does); save it as UTF-8")
    reader = csv.DictReader(io.StringIO(text, newline=""))
    if not {"image_path", "label"} <= set(reader.fieldnames or []):
        raise PrepareError(
            f"{path} must have the columns image_path,label; found {utf8_safe(','.join(reader.fieldnames or []))}"
        )
    return list(reader)


def _loose(name: str) -> str:
    """A species name with case, underscores and runs of spaces ignored."""
    return " ".join(name.replace("_", " ").split()).casefold()


class Plan:
    """Collects unique entries and everything skipped or merged on the way."""

    def __init__(self, root: Path, taxonomy: Taxonomy, allow_outside_source: bool = False):
        self.root, self.taxonomy = root, taxonomy
        self.allow_outside_source = allow_outside_source
        self.entries: dict[Path, Entry] = {}
        self.skipped: list[dict] = []
        self.duplicates: list[dict] = []
        self.stats: Counter = Counter()
        self._reported: set[tuple[Path, str]] = set()  # (file, reason or split): each fact reported once
        self._lexical_root, self._real_root = os.path.normpath(root), root.resolve()
        self._real_dirs: dict[Path, Path] = {}  # folder -> its resolved path: one resolve per folder
        self._hints: dict[str, str] = {}

    def rel(self, path: Path) -> str:
        """``path`` relative to the download, UTF-8-safe (for metadata and the report)."""
        try:
            return utf8_safe(str(path.relative_to(self.root)))
        except ValueError:
            return utf8_safe(str(path))

    def skip(self, reason: str, path: Path | str, split: str, label: str, detail: str = "") -> None:
        self.skipped.append(
            {
                "reason": reason,
                "path": self.rel(Path(path)),
                "split": split,
                "label": utf8_safe(label),
                "detail": utf8_safe(detail),
            }
        )

    def outside(self, src: Path) -> str | None:
        """Why ``src`` lies outside the download (a path that leads out of it, or a link out of it), or None."""
        if self.allow_outside_source:
            return None
        lexical = Path(os.path.normpath(src))
        if not lexical.is_relative_to(self._lexical_root):
            return f"the path leads out of the download to {lexical}; pass --allow-outside-source to read it"
        if src.parent not in self._real_dirs:
            self._real_dirs[src.parent] = src.parent.resolve()
        real = src.resolve() if src.is_symlink() else self._real_dirs[src.parent] / src.name
        if not real.is_relative_to(self._real_root):
            return f"a link to {real}, outside the download; pass --allow-outside-source to follow it"
        return None

    def _unknown_label_detail(self, label: str) -> str:
        """Says the species is unknown; names the table's species that differs only in case, spacing or spelling."""
        if label not in self._hints:
            same = [c for c in self.taxonomy.classes if _loose(c) == _loose(label)]
            close = same or difflib.get_close_matches(label, self.taxonomy.classes, n=1, cutoff=0.85)
            hint = f"did you mean {close[0]!r}?" if close else "pass --taxonomy FILE to include it"
            self._hints[label] = f"species {utf8_safe(label)!r} is not in {self.taxonomy.source}; {hint}"
        return self._hints[label]

    def report_empty_classes(self, present: set[str]) -> None:
        """Skip-report each known species that has a folder or CSV rows but no usable image left."""
        folders = {p.name for p in (self.root / IMAGES_DIR).iterdir() if p.is_dir()}
        attempted = {e.label for e in self.entries.values()} | (folders & set(self.taxonomy.classes))
        for label in sorted(attempted - present):
            self.skip(
                "empty_class", self.root / IMAGES_DIR / label, "", label, "no usable image of this species in any split"
            )

    def _skip_once(self, reason: str, src: Path, split: str, label: str, detail: str) -> None:
        if (src, reason) not in self._reported:  # a file named by many CSV rows is reported once
            self._reported.add((src, reason))
            self.skip(reason, src, split, label, detail)

    def add(self, src: Path, label: str, split: str) -> None:
        if label not in self.taxonomy:
            self._skip_once("unknown_label", src, split, label, self._unknown_label_detail(label))
            return
        if src not in self.entries and (outside := self.outside(src)):  # a planned file was checked already
            self._skip_once("outside_source", src, split, label, outside)
            return
        known = self.entries.get(src)
        if known is None:
            self.entries[src] = Entry(src, label, split)
        elif known.split == split:
            known.rows += 1
        elif (src, split) not in self._reported:  # one file listed in two splits: keep the higher precedence
            self._reported.add((src, split))
            keep, drop = sorted((known.split, split), key=PRECEDENCE.index)
            self.duplicates.append(
                {
                    "kind": "cross_split",
                    "sha1": None,
                    "kept": self.rel(src),
                    "kept_split": keep,
                    "removed": self.rel(src),
                    "removed_split": drop,
                }
            )
            known.split = keep


def plan_official(root: Path, taxonomy: Taxonomy, allow_outside_source: bool = False) -> Plan:
    plan = Plan(root, taxonomy, allow_outside_source)
    for split in PRECEDENCE:
        rows = _read_csv(root / CSV_FOR_SPLIT[split])
        plan.stats[f"{split}_rows"] = len(rows)
        for line, row in enumerate(rows, start=2):
            image_path, label = (row.get("image_path") or "").strip(), (row.get("label") or "").strip()
            if not image_path or not label:
                plan.skip("bad_csv_row", f"{CSV_FOR_SPLIT[split]}:{line}", split, label, "empty image_path or label")
                continue
            plan.add(reroot(image_path, root), label, split)
    return plan


def _split_sizes(n: int) -> tuple[int, int]:
    """(validation, test) sizes of an 80/10/10 split of n images; every split gets one when n >= 3."""
    n_val = n_test = max(1, round(0.1 * n)) if n >= 3 else 0
    return n_val, n_test


def plan_random(root: Path, taxonomy: Taxonomy, seed: int, allow_outside_source: bool = False) -> Plan:
    """Stratified 80/10/10 split of every file under ``merged_dataset/<species>/``."""
    plan = Plan(root, taxonomy, allow_outside_source)
    for folder in sorted(p for p in (root / IMAGES_DIR).iterdir() if p.is_dir()):
        files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
        # A per-class generator keyed by the class name: adding a class never reshuffles the others.
        order = np.random.default_rng([seed, zlib.crc32(os.fsencode(folder.name))]).permutation(len(files))
        n_val, n_test = _split_sizes(len(files))
        for rank, i in enumerate(order):
            split = "test" if rank < n_test else "validation" if rank < n_test + n_val else "train"
            plan.add(files[i], folder.name, split)
    return plan
