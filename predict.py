#!/usr/bin/env python
"""Identify mushroom species in photos: the same program as ``mushroomclip predict`` (mushroomclip/commands/predict.py)."""

import sys

from mushroomclip.cli import command_main, run_program

main = command_main("predict")

if __name__ == "__main__":
    sys.exit(run_program(main))
