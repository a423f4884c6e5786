#!/usr/bin/env python
"""Fine-tune CLIP with LoRA: ``python train.py --config configs/tiny.yaml`` (see mushroomclip/commands/train.py)."""

import sys

from mushroomclip.cli import command_main, run_program

main = command_main("train")

if __name__ == "__main__":
    sys.exit(run_program(main))
