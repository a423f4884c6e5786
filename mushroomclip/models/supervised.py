"""Supervised image classifiers (ResNet, ConvNeXt, ViT, any ``timm/...`` model) from
``transformers.AutoModelForImageClassification``: built, wrapped for LoRA, and loaded back from a run.

``build_classifier("microsoft/resnet-50", classes)`` gives the ImageNet-pretrained network with a new head of
``len(classes)`` outputs (``pretrained=False``: the same architecture, randomly initialised, as the course's
baselines were), its :class:`~mushroomclip.data.transforms.PreprocessConfig` (read from its image processor)
and a record saying which it was. ``tiny-resnet`` is a two-stage random ResNet built from a config: tests and
the offline demo use it. A loaded checkpoint that lacks any tensor but the head's is refused, never
completed with random weights.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub import try_to_load_from_cache
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageClassification, ResNetConfig, set_seed
from transformers.image_utils import PILImageResampling, pil_torch_interpolation_mapping
from transformers.utils import logging as hf_logging

from mushroomclip.data.transforms import EvalPixels, PreprocessConfig, normalize
from mushroomclip.models.backbones import REDOWNLOAD, ModelLoadError, _first_line, _hf_weights_id, _size_value
from mushroomclip.models.classifier import (
    CLASSES_FILE,
    AdapterError,
    Classifier,
    _check_finite,
    _local_dir,
    run_name,
)
from mushroomclip.models.lora import quiet_peft
from mushroomclip.models.weights import hub_reachable, offline_note
from mushroomclip.taxonomy import Taxonomy, load_taxonomy

TINY_RESNET = "tiny-resnet"
MODEL_TYPE = "supervised"  # classes.json's model_type of a supervised run
FULL_WEIGHTS = "model.safetensors"  # a full fine-tune's weights (save_pretrained), beside its config.json
ADAPTER_WEIGHTS = "adapter_model.safetensors"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NOT_A_CLASSIFIER_FIX = "Name an image classification model, e.g. microsoft/resnet-50 or a timm/... model"
LOCAL_FOLDER_FIX = (
    "A folder must hold what save_pretrained writes for the model and its image processor (config.json, the "
    "weights, preprocessor_config.json); or name the Hub model it came from"
)
NO_NETWORK_FIX = (
    "Check the network and the Hugging Face login (hf auth login), or use the offline test model tiny-resnet"
)


@dataclass
class SupervisedModel:
    """A classifier network, its evaluation preprocessing and what it was built from (for every result)."""

    model: nn.Module  # a PreTrainedModel, or the peft model around one
    preprocess: PreprocessConfig  # from its image processor: every image transform is built from it
    record: dict  # base_model, pretrained, weights, num_labels: see build_classifier


def tiny_resnet_config(classes: list[str]):
    """Two basic-block stages of width 16/32 on 32 px images: the offline test model (``tiny-resnet``)."""
    id2label, label2id = _label_maps(classes)
    return ResNetConfig(
        embedding_size=16,
        hidden_sizes=[16, 32],
        depths=[1, 1],
        layer_type="basic",
        id2label=id2label,
        label2id=label2id,
    )


TINY_PREPROCESS = PreprocessConfig(
    size=(32, 32), resize_size=36, interpolation="bicubic", mean=IMAGENET_MEAN, std=IMAGENET_STD
)


#: Architectures built from a config with random weights, for the speed benchmark (``make bench-train
#: BENCH_MODEL=resnet-50``), which needs no download: ``transformers.ResNetConfig()``'s defaults are ResNet-50
#: (bottleneck blocks 3-4-6-3, widths 256-2048), the network of ``microsoft/resnet-50``, and its preprocessing is
#: that checkpoint's image processor's (shortest edge 224 / crop_pct 0.875: resize 256, crop 224, bicubic).
CLASSIFIERS = {
    TINY_RESNET: (tiny_resnet_config, TINY_PREPROCESS),
    "resnet-50": (
        lambda classes: ResNetConfig(id2label=_label_maps(classes)[0], label2id=_label_maps(classes)[1]),
        PreprocessConfig(
            size=(224, 224), resize_size=256, interpolation="bicubic", mean=IMAGENET_MEAN, std=IMAGENET_STD
        ),
    ),
}


def random_classifier(name: str, classes: list[str]) -> SupervisedModel:
    """The architecture ``name`` of :data:`CLASSIFIERS` with a head for ``classes``, randomly initialised (seed 0)."""
    config, preprocess = CLASSIFIERS[name]
    torch.manual_seed(0)
    model = AutoModelForImageClassification.from_config(config(classes), dtype=torch.float32)
    record = {"base_model": name, "pretrained": False, "weights": "random (seed 0)", "num_labels": len(classes)}
    return SupervisedModel(model, preprocess, record)


def _label_maps(classes: list[str]) -> tuple[dict, dict]:
    """A config's ``id2label`` and ``label2id``: the head's outputs are the taxonomy's classes, in order."""
    return dict(enumerate(classes)), {name: i for i, name in enumerate(classes)}


