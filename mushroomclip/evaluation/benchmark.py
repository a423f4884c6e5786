"""`make benchmark`, `make bench-zero-shot`, `make bench-train`: the comparison table, and throughput.

python -m mushroomclip.evaluation.benchmark hub-reachable          exit 0 if the Hugging Face Hub answers
python -m mushroomclip.evaluation.benchmark novel --runs runs --results results   few-shot on held-out species
python -m mushroomclip.evaluation.benchmark report --results results
python -m mushroomclip.evaluation.benchmark speed --data DIR --model clip-b32 --batch-size 256
python -m mushroomclip.evaluation.benchmark train-speed --data DIR --model clip-b32     (or --model resnet-50)
python -m mushroomclip.evaluation.benchmark hierarchy --data DIR   losses x seeds: mistake severity with CIs
python -m mushroomclip.evaluation.benchmark table            docs/benchmarks.md speed table from results/bench/*.json

Speed results: images/s, FLOPs per step (FlopCounterMode), MFU and peak memory, written to
results/bench/NAME.json with the machine (:mod:`mushroomclip.evaluation.speed`).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from mushroomclip.data.holdout import HOLDOUT_FILE
from mushroomclip.data.splits import prepared_taxonomy
from mushroomclip.evaluation import hierarchy_bench, speed
from mushroomclip.evaluation.novel import NovelArguments, evaluate_novel
from mushroomclip.evaluation.plots import _pyplot
from mushroomclip.evaluation.references import REFERENCE_NOTE, reference_rows
from mushroomclip.evaluation.selective import risk_coverage_top1
from mushroomclip.evaluation.throughput import Levers, measure_speed, measure_train_speed
from mushroomclip.evaluation.zeroshot import RANDOM_WEIGHTS_NOTE, summary_markdown
from mushroomclip.models.backbones import hub_reachable, resolve_spec
from mushroomclip.models.supervised import CLASSIFIERS

NOVEL_DIR = "novel"
OFFLINE_NOTE = (
    "offline: no Hugging Face Hub, so these rows are the randomly initialised test models (tiny-clip, "
    "tiny-openclip, and runs trained from them or from tiny-resnet) on the synthetic demo data. They "
    "check the pipeline, not model quality."
)


def write_report(results: Path) -> Path:
    """``results/benchmark.md`` (the table, with a banner when offline, and the course's published ResNet figures
    as quoted reference rows) and ``results/benchmark.png`` (the measured rows)."""
    summary_path = results / "summary.json"
    if not summary_path.is_file():
        raise FileNotFoundError(f"{summary_path} not found; run evaluate_zero_shot.py --output {results} first")
    summary = json.loads(summary_path.read_text())
    cfg, rows = summary["config"], summary["rows"]
    offline = all(m.startswith("tiny-") for m in cfg["models"])  # adapters of tiny models are offline too
    # evaluate's own notes (random weights, the adapters and k-shot rows left out and why); older files lack them
    older = [RANDOM_WEIGHTS_NOTE] if cfg.get("random_weights") else []
    notes = ([OFFLINE_NOTE] if offline else []) + summary.get("notes", older)
    title = f"MushroomCLIP benchmark: {cfg['data']} ({cfg['split']} split)"
    markdown = summary_markdown(rows + reference_rows(), title, [*notes, REFERENCE_NOTE])
    for novel in sorted((results / NOVEL_DIR).glob("*/summary.md")):  # `benchmark novel`: a section per run
        markdown += "\n" + novel.read_text().replace("\n## ", "\n### ").replace("# ", "## ", 1)
    out = results / "benchmark.md"
    out.write_text(markdown)

    save_miou_png(rows, results / "benchmark.png", offline)
    figures = [save_severity_png(rows, results / "severity.png", offline)]
    figures.append(save_best_risk_coverage_png(rows, cfg, results, results / "risk_coverage.png"))
    links = [f"![{path.stem}]({path.name})" for path in figures if path is not None]
    if links:
        out.write_text(out.read_text() + "\n## Figures\n\n" + "\n\n".join(links) + "\n")
    return out


def _label(row: dict) -> str:
    return f"{row['model']} {row['method']} {row['text_type']}".strip()


def _key_below(fig, lines: list[str], height: float) -> None:
    """Lay ``fig`` out above a key of ``lines`` (one per line, small type), ``height`` inches of it at the bottom."""
    fig.text(0.01, 0.01, "\n".join(lines), fontsize=7, va="bottom", family="monospace")
    fig.tight_layout(rect=(0, height / fig.get_figheight(), 1, 1))


def save_miou_png(rows: list[dict], path: Path, offline: bool) -> Path:
    """mIoU by row, numbered as the key below the bars names them (long method names never push the bars out)."""
    plt = _pyplot()
    key = [f"{i:>2}  {_label(r)}" for i, r in enumerate(rows, start=1)]
    key_height = 0.14 * len(key) + 0.2
    fig, ax = plt.subplots(figsize=(9, 0.3 * len(rows) + 1.5 + key_height))
    ax.barh([str(i) for i in range(len(rows), 0, -1)], [100 * (r["miou"] or 0) for r in rows][::-1], color="#bc4749")
    ax.set_xlabel("mIoU (%)")
    ax.set_xlim(0, 100)
    ax.grid(axis="x", alpha=0.3)
    ax.set_title("offline pipeline check (tiny random models)" if offline else "mIoU by model and method")
    _key_below(fig, key, key_height)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def save_severity_png(rows: list[dict], path: Path, offline: bool) -> Path | None:
    """Bertinetto et al. 2020's figure: per model, the mistake severity (mean LCA height of the wrong answers)
    and the average hierarchical distance of the top-5 against the top-1 error. Points are numbered as the key
    below names them (models at the same point share one label); rows without the figures are left out."""
    # numbered as benchmark.png numbers the rows; rows without the figures (few-shot) are left out
    points = [
        (i, r) for i, r in enumerate(rows, 1) if r.get("mistake_severity") is not None and r.get("oa") is not None
    ]
    if not points:
        return None
    plt = _pyplot()
    key = [f"{i:>2}  {_label(r)}" for i, r in points]
    key_height = 0.14 * len(key) + 0.2
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2 + key_height))
    panels = (
        ("mistake_severity", "mistake severity (mean LCA height of mistakes)"),
        ("top5", "average hierarchical distance of the top-5"),
    )
    for ax, (key_name, label) in zip(axes, panels):
        at: dict[tuple, list[str]] = {}  # numbers of the models at each point
        for i, r in points:
            distance = (r.get("hierarchical_distance") or {}).get(key_name)
            y = r["mistake_severity"] if key_name == "mistake_severity" else distance
            if y is not None:
                at.setdefault((round(100 * (1 - r["oa"]), 1), round(y, 2)), []).append(str(i))  # as read
        for (x, y), numbers in at.items():
            ax.scatter(x, y, s=25, color="#1565c0")
            ax.annotate(",".join(numbers), (x, y), fontsize=8, xytext=(4, 3), textcoords="offset points")
        ax.set_xlabel("top-1 error (%)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    fig.suptitle(
        ("offline pipeline check: " if offline else "") + "mistake severity vs top-1 error (lower left is better)"
    )
    _key_below(fig, key, key_height)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def save_best_risk_coverage_png(rows: list[dict], cfg: dict, results: Path, path: Path, best: int = 3) -> Path | None:
    """The risk-coverage curves (error and dangerous->edible rate against coverage) of the ``best`` rows by mIoU
    that wrote per-image predictions (zero-shot, LoRA and supervised rows), on the evaluated split."""
    if cfg.get("holdout_species"):
        return None  # their labels index the known species' table, not the prepared one
    taxonomy = prepared_taxonomy(cfg["data"])
    chosen = []
    for r in sorted((r for r in rows if r.get("miou") is not None), key=lambda r: -r["miou"]):
        folder = results / ("supervised" if r["method"].startswith("supervised") else "zero_shot") / r["model"]
        parquet = folder / (r["text_type"] or "") / "predictions.parquet"
        if parquet.is_file():
            chosen.append((r, pd.read_parquet(parquet)))
        if len(chosen) == best:
            break
    curves = []
    for r, predictions in chosen:
        confidence = np.array([p[0] for p in predictions["top5_probs"]])
        try:
            curve = risk_coverage_top1(
                confidence, predictions["pred"].to_numpy(), predictions["label"].to_numpy(), taxonomy
            )
        except ValueError:  # no deadly or poisonous image in the split
            return None
        curves.append((_label(r), curve))
    if not curves:
        return None
    plt = _pyplot()
    legend_height = 0.22 * len(curves) + 0.2
    fig, (risk, danger) = plt.subplots(1, 2, figsize=(11, 4 + legend_height))
    styles = ("-", "--", ":")  # equal curves stay visible: one over another differs in its dashes
    for (label, curve), style in zip(curves, styles * len(curves)):
        risk.plot(100 * curve.coverage, 100 * curve.error, style, label=label)
        danger.plot(100 * curve.coverage, 100 * curve.danger, style)
    for ax, ylabel in ((risk, "error among answered (%)"), (danger, "dangerous->edible (%)")):
        ax.set_xlabel(f"coverage (% of {curves[0][1].images} images answered)")
        ax.set_ylabel(ylabel)
        ax.set_xlim(0, 100)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    fig.legend(loc="lower left", fontsize=8, frameon=False)
    fig.suptitle(f"risk-coverage of the {len(curves)} best models by mIoU ({cfg['split']} split)")
    fig.tight_layout(rect=(0, legend_height / fig.get_figheight(), 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def novel_species_rows(runs: Path, results: Path, num_workers: int) -> list[Path]:
    """``mushroomclip novel`` for every finished run under ``runs`` that held out species (others: no new
    species to learn); results under ``results/novel/<run>/``. The runs evaluated."""
    done = []
    for record in sorted(runs.glob(f"*/{HOLDOUT_FILE}")):
        run = record.parent
        if not (run / "metrics.json").is_file():
            continue  # unfinished
        evaluate_novel(
            NovelArguments(run=str(run), output=str(results / NOVEL_DIR / run.name), num_workers=num_workers)
        )
        done.append(run)
    return done


DEFAULT_ZS_BATCH = 256  # speed --batch-size; another one is in the result's file name


def _short_side_tag(result: dict) -> str:
    """What a result file's name says of data prepared with --short-side ("" without)."""
    short = (result.get("prepared") or {}).get("short_side")
    return f"-short{short}" if short else ""


