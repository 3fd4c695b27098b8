"""The `pykvm` command. Thin: it parses options into a MachineConfig, hands it
to the library, and turns typed errors into one-line messages and exit codes.

One module per subcommand, as kvmtool has one ``builtin-*.c`` per command:
``run.py`` (boot a guest), ``check.py`` (can this host run pykvm), ``ctl.py``
and ``stat.py`` (talk to a running pykvm's --api-sock), ``exec.py`` (``exec``
and ``cp`` through the guest agent); ``observers.py`` and ``stop.py`` are the
parts of ``run`` that watch a guest and end a run; ``logs.py`` shows what the
library logs as one line per record. ``guest``, ``cache``,
``image`` and ``firecracker`` add their parsers from their own packages
(pykvm/guestimage/cli.py, pykvm/warm/cli.py, pykvm/distro/cli.py,
pykvm/api/firecracker/cli.py). This module only assembles the parser and owns
the one place where an error becomes one line and an exit status.

Every subcommand module imports what its command needs inside its handler, so
``pykvm --help`` and a run's start-up pay only for the parsers
(bench/startup.py, bench/memory.py).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from ..errors import PykvmError, first_line

EXIT_USAGE = 2

# Each subcommand's module and the function that adds its parser, in --help's order. A
# command builds only its own parser: the others' modules, argparse parsers and the
# gettext lookup argparse makes for each of their strings cost every `pykvm run` ~5 ms of
# start-up (bench/startup.py); `pykvm --help` and an unknown command build them all.
SUBCOMMANDS = ((("guest",), "..guestimage.cli", "add_parser"),
               (("cache",), "..warm.cli", "add_parser"),
               (("firecracker",), "..api.firecracker.cli", "add_parser"),
               (("image",), "..distro.cli", "add_parser"),
               (("check",), ".check", "add_parser"),
               (("run",), ".run", "add_parser"),
               (("ctl",), ".ctl", "add_parser"),
               (("stat",), ".stat", "add_parser"),
               (("exec", "cp"), ".exec", "add_parsers"))

__all__ = ["main", "build_parser", "exit_status", "first_line", "EXIT_USAGE"]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command_args = None
    if "--" in argv:
        split = argv.index("--")
        argv, command_args = argv[:split], argv[split + 1:]
    parser = build_parser(argv[0] if argv else None)
    args = parser.parse_args(argv)
    if not hasattr(args, "handler"):
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    args.command_args = command_args
    from .logs import install
    install()           # what the library logs: one "pykvm: ..." line per record (logs.py)
    try:
        return args.handler(args)
    except PykvmError as error:
        print(f"pykvm: error: {first_line(error)}", file=sys.stderr)
        return exit_status(error)
    except KeyboardInterrupt:
        print("pykvm: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 141
    except Exception as error:  # a bug in pykvm: still one line, the traceback on request
        if os.environ.get("PYKVM_DEBUG"):
            raise
        print(f"pykvm: internal error: {type(error).__name__}: {first_line(error)} "
              "(set PYKVM_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1


def exit_status(error: PykvmError) -> int:
    """One convention (README, "exit statuses"): 2 when what the user handed pykvm is
    wrong (an option, the configuration, an image, a snapshot to restore, a --device
    that is not KVM), else the error's own status (1: pykvm or KVM failed)."""
    from ..snapshot.state import SnapshotError

    if isinstance(error, SnapshotError):
        return EXIT_USAGE
    return error.exit_code


class VersionAction(argparse.Action):
    """--version, with pykvm.__version__ read only when asked (it costs start-up time)."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, help="show pykvm's version and exit")

    def __call__(self, parser, namespace, values, option_string=None):
        from .. import __version__
        print(f"pykvm {__version__}")
        parser.exit()


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """pykvm's parser; with ``command`` (the first word of the command line) naming a
    subcommand, only that subcommand's parser is built (SUBCOMMANDS), else all of them."""
    parser = argparse.ArgumentParser(
        prog="pykvm", description="A userspace virtual machine monitor in Python on top of KVM.")
    parser.add_argument("--version", action=VersionAction)
    commands = parser.add_subparsers(metavar="COMMAND")

    known = any(command in names for names, _, _ in SUBCOMMANDS)
    for names, module, add in SUBCOMMANDS:
        if not known or command in names:
            getattr(importlib.import_module(module, __name__), add)(commands)
    return parser
