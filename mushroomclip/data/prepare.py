"""Kaggle "Mushroom species recognition" download -> Hugging Face ImageFolder with taxonomy metadata.

Output layout (load it with :func:`mushroomclip.data.splits.load_splits`)::

    OUT/{train,validation,test}/<species>/<image>   images (re-encoded once if larger than --max-side)
    OUT/{train,validation,test}/metadata.csv        file_name, label, species, ranks, common_name, ...
    OUT/taxonomy.csv                                the table the label ids index
    OUT/prepare_report.json                         counts, every skipped file and why, provenance;
                                                    written last: ``"complete": true`` marks a finished folder
    OUT/.prepare_cache.jsonl                        per-file results: makes re-runs fast, and records which
                                                    files prepare wrote (the only ones it ever removes)
    OUT/.prepare.lock                               held while a run writes: one run per folder at a time
"""

from __future__ import annotations

import csv
import fcntl
import io
import json
import multiprocessing
import os
import re
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from mushroomclip.data.image_jobs import COPY_MODES, output_names, process_job, utf8_safe, write_atomically
from mushroomclip.data.kaggle import (
    IMAGES_DIR,
    PRECEDENCE,
    SPLITS,
    Entry,
    Plan,
    PrepareError,
    find_root,
    plan_official,
    plan_random,
)
from mushroomclip.data.splits import REPORT_NAME
from mushroomclip.provenance import run_provenance
from mushroomclip.taxonomy import RANKS, load_taxonomy

CACHE_NAME = ".prepare_cache.jsonl"
LOCK_NAME = ".prepare.lock"
PARTIAL_FILE = re.compile(r"(.+?)(\.\d+)?\.part")  # write_atomically's temporary "NAME.PID.part"
METADATA_COLUMNS = ("file_name", "label", "species", *RANKS[:-1], "common_name", "edibility", "taxonomy", "source")


@dataclass
class PrepareArguments:
    """The options of a prepare run (the flags of `mushroomclip prepare`), checked once, here."""

    source: Path
    output: Path
    split: str = "official"
    seed: int = 42
    keep_oversampling: bool = False
    max_side: int = 512
    short_side: int = 0
    copy_mode: str = "resize"
    jpeg_quality: int = 90
    num_proc: int = field(default_factory=lambda: os.cpu_count() or 1)
    taxonomy: Path | None = None
    allow_outside_source: bool = False
    progress: bool = True

    def __post_init__(self):
        self.source, self.output = Path(self.source), Path(self.output)
        if self.split not in ("official", "random"):
            raise ValueError(f"--split must be 'official' or 'random', got {self.split!r}")
        if self.copy_mode not in COPY_MODES:
            raise ValueError(f"--copy-mode must be one of {', '.join(COPY_MODES)}, got {self.copy_mode!r}")
        if self.max_side < 0 or self.short_side < 0 or self.num_proc < 1:
            raise ValueError("--max-side and --short-side must be >= 0, and --num-proc >= 1")
        if self.short_side and self.copy_mode != "resize":
            raise ValueError(f"--short-side re-encodes images: it needs --copy-mode resize, not {self.copy_mode}")


def _load_cache(output: Path, options_key: str) -> tuple[dict[str, dict], set[str]]:
    """Earlier results for these options, by source path; and every output file any earlier run wrote."""
    cache, written = {}, set()
    path = output / CACHE_NAME
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by an interrupted run
            if "dest" in record["result"]:
                written.add(os.path.abspath(record["result"]["dest"]))
            if record.get("options") == options_key:
                cache[record["src"]] = record
    return cache, written


def _output_intact(result: dict) -> bool:
    """Whether the output file of ``result`` is still the one written (same size and time)."""
    try:
        stat = os.stat(result["dest"])
    except OSError:
        return False
    return (stat.st_size, stat.st_mtime_ns) == (result.get("dest_size"), result.get("dest_mtime_ns"))


def _cached_result(entry: Entry, record: dict | None, dest_dir: Path) -> dict | None:
    """The earlier result for this file if it is unchanged and was headed for the same folder."""
    if record is None or record["dest_dir"] != str(dest_dir):
        return None
    stat = entry.src.stat()
    return record["result"] if (record["size"], record["mtime_ns"]) == (stat.st_size, stat.st_mtime_ns) else None


