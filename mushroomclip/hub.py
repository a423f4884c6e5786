"""Publishing a run: the model card (from metrics.json and the resolved config) and the Hub upload.

    python -m mushroomclip.hub push runs/lora-b32 --repo-id USER/mushroomclip-lora-b32 [--private]

The token comes from the environment (HF_TOKEN) or ``huggingface-cli login`` only, and is never written
to any file or log.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

UPLOAD = ("adapter_config.json", "adapter_model.safetensors", "classes.json", "taxonomy.csv", "config.yaml",
          "metrics.json", "README.md", "loss_curve.png", "confusion.png")  # fmt: skip
DATASET = "Kaggle: Mushroom species recognition (169 species)"


def _pct(m: dict | None, key: str) -> str:
    return "n/a" if not m or m.get(key) is None else f"{100 * m[key]:.1f}"


def model_card(run_dir: str | Path):
    """A ``huggingface_hub.ModelCard`` with a model-index of the test metrics and the zero-shot baseline row."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    run_dir = Path(run_dir)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    base = config["model"]["base"]
    name = run_dir.name
    test = metrics.get("test") or metrics["validation_best"]
    split = "test" if metrics.get("test") else "validation"
    results = [
        EvalResult(task_type="zero-shot-image-classification", dataset_type="mushroom-species-recognition", dataset_name=DATASET,
                   dataset_split=split, metric_type=key, metric_name=label, metric_value=round(test[key], 4))
        for key, label in (("oa", "OA"), ("top5", "top-5 accuracy"), ("mf1", "macro F1"), ("miou", "mIoU"))
        if test.get(key) is not None
    ]  # fmt: skip
    data = ModelCardData(
        base_model=base, library_name="peft", model_name=name, license="apache-2.0", eval_results=results,
        tags=["clip", "lora", "peft", "mushrooms", "fungi", "biology", "zero-shot-image-classification", "mushroomclip"],
        datasets=["mushroom-species-recognition"], pipeline_tag="zero-shot-image-classification",
    )  # fmt: skip
    baseline = metrics.get("test_untrained") if split == "test" else metrics.get("validation_untrained")
    lora, training = config["lora"], config["training"]
    text = f"""---
{data.to_yaml()}
---

# {name}

LoRA adapter for [{base}](https://huggingface.co/{base}) fine-tuned by [MushroomCLIP](https://github.com/) for
fine-grained mushroom species recognition (169 species). Classes are scored zero-shot style: image
embeddings against the text embeddings of `{config["data"]["text_type"]}` class prompts.

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

```python
from transformers import CLIPModel
from peft import PeftModel

model = PeftModel.from_pretrained(CLIPModel.from_pretrained("{base}"), "REPO_OR_FOLDER")

# or, with the class list and prompts restored:
from mushroomclip.lora import load_classifier
classifier = load_classifier("REPO_OR_FOLDER")
```

```bash
python predict.py photo.jpg --adapter REPO_OR_FOLDER --top-k 5
```
"""
    return ModelCard(text)


def push_run(run_dir: str | Path, repo_id: str, private: bool = False, api=None) -> str:
    """Create ``repo_id`` if needed and upload the adapter, card and class list; returns the repo URL."""
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
    url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    api.upload_folder(folder_path=str(run_dir), repo_id=repo_id, repo_type="model",
                      allow_patterns=[f for f in UPLOAD if (run_dir / f).is_file()],
                      commit_message=f"MushroomCLIP adapter {run_dir.name}")  # fmt: skip
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
    except (FileNotFoundError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
