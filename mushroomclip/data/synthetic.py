"""A fake Kaggle download in the exact layout of the real one, with a learnable signal per class.

Each species gets its own hue, shape and background pattern, jittered per image, so a model can learn
the classes but not by copying pixels. Used by the tests, the demo and the benchmarks at any scale.
With ``genus_signal`` the species come in genus groups whose members share a colour family (shape and
background still tell them apart), so a benchmark can ask whether taxonomy-aware losses keep mistakes
inside the genus.
"""

from __future__ import annotations

import csv
import json
import multiprocessing
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from mushroomclip.data.kaggle import CSV_FOR_SPLIT, IMAGES_DIR, KAGGLE_PREFIX
from mushroomclip.taxonomy import Taxonomy, load_taxonomy

SHAPES = ("ellipse", "rectangle", "triangle", "stripes")
UNKNOWN_SPECIES = "Fakeus fungus"


@dataclass(frozen=True)
class ClassStyle:
    hue: float
    shape: str
    background: float  # 0..1: brightness of the background gradient


def class_style(class_index: int, genus_index: int | None = None, member: int = 0) -> ClassStyle:
    """A distinct look for class ``class_index``: golden-ratio hues x 4 shapes x 3 backgrounds. With a
    ``genus_index`` the hue is the genus's (golden-ratio spaced), shifted slightly for its ``member``-th species."""
    hue = class_index * 0.618034 if genus_index is None else genus_index * 0.618034 + 0.02 * member
    return ClassStyle(
        hue=hue % 1.0,
        shape=SHAPES[class_index % len(SHAPES)],
        background=(0.2, 0.5, 0.8)[(class_index // len(SHAPES)) % 3],
    )


def _hsv_to_rgb(h: float, s: float, v: float) -> tuple[int, int, int]:
    i, f = int(h * 6) % 6, h * 6 - int(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    r, g, b = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]
    return int(r * 255), int(g * 255), int(b * 255)


def render(style: ClassStyle, size: int, rng: np.random.Generator) -> Image.Image:
    """One image of a class: noisy gradient background and a jittered coloured shape."""
    ramp = np.linspace(0.6, 1.0, size, dtype=np.float32)[:, None] * style.background
    base = np.repeat((ramp * 255)[:, :, None], 3, axis=2) * np.ones((size, size, 3), np.float32)
    noise = rng.normal(0, 12, (size // 8 + 1, size // 8 + 1, 3)).repeat(8, 0).repeat(8, 1)[:size, :size]
    image = Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    colour = _hsv_to_rgb((style.hue + rng.normal(0, 0.02)) % 1.0, 0.85, rng.uniform(0.75, 1.0))
    half = size * rng.uniform(0.22, 0.35)
    cx, cy = size * rng.uniform(0.35, 0.65), size * rng.uniform(0.35, 0.65)
    box = (cx - half, cy - half, cx + half, cy + half)
    if style.shape == "ellipse":
        draw.ellipse(box, fill=colour)
    elif style.shape == "rectangle":
        draw.rectangle(box, fill=colour)
    elif style.shape == "triangle":
        draw.polygon([(cx, cy - half), (cx - half, cy + half), (cx + half, cy + half)], fill=colour)
    else:
        for k in range(4):
            y0 = cy - half + k * half / 2
            draw.rectangle((cx - half, y0, cx + half, y0 + half / 4), fill=colour)
    return image


def choose_species(taxonomy: Taxonomy, classes: int) -> list[str]:
    """``classes`` species spread evenly over the table (so genera and families vary), one deadly."""
    if not 1 <= classes <= len(taxonomy):
        raise ValueError(f"--classes must be between 1 and {len(taxonomy)}, got {classes}")
    picked = [taxonomy.classes[i] for i in np.linspace(0, len(taxonomy) - 1, classes).round().astype(int)]
    deadly = [s.label for s in taxonomy.species if s.edibility == "deadly"]
    if classes >= 2 and deadly and not set(deadly) & set(picked):
        picked[-1] = deadly[0]  # the safety metrics need a deadly species to be exercised
    return sorted(picked)


def choose_genus_groups(taxonomy: Taxonomy, classes: int) -> list[str]:
    """``classes`` species from genera of at least two, the same number from each genus (first members in table
    order, its deadly one included), genera spread over the table, one of them holding a deadly species."""
    groups: dict[str, list[str]] = {}
    for s in taxonomy.species:
        groups.setdefault(s.genus, []).append(s.label)
    genera = [g for g, members in groups.items() if len(members) >= 2]
    largest = sum(len(groups[g]) for g in genera)
    if not 2 <= classes <= largest:
        raise ValueError(
            f"--classes must be between 2 and {largest} with --genus-signal (genera of two or more), got {classes}"
        )
    per_genus = max(2, -(-classes // len(genera)))
    count = -(-classes // per_genus)
    picked = [genera[i] for i in dict.fromkeys(np.linspace(0, len(genera) - 1, count).round().astype(int))]
    deadly = [g for g in genera if any(taxonomy[m].edibility == "deadly" for m in groups[g])]
    if deadly and not set(deadly) & set(picked):
        picked[-1] = deadly[0]  # the safety metrics need a deadly species to be exercised
    species = []
    for genus in sorted(picked, key=lambda g: g not in deadly):  # a deadly genus first: the cut below spares it
        members = sorted(groups[genus], key=lambda m: taxonomy[m].edibility != "deadly")  # stable: table order
        species += sorted(members[:per_genus], key=taxonomy.id)
    # genera smaller than per_genus leave room: fill it with further members, of the picked genera first
    spare = [m for g in picked + [g for g in genera if g not in picked] for m in groups[g] if m not in species]
    return sorted((species + spare)[:classes])


def genus_styles(taxonomy: Taxonomy, species: list[str]) -> dict[str, ClassStyle]:
    """Each species' look with the genus signal: one colour family per genus among ``species``."""
    genera = list(dict.fromkeys(taxonomy[s].genus for s in species))
    members: dict[str, int] = {}
    styles = {}
    for s in species:
        genus = taxonomy[s].genus
        styles[s] = class_style(taxonomy.id(s), genera.index(genus), members.setdefault(genus, 0))
        members[genus] += 1
    return styles


def _render_job(job: tuple) -> None:
    path, style, size, seed = job
    render(style, size, np.random.default_rng(seed)).save(path, quality=90)


def _split_counts(n: int) -> dict[str, int]:
    n_test = n_val = max(1, round(0.15 * n))
    return {"train": n - n_val - n_test, "validation": n_val, "test": n_test}


def make_synthetic_download(
    root: Path,
    classes: int = 6,
    per_class: int = 30,
    size: int = 64,
    seed: int = 0,
    taxonomy: Taxonomy | None = None,
    corrupt: int = 0,
    dirty: bool = False,
    num_proc: int = 1,
    genus_signal: bool = False,
) -> dict:
    """Write a fake download at ``root``; returns (and saves) a manifest of what was written.

    Class sizes vary between 0.5x and 1.5x ``per_class`` (the real data is imbalanced); train.csv is
    oversampled so every class has as many rows as the largest, like the Kaggle CSV. ``corrupt`` adds
    truncated JPEGs to train.csv; ``dirty`` adds one of every other kind of bad input. ``genus_signal``
    draws the species in genus groups that share a colour family (:func:`choose_genus_groups`).
    """
    taxonomy = taxonomy or load_taxonomy()
    root = Path(root)
    if root.exists():
        shutil.rmtree(root)
    rng = np.random.default_rng(seed)
    species = choose_genus_groups(taxonomy, classes) if genus_signal else choose_species(taxonomy, classes)
    styles = genus_styles(taxonomy, species) if genus_signal else {s: class_style(taxonomy.id(s)) for s in species}
    rows: dict[str, list[tuple[str, str]]] = {s: [] for s in CSV_FOR_SPLIT}
    jobs, files_by_class = [], {}
    for label in species:
        folder = root / IMAGES_DIR / label
        folder.mkdir(parents=True)
        n = max(3, int(round(per_class * rng.uniform(0.5, 1.5))))
        names = [folder / f"{i:05d}.jpg" for i in range(n)]
        jobs += [(path, styles[label], size, int(rng.integers(2**31))) for path in names]
        files_by_class[label] = names
        start = 0
        for split, count in _split_counts(n).items():
            rows[split] += [(str(p), label) for p in names[start : start + count]]
            start += count
    if num_proc > 1:
        with multiprocessing.get_context("fork").Pool(num_proc) as pool:
            pool.map(_render_job, jobs, chunksize=32)
    else:
        for job in jobs:
            _render_job(job)

    injected = {
        "corrupt_image": 0,
        "not_an_image": 0,
        "missing_file": 0,
        "unknown_label": 0,
        "cross_split_duplicate": 0,
        "within_split_duplicate": 0,
        "empty_class": 0,
    }
    first = species[0]
    for k in range(corrupt):
        bad = root / IMAGES_DIR / first / f"corrupt{k}.jpg"
        data = files_by_class[first][0].read_bytes()
        bad.write_bytes(data[: len(data) // 2])  # a truncated JPEG: header fine, pixels cut short
        rows["train"].append((str(bad), first))
        injected["corrupt_image"] += 1
    if dirty:
        text = root / IMAGES_DIR / first / "notes.jpg"
        text.write_text("field notes, not a photo")
        rows["validation"].append((str(text), first))
        rows["test"].append((str(root / IMAGES_DIR / first / "gone.jpg"), first))
        unknown = root / IMAGES_DIR / UNKNOWN_SPECIES
        unknown.mkdir()
        _render_job((unknown / "0.jpg", class_style(0), size, seed))
        rows["train"].append((str(unknown / "0.jpg"), UNKNOWN_SPECIES))
        # the same bytes under a new name: once in test (leak) and once more in train
        leak = root / IMAGES_DIR / first / "copy_in_test.jpg"
        shutil.copyfile(files_by_class[first][0], leak)
        rows["test"].append((str(leak), first))
        twin = root / IMAGES_DIR / first / "copy_in_train.jpg"
        shutil.copyfile(files_by_class[first][1], twin)
        rows["train"].append((str(twin), first))
        empty = next(s for s in taxonomy.classes if s not in species)
        (root / IMAGES_DIR / empty).mkdir()
        injected.update(
            not_an_image=1,
            missing_file=1,
            unknown_label=1,
            cross_split_duplicate=1,
            within_split_duplicate=1,
            empty_class=1,
        )
        injected["empty_class_name"] = empty

    # Oversample train.csv the Kaggle way: cycle each class's rows up to the largest class's count.
    by_class: dict[str, list] = {}
    for row in rows["train"]:
        by_class.setdefault(row[1], []).append(row)
    target = max(len(v) for v in by_class.values())
    train_rows = [group[i % len(group)] for group in by_class.values() for i in range(target)]
    rows["train"] = [train_rows[i] for i in rng.permutation(len(train_rows))]
    for split, name in CSV_FOR_SPLIT.items():
        with (root / name).open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["image_path", "label"])
            for path, label in rows[split]:
                writer.writerow([KAGGLE_PREFIX + str(Path(path).relative_to(root)), label])

    manifest = {
        "species": species,
        "images": sum(len(v) for v in files_by_class.values()),
        "per_split": {
            split: sum(_split_counts(len(v))[split] for v in files_by_class.values()) for split in CSV_FOR_SPLIT
        },
        "train_csv_rows": len(rows["train"]),
        "size": size,
        "seed": seed,
        "injected": injected,
    }
    if genus_signal:
        manifest["genus_signal"] = {s: taxonomy[s].genus for s in species}
    (root / "synthetic_manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest
