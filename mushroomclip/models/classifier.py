"""A saved LoRA run as a classifier: describing its classes and base, and loading it back.

A saved run directory holds the peft adapter (``adapter_config.json``, ``adapter_model.safetensors``)
and ``classes.json`` (species order, text type, templates, taxonomy hash, base model), which is all
:func:`load_classifier` needs. The base is recorded so that another machine can load it (:func:`base_record`):
a Hub id, or the recipe of a converted BioCLIP folder, which is converted again on first use.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from huggingface_hub import snapshot_download
from peft import PeftModel
from safetensors.torch import load

from mushroomclip.data.holdout import HOLDOUT_FILE
from mushroomclip.data.transforms import EvalPixels
from mushroomclip.models.backbones import REGISTRY, Backbone, load_backbone
from mushroomclip.models.convert import PREFIX, converted_folder, read_recipe, recipe_base
from mushroomclip.models.lora import quiet_peft
from mushroomclip.models.prompts import class_prompts, class_text_embeddings
from mushroomclip.taxonomy import Taxonomy, load_taxonomy

CLASSES_FILE = "classes.json"
WEIGHTS_FILE = "adapter_model.safetensors"


class AdapterError(ValueError):
    """An adapter does not fit what the user asked for (classes, base model) or is incomplete."""


def backbone_name(base: str, expected_weights: str | None = None) -> str:
    """``model.base`` of a config -> a :func:`load_backbone` name (registry name or ``hf:``). A ``convert:``
    base is converted on first use (:func:`~mushroomclip.models.convert.converted_folder`)."""
    if base.startswith(PREFIX):
        return f"hf:{converted_folder(base, expected_weights)}"
    if base in REGISTRY:
        if REGISTRY[base].kind != "hf":
            raise AdapterError(
                f"model.base {base!r} is an open_clip model; convert it first: python -m mushroomclip.models.convert"
            )
        return base
    by_source = {spec.source: name for name, spec in REGISTRY.items() if spec.kind == "hf" and spec.source}
    return by_source.get(base, f"hf:{base}")


def base_record(base: str, base_hub_id: str | None = None) -> dict:
    """How a run records its base so that another machine can load it: ``base_model`` is a Hub id (``base_hub_id``)
    or registry name, or ``convert:<source>`` for a folder written by ``mushroomclip.models.convert`` (its recipe in
    ``base_conversion``); a folder without a recipe stays a path (``base_model_is_folder``: never published)."""
    folder = converted_folder(base) if base.startswith(PREFIX) else Path(base) if Path(base).is_dir() else None
    rec = read_recipe(folder) if folder is not None else None
    conversion = {"base_conversion": rec} if rec else {}
    if base_hub_id:
        return {"base_model": base_hub_id} | conversion
    if rec:
        return {"base_model": recipe_base(rec)} | conversion
    return {"base_model": base} | ({"base_model_is_folder": True} if folder is not None else {})


def classes_record(
    taxonomy: Taxonomy, text_type: str, templates: list[str], base: dict, logit_scale: float | None
) -> dict:
    """``classes.json``: the class list and prompts, and the base as :func:`base_record` describes it."""
    return {
        "species": taxonomy.classes,
        "text_type": text_type,
        "templates": templates,
        "taxonomy_sha256": taxonomy.fingerprint,
        "taxonomy_source": taxonomy.source,
        **base,
        "logit_scale": logit_scale,
    }


@dataclass
class Prediction:
    species: str
    probability: float


class Classifier:
    """A LoRA-tuned CLIP with its class list and prompts: images in, ranked species out.

    Images go through evaluation's own preprocessing (:class:`~mushroomclip.data.transforms.EvalPixels`: EXIF
    rotation, the resize and crop of the backbone's ``preprocess`` config), so a photo scores here exactly as in
    the reported metrics.
    """

    def __init__(self, backbone: Backbone, record: dict, taxonomy: Taxonomy):
        self.backbone, self.record, self.taxonomy = backbone, record, taxonomy
        self.classes: list[str] = record["species"]
        # load_classifier has checked that record["species"] is taxonomy.classes, in order
        prompts = class_prompts(taxonomy, record["text_type"], record["templates"])
        self.class_embeddings = class_text_embeddings(backbone, prompts)
        self.pixels = EvalPixels(backbone.preprocess)  # one image -> model input; ImageError if unreadable

    @torch.inference_mode()
    def logits(self, images) -> torch.Tensor:
        """``(N, C)`` logits of images (file paths, PIL images, ``datasets`` cells) or of a stacked batch of
        :attr:`pixels` outputs."""
        pixels = images if isinstance(images, torch.Tensor) else torch.stack([self.pixels(im) for im in images])
        return self.backbone.logit_scale * self.backbone.encode_images(pixels).cpu() @ self.class_embeddings.T

    def merged(self):
        """The fine-tuned model as one ``transformers`` model (LoRA merged into its weights), to save or share."""
        return self.backbone.model.merge_and_unload()

    def predict(self, images, top_k: int = 5) -> list[list[Prediction]]:
        return self.ranked(self.logits(images).softmax(dim=-1), top_k)

    def ranked(self, probs: torch.Tensor, top_k: int = 5) -> list[list[Prediction]]:
        """The ``top_k`` species of each row of ``(N, C)`` probabilities, most probable first."""
        top = probs.topk(min(top_k, len(self.classes)), dim=-1)
        return [
            [Prediction(self.classes[i], float(p)) for p, i in zip(ps, ids)] for ps, ids in zip(top.values, top.indices)
        ]


def data_mismatch(record: dict, classes: list[str], data_species: set[str]) -> str | None:
    """Why an adapter's ``classes.json`` record does not fit data whose label ids index ``classes`` and
    whose images show ``data_species``; ``None`` when it fits."""
    if record.get("species") != list(classes):
        return f"its {len(record.get('species') or [])} classes are not this data's {len(classes)}-species taxonomy"
    trained = record.get("trained_species")
    if trained is None:
        return "its classes.json does not say which species it was trained on (trained_species: an older run)"
    if set(trained) != data_species:
        common = len(set(trained) & data_species)
        return f"trained on {len(trained)} species, this data has {len(data_species)} ({common} in common)"
    return None


def find_adapters(folder: str | Path, classes: list[str], data_species: set[str]) -> tuple[list[str], list[str]]:
    """``lora:<run>`` names of the finished runs under ``folder`` (LoRA adapters, and supervised classifiers)
    trained on exactly ``data_species`` (see :func:`data_mismatch`), and one ``skipped <run>: <why>`` line for every
    other run there."""
    if not Path(folder).is_dir():
        raise FileNotFoundError(f"--include-adapters {folder}: no such folder (it should hold training runs)")
    found, skipped = [], []
    for record_path in sorted(Path(folder).glob(f"*/{CLASSES_FILE}")):
        run = record_path.parent
        model_file = run_model_files(run)[0]
        if not (run / model_file).is_file():
            skipped.append(f"skipped {run}: no {model_file} (an unfinished run?)")
        elif reason := data_mismatch(json.loads(record_path.read_text()), classes, data_species):
            skipped.append(f"skipped {run}: {reason}{holdout_hint(run)}")
        else:
            found.append(f"lora:{run}")
    return found, skipped


def run_name(kind: str, folder: Path) -> str:
    """A run's name in result tables: ``KIND-FOLDER``, or the folder's own name where it already says its kind
    (``runs/lora-b32`` is ``lora-b32``, not ``lora-lora-b32``)."""
    return folder.name if folder.name.startswith(f"{kind}-") else f"{kind}-{folder.name}"


def holdout_hint(run: Path) -> str:
    """For a run that held species out: the evaluation options that draw its hold-out again (else "")."""
    path = run / HOLDOUT_FILE
    if not path.is_file():
        return ""
    record = json.loads(path.read_text())
    spec = ",".join(record["holdout_species"])
    return (
        f"; it held out {len(record['held_out'])} species (holdout_species.json): evaluate with "
        f"--holdout-species {spec} --holdout-seed {record['holdout_seed']} to score it"
    )


def run_model_files(folder: Path) -> tuple[str, str]:
    """The two files holding a run's model: a fully fine-tuned classifier's ``config.json`` and weights (its
    classes.json says ``finetune: full``), else the LoRA adapter's."""
    record = folder / CLASSES_FILE
    full = record.is_file() and json.loads(record.read_text()).get("finetune") == "full"
    return ("config.json", "model.safetensors") if full else ("adapter_config.json", WEIGHTS_FILE)


