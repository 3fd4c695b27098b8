"""`pykvm check`: whether this host can run pykvm, like kvm-ok.

It opens the KVM device, lists the capabilities pykvm uses and the quirks it works
around on this host kind (docs/hosts.md), creates a one-vCPU VM and runs it to its
first port write (the smoke test), and says whether user networking (passt) is
there. Exit status 0 when KVM can be used, 1 when it cannot.
"""

from __future__ import annotations

from .. import layout
from ..errors import PykvmError, first_line


def add_parser(commands) -> None:
    check = commands.add_parser("check", help="say whether this host can run pykvm (like kvm-ok)")
    check.add_argument("--device", default="/dev/kvm", help="the KVM device (default /dev/kvm)")
    check.set_defaults(handler=cmd_check)


KEY_CAPABILITIES = ("IRQCHIP", "PIT2", "USER_MEMORY", "IOEVENTFD", "IRQFD", "IRQ_ROUTING",
                    "SIGNAL_MSI", "IMMEDIATE_EXIT", "SET_TSS_ADDR", "MP_STATE", "VCPU_EVENTS",
                    "READONLY_MEM", "SET_GUEST_DEBUG", "BINARY_STATS_FD")
REQUIRED_CAPABILITIES = ("IRQCHIP", "PIT2", "USER_MEMORY", "IOEVENTFD", "IRQFD", "IMMEDIATE_EXIT")
HOST_KIND_TEXT = {
    "kvm_intel": "Intel VT-x",
    "kvm_amd": "AMD-V",
    "kvm_pvm": "PVM: KVM for nested use without VT-x/AMD-V (guest ring 0 is emulated)",
}


def cmd_check(args) -> int:
    from .. import __version__
    from ..kvm import Kvm
    from ..quirks import for_host

    print(f"pykvm {__version__}")
    try:
        kvm = Kvm(args.device)
    except PykvmError as error:
        print(f"{args.device}: {error}")
        print("KVM acceleration can NOT be used")
        return 1
    with kvm:
        print(f"{args.device}: present, opened read/write")
        print(f"KVM API version: {kvm.api_version}")
        print(f"host kind: {kvm.host_kind} ({HOST_KIND_TEXT.get(kvm.host_kind, 'unknown module')})")
        caps = kvm.capabilities()
        print("capabilities: " + ", ".join(
            f"{name} {'yes' if caps.get(name) else 'no'}" for name in KEY_CAPABILITIES))
        print(f"vCPUs: {caps.get('NR_VCPUS', 0)} recommended, {caps.get('MAX_VCPUS', 0)} maximum; "
              f"memory slots: {caps.get('NR_MEMSLOTS', 0)}")
        missing = [name for name in REQUIRED_CAPABILITIES if not caps.get(name)]
        quirks = for_host(kvm.host_kind)
        if quirks.summary:
            print(f"quirks pykvm works around on this host ({quirks.name}):")
            for line in quirks.summary:
                print(f"  - {line}")
        else:
            print("quirks: none (hardware virtualization, everything native)")
        smoke = smoke_test(kvm)
        print(f"VM smoke test: {smoke or 'created a VM with 1 vCPU and ran it to its first exit'}")
    from ..net.passt import user_networking_status
    why_not = user_networking_status()
    print("user networking (--net user, no root): "
          + ("available" if why_not is None else f"NOT available: {why_not}"))
    if missing or smoke:
        if missing:
            print(f"missing capabilities pykvm needs: {', '.join(missing)}")
        print("KVM acceleration can NOT be used")
        return 1
    print("KVM acceleration can be used")
    return 0


def smoke_test(kvm) -> str | None:
    """Create a VM, run one `out` instruction, and destroy it; None when all went well."""
    from ..memory import GuestMemory
    from ..vstate.vm import Vm
    from ..boot.modes import set_mode

    class Probe:
        name = "probe"

        def __init__(self):
            self.value = None

        def write(self, offset, size, value):
            self.value = value
            vm.request_stop("exit", 0, "probe done")

        def read(self, offset, size):
            return 0

    try:
        with GuestMemory.anonymous(layout.MIN_MEM_SIZE + 0xF000) as memory, \
                Vm(kvm, memory) as vm:
            probe = Probe()
            vm.add_pio_device(0x80, 1, probe)
            memory.write(layout.FLAT_LOAD_ADDR, bytes([0xB0, 0x2A, 0xE6, 0x80, 0xF4]))  # mov al,42; out 0x80,al
            vm.create_vcpus(1)
            set_mode(vm.vcpus[0], memory, "real", layout.FLAT_LOAD_ADDR)
            stop = vm.run(timeout=10)
            if probe.value != 42:
                return f"the test guest did not reach its port write ({stop})"
    except PykvmError as error:
        return f"failed: {first_line(error)}"
    return None
