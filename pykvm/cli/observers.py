"""The observing options of `pykvm run` (--trace, --symbols, --stats-interval,
--stats-plot, --profile, --gdb) and what the command prints around them.

The wiring itself is library code that the pytest plugin and scripts share:
pykvm/observe/wiring.py (:class:`~pykvm.observe.wiring.Observation`: tracer, KVM's
counters, the periodic table, the plot) and pykvm/gdb/stub.py. :class:`Observers`
only turns the options into those and says on stderr where gdb waits and where the
plot went.
"""

from __future__ import annotations

import sys


def add_observing_options(group) -> None:
    """--trace, --symbols, --stats-interval, --stats-plot, --gdb (pykvm/observe/, pykvm/gdb/)."""
    from ..observe.trace_filter import FILTER_HELP

    group.add_argument("--trace", nargs="?", const="-", metavar="FILE",
                       help="one line per exit to pykvm (time, vCPU, reason, port/address, "
                            "size, value, device, time taken, the guest instruction and its "
                            "symbol) to FILE, or to stderr without one")
    group.add_argument("--trace-filter", action="append", metavar="TERMS",
                       help="only trace these exits (implies --trace). " + FILTER_HELP)
    group.add_argument("--symbols", metavar="FILE",
                       help="name guest addresses in the trace as func+0xoff: an ELF file "
                            "(vmlinux, a tutorial guest's .elf) or a System.map")
    group.add_argument("--stats-interval", type=float, metavar="SECONDS",
                       help="print the --stats table to stderr every SECONDS while the guest runs")
    group.add_argument("--stats-plot", metavar="FILE",
                       help="draw the statistics into FILE.svg or FILE.png at exit "
                            "(needs matplotlib: pip install 'pykvm[plot]')")
    group.add_argument("--profile", metavar="FILE",
                       help="sample every vCPU's instruction pointer (--profile-hz times a "
                            "second) and keep FILE updated with the samples by symbol "
                            "(--symbols), guest user mode as [user]: where a boot's time goes")
    group.add_argument("--profile-hz", type=float, default=50.0, metavar="HZ",
                       help="samples per second and vCPU for --profile (default 50)")
    group.add_argument("--gdb", metavar="PATH|tcp:PORT",
                       help="serve gdb on the Unix socket PATH (yours only); the VM starts "
                            "paused until gdb connects (gdb FILE.elf -ex 'target remote PATH')."
                            " tcp:PORT or HOST:PORT serve TCP instead, which any local user "
                            "can reach (a warning says so)")


class Observers:
    """What `pykvm run` attaches to a machine to watch it: pykvm.observe's wiring
    (tracer, KVM's counters, periodic stats, the plot) and the gdb stub. Released on
    every exit path."""

    def __init__(self, args):
        from ..observe.wiring import Observation, ObserveOptions

        self.args = args
        self.stub = self.gdb = None
        if args.gdb is not None:
            from ..gdb.listen import GdbAddress
            self.gdb = GdbAddress.parse(args.gdb)
        self.watch = Observation(ObserveOptions(
            trace=args.trace, trace_filter=tuple(args.trace_filter or ()), symbols=args.symbols,
            stats=args.stats, stats_interval=args.stats_interval, stats_plot=args.stats_plot,
            profile=args.profile, profile_hz=args.profile_hz))
        self.tracer = self.watch.tracer

    def attach(self, machine) -> None:
        self.watch.attach(machine.vm)
        if self.args.gdb is not None:
            from ..gdb.stub import GdbStub
            self.stub = GdbStub(machine.vm, self.gdb)
            self.stub.attach()
            where = self.stub.address
            if where.tcp:
                print(f"pykvm: warning: the gdb stub on TCP {where.describe()} has no "
                      "authentication: any local user can take over the guest",
                      file=sys.stderr, flush=True)
            print(f"pykvm: the VM waits for gdb on {where.describe()} "
                  f"(gdb -ex 'target remote {where.gdb_target()}')", file=sys.stderr, flush=True)

    def finish(self) -> None:
        self.watch.finish()

    def plot(self, wall_s: float) -> None:
        path = self.watch.plot(wall_s)
        if path is not None:
            print(f"pykvm: statistics drawn in {path}", file=sys.stderr)

    def __enter__(self) -> "Observers":
        return self

    def __exit__(self, *exc) -> None:
        if self.stub is not None:
            self.stub.close()
        self.watch.close()
