"""Config files, validated once, here at the edge: a typo names the key and the nearest valid one.

``load_train_config``: a training config's YAML sections become dataclasses through ``HfArgumentParser`` (as
``run_clip.py`` does); ``training`` is ``transformers.TrainingArguments`` itself, with the values this project
uses where the config sets none chosen in one place, :func:`project_training_defaults`.
"""

from __future__ import annotations

import contextlib
import difflib
import enum
import importlib.util
import math
import os
import re
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import yaml
from transformers import HfArgumentParser, TrainingArguments

# Loading transformers' integrations prints "[INFO] Running in WANDB offline mode" under WANDB_MODE=offline, whether
# wandb is used or not: not into stdout, which is for results (JSON, tables), nor above a one-line error on stderr
# (a run that reports to wandb says where its offline files go through wandb's own lines).
with open(os.devnull, "w") as _quiet, contextlib.redirect_stdout(_quiet):
    from transformers.integrations import INTEGRATION_TO_CALLBACK, get_available_reporting_integrations

from mushroomclip.data.holdout import HoldoutError, parse_fraction
from mushroomclip.data.imbalance import ImbalanceError, resolve_imbalance
from mushroomclip.models.convert import RECIPE_FILE
from mushroomclip.models.supervised import TINY_RESNET
from mushroomclip.taxonomy import TEXT_TYPES
from mushroomclip.training.losses import CLIP_ONLY, LOSSES, PAIRED_LOSSES, SUPERVISED_ONLY


class ConfigError(ValueError):
    """A config file is missing, malformed, or has an unknown key."""


def unknown_key_message(
    key: str, valid: list[str], where: str, listing: str | None = None, renamed: dict[str, str] | None = None
) -> str:
    """Names the bad key and the closest valid one (difflib on the last dotted part, or ``renamed``'s entry);
    ``listing`` replaces the list of valid keys where it would be too long (TrainingArguments has ~100)."""
    short = {v.rpartition(".")[2]: v for v in valid}
    name = key.rpartition(".")[2]
    guess = (renamed or {}).get(name) or short.get(next(iter(difflib.get_close_matches(name, short, n=1)), None))
    hint = f"; did you mean {guess!r}?" if guess else ""
    return f"unknown key {key!r} in {where}{hint} ({listing or 'valid keys: ' + ', '.join(sorted(valid))})"


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


# --- training configuration: YAML sections -> dataclasses, ``training`` being TrainingArguments itself ---


@dataclass
class ModelArguments:
    base: str = field(
        default="openai/clip-vit-base-patch32",
        metadata={"help": "hub id, local folder, convert:<open_clip source>, or tiny-clip"},
    )
    base_hub_id: str | None = field(
        default=None, metadata={"help": "the Hub repo of a local base (convert --push-to-hub): what the run records"}
    )
    random_weights: bool = field(default=False, metadata={"help": "keep the architecture, skip the download"})
    type: str = field(
        default="clip",
        metadata={
            "help": "clip: LoRA on a CLIP model scored against class prompts; supervised: an image classifier "
            "(transformers AutoModelForImageClassification, e.g. microsoft/resnet-50, timm/..., tiny-resnet)"
        },
    )
    pretrained: bool = field(
        default=True,
        metadata={
            "help": "supervised: start from the model's pretrained weights; false: the same architecture, random weights"
        },
    )
    finetune: str | None = field(
        default=None,
        metadata={
            "help": "lora, or (supervised only) full: every weight trains; unset: lora for clip, full for supervised"
        },
    )


@dataclass
class LoraArguments:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.1
    towers: list[str] = field(default_factory=lambda: ["vision", "text"])
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "out_proj"],
        metadata={"help": "add fc1, fc2 for the MLPs"},
    )
    train_logit_scale: bool = False


