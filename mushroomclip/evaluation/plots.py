"""Figures saved beside metrics: the confusion matrix (taxonomic order), rank-level accuracy, a run's loss curve,
the risk-coverage curve of selective prediction, the ROC curves of open-set recognition, per-class accuracy
against training images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from sklearn.metrics import roc_curve

from mushroomclip.evaluation.openset import OpenSetScores, auroc
from mushroomclip.evaluation.selective import RiskCoverage, SelectiveThreshold
from mushroomclip.metrics import frequency_groups, metrics_by_training_count
from mushroomclip.taxonomy import Taxonomy


def _pyplot():
    """pyplot on the Agg backend. Imported here, not at the top: matplotlib loads only when a figure is saved,
    and the backend must be chosen before pyplot is imported."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path, rect: tuple = (0, 0, 1, 1)) -> Path:
    """Lay the figure out (its axes inside ``rect``), write it as a 100-dpi PNG and free it."""
    fig.tight_layout(rect=rect)
    fig.savefig(path, dpi=100)
    _pyplot().close(fig)
    return Path(path)


def save_confusion_png(confusion: np.ndarray, taxonomy: Taxonomy, path: str | Path, title: str = "") -> Path:
    """Row-normalised confusion of the classes present, axes sorted by lineage so related species sit together."""
    plt = _pyplot()
    confusion = np.asarray(confusion)
    present = np.flatnonzero(confusion.sum(0) + confusion.sum(1))
    order = taxonomy.taxonomic_order(present)
    cm = confusion[np.ix_(order, order)].astype(float)
    cm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    n = len(order)
    size = min(4 + 0.12 * n, 24)
    fig, ax = plt.subplots(figsize=(size, size))
    im = ax.imshow(cm, cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
    if n <= 60:  # beyond that labels are unreadable; the order still groups families
        names = [taxonomy.classes[i] for i in order]
        ax.set_xticks(range(n), names, rotation=90, fontsize=7)
        ax.set_yticks(range(n), names, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title or f"confusion ({n} classes, rows normalised, taxonomic order)")
    fig.colorbar(im, ax=ax, fraction=0.046)
    return _save(fig, path)


def save_rank_accuracy_png(metrics: dict, path: str | Path, title: str = "") -> Path:
    """Bar chart of accuracy at species (OA) and every higher rank."""
    plt = _pyplot()
    ranks = {"species": metrics["oa"], **metrics["rank_accuracy"]}
    fig, ax = plt.subplots(figsize=(6, 3.5))
    bars = ax.bar(list(ranks), [100 * v for v in ranks.values()], color="#6a994e")
    ax.bar_label(bars, fmt="%.1f", fontsize=8)
    ax.set_ylim(0, 105)
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title or "accuracy by taxonomic rank")
    return _save(fig, path)


def save_loss_curve(train: list, evals: list, path: str | Path) -> Path:
    """Training loss and validation mIoU against the step, for a run folder."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if train:
        ax.plot(*zip(*train), label="train loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    if evals:
        twin = ax.twinx()
        twin.plot(*zip(*evals), "o-", color="#bc4749", label="validation mIoU")
        twin.set_ylabel("validation mIoU")
        twin.set_ylim(0, 1)
    fig.legend(loc="upper center", bbox_to_anchor=(0.45, 0.93), frameon=False)
    return _save(fig, path)


def save_risk_coverage_png(
    curve: RiskCoverage, path: str | Path, chosen: SelectiveThreshold | None = None, title: str = ""
) -> Path:
    """Error rate and dangerous->edible rate against coverage, with the validation-chosen threshold and its
    target marked when ``chosen`` is given."""
    plt = _pyplot()
    fig, (risk, danger) = plt.subplots(1, 2, figsize=(10, 3.8), sharex=True)
    coverage = 100 * curve.coverage
    risk.plot(coverage, 100 * curve.error, color="#386641")
    risk.set_ylabel("error among answered (%)")
    risk.set_title("wrong species", fontsize=10)
    danger.plot(coverage, 100 * curve.danger, color="#bc4749")
    danger.set_ylabel("dangerous->edible (%)")
    danger.set_title(f"deadly or poisonous answered as edible (of {curve.dangerous_images} images)", fontsize=10)
    for ax in (risk, danger):
        ax.set_xlabel(f"coverage (% of {curve.images} images answered)")
        ax.set_xlim(0, 100)
        ax.grid(alpha=0.3)
    risk.set_ylim(bottom=0)
    # the danger axis always shows the target line, also when no dangerous image was answered as edible
    top = max(float(100 * curve.danger.max()), 100 * chosen.max_danger if chosen is not None else 0.0)
    danger.set_ylim(0, 1.15 * top if top > 0 else 1)
    if chosen is not None:
        danger.axhline(
            100 * chosen.max_danger, color="grey", linestyle="--", label=f"target {100 * chosen.max_danger:g}%"
        )
        shown = (
            f"95% upper bound {100 * chosen.danger_upper95:.2g}%"
            if chosen.verified
            else f"target NOT shown: 95% upper bound {100 * chosen.danger_upper95:.1f}% ({chosen.dangerous_images} dangerous)"
        )
        floor = f" (the default floor; the target allowed {chosen.allowed:.3f})" if chosen.allowed is not None else ""
        label = f"threshold {chosen.threshold:.3f}{floor}: coverage {100 * chosen.coverage:.1f}%; {shown}"
        for ax, value in ((risk, chosen.error), (danger, chosen.danger)):
            ax.axvline(100 * chosen.coverage, color="black", linewidth=0.8, label=label if ax is risk else None)
            if value is not None:
                ax.plot(100 * chosen.coverage, 100 * value, "ko")
        fig.set_figheight(4.4)
        fig.legend(loc="lower left", fontsize=8, frameon=False, ncol=2)  # below the axes: never over a curve
    fig.suptitle(title or "risk-coverage: answering only above a top-1 probability threshold")
    return _save(fig, path, rect=(0, 0.1, 1, 1) if chosen is not None else (0, 0, 1, 1))


def save_open_set_roc_png(scores: OpenSetScores, path: str | Path, title: str = "") -> Path:
    """ROC curves of telling known from unknown images, one per score, with each AUROC in the legend."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 4.6))
    labels = np.r_[np.ones(len(scores.correct)), np.zeros(len(next(iter(scores.unknown.values()))))]
    for name, known in scores.known.items():
        values = np.r_[known, scores.unknown[name]]
        fpr, tpr, _ = roc_curve(labels, values)
        style = "--" if name == "max_cosine" else "-"  # ranks as max_logit does under one logit scale
        label = f"{name} (AUROC {100 * auroc(known, scores.unknown[name]):.1f})"
        ax.plot(100 * fpr, 100 * tpr, linestyle=style, label=label)
    ax.plot([0, 100], [0, 100], color="grey", linestyle=":", linewidth=0.8)
    ax.axhline(95, color="grey", linestyle="--", linewidth=0.8, label="95% of known accepted")
    ax.set_xlabel(f"unknown images accepted as known (%, of {len(labels) - len(scores.correct)})")
    ax.set_ylabel(f"known images accepted (%, of {len(scores.correct)})")
    ax.set_xlim(0, 100)
    ax.set_ylim(0, 100.5)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title(title or "open set: known vs held-out species", fontsize=10)
    return _save(fig, path)


