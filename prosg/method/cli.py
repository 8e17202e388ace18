"""Command-line entry points of the method (``prosg pretrain|train|eval|demo``)."""

from __future__ import annotations

import argparse


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Adds the method's subcommands to ``prosg``'s parser."""
