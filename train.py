#!/usr/bin/env python
"""Placeholder: this entry point lands with its issue (see README, "Roadmap")."""

import sys

if __name__ == "__main__":
    print(f"{sys.argv[0]}: not implemented yet; see the README's roadmap", file=sys.stderr)
    sys.exit(2)
