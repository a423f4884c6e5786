"""The training section is transformers.TrainingArguments: its names, any of its fields, the project's
defaults only where the config sets nothing, and one-line errors for what it or we reject."""

from pathlib import Path

import pytest
import yaml

from mushroomclip.config import ConfigError, load_train_config, project_training_defaults
from mushroomclip.models.backbones import load_backbone
from mushroomclip.models.lora import add_lora
from mushroomclip.training.trainer import ContrastiveTrainer, trainer_arguments

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs/tiny.yaml"


@pytest.mark.parametrize(
    ("key", "suggestion"),
    [
        ("learning_rte", "training.learning_rate"),  # a typo: difflib over TrainingArguments' fields
        ("gradient_acumulation_steps", "training.gradient_accumulation_steps"),
        ("lr", "training.learning_rate"),  # keys of older configs name their TrainingArguments field
        ("batch_size", "training.per_device_train_batch_size"),
        ("resume", "run.resume"),
    ],
)
def test_unknown_training_key_names_the_trainingarguments_field(key, suggestion):
    with pytest.raises(ConfigError) as err:
        load_train_config(TINY, [f"training.{key}=1"])
    message = str(err.value)
    assert message.startswith(f"unknown key 'training.{key}' in the command line; did you mean '{suggestion}'?")
    assert "transformers.TrainingArguments" in message and "\n" not in message


def test_unknown_training_key_from_the_cli_is_one_line_and_exit_2(capsys):
    import train

    assert train.main(["--config", str(TINY), "training.learning_rte=1e-4"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown key 'training.learning_rte'") and err.count("\n") == 1, err


def test_what_trainingarguments_itself_rejects_is_one_line_and_exit_2(capsys):
    import train

    # load_best_model_at_end (a project default) needs saving in step with evaluation: TrainingArguments says so
    assert train.main(["--config", str(TINY), "training.save_strategy=epoch"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: training: --load_best_model_at_end requires the save and eval strategy to match")
    assert err.count("\n") == 1 and "Traceback" not in err, err


def _tiny_trainer(cfg, tmp_path) -> ContrastiveTrainer:
    backbone = load_backbone("tiny-clip")
    model = add_lora(backbone.model, 4, 8, 0.0, ["vision"], ["q_proj", "v_proj"], False)
    ids = backbone.tokenize(["Amanita muscaria", "Boletus edulis"])
    args = trainer_arguments(cfg.training, tmp_path / "checkpoints")
    return ContrastiveTrainer(
        model=model, args=args, class_input_ids=ids, loss_name="class_text", evaluator=None, eval_dataset=[]
    )  # the project's defaults evaluate: Trainer wants a split


def test_any_trainingarguments_option_reaches_the_trainer(tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")  # trainer_arguments sets it
    overrides = ["training.lr_scheduler_type=constant", "training.adam_beta2=0.98", "training.learning_rate=1e-4"]
    cfg = load_train_config(TINY, overrides)  # 1e-4 without a dot is a string in YAML 1.1: read as a float
    trainer = _tiny_trainer(cfg, tmp_path)
    assert trainer.args.output_dir == str(tmp_path / "checkpoints")
    trainer.create_optimizer_and_scheduler(num_training_steps=20)
    [group, *_] = trainer.optimizer.param_groups
    assert group["betas"] == (0.9, 0.98) and group["lr"] == 1e-4
    for _ in range(10):
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
    assert trainer.lr_scheduler.get_last_lr()[0] == 1e-4  # constant: the project's cosine would have decayed it


def test_project_defaults_apply_only_where_the_config_sets_nothing(tmp_path):
    training = load_train_config(TINY).training
    assert training.lr_scheduler_type == "cosine" and training.metric_for_best_model == "miou"
    assert training.load_best_model_at_end and training.save_total_limit == 3 and not training.remove_unused_columns
    assert (
        training.eval_strategy == "steps" and training.save_steps == training.eval_steps == 20
    )  # tiny sets eval_steps
    assert load_train_config(None).training.eval_strategy == "epoch"  # nothing set: every epoch
    overrides = [
        "training.lr_scheduler_type=linear",
        "training.save_total_limit=1",
        "training.optim=sgd",
        "training.metric_for_best_model=oa",
        "training.weight_decay=0.0",
        "training.output_dir=" + str(tmp_path),
    ]
    cfg = load_train_config(TINY, overrides)
    t = cfg.training
    assert (t.lr_scheduler_type, t.save_total_limit, t.optim, t.metric_for_best_model, t.weight_decay) == (
        "linear",
        1,
        "sgd",
        "oa",
        0.0,
    )
    # linear is transformers' own default, which the saved config must still record over the project's cosine
    saved = tmp_path / "config.yaml"
    saved.write_text(yaml.safe_dump(cfg.to_dict()))
    assert load_train_config(saved).training.lr_scheduler_type == "linear"
    assert load_train_config(saved).to_dict() == cfg.to_dict()
    # the project chooses its values without looking at what the user set, except the keys that depend on it
    assert set(project_training_defaults({}, 0)) == set(project_training_defaults({"eval_steps": 5, "bf16": True}, 2))


@pytest.mark.parametrize(("value", "message"), [("abc", "must be float"), ("true", "must be float")])
def test_wrong_type_for_a_trainingarguments_field_is_a_config_error(value, message):
    with pytest.raises(ConfigError, match=f"training.learning_rate {message}"):
        load_train_config(TINY, [f"training.learning_rate={value}"])


def test_the_training_section_reaches_the_trainer_without_renaming(tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    cfg = load_train_config(TINY, ["training.gradient_accumulation_steps=3", "training.per_device_train_batch_size=4"])
    args = _tiny_trainer(cfg, tmp_path).args
    assert (args.gradient_accumulation_steps, args.per_device_train_batch_size, args.learning_rate) == (3, 4, 5e-3)
    assert args.warmup_steps == 0.05 and args.get_warmup_steps(60) == 3  # a ratio, rounded up as before