@dataclass
class DataArguments:
    path: str = field(default="data/mushrooms", metadata={"help": "data_scripts/prepare_kaggle.py --output"})
    text_type: str = "taxon_com"
    train_template: str = field(default="a photo of {}.", metadata={"help": "one prompt per class, every step"})
    eval_templates: str = field(default="single", metadata={"help": "the zero-shot head's templates at evaluation"})
    num_workers: int = 4
    taxonomy: str | None = field(
        default=None, metadata={"help": "a table with the prepared folder's species (e.g. other common names)"}
    )
    holdout_species: list[str] | None = field(
        default=None,
        metadata={
            "help": "open set: species kept out of training and validation, seen only as unknown test images; a "
            "list of names, or a fraction of the species (e.g. 0.1) drawn with holdout_seed, stratified by edibility"
        },
    )
    holdout_seed: int = field(default=0, metadata={"help": "the draw of a holdout_species fraction"})
    imbalance: dict | None = field(
        default=None,
        metadata={
            "help": "a long-tailed training split: {profile: exponential | step, ratio: 100, seed: 0} (unset: all "
            "training images); validation and test stay as prepared (mushroomclip.data.imbalance)"
        },
    )
    sampler: str = field(
        default="random",
        metadata={"help": "random: each epoch a permutation; class_balanced: every species equally likely per draw"},
    )


@dataclass
class LossArguments:
    name: str = field(default="class_text", metadata={"help": "a name of mushroomclip.training.losses.LOSSES"})
    beta: float = field(
        default=10.0,
        metadata={
            "help": "hierarchical_soft: soft-label sharpness (Bertinetto et al. 2020 use 4 to 30; large = cross-entropy)"
        },
    )
    alpha: float = field(
        default=0.1,
        metadata={
            "help": "hierarchical_xent: level weights exp(-alpha * depth) (0 = cross-entropy; the paper uses 0.1, 0.5)"
        },
    )
    danger_weight: float = field(
        default=0.0, metadata={"help": "weight of the term on edible probability for deadly/poisonous truths (0 = off)"}
    )
    logit_adjust: float = field(
        default=0.0,
        metadata={
            "help": "tau of the logit-adjusted loss (Menon et al. 2021): tau * log(training prior) added to the "
            "class logits inside the loss (0 = off; the paper uses 1)"
        },
    )


def loss_settings(loss: dict) -> list[str]:
    """What a run's ``loss`` section changes beyond the loss's name, as results name it: ``β=10`` (hierarchical_soft),
    ``α=0.1`` (hierarchical_xent), ``danger_weight=1``, ``logit_adjust τ=1``; [] when nothing else is set."""
    defaults = LossArguments()
    name, parts = loss.get("name", defaults.name), []
    if name == "hierarchical_soft":
        parts.append(f"β={loss.get('beta', defaults.beta):g}")
    if name == "hierarchical_xent":
        parts.append(f"α={loss.get('alpha', defaults.alpha):g}")
    if loss.get("danger_weight"):
        parts.append(f"danger_weight={loss['danger_weight']:g}")
    if loss.get("logit_adjust"):
        parts.append(f"logit_adjust τ={loss['logit_adjust']:g}")
    return parts


def describe_loss(loss: dict) -> str:
    """A run's loss with its settings (:func:`loss_settings`): ``hierarchical_soft (β=10, danger_weight=1)``."""
    settings = loss_settings(loss)
    return loss.get("name", LossArguments.name) + (f" ({', '.join(settings)})" if settings else "")


@dataclass
class RunArguments:
    """What a run does around training that TrainingArguments has no field for."""

    resume: bool = field(
        default=False,
        metadata={"help": "continue the run in training.output_dir from its last complete checkpoint (same config)"},
    )
    overwrite: bool = field(
        default=False,
        metadata={"help": "start over in an output_dir that holds a run: deletes its results and checkpoints"},
    )
    test_after: bool = field(default=True, metadata={"help": "evaluate the best adapter on the test split at the end"})
    unknown_tpr: float | None = field(
        default=None,
        metadata={
            "help": "open set: the share of known validation images that predict.py answers as known (e.g. 0.95); "
            "below the top-1 probability that keeps it, it says 'possibly not one of the known species' (unset: "
            "off; 0.95 with data.holdout_species)"
        },
    )
    max_danger: float | None = field(
        default=None,
        metadata={
            "help": "selective prediction: on validation, choose the species threshold whose dangerous->edible rate "
            "is at most this (e.g. 0.001); recorded in metrics.json for predict.py and the app (unset: off)"
        },
    )


