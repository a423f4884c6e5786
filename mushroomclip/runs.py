"""A training run's folder: what training writes there, when it may write, and what the data was.

A folder holds one run. Training refuses a folder that already holds a run (finished, or with
checkpoints) unless it is continued (``--resume``, same config) or explicitly started over
(``--overwrite``, which removes only the files training writes).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import yaml

# Everything training writes at the top of a run folder (checkpoints/ aside); hub.UPLOAD is a subset.
OUTPUTS = ("adapter_config.json", "adapter_model.safetensors", "classes.json", "taxonomy.csv", "config.yaml",
           "data.json", "metrics.json", "README.md", "loss_curve.png", "confusion.png")  # fmt: skip
CHECKPOINTS = "checkpoints"
CHECKPOINT_CONFIG = "run_config.yaml"  # the run's resolved config, saved in every checkpoint
# Keys that change where and how a run is executed or published, not what it computes: they may differ on
# --resume (a checkpoint copied to another folder continues there).
EXECUTION_KEYS = {"training": ("output_dir", "resume", "overwrite", "report_to", "eval_batch_size"), "data": ("num_workers",),
                  "hub": ("push", "repo_id", "private")}  # fmt: skip


class RunFolderError(ValueError):
    """The output folder holds another run, or a run that this command would silently overwrite."""


class TrainingDivergedError(RuntimeError):
    """The loss or the gradients became NaN or infinite."""


class DataReadError(ValueError):
    """An image of the prepared data can no longer be read (moved, deleted, truncated after preparation)."""


def _comparable(config: dict) -> dict:
    """``config`` without the keys that may change between a run and its resumption."""
    return {
        section: {k: v for k, v in body.items() if k not in EXECUTION_KEYS.get(section, ())}
        for section, body in config.items()
    }


def _checkpoints(run_dir: Path) -> list[Path]:
    folder = run_dir / CHECKPOINTS
    return sorted(folder.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1])) if folder.is_dir() else []


def _recorded_config(run_dir: Path) -> dict | None:
    """The config of the run already in ``run_dir``: its final config.yaml, else its newest checkpoint's."""
    for path in [run_dir / "config.yaml", *(p / CHECKPOINT_CONFIG for p in reversed(_checkpoints(run_dir)))]:
        if path.is_file():
            return yaml.safe_load(path.read_text())
    return None


def _differences(old: dict, new: dict) -> list[str]:
    old, new = _comparable(old), _comparable(new)
    return [
        f"{section}.{key}: {old.get(section, {}).get(key)!r} -> {value!r}"
        for section, body in new.items()
        for key, value in body.items()
        if old.get(section, {}).get(key) != value
    ]


def check_run_folder(run_dir: str | Path, config: dict, resume: bool, overwrite: bool) -> None:
    """Refuse to train into a folder holding a run, unless resuming that same run or told to overwrite it."""
    run_dir = Path(run_dir)
    finished = (run_dir / "metrics.json").is_file()
    checkpoints = _checkpoints(run_dir)
    if overwrite or not (finished or checkpoints):
        return
    where = f"{run_dir} holds a {'finished run' if finished else f'run stopped at {checkpoints[-1].name}'}"
    if not resume:
        raise RunFolderError(f"{where}; continue it with --resume, start it over with --overwrite "
                             "(deletes its checkpoints and results), or set training.output_dir")  # fmt: skip
    recorded = _recorded_config(run_dir)
    changed = _differences(recorded, config) if recorded is not None else ["its config is not recorded"]
    if changed:
        raise RunFolderError(f"{where} with another config ({'; '.join(changed[:3])}); --resume continues only the "
                             "same run: use --overwrite to start over, or another training.output_dir")  # fmt: skip


def clear_run_outputs(run_dir: str | Path, log=print) -> None:
    """Delete what training wrote into ``run_dir`` (results and checkpoints); any other file stays."""
    run_dir = Path(run_dir)
    removed = [name for name in OUTPUTS if (run_dir / name).is_file()]
    for name in removed:
        (run_dir / name).unlink()
    for checkpoint in _checkpoints(run_dir):
        shutil.rmtree(checkpoint)
    remove_empty_dirs(run_dir / CHECKPOINTS)
    if removed:
        log(f"--overwrite: removed the earlier run's results and checkpoints from {run_dir}")


def remove_empty_dirs(folder: str | Path) -> None:
    """Remove ``folder`` and its subfolders where they hold no file at all; never a file."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    for sub in sorted((p for p in folder.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        if not any(sub.iterdir()):
            sub.rmdir()
    if not any(folder.iterdir()):
        folder.rmdir()


def unreadable_image(err: BaseException) -> str | None:
    """The one-line message of :func:`mushroomclip.augment.decode_rgb` inside ``err``, also when a DataLoader
    worker raised it (torch then wraps it in the worker's traceback); None for any other error."""
    if not isinstance(err, ValueError):
        return None
    for line in reversed(str(err).splitlines()):
        message = line.removeprefix("ValueError: ")
        if message.startswith(("cannot read ", "cannot decode ")):
            return message
    return None


def describe_data(data_path: str | Path, images: dict[str, int], trained_species: list[str]) -> dict:
    """``data.json``: the data a run actually used, with the prepared folder's own report where it has one."""
    report_path = Path(data_path) / "prepare_report.json"
    report = json.loads(report_path.read_text()) if report_path.is_file() else None
    summary = None
    if report is not None:
        summary = {k: report.get(k) for k in ("images", "classes", "skipped", "duplicates_removed")}
    return {
        "path": str(data_path),
        "split": report.get("split") if report else None,
        "source": report.get("source") if report else None,
        "num_species": len(trained_species),
        "images": images,
        "report": summary,
    }
