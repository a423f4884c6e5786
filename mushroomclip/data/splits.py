"""Loading prepared data: the ImageFolder written by ``data_scripts/prepare_kaggle.py``."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from datasets import ClassLabel, load_dataset

from mushroomclip.taxonomy import Taxonomy, load_taxonomy

SPLITS = ("train", "validation", "test")
REPORT_NAME = "prepare_report.json"  # written last by prepare, with "complete": true when it finished


def prepared_taxonomy(data_dir: str | Path) -> Taxonomy:
    """The table a prepared folder's label ids index (saved beside the data by prepare)."""
    path = Path(data_dir) / "taxonomy.csv"
    return load_taxonomy(path if path.is_file() else None)


def load_splits(data_dir: str | Path, **load_kwargs):
    """``DatasetDict`` of the prepared splits; ``label`` is a ``ClassLabel`` of all species names.

    Columns: image, label, species, kingdom ... genus, common_name, edibility, taxonomy, source.
    Label ids are row indices of the taxonomy table, identical across data sets.
    """
    data_dir = Path(data_dir)
    missing = [s for s in SPLITS if not (data_dir / s / "metadata.csv").is_file()]
    if not data_dir.is_dir() or missing:
        raise FileNotFoundError(
            f"{data_dir} is not a prepared MushroomCLIP data folder (no {', '.join(f'{s}/metadata.csv' for s in missing)}); "
            f"run: python data_scripts/prepare_kaggle.py --source KAGGLE_DOWNLOAD --output {data_dir}"
        )
    if not _prepare_finished(data_dir):
        raise FileNotFoundError(
            f"{data_dir} is incomplete: its last prepare run was interrupted or failed (no finished {REPORT_NAME}); "
            f"run again: python data_scripts/prepare_kaggle.py --source KAGGLE_DOWNLOAD --output {data_dir}"
        )
    taxonomy = prepared_taxonomy(data_dir)
    splits = load_dataset("imagefolder", data_dir=str(data_dir), **load_kwargs)
    return splits.cast_column("label", ClassLabel(names=taxonomy.classes))


def _prepare_finished(data_dir: Path) -> bool:
    try:
        return json.loads((data_dir / REPORT_NAME).read_text()).get("complete") is True
    except (OSError, ValueError):
        return False


def split_fingerprint(data_dir: str | Path, split: str) -> str:
    """Identifies a prepared split's content (its metadata.csv) for feature caches."""
    return hashlib.sha256((Path(data_dir) / split / "metadata.csv").read_bytes()).hexdigest()[:16]
