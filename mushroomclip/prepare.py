"""Kaggle "Mushroom species recognition" download -> Hugging Face ImageFolder with taxonomy metadata.

Output layout (load it with :func:`mushroomclip.data.load_splits`)::

    OUT/{train,validation,test}/<species>/<image>   images (re-encoded once if larger than --max-side)
    OUT/{train,validation,test}/metadata.csv        file_name, label, species, ranks, common_name, ...
    OUT/taxonomy.csv                                the table the label ids index
    OUT/prepare_report.json                         counts, every skipped file and why, provenance
"""

from __future__ import annotations

import csv
import json
import multiprocessing
import os
import time
import zlib
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from mushroomclip.imaging import COPY_MODES, process_job
from mushroomclip.provenance import run_provenance
from mushroomclip.taxonomy import RANKS, Taxonomy, load_taxonomy

SPLITS = ("train", "validation", "test")
CSV_FOR_SPLIT = {"train": "train.csv", "validation": "val.csv", "test": "test.csv"}
#: When one image is in several splits it stays in the first of these: the test split never loses images.
PRECEDENCE = ("test", "validation", "train")
IMAGES_DIR = "merged_dataset"
KAGGLE_PREFIX = "/kaggle/working/"
CACHE_NAME = ".prepare_cache.jsonl"
METADATA_COLUMNS = ("file_name", "label", "species", *RANKS[:-1], "common_name", "edibility", "taxonomy", "source")


class PrepareError(RuntimeError):
    """The source is not a recognisable Kaggle download, or nothing usable is left."""


@dataclass
class PrepareOptions:
    source: Path
    output: Path
    split: str = "official"
    seed: int = 42
    keep_oversampling: bool = False
    max_side: int = 512
    copy_mode: str = "resize"
    jpeg_quality: int = 90
    num_proc: int = field(default_factory=lambda: os.cpu_count() or 1)
    taxonomy: Path | None = None
    progress: bool = True

    def __post_init__(self):
        self.source, self.output = Path(self.source), Path(self.output)
        if self.split not in ("official", "random"):
            raise ValueError(f"--split must be 'official' or 'random', got {self.split!r}")
        if self.copy_mode not in COPY_MODES:
            raise ValueError(f"--copy-mode must be one of {', '.join(COPY_MODES)}, got {self.copy_mode!r}")
        if self.max_side < 0 or self.num_proc < 1:
            raise ValueError("--max-side must be >= 0 and --num-proc >= 1")


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
        raise PrepareError(f"source folder {source} does not exist; download the data with "
                           "`kaggle datasets download` and unzip it (see README)")
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
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        if not {"image_path", "label"} <= set(reader.fieldnames or []):
            raise PrepareError(f"{path} must have the columns image_path,label; found {','.join(reader.fieldnames or [])}")
        return list(reader)


class _Plan:
    """Collects unique entries and everything skipped or merged on the way."""

    def __init__(self, root: Path, taxonomy: Taxonomy):
        self.root, self.taxonomy = root, taxonomy
        self.entries: dict[Path, Entry] = {}
        self.skipped: list[dict] = []
        self.duplicates: list[dict] = []
        self.stats: Counter = Counter()
        self._reported: set[tuple[Path, str]] = set()  # (file, reason or split): each fact reported once

    def rel(self, path: Path) -> str:
        try:
            return str(path.relative_to(self.root))
        except ValueError:
            return str(path)

    def skip(self, reason: str, path: Path | str, split: str, label: str, detail: str = "") -> None:
        self.skipped.append({"reason": reason, "path": self.rel(Path(path)), "split": split, "label": label, "detail": detail})

    def add(self, src: Path, label: str, split: str) -> None:
        if label not in self.taxonomy:
            if (src, "unknown_label") not in self._reported:
                self._reported.add((src, "unknown_label"))
                self.skip("unknown_label", src, split, label,
                          f"species {label!r} is not in {self.taxonomy.source}; pass --taxonomy FILE to include it")
            return
        known = self.entries.get(src)
        if known is None:
            self.entries[src] = Entry(src, label, split)
        elif known.split == split:
            known.rows += 1
        elif (src, split) not in self._reported:  # one file listed in two splits: keep the higher precedence
            self._reported.add((src, split))
            keep, drop = sorted((known.split, split), key=PRECEDENCE.index)
            self.duplicates.append({"kind": "cross_split", "sha1": None, "kept": self.rel(src), "kept_split": keep,
                                    "removed": self.rel(src), "removed_split": drop})
            known.split = keep


def _plan_official(root: Path, taxonomy: Taxonomy) -> _Plan:
    plan = _Plan(root, taxonomy)
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


def _plan_random(root: Path, taxonomy: Taxonomy, seed: int) -> _Plan:
    """Stratified 80/10/10 split of every file under ``merged_dataset/<species>/``."""
    plan = _Plan(root, taxonomy)
    for folder in sorted(p for p in (root / IMAGES_DIR).iterdir() if p.is_dir()):
        files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
        # A per-class generator keyed by the class name: adding a class never reshuffles the others.
        order = np.random.default_rng([seed, zlib.crc32(folder.name.encode())]).permutation(len(files))
        n_val, n_test = _split_sizes(len(files))
        for rank, i in enumerate(order):
            split = "test" if rank < n_test else "validation" if rank < n_test + n_val else "train"
            plan.add(files[i], folder.name, split)
    return plan


