#!/usr/bin/env python
"""Prepare the Kaggle download: the same program as ``mushroomclip prepare`` (mushroomclip/commands/prepare.py)."""

import sys

from mushroomclip.cli import run_program


def main(argv: list[str] | None = None) -> int:
    """``mushroomclip prepare``'s ``main``, imported when called: under :func:`run_program`, so that even what the
    imports print meets a reader who left early without a traceback."""
    from mushroomclip.commands.prepare import main as run

    return run(argv)


if __name__ == "__main__":
    sys.exit(run_program(main))
