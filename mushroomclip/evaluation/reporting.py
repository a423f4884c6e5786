"""Writing an evaluation's results: metrics.json with provenance, and its figures."""

from __future__ import annotations

from pathlib import Path

from mushroomclip.evaluation.plots import save_confusion_png, save_rank_accuracy_png
from mushroomclip.metrics import save_json
from mushroomclip.provenance import run_provenance
from mushroomclip.taxonomy import Taxonomy


def write_results(
    out_dir: str | Path, metrics: dict, taxonomy: Taxonomy, config: dict, seed: int | None, name: str = ""
) -> Path:
    """``out_dir/metrics.json`` (metrics + what produced them), ``confusion.png``, ``rank_accuracy.png``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    record = {
        "name": name,
        "metrics": metrics,
        "taxonomy_sha256": taxonomy.fingerprint,
        **run_provenance(config, seed),
    }
    save_json(out_dir / "metrics.json", record)
    save_confusion_png(metrics["confusion"], taxonomy, out_dir / "confusion.png", title=f"{name} confusion".strip())
    if "rank_accuracy" in metrics:
        save_rank_accuracy_png(metrics, out_dir / "rank_accuracy.png", title=f"{name} accuracy by rank".strip())
    return out_dir / "metrics.json"
