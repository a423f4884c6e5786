#!/usr/bin/env python
"""Identify mushroom species in photos: the same program as ``mushroomclip predict`` (mushroomclip/commands/predict.py)."""

import sys

from mushroomclip.cli import run_program


def main(argv: list[str] | None = None) -> int:
    """``mushroomclip predict``'s ``main``, imported when called: under :func:`run_program`, so that even what the
    imports print meets a reader who left early without a traceback."""
    from mushroomclip.commands.predict import main as run

    return run(argv)


if __name__ == "__main__":
    sys.exit(run_program(main))
