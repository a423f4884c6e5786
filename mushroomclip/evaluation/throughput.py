"""The speed measurements behind `make bench-zero-shot` and `make bench-train`: images/s with the real data
pipeline vs tensors already on the device (model only), in the steady state, with FLOPs per step, MFU and peak
memory (the arithmetic, JSON and table are :mod:`mushroomclip.evaluation.speed`'s).

Models have random weights: speed does not depend on them. Training is measured for CLIP architectures (LoRA,
class_text loss, and the ``run_clip.py``-style baseline) and for the supervised classifiers of
:data:`CLASSIFIERS` (full fine-tune, cross-entropy).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import TrainingArguments

from mushroomclip.config import DataArguments, LoraArguments
from mushroomclip.data.splits import load_splits, prepared_taxonomy
from mushroomclip.data.transforms import DeviceEvalPixels, background_worker, pixel_stats, train_images
from mushroomclip.evaluation import profiling, speed
from mushroomclip.evaluation.features import image_batches
from mushroomclip.models.backbones import load_backbone, offline_clip_tokenizer
from mushroomclip.models.lora import add_lora
from mushroomclip.models.prompts import class_prompts
from mushroomclip.models.supervised import CLASSIFIERS, random_classifier
from mushroomclip.training.supervised import ClassifierTrainer
from mushroomclip.training.trainer import ContrastiveTrainer, collate


def _images_per_s(batches, run, timed: int, skip: int, device: str, count=len) -> tuple[float, int]:
    """Images/s of ``run(batch)`` over ``timed`` batches, after one warm-up and ``skip`` untimed ones;
    and how many images were timed (``count(batch)`` each)."""
    batches = iter(batches)
    for _ in range(1 + skip):
        run(next(batches))
    speed.sync(device)
    start, seen = time.perf_counter(), 0
    for _ in range(timed):
        batch = next(batches)
        run(batch)
        seen += count(batch)
    speed.sync(device)
    return seen / (time.perf_counter() - start), seen


def prepared_images(data: str) -> dict:
    """How the images of ``data`` were prepared (``--max-side``, ``--short-side``), from its prepare_report.json; {}
    without one."""
    report = Path(data) / "prepare_report.json"
    if not report.is_file():
        return {}
    config = json.loads(report.read_text()).get("provenance", {}).get("config", {})
    return {"max_side": config.get("max_side"), "short_side": config.get("short_side", 0)}  # 0: before the option


def _steady_state_plan(
    data: str, what: str, available: int, batch_size: int, num_workers: int, timed: int, target: str, knob: str
) -> tuple[int, int]:
    """``(skip, needed)`` batches for a steady-state measurement: the batches the workers prefetched while
    the warm-up one was made (DataLoader's prefetch_factor, 2 per worker) pass untimed, and the timed ones
    stay inside one epoch (an epoch's first batch waits for a worker: once per epoch, which a short window
    would overweight). A clear error when ``available`` batches are fewer."""
    skip = 2 * num_workers
    needed = 1 + skip + timed
    if available < needed:
        raise ValueError(
            f"{data}: {what} makes {available} batches of {batch_size}, and a steady-state measurement needs "
            f"{needed} (1 warm-up, {skip} prefetched, {timed} timed): prepare more images ({target} does), "
            f"or lower {knob}, --batch-size or --num-workers"
        )
    return skip, needed


def measure_speed(
    data: str,
    model: str,
    batch_size: int,
    num_workers: int,
    device: str,
    split: str,
    batches: int,
    decode_on_device: bool = False,
) -> dict:
    """Images/s of zero-shot image encoding with the real data pipeline vs tensors on the device (model only),
    in the steady state (:func:`_steady_state_plan`); ``decode_on_device``: the pipeline decodes and preprocesses
    each batch on the device (:func:`mushroomclip.evaluation.features.image_batches`), and the result says how far
    its pixels are from the workers' (:func:`_decoded_difference`)."""
    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    backbone = load_backbone(model, device=device, dtype=dtype, random_weights=True)
    images = load_splits(data)[split]
    skip, needed = _steady_state_plan(
        data,
        f"the {split} split",
        len(images) // batch_size,
        batch_size,
        num_workers,
        batches,
        "make bench-zero-shot",
        "--batches",
    )
    # one decoder for the measured batches and the whole split: its counts say where every image was decoded
    decoder = DeviceEvalPixels(backbone.preprocess, device) if decode_on_device else None
    loader = image_batches(
        images.select(range(needed * batch_size)),
        backbone.preprocess,
        device,
        batch_size,
        num_workers,
        decode_on_device,
        decoder,
    )

    with torch.inference_mode():
        shape = (batch_size, 3, *backbone.preprocess.size)  # uint8, as every evaluation image reaches the model
        on_device = [torch.randint(0, 256, shape, dtype=torch.uint8, device=device) for _ in range(2)]
        synthetic = [on_device[i % 2] for i in range(1 + batches)]
        speed.reset_peak_memory(device)
        first, _ = _images_per_s(synthetic, backbone.encode_images, batches, 0, device)
        pipeline, seen = _images_per_s((pixels for pixels, _ in loader), backbone.encode_images, batches, skip, device)
        # before and after: first-call slowness must not flatter the pipeline
        model_only = max(first, _images_per_s(synthetic, backbone.encode_images, batches, 0, device)[0])
        memory = speed.peak_memory(device)
        flops = speed.count_flops(backbone.encode_images, on_device[0])
        split_encode = _encode_split(images, backbone, batch_size, num_workers, device, decoder)
    peak = speed.peaks(device, dtype)
    return {
        "benchmark": "bench-zero-shot",
        "model": model,
        "device": device,
        "dtype": str(dtype),
        "batch_size": batch_size,
        "batches": batches,
        "images": seen,
        "num_workers": num_workers,
        "data": str(data),
        "step": "batch encoded (forward)",
        "prepared": prepared_images(data),
        "decode_on_device": decode_on_device,
        "flops_per_step": flops,
        **peak,
        "pipeline": speed.variant(pipeline, flops, batch_size, peak),
        "model_only": speed.variant(model_only, flops, batch_size, peak, memory),
        "ratio": pipeline / model_only,
        "split_encode": dict(split_encode, split=split),
        **(
            {
                "device_decoding": decoder.counts,
                "decoded_difference": _decoded_difference(images, backbone.preprocess, device),
            }
            if decode_on_device
            else {}
        ),
        "machine": speed.machine(device),
    }


def _decoded_difference(split, preprocess, device: str, count: int = 64) -> dict:
    """How far the device-decoded evaluation pixels of ``split``'s first ``count`` images are from the workers'
    (:class:`mushroomclip.data.transforms.EvalPixels`): the largest and the mean absolute difference in grey levels (0-255)."""
    count = min(count, len(split))
    decoder = DeviceEvalPixels(preprocess, device)
    first = split.select(range(count))
    on_device = next(image_batches(first, preprocess, device, count, 0, decode_on_device=True, decoder=decoder))[0]
    workers = next(image_batches(first, preprocess, device, count, 0))[0].to(device)
    diff = (on_device.int() - workers.int()).abs()
    return {
        "images": count,
        "on_device": decoder.counts["on_device"],  # the others took the workers' own path: 0 apart by definition
        "max_abs": int(diff.max()),
        "mean_abs": float(diff.float().mean()),
    }


def _encode_split(images, backbone, batch_size: int, num_workers: int, device: str, decoder=None) -> dict:
    """Seconds to encode every image of a split end to end: a fresh loader (worker start-up included); with a
    ``decoder``, decoded on the device by it."""
    speed.sync(device)
    start = time.perf_counter()
    batches = image_batches(images, backbone.preprocess, device, batch_size, num_workers, decoder is not None, decoder)
    for pixels, _ in batches:
        backbone.encode_images(pixels)
    speed.sync(device)
    seconds = time.perf_counter() - start
    return {"images": len(images), "seconds": seconds, "images_per_s": len(images) / seconds}


def _lora_model(model: str, device: str, towers: tuple, dropout: float | None = None, bf16_base: bool = False):
    """A random-weights backbone with the default config's LoRA on ``towers`` (``dropout``: another LoRA dropout),
    in train mode on ``device``; ``bf16_base``: see :func:`hold_frozen_in_bf16`."""
    backbone = load_backbone(model, device=device, random_weights=True)
    s = LoraArguments()
    dropout = s.dropout if dropout is None else dropout
    peft = add_lora(backbone.model, s.r, s.alpha, dropout, list(towers), s.target_modules, False).to(device).train()
    if bf16_base and not hold_frozen_in_bf16(peft):
        raise ValueError(f"--bf16-base: {model} has no frozen linear or convolution weight in fp32 to hold in bf16")
    return backbone, peft


def hold_frozen_in_bf16(model: torch.nn.Module) -> int:
    """Store the frozen weights and biases of ``model``'s linear and convolution layers in bf16; LoRA's weights (and
    so the optimizer) stay fp32. Under bf16 autocast those layers compute in bf16 anyway, from a bf16 copy of the
    fp32 weights that autocast makes again at every step (it caches only weights that train): held in bf16, that
    copy is made once. Embeddings, norms and logit_scale keep fp32. Returns the parameters converted."""
    converted = 0
    for module in model.modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            for p in module.parameters(recurse=False):
                if not p.requires_grad and p.dtype == torch.float32:
                    p.data = p.data.to(torch.bfloat16)
                    converted += 1
    return converted


@dataclass(frozen=True)
class Levers:
    """Speed levers a training step can be measured with (issue 13: each measured on its own, kept where it pays):
    ``torch.compile`` of the step's loss, AdamW's fused kernel, another LoRA dropout, the frozen base held in bf16.
    The defaults are the trainer's own step."""

    compile: bool = False
    fused_adamw: bool = False
    lora_dropout: float | None = None  # None: the config default
    bf16_base: bool = False  # frozen linear/conv weights held in bf16 (hold_frozen_in_bf16); the step in bf16 autocast

    def tag(self) -> str:
        """What a result file's name says of the levers ("" for the trainer's own step)."""
        parts = ["compile"] * self.compile + ["fused"] * self.fused_adamw + ["bf16base"] * self.bf16_base
        parts += [] if self.lora_dropout is None else [f"dropout{self.lora_dropout:g}"]
        return "".join(f"-{p}" for p in parts)


def _train_model(model: str, device: str, towers: tuple, taxonomy, args: TrainingArguments, levers: Levers = Levers()):
    """The model of ``model`` (random weights, train mode, on ``device``), its trainer (whose ``compute_loss`` is
    the step's loss), its preprocessing and what the step is: a supervised classifier of :data:`CLASSIFIERS`
    fully fine-tuned with cross-entropy, else a CLIP backbone with the default LoRA on ``towers`` and the
    class_text loss over every class's prompt (the default config's template)."""
    if model in CLASSIFIERS:
        built = random_classifier(model, taxonomy.classes)
        net = built.model.to(device).train()
        trainer = ClassifierTrainer(
            model=net, args=args, loss_name="cross_entropy", evaluator=None, pixel_stats=pixel_stats(built.preprocess)
        )
        return net, trainer, built.preprocess, "training step (forward + backward), full fine-tune, cross-entropy"
    backbone, net = _lora_model(model, device, towers, levers.lora_dropout, levers.bf16_base)
    d = DataArguments()
    ids = backbone.tokenize([p for [p] in class_prompts(taxonomy, d.text_type, [d.train_template])]).to(device)
    trainer = ContrastiveTrainer(
        model=net,
        args=args,
        class_input_ids=ids,
        loss_name="class_text",
        evaluator=None,
        pixel_stats=pixel_stats(backbone.preprocess),
    )
    return net, trainer, backbone.preprocess, "training step (forward + backward)"


def step_loss(trainer, net, levers: Levers = Levers()):
    """``loss(batch)`` of a training step: the trainer's ``compute_loss``, compiled whole with ``torch.compile``
    when ``levers.compile`` (every batch has one shape: drop_last, fixed batch size)."""

    def loss(inputs: dict) -> torch.Tensor:
        return trainer.compute_loss(net, inputs)

    return torch.compile(loss) if levers.compile else loss


def measure_train_speed(
    data: str,
    model: str,
    batch_size: int,
    steps: int,
    num_workers: int,
    device: str,
    towers: tuple = ("vision", "text"),
    baseline: bool = True,
    levers: Levers = Levers(),
    profile: bool = True,
) -> dict:
    """Train images/s of steps fed by the real pipeline vs uint8 tensors on the device, in the steady state
    (:func:`_steady_state_plan`), what the loader alone delivers, and (``baseline``, CLIP only) the same LoRA,
    batch and precision trained the ``run_clip.py`` way; with FLOPs per step, MFU and peak memory, and (``profile``)
    where a model-only step's time goes (:func:`mushroomclip.evaluation.profiling.profile_step`).

    A step is the trainer's own (:func:`_train_model`): ``compute_loss``, backward and AdamW, in bf16 autocast on
    a GPU. ``model`` is a CLIP architecture (LoRA, ``towers``) or a supervised one of :data:`CLASSIFIERS`.
    """
    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    classifier = model in CLASSIFIERS
    taxonomy = prepared_taxonomy(data)
    splits = load_splits(data)
    args = TrainingArguments(output_dir=tempfile.mkdtemp(), use_cpu=not device.startswith("cuda"), report_to=[])
    net, trainer, preprocess, what = _train_model(model, device, towers, taxonomy, args, levers)
    split = train_images(splits["train"], preprocess)  # the trainer's own pipeline
    loader = torch.utils.data.DataLoader(
        split,
        batch_size=batch_size,
        shuffle=True,
        num_workers=num_workers,
        drop_last=True,
        worker_init_fn=background_worker,
        pin_memory=device.startswith("cuda"),
        persistent_workers=num_workers > 0,
        collate_fn=collate,
    )
    params = [p for p in net.parameters() if p.requires_grad]
    autocast = device.startswith("cuda") or levers.bf16_base  # bf16 weights need bf16 autocast, on a CPU too
    step = speed.train_step(params, step_loss(trainer, net, levers), device, levers.fused_adamw, autocast)

    def copy(batch: dict) -> None:  # the loader alone: only the copy to the device
        batch["pixel_values"].to(device, non_blocking=True)

    def count(batch: dict) -> int:
        return len(batch["labels"])

    skip, _ = _steady_state_plan(
        data, "the train split", len(loader), batch_size, num_workers, steps, "make bench-train", "--steps"
    )
    # Model only: uint8 batches already on the device, as the pipeline's arrive after their copy.
    size = split[0]["pixel_values"].shape[1:]
    fixed = [
        {
            "pixel_values": torch.randint(0, 256, (batch_size, 3, *size), dtype=torch.uint8, device=device),
            "labels": torch.randint(0, len(taxonomy), (batch_size,), device=device),
        }
        for _ in range(2)
    ]
    synthetic = [fixed[i % 2] for i in range(steps + 1)]
    # Model-only before and after the pipeline, the faster one counts: the first steps of a process run
    # slower (allocator, caches), which must not make the data pipeline look faster than the model.
    speed.reset_peak_memory(device)
    first, _ = _images_per_s(synthetic, step, steps, 0, device, count)
    pipeline, _ = _images_per_s(loader, step, steps, skip, device, count)
    model_only = max(first, _images_per_s(synthetic, step, steps, 0, device, count)[0])
    memory = speed.peak_memory(device)
    loader_only, _ = _images_per_s(loader, copy, steps, skip, device, count)  # the decoding ceiling, a fresh epoch
    # counted on the eager step: the same arithmetic whichever kernels Inductor would generate
    flops = speed.count_flops(speed.train_step(params, step_loss(trainer, net), device, autocast=autocast), fixed[0])
    where = _profile(step, fixed[0], device, net) if profile else None
    dtype = torch.bfloat16 if autocast else torch.float32
    peak = speed.peaks(device, dtype)
    shutil.rmtree(args.output_dir, ignore_errors=True)
    result = {
        "benchmark": "bench-train",
        "model": model,
        "device": device,
        "dtype": str(dtype),
        "batch_size": batch_size,
        "steps": steps,
        "towers": None if classifier else list(towers),
        "num_workers": num_workers,
        "data": str(data),
        "train_images": len(split),
        "prepared": prepared_images(data),
        "classes": len(taxonomy),
        "step": what,
        "levers": dataclasses.asdict(levers),
        "flops_per_step": flops,
        **peak,
        "pipeline": speed.variant(pipeline, flops, batch_size, peak),
        "model_only": speed.variant(model_only, flops, batch_size, peak, memory),
        "loader_only": speed.variant(loader_only),
        "ratio": pipeline / model_only,
    }
    if where is not None:
        result["profile"] = where
    if baseline and not classifier:  # the run_clip.py recipe is CLIP's
        del trainer, net, step, fixed, synthetic
        result["baseline"] = _baseline_speed(
            splits["train"],
            taxonomy,
            model,
            batch_size,
            steps,
            num_workers,
            skip,
            device,
            towers,
            peak,
            levers.lora_dropout,  # the same LoRA; the other levers are this project's, not the recipe's
        )
        result["speedup_vs_baseline"] = pipeline / result["baseline"]["images_per_s"]
    result["machine"] = speed.machine(device)
    return result


def _profile(step, batch: dict, device: str, net) -> dict:
    """:func:`mushroomclip.evaluation.profiling.profile_step`, or what stopped it: the speed figures measured before it
    are kept either way."""
    try:
        return profiling.profile_step(step, batch, device, net)
    except RuntimeError as err:
        print(f"warning: no profile: {err}", file=sys.stderr)
        return {"error": str(err)}


def _baseline_speed(
    split,
    taxonomy,
    model: str,
    batch_size: int,
    steps: int,
    num_workers: int,
    skip: int,
    device: str,
    towers: tuple,
    peak: dict,
    lora_dropout: float | None = None,
) -> dict:
    """Images/s of the Hugging Face recipe (``run_clip.py``: Pillow + torchvision in ``set_transform``, one
    caption per image, ``CLIPModel(..., return_loss=True)``) with the same LoRA, batch and precision."""
    backbone, peft = _lora_model(model, device, towers, lora_dropout)
    d = DataArguments()
    # offline_clip_tokenizer: the same BPE as openai/clip-vit-*
    captions = speed.caption_dataset(
        split, taxonomy, d.text_type, d.train_template, offline_clip_tokenizer(), backbone.preprocess
    )
    loader = torch.utils.data.DataLoader(
        captions,
        batch_size=batch_size,
        shuffle=True,
        num_workers=num_workers,
        drop_last=True,
        pin_memory=device.startswith("cuda"),
        collate_fn=speed.caption_collate,
    )
    params = [p for p in peft.parameters() if p.requires_grad]
    step = speed.train_step(params, lambda inputs: speed.baseline_loss(peft, inputs), device)
    speed.reset_peak_memory(device)
    batches = iter(loader)
    rate, _ = _images_per_s(batches, step, steps, skip, device, lambda b: len(b["input_ids"]))
    memory = speed.peak_memory(device)
    flops = speed.count_flops(step, speed.caption_collate([captions[i] for i in range(batch_size)]))
    return {
        **speed.variant(rate, flops, batch_size, peak, memory),
        "flops_per_step": flops,
        "recipe": "run_clip.py: datasets + set_transform (Pillow, torchvision), captions padded to 77, "
        "CLIPModel(return_loss=True), same LoRA, batch and precision",
    }
