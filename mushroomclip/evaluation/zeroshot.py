"""Zero-shot, few-shot and linear-probe evaluation of backbones on a prepared split.

Per model: image features once (cached), then for every text type the zero-shot head (class text
embeddings, cached) and, from the same features, SimpleShot for every k x seed and optionally a probe.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field, fields
from functools import cached_property
from pathlib import Path
from typing import Literal, get_args, get_origin, get_type_hints

import numpy as np
import pandas as pd
import torch
import yaml

from mushroomclip.config import loss_settings
from mushroomclip.data.holdout import choose_holdout, parse_fraction
from mushroomclip.data.splits import load_splits, prepared_taxonomy, split_fingerprint
from mushroomclip.evaluation.features import cached_image_features
from mushroomclip.evaluation.fewshot import linear_probe_scores, sample_support, simpleshot_scores, summarise_runs
from mushroomclip.evaluation.openset import DEFAULT_TPR, SCORES, OpenSetScores, open_set_metrics, summary_line
from mushroomclip.evaluation.plots import save_open_set_roc_png, save_risk_coverage_png
from mushroomclip.evaluation.reporting import write_results
from mushroomclip.evaluation.selective import (
    LEVELS,
    SelectiveThreshold,
    answer_outcomes,
    choose_on_validation,
    probabilities,
)
from mushroomclip.metrics import classification_metrics, format_report, save_json
from mushroomclip.models.backbones import Backbone, load_backbone, resolve_spec
from mushroomclip.models.classifier import AdapterError, Classifier, data_mismatch, find_adapters, load_classifier
from mushroomclip.models.prompts import cached_class_text_embeddings, text_types
from mushroomclip.models.supervised import SupervisedClassifier
from mushroomclip.prediction.answer import Thresholds
from mushroomclip.prediction.identify import thresholds_for
from mushroomclip.taxonomy import Taxonomy, load_taxonomy

logger = logging.getLogger(__name__)

ROW_EXTRAS = ("mistake_severity",)  # in summary.json's rows (the benchmark's figures), not in the table
SUMMARY_KEYS = ("oa", "top5", "mf1", "miou", "balanced_acc", "genus_acc", "family_acc", "dangerous_as_edible")
RANDOM_WEIGHTS_NOTE = "random weights: architectures only, figures are not model quality"
COLUMN_NAMES = ("OA", "top-5", "mF1", "mIoU", "balanced acc", "genus acc", "family acc", "dangerous→edible")
ADAPTER = "lora:"  # a model name that is a training run's folder
Split = Literal["validation", "test"]
TemplateSet = Literal["single", "openai"]
Features = tuple[np.ndarray, np.ndarray]  # (N, D) L2-normalised image features and their (N,) labels


def _comma_list(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


@dataclass
class EvaluationArguments:
    """What to evaluate, on which data, and where the results go: the flags of ``evaluate_zero_shot.py`` and the
    keys of its ``--config`` YAML file (flag names with ``_``). Lists are comma-separated, as on the command line."""

    data: str | None = field(
        default=None, metadata={"help": "prepared data folder (data_scripts/prepare_kaggle.py --output)"}
    )
    split: Split = field(default="test", metadata={"help": "split to evaluate on"})
    models: str = field(
        default="clip-b32,bioclip",
        metadata={
            "help": "comma-separated model names (see --list-models), hf:<hub id or folder>, or open_clip:<architecture>@<pretrained tag>"
        },
    )
    text_type: str = field(
        default="taxon_com",
        metadata={
            "help": "comma-separated text types (sci, com, taxon, sci_com, taxon_com) or all, for BioCLIP's text-type ablation"
        },
    )
    templates: TemplateSet = field(
        default="openai",
        metadata={"help": "single: 'a photo of {}.'; openai: the 80 OpenAI ImageNet templates, averaged"},
    )
    output: str = field(default="results", metadata={"help": "folder for zero_shot/, few_shot/, probe/ and summary.md"})
    shots: str = field(default="1,5", metadata={"help": "SimpleShot k values, comma-separated; empty for none"})
    seeds: int = field(default=5, metadata={"help": "few-shot repetitions (seeds 0..N-1); mean and std reported"})
    probe: bool = field(
        default=False, metadata={"help": "also fit a logistic-regression linear probe on frozen train features"}
    )
    batch_size: int = field(default=256, metadata={"help": "images per forward pass"})
    num_workers: int = field(default=2, metadata={"help": "DataLoader worker processes decoding images"})
    decode_on_device: bool = field(
        default=False,
        metadata={
            "help": "the workers only read files; each batch of JPEGs is decoded (nvJPEG on a GPU), resized and "
            "cropped on the device; other formats and EXIF-rotated JPEGs on the CPU (another JPEG decoder: pixels "
            "may differ slightly from the workers')"
        },
    )
    device: str = field(
        default="auto", metadata={"help": "auto (cuda if available, bf16 there), cpu, cuda, cuda:1, ..."}
    )
    random_weights: bool = field(
        default=False,
        metadata={
            "help": "real architectures with random weights, no download (benchmarks and offline checks; figures mean nothing)"
        },
    )
    bootstrap: int = field(
        default=0, metadata={"help": "bootstrap resamples for 95%% intervals of OA/mF1/mIoU (0: none)"}
    )
    cache_dir: str | None = field(
        default=None, metadata={"help": "where text and image embeddings are cached; unset: OUTPUT/.cache"}
    )
    taxonomy: str | None = field(
        default=None,
        metadata={
            "help": "species table to use for prompts and safety metrics; must list the same species as the prepared folder's taxonomy.csv"
        },
    )
    seed: int = field(default=0, metadata={"help": "seed of the bootstrap and the probe"})
    max_danger: float | None = field(
        default=None,
        metadata={
            "help": "selective prediction: per model, the top-1 probability threshold chosen on the validation split "
            "whose dangerous->edible rate is at most this (e.g. 0.001), and its coverage, dangerous->edible rate and "
            "error on --split (unset: off)"
        },
    )
    holdout_species: str | None = field(
        default=None,
        metadata={
            "help": "open set: species held out as unknown (comma-separated names, or a fraction such as 0.1 drawn "
            "with --holdout-seed, as a training config's data.holdout_species): the heads list the others only, and "
            "open-set metrics score the held-out species' images against theirs"
        },
    )
    holdout_seed: int = field(default=0, metadata={"help": "the draw of a --holdout-species fraction"})
    include_adapters: str | None = field(
        default=None,
        metadata={
            "metavar": "DIR",
            "help": "also evaluate every LoRA run in DIR (e.g. runs) trained on exactly this data's species; the others are listed with the reason. A run can also be named in --models as lora:<run folder>",
        },
    )

    def __post_init__(self):
        """Checks that need no data or model, so that a typo fails before any download."""
        for name, hint in get_type_hints(type(self)).items():  # a YAML value does not pass argparse's types
            value = getattr(self, name)
            if get_origin(hint) is Literal:
                ok, expected = value in get_args(hint), "one of " + ", ".join(get_args(hint))
            else:
                types = get_args(hint) or (hint,)
                ok = isinstance(value, types) and (bool in types or not isinstance(value, bool))
                expected = " or ".join("unset" if t is type(None) else t.__name__ for t in types)
            if not ok:
                raise ValueError(f"--{name.replace('_', '-')} must be {expected}, got {value!r}")
        text_types(self.text_type)  # a ValueError naming an unknown text type
        parse_fraction(self.holdout_list, "--holdout-species")  # a fraction outside (0, 1) is a ValueError
        if self.max_danger is not None and not 0 <= self.max_danger < 1:
            raise ValueError(f"--max-danger must be in [0, 1), e.g. 0.001, got {self.max_danger}")
        if not all(k.isdigit() for k in _comma_list(self.shots)):
            raise ValueError(f"--shots must be comma-separated whole numbers such as 1,5, got {self.shots!r}")
        for name in self.model_names:
            if not name.startswith(ADAPTER):
                resolve_spec(name)  # ModelLoadError listing the valid names

    @property
    def model_names(self) -> list[str]:
        return _comma_list(self.models)

    @property
    def holdout_list(self) -> list[str] | None:
        return _comma_list(self.holdout_species) if self.holdout_species else None

    @property
    def text_types(self) -> list[str]:
        return text_types(self.text_type)

    @property
    def shot_counts(self) -> list[int]:
        return [int(k) for k in _comma_list(self.shots)]

    def resolved_device(self) -> str:
        return ("cuda" if torch.cuda.is_available() else "cpu") if self.device == "auto" else self.device

    def resolved(self) -> dict:
        """The options as evaluated, lists spelled out: what summary.json and each metrics.json record."""
        lists = {"models": self.model_names, "text_type": self.text_types, "shots": self.shot_counts}
        return {f.name: lists.get(f.name, getattr(self, f.name)) for f in fields(self)}


def zero_shot_scores(image_features: np.ndarray, class_embeddings: torch.Tensor, logit_scale: float) -> np.ndarray:
    """``(N, C)`` logits: scaled cosine similarity of normalised image and class embeddings."""
    return logit_scale * image_features @ class_embeddings.numpy().T


def scalar_metrics(metrics: dict) -> dict:
    """The summary scalars of one evaluation, rank accuracies flattened to ``<rank>_acc``."""
    flat = {k: v for k, v in metrics.items() if not isinstance(v, (dict, np.ndarray))}
    return flat | {f"{rank}_acc": v for rank, v in metrics.get("rank_accuracy", {}).items()}


def _predictions_table(scores: np.ndarray, labels: np.ndarray, sources, classes: list[str], k: int = 5) -> pd.DataFrame:
    k = min(k, scores.shape[1])
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    probs = torch.softmax(torch.from_numpy(scores).float(), dim=1).numpy()
    return pd.DataFrame(
        {
            "source": sources,
            "label": labels,
            "species": [classes[i] for i in labels],
            "pred": top[:, 0],
            "pred_species": [classes[i] for i in top[:, 0]],
            "top5_ids": list(top),
            "top5_probs": list(np.take_along_axis(probs, top, axis=1)),
        }
    )


def support_sizes(train_labels: np.ndarray, eval_labels: np.ndarray, k: int) -> dict:
    """Support images per class that ``k``-shot can draw (``min(k, training images)``), over the classes of
    the training and evaluated splits: min, mean, max, and how many classes have fewer than ``k``."""
    classes = np.union1d(train_labels, eval_labels)
    used = np.minimum(np.bincount(train_labels, minlength=classes.max() + 1)[classes], k)
    return {
        "min": int(used.min()),
        "mean": float(used.mean()),
        "max": int(used.max()),
        "classes_below_k": int((used < k).sum()),
        "classes": len(classes),
    }


def shots_label(k: int, k_used: dict) -> str:
    """``"5-shot"``, or ``"5-shot (k<5 for 3/8 classes, min 2)"`` where some classes have fewer images."""
    short = k_used["classes_below_k"]
    return f"{k}-shot" + (f" (k<{k} for {short}/{k_used['classes']} classes, min {k_used['min']})" if short else "")


def _row(model: str, method: str, text_type: str, metrics: dict, open_set: dict | None = None) -> dict:
    flat = scalar_metrics(metrics)
    row = {"model": model, "method": method, "text_type": text_type} | {k: flat.get(k) for k in SUMMARY_KEYS}
    row |= {k: flat.get(k) for k in ROW_EXTRAS} | {"hierarchical_distance": metrics.get("hierarchical_distance_top_k")}
    return row | ({"open_set": open_set} if open_set else {})


def training_label(folder: str | Path) -> str:
    """How a run was trained, beyond its model: its loss and safety settings where they differ from the plain
    ones (``hierarchical_soft β=10, danger_weight=1``), for the method column; "" for a plain run."""
    path = Path(folder) / "config.yaml"
    if not path.is_file():
        return ""
    config = yaml.safe_load(path.read_text()) or {}
    loss = config.get("loss") or {}
    settings = loss_settings(loss)
    name = loss.get("name", "class_text")
    if name in ("hierarchical_soft", "hierarchical_xent"):  # the name and its parameter go together
        settings = [f"{name} {settings[0]}", *settings[1:]]
    elif name not in ("class_text", "cross_entropy"):
        settings = [name, *settings]
    if (config.get("run") or {}).get("max_danger") is not None:  # its answers abstain below a chosen threshold
        settings.append(f"max_danger={config['run']['max_danger']:g}")
    return ", ".join(settings)


@dataclass
class EvaluationRun:
    """What every model's evaluation shares: the options, the prepared data, the device, and the notes
    (what was left out, and why) that go above the summary table."""

    args: EvaluationArguments
    taxonomy: Taxonomy  # the classes the heads list: the known species' own table with --holdout-species
    splits: dict  # split name -> datasets.Dataset (labels of the prepared table)
    device: str
    dtype: torch.dtype
    notes: list[str] = field(default_factory=list)
    prepared: Taxonomy | None = None  # the prepared table, where it differs from ``taxonomy`` (a hold-out)
    held_out: list[str] = field(default_factory=list)

    @property
    def output(self) -> Path:
        return Path(self.args.output)

    @property
    def cache_dir(self) -> str:
        """Where text and image embeddings are cached: ``--cache-dir``, else ``OUTPUT/.cache``."""
        return self.args.cache_dir or str(self.output / ".cache")

    @cached_property
    def data_species(self) -> set[str]:
        """The (known) species of the train split: what an adapter must have been trained on to join the table."""
        table = self.prepared or self.taxonomy
        return {table.classes[i] for i in self.splits["train"].unique("label")} - set(self.held_out)

    @cached_property
    def known_ids(self) -> np.ndarray:
        """Prepared-table label -> the heads' class id (-1: a held-out species)."""
        if self.prepared is None:
            return np.arange(len(self.taxonomy))
        ids = np.full(len(self.prepared), -1)
        ids[[self.prepared.id(c) for c in self.taxonomy.classes]] = np.arange(len(self.taxonomy))
        return ids

    @property
    def num_classes(self) -> int:
        return len(self.taxonomy)

    def note(self, line: str, prefix: str = "") -> None:
        """Record ``line`` for summary.md and say it on the console."""
        self.notes.append(line)
        logger.warning(prefix + line)

    def provenance(self, **what) -> dict:
        """The resolved options, the device, and what this result is (model, text type): each metrics.json's config."""
        return self.args.resolved() | {"device": self.device, "dtype": str(self.dtype)} | what

    def features(self, backbone: Backbone, name: str, split: str) -> Features:
        """Image features and labels (the heads' class ids) of ``split``'s known images, cached under
        ``--cache-dir`` (computed on the whole split: the cache is keyed by its content)."""
        feats, labels = self.all_features(backbone, name, split)
        known = self.known_ids[labels] >= 0
        return feats[known], self.known_ids[labels[known]]

    def sources(self, split: str) -> list[str]:
        """The ``source`` of each of ``split``'s known images, in the order of :meth:`features`."""
        data = self.splits[split]
        return [s for s, label in zip(data["source"], data["label"]) if self.known_ids[label] >= 0]

    def unknown_features(self, backbone: Backbone, name: str, split: str) -> np.ndarray:
        """Image features of ``split``'s images of the held-out species (``--holdout-species``)."""
        feats, labels = self.all_features(backbone, name, split)
        return feats[self.known_ids[labels] < 0]

    def all_features(self, backbone: Backbone, name: str, split: str) -> Features:
        feats, labels, _ = cached_image_features(
            backbone,
            self.splits[split],
            split_fingerprint(self.args.data, split),
            self.cache_dir,
            desc=f"{name} {split}",
            batch_size=self.args.batch_size,
            num_workers=self.args.num_workers,
            decode_on_device=self.args.decode_on_device,
        )
        return feats, labels

    def metrics(self, labels: np.ndarray, scores: np.ndarray, bootstrap: bool = True) -> dict:
        """Classification metrics over the taxonomy (with the bootstrap intervals of --bootstrap where asked)."""
        extra = {"bootstrap": self.args.bootstrap, "seed": self.args.seed} if bootstrap else {}
        return classification_metrics(labels, scores, self.num_classes, taxonomy=self.taxonomy, **extra)