def _load_cache(output: Path, options_key: str) -> dict[str, dict]:
    cache = {}
    path = output / CACHE_NAME
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by an interrupted run
            if record.get("options") == options_key:
                cache[record["src"]] = record
    return cache


def _cached_result(entry: Entry, record: dict | None, dest_dir: Path) -> dict | None:
    if record is None or record["dest_dir"] != str(dest_dir):
        return None
    stat = entry.src.stat()
    if (record["size"], record["mtime_ns"]) != (stat.st_size, stat.st_mtime_ns):
        return None
    result = record["result"]
    return result if result["status"] != "ok" or Path(result["dest"]).exists() else None


def _process(plan: _Plan, opts: PrepareOptions) -> None:
    """Run the per-image work in parallel, reusing results of an earlier run on the same output."""
    options_key = f"{opts.copy_mode}:{opts.max_side}:{opts.jpeg_quality}"
    cache = _load_cache(opts.output, options_key)
    jobs, entries = [], list(plan.entries.values())
    for i, entry in enumerate(entries):
        dest_dir = opts.output / entry.split / entry.label
        if not entry.src.is_file():
            entry.result = {"status": "missing_file", "detail": "file not found"}
            continue
        cached = _cached_result(entry, cache.get(str(entry.src)), dest_dir)
        if cached is not None:
            entry.result = cached
            plan.stats["reused_from_earlier_run"] += 1
        else:
            jobs.append((i, str(entry.src), str(dest_dir), opts.copy_mode, opts.max_side, opts.jpeg_quality))
    if not jobs:
        return
    opts.output.mkdir(parents=True, exist_ok=True)
    with (opts.output / CACHE_NAME).open("a") as log:
        pool = multiprocessing.get_context("fork").Pool(opts.num_proc) if opts.num_proc > 1 else None
        results = pool.imap_unordered(process_job, jobs, chunksize=16) if pool else map(process_job, jobs)
        try:
            for i, result in tqdm(results, total=len(jobs), desc="prepare", unit="img", disable=not opts.progress):
                entry = entries[i]
                entry.result = result
                if result["status"] == "missing_file":
                    continue
                stat = entry.src.stat()
                log.write(json.dumps({"src": str(entry.src), "options": options_key, "size": stat.st_size,
                                      "mtime_ns": stat.st_mtime_ns, "dest_dir": str(opts.output / entry.split / entry.label),
                                      "result": result}) + "\n")
        finally:
            if pool:
                pool.terminate()


def _remove_content_duplicates(plan: _Plan) -> list[Entry]:
    """Keep one copy of each distinct image (by SHA-1), in the split of highest precedence."""
    by_hash: dict[str, list[Entry]] = defaultdict(list)
    for entry in plan.entries.values():
        if entry.result.get("status") == "ok":
            by_hash[entry.result["sha1"]].append(entry)
    kept = []
    for sha1, group in by_hash.items():
        group.sort(key=lambda e: (PRECEDENCE.index(e.split), str(e.src)))
        kept.append(group[0])
        for dup in group[1:]:
            kind = "within_split" if dup.split == group[0].split else "cross_split"
            plan.duplicates.append({"kind": kind, "sha1": sha1, "kept": plan.rel(group[0].src), "kept_split": group[0].split,
                                    "removed": plan.rel(dup.src), "removed_split": dup.split})
            if Path(dup.result["dest"]) != Path(group[0].result["dest"]):
                Path(dup.result["dest"]).unlink(missing_ok=True)
    return kept


def _write_outputs(kept: list[Entry], plan: _Plan, opts: PrepareOptions) -> dict[str, Counter]:
    taxonomy = plan.taxonomy
    per_split: dict[str, list[dict]] = {s: [] for s in SPLITS}
    for entry in sorted(kept, key=lambda e: e.result["dest"]):
        s = taxonomy[entry.label]
        row = {"file_name": str(Path(entry.result["dest"]).relative_to(opts.output / entry.split)),
               "label": taxonomy.id(entry.label), "species": entry.label,
               **dict(zip(RANKS[:-1], s.lineage[:-1])), "common_name": s.common_name, "edibility": s.edibility,
               "taxonomy": taxonomy.text(entry.label, "taxon"), "source": plan.rel(entry.src)}
        repeats = entry.rows if (opts.keep_oversampling and entry.split == "train") else 1
        per_split[entry.split].extend([row] * repeats)
    counts = {}
    for split, rows in per_split.items():
        (opts.output / split).mkdir(parents=True, exist_ok=True)
        with (opts.output / split / "metadata.csv").open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=METADATA_COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
        counts[split] = Counter(row["species"] for row in rows)
    (opts.output / "taxonomy.csv").write_bytes(taxonomy.raw)
    return counts


