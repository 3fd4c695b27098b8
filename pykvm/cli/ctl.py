"""`pykvm ctl SOCKET ACTION [ARGS]`: one request to a running pykvm's --api-sock
(status, pause, resume, snapshot DIR, stats, stop), its JSON answer on stdout.

The request format and the client are pykvm/control/'s; exit status 0 when the
VM answered ok, 1 otherwise.
"""

from __future__ import annotations


def add_parser(commands) -> None:
    ctl = commands.add_parser(
        "ctl", help="talk to a running pykvm through its --api-sock",
        usage="pykvm ctl SOCKET ACTION [ARGS]",
        description="Send one request to `pykvm run --api-sock SOCKET` and print the JSON "
                    "response. ACTION: status, pause, resume, snapshot DIR, stats, stop.")
    ctl.add_argument("socket", metavar="SOCKET", help="the path given to --api-sock")
    ctl.add_argument("words", nargs="+", metavar="ACTION [ARGS]", help="what to do")
    ctl.set_defaults(handler=cmd_ctl)


def cmd_ctl(args) -> int:
    import json

    from ..control import parse_command, request

    response = request(args.socket, parse_command(args.words))
    print(json.dumps(response, indent=1))
    return 0 if response.get("ok") else 1
