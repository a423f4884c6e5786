"""Publishing a run: the model card (from metrics.json and the resolved config) and the Hub upload.

    python -m mushroomclip.hub push runs/lora-b32 --repo-id USER/mushroomclip-lora-b32 [--private]

The token comes from the environment (HF_TOKEN) or ``huggingface-cli login`` only, and is never written
to any file or log.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

import yaml

UPLOAD = ("adapter_config.json", "adapter_model.safetensors", "classes.json", "taxonomy.csv", "config.yaml",
          "data.json", "metrics.json", "README.md", "loss_curve.png", "confusion.png")  # fmt: skip


class PushError(RuntimeError):
    """The upload failed (network, login, permissions); the run folder is unchanged."""


def _pct(m: dict | None, key: str) -> str:
    return "n/a" if not m or m.get(key) is None else f"{100 * m[key]:.1f}"


def describe_base(base: str, random_weights: bool) -> tuple[str, str | None]:
    """How a card names ``model.base``, and its Hub id where it has one (the only base worth a link)."""
    from mushroomclip.models import REGISTRY

    spec = REGISTRY.get(base)
    if spec is not None and spec.tiny:
        return (f"`{base}`, a randomly initialised test model (not a pretrained model); the figures below are a "
                "pipeline check, not a measure of species recognition"), None  # fmt: skip
    hub_id = spec.source if spec is not None else base
    if "/" not in hub_id or Path(base).exists():
        return f"the local model `{base}`", None
    if random_weights:
        return (f"the architecture of [{hub_id}](https://huggingface.co/{hub_id}) with random weights "
                "(model.random_weights: a throughput check, not a trained model)"), None  # fmt: skip
    return f"[{hub_id}](https://huggingface.co/{hub_id})", hub_id


def describe_data_used(data: dict | None) -> str:
    """One sentence on the data a run used, from its data.json."""
    if not data:
        return "Training data: not recorded for this run."
    images = data.get("images") or {}
    counts = ", ".join(f"{images[s]} {s}" for s in ("train", "validation", "test") if s in images)
    split = f"{data['split']} split" if data.get("split") else "split not recorded"
    report = data.get("report")
    skipped = sum((report or {}).get("skipped", {}).values()) if report else None
    prepared = (f"; preparation skipped {skipped} unusable files (`prepare_report.json` of the data folder)"
                if skipped is not None else "; no preparation report was found")  # fmt: skip
    return (f"Training data: {data['num_species']} species with training images ({counts} images; {split}) "
            f"from `{data.get('source') or data['path']}`{prepared}. Details: `data.json`.")  # fmt: skip


def model_card(run_dir: str | Path):
    """A ``huggingface_hub.ModelCard`` describing the run actually made: its base model, its data (data.json),
    a model-index of the test metrics and the zero-shot baseline row. Links only to real Hub models."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    run_dir = Path(run_dir)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    data_file = run_dir / "data.json"
    data = json.loads(data_file.read_text()) if data_file.is_file() else None
    base = config["model"]["base"]
    base_text, hub_id = describe_base(base, config["model"].get("random_weights", False))
    name = run_dir.name
    test = metrics.get("test") or metrics["validation_best"]
    split = "test" if metrics.get("test") else "validation"
    species = f"{data['num_species']} species" if data else "mushroom species"
    classes_file = run_dir / "classes.json"
    head = len(json.loads(classes_file.read_text())["species"]) if classes_file.is_file() else None
    head_note = (f" It ranks all {head} species of its taxonomy, but saw images of these {data['num_species']} only."
                 if data and head and head != data["num_species"] else "")  # fmt: skip
    dataset = (
        f"MushroomCLIP prepared data ({species}, {data.get('split') or 'unknown'} split)"
        if data
        else "MushroomCLIP prepared data"
    )
    results = [
        EvalResult(task_type="zero-shot-image-classification", dataset_type="imagefolder", dataset_name=dataset,
                   dataset_split=split, metric_type=key, metric_name=label, metric_value=round(test[key], 4))
        for key, label in (("oa", "OA"), ("top5", "top-5 accuracy"), ("mf1", "macro F1"), ("miou", "mIoU"))
        if test.get(key) is not None
    ]  # fmt: skip
    card_data = ModelCardData(
        base_model=hub_id, library_name="peft", model_name=name, license="apache-2.0", eval_results=results,
        tags=["clip", "lora", "peft", "mushrooms", "fungi", "biology", "zero-shot-image-classification", "mushroomclip"],
        pipeline_tag="zero-shot-image-classification",
    )  # fmt: skip
    baseline = metrics.get("test_untrained") if split == "test" else metrics.get("validation_untrained")
    lora, training = config["lora"], config["training"]
    usage = (
        f"""```python
from transformers import CLIPModel
from peft import PeftModel

model = PeftModel.from_pretrained(CLIPModel.from_pretrained("{hub_id}"), "REPO_OR_FOLDER")
```

"""
        if hub_id
        else ""
    )
    text = f"""---
{card_data.to_yaml()}
---

# {name}

LoRA adapter fine-tuned with MushroomCLIP for fine-grained mushroom species recognition ({species}).
Classes are scored zero-shot style: image embeddings against the text embeddings of
`{config["data"]["text_type"]}` class prompts.{head_note}

Base model: {base_text}.

{describe_data_used(data)}

## Results ({split} split)

| model | OA | top-5 | mF1 | mIoU |
|---|---|---|---|---|
| {base} zero-shot (before LoRA) | {_pct(baseline, "oa")} | {_pct(baseline, "top5")} | {_pct(baseline, "mf1")} | {_pct(baseline, "miou")} |
| **{name}** | {_pct(test, "oa")} | {_pct(test, "top5")} | {_pct(test, "mf1")} | **{_pct(test, "miou")}** |

Dangerous species (deadly or poisonous) predicted as an edible one: {_pct(test, "dangerous_as_edible")}%.
**Never eat a mushroom on the word of a model.**

## Training

LoRA r={lora["r"]}, alpha={lora["alpha"]}, dropout={lora["dropout"]} on {", ".join(lora["target_modules"])} of the
{" and ".join(lora["towers"])} tower(s); loss `{config["loss"]["name"]}`; lr {training["lr"]}, batch {training["batch_size"]},
{metrics.get("global_step")} steps, seed {training["seed"]}. Full configuration: `config.yaml`; provenance: `metrics.json`.

## How to use

{usage}With MushroomCLIP installed, with the class list and prompts restored:

```python
from mushroomclip.lora import load_classifier
classifier = load_classifier("REPO_OR_FOLDER")
```

```bash
python predict.py photo.jpg --adapter REPO_OR_FOLDER --top-k 5
```
"""
    return ModelCard(text)


