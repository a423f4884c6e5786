"""What a speed figure is measured against: FLOPs per step, the device's peaks, peak memory, the machine.

Also the Hugging Face baseline that ``make bench-train`` compares with (the ``run_clip.py`` recipe), the
JSON files under ``results/bench/`` and the README speed table generated from them.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import re
import resource
import time
from pathlib import Path

import torch
from torch.profiler import record_function
from torch.utils.flop_counter import FlopCounterMode, flop_registry
from torchvision import transforms as T

from mushroomclip.evaluation.profiling import PHASES, sync
from mushroomclip.evaluation.profiling import summary as profile_summary
from mushroomclip.models.prompts import class_prompts
from mushroomclip.provenance import git_commit, package_versions

RESULTS = Path("results/bench")
TABLE_START, TABLE_END = "<!-- bench-table:start -->", "<!-- bench-table:end -->"
NO_CPU_PEAK = "no spec peak for CPU"
# What every result file holds (the JSON's documented fields; tests check them).
FIELDS = {
    "benchmark": "bench-train or bench-zero-shot",
    "model": "architecture (random weights)",
    "device": "cuda or cpu",
    "dtype": "the step's precision",
    "batch_size": "images per step",
    "num_workers": "DataLoader workers",
    "data": "prepared folder",
    "prepared": "how its images were prepared: max_side, short_side (prepare_kaggle.py's --max-side, --short-side)",
    "step": "what one FLOP count covers",
    "flops_per_step": "FlopCounterMode total of one step",
    "spec_peak_tflops": "datasheet dense bf16 peak, null on a CPU or an unknown GPU",
    "spec_peak_source": "where the spec peak comes from, or why there is none",
    "matmul_tflops": "a large matmul in matmul_dtype measured in the same run",
    "matmul_dtype": "its precision",
    "pipeline": "images/s with the data pipeline, TFLOP/s and MFU",
    "model_only": "images/s on tensors already on the device, TFLOP/s, MFU and peak_memory",
    "ratio": "pipeline / model only",
    "machine": "CPU, cores, GPU, versions, git commit, time",
}
TRAIN_FIELDS = {
    **FIELDS,
    "steps": "timed steps per measurement",
    "towers": "LoRA towers",
    "levers": "speed levers of the step (compile, fused_adamw, lora_dropout, bf16_base; issue 13)",
    "train_images": "train split size",
    "classes": "class prompts per step",
    "loader_only": "images/s the loader alone delivers",
    "baseline": "run_clip.py-style recipe: images/s, flops_per_step, TFLOP/s, MFU, peak_memory",
    "speedup_vs_baseline": "pipeline / baseline images/s, both with their data",
    "profile": "where a model-only step's time goes: phases_ms, forward_by_tower_ms, kinds_ms, top_ops (absent "
    "with --no-profile)",
}
ZERO_SHOT_FIELDS = {
    **FIELDS,
    "batches": "timed batches",
    "images": "images timed with the pipeline",
    "split_encode": "a whole split encoded end to end: split, images, seconds, images_per_s",
    "decode_on_device": "whether each batch was decoded and preprocessed on the device (workers only read files)",
}
MACHINE_FIELDS = ("cpu", "cores", "gpu", "gpu_memory_bytes", "cuda", "versions", "git_commit", "created")
# Dense bf16 tensor-core peaks in TFLOP/s from NVIDIA's datasheets (their "with sparsity" figures halved),
# matched against torch.cuda.get_device_name(). Order matters (NVL/PCIe before the SXM forms); a name
# that matches nothing gets no peak: never a guess.
SPEC_BF16_TFLOPS: tuple[tuple[str, str, float], ...] = (
    (r"H100.*NVL", "H100 NVL", 835.0),
    (r"H100.*PCIe", "H100 PCIe", 756.0),
    (r"H100.*(SXM|HBM3)", "H100 SXM", 989.4),
    (r"H200.*NVL", "H200 NVL", 835.0),
    (r"H200", "H200 SXM", 989.4),
    (r"A100", "A100", 312.0),
    (r"L40S", "L40S", 362.0),
    (r"\bL40\b", "L40", 181.0),
    (r"\bL4\b", "L4", 121.0),
)


def spec_peak_tflops(device_name: str | None) -> tuple[float | None, str]:
    """``(dense bf16 TFLOP/s, what it is)`` for a GPU name; ``(None, why)`` for a CPU or an unknown GPU."""
    if not device_name:
        return None, NO_CPU_PEAK
    for pattern, label, tflops in SPEC_BF16_TFLOPS:
        if re.search(pattern, device_name, re.IGNORECASE):
            return tflops, f"{label} datasheet, dense bf16"
    return None, f"no spec peak known for {device_name!r}"


def device_name(device: str) -> str | None:
    """The GPU's name, or None on the CPU."""
    return torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else None


