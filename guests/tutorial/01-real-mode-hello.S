# 01-real-mode-hello.S - the smallest guest that does something visible:
# 16-bit real mode, one line to the serial port, then an exit.
#
#   python3 -m pykvm run --flat guests/tutorial/build/01-real-mode-hello.bin --entry real
#
# Real mode is how every x86 CPU starts: 16-bit registers, no protection, and
# an address is segment * 16 + offset. pykvm plays the part of a boot loader:
# it copies this file to guest-physical 0x10000 (FLAT_LOAD_ADDR) and starts
# the vCPU with CS = 0x1000 and IP = 0, so CS:IP points at our first byte.
# That is why the Makefile links this guest at address 0: every address in
# this file is an offset inside the 64 KiB segment that starts at 0x10000.
#
# Who runs what (the lesson of this guest):
#   guest mode - mov, lodsb, test, jz, jmp: plain CPU work. On a VT-x/AMD-V
#                host the CPU runs them itself. On kvm_pvm (docs/hosts.md) all
#                ring-0 code, and real mode is always ring 0, is emulated by
#                KVM one instruction at a time: slower, but still inside the
#                kernel, invisible to pykvm.
#   KVM        - nothing else to do here: no interrupts, no page tables.
#   pykvm      - every `out`. There is no UART behind port 0x3f8, so each
#                `out` makes KVM_RUN return with KVM_EXIT_IO; pykvm's Python
#                UART prints the byte and re-enters the guest. 22 bytes of
#                text + 1 byte to the exit port = 23 exits, which
#                `pykvm run --stats` counts.

.include "tutorial.inc"

    .code16                     # the CPU is in 16-bit real mode
    .text
    .globl _start
_start:
    # Do not rely on what the loader left in the segment registers: address
    # our data through DS = CS, as a boot sector would. (We use no stack, so
    # SS:SP does not matter here.)
    mov     %cs, %ax
    mov     %ax, %ds
    cld                         # lodsb must walk forwards

    mov     $message, %si       # DS:SI -> the string (an offset in our segment)
    COM1_PUTS                   # 22 x `out %al, %dx`: 22 exits to pykvm

    EXIT_VM 0                   # `out` to port 0xf4: pykvm stops, status 0

    # Not reached: pykvm stopped the VM at the `out` above. Should anything
    # resume us, sleep with interrupts off rather than run into the data.
1:  cli
    hlt
    jmp     1b

message:
    .asciz  "Hello from real mode!\n"
