"""How a training run ends when something is wrong: one line, nothing false written, nothing lost."""

import json
import shutil
from pathlib import Path

import pytest

import train
from mushroomclip.config import ConfigError, load_train_config

ROOT = Path(__file__).resolve().parents[1]


def short_run(data: Path, out: Path, *extra: str) -> list[str]:
    """``train.py`` arguments for a few steps of the tiny model."""
    overrides = {
        "data.path": data,
        "training.output_dir": out,
        "training.max_steps": 4,
        "training.eval_steps": 4,
        "training.logging_steps": 1,
        "data.num_workers": 0,
        "run.test_after": False,
    }
    return ["--config", str(ROOT / "configs/tiny.yaml"), *(f"{k}={v}" for k, v in overrides.items()), *extra]


def run_cli(capsys, args: list[str]) -> tuple[int, str]:
    """``train.py``'s exit status and stderr, in this process."""
    capsys.readouterr()
    status = train.main(args)
    return status, capsys.readouterr().err


def assert_one_error_line(err: str, starts: str) -> str:
    [line] = [line for line in err.splitlines() if line.startswith("error: ")]
    assert line.startswith(f"error: {starts}") and "Traceback" not in err, err
    return line


def test_diverging_run_stops_naming_the_step_and_writes_nothing(prepared, tmp_path, capsys):
    out = tmp_path / "run"
    status, err = run_cli(capsys, short_run(prepared[0], out, "training.learning_rate=1e10", "training.max_steps=8"))
    line = assert_one_error_line(err, "training diverged at step ")
    assert status == 2 and "loss is nan" in line and "training.learning_rate (now 1e+10)" in line
    assert not out.exists()  # no adapter, card, metrics or empty folder from NaN weights


def test_trained_weights_that_are_not_finite_are_never_written():
    import torch

    from mushroomclip.training.trainer import non_finite_weights

    model = torch.nn.Linear(2, 2)
    assert non_finite_weights(model) == []
    with torch.no_grad():
        model.bias[0] = float("nan")
    assert non_finite_weights(model) == ["bias"]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("training.per_device_train_batch_size=0", "training.per_device_train_batch_size must be at least 1, got 0"),
        ("lora.r=-1", "lora.r must be at least 1, e.g. 16, got -1"),
        ("training.gradient_accumulation_steps=0", "training.gradient_accumulation_steps must be at least 1, got 0"),
        ("data.num_workers=-1", "data.num_workers must be 0 (load in the main process) or more, got -1"),
        (
            "lora.target_modules=[nope]",
            "lora.target_modules must be a non-empty list of q_proj, k_proj, v_proj, out_proj, fc1, fc2, got ['nope']",
        ),
        ("training.learning_rate=-1e-4", "training.learning_rate must be a positive number"),
        ("training.eval_steps=0", "training.eval_steps must be positive (or unset: every epoch), got 0"),
        ("lora.dropout=1.5", "lora.dropout must be in [0, 1), got 1.5"),
        (
            "training.max_steps=0",
            "training.max_steps must be -1 (train for training.num_train_epochs) or at least 1, got 0",
        ),
    ],
)
def test_values_a_run_cannot_use_are_one_config_error_each(override, message):
    with pytest.raises(ConfigError) as err:
        load_train_config(ROOT / "configs/tiny.yaml", [override])
    assert str(err.value).startswith(message)


def test_bad_value_from_the_cli_is_one_line_and_exit_2(tmp_path, capsys):
    status, err = run_cli(capsys, short_run(tmp_path, tmp_path / "run", "training.per_device_train_batch_size=0"))
    assert status == 2 and assert_one_error_line(err, "training.per_device_train_batch_size must be at least 1")


def test_taxonomy_option_is_used_when_it_lists_the_prepared_species(prepared, tmp_path):
    import csv

    from mushroomclip.taxonomy import load_taxonomy
    from mushroomclip.training.trainer import run_taxonomy

    with pytest.raises(ConfigError, match="data.taxonomy .*nope.csv does not exist"):
        load_train_config(ROOT / "configs/tiny.yaml", [f"data.taxonomy={tmp_path / 'nope.csv'}"])
    rows = list(csv.DictReader((prepared[0] / "taxonomy.csv").open()))
    renamed = tmp_path / "renamed.csv"
    with renamed.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows([r | {"common_name": f"{r['common_name']} (ours)"} for r in rows])
    taxonomy = run_taxonomy(str(prepared[0]), str(renamed))
    assert taxonomy.fingerprint == load_taxonomy(renamed).fingerprint
    assert taxonomy.fingerprint != load_taxonomy(prepared[0] / "taxonomy.csv").fingerprint
    fewer = tmp_path / "fewer.csv"
    with fewer.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows[:-1])
    with pytest.raises(ConfigError, match="lists other species than .*taxonomy.csv"):
        run_taxonomy(str(prepared[0]), str(fewer))


def test_run_trains_with_the_taxonomy_it_was_given(prepared, tmp_path, capsys):
    taxonomy = tmp_path / "taxonomy.csv"
    taxonomy.write_bytes((prepared[0] / "taxonomy.csv").read_bytes().replace(b"fly agaric", b"fly amanita"))
    out = tmp_path / "run"
    status, err = run_cli(capsys, short_run(prepared[0], out, f"data.taxonomy={taxonomy}"))
    assert status == 0, err
    assert (out / "taxonomy.csv").read_bytes() == taxonomy.read_bytes()


