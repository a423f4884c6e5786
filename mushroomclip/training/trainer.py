"""LoRA fine-tuning of CLIP with a contrastive ``transformers.Trainer`` (under Accelerate, bf16 on GPU).

Evaluation uses the zero-shot head, class text embeddings from the *current* weights, so validation
numbers are directly comparable to the zero-shot table, and the best checkpoint is picked on mIoU.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from accelerate import PartialState
from datasets import DatasetDict
from scipy.special import softmax
from transformers import ProgressCallback, Trainer, TrainingArguments, set_seed

from mushroomclip.config import ConfigError, RunArguments, TrainConfig, describe_loss
from mushroomclip.data.holdout import Holdout, apply_holdout
from mushroomclip.data.imbalance import Imbalance, apply_imbalance
from mushroomclip.data.splits import load_splits, prepared_taxonomy
from mushroomclip.data.transforms import background_workers, normalize, pixel_stats, train_images
from mushroomclip.evaluation.features import PreprocessedImages
from mushroomclip.evaluation.openset import DEFAULT_TPR, OpenSetScores, open_set_metrics, unknown_threshold
from mushroomclip.evaluation.selective import choose_on_validation
from mushroomclip.metrics import classification_metrics, save_json
from mushroomclip.models.backbones import load_backbone
from mushroomclip.models.classifier import backbone_name, base_record
from mushroomclip.models.lora import add_lora
from mushroomclip.models.prompts import class_prompts, class_text_embeddings, templates_for
from mushroomclip.taxonomy import Taxonomy, load_taxonomy
from mushroomclip.training.collectives import gather_batch
from mushroomclip.training.losses import PAIRED_LOSSES, LossInputs, loss_context, training_loss
from mushroomclip.training.runs import (
    CHECKPOINT_CONFIG,
    CHECKPOINTS,
    UNTRAINED_METRICS,
    DataReadError,
    RunFolderError,
    TrainingDivergedError,
    check_run_folder,
    clear_run_outputs,
    history_from_log,
    last_complete_checkpoint,
    metrics_summary,
    publish,
    remove_empty_dirs,
    unreadable_checkpoint_file,
    unreadable_image,
    write_run_folder,
)

logger = logging.getLogger(__name__)  # progress lines come from the main process only (the callers check)


class ContrastiveTrainer(Trainer):
    """Trainer whose loss is one of :mod:`mushroomclip.training.losses` and whose evaluation is zero-shot."""

    def __init__(
        self,
        *args,
        class_input_ids: torch.Tensor,
        loss_name: str,
        evaluator,
        pixel_stats=None,
        run_config: dict | None = None,
        loss_context: dict | None = None,
        train_weights: np.ndarray | None = None,
        **kwargs,
    ):
        if kwargs.get("train_dataset") is not None:  # drawn through SeededDrawSampler: see _get_train_sampler
            kwargs["train_dataset"] = SeededDraws(kwargs["train_dataset"])
        self.train_weights = train_weights  # SeededDrawSampler's per-image draw weights (None: a permutation)
        super().__init__(*args, **kwargs)
        self.run_config = run_config  # saved in every checkpoint: --resume checks it is the same run
        self.untrained: dict | None = None  # the evaluation before training, also saved in every checkpoint
        self.class_input_ids = class_input_ids
        # uint8 batches (mushroomclip.data.transforms) are normalised here, on the device, with the model's mean/std.
        self.pixel_mean, self.pixel_std = (torch.tensor(v) for v in pixel_stats) if pixel_stats else (None, None)
        self.loss_name = loss_name
        self.loss_context = loss_context or {}  # LossInputs.context: what a loss needs beyond the batch
        self.evaluator = evaluator
        if evaluator is not None:
            self.compute_metrics = self.scalar_metrics
        # No LoRA in the text tower (lora.towers: [vision]): its class embeddings never change, so they
        # are computed once instead of at every step.
        self.text_frozen = not any(
            p.requires_grad for n, p in self.model.named_parameters() if "text_model" in n or "text_projection" in n
        )
        self._class_text_embeds = None
        self._seeded_step, self._micro_step = -1, 0
        self._non_finite: str | None = None  # what went NaN/inf in the current step
        self._clamp_hook = None
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
        paired = self.loss_name in PAIRED_LOSSES
        if self.text_frozen:
            if self._class_text_embeds is None:
                with torch.no_grad():
                    features = base.get_text_features(input_ids=ids).pooler_output
                self._class_text_embeds = F.normalize(features.float(), dim=-1)
            # The forward still goes through the (DDP-wrapped) model so that gradient synchronisation is
            # exact; its text input is one prompt, whose embedding is not used.
            out = model(pixel_values=pixels, input_ids=ids[:1], return_dict=True)
            text = self._class_text_embeds[labels] if paired else self._class_text_embeds
        else:
            if paired:
                ids = ids[labels]  # one prompt per image: the image's own class
            # One forward through the (DDP-wrapped) model, so gradient synchronisation is exact.
            out = model(pixel_values=pixels, input_ids=ids, return_dict=True)
            text = out.text_embeds.float()  # CLIPModel returns them normalised
        image = out.image_embeds.float()
        if paired:  # images against per-image texts: the whole global batch on every rank, as in one process
            image, text, labels = gather_batch(image), gather_batch(text), gather_batch(labels)
        batch = LossInputs(image, text, labels, base.logit_scale.exp(), self.loss_context)
        loss = training_loss(self.loss_name, batch)
        return (loss, out) if return_outputs else loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        # Dropout draws from the global RNG, which evaluation and prefetching also consume: reseeded from the
        # step, the draws of every step are the same whether the run was resumed or not.
        if self.state.global_step != self._seeded_step:
            self._seeded_step, self._micro_step = self.state.global_step, 0
        torch.manual_seed(draw_seed(self.args.seed, self.args.process_index, self.state.global_step, self._micro_step))
        self._micro_step += 1
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self._non_finite is None and not torch.isfinite(loss):  # Trainer itself syncs on this test every step
            self._non_finite = f"the loss is {loss.item()}"
        return loss

    def _get_grad_norm(self, model, grad_norm=None):
        """The step's gradient norm; a non-finite loss or norm stops the run before the optimizer step.

        (Under fp16 the loss scaler skips steps with overflowing gradients by design: only the loss counts.)
        """
        norm = super()._get_grad_norm(model, grad_norm)
        if self._non_finite is None and norm is not None and not self.args.fp16 and not math.isfinite(norm):
            self._non_finite = f"the gradient norm is {norm}"
        if self._non_finite is not None:
            raise TrainingDivergedError(
                divergence_message(
                    self._non_finite, self.state.global_step + 1, self.args.learning_rate, Path(self.args.output_dir)
                )
            )
        return norm

    def get_decay_parameter_names(self, model) -> list[str]:
        # A trainable logit_scale is a temperature, not a weight: no decay towards 0 (as in CLIP).
        return [n for n in super().get_decay_parameter_names(model) if "logit_scale" not in n]

    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        scale = self.accelerator.unwrap_model(self.model).get_base_model().logit_scale
        if scale.requires_grad and self._clamp_hook is None:  # clamped at ln(100) after every step, as in CLIP
            self._clamp_hook = optimizer.register_step_post_hook(lambda *_: clamp_logit_scale(scale))
        return optimizer

    def _get_train_sampler(self, train_dataset=None):
        seed = self.args.seed if self.args.data_seed is None else self.args.data_seed  # as TrainingArguments documents
        self.train_sampler = SeededDrawSampler(
            len(self.train_dataset if train_dataset is None else train_dataset), seed, self.train_weights
        )
        return self.train_sampler

    def _run_epoch(self, *args, epoch: int, **kwargs):
        self.train_sampler.set_epoch(epoch)  # also where accelerate's wrappers (resume under DDP) do not reach it
        return super()._run_epoch(*args, epoch=epoch, **kwargs)

    def _get_dataloader(self, *args, **kwargs):
        loader = super()._get_dataloader(*args, **kwargs)
        # Trainer's worker seeding first, then a lower CPU priority for decoding than for this process. Set on
        # the DataLoader accelerate wraps (its workers), not on the wrapper, where it would do nothing.
        base = getattr(loader, "base_dataloader", loader)
        base.worker_init_fn = background_workers(base.worker_init_fn)
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
        if self.run_config is not None:
            Path(output_dir, CHECKPOINT_CONFIG).write_text(yaml.safe_dump(self.run_config, sort_keys=False))
        if self.untrained is not None:
            save_json(Path(output_dir, UNTRAINED_METRICS), self.untrained)

    # --- evaluation: Trainer's own loop (split across ranks, gathered), with the zero-shot head as logits ---

    def get_eval_dataloader(self, eval_dataset=None):
        split = self.eval_dataset if eval_dataset is None else eval_dataset
        return self._get_dataloader(
            self.evaluator.images(split), "Evaluation", self.args.eval_batch_size, sampler_fn=self._get_eval_sampler
        )

    def get_test_dataloader(self, test_dataset):
        return self._get_dataloader(
            self.evaluator.images(test_dataset), "test", self.args.eval_batch_size, sampler_fn=self._get_eval_sampler
        )

    def evaluation_loop(self, *args, **kwargs):
        model = self.accelerator.unwrap_model(self.model).eval()
        with self.accelerator.autocast():  # the class head once per evaluation, from the current text tower
            self._eval_class_embeds = self.evaluator.class_embeddings(model).to(self.args.device)
        try:
            return super().evaluation_loop(*args, **kwargs)
        finally:
            self._eval_class_embeds = None

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """No loss; the logits are the zero-shot class scores of the batch's images."""
        inputs = self._prepare_inputs(inputs)
        with torch.inference_mode(), self.accelerator.autocast():
            images = self.evaluator.backbone.encode_images(inputs["pixel_values"])
        scale = self.accelerator.unwrap_model(model).get_base_model().logit_scale
        return None, zero_shot_logits(images, self._eval_class_embeds, scale), inputs["labels"]

    def scalar_metrics(self, prediction) -> dict[str, float]:
        """``compute_metrics``: the numbers of :func:`classification_metrics` (Trainer logs and compares them)."""
        metrics = self.evaluator.metrics(prediction.label_ids, prediction.predictions)
        return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}

    def logits(self, split) -> tuple[np.ndarray, np.ndarray]:
        """``(labels, logits)`` of every image of ``split``, through the evaluation loop (each process scores its
        share of the images), without logging anything."""
        # Not predict(): its on_predict event would send them to wandb/tensorboard as "test" metrics. Nor the
        # loop's compute_metrics: the caller scores the logits (held-out species' images carry ids beyond the head).
        compute_metrics, self.compute_metrics = self.compute_metrics, None
        try:
            out = self.evaluation_loop(self.get_test_dataloader(split), "Scoring")
        finally:
            self.compute_metrics = compute_metrics
        for callback in self.callback_handler.callbacks:
            if isinstance(callback, ProgressCallback):  # closes the progress bar of the loop
                callback.on_predict(self.args, self.state, self.control)
        return out.label_ids, out.predictions

    def score(self, split, keep_scores: bool = False) -> dict | tuple[dict, np.ndarray, np.ndarray]:
        """All metrics of ``split`` (per class and per taxonomic rank too), and with ``keep_scores`` its labels and
        logits (:meth:`logits`)."""
        labels, logits = self.logits(split)
        metrics = self.evaluator.metrics(labels, logits)
        return (metrics, labels, logits) if keep_scores else metrics

    def cosine_scale(self) -> float | None:
        """The factor that turns the head's cosines into its logits (open set's ``max_cosine``)."""
        return float(self.accelerator.unwrap_model(self.model).get_base_model().logit_scale.exp())