@dataclass
class HubArguments:
    push: bool = False
    repo_id: str | None = None
    private: bool = False


SECTIONS = {
    "model": ModelArguments,
    "lora": LoraArguments,
    "data": DataArguments,
    "loss": LossArguments,
    "training": TrainingArguments,
    "run": RunArguments,
    "hub": HubArguments,
}
TRAINING_DOCS = (
    "any transformers.TrainingArguments field, https://huggingface.co/docs/transformers/main_classes/trainer"
)
# The training keys of configs written before the section became TrainingArguments: an old config's error names
# the new key (difflib alone would offer auto_find_batch_size for batch_size).
RENAMED_TRAINING_KEYS = {
    "lr": "training.learning_rate",
    "epochs": "training.num_train_epochs",
    "batch_size": "training.per_device_train_batch_size",
    "eval_batch_size": "training.per_device_eval_batch_size",
    "grad_accum": "training.gradient_accumulation_steps",
    "warmup_ratio": "training.warmup_steps",
    "precision": "training.bf16",
    "resume": "run.resume",
    "overwrite": "run.overwrite",
    "test_after": "run.test_after",
}


@dataclass
class TrainConfig:
    """A training config: the project's sections and ``training``, a ``transformers.TrainingArguments``."""

    model: ModelArguments
    lora: LoraArguments
    data: DataArguments
    loss: LossArguments
    training: TrainingArguments
    run: RunArguments
    hub: HubArguments
    # The training keys that the file, the command line or the project set; every other one is transformers' default.
    training_keys: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        """The resolved config as saved with a run; loading it gives the same config back."""
        training = self.training.to_dict()
        return {
            name: {k: training[k] for k in training if k in self.training_keys}
            if name == "training"
            else asdict(getattr(self, name))
            for name in SECTIONS
        }


def on_cpu() -> bool:
    """CPU training: no CUDA, or ``accelerate launch --cpu``."""
    return not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("true", "1")


def auto_precision(cpu: bool, bf16_supported: bool, accelerate_setting: str | None) -> str:
    """``fp32`` on the CPU; on a GPU the accelerate config's ``mixed_precision`` when it names one
    (``accelerate launch --config_file accelerate_config.yaml`` -> bf16), else bf16 where the GPU has it and fp16
    on older GPUs. (accelerate's ``no`` is also its default without a config, so it is not taken as a choice.)"""
    if cpu:
        return "fp32"
    return accelerate_setting if accelerate_setting in ("bf16", "fp16") else "bf16" if bf16_supported else "fp16"


def auto_optim() -> str:
    """8-bit AdamW where bitsandbytes and CUDA are there, else ``adamw_torch`` (transformers' default is the fused
    kernel, whose numbers differ slightly from those of the project's runs)."""
    return "adamw_bnb_8bit" if torch.cuda.is_available() and importlib.util.find_spec("bitsandbytes") else "adamw_torch"


