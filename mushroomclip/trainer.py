"""LoRA fine-tuning of CLIP with a contrastive ``transformers.Trainer`` (under Accelerate, bf16 on GPU).

Evaluation uses the zero-shot head, class text embeddings from the *current* weights, so validation
numbers are directly comparable to the zero-shot table, and the best checkpoint is picked on mIoU.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import Trainer, TrainerCallback, TrainingArguments

from mushroomclip.augment import background_workers, normalize, pixel_stats, train_images
from mushroomclip.config import TrainConfig
from mushroomclip.losses import class_text_loss, clip_loss, multi_positive_loss
from mushroomclip.metrics import classification_metrics
from mushroomclip.prompts import class_prompts


class ContrastiveTrainer(Trainer):
    """Trainer whose loss is one of :mod:`mushroomclip.losses` and whose evaluation is zero-shot."""

    def __init__(self, *args, class_input_ids: torch.Tensor, loss_name: str, evaluator, pixel_stats=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.class_input_ids = class_input_ids
        # uint8 batches (mushroomclip.augment) are normalised here, on the device, with the model's mean/std.
        self.pixel_mean, self.pixel_std = (torch.tensor(v) for v in pixel_stats) if pixel_stats else (None, None)
        self.loss_name = loss_name
        self.evaluator = evaluator
        # No LoRA in the text tower (lora.towers: [vision]): its class embeddings never change, so they
        # are computed once instead of at every step.
        self.text_frozen = not any(
            p.requires_grad for n, p in self.model.named_parameters() if "text_model" in n or "text_projection" in n
        )
        self._class_text_embeds = None
        # Our losses are per-batch means: let Trainer divide by the accumulation steps, and never
        # rescale by token counts (CLIPModel.forward takes **kwargs, which would suggest otherwise).
        self.model_accepts_loss_kwargs = False

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        pixels, labels = inputs["pixel_values"], inputs["labels"]
        if pixels.dtype == torch.uint8:
            if self.pixel_mean is None:
                raise ValueError("uint8 pixel_values need ContrastiveTrainer(pixel_stats=(mean, std))")
            pixels = normalize(pixels, self.pixel_mean, self.pixel_std)
        ids = self.class_input_ids.to(pixels.device)
        base = self.accelerator.unwrap_model(model).get_base_model()
        if self.text_frozen:
            if self._class_text_embeds is None:
                with torch.no_grad():
                    features = base.get_text_features(input_ids=ids).pooler_output
                self._class_text_embeds = F.normalize(features.float(), dim=-1)
            # The forward still goes through the (DDP-wrapped) model so that gradient synchronisation is
            # exact; its text input is one prompt, whose embedding is not used.
            out = model(pixel_values=pixels, input_ids=ids[:1], return_dict=True)
            text = self._class_text_embeds if self.loss_name == "class_text" else self._class_text_embeds[labels]
        else:
            if self.loss_name != "class_text":
                ids = ids[labels]  # one prompt per image: the image's own class
            # One forward through the (DDP-wrapped) model, so gradient synchronisation is exact.
            out = model(pixel_values=pixels, input_ids=ids, return_dict=True)
            text = out.text_embeds.float()  # CLIPModel returns them normalised
        scale = base.logit_scale.exp()
        image = out.image_embeds.float()
        if self.loss_name == "class_text":
            loss = class_text_loss(image, text, labels, scale)
        elif self.loss_name == "clip":
            loss = clip_loss(image, text, scale)
        else:
            loss = multi_positive_loss(image, text, labels, scale)
        return (loss, out) if return_outputs else loss

    def get_train_dataloader(self):
        loader = super().get_train_dataloader()
        # Trainer's worker seeding first, then a lower CPU priority for decoding than for this process.
        loader.worker_init_fn = background_workers(loader.worker_init_fn)
        return loader

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """A checkpoint is the adapter (+ training args). ``save_embedding_layers=False``: LoRA never touches
        the embeddings, and peft's default asks the Hub for the base model's config at every save."""
        if not self.args.should_save:
            return
        output_dir = output_dir or self.args.output_dir
        os.makedirs(output_dir, exist_ok=True)
        model = self.accelerator.unwrap_model(self.model)
        model.save_pretrained(output_dir, state_dict=state_dict, save_embedding_layers=False)
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        metrics, _ = self.evaluator(self.model, eval_dataset if eval_dataset is not None else self.eval_dataset)
        scalars = {
            f"{metric_key_prefix}_{k}": v for k, v in metrics.items() if isinstance(v, (int, float)) and v is not None
        }
        self.log(scalars)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, scalars)
        return scalars


class ZeroShotEvaluator:
    """Scores a split with the model's current text tower as the classifier head."""

    def __init__(self, backbone, taxonomy, text_type: str, templates: list[str], batch_size: int, num_workers: int,
                 precision: str = "fp32"):  # fmt: skip
        self.backbone, self.taxonomy = backbone, taxonomy
        self.prompts = class_prompts(taxonomy, text_type, templates)
        self.batch_size, self.num_workers = batch_size, num_workers
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)  # the training's

    @torch.inference_mode()
    def __call__(self, model, split) -> tuple[dict, np.ndarray]:
        from mushroomclip.features import image_features
        from mushroomclip.prompts import class_text_embeddings

        was_training = model.training
        model.eval()
        self.backbone.model = model
        self.backbone.device = next(model.parameters()).device
        autocast = (
            torch.autocast(self.backbone.device.type, dtype=self.autocast_dtype)
            if self.autocast_dtype is not None
            else contextlib.nullcontext()
        )
        with autocast:
            class_emb = class_text_embeddings(self.backbone, self.prompts)
            one_bar = int(os.environ.get("RANK", "0")) == 0  # a progress bar from rank 0, not one per rank
            feats, labels = image_features(self.backbone, split, self.batch_size, self.num_workers, "eval", one_bar)
        scale = model.get_base_model().logit_scale.exp().item()
        scores = scale * feats @ class_emb.numpy().T
        model.train(was_training)
        return classification_metrics(labels, scores, len(self.taxonomy), taxonomy=self.taxonomy), scores


class LossHistory(TrainerCallback):
    """Keeps (step, loss) and (step, eval mIoU) for the loss-curve plot."""

    def __init__(self):
        self.train, self.eval = [], []

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if "loss" in logs:
            self.train.append((state.global_step, logs["loss"]))
        if "eval_miou" in logs:
            self.eval.append((state.global_step, logs["eval_miou"]))


def on_cpu() -> bool:
    """CPU training: no CUDA, or ``accelerate launch --cpu``."""
    return not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("true", "1")


def resolve_precision(requested: str, cpu: bool, bf16_supported: bool, accelerate_setting: str | None) -> str:
    """``fp32``, ``bf16`` or ``fp16`` for this run.

    ``auto``: fp32 on the CPU; on a GPU the accelerate config's ``mixed_precision`` when it names one
    (``accelerate launch --config_file accelerate_config.yaml`` -> bf16), else bf16 where the GPU has it
    and fp16 on older GPUs. (accelerate's ``no`` is also its default without a config, so it is not
    taken as a choice.) An explicit ``training.precision`` wins over all of this.
    """
    from mushroomclip.config import ConfigError

    if requested == "auto":
        if cpu:
            return "fp32"
        requested = (
            accelerate_setting if accelerate_setting in ("bf16", "fp16") else "bf16" if bf16_supported else "fp16"
        )
    if requested == "bf16" and not cpu and not bf16_supported:
        raise ConfigError(
            "training.precision=bf16 but this GPU has no bf16 support; use training.precision=fp16 or fp32"
        )
    if requested == "fp16" and cpu:
        raise ConfigError("training.precision=fp16 needs a GPU; on the CPU use training.precision=fp32 (or bf16)")
    return requested


def training_arguments(cfg: TrainConfig, checkpoints: Path, steps_per_epoch: int) -> TrainingArguments:
    t = cfg.training
    cpu = on_cpu()
    precision = resolve_precision(t.precision, cpu, not cpu and torch.cuda.is_bf16_supported(),
                                  os.environ.get("ACCELERATE_MIXED_PRECISION"))  # fmt: skip
    # TrainingArguments starts from this variable and only bf16/fp16=True override it, so an explicit
    # fp32 under a bf16 accelerate config would otherwise stay bf16.
    os.environ["ACCELERATE_MIXED_PRECISION"] = "no" if precision == "fp32" else precision
    optim = t.optim
    if optim == "auto":
        import importlib.util

        optim = (
            "adamw_bnb_8bit"
            if torch.cuda.is_available() and importlib.util.find_spec("bitsandbytes")
            else "adamw_torch"
        )
    eval_steps = t.eval_steps or max(1, steps_per_epoch)
    return TrainingArguments(
        output_dir=str(checkpoints), seed=t.seed, data_seed=t.seed,
        num_train_epochs=t.epochs, max_steps=t.max_steps,
        per_device_train_batch_size=t.batch_size, per_device_eval_batch_size=t.eval_batch_size,
        gradient_accumulation_steps=t.grad_accum, learning_rate=t.lr, weight_decay=t.weight_decay,
        lr_scheduler_type="cosine", warmup_steps=math.ceil(t.warmup_ratio * _total_steps(cfg, steps_per_epoch)), optim=optim,
        bf16=precision == "bf16", fp16=precision == "fp16", use_cpu=cpu,
        eval_strategy="steps", eval_steps=eval_steps, save_strategy="steps", save_steps=t.save_steps or eval_steps,
        save_total_limit=t.save_total_limit, load_best_model_at_end=True, metric_for_best_model="miou",
        greater_is_better=True, logging_steps=t.logging_steps, report_to=[] if t.report_to == "none" else [t.report_to],
        remove_unused_columns=False, label_names=["labels"], dataloader_num_workers=cfg.data.num_workers,
        dataloader_persistent_workers=cfg.data.num_workers > 0, ddp_find_unused_parameters=False,
        disable_tqdm=False,
    )  # fmt: skip