def _run_jobs(entries: list[Entry], opts: PrepareArguments, options_key: str, desc: str) -> None:
    """Process ``entries`` in parallel, logging each result to the cache as it arrives (so an
    interrupted run resumes where it stopped)."""
    jobs = [
        (
            i,
            str(e.src),
            str(opts.output / e.split / e.label),
            opts.copy_mode,
            opts.max_side,
            opts.jpeg_quality,
            opts.short_side,
        )
        for i, e in enumerate(entries)
    ]
    opts.output.mkdir(parents=True, exist_ok=True)
    with (opts.output / CACHE_NAME).open("a") as log:
        pool = multiprocessing.get_context("fork").Pool(opts.num_proc) if opts.num_proc > 1 and len(jobs) > 1 else None
        results = pool.imap_unordered(process_job, jobs, chunksize=16) if pool else map(process_job, jobs)
        try:
            for i, result in tqdm(results, total=len(jobs), desc=desc, unit="img", disable=not opts.progress):
                entry = entries[i]
                entry.result = result
                if result["status"] == "write_error":  # the run's own failure, not the source's: never cached
                    raise PrepareError(f"{result['detail']}; free some space or fix the permissions, then re-run")
                if result["status"] == "missing_file":
                    continue
                stat = entry.src.stat()
                log.write(
                    json.dumps(
                        {
                            "src": str(entry.src),
                            "options": options_key,
                            "size": stat.st_size,
                            "mtime_ns": stat.st_mtime_ns,
                            "dest_dir": str(opts.output / entry.split / entry.label),
                            "result": result,
                        }
                    )
                    + "\n"
                )
        finally:
            if pool:
                pool.terminate()


def _options_key(opts: PrepareArguments) -> str:
    # "2:": results cached before write errors were told apart from bad images are not trusted.
    short = f":short{opts.short_side}" if opts.short_side else ""  # the keys of runs without it stay as they were
    return f"2:{opts.copy_mode}:{opts.max_side}:{opts.jpeg_quality}{short}"


def _skip_name_collisions(plan: Plan, copy_mode: str) -> None:
    """Report, never overwrite, a source whose output name another source of the same species and split takes
    (``caf%E9.jpg`` beside a non-UTF-8 ``caf\xe9.jpg``, which is written ``caf%E9.jpg``; in ``resize`` mode
    ``a.png.jpg`` beside ``a.png``, which is written ``a.png.jpg`` when it is re-encoded)."""
    taken: dict[tuple[str, str, str], Entry] = {}
    for entry in sorted(plan.entries.values(), key=lambda e: str(e.src)):
        keys = [(entry.split, entry.label, name) for name in output_names(entry.src.name, copy_mode)]
        if owner := next((taken[key] for key in keys if key in taken), None):
            name = next(key[2] for key in keys if key in taken)
            detail = f"its output name {name!r} is taken by {plan.rel(owner.src)}; rename one of the two files"
            plan.skip("name_collision", entry.src, entry.split, entry.label, detail)
            del plan.entries[entry.src]
            continue
        taken |= dict.fromkeys(keys, entry)


def _process(plan: Plan, opts: PrepareArguments, cache: dict[str, dict]) -> None:
    """Validate, hash and place every entry, reusing results of an earlier run on the same output."""
    todo = []
    for entry in plan.entries.values():
        if not entry.src.is_file():
            entry.result = {"status": "missing_file", "detail": "file not found"}
            continue
        cached = _cached_result(entry, cache.get(str(entry.src)), opts.output / entry.split / entry.label)
        if cached is None:
            todo.append(entry)
        else:
            entry.result = cached
            plan.stats["reused_from_earlier_run"] += 1
    plan.stats["processed"] = len(todo)
    if todo:
        _run_jobs(todo, opts, _options_key(opts), "prepare")


def _remake_missing(kept: list[Entry], plan: Plan, opts: PrepareArguments) -> None:
    """Re-create kept images whose output file is gone or changed (deleted or damaged by hand or by a
    crash, or removed as the duplicate of a file that has since changed)."""
    missing = [e for e in kept if not _output_intact(e.result)]
    if missing:
        _run_jobs(missing, opts, _options_key(opts), "restore")
        plan.stats["processed"] += len(missing)


def _remove_content_duplicates(plan: Plan) -> list[Entry]:
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
            plan.duplicates.append(
                {
                    "kind": kind,
                    "sha1": sha1,
                    "kept": plan.rel(group[0].src),
                    "kept_split": group[0].split,
                    "removed": plan.rel(dup.src),
                    "removed_split": dup.split,
                }
            )
            if Path(dup.result["dest"]) != Path(group[0].result["dest"]):
                Path(dup.result["dest"]).unlink(missing_ok=True)
    return kept


