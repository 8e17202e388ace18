"""Command line: ``prosg <command>`` (also ``python -m prosg``)."""

from __future__ import annotations

import argparse
import sys


def _info(_args: argparse.Namespace) -> int:
    import prosg

    for key, value in prosg.backends().items():
        print(f"{key:18} {value}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prosg", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="print what this build holds (backends, archs, torch)")
    info.set_defaults(func=_info)
    # The method's commands (pretrain, train, eval, demo) register themselves.
    from prosg.method.cli import add_commands

    add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
