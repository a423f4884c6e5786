"""Supervised image classifiers end to end: tiny-resnet trained on the synthetic data through the LoRA runs'
pipeline (run folder, card, resume), then predict.py and the benchmark on the run."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from mushroomclip.config import ConfigError, load_train_config
from mushroomclip.models.classifier import load_classifier
from mushroomclip.models.supervised import SupervisedClassifier
from mushroomclip.training.trainer import run_training

ROOT = Path(__file__).resolve().parents[1]
STEPS = {
    "training.max_steps": 10,
    "training.eval_steps": 5,
    "training.logging_steps": 5,
    "training.save_total_limit": 10,
}


def overrides(data: Path, out: Path, **extra) -> list[str]:
    values = {"data.path": data, "training.output_dir": out, "data.num_workers": 0} | STEPS | extra
    return [f"{k}={v}" for k, v in values.items()]


@pytest.fixture(scope="module")
def trained(prepared, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "tiny-supervised"
    cfg = load_train_config(ROOT / "configs/tiny_supervised.yaml", overrides(prepared[0], out))
    return cfg, out, run_training(cfg)


def test_supervised_run_folder_is_complete_and_says_what_it_was(trained):
    cfg, out, result = trained
    for name in (
        "config.json",
        "model.safetensors",
        "classes.json",
        "taxonomy.csv",
        "config.yaml",
        "data.json",
        "metrics.json",
        "README.md",
        "loss_curve.png",
        "confusion.png",
    ):
        assert (out / name).is_file(), name
    record = json.loads((out / "classes.json").read_text())
    assert record["model_type"] == "supervised" and record["base_model"] == "tiny-resnet"
    assert record["pretrained"] is False and record["finetune"] == "full" and len(record["trained_species"]) == 6
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["global_step"] == 10 and metrics["test"]["miou"] == pytest.approx(result["test"]["miou"])
    assert metrics["validation_best"]["oa"] > metrics["validation_untrained"]["oa"]
    card = (out / "README.md").read_text()
    assert "randomly initialised test model" in card and "Full fine-tune" in card and "cross_entropy" in card
    assert "pipeline_tag: image-classification" in card and "zero-shot" not in card
    assert load_train_config(out / "config.yaml").to_dict() == cfg.to_dict()  # the resolved config round-trips


@pytest.mark.parametrize("loss", ["hierarchical_soft", "hierarchical_xent"])
def test_a_taxonomy_and_safety_aware_supervised_run_writes_a_complete_run_folder(prepared, tmp_path, loss):
    import math

    out = tmp_path / loss
    extra = {
        "training.max_steps": 4,
        "training.eval_steps": 4,
        "training.logging_steps": 2,
        "run.test_after": False,
        "loss.name": loss,
        "loss.danger_weight": 1.0,
    }
    result = run_training(
        load_train_config(ROOT / "configs/tiny_supervised.yaml", overrides(prepared[0], out, **extra))
    )
    assert result["global_step"] == 4
    losses = [value for _, value in json.loads((out / "metrics.json").read_text())["loss_history"]]
    assert losses and all(math.isfinite(value) for value in losses)
    for name in ("config.json", "model.safetensors", "classes.json", "config.yaml", "metrics.json", "README.md"):
        assert (out / name).is_file(), name
    saved = load_train_config(out / "config.yaml").loss
    assert (saved.name, saved.danger_weight) == (loss, 1.0) and f"loss `{loss}`" in (out / "README.md").read_text()


def test_saved_run_predicts_what_the_trained_model_computes(trained, prepared):
    _, out, result = trained
    classifier = load_classifier(str(out))  # the CLIP runs' entry point dispatches on classes.json
    assert isinstance(classifier, SupervisedClassifier)
    images = sorted(Path(prepared[0], "test").glob("*/*.jpg"))[:3]
    pixels = torch.stack([classifier.pixels(p) for p in images])
    model = result["model"].eval()
    with torch.no_grad():
        expected = model(
            pixel_values=(pixels.float() / 255 - torch.tensor(classifier.preprocess.mean)[:, None, None])
            / torch.tensor(classifier.preprocess.std)[:, None, None]
        ).logits
    assert torch.allclose(classifier.logits(images), expected, atol=1e-5)


def test_predict_cli_takes_a_supervised_run(trained, prepared, capsys):
    from mushroomclip.commands.predict import main

    _, out, _ = trained
    image = sorted(Path(prepared[0], "test").glob("*/*.jpg"))[0]
    assert main([str(image), "--adapter", str(out), "--format", "json", "--top-k", "3"]) == 0
    [record] = json.loads(capsys.readouterr().out)
    probabilities = [p["probability"] for p in record["predictions"]]
    assert len(probabilities) == 3 and probabilities == sorted(probabilities, reverse=True) and sum(probabilities) <= 1


def test_resume_of_a_supervised_run_ends_exactly_like_the_uninterrupted_one(trained, prepared, tmp_path):
    from safetensors.torch import load_file

    _, reference, _ = trained
    out = tmp_path / "resumed"
    shutil.copytree(reference / "checkpoints" / "checkpoint-5", out / "checkpoints" / "checkpoint-5")
    cfg = load_train_config(ROOT / "configs/tiny_supervised.yaml", overrides(prepared[0], out, **{"run.resume": True}))
    assert run_training(cfg)["global_step"] == 10
    got, expected = (load_file(d / "model.safetensors") for d in (out, reference))
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)  # BatchNorm too
    metrics, reference_metrics = (json.loads((d / "metrics.json").read_text()) for d in (out, reference))
    assert metrics["loss_history"] == reference_metrics["loss_history"]
    assert metrics["eval_history"] == reference_metrics["eval_history"]


def test_lora_run_saves_the_adapter_and_head_and_reloads_them(prepared, tmp_path):
    out = tmp_path / "lora"
    extra = {
        "model.finetune": "lora",
        "lora.target_modules": "[auto]",
        "training.max_steps": 4,
        "training.eval_steps": 2,
        "run.test_after": False,
    }
    result = run_training(
        load_train_config(ROOT / "configs/tiny_supervised.yaml", overrides(prepared[0], out, **extra))
    )
    assert (out / "adapter_model.safetensors").is_file() and not (out / "model.safetensors").exists()
    assert "LoRA r=" in (out / "README.md").read_text()
    classifier = load_classifier(str(out))
    pixels = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    mean, std = (torch.tensor(v)[:, None, None] for v in (classifier.preprocess.mean, classifier.preprocess.std))
    with torch.no_grad():
        expected = result["model"].eval()(pixel_values=(pixels.float() / 255 - mean) / std).logits
    assert torch.allclose(classifier.logits(pixels), expected, atol=1e-5)


@pytest.mark.parametrize(
    "override, message",
    [
        ("loss.name=class_text", "loss.name must be one of"),  # CLIP's loss on a classifier
        ("model.pretrained=true", "tiny-resnet is a random test model"),
        ("model.type=resnet", "model.type must be clip or supervised"),
        ("model.finetune=lora", "lora.target_modules: its default names CLIP's"),
    ],
)
def test_supervised_config_mistakes_are_one_line_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        load_train_config(ROOT / "configs/tiny_supervised.yaml", [override])


def test_finetune_defaults_to_lora_for_clip_and_full_for_a_classifier():
    assert load_train_config(ROOT / "configs/tiny.yaml").model.finetune == "lora"
    assert load_train_config(ROOT / "configs/tiny_supervised.yaml", ["model.finetune=null"]).model.finetune == "full"


def test_clip_runs_refuse_the_supervised_only_options():
    with pytest.raises(ConfigError, match="model.type: supervised"):
        load_train_config(ROOT / "configs/tiny.yaml", ["model.finetune=full"])
    with pytest.raises(ConfigError, match="loss.name must be one of"):
        load_train_config(ROOT / "configs/tiny.yaml", ["loss.name=cross_entropy"])


def test_benchmark_table_has_the_supervised_run_and_the_quoted_course_rows(trained, prepared, tmp_path):
    from mushroomclip.commands.evaluate import main
    from mushroomclip.evaluation.benchmark import write_report

    _, out, result = trained
    results = tmp_path / "results"
    argv = [
        "--data",
        str(prepared[0]),
        "--models",
        "tiny-clip",
        "--shots",
        "",
        "--include-adapters",
        str(out.parent),
        "--output",
        str(results),
        "--num-workers",
        "0",
    ]
    assert main(argv) == 0
    rows = json.loads((results / "summary.json").read_text())["rows"]
    [row] = [r for r in rows if r["method"].startswith("supervised")]
    assert row["method"] == "supervised (from scratch, full fine-tune)"
    assert row["miou"] == pytest.approx(result["test"]["miou"])  # the same head and images as the run's own test
    table = write_report(results).read_text()
    assert "| ResNet50 (course) | supervised, from scratch: quoted, not reproduced |" in table
    assert "supervised (from scratch, full fine-tune)" in table


def test_push_uploads_a_full_fine_tune_with_its_card_and_no_local_path(trained):
    from test_portable_base import FakeApi

    from mushroomclip.hub import push_run

    _, out, _ = trained
    api = FakeApi()
    push_run(out, "someone/tiny-supervised", api=api)
    expected = {"config.json", "model.safetensors", "classes.json", "README.md", "config.yaml", "metrics.json"}
    assert expected <= set(api.files)
    assert not {"adapter_config.json", "adapter_model.safetensors"} & set(api.files)
    for name, text in api.files.items():
        assert text is None or (str(out) not in text and "REPO_OR_FOLDER" not in text), name
    card = api.files["README.md"]
    assert 'load_classifier("someone/tiny-supervised")' in card
    assert 'AutoModelForImageClassification.from_pretrained("someone/tiny-supervised")' in card


def test_the_app_lists_and_answers_with_a_supervised_run(trained, prepared):
    from mushroomclip.prediction.identify import find_runs, identify, load_model

    _, out, _ = trained
    assert str(out) in find_runs([out.parent])
    classifier, thresholds = load_model(str(out))
    photos = sorted(Path(prepared[0], "test").glob("*/*.jpg"))[:2]
    answer, problems = identify(classifier, photos, thresholds)
    assert answer is not None and not problems and answer.rows[0].species in classifier.classes


@pytest.mark.parametrize(
    "finetune, removed", [(None, {"adapter_model.safetensors"}), ("full", {"config.json", "model.safetensors"})]
)
def test_overwrite_removes_only_the_model_files_of_the_run_kind_it_finds(tmp_path, finetune, removed):
    from accelerate import PartialState

    from mushroomclip.training.runs import clear_run_outputs

    PartialState()  # its log line goes through accelerate's logger
    files = {"classes.json", "metrics.json", "config.json", "model.safetensors", "adapter_model.safetensors"}
    for name in files:
        (tmp_path / name).write_text("{}")
    (tmp_path / "classes.json").write_text(json.dumps({"finetune": finetune} if finetune else {}))
    clear_run_outputs(tmp_path)
    # a CLIP run writes no config.json or model.safetensors at the top: such files are the user's, and stay
    assert {p.name for p in tmp_path.iterdir()} == files - removed - {"classes.json", "metrics.json"}


def test_a_diverging_supervised_run_stops_in_one_line_and_writes_nothing(prepared, tmp_path, capsys):
    from test_run_outcomes import assert_one_error_line

    from mushroomclip.commands.train import main

    out = tmp_path / "run"
    args = overrides(
        prepared[0],
        out,
        **{"training.learning_rate": 1e10, "training.max_steps": 8, "training.eval_steps": 8, "run.test_after": False},
    )
    assert main(["--config", str(ROOT / "configs/tiny_supervised.yaml"), *args]) == 2
    line = assert_one_error_line(capsys.readouterr().err, "training diverged at step ")
    assert "training.learning_rate (now 1e+10)" in line and not out.exists()


def test_new_species_protocol_takes_a_supervised_run_with_its_pooled_features(prepared, tmp_path):
    """mushroomclip novel on a supervised run: SimpleShot on the pooled features before the head, as training
    started (the run's own seeded initialisation) and after it."""
    from mushroomclip.evaluation.novel import NovelArguments, evaluate_novel
    from mushroomclip.models.supervised import initial_classifier

    out = tmp_path / "open"
    run_training(
        load_train_config(
            ROOT / "configs/tiny_supervised.yaml", [*overrides(prepared[0], out), "data.holdout_species=0.34"]
        )
    )
    rows = evaluate_novel(NovelArguments(run=str(out), shots="1,3", seeds=2, num_workers=0))
    assert {(r["backbone"], r["setting"], r["k"]) for r in rows} == {
        (b, s, k) for b in ("original", "fine-tuned") for s in ("novel", "generalised") for k in (1, 3)
    }
    summary = (out / "novel_species/summary.md").read_text()
    assert "| original (tiny-resnet) | 1 |" in summary and "randomly initialised test model" in summary
    # the original features are those of the run's start: its seed's initialisation, the same on every call
    tuned = load_classifier(str(out))
    record = json.loads((out / "classes.json").read_text())
    start = [initial_classifier(record, tuned.taxonomy, seed=0) for _ in range(2)]
    pixels = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    first, again, trained_features = (c.image_features(pixels) for c in (*start, tuned))
    assert torch.equal(first, again) and first.shape == (2, 32)  # tiny-resnet's last stage: 32 channels, pooled
    assert not torch.allclose(first, trained_features)  # a full fine-tune moved the backbone