def project_training_defaults(user: dict, num_workers: int) -> dict:
    """The TrainingArguments values this project uses for the keys that ``user`` (the config's ``training``
    section) does not set; the only place where they are chosen. Always the same keys, so a saved config
    (which lists them) loads back unchanged."""
    cpu = on_cpu()
    if "bf16" in user or "fp16" in user:  # the user's choice; the other one stays off
        precision = "fp32"
    else:
        precision = auto_precision(
            cpu, not cpu and torch.cuda.is_bf16_supported(), os.environ.get("ACCELERATE_MIXED_PRECISION")
        )
    # Evaluate (and save, which load_best_model_at_end needs in step with it) every epoch, or every eval_steps.
    strategy = user.get("eval_strategy", "steps" if user.get("eval_steps") is not None else "epoch")
    return {
        "output_dir": "runs/lora-b32",  # the run folder; Trainer's checkpoints go to its checkpoints/
        "seed": 42,  # transformers' default too, listed so that every saved config records it
        "num_train_epochs": 5.0,
        "per_device_train_batch_size": 128,
        "per_device_eval_batch_size": 256,
        "learning_rate": 5e-4,
        "weight_decay": 0.05,
        "warmup_steps": 0.05,
        "lr_scheduler_type": "cosine",
        "optim": auto_optim(),
        "bf16": precision == "bf16",
        "fp16": precision == "fp16",
        "use_cpu": cpu,
        "eval_strategy": strategy,
        "save_strategy": user.get("save_strategy", strategy),
        "save_steps": user.get("eval_steps") or user.get("logging_steps", 10),
        "save_total_limit": 3,
        "logging_steps": 10,
        "load_best_model_at_end": True,
        "metric_for_best_model": "miou",
        "greater_is_better": True,
        "report_to": "none",
        "remove_unused_columns": False,
        "label_names": ["labels"],
        "dataloader_num_workers": num_workers,
        "dataloader_persistent_workers": num_workers > 0,
        "ddp_find_unused_parameters": False,
        "activation_checkpointing_kwargs": {"use_reentrant": False},
        "disable_tqdm": False,
    }


def _fits(value, base) -> bool:
    """Whether ``value`` is of ``base``, one type of a field's annotation (bools are not numbers here)."""
    if base is type(None):
        return value is None
    if isinstance(value, bool):
        return base is bool
    if base is float:
        return isinstance(value, (int, float))
    if isinstance(base, type) and issubclass(base, enum.Enum):
        return isinstance(value, (str, base))  # TrainingArguments takes the names of its enums
    return not isinstance(base, type) or isinstance(value, base)  # Literal & co.: the dataclass checks them


def _coerce(value, kind, where: str):
    """``value`` checked against the field's annotation ``kind``; YAML's strings for numbers (``1e-4`` without
    a dot) become floats and a comma-separated string becomes a list."""
    union = typing.get_origin(kind) in (typing.Union, types.UnionType)
    bases = [typing.get_origin(option) or option for option in (typing.get_args(kind) if union else (kind,))]
    if any(_fits(value, base) for base in bases):
        return value
    if isinstance(value, str) and float in bases:
        with contextlib.suppress(ValueError):
            return float(value)
    if isinstance(value, str) and list in bases:
        return [v.strip() for v in value.split(",") if v.strip()]
    if isinstance(value, (int, float)) and not isinstance(value, bool) and list in bases:
        return [str(value)]  # one number where a list goes (data.holdout_species: 0.1)
    names = " or ".join(
        "null" if b is type(None) else "a mapping" if b is dict else getattr(b, "__name__", str(b)) for b in bases
    )
    raise ConfigError(f"{where} must be {names}, got {value!r} ({type(value).__name__})")


def _merge(values: dict, new: dict, source: str) -> None:
    """Check ``new`` (sections of keys) against the dataclasses' fields and types and merge it into ``values``."""
    for section, body in new.items():
        if section not in SECTIONS:
            raise ConfigError(unknown_key_message(section, list(SECTIONS), source))
        if not isinstance(body, dict):
            raise ConfigError(f"{section} in {source} must be a mapping of keys to values")
        hints = typing.get_type_hints(SECTIONS[section])
        kinds = {f.name: hints[f.name] for f in fields(SECTIONS[section]) if f.init}
        for key, value in body.items():
            if key not in kinds:
                training = section == "training"
                raise ConfigError(
                    unknown_key_message(
                        f"{section}.{key}",
                        [f"{section}.{n}" for n in kinds],
                        source,
                        TRAINING_DOCS if training else None,
                        RENAMED_TRAINING_KEYS if training else None,
                    )
                )
            values[section][key] = _coerce(value, kinds[key], f"{section}.{key}")


SAMPLERS = ("random", "class_balanced")
LORA_MODULES = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