def _upload_errors() -> tuple[type[BaseException], ...]:
    """What a failed upload raises: OSError (huggingface_hub's HTTP and offline errors, requests' errors) and
    the HTTP client's own errors (httpx, or the httpx2 that some huggingface_hub versions use)."""
    import importlib

    errors: list[type[BaseException]] = [OSError]
    for module in ("httpx", "httpx2"):
        with contextlib.suppress(ImportError):
            errors.append(importlib.import_module(module).HTTPError)
    return tuple(errors)


def retry_command(run_dir: str | Path, repo_id: str, private: bool) -> str:
    return f"python -m mushroomclip.hub push {run_dir} --repo-id {repo_id}" + (" --private" if private else "")


def push_run(run_dir: str | Path, repo_id: str, private: bool = False, api=None) -> str:
    """Create ``repo_id`` if needed and upload the adapter, card and class list; returns the repo URL.

    A failed upload is one :class:`PushError` naming the cause and the command that retries it.
    """
    from huggingface_hub import HfApi

    run_dir = Path(run_dir)
    missing = [
        f
        for f in ("adapter_config.json", "adapter_model.safetensors", "classes.json", "README.md")
        if not (run_dir / f).is_file()
    ]
    if missing:
        raise FileNotFoundError(f"{run_dir} is not a finished run (missing {', '.join(missing)}); train it first")
    api = api or HfApi()  # token: HF_TOKEN or the huggingface-cli login cache, never an argument we store
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(folder_path=str(run_dir), repo_id=repo_id, repo_type="model",
                          allow_patterns=[f for f in UPLOAD if (run_dir / f).is_file()],
                          commit_message=f"MushroomCLIP adapter {run_dir.name}")  # fmt: skip
    except _upload_errors() as err:
        status = getattr(getattr(err, "response", None), "status_code", None)
        hint = ("check the login (HF_TOKEN or huggingface-cli login) and your write access to the repo"
                if status in (401, 403) else "check the network")  # fmt: skip
        cause = (str(err).strip().splitlines() or [""])[0][:200]
        raise PushError(f"could not push {run_dir} to {repo_id} ({type(err).__name__}: {cause}); {hint}. The run "
                        f"folder is kept as it is; retry with: {retry_command(run_dir, repo_id, private)}") from None  # fmt: skip
    return str(url)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Publish a MushroomCLIP run to the Hugging Face Hub.")
    sub = p.add_subparsers(dest="command", required=True)
    push = sub.add_parser("push", help="upload adapter, model card and classes.json")
    push.add_argument("run_dir", help="runs/<name> written by train.py")
    push.add_argument("--repo-id", required=True, help="USER/NAME on the Hub")
    push.add_argument("--private", action="store_true", help="create the repo as private")
    args = p.parse_args(argv)
    try:
        print(f"pushed: {push_run(args.run_dir, args.repo_id, private=args.private)}")
    except (FileNotFoundError, PushError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
