"""The command-line programs: each module's main(argv) is one subcommand of the mushroomclip console script."""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator


class ConsoleLines(logging.StreamHandler):
    """Each message as one write of its text and newline to the current ``sys.stdout``: the ranks of a
    multi-process run share one pipe, and a caller may have swapped stdout since the handler was added."""

    def __init__(self):
        super().__init__()
        self.setLevel(logging.INFO)  # debug messages go only where a user sends them
        self.setFormatter(logging.Formatter("%(message)s"))

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, _) -> None:
        pass


@contextlib.contextmanager
def console_logging() -> Iterator[None]:
    """The package's INFO messages on stdout as plain lines while a command runs (the library only logs), and
    only there: not also through a root handler that a dependency's ``logging.warning`` call installs. Which
    process speaks is the loggers' business (the main process only, for progress)."""
    package = logging.getLogger("mushroomclip")
    handler, level, propagate = ConsoleLines(), package.level, package.propagate
    package.addHandler(handler)
    if level == logging.NOTSET:  # a level set before (e.g. DEBUG to compare ranks) stays
        package.setLevel(logging.INFO)
    package.propagate = False
    try:
        yield
    finally:
        package.removeHandler(handler)
        package.setLevel(level)
        package.propagate = propagate
