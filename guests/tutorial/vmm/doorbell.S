# doorbell.S - lesson 3's guest: ring an MMIO doorbell RINGS times.
#
#   python3 guests/tutorial/vmm/03_mmio_ioeventfd.py
#
# DOORBELL is a guest-physical address with no RAM behind it. A store there
# cannot complete in guest mode: KVM decodes the instruction and either hands
# it to user space (KVM_EXIT_MMIO, with the address, length and data in
# kvm_run) or, when an ioeventfd matches the address, signals that eventfd
# itself and resumes the guest without leaving the kernel.
# Markers 1 and 2 (port 0xf5, timestamped by pykvm) time the loop.

.include "tutorial.inc"

.set DOORBELL,      0xd0000000
.set RINGS,         1000
.set PROGRESS_PORT, 0xf5

.code32
.globl _start
_start:
    mov     $1, %al
    out     %al, $PROGRESS_PORT # marker 1: the loop starts
    mov     $RINGS, %ecx
1:  mov     %ecx, DOORBELL      # the doorbell: RINGS, RINGS-1, ..., 1
    loop    1b
    mov     $2, %al
    out     %al, $PROGRESS_PORT # marker 2: the loop ended
    EXIT_VM 0