def test_finished_or_different_run_is_refused_and_overwrite_clears_only_what_training_wrote(prepared, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_cli(capsys, short_run(prepared[0], out))[0] == 0
    (out / "notes.txt").write_text("mine")
    for again in ([], ["--resume"]):
        status, err = run_cli(capsys, short_run(prepared[0], out, *again))
        assert status == 2 and "start it over with --overwrite" in assert_one_error_line(
            err, f"{out} holds a finished run"
        )
    (out / "metrics.json").rename(out / "metrics.json.bak")  # as if stopped after its last checkpoint
    status, err = run_cli(capsys, short_run(prepared[0], out, "training.learning_rate=1e-3", "--resume"))
    line = assert_one_error_line(err, f"{out} holds a run stopped at checkpoint-4 with another config")
    assert status == 2 and "(training.learning_rate: 0.005 -> 0.001)" in line
    status, err = run_cli(capsys, short_run(prepared[0], out, "training.adam_beta2=0.98", "--resume"))
    line = assert_one_error_line(err, f"{out} holds a run stopped at checkpoint-4 with another config")
    assert status == 2 and "(training.adam_beta2: 'unset' -> 0.98)" in line  # a key the first start left unset
    status, err = run_cli(  # overrides after a flag count too (argparse refused them once)
        capsys, short_run(prepared[0], out, "--overwrite", "training.max_steps=3", "training.eval_steps=3")
    )
    assert status == 0, err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-3"]  # checkpoint-4 is gone
    assert (out / "notes.txt").read_text() == "mine" and (out / "metrics.json.bak").is_file()
    assert json.loads((out / "metrics.json").read_text())["global_step"] == 3


def test_image_broken_after_preparation_is_one_line_and_leaves_no_folder(prepared, tmp_path, capsys):
    data = Path(shutil.copytree(prepared[0], tmp_path / "data"))
    images = sorted((data / "train").rglob("*.jpg"))
    for image in images[::2]:  # whichever the first batch draws
        image.write_bytes(image.read_bytes()[:100])
    out = tmp_path / "run"
    for workers in ("0", "2"):  # in this process, and in DataLoader workers (torch wraps their traceback)
        status, err = run_cli(capsys, short_run(data, out, f"data.num_workers={workers}"))
        line = assert_one_error_line(err, "cannot decode ")
        assert status == 2 and "re-run data_scripts/prepare_kaggle.py" in line
        assert not out.exists()


def test_push_without_network_is_one_line_with_the_retry_command(prepared, tmp_path, capsys, monkeypatch):
    import httpx
    import huggingface_hub

    class NoNetworkApi:
        def create_repo(self, repo_id, **kwargs):
            raise httpx.ConnectError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(huggingface_hub, "HfApi", NoNetworkApi)
    out = tmp_path / "run"
    status, err = run_cli(capsys, short_run(prepared[0], out, "hub.push=true", "hub.repo_id=someone/tiny"))
    line = assert_one_error_line(err, f"could not push {out} to someone/tiny (ConnectError: ")
    assert status == 3 and line.endswith(f"retry with: mushroomclip push {out} --repo-id someone/tiny")
    assert (out / "adapter_model.safetensors").is_file() and (out / "README.md").is_file()  # the run is kept

    from mushroomclip.commands.push import main as push_main

    assert push_main([str(out), "--repo-id", "someone/tiny", "--private"]) == 2
    line = assert_one_error_line(capsys.readouterr().err, "could not push")
    assert line.endswith("--repo-id someone/tiny --private")


def test_resume_from_a_checkpoint_that_cannot_be_read_back_is_one_line(prepared, tmp_path, capsys):
    """A checkpoint whose trainer_state.json was written but whose weights or optimizer state were damaged
    afterwards (a disk error, a copy cut short) once made --resume end in a safetensors / zip traceback."""
    out = tmp_path / "run"
    assert run_cli(capsys, short_run(prepared[0], out))[0] == 0
    (out / "metrics.json").unlink()  # as if stopped after its last checkpoint
    checkpoint = out / "checkpoints" / "checkpoint-4"
    for name in ("adapter_model.safetensors", "optimizer.pt"):
        original = (checkpoint / name).read_bytes()
        (checkpoint / name).write_bytes(original[: len(original) // 2])
        status, err = run_cli(capsys, short_run(prepared[0], out, "--resume"))
        line = assert_one_error_line(err, f"--resume: {checkpoint} cannot be read back: {name} (")
        assert status == 2 and line.endswith("resume from the checkpoint before it, or start over with --overwrite")
        (checkpoint / name).write_bytes(original)
    assert run_cli(capsys, short_run(prepared[0], out, "--resume"))[0] == 0  # intact again: it resumes


def test_a_held_out_species_without_images_is_one_line(prepared, tmp_path, capsys):
    from mushroomclip.taxonomy import load_taxonomy

    absent = next(c for c in load_taxonomy().classes if not (prepared[0] / "train" / c).is_dir())
    status, err = run_cli(capsys, short_run(prepared[0], tmp_path / "run", f"data.holdout_species=[{absent}]"))
    assert status == 2 and not (tmp_path / "run").exists()
    assert_one_error_line(err, f"data.holdout_species: {absent}")
