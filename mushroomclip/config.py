"""YAML config files under argparse: the file sets defaults, command-line flags override them.

Keys are validated once, here at the edge: a typo names the key and the nearest valid one.
"""

from __future__ import annotations

import argparse
import difflib
import math
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import yaml


class ConfigError(ValueError):
    """A config file is missing, malformed, or has an unknown key."""


# transformers.TrainingArguments names people will type, and ours
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
SYNONYMS = {"learning_rate": "lr", "num_train_epochs": "epochs", "per_device_train_batch_size": "batch_size",
            "per_device_eval_batch_size": "eval_batch_size", "gradient_accumulation_steps": "grad_accum",
            "lora_r": "r", "lora_alpha": "alpha", "lora_dropout": "dropout", "mixed_precision": "precision",
            "activation_checkpointing": "gradient_checkpointing"}  # fmt: skip


def unknown_key_message(key: str, valid: list[str], where: str) -> str:
    """Names the bad key and the closest valid one (matching the last dotted part, and HF synonyms)."""
    prefix, _, name = key.rpartition(".")
    short = {v.rpartition(".")[2]: v for v in valid}
    candidates = list(short) + [s for s, target in SYNONYMS.items() if target in short]
    match = next(iter(difflib.get_close_matches(name, candidates, n=1)), None)
    guess = SYNONYMS.get(match, match)
    hint = f"; did you mean {short[guess]!r}?" if guess else ""
    return f"unknown key {key!r} in {where}{hint} (valid keys: {', '.join(sorted(valid))})"


def read_yaml_mapping(path: Path) -> dict:
    """A YAML config file's top-level mapping; a missing file or malformed YAML is a ConfigError."""
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist (see configs/ for examples)")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path} must hold a mapping of keys to values")
    return values


def parse_with_config(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """Parse ``argv``; values from ``--config FILE`` (YAML, keys = flag names with ``_``) become defaults."""
    args = parser.parse_args(argv)
    if not getattr(args, "config", None):
        return args
    path = Path(args.config)
    values = read_yaml_mapping(path)
    valid = [a.dest for a in parser._actions if a.dest not in ("help", "config")]
    for key in values:
        if key not in valid:
            raise ConfigError(unknown_key_message(key, valid, str(path)))
    parser.set_defaults(**{k: ",".join(map(str, v)) if isinstance(v, list) else v for k, v in values.items()})
    return parser.parse_args(argv)


# --- training configuration: YAML -> typed dataclasses ------------------------------------------


@dataclass
class ModelConfig:
    base: str = "openai/clip-vit-base-patch32"  # hub id, local folder, convert:<open_clip source>, or tiny-clip
    base_hub_id: str | None = None  # the Hub repo of a local base (convert --push-to-hub): what the run records
    random_weights: bool = False  # keep the architecture, skip the download (throughput checks)


@dataclass
class LoraSettings:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.1
    towers: list = field(default_factory=lambda: ["vision", "text"])
    target_modules: list = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "out_proj"])  # + fc1, fc2
    train_logit_scale: bool = False


@dataclass
class DataConfig:
    path: str = "data/mushrooms"  # data_scripts/prepare_kaggle.py --output
    text_type: str = "taxon_com"
    train_template: str = "a photo of {}."  # one prompt per class, encoded every step
    eval_templates: str = "single"  # template set of the zero-shot head at evaluation
    num_workers: int = 4
    taxonomy: str | None = None  # a table with the prepared folder's species (e.g. other common names)


@dataclass
class LossConfig:
    name: str = "class_text"  # class_text | clip | multi_positive


