"""Publishing a run: the model card (from metrics.json and the resolved config) and the Hub upload.

    mushroomclip push runs/lora-b32 --repo-id USER/mushroomclip-lora-b32 [--private]

The token comes from the environment (HF_TOKEN) or ``hf auth login`` only, and is never written
to any file or log.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import json
import re
import shutil
import sys
import tempfile
from pathlib import Path

import huggingface_hub
import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData

from mushroomclip import cli
from mushroomclip.config import loss_settings
from mushroomclip.models.backbones import REGISTRY, known_license
from mushroomclip.models.classifier import run_model_files
from mushroomclip.models.convert import PREFIX
from mushroomclip.taxonomy import BUNDLED
from mushroomclip.training.runs import OUTPUTS

# Every file a run writes at the top of its folder is published, with its two model files.
UPLOAD = OUTPUTS


REPO = "REPO_OR_FOLDER"  # the card's loading snippets name the adapter so; a push puts the repo id there
CARD_TEMPLATE = Path(__file__).parent / "resources" / "model_card_template.md"  # Jinja, for ModelCard.from_template
SUPERVISED_CARD_TEMPLATE = CARD_TEMPLATE.with_name("supervised_card_template.md")
CARD_SCORES = ("oa", "top5", "mf1", "miou", "dangerous_as_edible")  # the card's figures, as percentages
CARD_TAGS = ["mushrooms", "fungi", "biology", "mushroomclip"]


class PushError(RuntimeError):
    """The upload failed (network, login, permissions) or would publish what only this machine has; the run
    folder is unchanged."""


def base_label(base: str) -> str:
    """A recorded base as the card's results table names it."""
    return f"{base.removeprefix(PREFIX).removeprefix('hf-hub:')} (converted)" if base.startswith(PREFIX) else base


def _pct(m: dict | None, key: str) -> str:
    return "n/a" if not m or m.get(key) is None else f"{100 * m[key]:.1f}"


def card_base(model: dict, record: dict) -> str:
    """The base a card names: config.yaml's ``model.base``, or, for a local folder, the portable name that
    classes.json recorded for it (its Hub id or conversion recipe)."""
    local = model.get("base_hub_id") or record.get("base_conversion") or record.get("base_model_is_folder")
    return record.get("base_model", model["base"]) if local else model["base"]


def describe_base(base: str, random_weights: bool) -> tuple[str, str | None, bool]:
    """How a card names a run's recorded base model, its Hub id where it has one (the only base worth a link
    and the card's ``base_model``), and whether ``CLIPModel.from_pretrained`` loads that id."""
    spec = REGISTRY.get(base)
    if spec is not None and spec.tiny:
        return (
            (
                f"`{base}`, a randomly initialised test model (not a pretrained model); the figures below are a "
                "pipeline check, not a measure of species recognition"
            ),
            None,
            False,
        )
    if base.startswith(PREFIX):
        source = base.removeprefix(PREFIX)
        repo = source.removeprefix("hf-hub:") if source.startswith("hf-hub:") else None
        named = f"[{repo}](https://huggingface.co/{repo})" if repo else f"open_clip `{source}`"
        return (
            (
                f"{named}, converted exactly to a transformers `CLIPModel` by `mushroomclip.models.convert`; "
                "`load_classifier` repeats that conversion on first use (cached)"
            ),
            repo,
            False,
        )
    hub_id = spec.source if spec is not None else base
    if "/" not in hub_id or Path(base).exists():
        return f"the local model `{base}`", None, False
    if random_weights:
        return (
            (
                f"the architecture of [{hub_id}](https://huggingface.co/{hub_id}) with random weights "
                "(model.random_weights: a throughput check, not a trained model)"
            ),
            None,
            False,
        )
    return f"[{hub_id}](https://huggingface.co/{hub_id})", hub_id, True


