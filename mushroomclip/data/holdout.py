"""Held-out species: part of the species kept out of training and validation, seen only as "unknown" test images.

``data.holdout_species`` names them, or gives a fraction of the training split's species (``[0.1]`` or ``0.1`` in
YAML) drawn with ``data.holdout_seed``, stratified by edibility so that the unknowns include edible, poisonous and
deadly species wherever the data has them (:func:`choose_holdout`). :func:`split_holdout` then gives the known
part of every split relabelled to the known species' own table (a run trained on it is an ordinary run over
those species: its head lists only them) and the held-out images of every split with their full-table labels
(the open-set "unknown" test images, and the support and query images of new species for few-shot).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from datasets import ClassLabel, DatasetDict
from datasets.utils.tqdm import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

from mushroomclip.taxonomy import Taxonomy

HOLDOUT_FILE = "holdout_species.json"
#: Strata of the hold-out, by edibility: the dangerous ones each on their own so that both are represented.
STRATA = {"edible": ("edible",), "poisonous": ("poisonous",), "deadly": ("deadly",)}


class HoldoutError(ValueError):
    """``data.holdout_species`` cannot be applied to this data."""


OPTION = "data.holdout_species"  # how errors name the option; evaluation passes "--holdout-species"


def parse_fraction(spec: list[str] | None, option: str = OPTION) -> float | None:
    """The fraction of ``data.holdout_species`` given as one number (``0.1`` or ``[0.1]``), else None."""
    if spec is None or len(spec) != 1:
        return None
    try:
        value = float(spec[0])
    except ValueError:
        return None
    if not 0 < value < 1:
        raise HoldoutError(f"{option} {spec[0]} must be a fraction in (0, 1) or a list of species")
    return value


def _allocate(sizes: dict[str, int], n: int) -> dict[str, int]:
    """``n`` draws over strata of ``sizes``: one from each stratum first (while ``n`` lasts, in ``sizes``'
    order), the rest in proportion to the strata's remaining species (largest remainders, ties in order)."""
    take = dict.fromkeys(sizes, 0)
    for name in sizes:
        if n > sum(take.values()) and sizes[name] > 0:
            take[name] = 1
    left = n - sum(take.values())
    room = {name: sizes[name] - take[name] for name in sizes}
    total = sum(room.values())
    if left > 0 and total > 0:
        quotas = {name: left * room[name] / total for name in sizes}
        for name in sizes:
            take[name] += math.floor(quotas[name])
        by_remainder = sorted(sizes, key=lambda name: -(quotas[name] - math.floor(quotas[name])))
        for name in by_remainder[: n - sum(take.values())]:
            take[name] += 1
    return take


def choose_holdout(
    taxonomy: Taxonomy, spec: list[str] | None, seed: int, present: list[str], option: str = OPTION
) -> list[str]:
    """The held-out species (in table order) among ``present`` (the training split's species).

    A list of names is taken as given (each must be one of ``present``); a fraction ``f`` holds out
    ``round(f * len(present))`` species (at least 1, leaving at least 2 known): one edible, one poisonous and
    one deadly first where the data has them, the rest spread over the edible / poisonous / deadly / other
    strata in proportion to their sizes, each stratum's species drawn with ``numpy.random.default_rng(seed)``.
    """
    if not spec:
        return []
    present = [c for c in taxonomy.classes if c in set(present)]
    fraction = parse_fraction(spec, option)
    if fraction is None:
        for name in spec:
            taxonomy.id(name)  # a TaxonomyError naming an unknown species
        absent = [name for name in spec if name not in present]
        if absent:
            raise HoldoutError(
                f"{option}: {', '.join(absent)} has no training images in this data; "
                "hold out species the training split has"
            )
        held = set(spec)
    else:
        n = min(max(1, round(fraction * len(present))), len(present) - 2)
        if n < 1:
            raise HoldoutError(f"{option}: the data has {len(present)} species; an open set needs 3")
        edibility = {c: taxonomy[c].edibility for c in present}
        strata = {name: [c for c in present if edibility[c] in kinds] for name, kinds in STRATA.items()}
        strata["other"] = [c for c in present if not any(c in members for members in strata.values())]
        rng = np.random.default_rng(seed)
        take = _allocate({name: len(members) for name, members in strata.items()}, n)
        held = {c for name, members in strata.items() for c in rng.permutation(members)[: take[name]]}
    if len(held) > len(present) - 2:
        raise HoldoutError(f"{option} holds out {len(held)} of {len(present)} species; keep at least 2")
    return [c for c in taxonomy.classes if c in held]


@dataclass
class Holdout:
    """The split of species into known and held-out, and the images of each."""

    taxonomy: Taxonomy  # the full table: the prepared data's label ids
    known: Taxonomy  # the known species' own table: the known splits' label ids
    held_out: list[str]
    spec: list[str]
    seed: int
    unknown: DatasetDict  # the held-out species' images of every split, labels of the full table

    def record(self) -> dict:
        """What a run writes beside its results (``holdout_species.json``)."""
        edibility = {c: self.taxonomy[c].edibility for c in self.held_out}
        return {
            "holdout_species": self.spec,
            "holdout_seed": self.seed,
            "held_out": self.held_out,
            "held_out_edibility": edibility,
            "known_species": len(self.known),
            "unknown_images": {name: len(split) for name, split in self.unknown.items()},
        }


def split_holdout(splits: DatasetDict, taxonomy: Taxonomy, held_out: list[str], spec=None, seed: int = 0):
    """``(known splits, Holdout)``: ``splits`` without the ``held_out`` species, relabelled to the known table's
    ids, and the held-out images of every split (full-table labels). No hold-out: ``(splits, None)``."""
    if not held_out:
        return splits, None
    held_ids = np.array([taxonomy.id(c) for c in held_out])
    known = taxonomy.subset([c for c in taxonomy.classes if c not in set(held_out)])
    new_id = np.full(len(taxonomy), -1)
    new_id[[taxonomy.id(c) for c in known.classes]] = np.arange(len(known))

    def is_held(labels):
        return np.isin(labels, held_ids).tolist()

    def is_known(labels):
        return (~np.isin(labels, held_ids)).tolist()

    def relabel(labels):
        return {"label": new_id[np.asarray(labels)].tolist()}

    known_splits, unknown = DatasetDict(), DatasetDict()
    bars = not are_progress_bars_disabled()
    disable_progress_bars()  # a bar per split for a filter of labels is noise
    try:
        for name, split in splits.items():
            kept = split.filter(is_known, input_columns="label", batched=True)
            features = kept.features.copy()
            features["label"] = ClassLabel(names=known.classes)
            known_splits[name] = kept.map(relabel, input_columns="label", batched=True, features=features)
            unknown[name] = split.filter(is_held, input_columns="label", batched=True)
    finally:
        if bars:
            enable_progress_bars()
    return known_splits, Holdout(taxonomy, known, list(held_out), list(spec or held_out), seed, unknown)


def apply_holdout(splits: DatasetDict, taxonomy: Taxonomy, spec: list[str] | None, seed: int):
    """:func:`choose_holdout` on the training split's species, then :func:`split_holdout`."""
    if not spec:
        return splits, None
    present = [taxonomy.classes[i] for i in splits["train"].unique("label")]
    held_out = choose_holdout(taxonomy, spec, seed, present)
    return split_holdout(splits, taxonomy, held_out, spec, seed)
