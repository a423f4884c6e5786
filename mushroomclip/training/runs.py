"""A training run's folder: what training writes there, when it may write, and what the data was.

A folder holds one run. Training refuses a folder that holds a finished run unless it is explicitly
started over (``--overwrite``, which removes only the files training writes), and one with the
checkpoints of an unfinished run unless it is continued (``--resume``, same config) or started over.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import yaml
from accelerate import PartialState
from safetensors import safe_open

from mushroomclip.data.holdout import HOLDOUT_FILE
from mushroomclip.data.imbalance import IMBALANCE_FILE
from mushroomclip.data.splits import REPORT_NAME
from mushroomclip.metrics import metrics_by_training_count, save_json
from mushroomclip.models.classifier import run_model_files

if TYPE_CHECKING:
    from transformers import Trainer

    from mushroomclip.config import TrainConfig

logger = logging.getLogger(__name__)  # messages from the main process only (the callers check)

TRAINING_COUNT_PNG = "accuracy_by_training_count.png"
# Everything training writes at the top of a run folder (checkpoints/ aside), with its model's two files
# (classifier.run_model_files: the adapter, or a classifier's config and weights); a push uploads them all.
OUTPUTS = (
    "classes.json",
    "taxonomy.csv",
    "config.yaml",
    "data.json",
    "metrics.json",
    "README.md",
    "loss_curve.png",
    "risk_coverage.png",
    "confusion.png",
    "open_set_roc.png",
    TRAINING_COUNT_PNG,
    HOLDOUT_FILE,
    IMBALANCE_FILE,
)
CHECKPOINTS = "checkpoints"
CHECKPOINT_CONFIG = "run_config.yaml"  # the run's resolved config, saved in every checkpoint
UNTRAINED_METRICS = "untrained_metrics.json"  # the evaluation before training, saved in every checkpoint
SUMMARY_KEYS = (
    "oa",
    "top5",
    "balanced_acc",
    "mf1",
    "miou",
    "rank_accuracy",
    "mistake_severity",
    "mistake_lca_depth",
    "hierarchical_distance_top_k",  # Bertinetto et al. 2020's average distance of the top-1/5/20
    "dangerous_as_edible",
    "deadly_recall",
)
# Keys that change where and how a run is executed or published, not what it computes: they may differ on
# --resume (a checkpoint copied to another folder continues there).
EXECUTION_KEYS = {
    "training": (
        "output_dir",
        "report_to",
        "per_device_eval_batch_size",
        "activation_checkpointing",
        "gradient_checkpointing",
        "use_cpu",
        "dataloader_num_workers",
        "dataloader_persistent_workers",
    ),
    "data": ("num_workers",),
    "run": ("resume", "overwrite"),
    "hub": ("push", "repo_id", "private"),
}
UNSET = "unset"  # how a key that one config sets and the other does not is shown


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


def _recorded_config(checkpoint: Path) -> dict | None:
    path = checkpoint / CHECKPOINT_CONFIG
    return yaml.safe_load(path.read_text()) if path.is_file() else None


def _differences(old: dict, new: dict) -> list[str]:
    """``section.key: old -> new`` for every key that differs, also one that only one of them sets."""
    old, new = _comparable(old), _comparable(new)
    changed = []
    for section in dict.fromkeys([*new, *old]):
        before, after = old.get(section, {}), new.get(section, {})
        for key in dict.fromkeys([*after, *before]):
            if before.get(key, UNSET) != after.get(key, UNSET):
                changed.append(f"{section}.{key}: {before.get(key, UNSET)!r} -> {after.get(key, UNSET)!r}")
    return changed


def check_run_folder(run_dir: str | Path, config: dict, resume: bool, overwrite: bool) -> None:
    """Refuse to train into a folder holding a run, unless resuming that same run or told to overwrite it."""
    run_dir = Path(run_dir)
    finished = (run_dir / "metrics.json").is_file()
    checkpoints = _checkpoints(run_dir)
    if overwrite or not (finished or checkpoints):
        return
    if finished:
        raise RunFolderError(
            f"{run_dir} holds a finished run; start it over with --overwrite (deletes its "
            "checkpoints and results) or set training.output_dir"
        )
    complete = [c for c in checkpoints if (c / "trainer_state.json").is_file()]  # Trainer writes it last
    where = f"{run_dir} holds a run stopped at {(complete or checkpoints)[-1].name}"
    if not resume:
        raise RunFolderError(
            f"{where}; continue it with --resume, start it over with --overwrite "
            "(deletes its checkpoints and results), or set training.output_dir"
        )
    if not complete:
        return  # only checkpoints cut off while saving: --resume removes them and starts from scratch
    recorded = _recorded_config(complete[-1])
    changed = _differences(recorded, config) if recorded is not None else ["its config is not recorded"]
    if changed:
        raise RunFolderError(
            f"{where} with another config ({'; '.join(changed[:3])}); --resume continues only the "
            "same run: use --overwrite to start over, or another training.output_dir"
        )


def clear_run_outputs(run_dir: str | Path) -> None:
    """Delete what training wrote into ``run_dir`` (results and checkpoints); any other file stays."""
    run_dir = Path(run_dir)
    names = (*run_model_files(run_dir), *OUTPUTS)  # a model file of another kind of run is not ours: it stays
    removed = [run_dir / name for name in names if (run_dir / name).is_file()] + _checkpoints(run_dir)
    for path in removed:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    remove_empty_dirs(run_dir / CHECKPOINTS)
    if removed:
        logger.info(f"--overwrite: removed the earlier run's results and checkpoints from {run_dir}")


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
    """The one-line message of an :class:`mushroomclip.data.transforms.ImageError`, also when a DataLoader worker
    raised it (torch re-raises it with the worker's traceback before the message); None for any other error."""
    from mushroomclip.data.transforms import ImageError

    if not isinstance(err, ImageError):
        return None
    return re.sub(r"^[\w.]*ImageError: ", "", str(err).strip().splitlines()[-1])


def describe_data(
    data_path: str | Path, images: dict[str, int], trained_species: list[str], imbalance: dict | None = None
) -> dict:
    """``data.json``: the data a run actually used, with the prepared folder's own report where it has one, and
    the long-tail subsampling of its training split (``imbalance``: a :meth:`Imbalance.record`) in short."""
    report_path = Path(data_path) / REPORT_NAME
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
        "imbalance": {k: imbalance[k] for k in ("profile", "ratio", "seed", "images_before", "ratio_used")}
        if imbalance
        else None,
    }


