"""pykvm/vstate/: the vCPU does not drive the VM (issue #14 item 1).

The import graph is read from the source (tests/import_graph.py), so an
import hidden in a function counts; the hook list and the stop/pause channel are
checked with a real VM and a flat guest.
"""

from __future__ import annotations

import threading

import pytest

from pykvm import ioctl as k
from pykvm import layout
from pykvm.boot.modes import set_mode
from pykvm.errors import GuestCrashed
from pykvm.memory import GuestMemory
from pykvm.vstate.control import RunControl, Stop
from pykvm.vstate.hooks import ExitHooks
from pykvm.vstate.vm import Vm

from ..asm import assemble
from ..ports import ExitPort, SerialOut
from ..import_graph import ROOT, find_cycle, graph, reachable
from .test_trace import BASE, SERIAL_GUEST


def test_the_core_is_in_no_import_cycle():
    """Everything the VM is built from (vstate, ioctl, quirks, observe, snapshot, guest,
    the buses) imports one way: no module reachable from the VM leads back to itself."""
    edges = graph(ROOT.rglob("*.py"))
    core = reachable(edges, "pykvm.vstate.vm") | {"pykvm.vstate.vm"}
    assert {"pykvm.vstate.vcpu", "pykvm.vstate.exits", "pykvm.quirks.pvm",
            "pykvm.ioctl.run"} <= core
    assert find_cycle({m: edges[m] & core for m in core}) is None


def test_the_vcpu_never_imports_the_vm():
    edges = graph(ROOT.rglob("*.py"))
    for module in ("pykvm.vstate.vcpu", "pykvm.vstate.exits", "pykvm.vstate.control",
                   "pykvm.vstate.hooks", "pykvm.ioctl.run"):
        assert "pykvm.vstate.vm" not in reachable(edges, module) | {module}, module
        assert "pykvm.quirks" not in reachable(edges, module), module


def test_the_vcpu_source_names_no_vm():
    source = (ROOT / "vstate" / "vcpu.py").read_text() + (ROOT / "vstate" / "exits.py").read_text()
    assert ".vm." not in source and "self.vm" not in source and "_serve_requests()" not in \
        (ROOT / "vstate" / "vm.py").read_text()


def test_hooks_are_indexed_by_method_in_order():
    class Observer:
        def pio(self, *args): ...

    class Handler:
        def internal_error(self, vcpu, suberror): return False

    hooks, observer, handler, first = ExitHooks(), Observer(), Handler(), Handler()
    assert not hooks.wants_clock
    hooks.add(observer)
    hooks.add(handler)
    hooks.add(first, first=True)
    hooks.add(observer)                      # once only
    assert hooks.pio == (observer.pio,) and hooks.mmio == () and hooks.wants_clock
    assert hooks.internal_error == (first.internal_error, handler.internal_error)
    hooks.remove(observer)
    assert hooks.pio == () and not hooks.wants_clock and observer not in hooks


def test_the_first_stop_reason_wins_and_kicks_every_other_member():
    kicked = []

    class Member:
        thread = None

        def kick(self):
            kicked.append(self)

    control, a, b = RunControl(), Member(), Member()
    control.join(a)
    control.join(b)
    control.request_stop(Stop("halt", 0, "first"))
    control.request_stop_error(GuestCrashed("second"))
    assert control.stop_reason.message == "first" and control.stopped.is_set()
    assert kicked == [a, b, a, b]
    assert Stop.for_error(GuestCrashed("x")).kind == "crash"


def run_serial_guest(kvm, *hooks):
    code = assemble(SERIAL_GUEST, "real", 0)
    with GuestMemory.anonymous(4 << 20) as memory, Vm(kvm, memory, timing=False) as vm:
        vm.add_pio_device(0x3F8, 8, SerialOut())
        vm.add_pio_device(layout.EXIT_PORT, 1, ExitPort(vm))
        memory.write(BASE, code)
        vm.create_vcpus(1)
        set_mode(vm.vcpus[0], memory, "real", BASE)
        for hook in hooks:
            vm.hooks.add(hook)
        stop = vm.run(timeout=20)
        return stop, vm


def test_a_registered_hook_sees_every_port_exit_on_the_vcpu_thread(kvm):
    seen = []

    class Hook:
        def pio(self, vcpu, t0, t1, t_end, port, size, direction, count, value, device):
            seen.append((threading.current_thread().name, port, direction, device))

    stop, vm = run_serial_guest(kvm, Hook())
    assert stop.kind == "exit" and stop.status == 0
    assert seen[:5] == [("vcpu0", 0x3F8, 1, "serial")] * 4 + [("vcpu0", 0x3FD, 0, "serial")]
    assert seen[-1][1] == layout.EXIT_PORT
    assert vm.vcpus[0].stats.exits[k.KVM_EXIT_IO] == len(seen)


def test_a_hook_that_raises_stops_the_vm_with_its_error(kvm):
    class Broken:
        def pio(self, *args):
            raise GuestCrashed("hook says no")

    stop, _ = run_serial_guest(kvm, Broken())
    assert stop.kind == "crash" and stop.message == "hook says no"


@pytest.mark.parametrize("handled", [True, False])
def test_internal_error_handlers_are_asked_in_order(kvm, handled):
    """Debugger first, then the quirks; none answering True is a crash naming the
    suberror. An internal error depends on the host (kvm_pvm's emulator; never on
    VT-x for a flat guest), so exits.handle is driven with kvm_run filled in."""
    from pykvm.vstate import exits

    asked = []

    class Handler:
        def __init__(self, name, answer):
            self.name, self.answer = name, answer

        def internal_error(self, vcpu, suberror):
            asked.append(self.name)
            return self.answer

    with GuestMemory.anonymous(4 << 20) as memory, Vm(kvm, memory, timing=False) as vm:
        vm.create_vcpus(1)
        vm.hooks.remove(vm.quirks)
        vm.hooks.add(Handler("quirks", handled))
        vm.hooks.add(Handler("debugger", False), first=True)
        vcpu = vm.vcpus[0]
        vcpu.run_struct.internal.suberror = k.KVM_INTERNAL_ERROR_EMULATION
        if handled:
            assert exits.handle(vcpu, k.KVM_EXIT_INTERNAL_ERROR, 0, 0) is None
        else:
            with pytest.raises(GuestCrashed, match="instruction emulation failed"):
                exits.handle(vcpu, k.KVM_EXIT_INTERNAL_ERROR, 0, 0)
    assert asked == ["debugger", "quirks"]
