# answer.S - lesson 2's guest: leave an answer in a register and one in memory,
# then halt, the way kvm-hello-world's guest does.
#
#   python3 guests/tutorial/vmm/02_after_the_stop.py
#
# Entered in flat 32-bit protected mode (`--entry protected`). After the halt
# the VMM reads RAX with KVM_GET_REGS and the sum at RESULT straight out of
# guest RAM: its own mmap of it, no ioctl needed.

.include "tutorial.inc"

.set RESULT, 0x400              # guest-physical; the VMM reads it after the halt

.code32
.globl _start
_start:
    xor     %eax, %eax          # EAX = 1 + 2 + ... + 100
    mov     $1, %ecx
1:  add     %ecx, %eax
    inc     %ecx
    cmp     $100, %ecx
    jbe     1b
    mov     %eax, RESULT        # a plain store: guest RAM, no exit
    mov     $6, %eax
    imul    $7, %eax            # RAX = 42
    cli
    hlt                         # interrupts off: nothing wakes it, the VMM ends the VM
