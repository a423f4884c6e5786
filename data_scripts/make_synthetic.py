#!/usr/bin/env python
"""Write a small fake Kaggle download (same layout, real species names, a learnable signal per class).

python data_scripts/make_synthetic.py --output demo/kaggle --classes 6 --per-class 40
python data_scripts/make_synthetic.py --output bench/genus --classes 20 --per-class 60 --genus-signal
"""

from __future__ import annotations

import argparse
import os
import sys


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--output", required=True, help="folder to write (replaced if it exists)")
    p.add_argument("--classes", type=int, default=6, help="number of species, spread over the taxonomy")
    p.add_argument("--per-class", type=int, default=40, help="mean images per species (each varies 0.5x-1.5x)")
    p.add_argument("--size", type=int, default=64, help="image side in pixels")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--corrupt", type=int, default=0, help="truncated JPEGs to add to train.csv")
    p.add_argument(
        "--dirty",
        action="store_true",
        help="also add a non-image, a missing file, an unknown label, "
        "a cross-split and a within-split duplicate, and an empty class folder",
    )
    p.add_argument("--num-proc", type=int, default=os.cpu_count() or 1, help="parallel worker processes")
    p.add_argument(
        "--genus-signal",
        action="store_true",
        help="draw the species in genus groups whose members share a colour family (shape and background still "
        "differ), so mistake severity can be compared between losses",
    )
    p.add_argument("--taxonomy", default=None, help="species table CSV to draw names from instead of the bundled one")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from mushroomclip.data.synthetic import make_synthetic_download
    from mushroomclip.taxonomy import TaxonomyError, load_taxonomy

    try:
        manifest = make_synthetic_download(
            args.output,
            classes=args.classes,
            per_class=args.per_class,
            size=args.size,
            seed=args.seed,
            taxonomy=load_taxonomy(args.taxonomy),
            corrupt=args.corrupt,
            dirty=args.dirty,
            num_proc=args.num_proc,
            genus_signal=args.genus_signal,
        )
    except (TaxonomyError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(
        f"wrote {manifest['images']} images of {len(manifest['species'])} species ({args.size}px) to {args.output}; "
        f"train.csv has {manifest['train_csv_rows']} rows (oversampled)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