def build_classifier(base: str, classes: list[str], pretrained: bool = True) -> SupervisedModel:
    """``AutoModelForImageClassification`` for ``base`` (Hub id, local folder or ``tiny-resnet``) with a new
    head for ``classes``: the checkpoint's pretrained weights for everything else when ``pretrained``, else
    random weights.

    The head always starts from PyTorch's default initialisation, also when the checkpoint's head has the
    same shape (its classes are not ours). Seed before calling for a reproducible head (and scratch model).
    """
    if base == TINY_RESNET:
        if pretrained:
            raise ModelLoadError(
                f"{TINY_RESNET} is a random test model without pretrained weights; set model.pretrained: false"
            )
        return random_classifier(TINY_RESNET, classes)  # seed 0: the same backbone in every process and on reload
    folder = Path(base).is_dir()
    local_only = not folder and not hub_reachable()  # offline: the cache only, no minute of retries
    config = _hub_call(base, local_only, "config.json", _classifier_config, base, classes, local_only)
    if pretrained:
        model = _hub_call(base, local_only, "weights", _pretrained_model, base, config, local_only)
        weights = _hf_weights_id(base, folder)
    else:
        model = _hub_call(base, local_only, "config.json", _scratch_model, config)
        weights = f"random (config {_hf_weights_id(base, folder)})"
    for name in head_modules(model):
        reset_head(model.get_submodule(name))
    processor = _hub_call(base, local_only, "preprocessor config", _image_processor, base, local_only)
    record = {"base_model": base, "pretrained": pretrained, "weights": weights, "num_labels": len(classes)}
    return SupervisedModel(model, preprocess_from_processor(processor, base), record)


def _hub_call(base: str, local_only: bool, what: str, fn, *args):
    """``fn(*args)``; a missing or unreadable file is a one-line :class:`ModelLoadError` naming ``base``."""
    try:
        return fn(*args)
    except ModelLoadError:
        raise
    except OSError as err:  # a file is missing here or on the Hub; the repo is private or misspelt
        if Path(base).is_dir():  # a local folder: no network can help
            problem = f"the folder has no usable {what} ({_first_line(err)})"
            raise ModelLoadError(_error(base, problem, LOCAL_FOLDER_FIX)) from None
        problem = f"its {what} cannot be had ({_first_line(err)})" + (f"; {offline_note()}" if local_only else "")
        raise ModelLoadError(_error(base, problem, NO_NETWORK_FIX)) from None
    except (ValueError, ImportError) as err:  # not an architecture AutoModelForImageClassification has
        problem = f"it is not an image classifier that transformers can build ({_first_line(err)})"
        raise ModelLoadError(_error(base, problem, NOT_A_CLASSIFIER_FIX)) from None
    except Exception as err:  # a truncated or corrupt file, an architecture this transformers lacks
        problem = f"its {what} cannot be read ({type(err).__name__}: {_first_line(err)})"
        raise ModelLoadError(_error(base, problem, REDOWNLOAD)) from None


