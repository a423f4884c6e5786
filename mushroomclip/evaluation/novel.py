"""New species from a few photos: does mushroom fine-tuning transfer to species the model never saw?

A run trained with ``data.holdout_species`` never saw its held-out species. This protocol gives SimpleShot
(:mod:`mushroomclip.evaluation.fewshot`) ``k`` training photos of each of them and asks, with the image features
of the run's ORIGINAL base model and of its FINE-TUNED one (LoRA applied), for every ``k`` over several seeds:

- ``novel``: which held-out species is each held-out test photo (an N-way problem among the new species only);
- ``generalised``: which species is each test photo among known + new species together, the known species'
  centroids from all their training photos and the new ones' from ``k``; reported as the accuracy on the known
  species' photos, on the new species' photos, and their harmonic mean (as generalised few-shot work reports).

Features are computed on whole prepared splits (cached like ``evaluate_zero_shot.py``'s) and split by label. For a
supervised classifier run they are the network's pooled output before its head, as training started (pretrained
weights, or the run's random initialisation for one from scratch) and after it.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml

from mushroomclip.data.holdout import HOLDOUT_FILE
from mushroomclip.data.splits import load_splits, prepared_taxonomy, split_fingerprint
from mushroomclip.evaluation.features import cached_image_features
from mushroomclip.evaluation.fewshot import sample_support, simpleshot_scores
from mushroomclip.metrics import classification_metrics, save_json
from mushroomclip.models.backbones import REGISTRY, load_backbone
from mushroomclip.models.classifier import AdapterError, backbone_name, is_supervised_run, load_classifier
from mushroomclip.models.supervised import TINY_RESNET, SupervisedClassifier, initial_classifier
from mushroomclip.provenance import run_provenance

logger = logging.getLogger(__name__)

BACKBONES = ("original", "fine-tuned")
NOVEL_KEYS = ("oa", "mf1", "miou")
GENERALISED_KEYS = ("known_acc", "new_acc", "harmonic_mean")
RANDOM_WEIGHTS_NOTE = (
    "the run's base is a randomly initialised test model: these figures are a pipeline check, not model quality"
)


class PooledFeatures:
    """A supervised classifier seen as a backbone of image features (what :func:`cached_image_features` asks of
    one): its pooled output before the head, the head's logits being over the known species only."""

    def __init__(self, classifier: SupervisedClassifier):
        self.classifier, self.name, self.preprocess = classifier, classifier.name, classifier.preprocess
        self.cache_id, self.device = f"{classifier.cache_id}|pooled", classifier.device

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.classifier.image_features(pixels)


class NovelSpeciesError(ValueError):
    """The run cannot be evaluated on new species (no hold-out, or data without its species)."""


@dataclass
class NovelArguments:
    """The flags of ``mushroomclip novel``."""

    run: str = field(
        metadata={"help": "a finished run (LoRA CLIP or supervised) trained with data.holdout_species (runs/NAME)"}
    )
    shots: str = field(default="1,5,10", metadata={"help": "support photos per new species, comma-separated"})
    seeds: int = field(default=5, metadata={"help": "support draws (seeds 0..N-1); mean and std reported"})
    data: str | None = field(default=None, metadata={"help": "prepared data folder; unset: the run's data.path"})
    output: str | None = field(default=None, metadata={"help": "results folder; unset: RUN/novel_species"})
    batch_size: int = field(default=256, metadata={"help": "images per forward pass"})
    num_workers: int = field(default=2, metadata={"help": "DataLoader worker processes decoding images"})
    device: str = field(default="auto", metadata={"help": "auto (cuda if available), cpu, cuda, ..."})

    @property
    def shot_counts(self) -> list[int]:
        values = [v.strip() for v in self.shots.split(",") if v.strip()]
        if not values or not all(v.isdigit() and int(v) > 0 for v in values):
            raise NovelSpeciesError(f"--shots must be positive whole numbers such as 1,5,10, got {self.shots!r}")
        return [int(v) for v in values]


def novel_scores(
    train: np.ndarray, train_labels: np.ndarray, query: np.ndarray, new: np.ndarray, k: int, seed: int, classes: int
) -> np.ndarray:
    """SimpleShot scores of ``query`` among the ``new`` species only, ``k`` training photos of each (``seed``)."""
    pool = np.flatnonzero(np.isin(train_labels, new))
    support = pool[sample_support(train_labels[pool], k, seed)]
    return simpleshot_scores(train[support], train_labels[support], query, classes)