def zero_shot_logits(images: torch.Tensor, class_embeds: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """``exp(logit_scale) * images @ class_embeds.T`` in fp32, also under bf16/fp16 autocast."""
    with torch.autocast(images.device.type, enabled=False):
        return logit_scale.detach().float().exp() * images.float() @ class_embeds.float().T


MAX_LOGIT_SCALE = math.log(100)
OPEN_SET_BOOTSTRAP = 1000  # resamples of the open-set metrics' 95% intervals (known and unknown images apart)


@torch.no_grad()
def clamp_logit_scale(logit_scale: torch.Tensor) -> None:
    """Keep a trainable logit scale (log temperature) in [0, ln 100], as CLIP and open_clip do."""
    logit_scale.clamp_(0, MAX_LOGIT_SCALE)


def draw_seed(*keys: int) -> int:
    """A 63-bit seed that is a pure function of ``keys`` (run seed, epoch, position, ...)."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1, np.uint64)[0] >> 1)


class SeededDrawSampler(torch.utils.data.Sampler):
    """Shuffles each epoch from ``(seed, epoch)`` and gives every draw its own augmentation seed.

    Yields ``(index, seed)`` for :class:`SeededDraws`: data order and augmentation are then functions of
    the seed, the epoch and the position alone, not of whatever consumed the RNG before (evaluation,
    prefetching, worker start-up), so a resumed run sees exactly the batches of an uninterrupted one.
    With ``weights`` (one per image, e.g. :func:`class_balanced_weights`) an epoch is ``size`` draws with
    replacement, image ``i`` drawn with probability ``weights[i] / sum(weights)``, also from ``(seed, epoch)``.
    Every process draws the same sequence; accelerate gives each its share of the batches.
    """

    def __init__(self, size: int, seed: int, weights: np.ndarray | None = None):
        self.size, self.seed, self.epoch = size, seed, 0
        self.p = None
        if weights is not None:
            weights = np.asarray(weights, dtype=np.float64)
            if weights.shape != (size,) or not (np.isfinite(weights).all() and (weights >= 0).all() and weights.sum()):
                raise ValueError(f"sampler weights must be {size} non-negative numbers, not all 0")
            self.p = weights / weights.sum()

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self):
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(self.size) if self.p is None else rng.choice(self.size, size=self.size, p=self.p)
        seeds = rng.integers(0, 2**63 - 1, size=self.size)
        return iter(zip(order.tolist(), seeds.tolist()))


def class_balanced_weights(labels) -> np.ndarray:
    """Per-image draw weights ``1 / (images of its class)``: every class present is equally likely per draw."""
    labels = np.asarray(labels)
    return 1.0 / np.bincount(labels)[labels]


def train_draw_weights(sampler: str, labels) -> np.ndarray | None:
    """``data.sampler``'s weights for :class:`SeededDrawSampler`: None for ``random``."""
    return class_balanced_weights(labels) if sampler == "class_balanced" else None


def train_class_counts(split, num_classes: int) -> np.ndarray:
    """Training images per class id: the prior of ``loss.logit_adjust`` and the head/medium/tail groups."""
    return np.bincount(np.asarray(split["label"], dtype=np.int64), minlength=num_classes)


class SeededDraws(torch.utils.data.Dataset):
    """``dataset[index]`` under ``torch.manual_seed(seed)`` for ``(index, seed)`` keys; the caller's RNG is untouched."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        index, seed = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.dataset[index]


class ZeroShotEvaluator:
    """The zero-shot head from the model's current text tower, the images it scores and their metrics."""

    def __init__(self, backbone, taxonomy, text_type: str, templates: list[str]):
        self.backbone, self.taxonomy, self.templates = backbone, taxonomy, templates
        self.prompts = class_prompts(taxonomy, text_type, templates)

    def images(self, split) -> LabelledPixels:
        """A ``datasets`` split through the backbone's evaluation preprocessing (uint8, normalised on the device)."""
        return LabelledPixels(PreprocessedImages(split, self.backbone.preprocess))

    @torch.inference_mode()
    def class_embeddings(self, model) -> torch.Tensor:
        """``(C, D)`` class text embeddings of ``model`` (the peft model; the caller sets eval mode and autocast)."""
        self.backbone.model = model
        self.backbone.device = next(model.parameters()).device
        return class_text_embeddings(self.backbone, self.prompts).float()

    def metrics(self, labels: np.ndarray, scores: np.ndarray) -> dict:
        return classification_metrics(labels, scores, len(self.taxonomy), taxonomy=self.taxonomy)


class LabelledPixels(torch.utils.data.Dataset):
    """``(pixels, label)`` pairs as the ``{"pixel_values", "labels"}`` items that :func:`collate` stacks."""

    def __init__(self, images):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        pixels, label = self.images[index]
        return {"pixel_values": pixels, "labels": label}


def divergence_message(what: str, step: int, lr: float, checkpoints: Path) -> str:
    kept = sorted(checkpoints.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    where = f"the checkpoints before it (up to {kept[-1]}) are kept" if kept else "there is no checkpoint"
    return (
        f"training diverged at step {step}: {what}. No adapter, card or metrics were written; {where}. "
        f"Lower training.learning_rate (now {lr:g}) or raise training.warmup_steps"
    )


def trainer_arguments(training: TrainingArguments, checkpoints: Path) -> TrainingArguments:
    """The run's TrainingArguments with Trainer's ``output_dir`` in the run folder's ``checkpoints/``."""
    # TrainingArguments takes its mixed precision from this variable unless bf16/fp16 is true, so an fp32 run
    # under a bf16 accelerate config would otherwise run in bf16.
    os.environ["ACCELERATE_MIXED_PRECISION"] = precision_name(training) if training.bf16 or training.fp16 else "no"
    return dataclasses.replace(training, output_dir=str(checkpoints))


def precision_name(args: TrainingArguments) -> str:
    """``bf16``, ``fp16`` or ``fp32``: what the run summary and metrics.json call the run's precision."""
    return "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32"


def collate(batch: list[dict]) -> dict[str, torch.Tensor]:
    return {
        "pixel_values": torch.stack([b["pixel_values"] for b in batch]),
        "labels": torch.tensor([b["labels"] for b in batch]),
    }


def run_summary(cfg: TrainConfig, train_losses: list, best: dict, test: dict | None, precision: str) -> str:
    def pct(m, k):
        return "n/a" if not m or m.get(k) is None else f"{100 * m[k]:.1f}"

    m = cfg.model
    tuning = f"LoRA r={cfg.lora.r}" if m.finetune == "lora" else "full fine-tune"
    start = "pretrained" if m.pretrained else "from scratch"
    what = f"{m.base} ({start}) {tuning}" if m.type == "supervised" else f"{m.base} + {tuning}"
    lines = [f"run {cfg.training.output_dir}: {what}, loss {describe_loss(dataclasses.asdict(cfg.loss))}, {precision}"]
    if train_losses:
        lines.append(
            f"train loss {train_losses[0][1]:.3f} -> {train_losses[-1][1]:.3f} over {train_losses[-1][0]} steps"
        )
    lines.append(f"best validation mIoU {pct(best, 'miou')} (OA {pct(best, 'oa')}, mF1 {pct(best, 'mf1')})")
    if test:
        lines.append(
            f"test: OA {pct(test, 'oa')}  top-5 {pct(test, 'top5')}  mF1 {pct(test, 'mf1')}  mIoU {pct(test, 'miou')}"
        )
        distance = test.get("hierarchical_distance_top_k") or {}
        if test.get("mistake_severity") is not None and "top5" in distance:  # Bertinetto et al. 2020's figures
            lines.append(
                f"test mistakes: severity {test['mistake_severity']:.2f} ranks, average hierarchical distance of the "
                f"top-5 {distance['top5']:.2f} ranks"
            )
    groups = (test or {}).get("by_training_count")
    if cfg.data.imbalance is not None and groups:  # the long tail's question: how do the rare species fare?
        names = [g for g in ("head", "medium", "tail") if g in groups]
        lines.append(
            f"test by training images ({' / '.join(names)}): accuracy "
            + " / ".join(pct(groups[g], "accuracy") for g in names)
            + ", mF1 "
            + " / ".join(pct(groups[g], "mf1") for g in names)
        )
    return "\n".join(lines)


def run_taxonomy(data_path: str, taxonomy_file: str | None) -> Taxonomy:
    """The prepared folder's table, or ``data.taxonomy`` when it lists the same species (the label ids index it)."""
    taxonomy = prepared_taxonomy(data_path)
    if taxonomy_file is None:
        return taxonomy
    override = load_taxonomy(taxonomy_file)
    if override.classes != taxonomy.classes:
        raise ConfigError(
            f"data.taxonomy {taxonomy_file} lists other species than {data_path}/taxonomy.csv, which the "
            "prepared label ids index; prepare the data again with --taxonomy instead"
        )
    return override


def non_finite_weights(model) -> list[str]:
    """Names of trainable parameters holding a NaN or an infinity."""
    return [n for n, p in model.named_parameters() if p.requires_grad and not torch.isfinite(p).all()]


def build_trainer(
    cfg: TrainConfig, backbone, taxonomy: Taxonomy, splits, base: dict, checkpoints: Path
) -> ContrastiveTrainer:
    """LoRA on the base model, and the trainer with its zero-shot evaluator (the run's seed set first: LoRA
    initialisation follows it)."""
    set_seed(cfg.training.seed)
    lora = cfg.lora
    model = add_lora(
        backbone.model, lora.r, lora.alpha, lora.dropout, lora.towers, lora.target_modules, lora.train_logit_scale
    )
    model.peft_config["default"].base_model_name_or_path = base["base_model"]  # Hub id or convert: recipe
    backbone.model = model
    class_ids = backbone.tokenize([p for [p] in class_prompts(taxonomy, cfg.data.text_type, [cfg.data.train_template])])
    evaluator = ZeroShotEvaluator(backbone, taxonomy, cfg.data.text_type, templates_for(cfg.data.eval_templates))
    return ContrastiveTrainer(
        model=model,
        args=trainer_arguments(cfg.training, checkpoints),
        train_dataset=train_images(splits["train"], backbone.preprocess),  # uint8, normalised on the device
        eval_dataset=splits["validation"],
        data_collator=collate,
        class_input_ids=class_ids,
        loss_name=cfg.loss.name,
        loss_context=loss_context(taxonomy, cfg.loss, train_class_counts(splits["train"], len(taxonomy))),
        train_weights=train_draw_weights(cfg.data.sampler, splits["train"]["label"]),
        evaluator=evaluator,
        pixel_stats=pixel_stats(backbone.preprocess),
        run_config=cfg.to_dict(),
    )


def train(trainer: ContrastiveTrainer, splits, run_dir: Path, resume: bool, overwrite: bool, test_after: bool) -> dict:
    """Evaluate the untrained model, then train (continuing the last complete checkpoint on ``resume``);
    ``overwrite`` clears the earlier run only now, once model and data have loaded. The untrained metrics."""
    checkpoints = Path(trainer.args.output_dir)
    last = last_complete_checkpoint(checkpoints) if resume else None
    if resume and last is None and trainer.is_world_process_zero():
        logger.info(f"--resume: no checkpoint in {checkpoints}, starting from scratch")
    if last and (damaged := unreadable_checkpoint_file(Path(last))):
        raise RunFolderError(
            f"--resume: {last} cannot be read back: {damaged}; move that folder away to resume from the "
            "checkpoint before it, or start over with --overwrite"
        )
    if last:  # the evaluation before training is that of the run's first start
        saved = Path(last, UNTRAINED_METRICS)
        untrained = json.loads(saved.read_text()) if saved.is_file() else {}
        untrained = {"validation": untrained.get("validation"), "test": untrained.get("test")}
    else:
        untrained = {
            "validation": trainer.score(splits["validation"]),
            "test": trainer.score(splits["test"]) if test_after else None,
        }
    trainer.untrained = {split: metrics_summary(metrics) for split, metrics in untrained.items()}
    if overwrite and trainer.is_world_process_zero():
        clear_run_outputs(run_dir)
    trainer.train(resume_from_checkpoint=last)
    if bad := non_finite_weights(trainer.model):
        raise TrainingDivergedError(
            f"{len(bad)} trained weights are NaN or infinite (e.g. {bad[0]}); nothing was "
            f"written. Lower training.learning_rate (now {trainer.args.learning_rate:g})"
        )
    return untrained


def evaluate_best(trainer: ContrastiveTrainer, splits, run: RunArguments, holdout: Holdout | None) -> dict:
    """What the best checkpoint (Trainer loaded it back at the end of training) gives: validation and test
    metrics; with ``run.max_danger`` its selective-prediction threshold chosen on validation
    (:func:`selective_threshold`); with ``run.unknown_tpr`` or a hold-out its open-set threshold, and with a
    hold-out its open-set metrics on the test split (:func:`open_set_result`)."""
    best, labels, scores = trainer.score(splits["validation"], keep_scores=True)
    result = {
        "validation_best": best,
        "selective": selective_threshold(labels, scores, trainer.evaluator.taxonomy, run.max_danger),
        "test": None,
        "open_set": None,
    }
    tpr = run.unknown_tpr if run.unknown_tpr is not None else DEFAULT_TPR if holdout is not None else None
    result["unknown_threshold"] = unknown_threshold(softmax(scores, axis=1).max(axis=1), tpr) if tpr else None
    if run.test_after:
        result["test"], test_labels, test_scores = trainer.score(splits["test"], keep_scores=True)
        if holdout is not None:
            result["open_set"] = open_set_result(trainer, holdout, test_labels, test_scores)
    if logger.isEnabledFor(logging.DEBUG):  # to compare the ranks of a multi-process run
        lora_sum = sum(p.detach().double().sum().item() for n, p in trainer.model.named_parameters() if "lora_" in n)
        logger.debug(
            "rank %d step %d lora-checksum %.8f val-miou %.6f",
            trainer.args.process_index,
            trainer.state.global_step,
            lora_sum,
            best["miou"],
        )
    return result


def open_set_result(trainer: ContrastiveTrainer, holdout: Holdout, labels, logits) -> dict | None:
    """The known test images (``labels``, ``logits``) against the held-out species' test images: every
    open-set score's AUROC, FPR at 95% TPR and OSCR with bootstrap intervals (:mod:`evaluation.openset`; at 95%
    whatever ``run.unknown_tpr`` is, which sets only predict.py's threshold, so that every model's FPR95 compares);
    ``scores`` keeps the per-image scores for the ROC figure."""
    unknown = holdout.unknown["test"]
    if not len(unknown):
        logger.warning("data.holdout_species: the held-out species have no test images; no open-set metrics")
        return None
    _, unknown_logits = trainer.logits(unknown)
    scores = OpenSetScores.from_logits(logits, labels, unknown_logits, trainer.cosine_scale())
    metrics = open_set_metrics(scores, DEFAULT_TPR, bootstrap=OPEN_SET_BOOTSTRAP, seed=trainer.args.seed)
    return {
        "split": "test",
        "known_images": len(labels),
        "unknown_images": len(unknown),
        "held_out": holdout.held_out,
        "tpr": DEFAULT_TPR,
        "bootstrap": OPEN_SET_BOOTSTRAP,
        "metrics": metrics,
        "scores": scores,
    }


def selective_threshold(labels: np.ndarray, scores: np.ndarray, taxonomy, max_danger: float | None) -> tuple | None:
    """``(risk-coverage curve, chosen threshold)`` of validation for a dangerous->edible target, or None when no
    target is set or validation holds no deadly or poisonous image (said in one line)."""
    if max_danger is None:
        return None
    try:
        return choose_on_validation(scores, labels, taxonomy, max_danger)  # never bolder than the default
    except ValueError as err:
        logger.warning("run.max_danger: no threshold recorded: %s", err)
        return None


def run_training(cfg: TrainConfig) -> dict:
    """Train, pick the best checkpoint on validation mIoU, test it, and write the run folder (rank 0).

    A run that fails leaves no empty folder behind, and an image that cannot be read any more is one
    :class:`DataReadError`.
    """
    # 1. The run folder: one that holds another run is refused before anything loads.
    run_dir = Path(cfg.training.output_dir)
    created = not run_dir.exists()
    check_run_folder(run_dir, cfg.to_dict(), cfg.run.resume, cfg.run.overwrite)
    try:
        return _load_train_and_write(cfg, run_dir)
    except BaseException as err:
        if PartialState().is_main_process:
            remove_empty_dirs(run_dir if created else run_dir / CHECKPOINTS)
        if (message := unreadable_image(err)) is not None:
            raise DataReadError(message) from None
        raise


def _load_supervised(cfg: TrainConfig, run_dir: Path):
    """Steps 2-4 for an image classifier (``model.type: supervised``): its classes are the data's, so the
    taxonomy comes first, then the model (from the Hub, or built), the data, and the trainer; ``base`` is the
    run's classes.json record."""
    from mushroomclip.training import supervised  # it builds on this module's trainer

    taxonomy, splits, holdout, imbalance = load_run_data(cfg)
    built = supervised.load_classifier_model(cfg, taxonomy)
    trainer, base = supervised.build_classifier_trainer(cfg, built, taxonomy, splits, run_dir / CHECKPOINTS)
    return trainer, base, taxonomy, splits, holdout, imbalance


def load_run_data(cfg: TrainConfig) -> tuple[Taxonomy, DatasetDict, Holdout | None, Imbalance | None]:
    """The prepared splits and the table their label ids index; with ``data.holdout_species`` the known species'
    splits and table (what the run trains, validates and tests on) and the held-out images (:mod:`holdout`); with
    ``data.imbalance`` the training split subsampled to a long tail, and the counts (:mod:`imbalance`)."""
    taxonomy = run_taxonomy(cfg.data.path, cfg.data.taxonomy)
    splits, holdout = apply_holdout(
        load_splits(cfg.data.path), taxonomy, cfg.data.holdout_species, cfg.data.holdout_seed
    )
    if holdout is not None:
        logger.info(
            "data.holdout_species: %d of the %d species with training images held out as unknown (%s)",
            len(holdout.held_out),
            len(holdout.held_out) + len(splits["train"].unique("label")),  # the species the draw chose from
            ", ".join(holdout.held_out),
        )
        taxonomy = holdout.known
    splits, imbalance = apply_imbalance(splits, taxonomy, cfg.data.imbalance)
    if imbalance is not None:
        record = imbalance.record()
        logger.info(
            "data.imbalance: %s profile, ratio %g, seed %d: %d of %d training images kept, %d to %d per species",
            record["profile"],
            record["ratio"],
            record["seed"],
            record["images_after"],
            record["images_before"],
            max(imbalance.used),
            min(imbalance.used),
        )
    return taxonomy, splits, holdout, imbalance


def _load_train_and_write(cfg: TrainConfig, run_dir: Path) -> dict:
    if cfg.model.type == "supervised":
        trainer, base, taxonomy, splits, holdout, imbalance = _load_supervised(cfg, run_dir)
    else:
        # 2. The base model first: without network this is the error a user should see, before any data work.
        backbone = load_backbone(backbone_name(cfg.model.base), random_weights=cfg.model.random_weights)
        base = base_record(cfg.model.base, cfg.model.base_hub_id)  # resolved once: a convert: base asks the Hub
        # 3. Data: the prepared splits and the table their label ids index (the known species' with a hold-out).
        taxonomy, splits, holdout, imbalance = load_run_data(cfg)
        # 4. LoRA on the base model, the trainer and its zero-shot evaluator.
        trainer = build_trainer(cfg, backbone, taxonomy, splits, base, run_dir / CHECKPOINTS)
    # 5. Train.
    untrained = train(trainer, splits, run_dir, cfg.run.resume, cfg.run.overwrite, cfg.run.test_after)
    # 6. Evaluate the best checkpoint on validation and test (and, with a hold-out, the unknown test images).
    result = evaluate_best(trainer, splits, cfg.run, holdout) | {
        "validation_untrained": untrained["validation"],
        "test_untrained": untrained["test"],
        "global_step": trainer.state.global_step,
        "best_checkpoint": trainer.state.best_model_checkpoint,
        "model": trainer.model,
        "holdout": holdout,
        "imbalance": imbalance,
        "push_error": None,
    }
    best, test = result["validation_best"], result["test"]
    # 7. Write the run folder, its figures and card (rank 0), then push it if asked.
    if trainer.is_world_process_zero():
        precision = precision_name(trainer.args)
        write_run_folder(run_dir, cfg, result, trainer, taxonomy, trainer.evaluator.templates, precision, splits, base)
        logger.info(run_summary(cfg, history_from_log(trainer.state.log_history)[0], best, test, precision))
        if cfg.hub.push:
            result["push_error"] = publish(run_dir, cfg.hub.repo_id, cfg.hub.private)
    return result