def _check_ranges(config: TrainConfig) -> None:
    """Values a run cannot use, each a ConfigError naming the key, before any model or data is loaded."""
    t, lora = config.training, config.lora
    checks = [
        (
            "training.per_device_train_batch_size",
            t.per_device_train_batch_size,
            t.per_device_train_batch_size >= 1,
            "at least 1",
        ),
        (
            "training.per_device_eval_batch_size",
            t.per_device_eval_batch_size,
            t.per_device_eval_batch_size >= 1,
            "at least 1",
        ),
        (
            "training.gradient_accumulation_steps",
            t.gradient_accumulation_steps,
            t.gradient_accumulation_steps >= 1,
            "at least 1",
        ),
        (
            "training.learning_rate",
            t.learning_rate,
            math.isfinite(t.learning_rate) and t.learning_rate > 0,
            "a positive number, e.g. 5e-4",
        ),
        (
            "training.num_train_epochs",
            t.num_train_epochs,
            t.max_steps > 0 or (math.isfinite(t.num_train_epochs) and t.num_train_epochs > 0),
            "positive (or set training.max_steps)",
        ),
        (
            "training.max_steps",
            t.max_steps,
            t.max_steps == -1 or t.max_steps >= 1,
            "-1 (train for training.num_train_epochs) or at least 1",
        ),
        (
            "training.warmup_steps",
            t.warmup_steps,
            t.warmup_steps >= 0,
            "a ratio in [0, 1) of the steps, or a number of steps",
        ),
        ("training.weight_decay", t.weight_decay, t.weight_decay >= 0, "0 or more"),
        (
            "training.eval_steps",
            t.eval_steps,
            t.eval_steps is None or t.eval_steps > 0,
            "positive (or unset: every epoch)",
        ),
        ("training.save_steps", t.save_steps, t.save_steps > 0, "positive"),
        (
            "training.save_total_limit",
            t.save_total_limit,
            t.save_total_limit is None or t.save_total_limit >= 1,
            "at least 1",
        ),
        ("training.logging_steps", t.logging_steps, t.logging_steps > 0, "positive"),
        ("training.seed", t.seed, t.seed >= 0, "0 or more"),
        (
            "training.fp16",
            t.fp16,
            not (t.fp16 and t.use_cpu),
            "false on the CPU (fp16 needs a GPU; training.bf16 works on both)",
        ),
        ("lora.r", lora.r, lora.r >= 1, "at least 1, e.g. 16"),
        ("lora.alpha", lora.alpha, lora.alpha > 0, "positive, e.g. 2 * lora.r"),
        ("lora.dropout", lora.dropout, 0 <= lora.dropout < 1, "in [0, 1)"),
        (
            "data.num_workers",
            config.data.num_workers,
            config.data.num_workers >= 0,
            "0 (load in the main process) or more",
        ),
        (
            "run.max_danger",
            config.run.max_danger,
            config.run.max_danger is None or 0 <= config.run.max_danger < 1,
            "in [0, 1), e.g. 0.001 (or unset)",
        ),
        (
            "run.unknown_tpr",
            config.run.unknown_tpr,
            config.run.unknown_tpr is None or 0 < config.run.unknown_tpr <= 1,
            "in (0, 1], e.g. 0.95 (or unset)",
        ),
        ("loss.beta", config.loss.beta, math.isfinite(config.loss.beta) and config.loss.beta > 0, "positive, e.g. 10"),
        (
            "loss.alpha",
            config.loss.alpha,
            math.isfinite(config.loss.alpha) and config.loss.alpha >= 0,
            "0 or more, e.g. 0.1",
        ),
        (
            "loss.danger_weight",
            config.loss.danger_weight,
            math.isfinite(config.loss.danger_weight) and config.loss.danger_weight >= 0,
            "0 (off) or more, e.g. 1.0",
        ),
        (
            "loss.logit_adjust",
            config.loss.logit_adjust,
            math.isfinite(config.loss.logit_adjust) and config.loss.logit_adjust >= 0,
            "0 (off) or more, e.g. 1.0",
        ),
        (
            "data.sampler",
            config.data.sampler,
            config.data.sampler in SAMPLERS,
            " or ".join(SAMPLERS),
        ),
    ]
    for key, value, ok, expected in checks:
        if not ok:
            raise ConfigError(f"{key} must be {expected}, got {value!r}")
    # a supervised model's LoRA goes on its own layer names, or on every linear/conv layer ([auto])
    unknown = [m for m in lora.target_modules if m not in LORA_MODULES] if config.model.type == "clip" else []
    if unknown or not lora.target_modules:
        raise ConfigError(
            f"lora.target_modules must be a non-empty list of {', '.join(LORA_MODULES)}, got {lora.target_modules}"
        )
    try:
        parse_fraction(config.data.holdout_species)
    except HoldoutError as err:
        raise ConfigError(str(err)) from None
    try:  # resolved here, so the saved config says what ran
        config.data.imbalance = resolve_imbalance(config.data.imbalance)
    except ImbalanceError as err:
        raise ConfigError(str(err)) from None
    if config.run.resume and config.run.overwrite:
        raise ConfigError("--resume continues the run in training.output_dir and --overwrite deletes it: choose one")