def _total_steps(cfg: TrainConfig, steps_per_epoch: int) -> int:
    t = cfg.training
    return t.max_steps if t.max_steps > 0 else math.ceil(t.epochs * steps_per_epoch)


def collate(batch: list[dict]) -> dict[str, torch.Tensor]:
    return {
        "pixel_values": torch.stack([b["pixel_values"] for b in batch]),
        "labels": torch.tensor([b["labels"] for b in batch]),
    }


def run_summary(cfg: TrainConfig, history: LossHistory, best: dict, test: dict | None, precision: str) -> str:
    def pct(m, k):
        return "n/a" if not m or m.get(k) is None else f"{100 * m[k]:.1f}"

    lines = [
        f"run {cfg.training.output_dir}: {cfg.model.base} + LoRA r={cfg.lora.r}, loss {cfg.loss.name}, {precision}"
    ]
    if history.train:
        lines.append(
            f"train loss {history.train[0][1]:.3f} -> {history.train[-1][1]:.3f} over {history.train[-1][0]} steps"
        )
    lines.append(f"best validation mIoU {pct(best, 'miou')} (OA {pct(best, 'oa')}, mF1 {pct(best, 'mf1')})")
    if test:
        lines.append(
            f"test: OA {pct(test, 'oa')}  top-5 {pct(test, 'top5')}  mF1 {pct(test, 'mf1')}  mIoU {pct(test, 'miou')}"
        )
    return "\n".join(lines)


def save_json(path: Path, value) -> None:
    from mushroomclip.metrics import to_jsonable

    path.write_text(json.dumps(to_jsonable(value), indent=2))


