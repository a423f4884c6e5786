"""`make bench-hierarchy`: do the taxonomy-aware losses lower mistake severity? Measured, with seeds and intervals.

On synthetic data with a genus-level signal (``make_synthetic.py --genus-signal``: the species of one genus share
a colour family), the tiny CLIP of ``configs/tiny.yaml`` is trained with each loss for several seeds; every run's
test OA, mIoU, mistake severity (mean LCA height of the wrong answers) and average hierarchical distance of the
top-5 are recorded, with each loss's mean and 95% t-interval over the seeds, and the paired difference from the
plain loss (same seed: same initialisation, data order and augmentation) with its 95% t-interval. The figures
say what this small synthetic setting shows, nothing about real photos.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

import numpy as np
from scipy import stats

from mushroomclip.config import load_train_config
from mushroomclip.evaluation.speed import machine
from mushroomclip.metrics import save_json
from mushroomclip.provenance import run_provenance

logger = logging.getLogger(__name__)

LOSSES = ("class_text", "hierarchical_soft", "hierarchical_xent")
BASELINE = "class_text"
METRICS = ("oa", "miou", "mistake_severity", "hdist_top5")
TABLE_START, TABLE_END = "<!-- hierarchy-table start -->", "<!-- hierarchy-table end -->"
CONFIG = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"


def interval(values: list[float]) -> dict:
    """Mean and the 95% Student-t interval of the mean over ``values`` (one per seed)."""
    x = np.asarray(values, dtype=np.float64)
    mean = float(x.mean())
    if len(x) < 2:
        return {"mean": mean, "ci95": None, "n": len(x)}
    half = float(stats.t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / np.sqrt(len(x)))
    return {"mean": mean, "ci95": [mean - half, mean + half], "n": len(x)}


def summarise(per_seed: dict[str, list[dict]]) -> dict:
    """Per loss: each metric's :func:`interval`, and its paired difference from :data:`BASELINE` (same seeds)."""
    out = {}
    base = per_seed.get(BASELINE)
    for loss, runs in per_seed.items():
        row = {key: interval([r[key] for r in runs]) for key in METRICS}
        if base is not None and loss != BASELINE:
            row["minus_" + BASELINE] = {
                key: interval([r[key] - b[key] for r, b in zip(runs, base, strict=True)]) for key in METRICS
            }
        out[loss] = row
    return out


def run_one(data: str, loss: str, seed: int, steps: int, work: Path) -> dict:
    """One tiny training run; its test figures."""
    from mushroomclip.training.trainer import run_training  # heavy: only when runs are made

    overrides = [
        f"data.path={data}",
        f"training.output_dir={work / f'{loss}-{seed}'}",
        f"training.seed={seed}",
        f"training.max_steps={steps}",
        f"training.eval_steps={steps}",
        "training.report_to=none",
        "training.disable_tqdm=true",
        f"loss.name={loss}",
        "data.num_workers=0",
    ]
    test = run_training(load_train_config(CONFIG, overrides))["test"]
    return {
        "seed": seed,
        "oa": test["oa"],
        "miou": test["miou"],
        "mistake_severity": test["mistake_severity"],
        "hdist_top5": test["hierarchical_distance_top_k"]["top5"],
    }


def run_benchmark(data: str, seeds: int, steps: int, losses=LOSSES) -> dict:
    """Every loss x seed on ``data``; per-seed figures, the summary, the machine and the provenance."""
    per_seed: dict[str, list[dict]] = {loss: [] for loss in losses}
    with tempfile.TemporaryDirectory(prefix="mushroomclip-hierarchy-") as work:
        for seed in range(seeds):
            for loss in losses:
                per_seed[loss].append(run_one(data, loss, seed, steps, Path(work)))
                logger.info("%s seed %d: %s", loss, seed, per_seed[loss][-1])
    config = {"data": data, "seeds": seeds, "steps": steps, "losses": list(losses), "config": str(CONFIG.name)}
    return {
        "benchmark": "hierarchy",
        "per_seed": per_seed,
        "summary": summarise(per_seed),
        "machine": machine("cpu"),
        **run_provenance(config, None),
    }


def _fmt(entry: dict, scale: float) -> str:
    if entry["ci95"] is None:
        return f"{scale * entry['mean']:.2f}"
    low, high = (scale * v for v in entry["ci95"])
    return f"{scale * entry['mean']:.2f} [{low:.2f}, {high:.2f}]"


def render_table(result: dict) -> str:
    """The docs table: per loss, each metric's mean [95% CI], and the paired differences from the plain loss."""
    cfg = result["config"]
    data = "/".join(Path(cfg["data"]).parts[-2:])
    lines = [
        f"Tiny CLIP (`configs/{cfg['config']}`, {cfg['steps']} steps), {cfg['seeds']} seeds, synthetic genus-signal "
        f"data `{data}`; {result['machine']['cores']}-core {result['machine']['cpu']}, no GPU; "
        f"commit {result.get('git_commit')}.",
        "",
        "| loss | test OA % | test mIoU % | mistake severity | hier. distance top-5 | OA − class_text (points) "
        "| severity − class_text | distance top-5 − class_text |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for loss, row in result["summary"].items():
        delta = row.get("minus_" + BASELINE, {})
        scales = {"oa": 100, "mistake_severity": 1, "hdist_top5": 1}
        deltas = [_fmt(delta[key], scale) if key in delta else "-" for key, scale in scales.items()]
        lines.append(
            f"| {loss} | {_fmt(row['oa'], 100)} | {_fmt(row['miou'], 100)} | {_fmt(row['mistake_severity'], 1)} | "
            f"{_fmt(row['hdist_top5'], 1)} | {' | '.join(deltas)} |"
        )
    lines += ["", verdict(result)]
    return "\n".join(lines)


VERDICT_METRICS = {
    "oa": "test OA",
    "mistake_severity": "mistake severity",
    "hdist_top5": "the hierarchical distance of the top-5",
}


def verdict(result: dict) -> str:
    """What the paired intervals say, per loss and metric, and no more."""
    parts = []
    for loss, row in result["summary"].items():
        for key, name in VERDICT_METRICS.items():
            delta = row.get("minus_" + BASELINE, {}).get(key)
            if not delta or delta["ci95"] is None:
                continue
            low, high = delta["ci95"]
            if high < 0:
                parts.append(f"{loss} lowers {name} (95% interval of the paired difference below 0)")
            elif low > 0:
                parts.append(f"{loss} raises {name} (95% interval of the paired difference above 0)")
            else:
                parts.append(f"{loss}: no significant difference in {name} (the interval contains 0)")
    return ("Against class_text, same seeds: " + "; ".join(parts) + ".") if parts else ""


def update_docs(page: Path, result_file: Path) -> str:
    """Replace the table between the hierarchy-table markers of ``page`` with one built from ``result_file``."""
    if not result_file.is_file():
        raise FileNotFoundError(f"{result_file} not found: run make bench-hierarchy first")
    text = page.read_text()
    if TABLE_START not in text or TABLE_END not in text:
        raise ValueError(f"{page} has no {TABLE_START} ... {TABLE_END} markers")
    table = render_table(json.loads(result_file.read_text()))
    head, rest = text.split(TABLE_START, 1)
    page.write_text(f"{head}{TABLE_START}\n{table}\n{TABLE_END}{rest.split(TABLE_END, 1)[1]}")
    return table


def write(result: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_json(path, result)