@dataclass
class TrainingConfig:
    output_dir: str = "runs/lora-b32"
    seed: int = 42
    epochs: float = 5.0
    max_steps: int = -1  # > 0 overrides epochs
    batch_size: int = 128  # per device
    eval_batch_size: int = 256
    lr: float = 5e-4
    weight_decay: float = 0.05
    warmup_ratio: float = 0.05
    grad_accum: int = 1
    optim: str = "auto"  # auto: adamw_bnb_8bit when bitsandbytes and CUDA are there, else adamw_torch
    precision: str = "auto"  # auto | bf16 | fp16 | fp32; auto: the accelerate config's, else bf16 on GPU, fp32 on CPU
    gradient_checkpointing: bool = False  # recompute each layer's activations in backward: less GPU memory, slower
    eval_steps: int = 0  # 0: once per epoch
    save_steps: int = 0  # 0: with every evaluation
    save_total_limit: int = 3
    logging_steps: int = 10
    report_to: str = "none"  # none | wandb | tensorboard
    resume: bool = False  # continue the run in output_dir from its last checkpoint (same config)
    overwrite: bool = False  # start over in an output_dir that holds a run: deletes its results and checkpoints
    test_after: bool = True  # evaluate the best adapter on the test split at the end


@dataclass
class HubConfig:
    push: bool = False
    repo_id: str | None = None
    private: bool = False


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    hub: HubConfig = field(default_factory=HubConfig)

    def to_dict(self) -> dict:
        return asdict(self)


def _coerce(value, default, where: str):
    """Check ``value`` against the type of the field's default (None defaults take str or None)."""
    kind = type(default)
    if default is None:
        if value is None or isinstance(value, str):
            return value
        raise ConfigError(f"{where} must be a string, got {value!r}")
    if kind is bool:
        if isinstance(value, bool):
            return value
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif kind is list:
        if isinstance(value, list):
            return value
        if isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()]
    elif isinstance(value, kind):
        return value
    raise ConfigError(f"{where} must be {kind.__name__}, got {value!r} ({type(value).__name__})")


def _apply(config: TrainConfig, values: dict, source: str) -> None:
    sections = {f.name: getattr(config, f.name) for f in fields(config)}
    for section, body in values.items():
        if section not in sections:
            raise ConfigError(unknown_key_message(section, list(sections), source))
        if not isinstance(body, dict):
            raise ConfigError(f"{section} in {source} must be a mapping of keys to values")
        target = sections[section]
        names = [f.name for f in fields(target)]
        for key, value in body.items():
            if key not in names:
                raise ConfigError(unknown_key_message(f"{section}.{key}", [f"{section}.{n}" for n in names], source))
            setattr(target, key, _coerce(value, getattr(type(target)(), key), f"{section}.{key}"))


LORA_MODULES = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


def _check_ranges(config: TrainConfig) -> None:
    """Values a run cannot use, each a ConfigError naming the key, before any model or data is loaded."""
    t, lora = config.training, config.lora
    checks = [
        ("training.batch_size", t.batch_size, t.batch_size >= 1, "at least 1"),
        ("training.eval_batch_size", t.eval_batch_size, t.eval_batch_size >= 1, "at least 1"),
        ("training.grad_accum", t.grad_accum, t.grad_accum >= 1, "at least 1"),
        ("training.lr", t.lr, math.isfinite(t.lr) and t.lr > 0, "a positive number, e.g. 5e-4"),
        ("training.epochs", t.epochs, t.max_steps > 0 or (math.isfinite(t.epochs) and t.epochs > 0),
         "positive (or set training.max_steps)"),
        ("training.max_steps", t.max_steps, t.max_steps == -1 or t.max_steps >= 1, "-1 (train for training.epochs) or at least 1"),
        ("training.warmup_ratio", t.warmup_ratio, 0 <= t.warmup_ratio < 1, "in [0, 1)"),
        ("training.weight_decay", t.weight_decay, t.weight_decay >= 0, "0 or more"),
        ("training.eval_steps", t.eval_steps, t.eval_steps >= 0, "0 (every epoch) or more"),
        ("training.save_steps", t.save_steps, t.save_steps >= 0, "0 (with every evaluation) or more"),
        ("training.save_total_limit", t.save_total_limit, t.save_total_limit >= 1, "at least 1"),
        ("training.logging_steps", t.logging_steps, t.logging_steps >= 1, "at least 1"),
        ("training.seed", t.seed, t.seed >= 0, "0 or more"),
        ("lora.r", lora.r, lora.r >= 1, "at least 1, e.g. 16"),
        ("lora.alpha", lora.alpha, lora.alpha > 0, "positive, e.g. 2 * lora.r"),
        ("lora.dropout", lora.dropout, 0 <= lora.dropout < 1, "in [0, 1)"),
        ("data.num_workers", config.data.num_workers, config.data.num_workers >= 0, "0 (load in the main process) or more"),
    ]  # fmt: skip
    for key, value, ok, expected in checks:
        if not ok:
            raise ConfigError(f"{key} must be {expected}, got {value!r}")
    unknown = [m for m in lora.target_modules if m not in LORA_MODULES]
    if unknown or not lora.target_modules:
        raise ConfigError(f"lora.target_modules must be a non-empty list of {', '.join(LORA_MODULES)}, "
                          f"got {lora.target_modules}")  # fmt: skip
    if t.resume and t.overwrite:
        raise ConfigError("--resume continues the run in training.output_dir and --overwrite deletes it: choose one")


