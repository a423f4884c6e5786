#!/usr/bin/env python
"""Zero-shot (and few-shot) evaluation on a prepared split: see ``python evaluate_zero_shot.py --help``."""

import sys

from mushroomclip.commands.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