@dataclass
class EvaluatedModel:
    """A backbone to evaluate, under its table name; ``classifier`` is set for a LoRA run (its own prompts)."""

    name: str
    backbone: Backbone
    text_types: list[str]
    classifier: Classifier | None = None
    training: str = ""  # a run's loss and safety settings (:func:`training_label`)
    source: str | None = None  # a run's folder or Hub repo: where its recorded thresholds are read


def load_evaluation_data(args: EvaluationArguments) -> EvaluationRun:
    """The prepared splits with the taxonomy their label ids index (or ``--taxonomy``, listing the same species);
    with ``--holdout-species`` the heads' table is the known species' (the same draw as a training run's)."""
    taxonomy = prepared_taxonomy(args.data)
    if args.taxonomy:
        override = load_taxonomy(args.taxonomy)
        if override.classes != taxonomy.classes:
            raise ValueError(
                f"--taxonomy {args.taxonomy} lists other species than {args.data}/taxonomy.csv, which the "
                "prepared label ids index; prepare the data again with --taxonomy instead"
            )
        taxonomy = override
    device = args.resolved_device()
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    splits = load_splits(args.data)
    if not args.holdout_list:
        return EvaluationRun(args, taxonomy, splits, device, dtype)
    present = [taxonomy.classes[i] for i in splits["train"].unique("label")]
    held_out = choose_holdout(taxonomy, args.holdout_list, args.holdout_seed, present, "--holdout-species")
    known = taxonomy.subset([c for c in taxonomy.classes if c not in set(held_out)])
    logger.info("--holdout-species: %d species held out as unknown (%s)", len(held_out), ", ".join(held_out))
    return EvaluationRun(args, known, splits, device, dtype, prepared=taxonomy, held_out=held_out)


def adapters_to_include(run: EvaluationRun) -> list[str]:
    """The runs of ``--include-adapters`` trained on exactly the species of this data's train split (what the
    trainer records as trained_species, so a run trained on this very data always fits); the others are notes."""
    if not run.args.include_adapters:
        return []
    found, notes = find_adapters(run.args.include_adapters, run.taxonomy.classes, run.data_species)
    for line in notes:
        run.note(line)
    return found


def load_model(run: EvaluationRun, name: str, found: bool) -> EvaluatedModel | None:
    """A backbone, or a LoRA run as a classifier; a broken run that ``--include-adapters`` ``found`` is a note
    and ``None`` (one broken run never sinks the table), one named in ``--models`` an error."""
    if not name.startswith(ADAPTER):
        backbone = load_backbone(name, device=run.device, dtype=run.dtype, random_weights=run.args.random_weights)
        return EvaluatedModel(name, backbone, run.args.text_types)
    folder = name[len(ADAPTER) :]
    try:
        classifier = load_classifier(folder, species=run.taxonomy.classes, device=run.device)
    except AdapterError as err:
        if not found:
            raise  # named in --models: the user asked for this one
        run.note(f"skipped {folder}: {err}")
        return None
    if reason := data_mismatch(classifier.record, run.taxonomy.classes, run.data_species):  # named in --models
        run.note(f"{name}: {reason}; evaluated because --models names it", prefix="note: ")
    training = training_label(folder)
    if isinstance(classifier, SupervisedClassifier):  # its "features" are its logits (its encode_images)
        return EvaluatedModel(classifier.name, classifier.to(run.device, run.dtype), [], classifier, training, folder)
    backbone = classifier.backbone.to(run.device, run.dtype)
    return EvaluatedModel(backbone.name, backbone, [classifier.record["text_type"]], classifier, training, folder)


