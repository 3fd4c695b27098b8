"""``pykvm-firecracker`` (and ``pykvm firecracker``): Firecracker's command line.

    pykvm-firecracker [--api-sock PATH] [--id ID] [--config-file FILE [--no-api]]
                      [--no-seccomp] [--level L] [--log-path P] [--show-level]
                      [--show-log-origin] [--metadata FILE] [--mmds-size-limit BYTES]
                      [--boot-timer] [--version]

The API socket is served until the microVM stops; then the process exits, as
Firecracker does, with the guest's status (0 for a reboot or power-off). "API server
started." is logged once the socket accepts connections: clients wait for it (or
for the socket file). Errors are one line on stderr and a non-zero exit.
"""

from __future__ import annotations

import argparse
import signal
import sys

from . import FIRECRACKER_API_VERSION, LEVELS

DEFAULT_API_SOCK = "/run/firecracker.socket"
DEFAULT_ID = "anonymous-instance"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--api-sock", default=DEFAULT_API_SOCK, metavar="PATH",
                        help=f"the API's Unix socket (default {DEFAULT_API_SOCK})")
    parser.add_argument("--id", default=DEFAULT_ID,
                        help=f"the microVM's id, in GET / and log lines (default {DEFAULT_ID})")
    parser.add_argument("--config-file", metavar="FILE",
                        help="configure and start the microVM from FILE (the API's resources "
                             "as one JSON object: boot-source, drives, machine-config, ...)")
    parser.add_argument("--no-api", action="store_true",
                        help="serve no API socket (needs --config-file)")
    parser.add_argument("--no-seccomp", action="store_true",
                        help="no seccomp filters on pykvm's threads")
    parser.add_argument("--level", default="Info", type=str.title,
                        choices=[level for level in LEVELS] + ["Warn"],
                        help="log level (default Info)")
    parser.add_argument("--log-path", metavar="PATH",
                        help="log to PATH, an existing file or named pipe (default stderr)")
    parser.add_argument("--show-level", action="store_true", help="log lines name their level")
    parser.add_argument("--show-log-origin", action="store_true",
                        help="log lines name their source file and line")
    parser.add_argument("--metadata", metavar="FILE",
                        help="the MMDS data store's contents at start (a JSON object)")
    parser.add_argument("--mmds-size-limit", type=int, default=51200, metavar="BYTES",
                        help="the MMDS data store's size limit (default 51200)")
    parser.add_argument("--boot-timer", action="store_true",
                        help="accepted; pykvm has no boot-timer device yet")
    parser.add_argument("--version", action="store_true",
                        help="print the Firecracker API version implemented and pykvm's, exit")
    parser.add_argument("--device", default="/dev/kvm", help=argparse.SUPPRESS)


def add_parser(commands) -> None:
    """``pykvm firecracker`` in pykvm's subcommands."""
    parser = commands.add_parser(
        "firecracker", help="serve Firecracker's API and command line (pykvm-firecracker)",
        description="A microVM driven through Firecracker's REST API on a Unix socket "
                    "(docs/firecracker.md says what is supported).")
    add_arguments(parser)
    parser.set_defaults(handler=run)


def version_line() -> str:
    from ... import __version__
    return f"Firecracker v{FIRECRACKER_API_VERSION} (pykvm-firecracker, pykvm {__version__})"


def run(args) -> int:
    """The process: the API (and/or --config-file) until the microVM stops."""
    from ... import sandbox
    from ...errors import ConfigError
    from .http import ApiServer
    from .logs import Log
    from .vmm import Vmm

    if args.version:
        print(version_line())
        return 0
    if args.no_api and not args.config_file:
        raise ConfigError("--no-api needs --config-file (nothing else could start the microVM)")
    sandbox.configure(enabled=not args.no_seccomp)
    log = Log(args.id, args.level, show_level=args.show_level, show_origin=args.show_log_origin)
    if args.log_path:
        log.configure(args.log_path, args.level, args.show_level, args.show_log_origin)
    vmm = Vmm(args.id, log, kvm_device=args.device, stdin=sys.stdin.buffer,
              stdout=sys.stdout.buffer)
    vmm.mmds.store.size_limit = args.mmds_size_limit
    if args.metadata:
        vmm.mmds.load_file(args.metadata)        # the MMDS data store's first contents
    previous = {sig: signal.signal(sig, lambda signum, frame: vmm.end())
                for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        server = None
        if not args.no_api:
            server = ApiServer(args.api_sock, vmm)
            log.info("API server started.")
        try:
            if args.config_file:
                vmm.apply_config_file(args.config_file)
                stop = vmm.start_here()
            else:
                stop = vmm.serve_main()
        finally:
            if server is not None:
                server.close()
    finally:
        vmm.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if stop is None:
        return 0
    if stop.kind in ("error", "crash"):
        print(f"pykvm-firecracker: error: {stop.message}", file=sys.stderr)
        return stop.status or 1
    return 0 if stop.kind in ("reset", "poweroff", "halt", "user") else stop.status


def main(argv: list[str] | None = None) -> int:
    """The ``pykvm-firecracker`` console script."""
    from ...errors import PykvmError, first_line

    parser = argparse.ArgumentParser(prog="pykvm-firecracker",
                                     description="pykvm behind Firecracker's API and flags")
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except PykvmError as error:
        print(f"pykvm-firecracker: error: {first_line(error)}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        return 130
