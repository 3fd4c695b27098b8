"""Attaching observers to a VM: the one place that wires tracer, KVM's counters,
the periodic table and the plot, for every caller.

`pykvm run` (cli.py) calls it with its options; the pytest plugin, the control
socket or a script can do the same with an :class:`ObserveOptions` and a
:class:`~pykvm.vstate.vm.Vm`. The life cycle follows the VM's:

1. ``Observation(options)`` before the VM exists: checks every option (a bad
   --trace-filter, --symbols or --stats-plot is a ConfigError, exit status 2,
   before anything boots) and opens the trace file; :attr:`Observation.tracer`
   goes to ``build_for_boot(config, tracer=...)`` or ``Vm(tracer=...)``;
2. :meth:`Observation.attach` once the vCPUs exist and *before* they run (the
   run loop reads ``vm.hooks`` and ``vm.timing`` when it starts): KVM's stats
   fds, per-exit timing, the periodic printer, the symbols for stop messages;
3. :meth:`Observation.finish` when the guest stopped: the last KVM counters;
   then :meth:`Observation.report` and :meth:`Observation.plot`;
4. :meth:`Observation.close` (or the ``with`` block) on every exit path.

Data flows one way: the run loop writes ``vcpu.stats`` and calls the tracer (an exit
hook, pykvm/vstate/hooks.py);
this module and everything it wires only read.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import ConfigError
from .trace_filter import TraceFilter

if TYPE_CHECKING:   # each observer is imported when a run asks for it (start-up time)
    from .kvmstats import KernelCounters, KvmStats
    from .profile import RipSampler
    from .report import StatsPrinter
    from .symbols import SymbolTable
    from .trace import Tracer


@dataclass(frozen=True)
class ObserveOptions:
    """What to watch; the names are `pykvm run`'s options."""

    trace: str | None = None                 # --trace FILE ('-': stderr)
    trace_filter: tuple[str, ...] = ()       # --trace-filter TERMS (a filter alone traces)
    symbols: str | None = None               # --symbols FILE (ELF or System.map)
    stats: bool = False                      # --stats: the table when the guest stops
    stats_interval: float | None = None      # --stats-interval SECONDS
    stats_plot: str | None = None            # --stats-plot FILE.svg|png
    profile: str | None = None               # --profile FILE: sampled RIPs by symbol
    profile_hz: float = 50.0                 # --profile-hz: samples per second per vCPU

    @property
    def tracing(self) -> bool:
        return self.trace is not None or bool(self.trace_filter)

    @property
    def counting(self) -> bool:
        """Whether anything reads the time split and KVM's counters."""
        return bool(self.stats or self.stats_interval or self.stats_plot)


class Observation:
    """The observers of one VM, from its options to their release."""

    def __init__(self, options: ObserveOptions, *, out=None):
        self.options = options
        self.out = out if out is not None else sys.stderr   # where tables go (user output)
        self.tracer: Tracer | None = None
        self.symbols: SymbolTable | None = None
        self.kernel: KvmStats | None = None
        self.kernel_snapshot: KernelCounters | None = None
        self.printer: StatsPrinter | None = None
        self.sampler: RipSampler | None = None
        self.vm = None
        if options.stats_interval is not None and not options.stats_interval > 0:
            raise ConfigError("--stats-interval must be a positive number of seconds")
        if options.stats_plot:
            from .plot import check_path
            check_path(options.stats_plot)
        if options.profile:
            from .profile import check_options
            check_options(options.profile, options.profile_hz)
        trace_filter = TraceFilter.parse(list(options.trace_filter))
        if options.symbols:
            from .symbols import load
            self.symbols = load(options.symbols)
        if options.tracing:
            from .trace import Tracer
            self.tracer = Tracer.to_path(options.trace, filter=trace_filter, symbols=self.symbols)

    def attach(self, vm) -> None:
        """Wire into ``vm``, whose vCPUs exist and have not run yet."""
        self.vm = vm
        if self.symbols is not None:   # names the RIP of an instruction the host refused
            vm.quirks.symbols = self.symbols
        if self.tracer is not None:
            vm.hooks.add(self.tracer)    # once, if Vm(tracer=...) had it already
        if self.options.counting or self.tracer is not None:
            vm.timing = True
        if self.options.counting:
            from .kvmstats import KvmStats
            self.kernel = KvmStats(vm)
        if self.options.stats_interval:
            from .report import StatsPrinter
            host_kind = vm.kvm.host_kind
            self.printer = StatsPrinter(vm, self.options.stats_interval, self.kernel, self.out,
                                        lambda: {"host kind": host_kind})
            self.printer.start()
        if self.options.profile:
            from .profile import RipSampler
            self.sampler = RipSampler(vm, self.options.profile, self.options.profile_hz,
                                      self.symbols)
            self.sampler.start()

    def finish(self) -> None:
        """The guest stopped: stop the periodic table, read KVM's counters once more."""
        if self.printer is not None:
            self.printer.stop()
        if self.sampler is not None:
            self.sampler.stop()
        if self.kernel is not None:
            self.kernel_snapshot = self.kernel.snapshot()

    def report(self, extra: dict | None = None) -> str:
        """The --stats table of the attached VM (after :meth:`finish`)."""
        from .report import format_report
        return format_report([vcpu.stats for vcpu in self.vm.vcpus],
                             {"host kind": self.vm.kvm.host_kind, **(extra or {})},
                             kernel=self.kernel_snapshot)

    def plot(self, wall_s: float) -> Path | None:
        """Draw --stats-plot, if asked for; its path."""
        if not self.options.stats_plot:
            return None
        from .plot import plot_stats
        return plot_stats(self.options.stats_plot, [v.stats for v in self.vm.vcpus],
                          kernel=self.kernel_snapshot, host_kind=self.vm.kvm.host_kind,
                          wall_s=wall_s)

    def close(self) -> None:
        if self.printer is not None:
            self.printer.stop()
        if self.sampler is not None:
            self.sampler.stop()
        if self.tracer is not None:
            self.tracer.close()

    def __enter__(self) -> "Observation":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
