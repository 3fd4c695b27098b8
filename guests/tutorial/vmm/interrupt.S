# interrupt.S - lesson 4's guest: wait in `hlt` for interrupts, first from a
# timer that lives entirely in KVM, then from a device that lives in pykvm.
#
#   python3 guests/tutorial/vmm/04_interrupts.py
#
# Part 1, the timer: the guest programs the 8254 PIT (ports 0x43, 0x40) to
# tick 100 times a second. KVM emulates the PIT in the kernel (pykvm made it
# with KVM_CREATE_PIT2); each tick raises IRQ 0 on KVM's in-kernel 8259 PIC,
# which hands vector 0x20 to the vCPU's in-kernel local APIC (LINT0, "ExtINT"
# after reset), which wakes the vCPU from `hlt` and delivers it through this
# guest's IDT. Nothing of that reaches pykvm.
#
# Part 2, the device: the VMM wired an eventfd to GSI 5 (an irqfd). A write to
# that eventfd makes KVM raise IRQ 5 on the same PIC: vector 0x25, same path.
#
# The PIT and PIC programming and the EOIs are port I/O, but to devices KVM
# emulates in the kernel: none of them reaches pykvm. Only the text and the
# exit port do.
#
# 64-bit long mode (`--entry long`), so the gates are 16 bytes and the handlers
# end in `iretq`. (On kvm_pvm, KVM's instruction emulator, which runs all guest
# ring-0 code there, has no 32-bit protected-mode `iret`: this guest would stop
# at its first return from a handler. See docs/hosts.md.)

.include "tutorial.inc"

.set PIC1_CMD,  0x20
.set PIC1_DATA, 0x21
.set PIC2_DATA, 0xa1
.set PIT_CH0,   0x40
.set PIT_MODE,  0x43
.set PIT_HZ,    1193182         # the PIT's input clock
.set IRQ_BASE,  0x20            # IRQ 0-7 -> vectors 0x20-0x27 (0-0x1f are CPU exceptions)
.set TIMER_IRQ, 0
.set DEVICE_IRQ, 5
.set WANTED,    3               # interrupts of each kind to take

# SET_GATE vector, handler: a 64-bit interrupt gate (IF cleared on entry) to
# handler, in the code segment we run in (pykvm's boot GDT chose it).
.macro SET_GATE vector, handler
    mov     $\handler, %eax     # below 4 GiB: offset 63:32 stays 0
    mov     %ax, idt + 16 * (\vector)             # offset 15:0
    mov     %cs, %bx
    mov     %bx, idt + 16 * (\vector) + 2         # selector
    movw    $0x8e00, idt + 16 * (\vector) + 4     # present, ring 0, interrupt gate
    shr     $16, %eax
    mov     %ax, idt + 16 * (\vector) + 6         # offset 31:16
.endm

# PIC_MASK: let only IRQ `irq` through the master PIC (and nothing through the slave).
.macro PIC_MASK irq
    mov     $~(1 << \irq) & 0xff, %al
    out     %al, $PIC1_DATA     # OCW1: the mask
.endm

.code64
.globl _start
_start:
    SET_GATE IRQ_BASE + TIMER_IRQ, timer_handler
    SET_GATE IRQ_BASE + DEVICE_IRQ, device_handler
    lidt    idt_pointer

    # The 8259 PIC: ICW1-ICW4.
    mov     $0x11, %al          # ICW1: edge-triggered, cascade, ICW4 follows
    out     %al, $PIC1_CMD
    mov     $IRQ_BASE, %al      # ICW2: vector base
    out     %al, $PIC1_DATA
    mov     $0x04, %al          # ICW3: the slave PIC on IRQ 2
    out     %al, $PIC1_DATA
    mov     $0x01, %al          # ICW4: 8086 mode
    out     %al, $PIC1_DATA
    mov     $0xff, %al
    out     %al, $PIC2_DATA

    # --- part 1: the timer --------------------------------------------------------
    PIC_MASK TIMER_IRQ
    mov     $0x34, %al          # PIT channel 0, low then high byte, mode 2 (rate generator)
    out     %al, $PIT_MODE
    mov     $(PIT_HZ / 100) & 0xff, %al
    out     %al, $PIT_CH0
    mov     $(PIT_HZ / 100) >> 8, %al
    out     %al, $PIT_CH0
    mov     $waiting_timer, %esi
    COM1_PUTS
1:  sti
    hlt                         # sleeps in KVM until an interrupt
    cmpl    $WANTED, ticks
    jb      1b
    cli

    # --- part 2: the device -------------------------------------------------------
    PIC_MASK DEVICE_IRQ         # the timer is masked from now on
    mov     $waiting_device, %esi
    COM1_PUTS
2:  sti
    hlt
    cmpl    $WANTED, count
    jb      2b
    cli
    mov     $done, %esi
    COM1_PUTS
    EXIT_VM 0

# HANDLER counter, message, digit_at: count, print "... N ...", EOI, return.
.macro HANDLER counter, message, digit_at
    push    %rax
    push    %rdx
    push    %rsi
    incl    \counter
    mov     \counter, %al
    add     $'0', %al
    mov     %al, \message + \digit_at
    mov     $\message, %esi
    COM1_PUTS
    mov     $0x20, %al          # EOI to the PIC (in the kernel: no exit to pykvm)
    out     %al, $PIC1_CMD
    pop     %rsi
    pop     %rdx
    pop     %rax
    iretq
.endm

timer_handler:
    HANDLER ticks, tick, 11
device_handler:
    HANDLER count, arrived, 10

ticks:          .long 0
count:          .long 0
waiting_timer:  .asciz "guest: waiting in hlt for the timer (IRQ 0)\n"
tick:           .asciz "timer tick ? (vector 0x20)\n"
waiting_device: .asciz "guest: waiting in hlt for the device (IRQ 5)\n"
arrived:        .asciz "interrupt ? arrived (vector 0x25)\n"
done:           .asciz "guest: 3 ticks and 3 interrupts taken, exiting\n"

.balign 8
idt_pointer:
    .word   16 * 256 - 1
    .quad   idt
.balign 16
idt:
    .fill   2 * 256, 8, 0       # 256 gates of 16 bytes
