"""The species table: class order, lineage, LCA depth and the text renderings prompts use.

The bundled table (``resources/species_taxonomy.csv``) defines the 169 classes of the Kaggle
"Mushroom species recognition" data set. Class ids everywhere in MushroomCLIP are row indices of
this table, so they are stable across data sets. Every entry point takes ``--taxonomy FILE`` to use
another table with the same columns.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import io
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

#: Ranks from the root down; ``species`` is the table's ``label``.
RANKS: tuple[str, ...] = ("kingdom", "phylum", "class", "order", "family", "genus", "species")
#: Ranks that metrics report accuracy for (species accuracy is OA).
HIGHER_RANKS: tuple[str, ...] = ("genus", "family", "order", "class", "phylum")
EDIBILITY = ("edible", "inedible", "poisonous", "deadly", "psychoactive", "unknown")
DANGEROUS = ("deadly", "poisonous")
TEXT_TYPES = ("sci", "com", "taxon", "sci_com", "taxon_com")
COLUMNS = (
    "label",
    "kingdom",
    "phylum",
    "class",
    "order",
    "family",
    "genus",
    "common_name",
    "edibility",
    "lichen",
    "synonym_of",
)
BUNDLED = "bundled species_taxonomy.csv"


class TaxonomyError(ValueError):
    """The taxonomy table is malformed, or a species is not in it."""


@dataclass(frozen=True)
class Species:
    label: str
    kingdom: str
    phylum: str
    class_: str
    order: str
    family: str
    genus: str
    common_name: str
    edibility: str
    lichen: bool
    synonym_of: str | None

    @property
    def lineage(self) -> tuple[str, ...]:
        """Names from kingdom down to species, in ``RANKS`` order."""
        return (self.kingdom, self.phylum, self.class_, self.order, self.family, self.genus, self.label)

    @property
    def epithet(self) -> str:
        return self.label.split(" ", 1)[1] if " " in self.label else self.label


class Taxonomy:
    """An ordered, validated species table. Load it with :func:`load_taxonomy`."""

    def __init__(self, species: list[Species], source: str, raw: bytes):
        self.species = tuple(species)
        self.source = source
        self.raw = raw  # the CSV's bytes, copied beside prepared data so the ids stay interpretable
        #: sha256 of the table's bytes: keys caches and ties results to the table they used.
        self.fingerprint = hashlib.sha256(raw).hexdigest()
        self.classes: list[str] = [s.label for s in self.species]
        self._index = {name: i for i, name in enumerate(self.classes)}

    def __len__(self) -> int:
        return len(self.species)

    def __contains__(self, label: object) -> bool:
        return label in self._index

    def __repr__(self) -> str:
        return f"Taxonomy({len(self)} species from {self.source})"

    def id(self, label: str) -> int:
        """The class id of ``label``; an unknown label is an error that names it."""
        try:
            return self._index[label]
        except KeyError:
            raise TaxonomyError(
                f"species {label!r} is not in the taxonomy ({self.source}); "
                "fix the label, or use your own table (--taxonomy FILE; in a training config, data.taxonomy)"
            ) from None

    def __getitem__(self, key: int | str) -> Species:
        return self.species[key if isinstance(key, int) else self.id(key)]

    def lineage(self, label: str) -> dict[str, str]:
        """``{"kingdom": "Fungi", ..., "species": label}``."""
        return dict(zip(RANKS, self[label].lineage))

    def lca_depth(self, a: str, b: str) -> int:
        """Number of leading ranks two species share: 7 for the same species, 0 for other kingdoms."""
        depth = 0
        for x, y in zip(self[a].lineage, self[b].lineage):
            if x != y:
                break
            depth += 1
        return depth

    @functools.cached_property
    def rank_codes(self) -> np.ndarray:
        """``(len(RANKS), C)`` ints: equal codes in a row mean the same taxon at that rank."""
        codes = np.empty((len(RANKS), len(self)), dtype=np.int64)
        for r in range(len(RANKS)):
            # A rank's taxon is identified by its whole path, so equal names under different parents differ.
            paths = [s.lineage[: r + 1] for s in self.species]
            lookup = {p: i for i, p in enumerate(dict.fromkeys(paths))}
            codes[r] = [lookup[p] for p in paths]
        return codes

    @functools.cached_property
    def lca_depth_matrix(self) -> np.ndarray:
        """``(C, C)`` LCA depths, vectorised from :attr:`rank_codes`."""
        same = self.rank_codes[:, :, None] == self.rank_codes[:, None, :]  # (R, C, C)
        return np.cumprod(same, axis=0).sum(axis=0)

    @functools.cached_property
    def lca_distance_matrix(self) -> np.ndarray:
        """``(C, C)`` height of the lowest common ancestor (Bertinetto et al. 2020): 0 for the same species,
        1 for the same genus ... ``len(RANKS)`` for different kingdoms (all leaves sit ``len(RANKS)`` below the root)."""
        return len(RANKS) - self.lca_depth_matrix

    @property
    def lineage_codes(self) -> np.ndarray:
        """``(C, len(RANKS))`` node ids of each class's lineage, kingdom first (the transpose of :attr:`rank_codes`)."""
        return self.rank_codes.T

    @functools.cached_property
    def dangerous_mask(self) -> np.ndarray:
        """``(C,)`` bools: the species is deadly or poisonous."""
        return np.isin(self.edibility_of(np.arange(len(self))), DANGEROUS)

    @functools.cached_property
    def edible_mask(self) -> np.ndarray:
        """``(C,)`` bools: the species is edible (inedible, psychoactive and unknown are not)."""
        return self.edibility_of(np.arange(len(self))) == "edible"

    def edibility_of(self, ids: np.ndarray) -> np.ndarray:
        table = np.array([s.edibility for s in self.species])
        return table[np.asarray(ids)]

    def subset(self, labels: list[str] | set[str]) -> Taxonomy:
        """The table restricted to ``labels`` (in this table's order): its CSV is this one's rows for them, so
        a run that trains on part of the species writes a table its own class ids index."""
        keep = set(labels)
        for label in keep:
            self.id(label)  # a TaxonomyError naming a label that is not here
        text = self.raw.decode("utf-8-sig")
        reader = csv.DictReader(text.splitlines())
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=reader.fieldnames, lineterminator="\n")
        writer.writeheader()
        writer.writerows(row for row in reader if (row.get("label") or "").strip() in keep)
        raw = out.getvalue().encode("utf-8")
        source = f"{self.source} ({len(keep)} of its species)"
        return Taxonomy(_parse(raw.decode("utf-8"), source), source, raw)

    def text(self, label: str, text_type: str) -> str:
        """Renderings used by prompts, named as in BioCLIP's text-type ablation.

        ``taxon`` uses the table's genus, so a renamed species reads as its current name
        ("Armillaria tabescens" -> "... Physalacriaceae Desarmillaria tabescens").
        """
        s = self[label]
        taxon = " ".join((*s.lineage[:-1], s.epithet))
        renderings = {
            "sci": s.label,
            "com": s.common_name or s.label,
            "taxon": taxon,
            "sci_com": f"{s.label} with common name {s.common_name}" if s.common_name else s.label,
            "taxon_com": f"{taxon} with common name {s.common_name}" if s.common_name else taxon,
        }
        if text_type not in renderings:
            raise ValueError(f"unknown text type {text_type!r}; choose one of {', '.join(TEXT_TYPES)}")
        return renderings[text_type]

    def taxonomic_order(self, ids: np.ndarray | None = None) -> np.ndarray:
        """Class ids sorted by lineage, so related species sit together (confusion-matrix axes)."""
        ids = np.arange(len(self)) if ids is None else np.asarray(ids)
        return ids[sorted(range(len(ids)), key=lambda i: self.species[ids[i]].lineage)]