def zero_shot_rows(run: EvaluationRun, model: EvaluatedModel, evaluated: Features) -> list[dict]:
    """The zero-shot head for every text type (a LoRA run: its own prompts from classes.json, not the config's);
    metrics, figures and predictions.parquet under ``zero_shot/MODEL/TEXT_TYPE``."""
    (feats, labels), args, adapter, rows = evaluated, run.args, model.classifier is not None, []
    for text_type in model.text_types:
        if adapter:
            class_emb = model.classifier.class_embeddings
        else:
            class_emb, _ = cached_class_text_embeddings(
                model.backbone, run.taxonomy, text_type, args.templates, run.cache_dir
            )
        scores = zero_shot_scores(feats, class_emb, model.backbone.logit_scale)
        metrics = run.metrics(labels, scores)
        count = len(model.classifier.record["templates"]) if adapter else 0
        templates = f"its own {count} template{'s' if count != 1 else ''}" if adapter else f"{args.templates} templates"
        kind = "LoRA adapter" if adapter else "zero-shot"
        # the model's report first: its open-set and selective lines follow under it
        logger.info(format_report(metrics, title=f"\n{model.name} {kind} ({text_type}, {templates}) on {args.split}"))
        out = run.output / "zero_shot" / model.name / text_type
        open_set = None
        if run.held_out:
            unknown = zero_shot_scores(
                run.unknown_features(model.backbone, model.name, args.split), class_emb, model.backbone.logit_scale
            )
            open_set = open_set_result(run, labels, scores, unknown, model.backbone.logit_scale, out, model.name)
        write_results(
            out,
            metrics,
            run.taxonomy,
            run.provenance(model=model.name, text_type=text_type),
            args.seed,
            f"{model.name} {text_type}",
        )
        _predictions_table(scores, labels, run.sources(args.split), run.taxonomy.classes).to_parquet(
            out / "predictions.parquet"
        )
        method = ("LoRA" + (f" ({model.training})" if model.training else "")) if adapter else "zero-shot"
        row = _row(model.name, method, text_type, metrics, open_set)
        validation = None
        if args.max_danger is not None:
            val_feats, val_labels = run.features(model.backbone, model.name, "validation")
            validation = (zero_shot_scores(val_feats, class_emb, model.backbone.logit_scale), val_labels)
        row |= safety_results(run, model, labels, scores, validation, out)
        rows.append(row)
    return rows


