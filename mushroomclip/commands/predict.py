"""Identify mushroom species in photos with a MushroomCLIP LoRA adapter.

mushroomclip predict photo1.jpg photo2.jpg --adapter runs/lora-b32 --top-k 5     (or: python predict.py ...)
mushroomclip predict photos/ --adapter USER/mushroomclip-lora-b32 --format json
mushroomclip predict photos/ --adapter runs/lora-b32 --csv answers.csv     (a folder -> one CSV row per image)

A folder stands for the image files anywhere under it. A file that cannot be read is reported on stderr
and the others are still predicted; the exit status is then 1 (2 if no image could be read).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

from mushroomclip.data.transforms import ImageError, image_files
from mushroomclip.models.backbones import ModelLoadError
from mushroomclip.models.classifier import AdapterError, load_classifier
from mushroomclip.prediction.answer import Thresholds, answer, csv_row, predictions_csv
from mushroomclip.prediction.identify import thresholds_for

BATCH = 32  # images per forward pass: a folder of thousands of photos is never decoded at once

WARNING = (
    "WARNING: {names} among the candidates for {image} {verb} {kinds}. "
    "Never eat a wild mushroom on the word of a model: ask an expert."
)


def print_table(record: dict) -> None:
    """One image's ranked candidates, one line each, then the answer (as --csv and the app give it)."""
    print(f"\n{record['image']}")
    for rank, pred in enumerate(record["predictions"], start=1):
        lineage = pred["lineage"]
        print(
            f"  {rank}. {pred['species']:<28} {pred['common_name']:<28} {100 * pred['probability']:5.1f}%  "
            f"{pred['edibility']:<12} {lineage['family']} < {lineage['order']} < {lineage['class']}"
        )
    below = " (top-1 probability below the run's open-set threshold)" if record.get("possibly_unknown") else ""
    print(f"  -> {record['answer']['text']}{below}")


def thresholds_line(t: Thresholds) -> str:
    """The table's first line: when the answers name a species, back off, or abstain, and where that comes from."""
    pct = lambda p: f"{100 * p:.4g}%"  # noqa: E731
    species = (
        pct(t.species) if t.unknown is None or t.unknown <= t.species else f"{pct(t.unknown)} (the open-set threshold)"
    )
    below = (
        "not sure"
        if t.unknown is None
        else f"possibly not one of the known species below {pct(t.unknown)}, else not sure"
    )
    return (
        f"answers: a species from {species}; else the most probable genus from {pct(t.genus)} or family from "
        f"{pct(t.family)} (summed); else {below} — thresholds: {t.source}"
    )


