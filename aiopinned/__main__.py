"""``python -m aiopinned`` (also the ``aiopinned`` command): ``info`` about this machine."""

from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="aiopinned", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="the backend, devices, versions, limits, and warnings")
    info.add_argument("--json", action="store_true", help="print JSON instead of text")
    args = parser.parse_args(argv)
    from ._info import gather, render

    found = gather()
    print(json.dumps(found.as_dict(), indent=2) if args.json else render(found))
    return 0


if __name__ == "__main__":
    sys.exit(main())