def is_supervised_run(folder: Path) -> bool:
    """Whether a run folder's classes.json is a supervised classifier's (``model_type: supervised``)."""
    record = folder / CLASSES_FILE
    return record.is_file() and json.loads(record.read_text()).get("model_type") == "supervised"


def _local_dir(dir_or_repo: str) -> Path:
    path = Path(dir_or_repo)
    if path.is_dir():
        return path
    try:
        return Path(snapshot_download(dir_or_repo))
    except Exception as err:  # hub errors come in many types; all mean "not found here"
        raise AdapterError(
            f"{dir_or_repo} is neither a folder nor a reachable Hub repo ({type(err).__name__})"
        ) from None


def _check_finite(dir_or_repo: str, weights: bytes, logit_scale: float | None) -> None:
    """A diverged run saves NaN/inf weights, whose every prediction is NaN: refuse it, naming the folder."""
    bad = [name for name, tensor in load(weights).items() if not torch.isfinite(tensor).all()]
    if bad or (logit_scale is not None and not (math.isfinite(logit_scale) and logit_scale > 0)):
        what = (
            f"{len(bad)} weight tensor(s) hold NaN or inf (e.g. {bad[0]})" if bad else f"logit_scale is {logit_scale}"
        )
        raise AdapterError(
            f"{dir_or_repo} is broken: {what}, so every prediction would be NaN; the training "
            "diverged: retrain it (e.g. a lower training.learning_rate) or use an earlier checkpoint"
        )


