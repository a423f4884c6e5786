"""`make benchmark` and `make bench-zero-shot`: the comparison table, and zero-shot throughput.

python -m mushroomclip.benchmark hub-reachable          exit 0 if the Hugging Face Hub answers
python -m mushroomclip.benchmark report --results results
python -m mushroomclip.benchmark speed --data DIR --model clip-b32 --batch-size 256
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

OFFLINE_NOTE = ("offline: no Hugging Face Hub, so these rows are the randomly initialised test models (tiny-clip, "
                "tiny-openclip) on the synthetic demo data. They check the pipeline, not model quality.")  # fmt: skip


def write_report(results: Path) -> Path:
    """``results/benchmark.md`` (the table, with a banner when offline) and ``results/benchmark.png``."""
    from mushroomclip.plots import _pyplot
    from mushroomclip.zeroshot import summary_markdown

    summary_path = results / "summary.json"
    if not summary_path.is_file():
        raise FileNotFoundError(f"{summary_path} not found; run evaluate_zero_shot.py --output {results} first")
    summary = json.loads(summary_path.read_text())
    cfg, rows = summary["config"], summary["rows"]
    offline = all(m.startswith("tiny-") for m in cfg["models"])  # adapters of tiny models are offline too
    notes = [OFFLINE_NOTE] if offline else []
    if cfg.get("random_weights"):
        notes.append("random weights: architectures only, figures are not model quality")
    markdown = summary_markdown(rows, f"MushroomCLIP benchmark: {cfg['data']} ({cfg['split']} split)", " ".join(notes))
    out = results / "benchmark.md"
    out.write_text(markdown)

    plt = _pyplot()
    labels = [f"{r['model']} {r['method']} {r['text_type']}".strip() for r in rows]
    fig, ax = plt.subplots(figsize=(8, 0.3 * len(rows) + 1.5))
    ax.barh(labels[::-1], [100 * (r["miou"] or 0) for r in rows][::-1], color="#bc4749")
    ax.set_xlabel("mIoU (%)")
    ax.set_title("offline pipeline check (tiny random models)" if offline else "mIoU by model and method")
    fig.tight_layout()
    fig.savefig(results / "benchmark.png", dpi=100)
    plt.close(fig)
    return out


def measure_speed(
    data: str, model: str, batch_size: int, num_workers: int, device: str, split: str, batches: int
) -> dict:
    """Images/s of zero-shot image encoding with the real data pipeline vs synthetic tensors (model only)."""
    from mushroomclip.data import load_splits
    from mushroomclip.features import PreprocessedImages
    from mushroomclip.models import load_backbone

    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    backbone = load_backbone(model, device=device, dtype=dtype, random_weights=True)
    images = load_splits(data)[split]
    n = min(len(images), batch_size * batches)
    loader = torch.utils.data.DataLoader(PreprocessedImages(images.select(range(n)), backbone.preprocess),
                                         batch_size=batch_size, num_workers=num_workers, pin_memory=device.startswith("cuda"))  # fmt: skip

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    with torch.inference_mode():
        size = backbone.preprocess.transforms[1].size
        pixels = (
            torch.randn(batch_size, 3, *size)
            if isinstance(size, (tuple, list))
            else torch.randn(batch_size, 3, size, size)
        )
        backbone.encode_images(pixels[:8])  # warm-up

        def model_only_speed() -> float:
            sync()
            start = time.perf_counter()
            for _ in range(max(1, n // batch_size)):
                backbone.encode_images(pixels)
            sync()
            return max(1, n // batch_size) * batch_size / (time.perf_counter() - start)

        first = model_only_speed()
        start = time.perf_counter()
        seen = 0
        for batch, _ in loader:
            backbone.encode_images(batch)
            seen += len(batch)
        sync()
        pipeline = seen / (time.perf_counter() - start)
        model_only = max(
            first, model_only_speed()
        )  # before and after: first-call slowness must not flatter the pipeline
    return {"model": model, "device": device, "dtype": str(dtype), "batch_size": batch_size, "images": seen,
            "pipeline_images_per_s": pipeline, "model_only_images_per_s": model_only, "ratio": pipeline / model_only}  # fmt: skip


def measure_train_speed(
    data: str,
    model: str,
    batch_size: int,
    steps: int,
    num_workers: int,
    device: str,
    towers: tuple = ("vision", "text"),
) -> dict:
    """Train images/s of LoRA steps fed by the real pipeline vs synthetic tensors.

    A step is the trainer's own: ``ContrastiveTrainer.compute_loss`` (class_text loss over all classes,
    the default config's prompt), backward and AdamW, in bf16 autocast on a GPU.
    """
    from transformers import TrainingArguments

    from mushroomclip.config import DataConfig, LoraSettings
    from mushroomclip.data import load_splits, prepared_taxonomy
    from mushroomclip.lora import add_lora, train_transform
    from mushroomclip.models import load_backbone
    from mushroomclip.prompts import class_prompts
    from mushroomclip.trainer import ContrastiveTrainer

    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    backbone = load_backbone(model, device=device, random_weights=True)
    s, d = LoraSettings(), DataConfig()
    peft = add_lora(backbone.model, s.r, s.alpha, s.dropout, list(towers), s.target_modules, False).to(device).train()
    taxonomy = prepared_taxonomy(data)
    ids = backbone.tokenize([p for [p] in class_prompts(taxonomy, d.text_type, [d.train_template])]).to(device)
    augment = train_transform(backbone.preprocess)
    split = load_splits(data)["train"].select_columns(["image", "label"])
    split = split.with_transform(lambda b: {"pixel_values": [augment(im) for im in b["image"]], "labels": b["label"]})
    loader = torch.utils.data.DataLoader(split, batch_size=batch_size, shuffle=True, num_workers=num_workers, drop_last=True,
                                         pin_memory=device.startswith("cuda"), persistent_workers=num_workers > 0,
                                         collate_fn=lambda b: (torch.stack([x["pixel_values"] for x in b]), torch.tensor([x["labels"] for x in b])))  # fmt: skip
    args = TrainingArguments(output_dir=tempfile.mkdtemp(), use_cpu=not device.startswith("cuda"), report_to=[])
    trainer = ContrastiveTrainer(model=peft, args=args, class_input_ids=ids, loss_name="class_text", evaluator=None)
    optimizer = torch.optim.AdamW([p for p in peft.parameters() if p.requires_grad], lr=1e-4)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda") else contextlib.nullcontext()

    def step(pixels, labels):
        inputs = {"pixel_values": pixels.to(device, non_blocking=True), "labels": labels.to(device, non_blocking=True)}
        with autocast:
            loss = trainer.compute_loss(peft, inputs)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def timed(batches) -> float:
        batches = iter(batches)
        step(*next(batches))  # warm-up, not timed
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start, seen = time.perf_counter(), 0
        for _ in range(steps):
            pixels, labels = next(batches)
            step(pixels, labels)
            seen += len(labels)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return seen / (time.perf_counter() - start)

    size = augment.transforms[1].size

    def synthetic():
        for _ in range(steps + 1):
            yield torch.randn(batch_size, 3, *size), torch.randint(0, len(taxonomy), (batch_size,))

    # Model-only before and after the pipeline, the faster one counts: the first steps of a process run
    # slower (allocator, caches), which must not make the data pipeline look faster than the model.
    first = timed(synthetic())
    pipeline = timed(itertools.chain.from_iterable(itertools.repeat(loader)))  # as many epochs as the steps need
    model_only = max(first, timed(synthetic()))
    shutil.rmtree(args.output_dir, ignore_errors=True)
    return {"model": model, "device": device, "batch_size": batch_size, "steps": steps, "towers": list(towers),
            "pipeline_images_per_s": pipeline, "model_only_images_per_s": model_only, "ratio": pipeline / model_only}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("hub-reachable", help="exit 0 if models can be downloaded, 1 if not")
    report = sub.add_parser("report", help="write benchmark.md and benchmark.png from an evaluation's summary.json")
    report.add_argument("--results", default="results")
    speed = sub.add_parser("speed", help="zero-shot image-encoding throughput (random weights)")
    speed.add_argument("--data", required=True, help="prepared data folder")
    speed.add_argument("--split", default="train", help="split to read images from")
    speed.add_argument("--model", default="clip-b32", help="architecture (random weights)")
    speed.add_argument("--batch-size", type=int, default=256)
    speed.add_argument("--batches", type=int, default=4, help="how many batches to time")
    speed.add_argument("--num-workers", type=int, default=os.cpu_count() or 2)
    speed.add_argument("--device", default="auto")
    train = sub.add_parser("train-speed", help="LoRA training throughput (random weights)")
    train.add_argument("--data", required=True, help="prepared data folder")
    train.add_argument("--model", default="clip-b32", help="architecture (random weights)")
    train.add_argument("--batch-size", type=int, help="per step (default: 256 on a GPU, as lora_b32.yaml; 8 on CPU)")
    train.add_argument("--steps", type=int, help="timed steps after one warm-up step (default: 20 on a GPU, 2 on CPU)")
    train.add_argument("--num-workers", type=int, default=os.cpu_count() or 2)
    train.add_argument("--device", default="auto")
    train.add_argument("--towers", default="vision,text", help="LoRA towers (vision: frozen text tower)")
    args = p.parse_args(argv)
    if args.command == "train-speed":
        towers = tuple(t.strip() for t in args.towers.split(",") if t.strip())
        gpu = args.device.startswith("cuda") or (args.device == "auto" and torch.cuda.is_available())
        args.batch_size = args.batch_size or (256 if gpu else 8)
        args.steps = args.steps or (20 if gpu else 2)
        r = measure_train_speed(
            args.data, args.model, args.batch_size, args.steps, args.num_workers, args.device, towers
        )
        print(f"bench-train {r['model']} + LoRA on {'+'.join(towers)} (random weights) on {r['device']}, batch {r['batch_size']}, {r['steps']} steps: "
              f"{r['pipeline_images_per_s']:.1f} images/s with the data pipeline, {r['model_only_images_per_s']:.1f} images/s "
              f"on synthetic tensors (ratio {r['ratio']:.2f})")  # fmt: skip
        return 0
    if args.command == "hub-reachable":
        from mushroomclip.models import hub_reachable

        reachable = hub_reachable()
        print("hub reachable" if reachable else "hub not reachable: offline benchmark with the tiny test models")
        return 0 if reachable else 1
    if args.command == "report":
        out = write_report(Path(args.results))
        print(out.read_text())
        print(f"written: {out}, {out.with_suffix('.png')}")
        return 0
    r = measure_speed(args.data, args.model, args.batch_size, args.num_workers, args.device, args.split, args.batches)
    print(f"bench-zero-shot {r['model']} (random weights) on {r['device']} {r['dtype']}, batch {r['batch_size']}, {r['images']} images: "
          f"{r['pipeline_images_per_s']:.1f} images/s with data loading, {r['model_only_images_per_s']:.1f} images/s model only "
          f"(ratio {r['ratio']:.2f}); a 15.6k-image test split would take {15600 / r['pipeline_images_per_s']:.0f} s")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