def _write_outputs(kept: list[Entry], plan: Plan, opts: PrepareArguments) -> dict[str, Counter]:
    taxonomy = plan.taxonomy
    per_split: dict[str, list[dict]] = {s: [] for s in SPLITS}
    for entry in sorted(kept, key=lambda e: e.result["dest"]):
        s = taxonomy[entry.label]
        row = {
            "file_name": str(Path(entry.result["dest"]).relative_to(opts.output / entry.split)),
            "label": taxonomy.id(entry.label),
            "species": entry.label,
            **dict(zip(RANKS[:-1], s.lineage[:-1])),
            "common_name": s.common_name,
            "edibility": s.edibility,
            "taxonomy": taxonomy.text(entry.label, "taxon"),
            "source": plan.rel(entry.src),
        }
        repeats = entry.rows if (opts.keep_oversampling and entry.split == "train") else 1
        per_split[entry.split].extend([row] * repeats)
    counts = {}
    for split, rows in per_split.items():
        (opts.output / split).mkdir(parents=True, exist_ok=True)
        text = io.StringIO(newline="")
        writer = csv.DictWriter(text, fieldnames=METADATA_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
        write_atomically(opts.output / split / "metadata.csv", text.getvalue().encode("utf-8"))
        counts[split] = Counter(row["species"] for row in rows)
    write_atomically(opts.output / "taxonomy.csv", taxonomy.raw)
    return counts


def _remove_stale_files(kept: list[Entry], written: set[str], opts: PrepareArguments) -> tuple[int, list[str]]:
    """Delete files in OUT/<split>/ that a run of prepare wrote (``written``) and this run does not keep.

    Returns the number removed and every other file found there (not prepare's: left in place).
    """
    wanted = {os.path.abspath(e.result["dest"]) for e in kept}
    ours = written | wanted
    removed, unowned = 0, []
    for split in SPLITS:
        folder = opts.output / split
        for path in sorted(folder.rglob("*")):
            name = os.path.abspath(path)
            if path.is_dir() or path == folder / "metadata.csv" or name in wanted:
                continue
            partial = PARTIAL_FILE.fullmatch(path.name)
            if name in ours or (partial and os.path.join(os.path.dirname(name), partial[1]) in ours):
                path.unlink()
                removed += 1
                if path.parent != folder and not any(path.parent.iterdir()):
                    path.parent.rmdir()
            else:
                unowned.append(utf8_safe(str(path.relative_to(opts.output))))
    return removed, sorted(unowned)


def _refuse_overlap(opts: PrepareArguments, root: Path) -> None:
    """Refuse an output that holds the download, or lies among its images: prepare would read what it writes."""
    output = opts.output.resolve()
    for source in {opts.source, root}:
        if source.resolve().is_relative_to(output):
            raise PrepareError(
                f"the source {source} is inside --output {opts.output}; choose an --output folder outside the download"
            )
    if output.is_relative_to((root / IMAGES_DIR).resolve()):
        raise PrepareError(
            f"--output {opts.output} must not be inside the source images folder {root / IMAGES_DIR}; "
            "choose a folder outside it"
        )


@contextmanager
def _exclusive_lock(output: Path) -> Iterator[None]:
    """Hold OUT/.prepare.lock while a run writes; the system releases it when the process ends, even on kill -9."""
    output.mkdir(parents=True, exist_ok=True)
    with (output / LOCK_NAME).open("a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise PrepareError(
                f"another prepare run is writing to {output}; wait for it to finish, or choose another --output"
            ) from None
        yield


def _save_report(report: dict, output: Path) -> None:
    write_atomically(output / REPORT_NAME, json.dumps(report, indent=2).encode("utf-8"))


def prepare(opts: PrepareArguments) -> dict:
    """Prepare the ImageFolder at ``opts.output``; returns the report also written to prepare_report.json.

    The report is written last, with ``"complete": true`` only when every step has finished, and is also
    written (``"complete": false``) when nothing usable is left.
    """
    start = time.perf_counter()
    taxonomy = load_taxonomy(opts.taxonomy)
    root = find_root(opts.source, opts.split)
    _refuse_overlap(opts, root)
    with _exclusive_lock(opts.output):
        (opts.output / REPORT_NAME).unlink(missing_ok=True)  # complete again only when this run finishes
        if opts.split == "official":
            plan = plan_official(root, taxonomy, opts.allow_outside_source)
        else:
            plan = plan_random(root, taxonomy, opts.seed, opts.allow_outside_source)
        _skip_name_collisions(plan, opts.copy_mode)
        cache, written = _load_cache(opts.output, _options_key(opts))
        _process(plan, opts, cache)
        for entry in plan.entries.values():
            if entry.result["status"] != "ok":
                plan.skip(entry.result["status"], entry.src, entry.split, entry.label, entry.result.get("detail", ""))
        kept = _remove_content_duplicates(plan)
        _remake_missing(kept, plan, opts)
        if not kept:
            reasons = Counter(s["reason"] for s in plan.skipped)
            error = (
                f"no usable images in {root}: {len(plan.skipped)} skipped "
                f"({', '.join(f'{k} {v}' for k, v in reasons.items())})"
            )
            _save_report(
                _report(plan, opts, root, kept, {s: Counter() for s in SPLITS}, start, error=error), opts.output
            )
            raise PrepareError(f"{error}; each skipped file and why is in {opts.output / REPORT_NAME}")
        counts = _write_outputs(kept, plan, opts)
        written |= {os.path.abspath(e.result["dest"]) for e in plan.entries.values() if "dest" in e.result}
        stale, unowned = _remove_stale_files(kept, written, opts)
        plan.report_empty_classes({label for c in counts.values() for label in c})
        report = _report(plan, opts, root, kept, counts, start, stale=stale, unowned=unowned)
        _save_report(report, opts.output)  # last: marks the folder complete
    return report


def _report(
    plan: Plan,
    opts: PrepareArguments,
    root: Path,
    kept: list[Entry],
    counts: dict[str, Counter],
    start: float,
    stale: int = 0,
    unowned: list[str] | None = None,
    error: str | None = None,
) -> dict:
    """The content of prepare_report.json; ``complete`` is true only without ``error``."""
    present = {label for c in counts.values() for label in c}
    elapsed = time.perf_counter() - start
    return {
        "complete": error is None,
        **({"error": error} if error else {}),
        "source": utf8_safe(str(root)),
        "output": utf8_safe(str(opts.output)),
        "split": opts.split,
        "images": {split: sum(c.values()) for split, c in counts.items()},
        "unique_images": len(kept),
        "classes": {split: len(c) for split, c in counts.items()} | {"all": len(present)},
        "classes_missing_from_split": {
            split: sorted(present - set(c)) for split, c in counts.items() if present - set(c)
        },
        "train_csv_rows": plan.stats.get("train_rows"),
        "oversampling_repeats_removed": 0
        if opts.keep_oversampling
        else sum(e.rows - 1 for e in kept if e.split == "train"),
        "duplicates_removed": dict(Counter(d["kind"] for d in plan.duplicates)),
        "reencoded": sum(bool(e.result.get("reencoded")) for e in kept),
        "processed": plan.stats["processed"],
        "reused_from_earlier_run": plan.stats["reused_from_earlier_run"],
        "stale_files_removed": stale,
        "unowned_files_left": unowned or [],
        "skipped": dict(Counter(s["reason"] for s in plan.skipped)),
        "skipped_items": plan.skipped,
        "duplicates": plan.duplicates,
        "seconds": round(elapsed, 2),
        "images_per_second": round(len(plan.entries) / elapsed, 1) if elapsed > 0 else None,
        "provenance": run_provenance(
            {k: utf8_safe(str(v)) if isinstance(v, Path) else v for k, v in asdict(opts).items()}, opts.seed
        )
        | {"taxonomy_sha256": plan.taxonomy.fingerprint},
    }


def format_summary(report: dict) -> str:
    """The table printed at the end of a run."""
    out = [
        f"Prepared {report['output']} ({report['split']} split of {report['source']})",
        "",
        f"{'split':<12}{'images':>9}{'classes':>9}",
    ]
    for split in SPLITS:
        out.append(f"{split:<12}{report['images'][split]:>9}{report['classes'][split]:>9}")
    out.append(f"{'total':<12}{sum(report['images'].values()):>9}{report['classes']['all']:>9}")
    out.append("")
    if report["train_csv_rows"] is not None:
        out.append(
            f"train.csv rows: {report['train_csv_rows']}; oversampling repeats removed: "
            f"{report['oversampling_repeats_removed']}"
        )
    dups = report["duplicates_removed"]
    out.append(
        f"exact duplicates removed: {sum(dups.values())}"
        + (f" ({', '.join(f'{k} {v}' for k, v in dups.items())})" if dups else "")
    )
    skipped = report["skipped"]
    out.append(
        f"skipped: {sum(skipped.values())}"
        + (f" ({', '.join(f'{k} {v}' for k, v in sorted(skipped.items()))})" if skipped else "")
    )
    for split, missing in report["classes_missing_from_split"].items():
        out.append(
            f"warning: {len(missing)} class(es) have no {split} image: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}"
        )
    out.append(
        f"processed: {report['processed']}; reused from an earlier run: {report['reused_from_earlier_run']}; "
        f"re-encoded: {report['reencoded']}; "
        f"stale files removed: {report['stale_files_removed']}"
    )
    if report["unowned_files_left"]:
        out.append(
            f"warning: {len(report['unowned_files_left'])} file(s) in the output were not written by prepare "
            f"and were left in place, e.g. {report['unowned_files_left'][0]}"
        )
    out.append(
        f"time: {report['seconds']:.1f} s ({report['images_per_second']} source images/s); "
        f"details in {Path(report['output']) / 'prepare_report.json'}"
    )
    return "\n".join(out)