def _print_and_write(result: dict, name: str, out_dir: Path) -> None:
    """Every figure of ``result`` as the README table would show it, and its JSON file."""
    print(speed.render_table([result]))
    print(f"written: {speed.write_result(name, result, out_dir)}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("hub-reachable", help="exit 0 if models can be downloaded, 1 if not")
    report = sub.add_parser("report", help="write benchmark.md and benchmark.png from an evaluation's summary.json")
    report.add_argument("--results", default="results")
    novel = sub.add_parser("novel", help="few-shot on the held-out species of every run in --runs that has some")
    novel.add_argument("--runs", default="runs", help="folder of training runs")
    novel.add_argument("--results", default="results", help="results go to RESULTS/novel/<run>/")
    novel.add_argument("--num-workers", type=int, default=2)
    hierarchy = sub.add_parser("hierarchy", help="losses x seeds on genus-signal data: mistake severity with CIs")
    hierarchy.add_argument("--data", required=True, help="prepared data made with make_synthetic.py --genus-signal")
    hierarchy.add_argument("--seeds", type=int, default=5)
    hierarchy.add_argument("--steps", type=int, default=60, help="training steps per run")
    hierarchy.add_argument("--output", default="results/hierarchy.json")
    hierarchy.add_argument(
        "--readme", default="docs/benchmarks.md", help="the page holding the hierarchy-table markers"
    )
    table = sub.add_parser("table", help="regenerate the speed table of docs/benchmarks.md from results/bench/*.json")
    table.add_argument("--results", default=str(speed.RESULTS), help="folder of bench JSON files")
    table.add_argument("--readme", default="docs/benchmarks.md", help="the page holding the bench-table markers")
    speed_cmd = sub.add_parser("speed", help="zero-shot image-encoding throughput (random weights)")
    speed_cmd.add_argument("--split", default="train", help="split to read images from")
    speed_cmd.add_argument("--batch-size", type=int, default=DEFAULT_ZS_BATCH)
    speed_cmd.add_argument("--batches", type=int, help="timed batches, after warm-up (default: 10 on a GPU, 2 on CPU)")
    speed_cmd.add_argument(
        "--decode-on-device",
        action="store_true",
        help="lever: workers only read files; each batch is decoded (nvJPEG on a GPU), resized and cropped on the device",
    )
    train = sub.add_parser(
        "train-speed", help="training throughput: CLIP LoRA, or a supervised classifier (random weights)"
    )
    train.add_argument("--batch-size", type=int, help="per step (default: 256 on a GPU, as lora_b32.yaml; 8 on CPU)")
    train.add_argument("--steps", type=int, help="timed steps, after warm-up (default: 20 on a GPU, 2 on CPU)")
    train.add_argument(
        "--towers", default="vision,text", help="LoRA towers (vision: frozen text tower); CLIP models only"
    )
    train.add_argument("--no-baseline", action="store_true", help="skip the run_clip.py-style baseline")
    train.add_argument("--compile", action="store_true", help="lever: torch.compile the step's loss (model included)")
    train.add_argument("--fused-adamw", action="store_true", help="lever: AdamW's fused kernel")
    train.add_argument("--lora-dropout", type=float, help="lever: LoRA dropout (default: the config's, 0.1)")
    train.add_argument(
        "--bf16-base", action="store_true", help="lever: frozen linear/conv weights held in bf16 (LoRA stays fp32)"
    )
    train.add_argument("--no-profile", action="store_true", help="skip the profile of where a step's time goes")
    for cmd in (speed_cmd, train):
        cmd.add_argument("--data", required=True, help="prepared data folder")
        cmd.add_argument(
            "--model",
            default="clip-b32",
            help="architecture (random weights); train-speed also takes a supervised classifier: "
            + ", ".join(CLASSIFIERS)
            + " (full fine-tune, cross-entropy)",
        )
        cmd.add_argument("--num-workers", type=int, default=os.cpu_count() or 2)
        cmd.add_argument("--device", default="auto")
        cmd.add_argument("--output", default=str(speed.RESULTS), help="folder for the result JSON")
    args = p.parse_args(argv)
    gpu = args.command in ("speed", "train-speed") and (
        args.device.startswith("cuda") or (args.device == "auto" and torch.cuda.is_available())
    )
    if args.command in ("speed", "train-speed") and args.model not in CLASSIFIERS:
        try:
            resolve_spec(args.model)
        except ValueError as err:
            classifiers = f" (train-speed also takes {', '.join(CLASSIFIERS)})" if args.command == "train-speed" else ""
            p.error(f"--model: {err}{classifiers}")
    if args.command == "speed" and args.model in CLASSIFIERS:
        p.error(f"--model {args.model}: a supervised classifier has no zero-shot encoding; measure it with train-speed")
    if args.command == "train-speed" and args.bf16_base and args.model in CLASSIFIERS:
        p.error(f"--bf16-base: {args.model} is trained in full here, with no frozen base to hold in bf16; leave it out")
    if args.command == "train-speed" and args.lora_dropout is not None:
        if args.model in CLASSIFIERS:
            p.error(f"--lora-dropout: {args.model} is trained in full here, without LoRA; leave it out")
        if not 0 <= args.lora_dropout < 1:  # lora.dropout's own range (config.py)
            p.error(f"--lora-dropout must be in [0, 1), got {args.lora_dropout:g}")
    if args.command == "train-speed":
        levers = Levers(args.compile, args.fused_adamw, args.lora_dropout, args.bf16_base)
        towers = tuple(t.strip() for t in args.towers.split(",") if t.strip())
        default_batch = 256 if gpu else 8
        batch_tag = f"-batch{args.batch_size}" if args.batch_size not in (None, default_batch) else ""
        args.batch_size = args.batch_size or default_batch
        args.steps = args.steps or (20 if gpu else 2)
        r = measure_train_speed(
            args.data,
            args.model,
            args.batch_size,
            args.steps,
            args.num_workers,
            args.device,
            towers,
            baseline=not args.no_baseline,
            levers=levers,
            profile=not args.no_profile,
        )
        what = "full" if args.model in CLASSIFIERS else "+".join(towers)
        name = f"train-{args.model}-{what}{batch_tag}{_short_side_tag(r)}{levers.tag()}"
        _print_and_write(r, f"{name}-{'gpu' if gpu else 'cpu'}", Path(args.output))
        return 0
    if args.command == "hub-reachable":
        reachable = hub_reachable()
        print("hub reachable" if reachable else "hub not reachable: offline benchmark with the tiny test models")
        return 0 if reachable else 1
    if args.command == "report":
        out = write_report(Path(args.results))
        print(out.read_text())
        linked = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", out.read_text())  # the figures this report wrote
        print(f"written: {out}, " + ", ".join(str(out.parent / f) for f in [out.with_suffix(".png").name, *linked]))
        return 0
    if args.command == "novel":
        done = novel_species_rows(Path(args.runs), Path(args.results), args.num_workers)
        print(f"new species from a few photos: {len(done)} run(s) with held-out species in {args.runs}")
        return 0
    if args.command == "hierarchy":
        from mushroomclip.commands import console_logging

        with console_logging():
            result = hierarchy_bench.run_benchmark(args.data, args.seeds, args.steps)
        hierarchy_bench.write(result, Path(args.output))
        print(hierarchy_bench.update_docs(Path(args.readme), Path(args.output)))
        print(f"written: {args.output} and the hierarchy table of {args.readme}")
        return 0
    if args.command == "table":
        try:
            print(speed.update_readme(Path(args.readme), Path(args.results)))
        except (FileNotFoundError, ValueError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        print(f"written: the speed table of {args.readme}")
        return 0
    args.batches = args.batches or (10 if gpu else 2)
    r = measure_speed(
        args.data,
        args.model,
        args.batch_size,
        args.num_workers,
        args.device,
        args.split,
        args.batches,
        args.decode_on_device,
    )
    where = "-device-decode" if args.decode_on_device else ""
    where += (f"-batch{args.batch_size}" if args.batch_size != DEFAULT_ZS_BATCH else "") + _short_side_tag(r)
    _print_and_write(r, f"zero-shot-{args.model}{where}-{'gpu' if gpu else 'cpu'}", Path(args.output))
    return 0


if __name__ == "__main__":
    sys.exit(main())
