"""Publish a MushroomCLIP run to the Hugging Face Hub: adapter, model card and classes.json.

mushroomclip push runs/lora-b32 --repo-id USER/mushroomclip-lora-b32 [--private]     (or: python -m mushroomclip.hub push ...)

The token comes from the environment (HF_TOKEN) or ``hf auth login`` only, never from a flag.
"""

from __future__ import annotations

import argparse
import sys

from mushroomclip.hub import PushError, push_run


def main(argv: list[str] | None = None) -> int:
    """Upload one finished run; exit 2 with one line when it is unfinished or the upload fails."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", help="runs/<name> written by train.py")
    p.add_argument("--repo-id", required=True, help="USER/NAME on the Hub")
    p.add_argument("--private", action="store_true", help="create the repo as private")
    args = p.parse_args(argv)
    try:
        print(f"pushed: {push_run(args.run_dir, args.repo_id, private=args.private)}")
    except (FileNotFoundError, PushError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
