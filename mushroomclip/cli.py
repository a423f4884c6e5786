"""The ``mushroomclip`` command: ``mushroomclip COMMAND [ARGS]`` runs one program's ``main(ARGS)``.

Each program is imported only when it is chosen, so ``mushroomclip --help`` answers at once and a program's
own ``--help`` (``mushroomclip train --help``) lists its flags.
"""

from __future__ import annotations

import difflib
import importlib
import os
import sys

from mushroomclip import __version__

#: command -> (module whose ``main(argv) -> int`` runs it, what it does)
COMMANDS = {
    "prepare": ("mushroomclip.commands.prepare", "turn the Kaggle download into a prepared ImageFolder"),
    "evaluate": ("mushroomclip.commands.evaluate", "zero-shot, few-shot and linear-probe benchmark of models"),
    "train": ("mushroomclip.commands.train", "LoRA fine-tuning from a YAML config"),
    "predict": ("mushroomclip.commands.predict", "identify the species in photos with an adapter"),
    "push": ("mushroomclip.commands.push", "publish a trained run to the Hugging Face Hub"),
    "convert": ("mushroomclip.commands.convert", "convert an open_clip model (BioCLIP) into a transformers CLIPModel"),
    "novel": ("mushroomclip.commands.novel", "few-shot on a run's held-out species: original vs fine-tuned backbone"),
    "baselines": ("mushroomclip.evaluation.baselines", "majority-class and colour-histogram baselines"),
    "benchmark": ("mushroomclip.evaluation.benchmark", "speed measurements and the results tables"),
}


def usage() -> str:
    """The top-level help: every command with its one-line summary."""
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {summary}" for name, (_, summary) in COMMANDS.items()]
    return "\n".join(
        [
            "usage: mushroomclip COMMAND [ARGS ...]",
            "",
            "Mushroom species recognition with CLIP, BioCLIP and LoRA.",
            "",
            "commands:",
            *lines,
            "",
            "mushroomclip COMMAND --help lists the flags of a command.",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    """Run the command named by ``argv[0]`` with the rest of ``argv``; its exit status, 2 for an unknown one."""
    return run_program(_run, argv)


def run_program(program, argv: list[str] | None = None) -> int:
    """``program(argv)``'s exit status, and 1 without a traceback when the reader of stdout leaves early
    (``mushroomclip --help | head``, ``python predict.py photos/ | head``). The top-level scripts run through it."""
    try:
        status = program(argv)
        sys.stdout.flush()  # here, not at exit, so that a closed pipe is caught below
        return status
    except BrokenPipeError:  # the reader took what it wanted and left
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error from the exit's flush
        return 1


def command_main(name: str):
    """``mushroomclip NAME``'s ``main(argv)``, its module imported when it is called: the top-level scripts
    (``predict.py`` ...) run it under :func:`run_program`, so that even what the imports print meets a reader who
    left early without a traceback."""

    def main(argv: list[str] | None = None) -> int:
        return importlib.import_module(COMMANDS[name][0]).main(argv)

    return main


def _run(argv: list[str] | None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    if argv[0] == "--version":
        print(f"mushroomclip {__version__}")
        return 0
    name, args = argv[0], argv[1:]
    if name not in COMMANDS:
        close = difflib.get_close_matches(name, COMMANDS, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        print(f"error: unknown command {name!r}; {hint}choose one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    program = importlib.import_module(COMMANDS[name][0])
    # argparse names the program after sys.argv[0]: "mushroomclip predict" in the command's usage and errors; the
    # results' provenance records sys.argv as the command ("mushroomclip predict ARGS", not "... predict predict ...")
    saved, sys.argv = sys.argv, [f"mushroomclip {name}", *args]
    try:
        return program.main(args)
    finally:
        sys.argv = saved