def supervised_row(run: EvaluationRun, model: EvaluatedModel, evaluated: Features) -> dict:
    """A supervised run scored by its own head (its "features" are its logits); metrics, figures and
    predictions.parquet under ``supervised/MODEL``."""
    (logits, labels), record = evaluated, model.classifier.record
    method = (
        f"supervised ({'pretrained' if record['pretrained'] else 'from scratch'}, "
        f"{'LoRA' if record['finetune'] == 'lora' else 'full fine-tune'}"
        + (f", {model.training}" if model.training else "")
        + ")"
    )
    metrics = run.metrics(labels, logits)
    logger.info(format_report(metrics, title=f"\n{model.name} {method} ({record['base_model']}) on {run.args.split}"))
    out = run.output / "supervised" / model.name
    write_results(out, metrics, run.taxonomy, run.provenance(model=model.name), run.args.seed, f"{model.name} {method}")
    open_set = None
    if run.held_out:
        unknown = run.unknown_features(model.backbone, model.name, run.args.split)  # its logits, as its features
        open_set = open_set_result(run, labels, logits, unknown, None, out, model.name)
    predictions = _predictions_table(logits, labels, run.sources(run.args.split), run.taxonomy.classes)
    predictions.to_parquet(out / "predictions.parquet")
    row = _row(model.name, method, "", metrics, open_set)
    validation = run.features(model.backbone, model.name, "validation") if run.args.max_danger is not None else None
    return row | safety_results(run, model, labels, logits, validation, out)  # validation: its logits