def load_train_config(path: str | Path | None, overrides: list[str] = ()) -> TrainConfig:
    """Defaults <- YAML file <- ``section.key=value`` overrides (values parsed as YAML), validated."""
    config = TrainConfig()
    if path is not None:
        _apply(config, read_yaml_mapping(Path(path)), str(path))
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or "." not in key:
            raise ConfigError(f"override {item!r} must look like section.key=value, e.g. training.lr=1e-4")
        section, _, name = key.partition(".")
        _apply(config, {section: {name: yaml.safe_load(raw)}}, "the command line")
    from mushroomclip.taxonomy import TEXT_TYPES
    from mushroomclip.training.losses import LOSSES

    if config.loss.name not in LOSSES:
        raise ConfigError(f"loss.name must be one of {', '.join(LOSSES)}, got {config.loss.name!r}")
    if config.data.text_type not in TEXT_TYPES:
        raise ConfigError(f"data.text_type must be one of {', '.join(TEXT_TYPES)}, got {config.data.text_type!r}")
    unknown_towers = set(config.lora.towers) - {"vision", "text"}
    if unknown_towers or not config.lora.towers:
        raise ConfigError(f"lora.towers must be a non-empty subset of [vision, text], got {config.lora.towers}")
    if config.training.precision not in PRECISIONS:
        raise ConfigError(
            f"training.precision must be one of {', '.join(PRECISIONS)}, got {config.training.precision!r}"
        )
    reporter = config.training.report_to
    if reporter not in ("none", "wandb", "tensorboard"):
        raise ConfigError(f"training.report_to must be none, wandb or tensorboard, got {reporter!r}")
    import importlib.util

    if reporter != "none" and importlib.util.find_spec(reporter) is None:
        raise ConfigError(f"training.report_to={reporter} needs the {reporter} package: pip install {reporter}")
    _check_ranges(config)
    if config.data.taxonomy is not None and not Path(config.data.taxonomy).is_file():
        raise ConfigError(f"data.taxonomy {config.data.taxonomy} does not exist (a CSV like the prepared folder's "
                          "taxonomy.csv; leave it unset to use that one)")  # fmt: skip
    hub_id = config.model.base_hub_id
    if hub_id is not None and not re.fullmatch(r"[\w.-]+/[\w.-]+", hub_id):
        raise ConfigError(f"model.base_hub_id must be a Hub repo id USER/NAME (e.g. the --push-to-hub of "
                          f"python -m mushroomclip.models.convert), got {hub_id!r}")  # fmt: skip
    base = Path(config.model.base)
    if config.hub.push and hub_id is None and base.is_dir():
        from mushroomclip.models.convert import RECIPE_FILE

        if not (base / RECIPE_FILE).is_file():
            raise ConfigError(f"hub.push: model.base {base} is a local folder no other machine has; set "
                              "model.base_hub_id to its Hub repo, or use a folder written by python -m "
                              "mushroomclip.models.convert (it records the source to convert again)")  # fmt: skip
    if config.hub.push and not config.hub.repo_id:
        raise ConfigError("hub.push is true but hub.repo_id is not set (e.g. hub.repo_id=USER/mushroomclip-lora-b32)")
    return config