def describe_data_used(data: dict | None) -> str:
    """One sentence on the data a run used, from its data.json."""
    if not data:
        return "Training data: not recorded for this run."
    images = data.get("images") or {}
    counts = ", ".join(f"{images[s]} {s}" for s in ("train", "validation", "test") if s in images)
    split = f"{data['split']} split" if data.get("split") else "split not recorded"
    report = data.get("report")
    skipped = sum((report or {}).get("skipped", {}).values()) if report else None
    prepared = (
        f"; preparation skipped {skipped} unusable files (`prepare_report.json` of the data folder)"
        if skipped is not None
        else "; no preparation report was found"
    )
    imbalance = data.get("imbalance")
    tail = (
        f" The training split was subsampled to an artificial long tail ({imbalance['profile']} profile, ratio "
        f"{imbalance['ratio']:g}, seed {imbalance['seed']}: {images.get('train')} of {imbalance['images_before']} "
        "images kept; per species in `class_counts.json`)."
        if imbalance
        else ""
    )
    return (
        f"Training data: {data['num_species']} species with training images ({counts} images; {split}) "
        f"from `{Path(data.get('source') or data['path']).name}`{prepared}. Details: `data.json`.{tail}"
    )


def model_card(run_dir: str | Path) -> ModelCard:
    """A ``huggingface_hub.ModelCard`` describing the run actually made: its base model, its data (data.json),
    a model-index of the test metrics and the zero-shot baseline row. Links only to real Hub models."""
    run_dir = Path(run_dir)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    data_file = run_dir / "data.json"
    data = json.loads(data_file.read_text()) if data_file.is_file() else None
    classes_file = run_dir / "classes.json"
    record = json.loads(classes_file.read_text()) if classes_file.is_file() else {}
    supervised = record.get("model_type") == "supervised"
    if supervised:  # a classifier's base license is not one we vouch for: omitted
        base, license_, loadable = record["base_model"], None, False
        base_text, hub_id = describe_supervised_base(record)
    else:
        base = card_base(config["model"], record)
        base_text, hub_id, loadable = describe_base(base, config["model"].get("random_weights", False))
        # a converted base is under its source's license; None (omitted) for a base we cannot vouch for
        license_ = known_license((record.get("base_conversion") or {}).get("source") or base)
    name = run_dir.name
    test = metrics.get("test") or metrics["validation_best"]
    split = "test" if metrics.get("test") else "validation"
    species = f"{data['num_species']} species" if data else "mushroom species"
    head = len(record["species"]) if record else None
    head_note = (
        f" It ranks all {head} species of its taxonomy, but saw images of these {data['num_species']} only."
        if data and head and head != data["num_species"]
        else ""
    )
    dataset = (
        f"MushroomCLIP prepared data ({species}, {data.get('split') or 'unknown'} split)"
        if data
        else "MushroomCLIP prepared data"
    )
    task = "image-classification" if supervised else "zero-shot-image-classification"
    results = [
        EvalResult(
            task_type=task,
            dataset_type="imagefolder",
            dataset_name=dataset,
            dataset_split=split,
            metric_type=key,
            metric_name=label,
            metric_value=round(test[key], 4),
        )
        for key, label in (("oa", "OA"), ("top5", "top-5 accuracy"), ("mf1", "macro F1"), ("miou", "mIoU"))
        if test.get(key) is not None
    ]
    lora = config["model"].get("finetune", "lora") == "lora"
    tags = ["lora", "peft"] * lora + (["image-classification"] if supervised else ["clip"]) + CARD_TAGS + [task]
    card_data = ModelCardData(
        base_model=hub_id,
        library_name="peft" if lora else "transformers",
        model_name=name,
        license=license_,
        eval_results=results,
        tags=list(dict.fromkeys(tags)),
        pipeline_tag=task,
    )
    baseline = metrics.get("test_untrained") if split == "test" else metrics.get("validation_untrained")
    training = config["training"]
    common = dict(
        model_name=name,
        species=species,
        head_note=head_note,
        base_text=base_text,
        data_used=describe_data_used(data),
        split=split,
        before={key: _pct(baseline, key) for key in CARD_SCORES},
        after={key: _pct(test, key) for key in CARD_SCORES},
        loss=config["loss"]["name"],
        loss_settings="".join(f", {part}" for part in loss_settings(config["loss"])),
        lr=training["learning_rate"],
        batch_size=training["per_device_train_batch_size"],
        steps=metrics.get("global_step"),
        seed=training["seed"],
        repo=REPO,
        result_paragraphs=describe_mistakes(test, baseline) + describe_open_set(metrics) + describe_selective(metrics),
    )
    if supervised:
        return ModelCard.from_template(
            card_data,
            template_path=str(SUPERVISED_CARD_TEMPLATE),
            **common,
            **supervised_card_fields(config["lora"], record),
        )
    return ModelCard.from_template(
        card_data,
        template_path=str(CARD_TEMPLATE),
        text_type=config["data"]["text_type"],
        base_label=base_label(base),
        lora=config["lora"],
        loadable=loadable,
        hub_id=hub_id,
        **common,
    )