def safety_results(
    run: EvaluationRun, model: EvaluatedModel, labels, scores, validation: Features | None, out: Path
) -> dict:
    """``answers``: what predict.py and the app would answer on the evaluated split (:func:`answer_outcomes`), with
    a run's own recorded thresholds, else the documented defaults; and with ``--max-danger`` (``validation``: its
    scores and labels) ``selective``: the species threshold chosen on validation, used for the answers too, and
    what its species answers give on the split (``selective.json``, the validation ``risk_coverage.png``)."""
    thresholds = thresholds_for(model.source) if model.source else Thresholds()
    chosen = validation_threshold(run, *validation, out, model.name) if validation is not None else None
    if chosen is not None:
        source = f"species threshold chosen on validation by --max-danger {chosen.max_danger:g}; {thresholds.source}"
        thresholds = dataclasses.replace(thresholds, species=chosen.threshold, source=source)
    answers = answer_outcomes(probabilities(scores), labels, run.taxonomy, thresholds)
    if chosen is None:
        return {"answers": answers}
    right = answers["species"]["right"]
    on_split = {  # the species answers, as the answers table counts them (one definition of each rate)
        "threshold": chosen.threshold,
        "coverage": answers["species"]["share"],
        "dangerous_as_edible": answers["dangerous_as_edible"],
        "error": None if right is None else 1 - right,
        "images": answers["images"],
        "dangerous_images": answers["dangerous_images"],
    }
    selective = {"chosen_on_validation": chosen.record(), run.args.split: on_split}
    save_json(out / "selective.json", selective)
    return {"answers": answers, "selective": selective}


def validation_threshold(run: EvaluationRun, val_scores, val_labels, out: Path, name: str) -> SelectiveThreshold | None:
    """The ``--max-danger`` threshold chosen on validation, with its ``risk_coverage.png`` in ``out``; None (and a
    note) when validation has no deadly or poisonous image."""
    try:
        curve, chosen = choose_on_validation(val_scores, val_labels, run.taxonomy, run.args.max_danger)
    except ValueError as err:  # no deadly or poisonous validation image
        run.note(f"{name}: --max-danger: no threshold: {err}")
        return None
    out.mkdir(parents=True, exist_ok=True)
    save_risk_coverage_png(curve, out / "risk_coverage.png", chosen, title=f"{name} validation")
    logger.info(f"{name}: {chosen.summary()}")
    return chosen


def open_set_result(
    run: EvaluationRun, labels, scores, unknown_scores, logit_scale, out: Path, name: str
) -> dict[str, dict] | None:
    """Open-set metrics of known (``labels``, ``scores``) against unknown images (``--bootstrap`` intervals),
    written to ``open_set.json`` and ``open_set_roc.png`` in ``out``; the metrics by score."""
    if not len(unknown_scores):
        run.note(f"{name}: the held-out species have no {run.args.split} images; no open-set metrics")
        return None
    scores = OpenSetScores.from_logits(scores, labels, unknown_scores, logit_scale)
    metrics = open_set_metrics(scores, bootstrap=run.args.bootstrap, seed=run.args.seed)
    record = {"held_out": run.held_out, "known_images": len(labels), "unknown_images": len(unknown_scores)}
    out.mkdir(parents=True, exist_ok=True)
    save_json(out / "open_set.json", record | {"tpr": DEFAULT_TPR, "metrics": metrics})
    save_open_set_roc_png(scores, out / "open_set_roc.png", title=f"{name} open set ({run.args.split})")
    logger.info(summary_line(metrics, len(unknown_scores), len(labels)))
    return metrics


def few_shot_rows(run: EvaluationRun, name: str, train: Features, evaluated: Features) -> list[dict]:
    """SimpleShot for every ``--shots`` k over ``--seeds`` support draws: mean and std under ``few_shot/MODEL/kK``.
    A k no class has enough training images for is a note, not a row."""
    (train_feats, train_labels), (feats, labels) = train, evaluated
    args, rows = run.args, []
    for k in args.shot_counts:
        k_used = support_sizes(train_labels, labels, k)
        if k_used["max"] < k:  # every seed would take every image: not k-shot, and the same as a smaller k
            run.note(f"{name}: {k}-shot skipped: no class has {k} training images (at most {k_used['max']})")
            continue
        runs = []
        for seed in range(args.seeds):
            support = sample_support(train_labels, k, seed)
            scores = simpleshot_scores(train_feats[support], train_labels[support], feats, run.num_classes)
            runs.append(scalar_metrics(run.metrics(labels, scores, bootstrap=False)))
        summary = summarise_runs(runs, SUMMARY_KEYS)
        out = run.output / "few_shot" / name / f"k{k}"
        out.mkdir(parents=True, exist_ok=True)
        save_json(
            out / "metrics.json",
            {
                "model": name,
                "method": "simpleshot",
                "k": k,
                "k_used": k_used,
                "seeds": list(range(args.seeds)),
                "summary": summary,
                "runs": [{key: r.get(key) for key in SUMMARY_KEYS} for r in runs],
            },
        )
        method = shots_label(k, k_used)
        rows.append(
            _row(name, method, "", {key: v["mean"] for key, v in summary.items()}) | {"std": summary, "k_used": k_used}
        )
        logger.info(
            f"{name} SimpleShot {method} over {args.seeds} seeds: "
            + "  ".join(
                f"{key.upper()} {100 * v['mean']:.1f}±{100 * v['std']:.1f}"
                for key, v in summary.items()
                if key in ("oa", "mf1", "miou")
            )
        )
    return rows