def _classifier_config(base: str, classes: list[str], local_only: bool):
    config = AutoConfig.from_pretrained(base, local_files_only=local_only)
    # set afterwards: as from_pretrained arguments they clash with the checkpoint's own labels (a warning)
    config.id2label, config.label2id = _label_maps(classes)
    # timm >= 1.0 writes num_classes into model_args too; transformers' wrapper then passes it twice
    if isinstance(getattr(config, "model_args", None), dict):
        config.model_args.pop("num_classes", None)
    return config


def _error(base: str, problem: str, fix: str) -> str:
    return f"could not load model {base!r}: {problem}. {fix}."


def _scratch_model(config):
    return AutoModelForImageClassification.from_config(config, dtype=torch.float32)


def _pretrained_model(base: str, config, local_only: bool):
    """The checkpoint's weights in ``config``'s architecture; only the head may be missing or of another shape."""
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its load report would call the new head a problem; we check it below
    try:
        model, info = AutoModelForImageClassification.from_pretrained(
            base,
            config=config,
            ignore_mismatched_sizes=True,
            output_loading_info=True,
            local_files_only=local_only,
            dtype=torch.float32,
        )
    finally:
        hf_logging.set_verbosity(verbosity)
    head = tuple(f"{name}." for name in head_modules(model))
    problems = [
        *(f"lacks {k}" for k in sorted(info["missing_keys"]) if not k.startswith(head)),
        *(
            f"has {k} of shape {tuple(a)}, not {tuple(b)}"
            for k, a, b in sorted(info["mismatched_keys"])
            if not k.startswith(head)
        ),
        *(f"has the unexpected tensor {k}" for k in sorted(info["unexpected_keys"])),
        *info.get("error_msgs", []),
    ]
    if problems:
        listed = "; ".join(problems[:3]) + (f"; ... ({len(problems)} in all)" if len(problems) > 3 else "")
        problem = f"its weight file ({_weight_file_name(base)}) does not fit its config.json: {listed}"
        raise ModelLoadError(_error(base, problem, "Download the model again, or check model.base"))
    return model


def _weight_file_name(base: str) -> str:
    """The weight file of a folder or cached Hub repo, for messages."""
    names = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
    for name in names:
        path = Path(base, name) if Path(base).is_dir() else try_to_load_from_cache(base, name)
        if isinstance(path, (str, Path)) and Path(path).is_file():
            return str(path)
    return " / ".join(names)


def _image_processor(base: str, local_only: bool):
    return AutoImageProcessor.from_pretrained(base, local_files_only=local_only)


def head_modules(model: nn.Module) -> list[str]:
    """Names of the classification head's modules: timm's ``pretrained_cfg["classifier"]`` under a timm
    wrapper, else transformers' ``classifier``."""
    timm_cfg = getattr(model.config, "pretrained_cfg", None)
    if timm_cfg and timm_cfg.get("classifier"):
        names = timm_cfg["classifier"]
        return [f"timm_model.{name}" for name in ([names] if isinstance(names, str) else names)]
    names = [name for name, _ in model.named_children() if name == "classifier"]
    if not names:
        raise ModelLoadError(f"{type(model).__name__} has no module named classifier: its head is unknown here")
    return names


def reset_head(module: nn.Module) -> None:
    """PyTorch's default initialisation for every layer of a head (a Linear, or a Sequential holding one)."""
    for layer in module.modules():
        if hasattr(layer, "reset_parameters"):
            layer.reset_parameters()


