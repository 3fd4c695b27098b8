"""`pykvm stat SOCKET [-i SECONDS]`: the --stats table of a running pykvm, live,
through its --api-sock (the ``stats`` request of pykvm/control/), once or every
SECONDS until interrupted.
"""

from __future__ import annotations

import sys
import time


def add_parser(commands) -> None:
    stat = commands.add_parser(
        "stat", help="the --stats table of a running pykvm, live, through its --api-sock")
    stat.add_argument("socket", metavar="SOCKET", help="the path given to --api-sock")
    stat.add_argument("-i", "--interval", type=float, default=0,
                      help="print it again every SECONDS until interrupted")
    stat.set_defaults(handler=cmd_stat)


def cmd_stat(args) -> int:
    """The --stats table of a running VM, through its control socket, once or every N s."""
    from ..control import request
    from ..observe.report import format_report
    from ..observe.stats import from_answer

    while True:
        response = request(args.socket, {"action": "stats"})
        if not response.get("ok"):
            print(f"pykvm: error: {response.get('error', 'the VM did not answer')}",
                  file=sys.stderr)
            return 1
        stats = from_answer(response.get("vcpus"))
        print(format_report(stats, {"state": response.get("state", "?")}), flush=True)
        if not args.interval:
            return 0
        time.sleep(args.interval)
