#!/usr/bin/env python
"""Identify mushroom species in photos with a MushroomCLIP LoRA adapter.

python predict.py photo1.jpg photo2.jpg --adapter runs/lora-b32 --top-k 5
python predict.py photo.jpg --adapter USER/mushroomclip-lora-b32 --format json
"""

from __future__ import annotations

import argparse
import json
import sys

WARNING = ("WARNING: {names} among the candidates {verb} {kinds}. Never eat a wild mushroom on the word of a model: "
           "ask an expert.")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--adapter", required=True, help="run folder (runs/<name>) or Hub repo id of a MushroomCLIP adapter")
    p.add_argument("--top-k", type=int, default=5, help="candidates per image")
    p.add_argument("--format", choices=("table", "json"), default="table", help="output format")
    p.add_argument("--base", default=None, help="base model to check the adapter against (default: the one it names)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, ...")
    p.add_argument(
        "--merge", metavar="DIR", default=None, help="also export a merged CLIPModel (merge_and_unload) to DIR"
    )
    args = p.parse_args(argv)

    from PIL import Image, UnidentifiedImageError

    from mushroomclip.lora import AdapterError, load_classifier
    from mushroomclip.models import ModelLoadError

    images = []
    for path in args.images:
        try:
            with Image.open(path) as im:
                images.append(im.convert("RGB"))
        except (FileNotFoundError, UnidentifiedImageError, OSError) as err:
            print(f"error: cannot read image {path}: {err}", file=sys.stderr)
            return 2
    try:
        classifier = load_classifier(args.adapter, base=args.base, device=args.device)
    except (AdapterError, ModelLoadError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    results = classifier.predict(images, top_k=args.top_k)
    tax = classifier.taxonomy
    records = [
        {"image": path, "predictions": [
            {"species": p.species, "common_name": tax[p.species].common_name, "probability": round(p.probability, 4),
             "edibility": tax[p.species].edibility, "lineage": tax.lineage(p.species)} for p in preds]}
        for path, preds in zip(args.images, results)
    ]  # fmt: skip
    if args.format == "json":
        print(json.dumps(records, indent=2))
    for record in records:
        if args.format == "table":
            print(f"\n{record['image']}")
            for rank, pred in enumerate(record["predictions"], start=1):
                lineage = pred["lineage"]
                print(f"  {rank}. {pred['species']:<28} {pred['common_name']:<28} {100 * pred['probability']:5.1f}%  "
                      f"{pred['edibility']:<12} {lineage['family']} < {lineage['order']} < {lineage['class']}")  # fmt: skip
        dangerous = [
            f"{q['species']} ({q['edibility']})"
            for q in record["predictions"]
            if q["edibility"] in ("deadly", "poisonous")
        ]
        if dangerous:
            kinds = "deadly or poisonous"
            print(
                WARNING.format(names=", ".join(dangerous), verb="is" if len(dangerous) == 1 else "are", kinds=kinds),
                file=sys.stderr,
            )
    if args.merge:
        merged = classifier.backbone.model.merge_and_unload()
        merged.save_pretrained(args.merge)
        print(f"merged CLIPModel written to {args.merge}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
