#!/usr/bin/env python
"""Publish the web app as a Hugging Face Space: app.py, the mushroomclip package and this folder's README
(front matter) and requirements.txt, with the model to serve as the Space variable MUSHROOMCLIP_MODEL.

python spaces/deploy.py USER/mushroomclip USER/mushroomclip-lora-b32   # token: HF_TOKEN or `hf auth login`
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def stage(folder: Path) -> None:
    """The Space's files, laid out as the Space expects them (app.py and README.md at its root)."""
    shutil.copy(ROOT / "app.py", folder)
    shutil.copytree(ROOT / "mushroomclip", folder / "mushroomclip", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("README.md", "requirements.txt"):
        shutil.copy(ROOT / "spaces" / name, folder)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("space", help="Space repo id, USER/NAME (created if missing)")
    p.add_argument("model", help="what the Space serves: a Hub adapter repo id or zero-shot:<backbone>")
    p.add_argument("--private", action="store_true")
    args = p.parse_args(argv)
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(args.space, repo_type="space", space_sdk="gradio", private=args.private, exist_ok=True)
    with tempfile.TemporaryDirectory() as folder:
        stage(Path(folder))
        api.upload_folder(repo_id=args.space, repo_type="space", folder_path=folder)
    api.add_space_variable(args.space, "MUSHROOMCLIP_MODEL", args.model)
    print(f"https://huggingface.co/spaces/{args.space}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