def generalised_scores(
    train: np.ndarray,
    train_labels: np.ndarray,
    query: np.ndarray,
    new: np.ndarray,
    k: int,
    seed: int,
    classes: int,
) -> np.ndarray:
    """SimpleShot scores of ``query`` among known + new species: every training photo of a known species,
    ``k`` of each new one (``seed``)."""
    known = np.flatnonzero(~np.isin(train_labels, new))
    pool = np.flatnonzero(np.isin(train_labels, new))
    support = np.r_[known, pool[sample_support(train_labels[pool], k, seed)]]
    return simpleshot_scores(train[support], train_labels[support], query, classes)


def generalised_accuracy(labels: np.ndarray, predicted: np.ndarray, new: np.ndarray) -> dict[str, float]:
    """Accuracy on the known species' photos, on the new species' photos, and their harmonic mean."""
    is_new = np.isin(labels, new)
    known_acc = float((predicted[~is_new] == labels[~is_new]).mean())
    new_acc = float((predicted[is_new] == labels[is_new]).mean())
    harmonic = 0.0 if known_acc + new_acc == 0 else 2 * known_acc * new_acc / (known_acc + new_acc)
    return {"known_acc": known_acc, "new_acc": new_acc, "harmonic_mean": harmonic}


def _summary(runs: list[dict], keys: tuple[str, ...]) -> dict[str, dict[str, float]]:
    return {
        key: {"mean": float(np.mean([r[key] for r in runs])), "std": float(np.std([r[key] for r in runs]))}
        for key in keys
    }


def _run_record(run_dir: Path) -> tuple[dict, dict]:
    """The run's hold-out and config; a run that cannot be evaluated here is one NovelSpeciesError line."""
    if not (run_dir / "config.yaml").is_file():
        raise NovelSpeciesError(f"{run_dir} is not a finished training run (no config.yaml)")
    if not (run_dir / HOLDOUT_FILE).is_file():
        raise NovelSpeciesError(
            f"{run_dir} held out no species (no {HOLDOUT_FILE}); train with data.holdout_species (e.g. 0.1) so that "
            "new species exist that the run never saw"
        )
    return json.loads((run_dir / HOLDOUT_FILE).read_text()), yaml.safe_load((run_dir / "config.yaml").read_text())


def evaluate_novel(args: NovelArguments) -> list[dict]:
    """Every backbone x setting x k over the seeds; writes metrics.json, novel_species.png, summary.md/.json."""
    # 1. the run: its held-out species, its data, its two backbones
    run_dir = Path(args.run)
    holdout, config = _run_record(run_dir)
    shots = args.shot_counts
    data = args.data or config["data"]["path"]
    taxonomy = prepared_taxonomy(data)
    missing = [c for c in holdout["held_out"] if c not in taxonomy]
    if missing:
        raise NovelSpeciesError(f"{data} does not hold the run's held-out species {', '.join(missing)}")
    splits = load_splits(data)
    new = np.array([taxonomy.id(c) for c in holdout["held_out"]])
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    try:
        tuned = load_classifier(str(run_dir), device=device)
    except AdapterError as err:
        raise NovelSpeciesError(str(err)) from None
    record = json.loads((run_dir / "classes.json").read_text())
    if is_supervised_run(run_dir):  # the features before the head: as training started, and after it
        seed = config["training"]["seed"]
        original = PooledFeatures(initial_classifier(record, tuned.taxonomy, seed, device))
        tuned = PooledFeatures(tuned)
        random_base = record["base_model"] == TINY_RESNET
    else:
        expected = (record.get("base_conversion") or {}).get("weights")
        original, tuned = load_backbone(backbone_name(record["base_model"], expected), device=device), tuned.backbone
        spec = REGISTRY.get(record["base_model"])
        random_base = bool(spec and spec.tiny) or bool(config["model"].get("random_weights"))
    output = Path(args.output or run_dir / "novel_species")
    cache = output / ".cache"
    results, rows = {}, []
    for label, backbone in zip(BACKBONES, (original, tuned)):
        # 2. features of the whole train and test splits
        feats = {
            split: cached_image_features(
                backbone,
                splits[split],
                split_fingerprint(data, split),
                cache,
                desc=f"{label} {split}",
                batch_size=args.batch_size,
                num_workers=args.num_workers,
            )[:2]
            for split in ("train", "test")
        }
        (train, train_labels), (test, test_labels) = feats["train"], feats["test"]
        new_test = np.isin(test_labels, new)
        if not new_test.any() or not np.isin(train_labels, new).any():
            raise NovelSpeciesError(f"{data}: the held-out species need train and test images for this protocol")
        available = np.bincount(train_labels[np.isin(train_labels, new)], minlength=len(taxonomy))[new]
        results[label] = {"novel": {}, "generalised": {}}
        for k in shots:
            # 3. new species only, then known + new together, over the seeds
            novel_runs, general_runs = [], []
            for seed in range(args.seeds):
                scores = novel_scores(train, train_labels, test[new_test], new, k, seed, len(taxonomy))
                metrics = classification_metrics(test_labels[new_test], scores, len(taxonomy))
                novel_runs.append({key: metrics[key] for key in NOVEL_KEYS})
                scores = generalised_scores(train, train_labels, test, new, k, seed, len(taxonomy))
                general_runs.append(generalised_accuracy(test_labels, scores.argmax(axis=1), new))
            for setting, runs, keys in (
                ("novel", novel_runs, NOVEL_KEYS),
                ("generalised", general_runs, GENERALISED_KEYS),
            ):
                summary = _summary(runs, keys)
                results[label][setting][str(k)] = {"runs": runs, "summary": summary}
                rows.append(
                    {"backbone": label, "model": backbone.name, "setting": setting, "k": k}
                    | {key: value["mean"] for key, value in summary.items()}
                    | {"std": summary, "k_below": int((available < k).sum())}
                )
    # 4. outputs
    write_outputs(output, args, holdout, results, rows, run_dir, shots, random_base)
    return rows