def probe_row(run: EvaluationRun, name: str, train: Features, evaluated: Features) -> dict:
    """A logistic-regression probe on the frozen train features; metrics and figures under ``probe/MODEL``."""
    (train_feats, train_labels), (feats, labels) = train, evaluated
    scores = linear_probe_scores(train_feats, train_labels, feats, run.num_classes, seed=run.args.seed)
    metrics = run.metrics(labels, scores)
    write_results(
        run.output / "probe" / name,
        metrics,
        run.taxonomy,
        run.provenance(model=name),
        run.args.seed,
        f"{name} linear probe",
    )
    logger.info(format_report(metrics, title=f"\n{name} linear probe on {run.args.split}"))
    return _row(name, "linear probe", "", metrics)


def evaluate(args: EvaluationArguments) -> list[dict]:
    """Run every configured evaluation; writes results under ``args.output`` and returns the summary rows."""
    # 1. the prepared data, its taxonomy, and the device everything runs on
    run = load_evaluation_data(args)
    # 2. the models: --models, then the fitting runs of --include-adapters
    found = adapters_to_include(run)
    rows, named = [], set()
    for name in args.model_names + found:
        # 3. the backbone (a LoRA run: its backbone and own class embeddings)
        model = load_model(run, name, found=name in found)
        if model is None:
            continue
        if model.name in named:  # e.g. runs/b32 and runs/lora-b32: their outputs must not share a folder
            renamed = f"{model.name}-{sum(n.startswith(model.name) for n in named) + 1}"
            run.note(f"{name}: a model named {model.name} is already in the table; this one is {renamed}")
            model.name = renamed
        named.add(model.name)
        # 4. features of the evaluated split, then the zero-shot head for every text type
        evaluated = run.features(model.backbone, model.name, args.split)
        if isinstance(model.classifier, SupervisedClassifier):  # its own head: the features are its logits
            rows.append(supervised_row(run, model, evaluated))
        else:
            rows += zero_shot_rows(run, model, evaluated)
        # 5. few-shot and the linear probe from train features (base models only: an adapter saw the train split)
        if model.classifier is None and (args.shot_counts or args.probe):
            train = run.features(model.backbone, model.name, "train")
            rows += few_shot_rows(run, model.name, train, evaluated)
            if args.probe:
                rows.append(probe_row(run, model.name, train, evaluated))
        del model  # free its memory before the next one loads
    # 6. summary.md and summary.json
    write_summary(rows, args, run.notes)
    return rows


def _pct(value) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}"


def summary_markdown(rows: list[dict], title: str, notes: list[str] = ()) -> str:
    """The table of ``rows`` under ``title``, each note (what is not in it, and why) quoted above it."""
    lines = [f"# {title}", ""]
    for note in notes:
        lines += [f"> {note}", ""]
    lines += [
        "| model | method | text type | " + " | ".join(COLUMN_NAMES) + " |",
        "|---" * (3 + len(COLUMN_NAMES)) + "|",
    ]
    for r in rows:
        std = r.get("std", {})
        cells = [_pct(r[k]) + (f" ± {_pct(std[k]['std'])}" if k in std else "") for k in SUMMARY_KEYS]
        lines.append(f"| {r['model']} | {r['method']} | {r['text_type'] or '-'} | " + " | ".join(cells) + " |")
    if any(r.get("selective") for r in rows):
        lines += ["", *selective_table([r for r in rows if r.get("selective")])]
    if any(r.get("answers") for r in rows):
        lines += ["", *answers_table([r for r in rows if r.get("answers")])]
    if any("open_set" in r for r in rows):
        lines += ["", *open_set_table([r for r in rows if "open_set" in r])]
    return "\n".join(lines) + "\n"


