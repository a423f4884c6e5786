"""``python -m mushroomclip COMMAND ...``: the ``mushroomclip`` command without its installed script."""

import sys

from mushroomclip.cli import main

sys.exit(main())