def unwritable(path: Path) -> str | None:
    """Why a file cannot be written at ``path`` (its folder is missing or read-only, or it is a folder), else None."""
    folder = path.absolute().parent
    if path.is_dir():
        return "is a folder; name a file"
    if not folder.is_dir():
        return f"the folder {folder} does not exist; create it or name a file in an existing folder"
    if not os.access(folder, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        return "cannot be written here (permission denied); name a file in a folder you can write to"
    return None


def warn_if_dangerous(record: dict) -> None:
    """A loud warning on stderr when any candidate of an image is deadly or poisonous."""
    dangerous = [
        f"{q['species']} ({q['edibility']})" for q in record["predictions"] if q["edibility"] in ("deadly", "poisonous")
    ]
    if dangerous:
        verb = "is" if len(dangerous) == 1 else "are"
        warning = WARNING.format(
            names=", ".join(dangerous), image=record["image"], verb=verb, kinds="deadly or poisonous"
        )
        print(warning, file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Predict every readable input; exit 0, 1 when some inputs could not be read, 2 when nothing could be done."""
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("images", nargs="+", help="image files, or folders (their image files, recursively)")
    p.add_argument("--adapter", required=True, help="run folder (runs/<name>) or Hub repo id of a MushroomCLIP adapter")
    p.add_argument("--top-k", type=int, default=5, help="candidates per image")
    p.add_argument("--format", choices=("table", "json"), default="table", help="output format")
    p.add_argument(
        "--csv",
        metavar="FILE",
        default=None,
        help="also write one row per input to FILE: the answer (species, genus or family back-off, possibly unknown or not "
        "sure, with the run's thresholds), the top-k, the warning, or why the file could not be read",
    )
    p.add_argument("--base", default=None, help="base model to check the adapter against (default: the one it names)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, ...")
    p.add_argument(
        "--merge", metavar="DIR", default=None, help="also export the model, LoRA merged in (merge_and_unload), to DIR"
    )
    args = p.parse_args(argv)
    if args.top_k < 1:
        print(f"error: --top-k must be at least 1, got {args.top_k}", file=sys.stderr)
        return 2
    try:
        device = torch.device(args.device)
    except RuntimeError as err:
        print(f"error: --device {args.device}: {err}", file=sys.stderr)
        return 2
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"error: --device {args.device}, but no CUDA GPU is available here; use --device cpu", file=sys.stderr)
        return 2
    if args.csv and (problem := unwritable(Path(args.csv))):  # found now, not after predicting a whole folder
        print(f"error: --csv {args.csv}: {problem}", file=sys.stderr)
        return 2
    # 1. the files: folders expanded; a missing path is reported, not fatal
    files, problems = image_files(args.images)
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    if not files:
        return 2
    # 2. the adapter: an unusable one is fatal
    try:
        classifier = load_classifier(args.adapter, base=args.base, device=args.device)
    except (AdapterError, ModelLoadError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    # 3. predict batch by batch; an unreadable file is reported and skipped
    failed, records, tax = len(problems), [], classifier.taxonomy
    rows = [csv_row("", error=problem) for problem in problems]
    thresholds = thresholds_for(args.adapter)
    batches = range(0, len(files), BATCH)
    for start in tqdm(batches, desc="predict", unit="batch", disable=not args.csv or len(batches) < 2):
        readable, pixels = [], []
        for path in files[start : start + BATCH]:
            try:
                pixels.append(classifier.pixels(path))
                readable.append(path)
            except ImageError as err:
                print(f"error: cannot read image {path}: {err.reason}", file=sys.stderr)
                rows.append(csv_row(str(path), error=err.reason))
                failed += 1
        if not readable:
            continue
        probs = classifier.logits(torch.stack(pixels)).softmax(dim=-1)
        results = classifier.ranked(probs, top_k=args.top_k)
        answers = [answer(classifier.classes, p.double().numpy(), tax, thresholds, args.top_k) for p in probs]
        if args.csv:
            rows += [csv_row(str(path), a) for path, a in zip(readable, answers)]
        batch = [
            {
                "image": str(path),
                "predictions": [
                    {
                        "species": p.species,
                        "common_name": tax[p.species].common_name,
                        "probability": round(p.probability, 4),
                        "edibility": tax[p.species].edibility,
                        "lineage": tax.lineage(p.species),
                    }
                    for p in preds
                ],
                # the answer of --csv and the app; the warning when a candidate (or backed-off member) is dangerous
                "answer": {
                    "kind": a.kind,
                    "text": a.headline,
                    "warning": a.warning,
                    "thresholds": dataclasses.asdict(a.thresholds),  # which ones gave this answer, and their source
                },
            }
            for path, preds, a in zip(readable, results, answers)
        ]
        if thresholds.unknown is not None:  # the run chose an open-set threshold: say when an image falls below it
            for record, p in zip(batch, probs):
                record["possibly_unknown"] = bool(p.max().item() < thresholds.unknown)
        if args.format == "table" and not records:  # above the first image: which thresholds the answers use
            print(thresholds_line(thresholds))
        for record in batch:
            if args.format == "table":
                print_table(record)
            warn_if_dangerous(record)
        records += batch
    if args.format == "json":
        print(json.dumps(records, indent=2))
    if args.csv:
        predictions_csv(rows, args.csv)
        print(f"{len(rows)} rows written to {args.csv}", file=sys.stderr)
    if args.merge:
        merged = classifier.merged()
        merged.save_pretrained(args.merge)
        print(f"merged {type(merged).__name__} written to {args.merge}")
    if failed:
        print(f"error: {failed} of {len(files) + len(problems)} inputs could not be read (see above)", file=sys.stderr)
        return 1 if records else 2
    return 0
