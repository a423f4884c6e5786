"""Turn the Kaggle "Mushroom species recognition" download into a Hugging Face ImageFolder.

mushroomclip prepare --source data/kaggle --output data/mushrooms     (or: python data_scripts/prepare_kaggle.py ...)
"""

from __future__ import annotations

import argparse
import os
import sys

from mushroomclip.data.prepare import PrepareArguments, PrepareError, format_summary, prepare
from mushroomclip.taxonomy import TaxonomyError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, one flag per field of :class:`~mushroomclip.data.prepare.PrepareArguments`."""
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--source",
        required=True,
        help="the unzipped Kaggle download: holds train.csv, val.csv, test.csv "
        "and merged_dataset/<species>/ (directly or in one sub-folder)",
    )
    p.add_argument(
        "--output", required=True, help="folder to write the ImageFolder to (created; re-runs reuse finished files)"
    )
    p.add_argument(
        "--split",
        choices=("official", "random"),
        default="official",
        help="official: the Kaggle CSVs; random: a stratified 80/10/10 split of every image under merged_dataset/",
    )
    p.add_argument("--seed", type=int, default=42, help="seed of the random split (same seed, same files)")
    p.add_argument(
        "--keep-oversampling",
        action="store_true",
        help="keep train.csv's repeated rows (as repeated metadata rows) for parity with runs that used it as is",
    )
    p.add_argument(
        "--max-side",
        type=int,
        default=512,
        help="with --copy-mode resize, re-encode images whose long side is larger, once; 0 keeps every size",
    )
    p.add_argument(
        "--short-side",
        type=int,
        default=0,
        help="with --copy-mode resize, also re-encode images whose short side is larger, down to it (e.g. 256 for "
        "224 px models: fewer pixels to decode at every epoch); 0 (default): no limit",
    )
    p.add_argument(
        "--copy-mode",
        choices=("resize", "copy", "link"),
        default="resize",
        help="resize: copy, re-encoding large or EXIF-rotated images; copy: bytes as they are; "
        "link: hard links (symbolic across file systems), no extra disk",
    )
    p.add_argument("--jpeg-quality", type=int, default=90, help="JPEG quality of re-encoded images")
    p.add_argument("--num-proc", type=int, default=os.cpu_count() or 1, help="parallel worker processes")
    p.add_argument("--taxonomy", default=None, help="species table CSV to use instead of the bundled one")
    p.add_argument(
        "--allow-outside-source",
        action="store_true",
        help="read files outside --source (symbolic links out of it, CSV paths leading out of it) "
        "instead of skipping them as outside_source",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Prepare the folder and print its summary; exit 2 with one line on a source or option that cannot be used."""
    args = parse_args(argv)
    try:
        options = PrepareArguments(
            source=args.source,
            output=args.output,
            split=args.split,
            seed=args.seed,
            keep_oversampling=args.keep_oversampling,
            max_side=args.max_side,
            short_side=args.short_side,
            copy_mode=args.copy_mode,
            jpeg_quality=args.jpeg_quality,
            num_proc=args.num_proc,
            taxonomy=args.taxonomy,
            allow_outside_source=args.allow_outside_source,
            progress=not args.no_progress,
        )
        report = prepare(options)
    except (PrepareError, TaxonomyError, ValueError, OSError) as err:  # OSError: names the file it could not use
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_summary(report))
    return 0
