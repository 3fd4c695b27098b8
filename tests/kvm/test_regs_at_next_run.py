"""Vcpu.set_regs(at_next_run=True) (pykvm/vstate/nextrun.py): the registers go into
kvm_run's synced registers and KVM loads them when the next KVM_RUN starts
(KVM_CAP_SYNC_REGS, api.rst "kvm_dirty_regs"), one ioctl fewer for an instruction
completion (pykvm/quirks/complete.py, bench/completions.py). Until KVM has loaded them,
get_regs returns them; a plain set_regs after them wins.
"""

from __future__ import annotations

import os

import pytest

from pykvm import ioctl as k
from pykvm import layout
from pykvm.boot.modes import set_mode
from pykvm.kvm import Kvm
from pykvm.memory import GuestMemory
from pykvm.vstate.vm import Vm

pytestmark = pytest.mark.skipif(not os.access("/dev/kvm", os.R_OK | os.W_OK),
                                reason="needs /dev/kvm")

# Real mode at the flat load address: offset 0 halts at once; from offset 2 the guest
# first loads 7 into AL, then halts at offset 7 (RIP 8 after it).
GUEST = (b"\xfa\xf4"                  # 0: cli; hlt
         + b"\xb0\x07"                # 2: mov $7, %al
         + b"\x90\x90\x90"            # 4: nop x3
         + b"\xfa\xf4")               # 7: cli; hlt


def run_from(offset: int, *, then_plain: bool = False):
    """Start the guest at ``offset`` through set_regs(at_next_run=True) (then, with
    ``then_plain``, put RIP back at 0 with a plain set_regs); the registers it stopped with."""
    with Kvm() as kvm, GuestMemory.anonymous(4 << 20) as memory, Vm(kvm, memory) as vm:
        if not kvm.check_extension(k.KVM_CAP_SYNC_REGS) & k.KVM_SYNC_X86_REGS:
            pytest.skip("KVM without KVM_CAP_SYNC_REGS: set_regs(at_next_run=True) is a plain one")
        memory.write(layout.FLAT_LOAD_ADDR, GUEST)
        vm.create_vcpus(1)
        vcpu = vm.vcpus[0]
        set_mode(vcpu, memory, "real", layout.FLAT_LOAD_ADDR)
        regs = vcpu.get_regs()
        start = regs.rip
        regs.rip = start + offset
        vcpu.set_regs(regs, at_next_run=True)
        assert vcpu.run_struct.kvm_dirty_regs & k.KVM_SYNC_X86_REGS
        assert vcpu.get_regs().rip == start + offset        # what KVM will load
        if then_plain:
            regs.rip = start
            vcpu.set_regs(regs)
            assert not vcpu.run_struct.kvm_dirty_regs & k.KVM_SYNC_X86_REGS
        stop = vm.run(timeout=30)
        assert stop is not None and stop.kind == "halt", stop
        assert not vcpu.run_struct.kvm_dirty_regs & k.KVM_SYNC_X86_REGS   # KVM took them
        return vcpu.get_regs(), start


def test_kvm_loads_them_at_the_next_run():
    regs, start = run_from(2)
    assert regs.rip == start + 9 and regs.rax & 0xFF == 7


def test_a_plain_set_regs_after_them_wins():
    regs, start = run_from(2, then_plain=True)
    assert regs.rip == start + 2 and regs.rax & 0xFF != 7