def _parse(section: str, values: dict):
    """A section's ``values`` as its dataclass (HfArgumentParser, as ``run_clip.py`` does); what the dataclass
    itself rejects (TrainingArguments checks combinations of its fields) is one ConfigError line."""
    try:
        [parsed] = HfArgumentParser(SECTIONS[section]).parse_dict(values)
    except ValueError as err:
        raise ConfigError(f"{section}: {' '.join(str(err).split())}") from None
    return parsed


def load_train_config(path: str | Path | None, overrides: list[str] = ()) -> TrainConfig:
    """Project defaults <- YAML file <- ``section.key=value`` overrides (values parsed as YAML), validated."""
    values: dict[str, dict] = {section: {} for section in SECTIONS}
    if path is not None:
        _merge(values, read_yaml_mapping(Path(path)), str(path))
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or "." not in key:
            raise ConfigError(f"override {item!r} must look like section.key=value, e.g. training.learning_rate=1e-4")
        section, _, name = key.partition(".")
        value = yaml.safe_load(raw)
        name, dot, inner = name.partition(".")
        if dot:  # one key of a mapping-valued key (data.imbalance.ratio=10): the rest of the mapping stays
            current = values.get(section, {}).get(name)
            value = {**(current if isinstance(current, dict) else {}), inner: value}
        _merge(values, {section: {name: value}}, "the command line")
    if (steps := values["training"].get("eval_steps")) is not None and steps <= 0:  # TrainingArguments would
        # quietly take logging_steps instead
        raise ConfigError(f"training.eval_steps must be positive (or unset: every epoch), got {steps!r}")
    sections = {name: _parse(name, values[name]) for name in SECTIONS if name != "training"}
    training = project_training_defaults(values["training"], sections["data"].num_workers) | values["training"]
    config = TrainConfig(**sections, training=_parse("training", training), training_keys=tuple(training))
    _validate(config)
    return config


def _check_model(model: ModelArguments, lora: LoraArguments) -> None:
    """The model section's choices that go together (a CLIP model trains LoRA; a classifier has no logit scale)."""
    if model.type not in ("clip", "supervised"):
        raise ConfigError(f"model.type must be clip or supervised, got {model.type!r}")
    if model.finetune is None:  # resolved here, so the saved config says what ran
        model.finetune = "lora" if model.type == "clip" else "full"
    if model.finetune not in ("lora", "full"):
        raise ConfigError(f"model.finetune must be lora or full, got {model.finetune!r}")
    if model.type == "clip":
        if model.finetune != "lora" or not model.pretrained:
            raise ConfigError(
                "model.finetune: full and model.pretrained: false are for model.type: supervised; a CLIP "
                "model trains LoRA on its pretrained weights (model.random_weights: an untrained one)"
            )
        return
    wrong = [
        k
        for k, v in (
            ("model.random_weights", model.random_weights),
            ("model.base_hub_id", model.base_hub_id),
            ("lora.train_logit_scale", lora.train_logit_scale),
        )
        if v
    ]
    if wrong:
        raise ConfigError(
            f"{', '.join(wrong)}: not for a model.type: supervised model (model.pretrained: false "
            "trains one from random weights)"
        )
    if model.finetune == "lora" and lora.target_modules == LoraArguments().target_modules:
        raise ConfigError(
            "lora.target_modules: its default names CLIP's attention layers; for a supervised model set "
            "[auto] (every linear and convolution layer of the backbone) or the model's own layer names"
        )
    if model.base == TINY_RESNET and model.pretrained:
        raise ConfigError(
            f"model.base {TINY_RESNET} is a random test model without pretrained weights; set model.pretrained: false"
        )