def write_outputs(
    output: Path, args, holdout: dict, results: dict, rows: list[dict], run_dir: Path, shots, random_base: bool
) -> None:
    from mushroomclip.evaluation.plots import save_novel_species_png

    output.mkdir(parents=True, exist_ok=True)
    config = asdict(args) | {"shots": shots}
    record = {
        "run": str(run_dir),
        "held_out": holdout["held_out"],
        "seeds": list(range(args.seeds)),
        "results": results,
    }
    save_json(output / "metrics.json", record | run_provenance(config, None))
    notes = [RANDOM_WEIGHTS_NOTE] if random_base else []
    save_json(
        output / "summary.json", {"config": config, "held_out": holdout["held_out"], "rows": rows, "notes": notes}
    )
    (output / "summary.md").write_text(summary_markdown(rows, run_dir, holdout["held_out"], args.seeds, notes))
    save_novel_species_png(
        rows, output / "novel_species.png", title=f"{run_dir.name}: {len(holdout['held_out'])} new species"
    )


def summary_markdown(rows: list[dict], run_dir: Path, held_out: list[str], seeds: int, notes=()) -> str:
    """Two tables (new species only; known + new), one row per backbone and k, mean ± std over the seeds."""

    def cell(row, key):
        return f"{100 * row[key]:.1f} ± {100 * row['std'][key]['std']:.1f}"

    def note(row):
        return f" (k<{row['k']} for {row['k_below']} species)" if row["k_below"] else ""

    lines = [
        f"# New species from a few photos: {run_dir.name}",
        "",
        f"> {len(held_out)} species the run never saw ({', '.join(held_out)}); SimpleShot on the image features of "
        f"the original base model and of the fine-tuned one, mean ± std over {seeds} support draws.",
        "",
        *[line for note in notes for line in (f"> {note}", "")],
        "## New species only (N-way among them)",
        "",
        "| backbone | k | OA | mF1 | mIoU |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['backbone']} ({r['model']}) | {r['k']}{note(r)} | " + " | ".join(cell(r, k) for k in NOVEL_KEYS) + " |"
        for r in rows
        if r["setting"] == "novel"
    ]
    lines += [
        "",
        "## Generalised: known + new species together",
        "",
        "| backbone | k | known species acc | new species acc | harmonic mean |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['backbone']} ({r['model']}) | {r['k']}{note(r)} | "
        + " | ".join(cell(r, k) for k in GENERALISED_KEYS)
        + " |"
        for r in rows
        if r["setting"] == "generalised"
    ]
    return "\n".join(lines) + "\n"
