#!/usr/bin/env python
"""Zero-shot (and few-shot) evaluation on a prepared split: see ``python evaluate_zero_shot.py --help``."""

import sys

from mushroomclip.cli import command_main, run_program

main = command_main("evaluate")

if __name__ == "__main__":
    sys.exit(run_program(main))