def count_flops(fn, *args) -> int:
    """FLOPs of one call of ``fn(*args)`` (forward and, if it runs one, backward), by ``FlopCounterMode``.

    The CPU's fused attention kernels are counted as their GPU twins are (``FlopCounterMode`` knows only
    the GPU ones), so that a CPU figure does not leave attention out.
    """
    aten = torch.ops.aten
    twins = {
        aten._scaled_dot_product_flash_attention_for_cpu: aten._scaled_dot_product_flash_attention,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: aten._scaled_dot_product_flash_attention_backward,
    }
    cpu_attention = {cpu: _already_wrapped(flop_registry[gpu]) for cpu, gpu in twins.items()}
    with FlopCounterMode(display=False, custom_mapping=cpu_attention) as counter:
        fn(*args)
    return counter.get_total_flops()


def _already_wrapped(formula):
    """A registered FLOP formula, marked so that ``FlopCounterMode`` does not wrap it a second time."""

    def raw(*args, **kwargs):
        return formula(*args, **kwargs)

    raw._get_raw = True
    return raw


def measured_matmul_tflops(
    device: str, dtype: torch.dtype, size: int | None = None, repeats: int | None = None, rounds: int = 3
) -> float:
    """TFLOP/s of a large square matmul in ``dtype`` on ``device``: the peak this machine actually reaches,
    so the best of ``rounds`` rounds counts (a round slowed by other processes says nothing of the peak)."""
    cuda = device.startswith("cuda")
    size, repeats = size or (8192 if cuda else 1024), repeats or (50 if cuda else 5)
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    a @ b  # warm-up (kernel selection)
    best = float("inf")
    for _ in range(rounds):
        sync(device)
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 * repeats / best / 1e12


def efficiency(flops_per_step: int, batch_size: int, images_per_s: float, spec: float | None, matmul: float) -> dict:
    """Achieved TFLOP/s at ``images_per_s`` and MFU against the spec peak (None without one) and the measured matmul."""
    achieved = flops_per_step * images_per_s / batch_size / 1e12
    return {"tflops_per_s": achieved, "mfu_spec": achieved / spec if spec else None, "mfu_matmul": achieved / matmul}


