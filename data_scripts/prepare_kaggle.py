#!/usr/bin/env python
"""Prepare the Kaggle download: the same program as ``mushroomclip prepare`` (mushroomclip/commands/prepare.py)."""

import sys

from mushroomclip.commands.prepare import main

if __name__ == "__main__":
    sys.exit(main())
