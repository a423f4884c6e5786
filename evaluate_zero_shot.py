#!/usr/bin/env python
"""Zero-shot (and few-shot) evaluation of CLIP / BioCLIP backbones on a prepared split.

    python evaluate_zero_shot.py --data data/mushrooms --split test --models clip-b32,bioclip \
        --text-type taxon_com --templates openai --output results/
    python evaluate_zero_shot.py --config configs/zero_shot.yaml
"""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                epilog="Models: run with --list-models. Every flag can also be a key of --config (dashes as underscores).")  # fmt: skip
    p.add_argument("--config", help="YAML file whose keys set defaults for the flags below (flags win)")
    p.add_argument("--data", help="prepared data folder (data_scripts/prepare_kaggle.py --output)")
    p.add_argument("--split", default="test", choices=("validation", "test"), help="split to evaluate on")
    p.add_argument(
        "--models",
        default="clip-b32,bioclip",
        help="comma-separated model names (see --list-models), "
        "hf:<hub id or folder>, or open_clip:<architecture>@<pretrained tag>",
    )
    p.add_argument(
        "--text-type",
        default="taxon_com",
        help="comma-separated text types (sci, com, taxon, sci_com, "
        "taxon_com) or all, for BioCLIP's text-type ablation",
    )
    p.add_argument(
        "--templates",
        default="openai",
        choices=("single", "openai"),
        help="single: 'a photo of {}.'; openai: the 80 OpenAI ImageNet templates, averaged",
    )
    p.add_argument("--output", default="results", help="folder for zero_shot/, few_shot/, probe/ and summary.md")
    p.add_argument("--shots", default="1,5", help="SimpleShot k values, comma-separated; empty for none")
    p.add_argument("--seeds", type=int, default=5, help="few-shot repetitions (seeds 0..N-1); mean and std reported")
    p.add_argument(
        "--probe", action="store_true", help="also fit a logistic-regression linear probe on frozen train features"
    )
    p.add_argument("--batch-size", type=int, default=256, help="images per forward pass")
    p.add_argument("--num-workers", type=int, default=2, help="DataLoader worker processes decoding images")
    p.add_argument("--device", default="auto", help="auto (cuda if available, bf16 there), cpu, cuda, cuda:1, ...")
    p.add_argument(
        "--random-weights",
        action="store_true",
        help="real architectures with random weights, no download "
        "(benchmarks and offline checks; figures mean nothing)",
    )
    p.add_argument(
        "--bootstrap", type=int, default=0, help="bootstrap resamples for 95%% intervals of OA/mF1/mIoU (0: none)"
    )
    p.add_argument(
        "--cache-dir", default=None, help="where text and image embeddings are cached (default: OUTPUT/.cache)"
    )
    p.add_argument(
        "--taxonomy",
        default=None,
        help="species table to use for prompts and safety metrics; must list "
        "the same species as the prepared folder's taxonomy.csv",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap and the probe")
    p.add_argument(
        "--include-adapters",
        default=None,
        metavar="DIR",
        help="also evaluate every LoRA run in DIR (e.g. runs) trained on exactly this data's species; the "
        "others are listed with the reason. A run can also be named in --models as lora:<run folder>",
    )
    p.add_argument("--list-models", action="store_true", help="print the registered model names and exit")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    from mushroomclip.config import ConfigError, parse_with_config

    try:
        args = parse_with_config(parser, argv)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from mushroomclip.models.backbones import ModelLoadError, list_models, resolve_spec

    if args.list_models:
        print(list_models())
        return 0
    from mushroomclip.evaluation.zeroshot import EvalConfig, evaluate
    from mushroomclip.models.prompts import text_types
    from mushroomclip.taxonomy import TaxonomyError

    try:
        if not args.data:
            raise ValueError("--data is required (a folder written by data_scripts/prepare_kaggle.py)")
        models = [m.strip() for m in str(args.models).split(",") if m.strip()]
        for name in models:
            if not name.startswith("lora:"):
                resolve_spec(name)  # fail on a typo before any download
        cfg = EvalConfig(
            data=args.data, models=models, split=args.split, text_types=text_types(str(args.text_type)),
            templates=args.templates, output=args.output, shots=[int(k) for k in str(args.shots).split(",") if k.strip()],
            seeds=args.seeds, probe=args.probe, batch_size=args.batch_size, num_workers=args.num_workers,
            device=args.device, random_weights=args.random_weights, bootstrap=args.bootstrap,
            cache_dir=args.cache_dir, taxonomy=args.taxonomy, seed=args.seed, include_adapters=args.include_adapters,
        )  # fmt: skip
        evaluate(cfg)
    except (ValueError, FileNotFoundError, ModelLoadError, TaxonomyError) as err:  # AdapterError is a ValueError
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"\nsummary: {args.output}/summary.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
