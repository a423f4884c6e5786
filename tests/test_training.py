"""LoRA training end to end on the tiny offline model and the synthetic data."""

import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from mushroomclip.config import ConfigError, load_train_config
from mushroomclip.models.backbones import load_backbone
from mushroomclip.models.classifier import AdapterError, load_classifier
from mushroomclip.training.trainer import run_training

ROOT = Path(__file__).resolve().parents[1]
SECRET = "hf_THISISNOTAREALTOKEN0123456789"


def tiny_overrides(data: Path, out: Path, **extra) -> list[str]:
    values = {
        "data.path": data,
        "training.output_dir": out,
        "training.max_steps": 40,
        "training.eval_steps": 20,
        "training.logging_steps": 5,
        "data.num_workers": 0,
    } | extra
    return [f"{k}={v}" for k, v in values.items()]


class Lines(logging.Handler):
    """The package's INFO messages, as the console handler of train.py shows them."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture(scope="module")
def trained(prepared, tmp_path_factory):
    os.environ["HF_TOKEN"] = SECRET  # must never reach a file or a log
    out = tmp_path_factory.mktemp("runs") / "tiny"
    cfg = load_train_config(ROOT / "configs/tiny.yaml", tiny_overrides(prepared[0], out))
    package, lines = logging.getLogger("mushroomclip"), Lines()
    level = package.level
    package.setLevel(logging.INFO)
    package.addHandler(lines)
    try:
        result = run_training(cfg)
    finally:
        package.removeHandler(lines)
        package.setLevel(level)
    yield cfg, out, result, "\n".join(lines.lines)
    os.environ.pop("HF_TOKEN", None)


def test_training_clearly_beats_the_untrained_model(trained):
    _, out, result, log = trained
    before, after = result["validation_untrained"]["miou"], result["validation_best"]["miou"]
    assert after > before + 0.3, (before, after)
    assert result["global_step"] == 40
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["validation_best"]["miou"] == pytest.approx(after) and metrics["test"]["miou"] is not None
    assert "best validation mIoU" in log


def test_run_folder_has_every_documented_file(trained):
    cfg, out, _, _ = trained
    for name in (
        "adapter_config.json",
        "adapter_model.safetensors",
        "classes.json",
        "config.yaml",
        "metrics.json",
        "loss_curve.png",
        "confusion.png",
        "README.md",
        "taxonomy.csv",
        "data.json",
    ):
        assert (out / name).is_file(), name
    classes = json.loads((out / "classes.json").read_text())
    assert len(classes["species"]) == 169 and classes["text_type"] == "sci" and classes["base_model"] == "tiny-clip"
    assert load_train_config(out / "config.yaml").to_dict() == cfg.to_dict()  # the resolved config round-trips
    assert any((out / "checkpoints").glob("checkpoint-*"))


@pytest.mark.parametrize("loss", ["hierarchical_soft", "hierarchical_xent"])
def test_a_taxonomy_and_safety_aware_run_writes_a_complete_run_folder(prepared, tmp_path, loss, caplog):
    out = tmp_path / loss
    overrides = tiny_overrides(
        prepared[0], out, **{"training.max_steps": 4, "training.eval_steps": 4, "training.logging_steps": 2}
    )
    with caplog.at_level("INFO", logger="mushroomclip"):
        result = run_training(
            load_train_config(ROOT / "configs/tiny.yaml", [*overrides, f"loss.name={loss}", "loss.danger_weight=1.0"])
        )
    assert result["global_step"] == 4
    losses = [value for _, value in json.loads((out / "metrics.json").read_text())["loss_history"]]
    assert losses and all(math.isfinite(value) for value in losses)
    for name in ("adapter_model.safetensors", "classes.json", "config.yaml", "metrics.json", "README.md", "data.json"):
        assert (out / name).is_file(), name
    saved = load_train_config(out / "config.yaml").loss
    assert (saved.name, saved.danger_weight) == (loss, 1.0)
    setting = "β=10" if loss == "hierarchical_soft" else "α=0.1"
    assert f"loss `{loss}`, {setting}, danger_weight=1;" in (out / "README.md").read_text()  # the card says it all
    assert any(f"loss {loss} ({setting}, danger_weight=1), fp32" in m for m in caplog.messages)  # the run summary
    # Bertinetto et al.'s figures travel with the run, so runs compare with the paper's tables
    metrics = json.loads((out / "metrics.json").read_text())
    for split in ("test", "validation_best"):
        assert set(metrics[split]["hierarchical_distance_top_k"]) == {"top1", "top5", "top20"}
    assert "How bad the mistakes are" in (out / "README.md").read_text()
    assert any("test mistakes: severity " in m for m in caplog.messages)


def test_run_max_danger_records_the_validation_chosen_threshold_that_predict_reads(prepared, tmp_path, trained):
    from mushroomclip.data.splits import load_splits
    from mushroomclip.prediction.answer import run_thresholds

    out = tmp_path / "selective"
    overrides = tiny_overrides(prepared[0], out, **{"training.max_steps": 4, "training.eval_steps": 4})
    result = run_training(load_train_config(ROOT / "configs/tiny.yaml", [*overrides, "run.max_danger=0.05"]))
    curve, chosen = result["selective"]
    recorded = json.loads((out / "metrics.json").read_text())["thresholds"]
    assert recorded == json.loads(json.dumps(chosen.record(0.8, 0.8)))  # predict.py and the app read it
    assert recorded["species"] >= 0.5  # never bolder than the default threshold, whatever the target allows
    assert recorded["max_danger"] == 0.05 and recorded["chosen_on"] == "validation"
    assert recorded["images"] == len(load_splits(prepared[0])["validation"])
    assert (recorded["dangerous_as_edible"] <= 0.05) == chosen.met and 0 <= recorded["coverage"] <= 1
    assert (out / "risk_coverage.png").is_file()
    card = (out / "README.md").read_text()
    assert f"**Selective prediction.** Below a top-1 probability of {100 * recorded['species']:.1f}%" in card
    assert ("The validation split shows it" in card) == recorded["target_shown"]  # a few images show little
    thresholds = run_thresholds(out)
    assert thresholds.species == recorded["species"] and "dangerous->edible rate of at most 5%" in thresholds.source
    _, default_run, _, _ = trained  # off by default: the run records no threshold and writes no curve
    assert "thresholds" not in json.loads((default_run / "metrics.json").read_text())
    assert not (default_run / "risk_coverage.png").exists()


def test_saved_adapter_reloads_with_peft_and_reproduces_logits_exactly(trained, prepared):
    from peft import PeftModel

    _, out, result, _ = trained
    reloaded = PeftModel.from_pretrained(load_backbone("tiny-clip").model, str(out)).eval()
    trained_model = result["model"].eval()
    pixels = torch.randn(4, 3, 32, 32)
    ids = load_backbone("tiny-clip").tokenize(["Amanita muscaria", "Boletus edulis", "Lobaria pulmonaria"])
    with torch.no_grad():
        expected = trained_model(pixel_values=pixels, input_ids=ids).logits_per_image
        got = reloaded(pixel_values=pixels, input_ids=ids).logits_per_image
    assert torch.equal(expected, got)


def test_classifier_predicts_ranked_species_with_probabilities(trained, prepared):
    import mushroomclip

    _, out, _, _ = trained
    classifier = mushroomclip.load_classifier(str(out))  # the package-level entry point
    image = Image.open(next((prepared[0] / "test").rglob("*.jpg")))
    [predictions] = classifier.predict([image], top_k=5)
    probs = [p.probability for p in predictions]
    assert len(predictions) == 5 and probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0001


def test_adapter_for_other_classes_or_base_is_a_clear_error(trained):
    _, out, _, _ = trained
    with pytest.raises(AdapterError, match="trained on other classes"):
        load_classifier(str(out), species=["Amanita muscaria", "Boletus edulis"])
    with pytest.raises(AdapterError, match="trained on base model 'tiny-clip', not 'openai/clip-vit-base-patch32'"):
        load_classifier(str(out), base="openai/clip-vit-base-patch32")
    with pytest.raises(AdapterError, match="is neither a folder nor a reachable Hub repo|not a MushroomCLIP adapter"):
        load_classifier(str(out / "checkpoints"))


def test_push_uploads_the_expected_files_and_the_card_parses(trained):
    from huggingface_hub import ModelCard

    from mushroomclip.hub import push_run

    _, out, _, _ = trained

    class FakeApi:
        def __init__(self):
            self.calls = []

        def create_repo(self, repo_id, **kwargs):
            self.calls.append(("create_repo", repo_id, kwargs))
            return f"https://huggingface.co/{repo_id}"

        def upload_folder(self, **kwargs):
            self.calls.append(("upload_folder", kwargs))

    api = FakeApi()
    url = push_run(out, "someone/mushroomclip-tiny", private=True, api=api)
    assert url == "https://huggingface.co/someone/mushroomclip-tiny"
    assert api.calls[0][2]["private"] is True
    uploaded = set(api.calls[1][1]["allow_patterns"])
    assert {"adapter_config.json", "adapter_model.safetensors", "classes.json", "README.md"} <= uploaded
    assert "data.json" in uploaded
    card = ModelCard.load(out / "README.md")
    assert card.data.base_model is None and card.data.library_name == "peft"  # tiny-clip is no Hub model
    results = {r.metric_type: r.metric_value for r in card.data.eval_results}
    test = json.loads((out / "metrics.json").read_text())["test"]
    assert results["miou"] == pytest.approx(test["miou"], abs=1e-4) and set(results) == {"oa", "top5", "mf1", "miou"}
    assert "zero-shot (before LoRA)" in card.text and "load_classifier" in card.text


def test_push_uploads_every_file_the_run_wrote(trained, tmp_path):
    """risk_coverage.png (run.max_danger) and holdout_species.json (data.holdout_species) were once left behind."""
    from mushroomclip.hub import stage_upload
    from mushroomclip.training.runs import OUTPUTS

    run = Path(shutil.copytree(trained[1], tmp_path / "run", ignore=shutil.ignore_patterns("checkpoints")))
    for name in ("risk_coverage.png", "holdout_species.json"):
        (run / name).write_bytes(b"{}")
    (tmp_path / "staging").mkdir()
    staged = stage_upload(run, "someone/tiny", tmp_path / "staging")
    assert {"risk_coverage.png", "holdout_species.json"} <= set(staged)
    assert set(staged) == {
        name for name in (*OUTPUTS, "adapter_config.json", "adapter_model.safetensors") if (run / name).is_file()
    }


def test_run_records_the_data_it_actually_used(trained, prepared):
    _, out, _, _ = trained
    report = prepared[1]
    data = json.loads((out / "data.json").read_text())
    assert data["num_species"] == report["classes"]["train"] == 6 and data["split"] == "official"
    assert data["images"] == report["images"] and data["source"] == report["source"]
    assert data["report"]["skipped"] == report["skipped"]
    classes = json.loads((out / "classes.json").read_text())
    trained_on = sorted({p.parent.name for p in (prepared[0] / "train").rglob("*.jpg")})
    assert classes["trained_species"] == trained_on and len(classes["species"]) == 169


def test_card_describes_the_run_actually_made_and_links_only_real_models(trained, tmp_path):
    import re

    import yaml
    from huggingface_hub import ModelCard

    from mushroomclip.hub import model_card

    _, out, _, _ = trained
    card = ModelCard.load(out / "README.md").text
    assert "recognition (6 species)" in card and "(169 species)" not in card and "official split" in card
    assert "It ranks all 169 species of its taxonomy, but saw images of these 6 only." in card
    assert "`tiny-clip`, a randomly initialised test model (not a pretrained model)" in card
    assert "pipeline check" in card
    assert re.findall(r"https?://\S+", card) == []  # no placeholder links, no link to a non-model
    assert "PeftModel.from_pretrained" not in card and 'from_pretrained("tiny-clip")' not in card

    real = Path(shutil.copytree(out, tmp_path / "real", ignore=shutil.ignore_patterns("checkpoints")))
    config = yaml.safe_load((real / "config.yaml").read_text())
    config["model"]["base"] = "openai/clip-vit-base-patch32"
    (real / "config.yaml").write_text(yaml.safe_dump(config))
    card = model_card(real)
    assert card.data.base_model == "openai/clip-vit-base-patch32" and "random" not in card.text
    assert re.findall(r"https?://[^\s)]+", card.text) == ["https://huggingface.co/openai/clip-vit-base-patch32"]
    assert 'CLIPModel.from_pretrained("openai/clip-vit-base-patch32")' in card.text
    config["model"]["base"] = str(out)  # a local folder: no link, no base_model
    (real / "config.yaml").write_text(yaml.safe_dump(config))
    card = model_card(real)
    assert card.data.base_model is None and "https://" not in card.text and "PeftModel" not in card.text


def test_token_never_appears_in_any_output(trained):
    _, out, _, log = trained
    assert SECRET not in log
    for path in out.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path


def test_config_typo_is_a_clear_error_from_the_cli(tmp_path):
    with pytest.raises(
        ConfigError, match=r"unknown key 'training.learning_rte'.*did you mean 'training.learning_rate'\?"
    ):
        load_train_config(ROOT / "configs/tiny.yaml", ["training.learning_rte=1e-4"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("lora:\n  rank: 8\n")
    result = subprocess.run(
        [sys.executable, "train.py", "--config", str(bad)], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 2 and "unknown key 'lora.rank'" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("cpu", "bf16_gpu", "accelerate_setting", "expected"),
    [
        (False, True, None, "bf16"),  # python train.py on an A100/H100
        (False, True, "no", "bf16"),  # accelerate launch without a config: its default is not a choice
        (False, True, "fp16", "fp16"),  # the accelerate config decides
        (False, False, None, "fp16"),  # a V100/T4 has no bf16
        (True, False, "bf16", "fp32"),  # CPU: fp32 whatever the accelerate config says
    ],
)
def test_precision_follows_the_accelerate_config_unless_set(cpu, bf16_gpu, accelerate_setting, expected):
    from mushroomclip.config import auto_precision

    assert auto_precision(cpu, bf16_gpu, accelerate_setting) == expected


def test_precision_set_in_the_config_wins_and_impossible_ones_are_clear_errors(monkeypatch):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # as under accelerate_config.yaml
    training = load_train_config(ROOT / "configs/tiny.yaml", ["training.bf16=true"]).training
    assert (training.bf16, training.fp16) == (True, False)  # CPU autocast in bf16, on request
    training = load_train_config(ROOT / "configs/tiny.yaml", ["training.bf16=false"]).training
    assert (training.bf16, training.fp16) == (False, False)  # fp32, also on a GPU under a bf16 accelerate config
    with pytest.raises(ConfigError, match="training.fp16 must be false on the CPU"):
        load_train_config(ROOT / "configs/tiny.yaml", ["training.fp16=true"])
    with pytest.raises(ConfigError, match="training.bf16 must be bool, got 'float16'"):
        load_train_config(ROOT / "configs/tiny.yaml", ["training.bf16=float16"])
    with pytest.raises(ConfigError, match="did you mean 'training.bf16'"):
        load_train_config(ROOT / "configs/tiny.yaml", ["training.precision=bf16"])  # the key of older configs


def test_default_config_without_network_fails_fast_with_one_clear_error():
    # The command, exactly. HF_HUB_OFFLINE stands in for "no network" (the test suite never
    # touches it); without the variable the same message comes from a failed TCP probe of the Hub.
    accelerate = Path(sys.executable).with_name("accelerate")
    cmd = [str(accelerate), "launch", "train.py", "--config", "configs/lora_b32.yaml"]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=os.environ | {"HF_HUB_OFFLINE": "1"})
    assert result.returncode != 0
    lines = result.stderr.splitlines()
    [error] = [i for i, line in enumerate(lines) if line.startswith("error: ")]
    assert "could not load model 'clip-b32' (openai/clip-vit-base-patch32)" in lines[error]
    assert "Check the network and the Hugging Face login" in lines[error]
    # Nothing of ours is a traceback; accelerate's launcher re-raises the exit status (README: use -q).
    assert "Traceback" not in "\n".join(lines[: error + 1]) and result.stderr.count("Traceback") <= 1


def test_shipped_configs_are_valid():
    for name in ("lora_b32", "lora_b16", "lora_bioclip", "lora_bioclip2", "tiny"):
        cfg = load_train_config(ROOT / "configs" / f"{name}.yaml")
        assert cfg.loss.name == "class_text"
    assert load_train_config(ROOT / "configs/lora_b32.yaml").model.base == "openai/clip-vit-base-patch32"


RESUME_STEPS = {
    "training.max_steps": 30,
    "training.eval_steps": 10,
    "training.save_total_limit": 10,
    "run.test_after": False,
}


@pytest.fixture(scope="module")
def uninterrupted(prepared, tmp_path_factory):
    """The 30-step run that the resume tests must reproduce bit for bit."""
    out = tmp_path_factory.mktemp("runs") / "uninterrupted"
    run_training(load_train_config(ROOT / "configs/tiny.yaml", tiny_overrides(prepared[0], out, **RESUME_STEPS)))
    return out


def assert_same_run(out: Path, reference: Path) -> None:
    """Same final adapter, bit for bit, the same loss and validation history from step 1, and the evaluation
    before training of the first start."""
    from safetensors.torch import load_file

    got, expected = (load_file(d / "adapter_model.safetensors") for d in (out, reference))
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)
    metrics, reference_metrics = (json.loads((d / "metrics.json").read_text()) for d in (out, reference))
    assert metrics["loss_history"] == reference_metrics["loss_history"] and metrics["loss_history"][0][0] == 5
    assert metrics["eval_history"] == reference_metrics["eval_history"] and len(metrics["eval_history"]) == 3
    assert metrics["validation_untrained"] == reference_metrics["validation_untrained"] is not None  # first start's


def test_resume_from_a_copied_checkpoint_ends_exactly_like_the_uninterrupted_run(prepared, uninterrupted, tmp_path):

    out = tmp_path / "copy"
    shutil.copytree(uninterrupted / "checkpoints" / "checkpoint-10", out / "checkpoints" / "checkpoint-10")
    cfg = load_train_config(ROOT / "configs/tiny.yaml", tiny_overrides(prepared[0], out, **RESUME_STEPS))
    cfg.run.resume = True
    assert run_training(cfg)["global_step"] == 30
    assert_same_run(out, uninterrupted)


def _train_cmd(*args):
    return [sys.executable, "train.py", "--config", "configs/tiny.yaml", *args]


def test_resume_after_a_killed_run_continues_the_same_run(prepared, uninterrupted, tmp_path):
    out = tmp_path / "run"
    args = tiny_overrides(prepared[0], out, **RESUME_STEPS)
    env = os.environ | {"PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(_train_cmd(*args), cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = out / "checkpoints" / "checkpoint-10"
    deadline = time.monotonic() + 240
    while not (first / "trainer_state.json").is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)  # waiting for a condition, not for time
    assert proc.poll() is None, "the run ended before it could be interrupted"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    complete = {p.name for p in (out / "checkpoints").glob("checkpoint-*") if (p / "trainer_state.json").is_file()}
    assert "checkpoint-10" in complete and not (out / "metrics.json").exists()
    torn = out / "checkpoints" / "checkpoint-999"  # as if killed while saving: files but no trainer_state.json
    torn.mkdir()
    (torn / "adapter_model.safetensors").write_bytes(b"partial")
    result = subprocess.run(_train_cmd(*args, "--resume"), cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "removing" in result.stdout and not torn.exists()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["global_step"] == 30
    after = {p.name for p in (out / "checkpoints").glob("checkpoint-*")}
    assert complete <= after and "checkpoint-30" in after  # no checkpoint lost
    assert_same_run(out, uninterrupted)


def test_benchmark_row_of_the_adapter_equals_its_own_test_metrics(trained, prepared, tmp_path):
    from mushroomclip.evaluation.zeroshot import EvaluationArguments, evaluate

    _, out, _, _ = trained
    rows = evaluate(
        EvaluationArguments(
            data=str(prepared[0]),
            models="",
            include_adapters=str(out.parent),
            templates="openai",
            shots="",
            output=str(tmp_path),
            num_workers=0,
        )
    )
    [row] = rows
    assert row["method"] == "LoRA" and row["model"] == f"lora-{out.name}"
    assert row["miou"] == pytest.approx(json.loads((out / "metrics.json").read_text())["test"]["miou"])


def test_predict_cli_ranks_species_and_warns_about_deadly_candidates(trained, prepared):
    _, out, _, _ = trained
    image = next((prepared[0] / "test").rglob("*.jpg"))
    cmd = [sys.executable, "predict.py", str(image), "--adapter", str(out), "--top-k", "169", "--format", "json"]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    [record] = json.loads(result.stdout)
    predictions = record["predictions"]
    assert len(predictions) == 169 and sum(p["probability"] for p in predictions) == pytest.approx(1, abs=1e-3)
    assert predictions[0]["lineage"]["species"] == predictions[0]["species"]
    assert "WARNING: " in result.stderr and "(deadly)" in result.stderr  # every species is a candidate here
    missing = subprocess.run(
        [sys.executable, "predict.py", "nope.jpg", "--adapter", str(out)], cwd=ROOT, capture_output=True, text=True
    )
    assert missing.returncode == 2 and missing.stderr.startswith("error: cannot read image nope.jpg")


def test_wandb_reporting_works_offline(prepared, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    overrides = tiny_overrides(
        prepared[0],
        tmp_path / "run",
        **{"training.max_steps": 4, "training.eval_steps": 4, "training.report_to": "wandb", "run.test_after": False},
    )
    run_training(load_train_config(ROOT / "configs/tiny.yaml", overrides))
    [run] = list((tmp_path / "wandb").glob("offline-run-*"))
    assert any(run.glob("*.wandb"))  # the run's history was recorded locally
    with pytest.raises(ConfigError, match="training.report_to must be none, all or some of azure_ml, "):
        load_train_config(ROOT / "configs/tiny.yaml", ["training.report_to=nope"])
    with pytest.raises(ConfigError, match="training.report_to=mlflow needs the mlflow package: pip install mlflow"):
        load_train_config(ROOT / "configs/tiny.yaml", ["training.report_to=mlflow"])


def test_speed_benchmarks_run_on_the_tiny_model_and_count_every_image(prepared):
    from mushroomclip.evaluation.throughput import measure_speed, measure_train_speed

    zero_shot = measure_speed(str(prepared[0]), "tiny-clip", 16, 0, "cpu", "train", 2)
    assert zero_shot["images"] == 32 and zero_shot["pipeline"]["images_per_s"] > 0
    assert zero_shot["ratio"] == pytest.approx(
        zero_shot["pipeline"]["images_per_s"] / zero_shot["model_only"]["images_per_s"]
    )
    for towers in (("vision", "text"), ("vision",)):
        train = measure_train_speed(str(prepared[0]), "tiny-clip", 8, 2, 0, "cpu", towers, baseline=False)
        assert train["steps"] == 2 and train["pipeline"]["images_per_s"] > 0 and train["model_only"]["images_per_s"] > 0


class _Niceness(torch.utils.data.Dataset):
    """Each item is the niceness of the process that loads it."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> int:
        return os.nice(0)


