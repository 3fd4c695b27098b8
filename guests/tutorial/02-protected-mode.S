# 02-protected-mode.S - from 16-bit real mode into 32-bit protected mode, the
# way every PC boot loader once did it by hand.
#
#   python3 -m pykvm run --flat guests/tutorial/build/02-protected-mode.bin --entry real
#
# The recipe: describe the segments in a Global Descriptor Table (GDT), tell
# the CPU where it is (lgdt), set CR0.PE, and far-jump so that CS is reloaded
# from the new table. From then on a segment register holds a *selector* (an
# index into the GDT), not a paragraph number.
#
# Who runs what:
#   guest mode - the ordinary instructions. (kvm_pvm: emulated in the kernel,
#                because all of this is ring 0.)
#   KVM        - `mov %eax, %cr0`. A hypervisor must know when its guest
#                changes mode, so a CR0 write traps out of guest mode on
#                VT-x/AMD-V; KVM updates its view of the vCPU and resumes the
#                guest without ever returning to pykvm. `lgdt` and the far jump
#                normally run natively: the GDT is ordinary guest memory.
#   pykvm      - only the `out`s: two lines of text and the exit port.
#
# Linked at 0x10000 (see the Makefile): once the segments are flat (base 0),
# a label's address is its real, physical address. The 16-bit part runs with
# CS base 0x10000, so there it uses `label - _start`, the offset in our segment.

.include "tutorial.inc"

# Selectors: a GDT index times 8 (the low 3 bits are the table and the
# requested privilege level, all zero here).
.set CODE32_SEL, 0x08
.set DATA32_SEL, 0x10

    .text
    .globl _start

# --- 16-bit real mode ---------------------------------------------------------------
    .code16
_start:
    # Interrupts off for the whole switch: there is no IDT that would make sense
    # in protected mode, so an interrupt there would be fatal.
    cli
    cld
    mov     %cs, %ax            # DS = CS: address our own data
    mov     %ax, %ds

    mov     $(real_msg - _start), %si
    COM1_PUTS

    # lgdt reads a 6-byte operand at DS:offset: the table's size - 1 and its
    # *linear* address. `lgdtl` is the 32-bit operand form; the 16-bit form
    # would take only 24 bits of the address, a leftover of the 80286.
    lgdtl   gdt_descriptor - _start

    # Set Protection Enable. From the next instruction on the CPU is in
    # protected mode, but CS still holds the real-mode segment it cached...
    mov     %cr0, %eax
    or      $1, %eax            # CR0.PE
    mov     %eax, %cr0

    # ...until a far jump loads CS from GDT entry 1. The 0x66 prefix (the `l`
    # in ljmpl) gives the 16-bit code a 32-bit target offset: pm_entry is above
    # 64 KiB. The jump also discards instructions fetched in the old mode.
    ljmpl   $CODE32_SEL, $pm_entry

# --- 32-bit protected mode ---------------------------------------------------------
    .code32
pm_entry:
    # Reload the data segments from the GDT too; until now they kept their
    # real-mode bases. All are flat: base 0, limit 4 GiB.
    mov     $DATA32_SEL, %ax
    mov     %ax, %ds
    mov     %ax, %es
    mov     %ax, %fs
    mov     %ax, %gs
    mov     %ax, %ss
    mov     $stack_top, %esp    # a stack of our own (we make no calls, but a kernel would)

    # ESI holds a full 32-bit address now: no more segment arithmetic.
    mov     $pm_msg, %esi
    COM1_PUTS

    EXIT_VM 0

1:  cli
    hlt
    jmp     1b

# --- data ------------------------------------------------------------------------------
real_msg:
    .asciz  "real mode: switching to protected mode\n"
pm_msg:
    .asciz  "Hello from 32-bit protected mode!\n"

    .balign 8                   # the CPU fetches descriptors fastest when aligned
gdt:
    .quad   0                                       # 0x00: the null descriptor (required)
    SEGMENT_DESCRIPTOR 0, 0xfffff, 0x9a, 0xc        # 0x08: code, ring 0, 32-bit, 4 GiB
    SEGMENT_DESCRIPTOR 0, 0xfffff, 0x92, 0xc        # 0x10: data, ring 0, 4 GiB
gdt_end:

gdt_descriptor:
    .word   gdt_end - gdt - 1   # limit: size in bytes - 1
    .long   gdt                 # base: linear address (we are linked where we run)

    .balign 16
    .fill   256, 1, 0           # a small stack
stack_top:
