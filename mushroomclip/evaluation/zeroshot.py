"""Zero-shot, few-shot and linear-probe evaluation of backbones on a prepared split.

Per model: image features once (cached), then for every text type the zero-shot head (class text
embeddings, cached) and, from the same features, SimpleShot for every k x seed and optionally a probe.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from mushroomclip.evaluation.reporting import write_results
from mushroomclip.metrics import classification_metrics, format_report, to_jsonable

SUMMARY_KEYS = ("oa", "top5", "mf1", "miou", "balanced_acc", "genus_acc", "family_acc", "dangerous_as_edible")
RANDOM_WEIGHTS_NOTE = "random weights: architectures only, figures are not model quality"
COLUMN_NAMES = ("OA", "top-5", "mF1", "mIoU", "balanced acc", "genus acc", "family acc", "dangerous→edible")


def scalar_metrics(metrics: dict) -> dict:
    """The summary scalars of one evaluation, rank accuracies flattened to ``<rank>_acc``."""
    flat = {k: v for k, v in metrics.items() if not isinstance(v, (dict, np.ndarray))}
    return flat | {f"{rank}_acc": v for rank, v in metrics.get("rank_accuracy", {}).items()}


@dataclass
class EvalConfig:
    data: str
    models: list[str]
    split: str = "test"
    text_types: list[str] = field(default_factory=lambda: ["taxon_com"])
    templates: str = "openai"
    output: str = "results"
    shots: list[int] = field(default_factory=lambda: [1, 5])
    seeds: int = 5
    probe: bool = False
    batch_size: int = 256
    num_workers: int = 2
    device: str = "auto"
    random_weights: bool = False
    bootstrap: int = 0
    cache_dir: str | None = None
    taxonomy: str | None = None
    seed: int = 0
    include_adapters: str | None = None  # folder of training runs: every adapter in it is added as a model

    def resolved_device(self) -> str:
        return ("cuda" if torch.cuda.is_available() else "cpu") if self.device == "auto" else self.device


def zero_shot_scores(image_features: np.ndarray, class_embeddings: torch.Tensor, logit_scale: float) -> np.ndarray:
    """``(N, C)`` logits: scaled cosine similarity of normalised image and class embeddings."""
    return logit_scale * image_features @ class_embeddings.numpy().T


def _predictions_table(scores: np.ndarray, labels: np.ndarray, split, classes: list[str], k: int = 5):
    import pandas as pd

    k = min(k, scores.shape[1])
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    probs = torch.softmax(torch.from_numpy(scores).float(), dim=1).numpy()
    return pd.DataFrame(
        {
            "source": split["source"],
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
    return {"min": int(used.min()), "mean": float(used.mean()), "max": int(used.max()),
            "classes_below_k": int((used < k).sum()), "classes": len(classes)}  # fmt: skip


def shots_label(k: int, k_used: dict) -> str:
    """``"5-shot"``, or ``"5-shot (k<5 for 3/8 classes, min 2)"`` where some classes have fewer images."""
    short = k_used["classes_below_k"]
    return f"{k}-shot" + (f" (k<{k} for {short}/{k_used['classes']} classes, min {k_used['min']})" if short else "")


def _row(model: str, method: str, text_type: str, metrics: dict) -> dict:
    flat = scalar_metrics(metrics)
    return {"model": model, "method": method, "text_type": text_type} | {k: flat.get(k) for k in SUMMARY_KEYS}


def evaluate(cfg: EvalConfig, log=print) -> list[dict]:
    """Run every configured evaluation; writes results under ``cfg.output`` and returns the summary rows."""
    from mushroomclip.data.splits import load_splits, prepared_taxonomy, split_fingerprint
    from mushroomclip.evaluation.features import cached_image_features
    from mushroomclip.evaluation.fewshot import linear_probe_scores, sample_support, simpleshot_scores, summarise_runs
    from mushroomclip.models.backbones import load_backbone
    from mushroomclip.models.classifier import AdapterError, data_mismatch, find_adapters, load_classifier
    from mushroomclip.models.prompts import cached_class_text_embeddings
    from mushroomclip.taxonomy import load_taxonomy

    taxonomy = prepared_taxonomy(cfg.data)
    if cfg.taxonomy:
        override = load_taxonomy(cfg.taxonomy)
        if override.classes != taxonomy.classes:
            raise ValueError(f"--taxonomy {cfg.taxonomy} lists other species than {cfg.data}/taxonomy.csv, which the "
                             "prepared label ids index; prepare the data again with --taxonomy instead")  # fmt: skip
        taxonomy = override
    splits = load_splits(cfg.data)
    output = Path(cfg.output)
    cache_dir = cfg.cache_dir or str(output / ".cache")
    device = cfg.resolved_device()
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    num_classes = len(taxonomy)
    provenance_config = asdict(cfg) | {"device": device, "dtype": str(dtype)}
    rows = []
    # an adapter belongs in the table only if trained on exactly the species of this data's train split
    # (what the trainer records as trained_species), so a run trained on this very data always fits
    data_species = {taxonomy.classes[i] for i in splits["train"].unique("label")}
    found, notes = (
        find_adapters(cfg.include_adapters, taxonomy.classes, data_species) if cfg.include_adapters else ([], [])
    )
    for line in notes:
        log(line)
    for name in list(cfg.models) + found:
        adapter = name.startswith("lora:")
        if adapter:  # a fine-tuned run: zero-shot head of its own text type, no few-shot
            try:
                classifier = load_classifier(name[len("lora:") :], species=taxonomy.classes, device=device)
            except AdapterError as err:
                if name not in found:
                    raise  # named in --models: the user asked for this one
                notes.append(f"skipped {name[len('lora:') :]}: {err}")  # one broken run never sinks the table
                log(notes[-1])
                continue
            if reason := data_mismatch(classifier.record, taxonomy.classes, data_species):  # named in --models
                notes.append(f"{name}: {reason}; evaluated because --models names it")
                log(f"note: {notes[-1]}")
            backbone, text_types = classifier.backbone.to(device, dtype), [classifier.record["text_type"]]
            name = backbone.name
        else:
            backbone, text_types = (
                load_backbone(name, device=device, dtype=dtype, random_weights=cfg.random_weights),
                cfg.text_types,
            )
        feature_args = dict(batch_size=cfg.batch_size, num_workers=cfg.num_workers)
        eval_split = splits[cfg.split]
        feats, labels, _ = cached_image_features(
            backbone,
            eval_split,
            split_fingerprint(cfg.data, cfg.split),
            cache_dir,
            desc=f"{name} {cfg.split}",
            **feature_args,
        )
        for text_type in text_types:
            if adapter:  # the prompts it was trained and validated with (classes.json), not the config's
                class_emb = classifier.class_embeddings
            else:
                class_emb, _ = cached_class_text_embeddings(backbone, taxonomy, text_type, cfg.templates, cache_dir)
            scores = zero_shot_scores(feats, class_emb, backbone.logit_scale)
            metrics = classification_metrics(
                labels, scores, num_classes, taxonomy=taxonomy, bootstrap=cfg.bootstrap, seed=cfg.seed
            )
            out = output / "zero_shot" / name / text_type
            write_results(
                out,
                metrics,
                taxonomy,
                provenance_config | {"model": name, "text_type": text_type},
                cfg.seed,
                f"{name} {text_type}",
            )
            _predictions_table(scores, labels, eval_split, taxonomy.classes).to_parquet(out / "predictions.parquet")
            rows.append(_row(name, "LoRA" if adapter else "zero-shot", text_type, metrics))
            templates = f"its own {len(classifier.record['templates'])}" if adapter else cfg.templates
            method = "LoRA adapter" if adapter else "zero-shot"
            log(format_report(metrics, title=f"\n{name} {method} ({text_type}, {templates} templates) on {cfg.split}"))
        if adapter or (not cfg.shots and not cfg.probe):
            continue
        train_feats, train_labels, _ = cached_image_features(
            backbone,
            splits["train"],
            split_fingerprint(cfg.data, "train"),
            cache_dir,
            desc=f"{name} train",
            **feature_args,
        )
        for k in cfg.shots:
            k_used = support_sizes(train_labels, labels, k)
            if k_used["max"] < k:  # every seed would take every image: not k-shot, and the same as a smaller k
                notes.append(f"{name}: {k}-shot skipped: no class has {k} training images (at most {k_used['max']})")
                log(notes[-1])
                continue
            runs = []
            for seed in range(cfg.seeds):
                support = sample_support(train_labels, k, seed)
                scores = simpleshot_scores(train_feats[support], train_labels[support], feats, num_classes)
                runs.append(scalar_metrics(classification_metrics(labels, scores, num_classes, taxonomy=taxonomy)))
            summary = summarise_runs(runs, SUMMARY_KEYS)
            out = output / "few_shot" / name / f"k{k}"
            out.mkdir(parents=True, exist_ok=True)
            record = {"model": name, "method": "simpleshot", "k": k, "k_used": k_used, "seeds": list(range(cfg.seeds)),
                      "summary": summary, "runs": [{key: r.get(key) for key in SUMMARY_KEYS} for r in runs]}  # fmt: skip
            (out / "metrics.json").write_text(json.dumps(to_jsonable(record), indent=2))
            method = shots_label(k, k_used)
            rows.append(
                _row(name, method, "", {key: v["mean"] for key, v in summary.items()})
                | {"std": summary, "k_used": k_used}
            )
            log(f"{name} SimpleShot {method} over {cfg.seeds} seeds: "
                + "  ".join(f"{key.upper()} {100 * v['mean']:.1f}±{100 * v['std']:.1f}" for key, v in summary.items() if key in ("oa", "mf1", "miou")))  # fmt: skip
        if cfg.probe:
            scores = linear_probe_scores(train_feats, train_labels, feats, num_classes, seed=cfg.seed)
            metrics = classification_metrics(
                labels, scores, num_classes, taxonomy=taxonomy, bootstrap=cfg.bootstrap, seed=cfg.seed
            )
            write_results(
                output / "probe" / name,
                metrics,
                taxonomy,
                provenance_config | {"model": name},
                cfg.seed,
                f"{name} linear probe",
            )
            rows.append(_row(name, "linear probe", "", metrics))
            log(format_report(metrics, title=f"\n{name} linear probe on {cfg.split}"))
        del backbone
    write_summary(rows, output, cfg, notes)
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
    return "\n".join(lines) + "\n"


def write_summary(rows: list[dict], output: Path, cfg: EvalConfig, notes: list[str] = ()) -> None:
    output.mkdir(parents=True, exist_ok=True)
    notes = ([RANDOM_WEIGHTS_NOTE] if cfg.random_weights else []) + list(notes)
    (output / "summary.md").write_text(summary_markdown(rows, f"Evaluation on {cfg.data} ({cfg.split})", notes))
    record = {"config": asdict(cfg), "rows": rows, "notes": notes}
    (output / "summary.json").write_text(json.dumps(to_jsonable(record), indent=2))