def describe_open_set(metrics: dict) -> str:
    """The card's open-set paragraph (starting with a blank line), or "" for a run with neither a hold-out nor an
    open-set threshold: what was held out and measured, and the threshold predict.py uses."""
    open_set, threshold = metrics.get("open_set"), (metrics.get("thresholds") or {}).get("unknown")
    lines = []
    if open_set:
        rows = open_set["metrics"]

        def fmt(score: str, key: str) -> str:
            low, high = rows[score]["ci"][key] if "ci" in rows[score] else (None, None)
            ci = f" (95% CI {100 * low:.1f}–{100 * high:.1f})" if low is not None else ""
            return f"{100 * rows[score][key]:.1f}{ci}"

        held = open_set["held_out"]
        others = "; ".join(f"{s}: AUROC {fmt(s, 'auroc')}" for s in rows if s != "msp")
        lines.append(
            f"**Open set.** {len(held)} species were held out of training and validation "
            f"({', '.join(held)}). Telling their {open_set['unknown_images']} {open_set['split']} images from the "
            f"{open_set['known_images']} of the known species by the top-1 probability (msp): AUROC {fmt('msp', 'auroc')}, "
            f"false positive rate at {100 * open_set['tpr']:g}% true positives {fmt('msp', 'fpr95')}, OSCR "
            f"{fmt('msp', 'oscr')}; {others}. Figures in `metrics.json` (`open_set`) and `open_set_roc.png`."
        )
    if threshold:
        measured = (
            ""
            if open_set
            else " How well this flags species outside the known ones was not measured (the run held out none)."
        )
        lines.append(
            f"Below a top-1 probability of {100 * threshold['threshold']:.1f}% (chosen on {threshold['chosen_on']} "
            f'to keep {100 * threshold["tpr"]:g}% of known images), `predict.py` and the app answer "possibly not '
            f'one of the known species".{measured}'
        )
    return "".join(f"\n\n{line}" for line in lines)


def describe_mistakes(test: dict | None, baseline: dict | None) -> str:
    """The card's line on how bad the mistakes are (Bertinetto et al. 2020), before and after training, or ""."""
    if (
        not test
        or test.get("mistake_severity") is None
        or "top5" not in (test.get("hierarchical_distance_top_k") or {})
    ):
        return ""

    def figures(m: dict) -> str:
        return (
            f"mistake severity {m['mistake_severity']:.2f}, average distance of the top-5 "
            f"{m['hierarchical_distance_top_k']['top5']:.2f}"
        )

    before = ""
    if baseline and baseline.get("mistake_severity") is not None and baseline.get("hierarchical_distance_top_k"):
        before = f" (before training: {figures(baseline)})"
    return (
        f"\n\nHow bad the mistakes are, in ranks climbed to the common ancestor with the truth (1 = same genus … "
        f"7 = another kingdom; Bertinetto et al. 2020): {figures(test)}{before}."
    )


