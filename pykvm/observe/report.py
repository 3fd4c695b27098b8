"""The --stats table: pykvm's per-vCPU counts next to KVM's own, as text.

Only reads: a list of :class:`~.stats.VcpuStats` the run loop filled and, when
asked for, a :meth:`~.kvmstats.KvmStats.snapshot`. Printed once when the guest
stops, or every few seconds while it runs (:class:`StatsPrinter`,
``--stats-interval``); `pykvm stat` prints the same table from the numbers a
running pykvm sends over its control socket. The stream written to is the
output the user asked for, not a log.
"""

from __future__ import annotations

import threading
import time

from .kvmstats import (CANNOT_SEPARATE, VCPU_COUNTERS, Counters, KernelCounters, KvmStats,
                       kernel_split)
from .stats import VcpuStats


def format_report(stats: list[VcpuStats], extra: dict | None = None,
                  kernel: KernelCounters | None = None) -> str:
    """The human-readable --stats table. ``kernel``: a KvmStats snapshot, whose
    per-vCPU counters are shown next to pykvm's own."""
    lines = []
    for index, st in enumerate(stats):
        wall = st.wall_ns or 1
        lines.append(f"vCPU {st.vcpu_id}: {st.total_exits} exits to pykvm in "
                     f"{st.wall_ns / 1e9:.3f} s wall")
        if st.guest_ns or st.handler_ns:
            lines.append(f"  time: guest (inside KVM_RUN, incl. in-kernel exits) "
                         f"{st.guest_ns / 1e9:.3f} s ({100 * st.guest_ns / wall:.1f}%), "
                         f"pykvm handlers {st.handler_ns / 1e9:.3f} s "
                         f"({100 * st.handler_ns / wall:.1f}%), "
                         f"other {st.other_ns / 1e9:.3f} s ({100 * st.other_ns / wall:.1f}%)")
        else:
            lines.append("  time: not measured (per-exit timing is on with --stats, "
                         "--trace or --api-sock)")
        for name, n in sorted(st.exits_by_name().items(), key=lambda item: -item[1]):
            lines.append(f"  exit {name:<16} {n:>10}")
        for device, n in sorted(st.devices.items(), key=lambda item: -item[1]):
            lines.append(f"  device {device:<14} {n:>10}")
        for (port, direction), n in sorted(st.pio.items(), key=lambda item: -item[1])[:16]:
            lines.append(f"  port {port:#06x} {direction:<4}      {n:>10}")
        for (addr, kind), n in sorted(st.mmio.items(), key=lambda item: -item[1])[:16]:
            lines.append(f"  mmio {addr:#014x} {kind:<5} {n:>10}")
        if st.unhandled_pio or st.unhandled_mmio:
            lines.append(f"  unhandled: {st.unhandled_pio} port accesses, "
                         f"{st.unhandled_mmio} MMIO accesses (reads gave all-ones, writes dropped)")
        for kind, n in sorted(st.quirks.items()):
            lines.append(f"  completed by pykvm: {kind:<20} {n:>8}")
        counters = kernel.vcpu(index) if kernel is not None else None
        if counters is not None:
            lines.extend(format_vcpu(counters, st.total_exits))
    if kernel is not None:
        if kernel.available:
            vm_counters = {name: value for name, value in kernel.vm.items()
                           if isinstance(value, int) and value}
            if vm_counters:
                lines.append("KVM (kernel), whole VM: " + ", ".join(
                    f"{name} {value}" for name, value in sorted(vm_counters.items())))
            lines.append(f"note: {CANNOT_SEPARATE}")
        else:
            lines.append(f"KVM (kernel) counters: unavailable ({kernel.reason})")
    for key, value in (extra or {}).items():
        lines.append(f"{key}: {value}")
    return "\n".join(lines)


def format_vcpu(kvm_vcpu: Counters, pykvm_exits: int, indent: str = "  ") -> list[str]:
    """Lines for one vCPU's KVM counters, for the --stats table."""
    split = kernel_split(kvm_vcpu, pykvm_exits)
    lines = []
    if split:
        lines.append(f"{indent}KVM (kernel): {split['kvm_exits']} VM exits counted, "
                     f"{split['to_pykvm']} reached pykvm, {split['signal_exits']} were returns "
                     f"for a signal, so ~{split['in_kernel']} were finished inside KVM")
    shown = []
    for name in VCPU_COUNTERS:
        value = kvm_vcpu.get(name)
        if isinstance(value, int) and value and name != "exits":
            shown.append(f"{name} {value}")
    for name, value in sorted(kvm_vcpu.items()):
        if name not in VCPU_COUNTERS and isinstance(value, int) and value \
                and not name.endswith("_ns") and name not in ("blocking", "guest_mode"):
            shown.append(f"{name} {value}")
    for start in range(0, len(shown), 5):
        lines.append(f"{indent}  kvm: " + ", ".join(shown[start:start + 5]))
    halted = kvm_vcpu.get("halt_wait_ns")
    if isinstance(halted, int) and halted:
        lines.append(f"{indent}  kvm: halted in the kernel (halt_wait_ns) {halted / 1e9:.3f} s "
                     f"of the guest time")
    return lines


class StatsPrinter:
    """`--stats-interval SECONDS`: the --stats table to ``out`` every ``interval``
    seconds while the VM runs (a thread; :meth:`stop` ends it)."""

    def __init__(self, vm, interval: float, kernel: KvmStats | None, out, extra=None):
        self.vm, self.interval, self.kernel, self.out = vm, interval, kernel, out
        self.extra = extra or (lambda: {})
        self._done = threading.Event()
        self.printed = 0
        self.thread = threading.Thread(target=self._run, name="stats-printer", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _run(self) -> None:
        started = time.monotonic()
        while not self._done.wait(self.interval):
            snapshot = self.kernel.snapshot() if self.kernel is not None else None
            report = format_report([vcpu.stats for vcpu in self.vm.vcpus], self.extra(),
                                   kernel=snapshot)
            self.out.write(f"--- pykvm stats at {time.monotonic() - started:.1f} s (live: a "
                           f"KVM_RUN still in progress counts as 'other' until it returns) ---\n"
                           f"{report}\n")
            self.out.flush()
            self.printed += 1

    def stop(self) -> None:
        self._done.set()
        if self.thread.is_alive():
            self.thread.join(timeout=5)
