"""New species from a few photos: SimpleShot on a run's held-out species, original vs fine-tuned backbone.

    mushroomclip novel --run runs/tiny-openset --shots 1,5,10 --seeds 5

The run must have been trained with ``data.holdout_species``; results go to RUN/novel_species/ (or --output):
metrics.json, summary.md / summary.json and novel_species.png. See docs/evaluation.md.
"""

from __future__ import annotations

import sys

from transformers import HfArgumentParser

from mushroomclip.commands import console_logging
from mushroomclip.evaluation.novel import NovelArguments, evaluate_novel
from mushroomclip.models.backbones import ModelLoadError


def main(argv: list[str] | None = None) -> int:
    """0 when done, 2 with one ``error:`` line when the run or the data cannot be used."""
    parser = HfArgumentParser(NovelArguments, description=__doc__.split("\n\n")[0])
    [args] = parser.parse_args_into_dataclasses(argv, look_for_args_file=False)
    try:
        with console_logging():
            rows = evaluate_novel(args)
    except (ValueError, FileNotFoundError, ModelLoadError) as err:  # NovelSpeciesError, AdapterError: ValueErrors
        print(f"error: {err}", file=sys.stderr)
        return 2
    output = args.output or f"{args.run}/novel_species"
    print(f"\n{len(rows)} rows: {output}/summary.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