def reset_peak_memory(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(torch.device(device))


def peak_memory(device: str) -> dict:
    """GPU: ``torch.cuda.max_memory_allocated`` since the last reset. CPU: the process's peak resident set
    since it started (Linux ``ru_maxrss``), which includes everything the process did before."""
    if device.startswith("cuda"):
        return {"kind": "gpu max_memory_allocated", "bytes": torch.cuda.max_memory_allocated(torch.device(device))}
    return {
        "kind": "cpu process peak RSS (whole process)",
        "bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine(device: str) -> dict:
    """Where a figure was measured: CPU model and cores, GPU, package versions, commit, time."""
    gpu = device_name(device)
    versions = package_versions(("torch", "torchvision", "transformers", "peft", "datasets", "accelerate"))
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "gpu": gpu,
        "gpu_memory_bytes": torch.cuda.get_device_properties(torch.device(device)).total_memory if gpu else None,
        "cuda": torch.version.cuda if gpu else None,
        "versions": versions,
        "git_commit": git_commit(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def peaks(device: str, dtype: torch.dtype) -> dict:
    """The two MFU denominators: the datasheet peak (None on a CPU or an unknown GPU) and a measured matmul."""
    spec, source = spec_peak_tflops(device_name(device))
    return {
        "spec_peak_tflops": spec,
        "spec_peak_source": source,
        "matmul_tflops": measured_matmul_tflops(device, dtype),
        "matmul_dtype": str(dtype),
    }


def variant(
    images_per_s: float, flops: int | None = None, batch_size: int = 0, peak: dict | None = None, memory=None
) -> dict:
    """One measured row: images/s; with the step's FLOPs its TFLOP/s and MFU against ``peak``; its peak memory."""
    row = {"images_per_s": images_per_s}
    if flops is not None:
        row["efficiency"] = efficiency(flops, batch_size, images_per_s, peak["spec_peak_tflops"], peak["matmul_tflops"])
    if memory is not None:
        row["peak_memory"] = memory
    return row


def train_step(params, loss_of, device: str, fused: bool = False, autocast: bool | None = None):
    """``step(batch, clock=None)``: loss (bf16 autocast on a GPU, or where ``autocast`` says), backward, AdamW
    (``fused``: its fused kernel), as one training step of the benchmark. Each phase is a ``torch.profiler``
    range (:data:`PHASES`); ``clock(phase)``, when given, is called as each phase ends."""
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=fused or None)
    autocast = device.startswith("cuda") if autocast is None else autocast
    device_type = torch.device(device).type

    def step(batch: dict, clock=None) -> None:
        clock = clock or (lambda phase: None)
        with record_function(PHASES[0]):
            inputs = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
            with torch.autocast(device_type, dtype=torch.bfloat16) if autocast else contextlib.nullcontext():
                loss = loss_of(inputs)
        clock(PHASES[0])
        with record_function(PHASES[1]):
            loss.backward()
        clock(PHASES[1])
        with record_function(PHASES[2]):
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        clock(PHASES[2])

    return step


# --- the Hugging Face baseline (run_clip.py recipe) ---------------------------------------------------


def caption_dataset(split, taxonomy, text_type: str, template: str, tokenizer, preprocess):
    """``run_clip.py``'s data: one caption per image (its class prompt), tokenised once with ``map`` and
    padded to the maximum length (77), images decoded by Pillow in ``set_transform`` and preprocessed there, on
    the CPU, as the backbone's ``preprocess`` config says."""
    image_transform = T.Compose(
        [
            T.Resize(preprocess.resize_size, interpolation=T.InterpolationMode(preprocess.interpolation)),
            T.CenterCrop(preprocess.size),
            T.ToTensor(),
            T.Normalize(preprocess.mean, preprocess.std),
        ]
    )

    captions = [p for [p] in class_prompts(taxonomy, text_type, [template])]
    split = split.map(
        lambda b: tokenizer([captions[i] for i in b["label"]], padding="max_length", max_length=77, truncation=True),
        batched=True,
    )

    def transform(batch: dict) -> dict:
        batch["pixel_values"] = [image_transform(image.convert("RGB")) for image in batch["image"]]
        return batch

    split.set_transform(transform, columns=["image", "input_ids", "attention_mask"], output_all_columns=False)
    return split


def caption_collate(examples: list[dict]) -> dict:
    """``run_clip.py``'s ``collate_fn``."""
    return {
        "pixel_values": torch.stack([e["pixel_values"] for e in examples]),
        "input_ids": torch.tensor([e["input_ids"] for e in examples], dtype=torch.long),
        "attention_mask": torch.tensor([e["attention_mask"] for e in examples], dtype=torch.long),
        "return_loss": True,
    }


def baseline_loss(model, batch: dict) -> torch.Tensor:
    """The baseline's loss: ``CLIPModel``'s own contrastive loss over the batch's (image, caption) pairs."""
    return model(**batch).loss


# --- JSON and the README table ----------------------------------------------------------------------


def write_result(name: str, result: dict, out_dir: Path = RESULTS) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path


VARIANTS = {  # result key -> row label, in table order
    "model_only": "model only (synthetic tensors on the device)",
    "pipeline": "with the data pipeline",
    "baseline": "HF `run_clip.py`-style baseline, with its data",
    "loader_only": "data loader alone",
}


def _num(x: float | None, digits: int = 3) -> str:
    return "–" if x is None else f"{x:,.0f}" if x >= 100 else f"{x:.{digits}g}"


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.3g}%"


def _machine(m: dict) -> str:
    return f"{m['gpu']}, {m['cores']}-core {m['cpu']}" if m["gpu"] else f"{m['cores']}-core {m['cpu']}, no GPU"


def table_rows(result: dict) -> list[str]:
    """Markdown table rows, one per measured variant of one result file."""
    r, rows = result, []
    setup = f"`{r['model']}`, batch {r['batch_size']}, {r['dtype'].removeprefix('torch.')}, {r['num_workers']} worker{'s' if r['num_workers'] != 1 else ''}"
    set_levers = {k: v for k, v in (r.get("levers") or {}).items() if v is not False and v is not None}
    for key, label in VARIANTS.items():
        if key not in r:
            continue
        f, eff = r[key], r[key].get("efficiency") or {}
        mem = f.get("peak_memory")
        memory = f"{mem['bytes'] / 2**30:.2f} GiB, {mem['kind']}" if mem else ""
        # the baseline is the run_clip.py recipe: of the levers, only the LoRA it trains is the same; the loader
        # alone runs no step
        levers = {
            k: v
            for k, v in set_levers.items()
            if key not in ("baseline", "loader_only") or (key, k) == ("baseline", "lora_dropout")
        }
        where = setup + "".join(f", {k}" if v is True else f", {k}={v:g}" for k, v in levers.items())
        if (r.get("prepared") or {}).get("short_side") and key in ("pipeline", "baseline", "loader_only"):
            where += f", images prepared at short side ≤{r['prepared']['short_side']} px"
        if (r.get("device_decoding") or {}).get("on_device") and key == "pipeline":
            where += ", decoded on the device"
        rows.append(
            f"| {r['benchmark']} | {label} | {where} | {_machine(r['machine'])} | {_num(f['images_per_s'])} | "
            f"{_num(eff.get('tflops_per_s'))} | {_pct(eff.get('mfu_spec'))} | {_pct(eff.get('mfu_matmul'))} | {memory} |"
        )
    return rows


def notes(result: dict) -> str:
    """One bullet of what a result file measured besides the rows: FLOPs, peaks, ratios, split time."""
    r = result
    parts = [
        f"{_num(r['flops_per_step'] / 1e9)} GFLOP per {r['step']} (FlopCounterMode)",
        f"spec peak: {_num(r['spec_peak_tflops'])} TFLOP/s ({r['spec_peak_source']})",
        f"measured {r['matmul_dtype'].removeprefix('torch.')} matmul: {_num(r['matmul_tflops'])} TFLOP/s",
        f"with data / model only: {r['ratio']:.2f}",
    ]
    if "baseline" in r:
        parts.append(
            f"baseline: {_num(r['baseline']['flops_per_step'] / 1e9)} GFLOP per step; this project with "
            f"data / baseline with data: {r['speedup_vs_baseline']:.2f}×"
        )
    if "split_encode" in r:
        e = r["split_encode"]
        parts.append(
            f"whole {e['split']} split ({e['images']:,} images) encoded in {e['seconds']:.1f} s end to end"
            f" ({15600 * e['seconds'] / e['images']:.1f} s per 15.6k images at that rate)"
        )
    if "device_decoding" in r:
        c, d = r["device_decoding"], r["decoded_difference"]
        parts.append(
            f"--decode-on-device: {c['on_device']:,} images decoded on the device by {c['decoder']}, {c['on_cpu']:,} "
            f"on the CPU ({c['refused_by_device_decoder']:,} refused by the device's decoder); of the first "
            f"{d['images']} images ({d['on_device']} decoded on the device) the pixels are at most {d['max_abs']} grey "
            f"levels from the workers', {d['mean_abs']:.3f} on average"
        )
    if "profile" in r:
        p = r["profile"]
        parts.append(
            f"no profile: {p['error']}"
            if "error" in p
            else f"profile (model only, {p['steps']} steps): {profile_summary(p)}"
        )
    return (
        f"- {r['benchmark']} ({r['machine']['created']}, commit {r['machine']['git_commit']}): "
        + "; ".join(parts)
        + "."
    )


def render_table(results: list[dict]) -> str:
    """The README speed table and its notes, from result files."""
    lines = [
        "| benchmark | what | setup | machine | images/s | TFLOP/s | MFU (spec peak) | MFU (measured matmul) | peak memory |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for result in results:
        lines += table_rows(result)
    return "\n".join(lines + [""] + [notes(r) for r in results])


def update_readme(readme: Path, results_dir: Path = RESULTS) -> str:
    """Replace the README's speed table (between the bench-table markers) with one built from ``results_dir``."""
    files = sorted(results_dir.glob("*.json"))
    if not files:
        raise FileNotFoundError(f"no {results_dir}/*.json: run make bench-train and make bench-zero-shot first")
    text = readme.read_text()
    if TABLE_START not in text or TABLE_END not in text:
        raise ValueError(f"{readme} has no {TABLE_START} ... {TABLE_END} markers to put the speed table between")
    table = render_table([json.loads(f.read_text()) for f in files])
    head, rest = text.split(TABLE_START, 1)
    new = f"{head}{TABLE_START}\n{table}\n{TABLE_END}{rest.split(TABLE_END, 1)[1]}"
    readme.write_text(new)
    return table