def load_classifier(
    dir_or_repo: str, base: str | None = None, species: list[str] | None = None, device: str = "cpu"
) -> Classifier:
    """Base model + adapter + class list from a run folder or Hub repo (a supervised run: its classifier,
    :func:`mushroomclip.models.supervised.load_supervised_classifier`).

    ``base`` / ``species``, when given, must match what the adapter was trained with: a mismatch is
    an :class:`AdapterError` naming both, never silently wrong predictions.
    """
    folder = _local_dir(dir_or_repo)
    if is_supervised_run(folder):
        from mushroomclip.models.supervised import load_supervised_classifier  # it builds on this module

        return load_supervised_classifier(dir_or_repo, base=base, species=species, device=device)
    needed = ("adapter_config.json", WEIGHTS_FILE, CLASSES_FILE)
    if not all((folder / name).is_file() for name in needed):
        raise AdapterError(f"{dir_or_repo} is not a MushroomCLIP adapter: it needs {', '.join(needed)}")
    record = json.loads((folder / CLASSES_FILE).read_text())
    if base is not None and base != record["base_model"]:
        raise AdapterError(f"{dir_or_repo} was trained on base model {record['base_model']!r}, not {base!r}")
    if species is not None and list(species) != record["species"]:
        missing = sorted(set(species) - set(record["species"]))[:5]
        raise AdapterError(
            f"{dir_or_repo} was trained on other classes ({len(record['species'])} species, this "
            f"data's taxonomy has {len(species)}; not among them: {missing or 'same set, other order'})"
        )
    weights = (folder / WEIGHTS_FILE).read_bytes()
    _check_finite(dir_or_repo, weights, record.get("logit_scale"))
    taxonomy_file = folder / "taxonomy.csv"
    taxonomy = load_taxonomy(taxonomy_file if taxonomy_file.is_file() else None)
    if taxonomy.fingerprint != record["taxonomy_sha256"] or taxonomy.classes != record["species"]:
        raise AdapterError(f"{dir_or_repo}: the taxonomy does not match the one the adapter was trained with")
    base_model = record["base_model"]
    if record.get("base_model_is_folder") and not Path(base_model).is_dir():
        raise AdapterError(
            f"{dir_or_repo} was trained on the local model folder {base_model}, which is not on this "
            "machine; copy it here, or retrain on a base another machine can load (a Hub id, "
            "model.base_hub_id, or a folder written by python -m mushroomclip.models.convert)"
        )
    expected_weights = (record.get("base_conversion") or {}).get("weights")
    backbone = load_backbone(backbone_name(base_model, expected_weights), device=device)
    with quiet_peft():
        backbone.model = PeftModel.from_pretrained(backbone.model, str(folder)).eval()
    if record.get("logit_scale") is not None:
        backbone.model.get_base_model().logit_scale.data.fill_(float(np.log(record["logit_scale"])))
    # keyed by the weights' bytes: a retrained adapter never reuses stale caches
    backbone.cache_id = f"{backbone.cache_id}+lora:{hashlib.sha256(weights).hexdigest()[:16]}"
    backbone.name = run_name("lora", folder)
    return Classifier(backbone, record, taxonomy)
