"""Command line: `python -m treepool info`."""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m treepool", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, active backend and compiled kernels")
    args = parser.parse_args(argv)
    if args.command == "info":
        from .info import format_info

        print(format_info())
    return 0


if __name__ == "__main__":
    sys.exit(main())