def _tiny_trainer(tmp_path, **kwargs):
    """A ContrastiveTrainer on tiny-clip with LoRA on the vision tower, on the CPU."""
    from transformers import TrainingArguments

    from mushroomclip.models.lora import add_lora
    from mushroomclip.training.trainer import ContrastiveTrainer

    backbone = load_backbone("tiny-clip")
    model = add_lora(
        backbone.model, 4, 8, 0.0, ["vision"], ["q_proj", "v_proj"], kwargs.pop("train_logit_scale", False)
    )
    args = TrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, report_to=[], data_seed=0, **kwargs.pop("args", {})
    )
    ids = backbone.tokenize(["Amanita muscaria", "Boletus edulis"])
    return ContrastiveTrainer(
        model=model, args=args, class_input_ids=ids, loss_name="class_text", evaluator=None, **kwargs
    )


class _NicenessImages:
    """An evaluator stand-in whose images are :class:`_Niceness` items."""

    def images(self, split) -> _Niceness:
        return _Niceness()


@pytest.mark.parametrize("which", ["train", "eval"])
def test_the_trainers_loader_workers_run_at_a_lower_priority(which, tmp_path):
    from mushroomclip.data.transforms import WORKER_NICENESS

    args = {"dataloader_num_workers": 1, "per_device_train_batch_size": 4, "per_device_eval_batch_size": 4}
    trainer = _tiny_trainer(tmp_path, args=args, train_dataset=_Niceness(), data_collator=torch.tensor)
    trainer.evaluator = _NicenessImages()
    loader = trainer.get_train_dataloader() if which == "train" else trainer.get_eval_dataloader("any split")
    [niceness] = list(loader)
    assert niceness.tolist() == [min(os.nice(0) + WORKER_NICENESS, 19)] * 4


def test_a_trainable_logit_scale_has_no_weight_decay_and_stays_at_most_ln_100(tmp_path):
    import math

    trainer = _tiny_trainer(tmp_path, train_logit_scale=True, args={"learning_rate": 1.0, "weight_decay": 0.5})
    scale = trainer.model.get_base_model().logit_scale
    optimizer = trainer.create_optimizer()
    [group] = [g for g in optimizer.param_groups if any(p is scale for p in g["params"])]
    assert group["weight_decay"] == 0.0
    assert any(g["weight_decay"] == 0.5 and g["params"] for g in optimizer.param_groups)  # LoRA weights decay
    with torch.no_grad():
        scale.fill_(math.log(100) - 0.01)
    scale.grad = torch.full_like(scale, -1.0)  # a step of about lr = 1.0 upwards
    optimizer.step()
    assert scale.item() == pytest.approx(math.log(100))