def history_from_log(log_history: list[dict]) -> tuple[list, list]:
    """``(step, train loss)`` and ``(step, validation mIoU)`` of the whole run, from Trainer's log history
    (which a checkpoint carries, so a resumed run keeps the history from before the interruption)."""
    train = [(e["step"], e["loss"]) for e in log_history if "loss" in e]
    evals = [(e["step"], e["eval_miou"]) for e in log_history if "eval_miou" in e]
    return train, evals


def last_complete_checkpoint(folder: Path) -> str | None:
    """The newest checkpoint that was fully written; interrupted ones are removed (by rank 0).

    Trainer writes ``trainer_state.json`` last, so a checkpoint without it was cut off mid-save, and
    resuming from it (what ``get_last_checkpoint`` would pick) would crash.
    """
    if not folder.is_dir():
        return None
    complete = []
    for path in folder.glob("checkpoint-*"):
        if (path / "trainer_state.json").is_file():
            complete.append(path)
        elif PartialState().is_main_process:
            logger.info(f"removing {path}: interrupted while it was being saved")
            shutil.rmtree(path, ignore_errors=True)
    return str(max(complete, key=lambda p: int(p.name.split("-")[1]))) if complete else None


def unreadable_checkpoint_file(checkpoint: Path) -> str | None:
    """The first file of a complete checkpoint that cannot be read back, with why (a disk error, a copy cut
    short); None when every one reads. Weights (safetensors headers against the file's size), torch's zip
    archives (optimizer, scheduler, random states: every member's CRC) and JSON files are checked."""
    for path in sorted(p for p in checkpoint.rglob("*") if p.is_file()):
        try:
            if path.suffix == ".safetensors":
                with safe_open(path, "pt"):
                    pass
            elif path.suffix in (".pt", ".pth", ".bin"):
                with zipfile.ZipFile(path) as archive:
                    if (member := archive.testzip()) is not None:
                        raise ValueError(f"{member} fails its checksum")
            elif path.suffix == ".json":
                json.loads(path.read_text())
        except Exception as err:  # noqa: BLE001 - any failure to read it back is the answer
            return f"{path.relative_to(checkpoint)} ({' '.join(f'{type(err).__name__}: {err}'.split())})"
    return None


def metrics_summary(metrics: dict | None) -> dict | None:
    """The figures of a metrics dict that metrics.json and the card keep."""
    return {k: metrics.get(k) for k in SUMMARY_KEYS} if metrics else None


