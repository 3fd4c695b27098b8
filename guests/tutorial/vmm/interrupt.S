# interrupt.S - lesson 4's guest: wait in `hlt` for a device's interrupts.
#
#   python3 guests/tutorial/vmm/04_interrupts.py
#
# The VMM wires an eventfd to GSI 5 (an irqfd). Writing that eventfd makes KVM
# raise IRQ 5 on its in-kernel 8259 PIC, which hands vector 0x25 to the vCPU's
# in-kernel local APIC (LINT0, "ExtINT" after reset), which delivers it through
# this guest's IDT. The PIC programming below (ports 0x20/0x21/0xa0/0xa1) and
# the EOIs are port I/O too, but to devices KVM emulates in the kernel: none of
# them reaches pykvm. Only the text and the exit port do.
#
# 64-bit long mode (`--entry long`), so the gates are 16 bytes and the handler
# ends in `iretq`. (On kvm_pvm, KVM's instruction emulator, which runs all guest
# ring-0 code there, has no 32-bit protected-mode `iret`: this guest would stop
# at its first return from the handler. See docs/hosts.md.)

.include "tutorial.inc"

.set PIC1_CMD, 0x20
.set PIC1_DATA, 0x21
.set PIC2_DATA, 0xa1
.set IRQ_BASE, 0x20             # IRQ 0-7 -> vectors 0x20-0x27 (0-0x1f are CPU exceptions)
.set DEVICE_IRQ, 5
.set WANTED, 3                  # interrupts to take before exiting

.set GATE, idt + 16 * (IRQ_BASE + DEVICE_IRQ)

.code64
.globl _start
_start:
    # The IDT gate for vector IRQ_BASE + DEVICE_IRQ: a 64-bit interrupt gate to
    # irq_handler in the code segment we run in (pykvm's boot GDT chose it).
    mov     $irq_handler, %eax  # below 4 GiB: offset 63:32 stays 0
    mov     %ax, GATE           # offset 15:0
    mov     %cs, %bx
    mov     %bx, GATE + 2       # selector
    movw    $0x8e00, GATE + 4   # present, ring 0, interrupt gate (IF cleared on entry)
    shr     $16, %eax
    mov     %ax, GATE + 6       # offset 31:16
    lidt    idt_pointer

    # The 8259 PIC: ICW1-ICW4, then mask everything but DEVICE_IRQ.
    mov     $0x11, %al          # ICW1: edge-triggered, cascade, ICW4 follows
    out     %al, $PIC1_CMD
    mov     $IRQ_BASE, %al      # ICW2: vector base
    out     %al, $PIC1_DATA
    mov     $0x04, %al          # ICW3: the slave PIC on IRQ 2
    out     %al, $PIC1_DATA
    mov     $0x01, %al          # ICW4: 8086 mode
    out     %al, $PIC1_DATA
    mov     $~(1 << DEVICE_IRQ) & 0xff, %al
    out     %al, $PIC1_DATA     # OCW1: the mask
    mov     $0xff, %al
    out     %al, $PIC2_DATA

    mov     $waiting, %esi
    COM1_PUTS
wait:
    sti
    hlt                         # sleeps in KVM (the in-kernel LAPIC) until an interrupt
    cmpl    $WANTED, count
    jb      wait
    cli
    mov     $done, %esi
    COM1_PUTS
    EXIT_VM 0

irq_handler:
    push    %rax
    push    %rdx
    push    %rsi
    incl    count
    mov     count, %al
    add     $'0', %al
    mov     %al, arrived + 10   # "interrupt N arrived"
    mov     $arrived, %esi
    COM1_PUTS
    mov     $0x20, %al          # EOI to the PIC (in the kernel: no exit to pykvm)
    out     %al, $PIC1_CMD
    pop     %rsi
    pop     %rdx
    pop     %rax
    iretq

count:    .long 0
waiting:  .asciz "guest: waiting in hlt for IRQ 5\n"
arrived:  .asciz "interrupt ? arrived (vector 0x25)\n"
done:     .asciz "guest: 3 interrupts taken, exiting\n"

.balign 8
idt_pointer:
    .word   16 * 256 - 1
    .quad   idt
.balign 16
idt:
    .fill   2 * 256, 8, 0       # 256 gates of 16 bytes
