"""An instruction kvm_pvm's emulator refused that no completion holds gets one retry
(pykvm/quirks/pvm.py, PvmQuirks.complete_instruction): Linux's text_poke_bp leaves an int3
at a patched site for a moment, another vCPU's emulator stops at it, and by the time pykvm
reads the bytes the patch is done (seen with Debian's cloud kernel and 2 vCPUs: `66 90`).
The same RIP and bytes refused twice in a row are the guest's own and stop the VM."""

from collections import Counter
from types import SimpleNamespace

import pytest

from pykvm.errors import GuestCrashed
from pykvm.ioctl import structs as s
from pykvm.quirks.pvm import PvmQuirks

EFER_LMA = 1 << 10
POPCNT = bytes.fromhex("f3480fb8c0") + b"\x90" * 10     # no completion holds popcnt
LDMXCSR = bytes.fromhex("0fae542404") + b"\x90" * 10


def long_mode_state(rip: int):
    regs, sregs = s.kvm_regs(), s.kvm_sregs()
    regs.rip = rip
    sregs.efer = EFER_LMA
    sregs.cs.l = 1
    return regs, sregs


def vcpu(number: int = 0):
    return SimpleNamespace(id=number, stats=SimpleNamespace(quirks=Counter()))


def refuse(quirks, cpu, rip, code):
    regs, sregs = long_mode_state(rip)
    return quirks.complete_instruction(cpu, regs, sregs, code)


def test_the_first_refusal_is_retried_and_the_second_stops():
    quirks, cpu = PvmQuirks(), vcpu()
    assert refuse(quirks, cpu, 0xFFFFFFFF81000000, POPCNT) is True
    assert cpu.stats.quirks == Counter({"retried: code changed under the emulator": 1})
    with pytest.raises(GuestCrashed, match="cannot run .*f3 48 0f b8 c0.* at 0xffffffff81000000"):
        refuse(quirks, cpu, 0xFFFFFFFF81000000, POPCNT)


def test_changed_bytes_or_another_rip_or_vcpu_is_a_new_refusal():
    quirks, cpu, other = PvmQuirks(), vcpu(0), vcpu(1)
    assert refuse(quirks, cpu, 0x1000, POPCNT)
    assert refuse(quirks, cpu, 0x2000, POPCNT)                 # another RIP
    assert refuse(quirks, other, 0x2000, POPCNT)               # another vCPU's own history
    assert refuse(quirks, cpu, 0x2000, b"\x0f\x0b" + POPCNT)   # the bytes changed (ud2)
    assert cpu.stats.quirks["retried: code changed under the emulator"] == 3


def test_a_completion_in_between_forgets_the_refusal(monkeypatch):
    """A refusal, then a completed instruction, then the same refusal: retried again (the
    vCPU made progress in between), not stopped."""
    quirks, cpu = PvmQuirks(), vcpu()
    import pykvm.quirks.complete as complete
    monkeypatch.setattr(complete, "complete", lambda step, completion: completion.name)
    assert refuse(quirks, cpu, 0x1000, POPCNT)
    assert refuse(quirks, cpu, 0x3000, LDMXCSR)
    assert refuse(quirks, cpu, 0x1000, POPCNT)
    assert cpu.stats.quirks == Counter({"retried: code changed under the emulator": 2,
                                        "ldmxcsr": 1})
