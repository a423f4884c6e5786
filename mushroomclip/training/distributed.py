"""Several CPU training processes from ``accelerate launch --cpu --num_processes N``.

accelerate starts CPU ranks only through MPI (``--mpirun_hostfile``); without it, ``--cpu
--num_processes 2`` starts ONE process that trains alone (huggingface/accelerate#2741). ``train.py``
notices that case, reads N from the launcher's own command line (with accelerate's own parser),
and starts N ranks with ``torch.distributed.run`` instead, which train over gloo.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import subprocess
import sys
from pathlib import Path

# Set in every process of a distributed launch (torchrun, mpirun with Open MPI / MPICH / MVAPICH).
WORLD_SIZE_VARS = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


def _launch_args(cmdline: list[str]) -> list[str] | None:
    """The arguments after ``accelerate launch`` (or ``accelerate-launch``, ``-m accelerate.commands.launch``)."""
    for i, token in enumerate(cmdline):
        name = Path(token).name
        if token == "launch" and i > 0 and Path(cmdline[i - 1]).name == "accelerate":
            return cmdline[i + 1 :]
        if name == "accelerate-launch" or token == "accelerate.commands.launch":
            return cmdline[i + 1 :]
    return None


def _parse_launch(cmdline: list[str]) -> argparse.Namespace | None:
    """``accelerate launch``'s own parse of its command line, or None when it is not one."""
    args = _launch_args(cmdline)
    if args is None:
        return None
    from accelerate.commands.launch import launch_command_parser

    try:
        with contextlib.redirect_stderr(io.StringIO()):
            return launch_command_parser().parse_args(args)
    except SystemExit:
        return None


def _parent_cmdline() -> list[str]:
    try:
        import psutil

        return psutil.Process(os.getppid()).cmdline()
    except Exception:  # no psutil, or the parent is gone / not ours to read
        return []


def requested_cpu_processes(cmdline: list[str]) -> int:
    """How many processes an ``accelerate launch`` command line asks for (1 if it cannot tell)."""
    parsed = _parse_launch(cmdline)
    if parsed is None:
        return 1
    if parsed.mpirun_hostfile or (parsed.num_machines or 1) > 1:
        return 1  # MPI or several machines: accelerate's own business
    if parsed.num_processes is not None:
        return parsed.num_processes
    if parsed.config_file:
        import yaml

        with contextlib.suppress(OSError, yaml.YAMLError, AttributeError):
            config = yaml.safe_load(Path(parsed.config_file).read_text()) or {}
            if (config.get("mpirun_config") or {}).get("mpirun_hostfile") or (config.get("num_machines") or 1) > 1:
                return 1
            return int(config.get("num_processes") or 1)
    return 1


def unstarted_cpu_ranks() -> int:
    """N > 1 when this process is the single one that ``accelerate launch --cpu --num_processes N`` started."""
    if os.environ.get("ACCELERATE_USE_CPU", "").lower() not in ("true", "1"):
        return 0
    if any(var in os.environ for var in WORLD_SIZE_VARS):
        return 0  # already one rank of a distributed launch
    n = requested_cpu_processes(_parent_cmdline())
    return n if n > 1 else 0


def launcher_repeats_failures(cmdline: list[str] | None = None) -> bool:
    """Whether ``accelerate launch`` (single process, no ``-q``) will re-raise our exit status as a traceback."""
    if any(var in os.environ for var in WORLD_SIZE_VARS):
        return False
    parsed = _parse_launch(_parent_cmdline() if cmdline is None else cmdline)
    return parsed is not None and not parsed.quiet


def spawn_cpu_ranks(n: int, script_and_args: list[str]) -> int:
    """Run the script as ``n`` CPU ranks (gloo) with ``torch.distributed.run``; its exit status."""
    print(f"note: accelerate launch --cpu starts one process unless MPI is configured; starting {n} CPU ranks "
          "(gloo) with torch.distributed.run instead", file=sys.stderr, flush=True)  # fmt: skip
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(n),
           "--master_addr", os.environ.get("MASTER_ADDR", "127.0.0.1"),
           "--master_port", os.environ.get("MASTER_PORT", "29500"), *script_and_args]  # fmt: skip
    return subprocess.call(cmd)
