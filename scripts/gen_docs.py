#!/usr/bin/env python
"""Regenerate the shell completions (completions/) and the man page (man/nanovlm.1) from the Typer app.

Run after adding or changing a command or option:  python scripts/gen_docs.py
`--check` writes nothing and exits 1 when a committed file differs from what the app generates (CI, tests).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from nanovlm_cli.cli.docs import generate_all, stale_outputs

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report files that are out of date")
    args = parser.parse_args()
    if args.check:
        stale = stale_outputs(ROOT)
        for path in stale:
            print(f"out of date: {path}; run `python scripts/gen_docs.py`", file=sys.stderr)
        return 1 if stale else 0
    for path, text in generate_all().items():
        target = ROOT / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
        print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
