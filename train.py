#!/usr/bin/env python
"""Fine-tune CLIP with LoRA: ``python train.py --config configs/tiny.yaml`` (see mushroomclip/commands/train.py)."""

import sys

from mushroomclip.cli import run_program


def main(argv: list[str] | None = None) -> int:
    """``mushroomclip train``'s ``main``, imported when called: under :func:`run_program`, so that even what the
    imports print meets a reader who left early without a traceback."""
    from mushroomclip.commands.train import main as run

    return run(argv)


if __name__ == "__main__":
    sys.exit(run_program(main))
