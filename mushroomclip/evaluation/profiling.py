"""What a benchmark's training step spends its time on (issue 13's profile), beside its images/s.

Two views of a few steps on one fixed batch:
- phases: forward, backward and the optimizer step, timed with the device synchronised at each boundary (wall
  time; the kernels of one phase cannot overlap the next, which a GPU-bound step barely loses);
- operators, from ``torch.profiler``: the time of every operator's own kernels on a GPU (self CPU time on a
  CPU), by operator and by kind (matmul, attention, dropout, ...), and the forward time of each CLIP tower.
"""

from __future__ import annotations

import contextlib
import os
import re
import time

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, record_function

from mushroomclip.models.lora import TOWER_PREFIX

PHASES = ("step: forward", "step: backward", "step: optimizer")  # a training step's profiler ranges, in order
TOP_OPS = 12
TOWER_RANGE = "forward: {} tower"
# operator name -> kind, first match wins; the rest is "elementwise and other"
KINDS = (
    ("matmul", r"^aten::(mm|addmm|bmm|baddbmm|addbmm|matmul|linear|_scaled_mm)$"),
    ("attention", r"attention|scaled_dot_product"),
    ("convolution", r"conv"),
    ("dropout and random draws", r"bernoulli|dropout|rand"),
    ("normalisation", r"norm"),
    ("optimizer", r"adam|_foreach"),
    ("copy and cast", r"copy|clone|contiguous|^aten::(cat|stack|to)$"),
)
OTHER = "elementwise and other"


def sync(device: str) -> None:
    """Wait for the device's queued work (a no-op on the CPU)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize(torch.device(device))


def kind(op: str) -> str:
    """The kind of operator ``op`` (``aten::mm`` -> matmul) for the profile's breakdown."""
    return next((k for k, pattern in KINDS if re.search(pattern, op, re.IGNORECASE)), OTHER)


@contextlib.contextmanager
def tower_ranges(model):
    """Each CLIP tower's forward (``vision_model``, ``text_model``) as a profiler range while inside; nothing for
    a model without them (a supervised classifier)."""
    handles = []
    for tower, prefix in TOWER_PREFIX.items():
        module = next((m for name, m in model.named_modules() if name.split(".")[-1] == prefix), None)
        if module is None:
            continue
        ranges, label = [], TOWER_RANGE.format(tower)

        def enter(_module, _args, ranges=ranges, label=label):
            ranges.append(record_function(label).__enter__())

        def leave(_module, _args, _output, ranges=ranges):
            ranges.pop().__exit__(None, None, None)

        handles += [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def phase_times(step, batch: dict, device: str, steps: int) -> dict[str, float]:
    """Milliseconds per step of each phase of ``step`` (:data:`PHASES`), synchronised at each boundary."""
    total = dict.fromkeys(PHASES, 0.0)
    for _ in range(steps):
        sync(device)
        last = time.perf_counter()

        def clock(phase: str) -> None:
            nonlocal last
            sync(device)
            now = time.perf_counter()
            total[phase] += now - last
            last = now

        step(batch, clock)
    return {phase.removeprefix("step: "): 1e3 * seconds / steps for phase, seconds in total.items()}


def profile_step(step, batch: dict, device: str, model, steps: int = 3) -> dict:
    """Where one training step's time goes (this module's two views), after one warm-up step."""
    cuda = device.startswith("cuda")
    step(batch)
    phases = phase_times(step, batch, device, steps)
    activities = [ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * cuda
    if not cuda:  # Kineto's "gpuGetDeviceCount failed" on a machine without a GPU says nothing to act on
        os.environ.setdefault("KINETO_LOG_LEVEL", "5")
    with tower_ranges(model), profile(activities=activities) as prof:
        for _ in range(steps):
            step(batch)
        sync(device)
    return {"steps": steps, "phases_ms": phases, "step_ms": sum(phases.values())} | aggregate(
        prof.key_averages(), cuda, steps
    )


def aggregate(events, cuda: bool, steps: int) -> dict:
    """The operator view of ``torch.profiler``'s ``key_averages()`` over ``steps`` steps, in milliseconds a step.

    On a GPU each CPU-side operator carries the time of the kernels it launched itself (``self_device_time_total``),
    and the clock is every device-side event (kernels, copies, memsets; not the annotations' GPU spans, which
    include idle gaps); a tower's forward is its CPU-side range, whose ``device_time_total`` sums the kernels of the
    operators inside it. On a CPU: self CPU time, and the range's CPU time.
    """
    ours = set(PHASES) | {TOWER_RANGE.format(t) for t in TOWER_PREFIX}

    def own(e) -> float:  # microseconds
        return e.self_device_time_total if cuda else e.self_cpu_time_total

    cpu_side = [e for e in events if e.device_type == DeviceType.CPU]
    ops = [e for e in cpu_side if e.key not in ours]
    if cuda:
        device_side = (e for e in events if e.device_type != DeviceType.CPU and not getattr(e, "is_user_annotation", 0))
        clocked = sum(e.self_device_time_total for e in device_side)
        if not clocked:
            raise RuntimeError("the profiler recorded no GPU kernel: is CUPTI available? Or pass --no-profile")
    else:
        clocked = sum(own(e) for e in ops)
    per_step = 1e-3 / steps  # microseconds in all -> milliseconds per step
    kinds: dict[str, float] = {}
    for e in ops:
        kinds[kind(e.key)] = kinds.get(kind(e.key), 0.0) + own(e) * per_step
    top = sorted(ops, key=own, reverse=True)[:TOP_OPS]
    towers = {}
    for tower in TOWER_PREFIX:
        ranges = [e for e in cpu_side if e.key == TOWER_RANGE.format(tower)]
        if ranges:  # none for a model without that tower, or under torch.compile (its graph runs no module hooks)
            towers[tower] = sum(e.device_time_total if cuda else e.cpu_time_total for e in ranges) * per_step
    return {
        "clock": "GPU time of each operator's own kernels" if cuda else "self CPU time of each operator",
        "clocked_ms": clocked * per_step,
        "forward_by_tower_ms": towers,
        "kinds_ms": dict(sorted(kinds.items(), key=lambda kv: -kv[1])),
        "top_ops": [
            {"op": e.key, "ms": own(e) * per_step, "calls": e.count / steps, "kind": kind(e.key)}
            for e in top
            if own(e) > 0
        ],
    }


def summary(profile: dict) -> str:
    """One line of where the time goes: phases (wall time), then towers, kinds and top operators (shares of the
    profiler's clock)."""
    step = profile["step_ms"]
    phases = ", ".join(f"{name} {100 * ms / step:.0f}%" for name, ms in profile["phases_ms"].items())
    clocked = profile["clocked_ms"] or 1.0

    def share(ms: float) -> str:
        return f"{100 * ms / clocked:.0f}%"

    towers = ", ".join(f"{t} tower {share(ms)}" for t, ms in profile["forward_by_tower_ms"].items())
    kinds = ", ".join(f"{k} {share(ms)}" for k, ms in list(profile["kinds_ms"].items())[:5])
    ops = ", ".join(f"`{o['op']}` {share(o['ms'])}" for o in profile["top_ops"][:4])
    return (
        f"a step of {step:.1f} ms: {phases} (synchronised wall time); of the {profile['clock']} "
        f"({profile['clocked_ms']:.1f} ms a step): " + (f"forward of the {towers}; " if towers else "") + f"{kinds}; "
        f"top operators {ops}"
    )
