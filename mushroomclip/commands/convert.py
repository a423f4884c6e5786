"""Convert an open_clip model (e.g. BioCLIP) into a transformers CLIPModel folder.

mushroomclip convert --model bioclip --output models/bioclip-hf --check     (or: python -m mushroomclip.models.convert ...)
mushroomclip convert --model bioclip-2 --output models/bioclip-2-hf --check --push-to-hub USER/bioclip-2-hf
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mushroomclip.hub import PushError
from mushroomclip.models.backbones import ModelLoadError
from mushroomclip.models.convert import (
    CHECK_TOLERANCE,
    ConversionError,
    check_folder,
    convert_source,
    push_converted,
    recipe,
    save_converted,
    source_spec,
)


def main(argv: list[str] | None = None) -> int:
    """Convert, optionally check and publish; exit 0, 1 when the check fails, 2 on a source that cannot be used."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--model",
        required=True,
        help="bioclip, bioclip-2, or an open_clip name (hf-hub:imageomics/bioclip, ViT-B-16, ...)",
    )
    p.add_argument("--pretrained", default=None, help="open_clip pretrained tag for plain architecture names")
    p.add_argument("--output", required=True, help="folder to write the CLIPModel, image processor and tokenizer to")
    p.add_argument(
        "--check",
        action="store_true",
        help="reload the written folder and the source model (independently) and compare their embeddings; "
        f"exit 1 above {CHECK_TOLERANCE:g}",
    )
    p.add_argument(
        "--push-to-hub",
        metavar="USER/NAME",
        help="also publish the folder as this Hub repo (with a card "
        "crediting the source and its license); runs trained on it name it as model.base_hub_id",
    )
    p.add_argument("--private", action="store_true", help="with --push-to-hub: create the repo as private")
    args = p.parse_args(argv)
    spec = source_spec(args.model, args.pretrained)
    try:
        hf, processor, weights = convert_source(args.model, spec)
    except ModelLoadError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except ConversionError as err:
        print(f"error: could not convert {args.model}: {err}", file=sys.stderr)
        return 2
    out = Path(args.output)
    save_converted(hf, processor, recipe(spec, weights), out)
    print(
        f"wrote {out} from {weights} (vision {hf.config.vision_config.hidden_act}, mean {processor.image_processor.image_mean})"
    )
    if args.check:
        diff = check_folder(args.model, spec, out)
        print(f"max |difference| of normalised embeddings, {out} (reloaded) vs {args.model} (loaded again): {diff:.2e}")
        if not diff <= CHECK_TOLERANCE:
            print(
                f"error: {out} does not reproduce {args.model} (difference {diff:.2e} > {CHECK_TOLERANCE:g}); do not use it",
                file=sys.stderr,
            )
            return 1
    if args.push_to_hub:
        try:
            print(
                f"pushed: {push_converted(out, args.push_to_hub, args.private)} (train on it with "
                f"model.base_hub_id={args.push_to_hub})"
            )
        except PushError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    return 0