def preprocess_from_processor(processor, base: str = "") -> PreprocessConfig:
    """The evaluation preprocessing an image classifier's processor describes, as it applies it.

    timm's ``crop_pct`` (short side ``floor(size / crop_pct)``, then the centre crop), ConvNeXt/ResNet's
    (``int(shortest_edge / crop_pct)``, or a plain resize from 384 px up), ``shortest_edge`` + ``crop_size``, and
    ViT's fixed ``height``/``width``.
    """
    if hasattr(processor, "data_config"):  # transformers' TimmWrapperImageProcessor: timm's resolve_data_config
        data = processor.data_config
        size, crop_pct = data["input_size"][-1], data.get("crop_pct") or 0.875
        resize = math.floor(size / crop_pct)
        if data.get("crop_mode", "center") not in ("center", "squash"):
            raise ModelLoadError(
                f"could not load model {base!r}: its crop_mode {data['crop_mode']!r} is not supported "
                "(center and squash are)"
            )
        resize = (resize, resize) if data.get("crop_mode") == "squash" else resize
        interpolation, mean, std = data["interpolation"], data["mean"], data["std"]
    else:
        short = _size_value(processor.size, "shortest_edge")
        height, width = _size_value(processor.size, "height"), _size_value(processor.size, "width")
        crop = _size_value(getattr(processor, "crop_size", None), "height")
        crop = crop if getattr(processor, "do_center_crop", False) else None
        crop_pct = getattr(processor, "crop_pct", None)
        if short and crop_pct:  # ConvNextImageProcessor (also microsoft/resnet-*)
            size, resize = short, int(short / crop_pct) if short < 384 else (short, short)
        elif short:
            size, resize = crop or short, short
        elif height and width:
            size, resize = crop or min(height, width), (height, width)
        else:
            raise ModelLoadError(
                f"could not load model {base!r}: its image processor gives no image size ({processor.size})"
            )
        resample = PILImageResampling(processor.resample if processor.resample is not None else 3)  # bicubic
        interpolation = pil_torch_interpolation_mapping[resample].value
        mean, std = processor.image_mean, processor.image_std
    try:
        return PreprocessConfig(
            size=(int(size), int(size)),
            resize_size=resize,
            interpolation=interpolation,
            mean=tuple(map(float, mean)),
            std=tuple(map(float, std)),
        )
    except ValueError as err:  # an interpolation the uint8 pipeline has not
        raise ModelLoadError(f"could not load model {base!r}: {err}") from None


def preprocess_record(preprocess: PreprocessConfig) -> dict:
    """A :class:`PreprocessConfig` as classes.json stores it; :func:`preprocess_from_record` reads it back."""
    return dataclasses.asdict(preprocess)


def preprocess_from_record(record: dict) -> PreprocessConfig:
    resize = record["resize_size"]
    return PreprocessConfig(
        size=tuple(record["size"]),
        resize_size=resize if isinstance(resize, int) else tuple(resize),
        interpolation=record["interpolation"],
        mean=tuple(record["mean"]),
        std=tuple(record["std"]),
    )


# --- LoRA ----------------------------------------------------------------------------------------


def lora_targets(model: nn.Module) -> list[str]:
    """The backbone's Linear and (ungrouped) Conv2d layers, head excluded: where LoRA goes by default.
    Depthwise convolutions (ConvNeXt's) are left out: peft cannot merge them and they hold few weights."""
    head = tuple(head_modules(model))
    return [
        name
        for name, module in model.named_modules()
        if (isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and module.groups == 1))
        and not name.startswith(head)
    ]


def add_classifier_lora(model: nn.Module, r: int, alpha: int, dropout: float, target_modules: list[str] | None = None):
    """Wrap a classifier in a ``PeftModel``: LoRA on ``target_modules`` (default :func:`lora_targets`) trains,
    the head trains in full (``modules_to_save``), everything else is frozen.

    BatchNorm layers of the frozen backbone keep normalising with their pretrained statistics in training too
    (:func:`freeze_batch_norm`), so the saved adapter reproduces exactly the model that was validated.
    """
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=target_modules or lora_targets(model),
        modules_to_save=head_modules(model),
    )
    freeze_batch_norm(model)
    with quiet_peft():
        return get_peft_model(model, config)


def _batch_norm_in_eval_mode(module: nn.Module, args) -> None:
    module.training = False


