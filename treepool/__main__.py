"""Command line: `python -m treepool info` and `python -m treepool demo`."""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m treepool", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, active backend and compiled kernels")
    demo = sub.add_parser(
        "demo", help="train MAML, TreeMAML, Learned TreeMAML and Reptile on hierarchical "
                     "regression and print their final query MSE and time per meta-step")
    from .demo import add_arguments

    add_arguments(demo)
    args = parser.parse_args(argv)
    if args.command == "info":
        from .info import format_info

        print(format_info())
    elif args.command == "demo":
        from .demo import main as demo_main

        return demo_main(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
