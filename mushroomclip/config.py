"""YAML config files under argparse: the file sets defaults, command-line flags override them.

Keys are validated once, here at the edge: a typo names the key and the nearest valid one.
"""

from __future__ import annotations

import argparse
import difflib
from pathlib import Path

import yaml


class ConfigError(ValueError):
    """A config file is missing, malformed, or has an unknown key."""


def unknown_key_message(key: str, valid: list[str], where: str) -> str:
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"unknown key {key!r} in {where}{hint} (valid keys: {', '.join(sorted(valid))})"


def parse_with_config(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """Parse ``argv``; values from ``--config FILE`` (YAML, keys = flag names with ``_``) become defaults."""
    args = parser.parse_args(argv)
    if not getattr(args, "config", None):
        return args
    path = Path(args.config)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path} must hold a mapping of keys to values")
    valid = [a.dest for a in parser._actions if a.dest not in ("help", "config")]
    for key in values:
        if key not in valid:
            raise ConfigError(unknown_key_message(key, valid, str(path)))
    parser.set_defaults(**{k: ",".join(map(str, v)) if isinstance(v, list) else v for k, v in values.items()})
    return parser.parse_args(argv)