def freeze_batch_norm(model: nn.Module) -> None:
    """Every BatchNorm layer outside the head normalises with its running statistics and never updates them,
    also while the model is in training mode (a forward pre-hook: Trainer switches modes at every step)."""
    head = tuple(head_modules(model))
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not name.startswith(head):
            module.register_forward_pre_hook(_batch_norm_in_eval_mode)


# --- a finished run as a classifier --------------------------------------------------------------


def supervised_record(taxonomy: Taxonomy, built: SupervisedModel, finetune: str) -> dict:
    """``classes.json`` of a supervised run (the trainer adds ``trained_species``): classes, taxonomy hash, base
    (pretrained or from scratch, which weights), how it was fine-tuned (``full`` or ``lora``) and its
    preprocessing, which loading it back needs."""
    return {
        "model_type": MODEL_TYPE,
        "species": taxonomy.classes,
        "taxonomy_sha256": taxonomy.fingerprint,
        "taxonomy_source": taxonomy.source,
        **built.record,
        "finetune": finetune,
        "preprocess": preprocess_record(built.preprocess),
    }


def save_classifier(run_dir: str | Path, model: nn.Module, record: dict, taxonomy: Taxonomy) -> None:
    """What loading a run back needs: the model (``config.json`` + full weights, or the LoRA adapter with
    its head), ``classes.json`` (:func:`supervised_record`) and the taxonomy its label ids index."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(run_dir), save_embedding_layers=False)  # peft would ask the Hub; transformers ignores it
    (run_dir / CLASSES_FILE).write_text(json.dumps(record, indent=2))
    (run_dir / "taxonomy.csv").write_bytes(taxonomy.raw)


class SupervisedClassifier(Classifier):
    """A trained image classifier with its class list: the same interface as the CLIP
    :class:`~mushroomclip.models.classifier.Classifier` (``classes``, ``taxonomy``, ``pixels``, ``logits``,
    ``predict``, ``ranked``); its logits are the network's own."""

    def __init__(
        self, model: nn.Module, record: dict, taxonomy: Taxonomy, name: str, cache_id: str, device: str = "cpu"
    ):
        self.model, self.record, self.taxonomy = model.eval(), record, taxonomy
        self.classes: list[str] = record["species"]
        self.name, self.cache_id = name, cache_id  # cache_id: keys evaluation's on-disk caches
        self.preprocess = preprocess_from_record(record["preprocess"])
        self.pixels = EvalPixels(self.preprocess)  # one image -> model input; ImageError if unreadable
        self.to(device)

    def to(self, device: str | torch.device, dtype: torch.dtype = torch.float32) -> SupervisedClassifier:
        self.device, self.dtype = torch.device(device), dtype
        self.model.to(self.device, dtype)
        return self

    @torch.inference_mode()
    def logits(self, images) -> torch.Tensor:
        """``(N, C)`` fp32 logits of images (file paths, PIL images, ``datasets`` cells) or of a stacked batch
        of :attr:`pixels` outputs (uint8, normalised here, on the device)."""
        pixels = images if isinstance(images, torch.Tensor) else torch.stack([self.pixels(im) for im in images])
        pixels = normalize(pixels.to(self.device), self.preprocess.mean, self.preprocess.std).to(self.dtype)
        return self.model(pixel_values=pixels).logits.float().cpu()

    def merged(self) -> nn.Module:
        """The classifier as one ``transformers`` model (a LoRA run's adapter merged into its weights)."""
        return self.model.merge_and_unload() if isinstance(self.model, PeftModel) else self.model

    @torch.inference_mode()
    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """``(N, D)`` fp32 features of a uint8 batch: the network's pooled output before its head (what a few-shot
        classifier of new species is built on, :mod:`mushroomclip.evaluation.novel`)."""
        net = self.model.get_base_model() if isinstance(self.model, PeftModel) else self.model
        pixels = normalize(pixels.to(self.device), self.preprocess.mean, self.preprocess.std).to(self.dtype)
        pooled = getattr(net.base_model(pixel_values=pixels), "pooler_output", None)
        if pooled is None:
            raise AdapterError(f"{self.name}: {type(net).__name__} gives no pooled features before its head")
        return pooled.flatten(1).float().cpu()

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """The logits, as evaluation's feature cache (:func:`~mushroomclip.evaluation.features.image_features`)
        asks a backbone for its image features: a supervised model's scores need nothing more."""
        return self.logits(pixels)