def _validate(config: TrainConfig) -> None:
    """The checks across keys and against the machine (files, installed packages)."""
    _check_model(config.model, config.lora)
    losses = [n for n in LOSSES if n not in (SUPERVISED_ONLY if config.model.type == "clip" else CLIP_ONLY)]
    if config.loss.name not in losses:
        raise ConfigError(
            f"loss.name must be one of {', '.join(losses)} for a model.type {config.model.type} "
            f"model, got {config.loss.name!r}"
        )
    for key in ("danger_weight", "logit_adjust"):
        if getattr(config.loss, key) > 0 and config.loss.name in PAIRED_LOSSES:
            raise ConfigError(
                f"loss.{key} needs the scores of every class, which loss.name={config.loss.name} does "
                "not compute: use class_text, hierarchical_soft or hierarchical_xent"
            )
    if config.loss.logit_adjust > 0 and config.data.sampler == "class_balanced":
        # Menon et al.'s offset is log of the prior the batches follow; class-balanced draws make it uniform
        raise ConfigError(
            "loss.logit_adjust and data.sampler=class_balanced both correct for the long tail (the sampler makes "
            "every species equally likely, so the adjustment would count the imbalance twice): choose one"
        )
    if config.data.text_type not in TEXT_TYPES:
        raise ConfigError(f"data.text_type must be one of {', '.join(TEXT_TYPES)}, got {config.data.text_type!r}")
    unknown_towers = set(config.lora.towers) - {"vision", "text"}
    if unknown_towers or not config.lora.towers:
        raise ConfigError(f"lora.towers must be a non-empty subset of [vision, text], got {config.lora.towers}")
    for reporter in config.training.report_to:
        if reporter not in INTEGRATION_TO_CALLBACK:
            raise ConfigError(
                f"training.report_to must be none, all or some of {', '.join(INTEGRATION_TO_CALLBACK)}, "
                f"got {reporter!r}"
            )
        if reporter not in get_available_reporting_integrations():
            raise ConfigError(f"training.report_to={reporter} needs the {reporter} package: pip install {reporter}")
    _check_ranges(config)
    if config.data.taxonomy is not None and not Path(config.data.taxonomy).is_file():
        raise ConfigError(
            f"data.taxonomy {config.data.taxonomy} does not exist (a CSV like the prepared folder's "
            "taxonomy.csv; leave it unset to use that one)"
        )
    hub_id = config.model.base_hub_id
    if hub_id is not None and not re.fullmatch(r"[\w.-]+/[\w.-]+", hub_id):
        raise ConfigError(
            f"model.base_hub_id must be a Hub repo id USER/NAME (e.g. the --push-to-hub of "
            f"python -m mushroomclip.models.convert), got {hub_id!r}"
        )
    base = Path(config.model.base)
    if config.hub.push and hub_id is None and base.is_dir():
        if not (base / RECIPE_FILE).is_file():
            raise ConfigError(
                f"hub.push: model.base {base} is a local folder no other machine has; set "
                "model.base_hub_id to its Hub repo, or use a folder written by python -m "
                "mushroomclip.models.convert (it records the source to convert again)"
            )
    if config.hub.push and not config.hub.repo_id:
        raise ConfigError("hub.push is true but hub.repo_id is not set (e.g. hub.repo_id=USER/mushroomclip-lora-b32)")
