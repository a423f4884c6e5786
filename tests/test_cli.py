"""The command-line tools as a user runs them: flags documented, summaries printed, errors in one line."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(*args, check=True):
    result = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(f"exit {result.returncode}\n{result.stdout}\n{result.stderr}")
    return result


@pytest.mark.parametrize("script", ["data_scripts/prepare_kaggle.py", "data_scripts/make_synthetic.py"])
def test_every_flag_is_in_help_and_docs(script):
    help_text = run(script, "--help").stdout
    flags = set(re.findall(r"--[a-z][a-z-]+", help_text)) - {"--help"}
    assert "--output" in flags and "--num-proc" in flags and "--taxonomy" in flags
    docs = (ROOT / "docs" / "data.md").read_text()
    assert not [f for f in flags if f not in docs], "flags missing from docs/data.md"


def test_synthetic_then_prepare_prints_the_summary(tmp_path):
    made = run(
        "data_scripts/make_synthetic.py",
        "--output",
        str(tmp_path / "dl"),
        "--classes",
        "3",
        "--per-class",
        "8",
        "--size",
        "16",
        "--corrupt",
        "1",
        "--num-proc",
        "1",
    )
    assert "wrote" in made.stdout
    result = run(
        "data_scripts/prepare_kaggle.py",
        "--source",
        str(tmp_path / "dl"),
        "--output",
        str(tmp_path / "out"),
        "--num-proc",
        "2",
        "--no-progress",
    )
    assert re.search(r"^total\s+\d+\s+3$", result.stdout, re.M)
    assert "skipped: 1 (corrupt_image 1)" in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--source", "/nonexistent/kaggle", "--output", "/tmp/x"],
            "error: source folder /nonexistent/kaggle does not exist",
        ),
        (
            ["--source", ".", "--output", "/tmp/x", "--taxonomy", "/nonexistent.csv"],
            "error: taxonomy file /nonexistent.csv does not exist",
        ),
    ],
)
@pytest.mark.parametrize("program", [["data_scripts/prepare_kaggle.py"], ["-m", "mushroomclip", "prepare"]])
def test_errors_are_one_clear_line(args, message, program):
    result = run(*program, *args, check=False)
    assert result.returncode == 2
    assert result.stderr.strip().startswith(message) and "Traceback" not in result.stderr


# python -m mushroomclip.hub push: what older notes and cards name
@pytest.mark.parametrize("program", [["-m", "mushroomclip", "push"], ["-m", "mushroomclip.hub", "push"]])
def test_push_of_an_unfinished_run_is_one_line(tmp_path, program):
    result = run(*program, str(tmp_path), "--repo-id", "someone/x", check=False)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith(f"error: {tmp_path} is not a finished run (missing adapter_config.json")
    assert result.stderr.count("\n") == 1


def test_python_m_convert_still_runs_the_convert_command():
    """README, configs and converted cards name ``python -m mushroomclip.models.convert``."""
    result = run("-m", "mushroomclip.models.convert", "--output", "out", check=False)
    assert result.returncode == 2 and "the following arguments are required: --model" in result.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["-m", "mushroomclip", "--help"],
        ["-m", "mushroomclip", "evaluate", "--list-models"],
        ["evaluate_zero_shot.py", "--list-models"],  # a top-level script
    ],
)
def test_a_reader_that_leaves_early_gets_no_traceback(args):
    """``mushroomclip --help | head -1``, ``python evaluate_zero_shot.py --list-models | head -1``: the pipe is
    closed before the command writes (deterministically here), even before its imports."""
    env = os.environ | {"WANDB_MODE": "offline"}
    process = subprocess.Popen(
        [sys.executable, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    process.stdout.close()  # the reader is gone before the command has imported anything
    stderr = process.stderr.read().decode()
    assert process.wait(timeout=120) == 1 and stderr == "", stderr


def test_stdout_holds_only_the_results_under_wandb_offline():
    """transformers prints "[INFO] Running in WANDB offline mode" when it loads its integrations: not into a
    program's stdout (a JSON, a table), nor beside a one-line error."""
    env = os.environ | {"WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "evaluate_zero_shot.py", "--list-models"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0 and result.stdout.lstrip().startswith("clip-b32"), result.stdout[:200]
    assert "WANDB" not in result.stderr
    # the library too, whatever its first import (the trainers load transformers.Trainer before anything of ours)
    code = "import mushroomclip.training.supervised"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout == "", result.stdout


def test_a_commands_results_record_the_command_as_typed(dirty_download, tmp_path):
    """``mushroomclip prepare ARGS``: the provenance says so (it said ``mushroomclip prepare prepare ARGS``)."""
    import json

    from mushroomclip import cli

    out = tmp_path / "prepared"
    args = ["--source", str(dirty_download[0]), "--output", str(out), "--num-proc", "1", "--no-progress"]
    assert cli.main(["prepare", *args]) == 0
    command = json.loads((out / "prepare_report.json").read_text())["provenance"]["command"]
    assert command == " ".join(["mushroomclip prepare", *args])