def initial_classifier(record: dict, taxonomy: Taxonomy, seed: int, device: str = "cpu") -> SupervisedClassifier:
    """A supervised run's network as its training started (``record``: its classes.json): the pretrained weights, or
    the random initialisation of ``seed`` (the run's ``training.seed``) for a run from scratch, with a new head."""
    set_seed(seed)
    built = build_classifier(record["base_model"], record["species"], record["pretrained"])
    cache_id = f"supervised-initial:{record['base_model']}:{built.record['weights']}:{seed}"
    return SupervisedClassifier(built.model, record, taxonomy, record["base_model"], cache_id, device)


def load_supervised_classifier(
    dir_or_repo: str, base: str | None = None, species: list[str] | None = None, device: str = "cpu"
) -> SupervisedClassifier:
    """A supervised run folder (or Hub repo) as a classifier: a full fine-tune's ``config.json`` +
    ``model.safetensors``, or a LoRA adapter on its base, rebuilt as the run recorded it. ``base`` / ``species``,
    when given, must be what it was trained with."""
    folder = _local_dir(dir_or_repo)
    record_path = folder / CLASSES_FILE
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    if record.get("model_type") != MODEL_TYPE:
        raise AdapterError(
            f"{dir_or_repo} is not a supervised MushroomCLIP run: its {CLASSES_FILE} is missing or "
            f"not of model_type {MODEL_TYPE}"
        )
    if base is not None and base != record["base_model"]:
        raise AdapterError(f"{dir_or_repo} was trained on base model {record['base_model']!r}, not {base!r}")
    if species is not None and list(species) != record["species"]:
        raise AdapterError(
            f"{dir_or_repo} was trained on other classes ({len(record['species'])} species, this "
            f"data's taxonomy has {len(species)})"
        )
    lora = record.get("finetune") == "lora"
    weights_file = folder / (ADAPTER_WEIGHTS if lora else FULL_WEIGHTS)
    if not weights_file.is_file() or not (folder / ("adapter_config.json" if lora else "config.json")).is_file():
        raise AdapterError(
            f"{dir_or_repo} is incomplete: a {'LoRA' if lora else 'full'} fine-tune needs "
            f"{weights_file.name} and {'adapter_config.json' if lora else 'config.json'}"
        )
    weights = weights_file.read_bytes()
    _check_finite(dir_or_repo, weights, None)
    taxonomy_file = folder / "taxonomy.csv"
    taxonomy = load_taxonomy(taxonomy_file if taxonomy_file.is_file() else None)
    if taxonomy.fingerprint != record["taxonomy_sha256"] or taxonomy.classes != record["species"]:
        raise AdapterError(f"{dir_or_repo}: the taxonomy does not match the one the model was trained with")
    if lora:
        base = build_classifier(record["base_model"], record["species"], record["pretrained"]).model
        freeze_batch_norm(base)
        with quiet_peft():
            model = PeftModel.from_pretrained(base, str(folder))
    else:
        model, info = AutoModelForImageClassification.from_pretrained(
            folder, output_loading_info=True, dtype=torch.float32
        )
        if info["missing_keys"]:
            raise AdapterError(
                f"{dir_or_repo} is broken: {FULL_WEIGHTS} lacks {len(info['missing_keys'])} tensors "
                f"of its config.json (e.g. {sorted(info['missing_keys'])[0]})"
            )
    cache_id = f"supervised:{hashlib.sha256(weights).hexdigest()[:16]}"  # a retrained run never reuses stale caches
    return SupervisedClassifier(model, record, taxonomy, run_name("supervised", folder), cache_id, device)
