"""``python -m aiopinned`` (also the ``aiopinned`` command): ``info`` about this machine, and
``bench`` for its core figures."""

from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="aiopinned", description=" ".join(__doc__.split()))
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="the backend, devices, versions, limits, and warnings")
    info.add_argument("--json", action="store_true", help="print JSON instead of text")
    bench = sub.add_parser("bench", help="cache hit, pinning, copies, wake-up, against torch")
    bench.add_argument("--quick", action="store_true", help="seconds, not a minute")
    bench.add_argument("--json", action="store_true", help="print JSON instead of a table")
    bench.add_argument("--plot", metavar="FILE.png", help="draw wake latencies and pin times")
    args = parser.parse_args(argv)
    if args.command == "bench" and args.plot:
        from ._bench import pyplot

        try:  # (before the benchmark runs, not after)
            pyplot()
        except ImportError as exc:
            parser.error(str(exc))
    if args.command == "info":
        from ._info import gather, render

        found = gather()
        print(json.dumps(found.as_dict(), indent=2) if args.json else render(found))
        return 0
    import anyio

    from . import _bench

    report = anyio.run(_bench.run, args.quick)
    print(json.dumps(report.as_dict(), indent=2) if args.json else _bench.render(report))
    if args.plot:
        _bench.plot(report, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