def describe_selective(metrics: dict) -> str:
    """The card's selective-prediction paragraph (starting with a blank line), or "" for a run without
    ``run.max_danger``: the species threshold chosen on validation, its coverage, and what validation shows."""
    t = metrics.get("thresholds") or {}
    if "max_danger" not in t:
        return ""
    floor = (
        f" (the target alone allowed {100 * t['allowed_by_target']:.1f}%; the default {100 * t['species']:g}% is kept)"
        if t.get("allowed_by_target") is not None
        else ""
    )
    shown = (
        f"The validation split shows it: the rate's 95% upper bound is {100 * t['dangerous_as_edible_upper95']:.2f}%."
        if t.get("target_shown")
        else f"The validation split does NOT show it: with {t['dangerous_images']} deadly or poisonous images the "
        f"rate's 95% upper bound is {100 * t['dangerous_as_edible_upper95']:.1f}%."
    )
    return (
        f"\n\n**Selective prediction.** Below a top-1 probability of {100 * t['species']:.1f}%{floor}, chosen on "
        f"{t['chosen_on']} for a dangerous→edible rate of at most {100 * t['max_danger']:g}%, `predict.py` and the app "
        f'name no species ("not sure — do not eat", or the most probable genus or family when its summed probability reaches its threshold). On validation '
        f"it answers {100 * t['coverage']:.1f}% of {t['images']} images with a dangerous→edible rate of "
        f"{100 * t['dangerous_as_edible']:.2f}%. {shown} Curve: `risk_coverage.png`."
    )


def describe_supervised_base(record: dict) -> tuple[str, str | None]:
    """How a card names a supervised run's base, saying whether it started from pretrained weights or from
    scratch; and the Hub id of the pretrained weights it started from (the card's ``base_model``), if any."""
    from mushroomclip.models.supervised import TINY_RESNET

    base = record["base_model"]
    if base == TINY_RESNET:
        return (
            f"`{base}`, a randomly initialised test model (not a pretrained model); the figures below are a "
            "pipeline check, not a measure of species recognition"
        ), None
    hub = "/" in base and not Path(base).exists()
    named = f"[{base}](https://huggingface.co/{base})" if hub else f"the local model `{base}`"
    if record["pretrained"]:
        return f"{named}, starting from its pretrained weights ({record['weights']})", base if hub else None
    return f"the architecture of {named}, trained from scratch (random initial weights, not its pretrained ones)", None


def supervised_card_fields(lora: dict, record: dict) -> dict:
    """The supervised card's own fields: how it was fine-tuned, its head and its preprocessing."""
    if record["finetune"] == "lora":
        modules = lora["target_modules"]
        where = "every linear and convolution layer of the backbone" if modules == ["auto"] else ", ".join(modules)
        finetune = (
            f"LoRA r={lora['r']}, alpha={lora['alpha']}, dropout={lora['dropout']} on {where}; the new head trains "
            "in full; every other weight, and BatchNorm's statistics, stays as it started"
        )
    else:
        finetune = "Full fine-tune: every weight trains"
    pre = record["preprocess"]
    resize = pre["resize_size"]
    return {
        "finetune_text": finetune,
        "full": record["finetune"] == "full",
        "num_labels": record["num_labels"],
        "interpolation": pre["interpolation"],
        "resize": f"{resize} px (short side)" if isinstance(resize, int) else f"{resize[0]}x{resize[1]} px",
        "size": f"{pre['size'][0]}x{pre['size'][1]} px",
    }


def upload_errors() -> tuple[type[BaseException], ...]:
    """What a failed upload raises: OSError (huggingface_hub's HTTP and offline errors, requests' errors) and
    the HTTP client's own errors (httpx, or the httpx2 that some huggingface_hub versions use)."""
    errors: list[type[BaseException]] = [OSError]
    for module in ("httpx", "httpx2"):
        with contextlib.suppress(ImportError):
            errors.append(importlib.import_module(module).HTTPError)
    return tuple(errors)


def retry_command(run_dir: str | Path, repo_id: str, private: bool) -> str:
    return f"mushroomclip push {run_dir} --repo-id {repo_id}" + (" --private" if private else "")


def shareable_config(config: dict, base: str, run_name: str) -> dict:
    """A run's resolved config as published: the portable base, and folders by name, not by this machine's path."""
    config = copy.deepcopy(config)
    config["model"]["base"] = base
    config["training"]["output_dir"] = run_name
    for key in ("path", "taxonomy"):
        if config["data"].get(key):
            config["data"][key] = Path(config["data"][key]).name
    return config


def _shareable_command(command: str) -> str:
    """The command line with absolute paths cut to their last part."""
    return re.sub(r"(?<![^\s=])/(?:[^\s/]*/)*", "", command)