def _plot_losses(history: LossHistory, path: Path) -> None:
    from mushroomclip.plots import _pyplot

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if history.train:
        ax.plot(*zip(*history.train), label="train loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    if history.eval:
        twin = ax.twinx()
        twin.plot(*zip(*history.eval), "o-", color="#bc4749", label="validation mIoU")
        twin.set_ylabel("validation mIoU")
        twin.set_ylim(0, 1)
    fig.legend(loc="upper center", bbox_to_anchor=(0.45, 0.93), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def last_complete_checkpoint(folder: Path, log=print) -> str | None:
    """The newest checkpoint that was fully written; interrupted ones are removed (by rank 0).

    Trainer writes ``trainer_state.json`` last, so a checkpoint without it was cut off mid-save, and
    resuming from it (what ``get_last_checkpoint`` would pick) would crash.
    """
    import shutil

    if not folder.is_dir():
        return None
    complete = []
    for path in folder.glob("checkpoint-*"):
        if (path / "trainer_state.json").is_file():
            complete.append(path)
        elif int(os.environ.get("RANK", "0")) == 0:
            log(f"removing {path}: interrupted while it was being saved")
            shutil.rmtree(path, ignore_errors=True)
    return str(max(complete, key=lambda p: int(p.name.split("-")[1]))) if complete else None


def run_training(cfg: TrainConfig, log=print) -> dict:
    """Train, pick the best checkpoint on validation mIoU, test it, and write the run folder (rank 0)."""
    import yaml
    from transformers import set_seed

    from mushroomclip.data import load_splits, prepared_taxonomy
    from mushroomclip.hub import model_card, push_run
    from mushroomclip.lora import CLASSES_FILE, add_lora, backbone_name, classes_record
    from mushroomclip.models import load_backbone
    from mushroomclip.plots import save_confusion_png
    from mushroomclip.prompts import templates_for
    from mushroomclip.provenance import run_provenance

    # The base model first: without network this is the error a user should see, before any data work.
    backbone = load_backbone(backbone_name(cfg.model.base), random_weights=cfg.model.random_weights)
    set_seed(cfg.training.seed)  # LoRA initialisation, augmentation and data order follow the run's seed
    taxonomy = prepared_taxonomy(cfg.data.path)
    splits = load_splits(cfg.data.path)
    lora = cfg.lora
    model = add_lora(
        backbone.model, lora.r, lora.alpha, lora.dropout, lora.towers, lora.target_modules, lora.train_logit_scale
    )
    model.peft_config["default"].base_model_name_or_path = cfg.model.base
    backbone.model = model
    class_ids = backbone.tokenize([p for [p] in class_prompts(taxonomy, cfg.data.text_type, [cfg.data.train_template])])
    train = train_images(splits["train"], backbone.preprocess)  # uint8, normalised on the device
    run_dir = Path(cfg.training.output_dir)
    checkpoints = run_dir / "checkpoints"
    world = int(os.environ.get("WORLD_SIZE", "1"))
    steps_per_epoch = math.ceil(len(train) / (cfg.training.batch_size * world * cfg.training.grad_accum))
    args = training_arguments(cfg, checkpoints, steps_per_epoch)
    precision = "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32"
    templates = templates_for(cfg.data.eval_templates)
    evaluator = ZeroShotEvaluator(backbone, taxonomy, cfg.data.text_type, templates, cfg.training.eval_batch_size,
                                  cfg.data.num_workers, precision)  # fmt: skip
    history = LossHistory()
    trainer = ContrastiveTrainer(
        model=model, args=args, train_dataset=train,
        eval_dataset=splits["validation"], data_collator=collate, callbacks=[history],
        class_input_ids=class_ids, loss_name=cfg.loss.name, evaluator=evaluator,
        pixel_stats=pixel_stats(backbone.preprocess),
    )  # fmt: skip
    resume = last_complete_checkpoint(checkpoints, log) if cfg.training.resume else None
    if cfg.training.resume and resume is None:
        log(f"training.resume: no checkpoint in {checkpoints}, starting from scratch")
    baseline_val, _ = (None, None) if resume else evaluator(model, splits["validation"])
    baseline_test, _ = evaluator(model, splits["test"]) if (cfg.training.test_after and not resume) else (None, None)
    trainer.train(resume_from_checkpoint=resume)
    best, _ = evaluator(trainer.model, splits["validation"])
    test, test_scores = evaluator(trainer.model, splits["test"]) if cfg.training.test_after else (None, None)
    lora_sum = sum(p.detach().double().sum().item() for n, p in trainer.model.named_parameters() if "lora_" in n)
    log(f"[rank {trainer.args.process_index}] step {trainer.state.global_step} lora-checksum {lora_sum:.8f} "
        f"val-miou {best['miou']:.6f}")  # fmt: skip
    result = {"validation_best": best, "test": test, "validation_untrained": baseline_val, "test_untrained": baseline_test,
              "global_step": trainer.state.global_step, "best_checkpoint": trainer.state.best_model_checkpoint,
              "model": trainer.model}  # fmt: skip
    if trainer.is_world_process_zero():
        run_dir.mkdir(parents=True, exist_ok=True)
        trainer.model.save_pretrained(str(run_dir), save_embedding_layers=False)  # LoRA never touches them
        scale = trainer.model.get_base_model().logit_scale.exp().item() if lora.train_logit_scale else None
        save_json(
            run_dir / CLASSES_FILE, classes_record(taxonomy, cfg.data.text_type, templates, cfg.model.base, scale)
        )
        (run_dir / "taxonomy.csv").write_bytes(taxonomy.raw)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        keep = (
            "oa",
            "top5",
            "balanced_acc",
            "mf1",
            "miou",
            "rank_accuracy",
            "mistake_severity",
            "dangerous_as_edible",
            "deadly_recall",
        )
        record = {name: ({k: m.get(k) for k in keep} if m else None) for name, m in
                  (("validation_best", best), ("test", test), ("validation_untrained", baseline_val), ("test_untrained", baseline_test))}  # fmt: skip
        record |= {
            "global_step": trainer.state.global_step,
            "precision": precision,
            "processes": trainer.args.world_size,
            "loss_history": history.train,
            "eval_history": history.eval,
        }
        save_json(run_dir / "metrics.json", record | run_provenance(cfg.to_dict(), cfg.training.seed))
        _plot_losses(history, run_dir / "loss_curve.png")
        if test is not None:
            save_confusion_png(
                test["confusion"], taxonomy, run_dir / "confusion.png", title=f"{run_dir.name} test confusion"
            )
        model_card(run_dir).save(run_dir / "README.md")
        log(run_summary(cfg, history, best, test, precision))
        if cfg.hub.push:
            url = push_run(run_dir, cfg.hub.repo_id, private=cfg.hub.private)
            log(f"pushed to {url}")
    return result