def _remove_stale_files(kept: list[Entry], opts: PrepareOptions) -> int:
    """Delete images left in OUT/<split>/ by an earlier run that this run does not keep."""
    wanted = {Path(e.result["dest"]) for e in kept}
    removed = 0
    for split in SPLITS:
        for path in sorted((opts.output / split).rglob("*"), reverse=True):
            if path.is_file() and path.name != "metadata.csv" and path not in wanted:
                path.unlink()
                removed += 1
            elif path.is_dir() and not any(path.iterdir()):
                path.rmdir()
    return removed


def prepare(opts: PrepareOptions) -> dict:
    """Prepare the ImageFolder at ``opts.output``; returns the report also written to prepare_report.json."""
    start = time.perf_counter()
    taxonomy = load_taxonomy(opts.taxonomy)
    root = find_root(opts.source, opts.split)
    if opts.output.resolve() == root.resolve() or root.resolve() in opts.output.resolve().parents:
        raise PrepareError(f"--output {opts.output} must not be inside the source folder {root}")
    plan = _plan_official(root, taxonomy) if opts.split == "official" else _plan_random(root, taxonomy, opts.seed)
    _process(plan, opts)
    for entry in plan.entries.values():
        if entry.result["status"] != "ok":
            plan.skip(entry.result["status"], entry.src, entry.split, entry.label, entry.result.get("detail", ""))
    kept = _remove_content_duplicates(plan)
    if not kept:
        raise PrepareError(f"no usable images in {root}: {len(plan.skipped)} skipped "
                           f"({', '.join(f'{k} {v}' for k, v in Counter(s['reason'] for s in plan.skipped).items())})")
    counts = _write_outputs(kept, plan, opts)
    stale = _remove_stale_files(kept, opts)

    folders = {p.name for p in (root / IMAGES_DIR).iterdir() if p.is_dir()}
    attempted = {e.label for e in plan.entries.values()} | (folders & set(taxonomy.classes))
    present = {label for c in counts.values() for label in c}
    for label in sorted(attempted - present):
        plan.skip("empty_class", root / IMAGES_DIR / label, "", label, "no usable image of this species in any split")
    elapsed = time.perf_counter() - start
    reasons = Counter(s["reason"] for s in plan.skipped)
    report = {
        "source": str(root), "output": str(opts.output), "split": opts.split,
        "images": {split: sum(c.values()) for split, c in counts.items()},
        "unique_images": len(kept),
        "classes": {split: len(c) for split, c in counts.items()} | {"all": len(present)},
        "classes_missing_from_split": {split: sorted(present - set(c)) for split, c in counts.items() if present - set(c)},
        "train_csv_rows": plan.stats.get("train_rows"),
        "oversampling_repeats_removed": 0 if opts.keep_oversampling else sum(e.rows - 1 for e in kept if e.split == "train"),
        "duplicates_removed": dict(Counter(d["kind"] for d in plan.duplicates)),
        "reencoded": sum(bool(e.result.get("reencoded")) for e in kept),
        "reused_from_earlier_run": plan.stats["reused_from_earlier_run"],
        "stale_files_removed": stale,
        "skipped": dict(reasons),
        "skipped_items": plan.skipped,
        "duplicates": plan.duplicates,
        "seconds": round(elapsed, 2),
        "images_per_second": round(len(plan.entries) / elapsed, 1) if elapsed > 0 else None,
        "provenance": run_provenance({k: str(v) if isinstance(v, Path) else v for k, v in asdict(opts).items()}, opts.seed)
        | {"taxonomy_sha256": taxonomy.fingerprint},
    }
    (opts.output / "prepare_report.json").write_text(json.dumps(report, indent=2))
    return report


def format_summary(report: dict) -> str:
    """The table printed at the end of a run."""
    out = [f"Prepared {report['output']} ({report['split']} split of {report['source']})", "",
           f"{'split':<12}{'images':>9}{'classes':>9}"]
    for split in SPLITS:
        out.append(f"{split:<12}{report['images'][split]:>9}{report['classes'][split]:>9}")
    out.append(f"{'total':<12}{sum(report['images'].values()):>9}{report['classes']['all']:>9}")
    out.append("")
    if report["train_csv_rows"] is not None:
        out.append(f"train.csv rows: {report['train_csv_rows']}; oversampling repeats removed: "
                   f"{report['oversampling_repeats_removed']}")
    dups = report["duplicates_removed"]
    out.append(f"exact duplicates removed: {sum(dups.values())}" + (f" ({', '.join(f'{k} {v}' for k, v in dups.items())})" if dups else ""))
    skipped = report["skipped"]
    out.append(f"skipped: {sum(skipped.values())}" + (f" ({', '.join(f'{k} {v}' for k, v in sorted(skipped.items()))})" if skipped else ""))
    for split, missing in report["classes_missing_from_split"].items():
        out.append(f"warning: {len(missing)} class(es) have no {split} image: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    out.append(f"re-encoded: {report['reencoded']}; reused from an earlier run: {report['reused_from_earlier_run']}; "
               f"stale files removed: {report['stale_files_removed']}")
    out.append(f"time: {report['seconds']:.1f} s ({report['images_per_second']} source images/s); "
               f"details in {Path(report['output']) / 'prepare_report.json'}")
    return "\n".join(out)