def stage_upload(run_dir: Path, repo_id: str, staging: Path) -> list[str]:
    """Copies of the files a push uploads in ``staging``, with no path of this machine in them (classes.json,
    config.yaml, data.json and metrics.json rewritten, the card's snippets naming ``repo_id``); their names."""
    record = json.loads((run_dir / "classes.json").read_text())
    base = record["base_model"]
    if record.get("base_model_is_folder"):
        raise PushError(
            f"{run_dir} was trained on the local model folder {base}, which no other machine has; "
            "retrain on a Hub model, or convert the base with python -m mushroomclip.models.convert (add "
            "--push-to-hub USER/NAME and set model.base_hub_id to name it by that repo)"
        )
    names = [f for f in (*run_model_files(run_dir), *UPLOAD) if (run_dir / f).is_file()]
    for name in names:
        shutil.copy2(run_dir / name, staging / name)
    source = record.get("taxonomy_source")
    if source and source != BUNDLED:  # a table file of this machine
        (staging / "classes.json").write_text(json.dumps(record | {"taxonomy_source": Path(source).name}, indent=2))
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    (staging / "config.yaml").write_text(yaml.safe_dump(shareable_config(config, base, run_dir.name), sort_keys=False))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    if "config" in metrics:
        metrics["config"] = shareable_config(metrics["config"], base, run_dir.name)
    trained_on = config["model"]["base"]
    local_base = trained_on if trained_on != base and Path(trained_on).is_dir() else None
    command = metrics.get("command") or ""
    metrics["command"] = _shareable_command(command.replace(local_base, base) if local_base else command)
    (staging / "metrics.json").write_text(json.dumps(metrics, indent=2))
    if "data.json" in names:
        data = json.loads((run_dir / "data.json").read_text())
        data |= {k: Path(data[k]).name for k in ("path", "source") if data.get(k)}
        (staging / "data.json").write_text(json.dumps(data, indent=2))
    card = staging / "README.md"
    card.write_text(card.read_text().replace(REPO, repo_id))
    paths = (run_dir.resolve(), Path(trained_on).resolve(), Path(config["data"]["path"]).resolve(), Path.cwd())
    local = {str(p) for p in paths if len(p.parts) > 2}
    local |= {local_base} if local_base else set()
    for name in names:
        if name.endswith((".json", ".yaml", ".md", ".csv")):
            text = (staging / name).read_text()
            if found := next((p for p in local if p in text), None):
                raise PushError(f"{run_dir / name} holds the local path {found}, which must not be published")
    return names


def push_run(run_dir: str | Path, repo_id: str, private: bool = False, api=None) -> str:
    """Create ``repo_id`` if needed and upload the adapter, card and class list; returns the repo URL.

    A failed upload is one :class:`PushError` naming the cause and the command that retries it.
    """
    run_dir = Path(run_dir)
    missing = [
        f
        for f in (*run_model_files(run_dir), "classes.json", "README.md", "config.yaml", "metrics.json")
        if not (run_dir / f).is_file()
    ]
    if missing:
        raise FileNotFoundError(f"{run_dir} is not a finished run (missing {', '.join(missing)}); train it first")
    api = api or huggingface_hub.HfApi()  # token: HF_TOKEN or the hf auth login cache, never an argument we store
    with tempfile.TemporaryDirectory() as staging:
        names = stage_upload(run_dir, repo_id, Path(staging))
        try:
            url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
            api.upload_folder(
                folder_path=staging,
                repo_id=repo_id,
                repo_type="model",
                allow_patterns=names,
                commit_message=f"MushroomCLIP adapter {run_dir.name}",
            )
        except upload_errors() as err:
            status = getattr(getattr(err, "response", None), "status_code", None)
            hint = (
                "check the login (HF_TOKEN or hf auth login) and your write access to the repo"
                if status in (401, 403)
                else "check the network"
            )
            cause = (str(err).strip().splitlines() or [""])[0][:200]
            raise PushError(
                f"could not push {run_dir} to {repo_id} ({type(err).__name__}: {cause}); {hint}. The run "
                f"folder is kept as it is; retry with: {retry_command(run_dir, repo_id, private)}"
            ) from None
    return str(url)


if __name__ == "__main__":  # python -m mushroomclip.hub push RUN ...: the `mushroomclip push` command
    sys.exit(cli.main())
