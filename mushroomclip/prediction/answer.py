"""From class probabilities to the answer a person reads: top-k rows, genus/family back-off, abstention, warnings.

Pure functions on ``(classes, probabilities, taxonomy)``, shared by the web app (``app.py``) and usable by
``predict.py``. A species model for mushrooms must never make a dangerous species look like a safe
answer, so every answer carries a warning whenever a deadly or poisonous species is among its candidates.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mushroomclip.taxonomy import DANGEROUS, Taxonomy

#: Where a run records its own thresholds: ``metrics.json["thresholds"] = {"species": p, "genus": p}``; a species
#: threshold chosen on validation for a dangerous->edible target (:mod:`mushroomclip.evaluation.selective`) adds
#: ``max_danger``, ``coverage`` and the rates it reached.
THRESHOLDS_KEY = "thresholds"
WARNING_TEXT = "Lookalike of {what} ({names}) — never eat on the basis of this app."
NOT_SURE_TEXT = "Not sure — do not eat"
UNKNOWN_TEXT = "Possibly not one of the known species — do not eat"
UNKNOWN_IN_TAXON_TEXT = "possibly a species outside the known ones"  # a back-off below the open-set threshold


@dataclass(frozen=True)
class Thresholds:
    """Below ``species`` (or below ``unknown``, where the run chose one) the top species is not named as the
    answer; the most probable genus is, if its summed probability reaches ``genus``; else the most probable
    family, if its sum reaches ``family``; otherwise the answer is "possibly not one of the known species" below
    ``unknown``, else "not sure". ``source`` says where they came from."""

    species: float = 0.5  # below 0.5 the top species is less likely than all the others together
    genus: float = 0.8
    source: str = "documented defaults; the run records none"
    unknown: float | None = None  # open set: chosen on validation to keep a stated share of known images
    family: float = 0.8

    def __post_init__(self):
        for name in ("species", "genus", "family", "unknown"):
            value = getattr(self, name)
            if value is not None and not 0.0 < value <= 1.0:
                raise ValueError(f"{name} threshold must be in (0, 1], got {value}")


def run_thresholds(run_dir: str | Path | None) -> Thresholds:
    """The thresholds a run folder records in ``metrics.json`` (key :data:`THRESHOLDS_KEY`), else the defaults."""
    path = Path(run_dir) / "metrics.json" if run_dir else None
    if path is None or not path.is_file():
        return Thresholds()
    recorded = json.loads(path.read_text()).get(THRESHOLDS_KEY)
    if not recorded:
        return Thresholds()
    own = "species" in recorded or "genus" in recorded  # a run with only run.unknown_tpr keeps the defaults
    source = f"recorded by the run ({path})" if own else f"documented defaults; the run ({path}) records none"
    if "max_danger" in recorded:  # written by mushroomclip.evaluation.selective.SelectiveThreshold.record
        at = float(recorded["species"])
        target = f"a dangerous->edible rate of at most {100 * recorded['max_danger']:g}%"
        if recorded.get("allowed_by_target") is not None:
            source += (
                f"; for {target} on {recorded.get('chosen_on', 'validation')} the target allowed "
                f"{recorded['allowed_by_target']:.4g}, and the default floor {recorded.get('floor', Thresholds.species):g} "
                f"was kept (coverage {100 * recorded['coverage']:.1f}% at {at:.4g})"
            )
        else:
            source += (
                f"; species threshold chosen on {recorded.get('chosen_on', 'validation')} for {target} "
                f"(coverage {100 * recorded['coverage']:.1f}% at {at:.4g})"
            )
        if recorded.get("dangerous_as_edible", 0) > recorded["max_danger"]:  # even answering nothing missed it
            source += f"; target NOT met on validation (rate {100 * recorded['dangerous_as_edible']:.1f}%)"
        if at < Thresholds.species:  # recorded before targets had a floor
            source += (
                f"; {at:.4g} is below the default, so the default {Thresholds.species:g} applies (a target never "
                "makes answers bolder)"
            )
            recorded = recorded | {"species": Thresholds.species}
        if recorded.get("target_shown") is False:  # too few dangerous validation images to show the rate
            source += (
                f"; NOT shown by validation: the rate's 95% upper bound there is "
                f"{100 * recorded['dangerous_as_edible_upper95']:.1f}%"
            )
    unknown = recorded.get("unknown")  # written by mushroomclip.evaluation.openset.unknown_threshold
    if unknown:
        source += (
            f"; unknown-species threshold chosen on {unknown['chosen_on']} to keep {100 * unknown['tpr']:g}% of "
            f"known images{'' if own else ', recorded by the run'}"
        )
    return Thresholds(
        float(recorded.get("species", Thresholds.species)),
        float(recorded.get("genus", Thresholds.genus)),
        source,
        float(unknown["threshold"]) if unknown else None,
        float(recorded.get("family", Thresholds.family)),
    )


@dataclass
class Row:
    species: str
    probability: float
    common_name: str
    edibility: str
    lineage: dict[str, str]


@dataclass
class Answer:
    """``kind`` is ``"species"``, ``"genus"``, ``"family"``, ``"unknown"`` or ``"not_sure"``; ``headline`` is
    what the page shows first."""

    kind: str
    headline: str
    probability: float
    rows: list[Row]
    thresholds: Thresholds
    warning: str | None = None
    dangerous_members: list[str] = field(default_factory=list)  # of a backed-off genus or family


def fuse_log_probs(log_probs: np.ndarray) -> np.ndarray:
    """Several photos of one find, ``(N, C)`` log-probabilities -> one ``(C,)`` probability vector: the
    renormalised exponential of their mean (a product of experts: every view must agree)."""
    mean = np.asarray(log_probs, dtype=np.float64).mean(axis=0)
    mean = mean - mean.max()  # stable softmax
    probs = np.exp(mean)
    return probs / probs.sum()


def top_rows(classes: list[str], probs: np.ndarray, taxonomy: Taxonomy, k: int = 5) -> list[Row]:
    """The ``k`` most probable species, most probable first, with name, edibility and lineage."""
    order = np.argsort(-np.asarray(probs), kind="stable")[:k]
    return [
        Row(
            classes[i],
            float(probs[i]),
            taxonomy[classes[i]].common_name,
            taxonomy[classes[i]].edibility,
            taxonomy.lineage(classes[i]),
        )
        for i in order
    ]


#: The ranks an answer backs off to, in order, with how a headline names a taxon of that rank.
BACK_OFF = {"genus": "{} sp.", "family": "{} (family)"}


def rank_probabilities(
    classes: list[str], probs: np.ndarray, taxonomy: Taxonomy, rank: str = "genus"
) -> dict[str, float]:
    """Summed probability of each taxon of ``rank`` (``"genus"``, ``"family"``) over its species among ``classes``."""
    names, taxon_ids = np.unique([getattr(taxonomy[c], rank) for c in classes], return_inverse=True)
    sums = np.bincount(taxon_ids, weights=np.asarray(probs, dtype=np.float64), minlength=len(names))
    return dict(zip(names.tolist(), sums.tolist()))


def danger_warning(species: list[str], taxonomy: Taxonomy) -> str | None:
    """The warning for a list of candidate species, or ``None`` when none is deadly or poisonous."""
    dangerous = [s for s in species if taxonomy[s].edibility in DANGEROUS]
    if not dangerous:
        return None
    kinds = {taxonomy[s].edibility for s in dangerous}
    kind = " or ".join(k for k in DANGEROUS if k in kinds)  # "deadly", "poisonous" or "deadly or poisonous"
    what = f"a {kind} species" if len(dangerous) == 1 else f"{kind} species"
    names = ", ".join(f"{s}: {taxonomy[s].edibility}" for s in dangerous)
    return WARNING_TEXT.format(what=what, names=names)


def answer(classes: list[str], probs: np.ndarray, taxonomy: Taxonomy, thresholds: Thresholds, k: int = 5) -> Answer:
    """The species if it clears ``thresholds.species`` (and ``thresholds.unknown``, where set); else the most
    probable genus if its summed probability clears ``thresholds.genus``, else the most probable family if its sum
    clears ``thresholds.family`` (naming the dangerous members of either); else "possibly not one of the known
    species" below ``thresholds.unknown``, or "not sure". Warns whenever a top-``k`` species, or a member of the
    backed-off taxon, is deadly or poisonous."""
    probs = np.asarray(probs, dtype=np.float64)
    rows = top_rows(classes, probs, taxonomy, k)
    best = rows[0]
    warning = danger_warning([r.species for r in rows], taxonomy)
    maybe_unknown = thresholds.unknown is not None and best.probability < thresholds.unknown
    if best.probability >= thresholds.species and not maybe_unknown:
        headline = f"{best.species} ({best.common_name}), {100 * best.probability:.0f}%"
        return Answer("species", headline, best.probability, rows, thresholds, warning)
    for rank, name in BACK_OFF.items():
        taxon, taxon_p = max(rank_probabilities(classes, probs, taxonomy, rank).items(), key=lambda item: item[1])
        if taxon_p < getattr(thresholds, rank):
            continue
        members = [c for c in classes if getattr(taxonomy[c], rank) == taxon]
        dangerous = [c for c in members if taxonomy[c].edibility in DANGEROUS]
        headline = f"{name.format(taxon)}, {100 * taxon_p:.0f}%"
        if maybe_unknown:  # the taxon is likely, the species may be none the model knows
            headline += f", {UNKNOWN_IN_TAXON_TEXT}"
        if dangerous:
            headline += f" — this {rank} includes {', '.join(dangerous)}"
        warning = danger_warning(list(dict.fromkeys([r.species for r in rows] + dangerous)), taxonomy)
        return Answer(rank, headline, taxon_p, rows, thresholds, warning, dangerous)
    closest = f"closest: {best.species} ({best.common_name}), {100 * best.probability:.0f}%"
    if maybe_unknown:
        headline = f"{UNKNOWN_TEXT}; {closest}"
        return Answer("unknown", headline, best.probability, rows, thresholds, warning)
    return Answer("not_sure", f"{NOT_SURE_TEXT}; {closest}", best.probability, rows, thresholds, warning)


CSV_COLUMNS = (
    "image",
    "answer",
    "kind",
    "probability",
    "warning",
    "top_species",
    "top_probabilities",
    "error",
    "thresholds",
    "thresholds_source",
)


def thresholds_text(t: Thresholds) -> str:
    """The thresholds an answer was given with, in one cell: ``species 0.5, genus 0.8, family 0.8[, unknown 0.42]``."""
    limits = {"species": t.species, "genus": t.genus, "family": t.family, "unknown": t.unknown}
    return ", ".join(f"{name} {value:.4g}" for name, value in limits.items() if value is not None)


def csv_row(image: str, result: Answer | None = None, error: str = "") -> dict:
    """One CSV row for an image: its answer, or the reason it could not be read."""
    if result is None:
        return dict.fromkeys(CSV_COLUMNS, "") | {"image": image, "error": error}
    return {
        "image": image,
        "answer": result.headline,
        "kind": result.kind,
        "probability": f"{result.probability:.4f}",
        "warning": result.warning or "",
        "top_species": ";".join(r.species for r in result.rows),
        "top_probabilities": ";".join(f"{r.probability:.4f}" for r in result.rows),
        "error": "",
        "thresholds": thresholds_text(result.thresholds),
        "thresholds_source": result.thresholds.source,
    }


def predictions_csv(rows: list[dict], path: str | Path) -> None:
    """Write :func:`csv_row` rows (one per image, unreadable ones included) to ``path``."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
