"""Registers KVM loads when the next KVM_RUN starts, instead of a KVM_SET_REGS ioctl.

KVM_CAP_SYNC_REGS (Documentation/virt/kvm/api.rst, "kvm_valid_regs, kvm_dirty_regs and
s.regs"): the VMM writes ``kvm_run.s.regs.regs`` and sets KVM_SYNC_X86_REGS in
``kvm_dirty_regs``; the next KVM_RUN loads them before it enters the guest and clears the
flag. Why: every vCPU ioctl costs ~8-10 us on kvm_pvm, as much as a port-I/O exit, and an
instruction completion (quirks/complete.py) ends with one (bench/completions.py). Only for
a change that is the last before the guest runs again: KVM's loading of the registers drops
a pending exception, so one injected after them must follow a plain KVM_SET_REGS. Until
KVM has loaded them, :meth:`Vcpu.get_regs <pykvm.vstate.vcpu.Vcpu.get_regs>` returns them
(:func:`pending`), and a plain set_regs cancels them (:func:`hand_over`).
"""

from __future__ import annotations

import weakref

from .. import ioctl as k
from ..ioctl import structs as s

_supported: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()   # Kvm -> bool


def supported(kvm) -> bool:
    """Whether ``kvm`` (a Kvm) loads the registers from kvm_run (else KVM_RUN refuses the
    flag with EINVAL); asked once per Kvm."""
    answer = _supported.get(kvm)
    if answer is None:
        answer = _supported[kvm] = bool(kvm.check_extension(k.KVM_CAP_SYNC_REGS)
                                        & k.KVM_SYNC_X86_REGS)
    return answer


def pending(run: s.kvm_run) -> s.kvm_regs | None:
    """The registers handed over and not yet loaded by KVM, or None."""
    if run.kvm_dirty_regs & k.KVM_SYNC_X86_REGS:
        return s.kvm_regs.from_buffer_copy(run.s.regs.regs)
    return None


def hand_over(run: s.kvm_run, regs: s.kvm_regs, at_next_run: bool, kvm) -> bool:
    """With ``at_next_run`` (and ``kvm`` supporting it): ``regs`` into ``run`` for the next
    KVM_RUN, True. Otherwise any handed over before are cancelled (the caller's
    KVM_SET_REGS replaces them) and False: the caller sets ``regs`` itself."""
    if at_next_run and supported(kvm):
        run.s.regs.regs = regs
        run.kvm_dirty_regs |= k.KVM_SYNC_X86_REGS
        return True
    run.kvm_dirty_regs &= ~k.KVM_SYNC_X86_REGS
    return False