def write_run_folder(
    run_dir: Path,
    cfg: TrainConfig,
    result: dict,
    trainer: Trainer,
    taxonomy,
    templates: list[str],
    precision: str,
    splits,
    base: dict,
) -> None:
    """Adapter (or a classifier's weights), classes.json, taxonomy, resolved config, data.json, metrics.json,
    figures and model card; ``splits`` are the data's splits and ``base`` the run's
    :func:`mushroomclip.models.classifier.base_record` (a supervised run's whole classes.json record)."""
    from mushroomclip.evaluation.openset import summary_line
    from mushroomclip.evaluation.plots import (
        save_accuracy_by_training_count_png,
        save_confusion_png,
        save_loss_curve,
        save_open_set_roc_png,
        save_risk_coverage_png,
    )
    from mushroomclip.hub import model_card
    from mushroomclip.models.classifier import CLASSES_FILE, classes_record
    from mushroomclip.provenance import run_provenance

    model = trainer.model
    trained_species = sorted({taxonomy.classes[i] for i in splits["train"]["label"]})
    images = {name: len(split) for name, split in splits.items()}
    run_dir.mkdir(parents=True, exist_ok=True)
    # the adapter (peft: LoRA never touches the embeddings), or a fully fine-tuned classifier's config + weights
    model.save_pretrained(str(run_dir), save_embedding_layers=False)
    if cfg.model.type == "supervised":
        record = base  # mushroomclip.models.supervised.supervised_record
    else:
        scale = model.get_base_model().logit_scale.exp().item() if cfg.lora.train_logit_scale else None
        record = classes_record(taxonomy, cfg.data.text_type, templates, base, scale)
    save_json(run_dir / CLASSES_FILE, record | {"trained_species": trained_species})
    (run_dir / "taxonomy.csv").write_bytes(taxonomy.raw)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    imbalance = result["imbalance"].record() if result.get("imbalance") is not None else None
    save_json(run_dir / "data.json", describe_data(cfg.data.path, images, trained_species, imbalance))
    if result.get("holdout") is not None:  # the species the run never saw: the open-set "unknown" test images
        save_json(run_dir / HOLDOUT_FILE, result["holdout"].record())
    if imbalance is not None:  # the long tail the run trained on: per species, images available, asked, kept
        save_json(run_dir / IMBALANCE_FILE, imbalance)
    train_counts = np.bincount(np.asarray(splits["train"]["label"], dtype=np.int64), minlength=len(taxonomy))
    splits = ("validation_best", "test", "validation_untrained", "test_untrained")
    record = {name: metrics_summary(result[name]) for name in splits}
    for name in ("validation_best", "test"):  # head / medium / tail thirds of the species by training images
        if result[name] is not None:
            groups = metrics_by_training_count(result[name]["confusion"], train_counts)
            record[name]["by_training_count"] = result[name]["by_training_count"] = groups  # run_summary says them
    train_losses, eval_mious = history_from_log(trainer.state.log_history)
    record |= {
        "global_step": trainer.state.global_step,
        "precision": precision,
        "processes": trainer.args.world_size,
        "loss_history": train_losses,
        "eval_history": eval_mious,
    }
    if result.get("selective") is not None:  # read back by predict.py and the app (prediction.answer.run_thresholds)
        curve, chosen = result["selective"]
        record["thresholds"] = chosen.record()
        save_risk_coverage_png(curve, run_dir / "risk_coverage.png", chosen, title=f"{run_dir.name} validation")
        logger.info(chosen.summary())
    if result.get("unknown_threshold") is not None:  # read back by predict.py and the app
        record.setdefault("thresholds", {})["unknown"] = result["unknown_threshold"]
    if (open_set := result.get("open_set")) is not None:
        record["open_set"] = {k: v for k, v in open_set.items() if k != "scores"}
        save_open_set_roc_png(open_set["scores"], run_dir / "open_set_roc.png", title=f"{run_dir.name} open set (test)")
        logger.info(summary_line(open_set["metrics"], open_set["unknown_images"], open_set["known_images"]))
    save_json(run_dir / "metrics.json", record | run_provenance(cfg.to_dict(), cfg.training.seed))
    save_loss_curve(train_losses, eval_mious, run_dir / "loss_curve.png")
    if result["test"] is not None:
        title = f"{run_dir.name} test confusion"
        save_confusion_png(result["test"]["confusion"], taxonomy, run_dir / "confusion.png", title=title)
    evaluated = "test" if result["test"] is not None else "validation"
    save_accuracy_by_training_count_png(
        (result["test"] or result["validation_best"])["confusion"],
        train_counts,
        run_dir / TRAINING_COUNT_PNG,
        title=f"{run_dir.name}: {evaluated} accuracy per species against training images",
    )
    model_card(run_dir).save(run_dir / "README.md")


def publish(run_dir: Path, repo_id: str, private: bool) -> str | None:
    """Push a written run; a failed push is reported in one line (returned) and the run stays as it is."""
    from mushroomclip.hub import PushError, push_run

    try:
        logger.info(f"pushed to {push_run(run_dir, repo_id, private=private)}")
    except PushError as err:
        return str(err)
    return None
