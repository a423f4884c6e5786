"""An artificially long-tailed training split: ``data.imbalance: {profile, ratio, seed}``.

Only the training split is subsampled; validation and test stay as prepared, so a run's figures are comparable
with those of a run on the whole data. The ``C`` species that have training images are ranked by their number of
training images, most first (equal numbers in the order of a seeded permutation,
``numpy.random.default_rng(seed).permutation`` of their ids in table order: on balanced data the seed alone ranks
them), and the species of rank ``i`` (0 = head) is asked for

- ``exponential`` (Cui et al. 2019; Cao et al. 2019, LDAM): ``n_i = max(1, floor(n_max * ratio ** (-i / (C - 1))))``
  (``n_0 = n_max``, ``n_{C-1} = floor(n_max / ratio)``);
- ``step`` (Cao et al. 2019): the first ``ceil(C / 2)`` ranks keep ``n_max``, the other ``floor(C / 2)``
  ``max(1, floor(n_max / ratio))``.

(The floor allows 1e-9 of float rounding, so that ``500 * 100 ** -1`` is 5.) ``n_max`` is the largest number, at
most the head's images, for which every species has its target, lowered by less than ``ratio`` where that makes
``n_max / n_{C-1}`` exactly ``ratio`` (:func:`choose_n_max`): the kept counts follow the profile exactly,
whatever the data's own imbalance (ranking the plentiful species first keeps ``n_max`` near the largest count; a
seeded rank would let a rare species at the head shrink it, and the ratio the seed gives). Which images a species
keeps is drawn with ``default_rng([seed, class id])``. The same data and seed always give the same images;
:meth:`Imbalance.record` is the run's ``class_counts.json``.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass

import numpy as np
from datasets import DatasetDict

from mushroomclip.taxonomy import Taxonomy

IMBALANCE_FILE = "class_counts.json"
PROFILES = ("exponential", "step")
DEFAULTS = {"profile": "exponential", "ratio": 100, "seed": 0}


class ImbalanceError(ValueError):
    """``data.imbalance`` is malformed or cannot be applied to this data."""


def resolve_imbalance(spec: dict | None) -> dict | None:
    """``data.imbalance`` checked, with the defaults (exponential, ratio 100, seed 0) filled in; None when unset."""
    if spec is None:
        return None
    if not isinstance(spec, dict):
        raise ImbalanceError(
            f"data.imbalance must be a mapping like {{profile: exponential, ratio: 100}}, got {spec!r}"
        )
    for key in spec:
        if key not in DEFAULTS:
            close = difflib.get_close_matches(str(key), DEFAULTS, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ImbalanceError(f"unknown key data.imbalance.{key}{hint} (valid keys: profile, ratio, seed)")
    resolved = DEFAULTS | spec
    profile, ratio, seed = resolved["profile"], resolved["ratio"], resolved["seed"]
    if profile not in PROFILES:
        raise ImbalanceError(f"data.imbalance.profile must be exponential or step, got {profile!r}")
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not (math.isfinite(ratio) and ratio >= 1):
        raise ImbalanceError(f"data.imbalance.ratio must be a number of at least 1 (e.g. 100), got {ratio!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ImbalanceError(f"data.imbalance.seed must be an integer, 0 or more, got {seed!r}")
    return {"profile": profile, "ratio": ratio, "seed": seed}


def _floor(value: float) -> int:
    return math.floor(value + 1e-9)


def target_counts(profile: str, ratio: float, n_max: int, num_classes: int) -> list[int]:
    """The images requested for ranks ``0 .. num_classes - 1`` (formulas in the module docstring)."""
    if profile == "exponential":
        if num_classes == 1:
            return [n_max]
        return [max(1, _floor(n_max * ratio ** (-i / (num_classes - 1)))) for i in range(num_classes)]
    if profile == "step":
        head = num_classes - num_classes // 2
        return [n_max if i < head else max(1, _floor(n_max / ratio)) for i in range(num_classes)]
    raise ImbalanceError(f"data.imbalance.profile must be exponential or step, got {profile!r}")


@dataclass
class Imbalance:
    """The subsampling of one training split: which species at which rank, asked for and kept how many images."""

    spec: dict  # resolved data.imbalance
    species: list[str]  # rank order, head first
    available: list[int]
    requested: list[int]
    used: list[int]
    indices: np.ndarray  # the kept rows of the training split, in their original order

    def record(self) -> dict:
        """``class_counts.json``: the profile, the counts requested and used per species (rank order), and the
        ratio the kept counts actually have."""
        used = [u for u in self.used if u > 0]
        return {
            **self.spec,
            "n_max": self.requested[0],
            "num_species": len(self.species),
            "images_before": int(sum(self.available)),
            "images_after": int(sum(self.used)),
            "ratio_used": max(used) / min(used),
            "species": [
                {"rank": i, "species": s, "available": a, "requested": r, "used": u}
                for i, (s, a, r, u) in enumerate(zip(self.species, self.available, self.requested, self.used))
            ],
        }


def largest_n_max(spec: dict, available: np.ndarray) -> int:
    """The largest ``n_max`` (at most ``available[0]``) whose targets no species of ``available`` (rank order) falls
    short of."""
    n = int(available[0])
    while n > 1:
        targets = np.asarray(target_counts(spec["profile"], spec["ratio"], n, len(available)))
        if np.all(targets <= available):
            break
        # each target is at most n * its factor: the tightest species' images over its factor bound n from above
        n = min(n - 1, int(np.min((available + 1) / (targets / n))))
    return max(n, 1)


def choose_n_max(spec: dict, available: np.ndarray) -> int:
    """:func:`largest_n_max`, lowered by less than ``ratio`` where that makes the kept head / tail ratio exactly
    ``ratio`` (the floor of the tail's target otherwise moves it: 39 / floor(3.9) = 13 for a ratio of 10)."""
    n = largest_n_max(spec, available)
    if len(available) < 2:
        return n
    for m in range(n, max(0, n - math.ceil(spec["ratio"])), -1):
        if math.isclose(m / target_counts(spec["profile"], spec["ratio"], m, len(available))[-1], spec["ratio"]):
            return m
    return n  # no n_max near it gives the ratio exactly (n_max below the ratio, a fractional ratio): ratio_used says


def subsample(labels, taxonomy: Taxonomy, spec: dict) -> Imbalance:
    """The rows of a training split (its ``labels``) that ``spec`` (resolved ``data.imbalance``) keeps."""
    labels = np.asarray(labels)
    counts = np.bincount(labels, minlength=len(taxonomy))
    present = np.flatnonzero(counts)
    if len(present) == 0:
        raise ImbalanceError("data.imbalance: the training split has no images")
    shuffled = np.random.default_rng(spec["seed"]).permutation(present)
    ranked = shuffled[np.argsort(-counts[shuffled], kind="stable")]  # most images first; ties: the seeded order
    available = counts[ranked]
    requested = target_counts(spec["profile"], spec["ratio"], choose_n_max(spec, available), len(ranked))
    used = np.asarray(requested)
    kept = []
    for class_id, n in zip(ranked.tolist(), used.tolist()):
        rows = np.flatnonzero(labels == class_id)
        kept.append(np.random.default_rng([spec["seed"], class_id]).permutation(rows)[:n])
    return Imbalance(
        spec=dict(spec),
        species=[taxonomy.classes[c] for c in ranked],
        available=available.tolist(),
        requested=list(requested),
        used=used.tolist(),
        indices=np.sort(np.concatenate(kept)),
    )


def apply_imbalance(splits: DatasetDict, taxonomy: Taxonomy, spec: dict | None) -> tuple[DatasetDict, Imbalance | None]:
    """``splits`` with the training split subsampled by ``spec`` (resolved ``data.imbalance``; None: unchanged)."""
    if spec is None:
        return splits, None
    imbalance = subsample(splits["train"]["label"], taxonomy, spec)
    out = DatasetDict(splits)
    out["train"] = splits["train"].select(imbalance.indices)
    return out, imbalance
