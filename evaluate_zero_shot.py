#!/usr/bin/env python
"""Zero-shot (and few-shot) evaluation on a prepared split: see ``python evaluate_zero_shot.py --help``."""

import sys

from mushroomclip.cli import run_program


def main(argv: list[str] | None = None) -> int:
    """``mushroomclip evaluate``'s ``main``, imported when called: under :func:`run_program`, so that even what the
    imports print meets a reader who left early without a traceback."""
    from mushroomclip.commands.evaluate import main as run

    return run(argv)


if __name__ == "__main__":
    sys.exit(run_program(main))