def save_novel_species_png(rows: list[dict], path: str | Path, title: str = "") -> Path:
    """Few-shot accuracy on new species against k: the original and the fine-tuned backbone, new species only
    (OA) and known + new together (new-species accuracy and harmonic mean), mean ± std over the seeds."""
    plt = _pyplot()
    fig, (novel, general) = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    colours = {"original": "#6c757d", "fine-tuned": "#386641"}
    for backbone, colour in colours.items():
        for ax, setting, keys in (
            (novel, "novel", (("accuracy", "-"),)),
            (general, "generalised", (("new_acc", "--"), ("harmonic_mean", "-"))),
        ):
            chosen = sorted(
                (r for r in rows if r["backbone"] == backbone and r["setting"] == setting), key=lambda r: r["k"]
            )
            if not chosen:
                continue
            ks = [r["k"] for r in chosen]
            for key, style in keys:
                column = "oa" if key == "accuracy" else key
                mean = np.array([100 * r[column] for r in chosen])
                std = np.array([100 * r["std"][column]["std"] for r in chosen])
                ax.errorbar(
                    ks,
                    mean,
                    yerr=std,
                    color=colour,
                    linestyle=style,
                    marker="o",
                    capsize=3,
                    label=f"{backbone}: {key.replace('_', ' ')}",
                )
    novel.set_title("new species only", fontsize=10)
    general.set_title("known + new species together", fontsize=10)
    novel.set_ylabel("accuracy (%)")
    for ax in (novel, general):
        ax.set_xlabel("support photos per new species (k)")
        ax.set_xscale("log")
        ax.set_xticks(sorted({r["k"] for r in rows}), labels=[str(k) for k in sorted({r["k"] for r in rows})])
        ax.set_ylim(0, 103)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    fig.suptitle(title or "new species from a few photos")
    return _save(fig, path)


GROUP_COLORS = {"head": "#386641", "medium": "#dda15e", "tail": "#bc4749"}


def save_accuracy_by_training_count_png(confusion: np.ndarray, train_counts, path: str | Path, title: str = "") -> Path:
    """Each species' accuracy (recall) against its training images (log axis), coloured by head / medium / tail
    third (:func:`mushroomclip.metrics.frequency_groups`); the legend gives each third's accuracy and mF1."""
    plt = _pyplot()
    from matplotlib.ticker import FuncFormatter

    cm = np.asarray(confusion)
    counts = np.asarray(train_counts)
    support = cm.sum(axis=1)
    groups = metrics_by_training_count(cm, counts)
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, ids in frequency_groups(counts).items():
        if not len(ids):  # a third without species (ties keep equal counts together: balanced data is all medium)
            continue
        ids = ids[support[ids] > 0]  # species without images in this split have no accuracy
        g = groups[name]
        pct = "n/a" if g["accuracy"] is None else f"{100 * g['accuracy']:.1f}%"
        mf1 = "n/a" if g["mf1"] is None else f"{100 * g['mf1']:.1f}"
        label = f"{name}: {g['classes']} species, accuracy {pct}, mF1 {mf1}"
        ax.scatter(
            counts[ids], 100 * np.diag(cm)[ids] / support[ids], s=18, alpha=0.7, color=GROUP_COLORS[name], label=label
        )
    ax.set_xscale("log")
    plain = FuncFormatter(lambda value, _: f"{value:g}")  # 3, 10, 300 rather than 3x10^0
    ax.xaxis.set_major_formatter(plain)
    trained = counts[counts > 0]
    if len(trained) and trained.max() < 20 * trained.min():  # within about a decade: label the minor ticks too
        ax.xaxis.set_minor_formatter(plain)
    ax.set_xlabel("training images of the species (log scale)")
    ax.set_ylabel("accuracy of the species (%)")
    ax.set_ylim(-3, 103)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    ax.set_title(title or "per-species accuracy against training images")
    return _save(fig, path)
