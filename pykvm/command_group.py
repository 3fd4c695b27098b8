"""A ``pykvm`` subcommand whose actions are subcommands of their own (``pykvm guest
build``, ``pykvm image debian``, ``pykvm cache list``).

Given without an action such a group prints its help to stderr and exits 2, pykvm's
status for a usage error (README, "exit statuses"): argparse alone would leave the
namespace without a handler, and every group would otherwise repeat that fallback.
"""

from __future__ import annotations

import argparse
import sys

EXIT_USAGE = 2


def add_group(commands, name: str, metavar: str, **kwargs) -> argparse._SubParsersAction:
    """Add the group ``name`` to ``commands`` (pykvm's subparsers; ``kwargs`` go to its
    ``add_parser``) and return the group's own subparsers for its actions."""
    group = commands.add_parser(name, **kwargs)
    group.set_defaults(handler=lambda args: usage(group))
    return group.add_subparsers(metavar=metavar)


def usage(parser: argparse.ArgumentParser) -> int:
    """``parser``'s help on stderr; the usage-error exit status."""
    parser.print_help(sys.stderr)
    return EXIT_USAGE