def selective_table(rows: list[dict]) -> list[str]:
    """Markdown lines: per row, the validation-chosen threshold and what it gives on the evaluated split."""
    first = rows[0]["selective"]["chosen_on_validation"]
    split = next(k for k in rows[0]["selective"] if k != "chosen_on_validation")
    lines = [
        f"## Selective prediction: threshold chosen on validation for dangerous→edible ≤ {100 * first['max_danger']:g}%",
        "",
        f"Never below the default species threshold {Thresholds.species:g} (where the target alone allows less, the "
        "table says so). "
        "Validation shows the target only when the 95% upper bound of its dangerous→edible rate (Clopper-Pearson, "
        "from its deadly and poisonous images) is at most the target.",
        "",
        f"| model | method | text type | threshold | validation coverage | validation dangerous→edible (95% upper "
        f"bound) | {split} coverage | {split} dangerous→edible | {split} error among answered |",
        "|---" * 9 + "|",
    ]
    for r in rows:
        chosen, applied = r["selective"]["chosen_on_validation"], r["selective"][split]
        floor = (
            "" if chosen.get("allowed_by_target") is None else f" (target allowed {chosen['allowed_by_target']:.4f})"
        )
        shown = "" if chosen["target_shown"] else ", target not shown"
        lines.append(
            f"| {r['model']} | {r['method']} | {r['text_type'] or '-'} | {chosen['species']:.4f}{floor} | "
            f"{_pct(chosen['coverage'])} | {_pct(chosen['dangerous_as_edible'])} "
            f"({_pct(chosen['dangerous_as_edible_upper95'])}{shown}) | {_pct(applied['coverage'])} | "
            f"{_pct(applied['dangerous_as_edible'])} | {_pct(applied['error'])} |"
        )
    return lines


def answers_table(rows: list[dict]) -> list[str]:
    """Markdown lines: per row, how its answers split into species named, genus and family back-offs and
    abstentions, each with how often it holds, and the dangerous->edible rate of the answers."""
    lines = [
        "## Answers with back-off: predict.py's and the app's answer logic (% of images; in brackets, % right)",
        "",
        "Below the species threshold an answer names the most probable genus if its summed probability reaches the "
        'genus threshold, else the family likewise, else abstains ("not sure — do not eat"); only a named species '
        "can call a deadly or poisonous mushroom edible. Thresholds: a run's own (what predict.py uses), else the "
        "defaults; with `--max-danger`, the species threshold it chose on validation instead (predict.py keeps "
        "using what the run records).",
        "",
        "| model | method | text type | thresholds (species / genus / family) | species | genus sp. | family "
        "| abstained | right overall | dangerous→edible |",
        "|---" * 10 + "|",
    ]
    for r in rows:
        a = r["answers"]
        t = a["thresholds"]
        levels = [f"{_pct(a[level]['share'])} ({_pct(a[level]['right'])})" for level in LEVELS]
        lines.append(
            f"| {r['model']} | {r['method']} | {r['text_type'] or '-'} | {t['species']:.4g} / {t['genus']:.4g} / "
            f"{t['family']:.4g} | " + " | ".join(levels) + f" | {_pct(a['abstained'])} | {_pct(a['right'])} | "
            f"{_pct(a['dangerous_as_edible'])} |"
        )
    return lines


def open_set_table(rows: list[dict]) -> list[str]:
    """Markdown lines: per row, each score's AUROC / FPR95 / OSCR (with 95% intervals where bootstrapped)."""

    def cell(metrics: dict | None) -> str:
        if metrics is None:
            return "-"

        def one(key):
            ci = metrics.get("ci", {}).get(key)
            return _pct(metrics[key]) + (f" [{_pct(ci[0])}, {_pct(ci[1])}]" if ci else "")

        return " / ".join(one(key) for key in ("auroc", "fpr95", "oscr"))

    head = "| model | method | text type | " + " | ".join(SCORES) + " |"
    lines = [
        "## Open set: known vs held-out species (AUROC / FPR95 / OSCR)",
        "",
        head,
        "|---" * (3 + len(SCORES)) + "|",
    ]
    for r in rows:
        cells = [cell(r["open_set"].get(score)) for score in SCORES]
        lines.append(f"| {r['model']} | {r['method']} | {r['text_type'] or '-'} | " + " | ".join(cells) + " |")
    return lines


def write_summary(rows: list[dict], args: EvaluationArguments, notes: list[str] = ()) -> None:
    """``summary.md`` (the table, notes above it) and ``summary.json`` (rows, notes and the resolved options)."""
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    notes = ([RANDOM_WEIGHTS_NOTE] if args.random_weights else []) + list(notes)
    if args.holdout_list:
        notes.append(
            f"--holdout-species {args.holdout_species} (seed {args.holdout_seed}): the heads list the known species "
            "only and the first table is on their images; the open-set table scores the held-out species' images against them"
        )
    (output / "summary.md").write_text(summary_markdown(rows, f"Evaluation on {args.data} ({args.split})", notes))
    save_json(output / "summary.json", {"config": args.resolved(), "rows": rows, "notes": notes})
