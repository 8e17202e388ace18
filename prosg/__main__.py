"""Command line: ``prosg <command>`` (also ``python -m prosg``)."""

from __future__ import annotations

import argparse
import sys


def _info(_args: argparse.Namespace) -> int:
    import prosg

    for key, value in prosg.backends().items():
        print(f"{key:18} {value}")
    return 0


def _selftest(_args: argparse.Namespace) -> int:
    from prosg.selftest import selftest

    selftest()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prosg", description=__doc__)
    debug_help = "on an error, show the traceback, not just the one-line message"
    parser.add_argument("--debug", action="store_true", help=debug_help)
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="print what this build holds (backends, archs, torch)")
    info.set_defaults(func=_info)
    check = sub.add_parser("selftest", help="run each op once against its float64 reference and print the errors")
    check.set_defaults(func=_selftest)
    # The method's commands (pretrain, train, eval, demo) register themselves.
    from prosg.method.cli import add_commands

    add_commands(sub)
    for command in sub.choices.values():
        # also after the command; SUPPRESS: not given there, it leaves the global value alone
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=debug_help)
    return parser


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    # These carry messages written for the user; anything else is likely a bug, so say what it was.
    if isinstance(e, (ValueError, OSError, FloatingPointError, RuntimeError)) and text:
        return text
    return f"{type(e).__name__}: {text} (unexpected; --debug shows the traceback)"


def main(argv: list[str] | None = None) -> int:
    """Runs a command; an error is printed as one line ``prosg: error: ...`` and raised
    as :class:`prosg.method.cli.CLIError` (status 2: usage, 1: runtime; a SystemExit
    that carries the message), or with ``--debug`` re-raised as it is."""
    from prosg.method.cli import CLIError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except CLIError as e:
        print(f"prosg: error: {e}", file=sys.stderr)
        if args.debug:
            import traceback

            traceback.print_exception(e)
        raise
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("prosg: error: interrupted", file=sys.stderr)
        raise CLIError("interrupted", 130) from None
    except Exception as e:
        if args.debug:
            raise
        message = _one_line(e)
        print(f"prosg: error: {message}", file=sys.stderr)
        raise CLIError(message, 1) from e


if __name__ == "__main__":
    sys.exit(main())
