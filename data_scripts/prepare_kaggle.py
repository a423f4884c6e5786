#!/usr/bin/env python
"""Prepare the Kaggle download: the same program as ``mushroomclip prepare`` (mushroomclip/commands/prepare.py)."""

import sys

from mushroomclip.cli import command_main, run_program

main = command_main("prepare")

if __name__ == "__main__":
    sys.exit(run_program(main))
