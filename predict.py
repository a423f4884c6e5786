#!/usr/bin/env python
"""Identify mushroom species in photos: the same program as ``mushroomclip predict`` (mushroomclip/commands/predict.py)."""

import sys

from mushroomclip.commands.predict import main

if __name__ == "__main__":
    sys.exit(main())
