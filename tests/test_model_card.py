"""The model card: rendered from mushroomclip/resources/model_card_template.md with the run's own figures."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from huggingface_hub import ModelCard

from mushroomclip.config import load_train_config
from mushroomclip.hub import CARD_TEMPLATE, model_card

ROOT = Path(__file__).resolve().parents[1]


def test_the_card_template_renders_every_section_with_the_runs_figures(tmp_path):
    run = tmp_path / "lora-x"
    run.mkdir()
    config = load_train_config(ROOT / "configs/tiny.yaml", ["model.base=openai/clip-vit-base-patch32"]).to_dict()
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    test = {"oa": 0.5, "top5": 0.9, "mf1": 0.45, "miou": 0.321, "dangerous_as_edible": 0.125}
    untrained = {key: value / 2 for key, value in test.items()}
    (run / "metrics.json").write_text(json.dumps({"test": test, "test_untrained": untrained, "global_step": 7}))

    card = model_card(run)
    assert "{{" not in card.text and "{%" not in card.text
    template_headings = [line for line in CARD_TEMPLATE.read_text().splitlines() if line.startswith("#")]
    headings = [line for line in card.text.splitlines() if line.startswith("#")]
    assert len(headings) == len(template_headings) == 4  # every section, each once
    assert headings == ["# lora-x", "## Results (test split)", "## Training", "## How to use"]
    assert "| openai/clip-vit-base-patch32 zero-shot (before LoRA) | 25.0 | 45.0 | 22.5 | 16.1 |" in card.text
    assert "| **lora-x** | 50.0 | 90.0 | 45.0 | **32.1** |" in card.text
    assert "predicted as an edible one: 12.5%." in card.text and "7 steps" in card.text
    assert 'CLIPModel.from_pretrained("openai/clip-vit-base-patch32"), "REPO_OR_FOLDER")' in card.text
    reloaded = ModelCard(str(card)).data  # the YAML header parses back
    assert reloaded.base_model == "openai/clip-vit-base-patch32" and reloaded.license == "mit"
    assert {r.metric_type: r.metric_value for r in reloaded.eval_results}["miou"] == 0.321
