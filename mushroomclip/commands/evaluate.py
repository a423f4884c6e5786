"""Zero-shot (and few-shot) evaluation of CLIP / BioCLIP backbones on a prepared split.

    python evaluate_zero_shot.py --data data/mushrooms --split test --models clip-b32,bioclip \
        --text-type taxon_com --templates openai --output results/
    python evaluate_zero_shot.py --config configs/zero_shot.yaml

The options are :class:`~mushroomclip.evaluation.zeroshot.EvaluationArguments`, parsed by ``HfArgumentParser``;
a ``--config`` YAML file sets their defaults and the command line overrides it.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from pathlib import Path

from transformers import HfArgumentParser

from mushroomclip.commands import console_logging
from mushroomclip.config import ConfigError, read_yaml_mapping, unknown_key_message
from mushroomclip.evaluation.zeroshot import EvaluationArguments, evaluate
from mushroomclip.models.backbones import ModelLoadError, list_models

EPILOG = "Models: run with --list-models. Every flag can also be a key of --config (dashes as underscores)."


def build_parser() -> HfArgumentParser:
    """Every :class:`EvaluationArguments` field as a flag, plus ``--config`` and ``--list-models``."""
    parser = HfArgumentParser(EvaluationArguments, description=__doc__.split("\n\n")[0], epilog=EPILOG)
    parser.add_argument("--config", help="YAML file whose keys set defaults for the flags above (flags win)")
    parser.add_argument("--list-models", action="store_true", help="print the registered model names and exit")
    return parser


def config_defaults(path: str) -> dict:
    """A ``--config`` file's values, keys checked against the fields, lists joined with commas as flags take them."""
    values = read_yaml_mapping(Path(path))
    valid = [f.name for f in fields(EvaluationArguments)]
    for key in values:
        if key not in valid:
            raise ConfigError(unknown_key_message(str(key), valid, path))
    return {key: ",".join(map(str, v)) if isinstance(v, list) else v for key, v in values.items()}


def parse_arguments(argv: list[str] | None = None) -> tuple[EvaluationArguments, argparse.Namespace]:
    """The evaluation options (``--config`` file under the command line) and the command's own flags."""
    parser = build_parser()
    config = parser.parse_args(argv).config  # --help, and a misspelt flag, end here as argparse does
    if config:
        parser.set_defaults(**config_defaults(config))
    args, command = parser.parse_args_into_dataclasses(argv, look_for_args_file=False)
    return args, command


def main(argv: list[str] | None = None) -> int:
    """Evaluate as the flags and ``--config`` say: 0 when done, 2 with one ``error:`` line on a user error."""
    try:
        args, command = parse_arguments(argv)
        if command.list_models:
            print(list_models())
            return 0
        if not args.data:
            raise ValueError("--data is required (a folder written by data_scripts/prepare_kaggle.py)")
        with console_logging():
            evaluate(args)
    # ConfigError, TaxonomyError and AdapterError are ValueErrors; ModelLoadError names the model and the fix
    except (ValueError, FileNotFoundError, ModelLoadError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"\nsummary: {args.output}/summary.md")
    return 0
