"""Fine-tune CLIP with LoRA on the prepared mushroom data.

accelerate launch train.py --config configs/lora_b32.yaml
accelerate launch train.py --config configs/lora_b32.yaml training.learning_rate=1e-4 lora.r=8
python train.py --config configs/tiny.yaml                    (offline CPU smoke run)

Exit status: 0 trained (and pushed, with hub.push), 2 an error before or during training (one line; nothing
is written from a failed run), 3 trained and saved but the Hub push failed (the retry command is printed).
"""

from __future__ import annotations

import argparse
import sys

from mushroomclip.commands import console_logging
from mushroomclip.config import ConfigError, load_train_config
from mushroomclip.data.holdout import HoldoutError
from mushroomclip.data.imbalance import ImbalanceError
from mushroomclip.models.backbones import ModelLoadError
from mushroomclip.models.classifier import AdapterError
from mushroomclip.taxonomy import TaxonomyError
from mushroomclip.training.collectives import warn_if_accelerate_started_one_cpu_process
from mushroomclip.training.runs import DataReadError, RunFolderError, TrainingDivergedError
from mushroomclip.training.trainer import run_training


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Overrides: section.key=value for any key of the config (model, lora, data, loss, "
        "training, run, hub); training takes any transformers.TrainingArguments field.",
    )
    p.add_argument("--config", required=True, help="YAML training config (see configs/)")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint (same as run.resume=true)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="start over in an output_dir that holds a run: deletes its results and checkpoints "
        "(same as run.overwrite=true)",
    )
    p.add_argument("overrides", nargs="*", help="section.key=value, e.g. training.learning_rate=1e-4")
    args = p.parse_intermixed_args(argv)  # overrides before, between or after the flags

    flags = [*(["run.resume=true"] if args.resume else []), *(["run.overwrite=true"] if args.overwrite else [])]
    try:
        cfg = load_train_config(args.config, [*args.overrides, *flags])
        with console_logging():
            warn_if_accelerate_started_one_cpu_process()
            result = run_training(cfg)
    except (
        ConfigError,
        HoldoutError,
        ImbalanceError,
        ModelLoadError,
        AdapterError,
        TaxonomyError,
        FileNotFoundError,
        RunFolderError,
        TrainingDivergedError,
        DataReadError,
    ) as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    if result["push_error"]:
        print(f"error: {result['push_error']}", file=sys.stderr, flush=True)
        return 3
    return 0
