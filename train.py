#!/usr/bin/env python
"""Fine-tune CLIP with LoRA: ``python train.py --config configs/tiny.yaml`` (see mushroomclip/commands/train.py)."""

import sys

from mushroomclip.commands.train import main

if __name__ == "__main__":
    sys.exit(main())
