"""`pykvm exec` and `pykvm cp`: run a command in, or copy files into and out of, the
guest of a running `pykvm run --agent --api-sock SOCKET`.

Both send one request to the control socket (pykvm/control/), which hands it to
the guest agent (pykvm/agent/). ``exec`` exits with the command's status (128+N
for signal N, 127 not found, 124 on --timeout); ``cp`` names guest paths
``guest:PATH`` and moves directories as tar streams.
"""

from __future__ import annotations

import os
import sys


def add_parsers(commands) -> None:
    run_in = commands.add_parser(
        "exec", help="run a command in a running guest (through its --api-sock and --agent)",
        usage="pykvm exec --api-sock SOCKET [options] -- CMD [ARGS...]",
        description="Run a command in the guest of `pykvm run --agent --api-sock SOCKET`. Its "
                    "stdout and stderr go to pykvm's own, and pykvm exits with its status "
                    "(128+N if signal N killed it, 127 if it was not found, 124 on --timeout). "
                    "One word after -- is a shell command line (/bin/sh -c); several are the "
                    "exact argv.")
    run_in.add_argument("--api-sock", required=True, metavar="SOCKET",
                        help="the path given to `pykvm run --api-sock`")
    run_in.add_argument("-t", "--timeout", type=float, metavar="SECONDS",
                        help="kill the command in the guest after SECONDS; exit 124")
    run_in.add_argument("-i", "--stdin", action="store_true",
                        help="send pykvm's stdin to the command (read to its end first; up "
                             "to 48 KiB: copy bigger input in with `pykvm cp`)")
    run_in.add_argument("-e", "--env", action="append", default=[], metavar="NAME=VALUE",
                        help="set an environment variable for the command (repeatable)")
    run_in.add_argument("-w", "--cwd", metavar="DIR", help="the working directory (default /)")
    run_in.set_defaults(handler=cmd_exec)

    copy = commands.add_parser(
        "cp", help="copy a file or directory into or out of a running guest",
        usage="pykvm cp --api-sock SOCKET SRC DST",
        description="Copy between this host and the guest of `pykvm run --agent --api-sock "
                    "SOCKET`. Guest paths are written guest:PATH, e.g. `pykvm cp --api-sock s "
                    "./dir guest:/root/dir` or `pykvm cp --api-sock s guest:/var/log/x .`. "
                    "Directories travel as tar streams (the guest's busybox tar).")
    copy.add_argument("--api-sock", required=True, metavar="SOCKET",
                      help="the path given to `pykvm run --api-sock`")
    copy.add_argument("source", metavar="SRC")
    copy.add_argument("destination", metavar="DST")
    copy.set_defaults(handler=cmd_cp)


GUEST_PREFIX = "guest:"
CONTROL_MARGIN = 120.0     # seconds the socket waits beyond a command's own timeout


def cmd_exec(args) -> int:
    import base64

    from ..control import ControlError, request
    from ..errors import ConfigError

    words = args.command_args
    if not words:
        raise ConfigError("pykvm exec: give the command after --")
    message: dict = {"action": "exec"}
    if len(words) == 1:
        message["command"] = words[0]
    else:
        message["argv"] = words
    if args.stdin:
        message["stdin"] = base64.b64encode(sys.stdin.buffer.read()).decode()
    if args.env:
        env = {}
        for item in args.env:
            name, equals, value = item.partition("=")
            if not name or not equals:
                raise ConfigError(f"--env {item!r}: use NAME=VALUE")
            env[name] = value
        message["env"] = env
    if args.cwd:
        message["cwd"] = args.cwd
    if args.timeout is not None:
        if args.timeout <= 0:
            raise ConfigError("--timeout must be a positive number of seconds")
        message["timeout"] = args.timeout
    wait = (args.timeout if args.timeout is not None else 7 * 86400.0) + CONTROL_MARGIN
    response = request(args.api_sock, message, timeout=wait)
    if not response.get("ok"):
        raise ControlError(response.get("error") or "the exec request failed")
    for stream, key in ((sys.stdout.buffer, "stdout"), (sys.stderr.buffer, "stderr")):
        stream.write(base64.b64decode(response.get(key) or ""))
        stream.flush()
    if response.get("timed_out"):
        print(f"pykvm: {response.get('error') or 'the command timed out'}", file=sys.stderr)
        return 124
    status = response.get("status")
    return status if isinstance(status, int) else 1


def cmd_cp(args) -> int:
    from ..control import ControlError, request
    from ..errors import ConfigError

    source, destination = args.source, args.destination
    into_guest = destination.startswith(GUEST_PREFIX)
    if into_guest == source.startswith(GUEST_PREFIX):
        raise ConfigError("pykvm cp: exactly one of SRC and DST is a guest:PATH")
    if into_guest:
        message = {"action": "copy_in", "host_path": os.path.abspath(source),
                   "guest_path": destination[len(GUEST_PREFIX):]}
    else:
        message = {"action": "copy_out", "guest_path": source[len(GUEST_PREFIX):],
                   "host_path": os.path.abspath(destination)}
    response = request(args.api_sock, message, timeout=3600 + CONTROL_MARGIN)
    if not response.get("ok"):
        raise ControlError(response.get("error") or "the copy failed")
    return 0