def _parse(text: str, source: str) -> list[Species]:
    reader = csv.DictReader(text.splitlines())
    missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
    if missing:
        raise TaxonomyError(
            f"{source} is missing column(s) {', '.join(missing)}; expected the header {','.join(COLUMNS)}"
        )
    species, seen = [], set()
    for line, row in enumerate(reader, start=2):
        row = {k: (v or "").strip() for k, v in row.items() if k is not None}
        where = f"{source} line {line}"
        blank = [c for c in COLUMNS[:8] if c != "common_name" and not row[c]]
        if blank:
            raise TaxonomyError(f"{where}: empty {', '.join(blank)}")
        if row["label"] in seen:
            raise TaxonomyError(f"{where}: species {row['label']!r} appears twice")
        if row["edibility"] not in EDIBILITY:
            raise TaxonomyError(f"{where}: edibility {row['edibility']!r} is not one of {', '.join(EDIBILITY)}")
        seen.add(row["label"])
        species.append(
            Species(
                label=row["label"],
                kingdom=row["kingdom"],
                phylum=row["phylum"],
                class_=row["class"],
                order=row["order"],
                family=row["family"],
                genus=row["genus"],
                common_name=row["common_name"],
                edibility=row["edibility"],
                lichen=row["lichen"].lower() in ("yes", "true", "1"),
                synonym_of=row["synonym_of"] or None,
            )
        )
    if not species:
        raise TaxonomyError(f"{source} has no species rows")
    return species


@functools.lru_cache(maxsize=8)
def _load_cached(path: str | None) -> Taxonomy:
    if path is None:
        data = resources.files("mushroomclip").joinpath("resources/species_taxonomy.csv").read_bytes()
        source = BUNDLED
    else:
        p = Path(path)
        if not p.is_file():
            raise TaxonomyError(
                f"taxonomy file {p} does not exist; pass --taxonomy with a CSV of columns {','.join(COLUMNS)}"
            )
        data, source = p.read_bytes(), str(p)
    return Taxonomy(_parse(data.decode("utf-8-sig"), source), source, data)


def load_taxonomy(path: str | Path | None = None) -> Taxonomy:
    """The bundled table, or the CSV at ``path``; parsed and validated once per path."""
    return _load_cached(None if path is None else str(Path(path).resolve()))
