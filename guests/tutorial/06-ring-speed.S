# 06-ring-speed.S - the same loop in ring 0 and in ring 3, timed: where does
# guest code really run?
#
#   python3 -m pykvm run --flat guests/tutorial/build/06-ring-speed.bin --entry long --stats
#
# Output (the tick counts vary from run to run and host to host; this is kvm_pvm):
#   ring 0: 500000 iterations of dec/jnz, 2758044358 TSC ticks
#   ring 3: 50000000 iterations of dec/jnz, 68712528 TSC ticks
#   ring 0 / ring 3 time per iteration: 4014
#
# On a VT-x or AMD-V host both rings run natively: the last line says about 1.
# On kvm_pvm (docs/hosts.md) guest ring 3 runs natively but every ring-0 instruction
# is emulated by KVM, and the ratio is in the thousands. The ring-0 loop is
# therefore 100 times shorter than the ring-3 one, so that it takes about a
# second there rather than minutes.
#
# Two clocks measure each loop:
#   - the host's: before and after each loop the guest writes a marker byte to
#     pykvm's progress port (0xf5): 10 and 11 around the ring-0 loop, 30 and 31
#     around the ring-3 loop. Each write is an exit, and pykvm timestamps it;
#     `--stats` lists them as "boot milestones (s): 10 ..., 11 ..., 30 ..., 31 ...".
#   - the guest's own: `rdtsc`, the CPU's time-stamp counter. Inside a VM the
#     TSC is whatever the hypervisor lets the guest read (here the host's
#     counter plus an offset), so a guest can only time itself as honestly as
#     its hypervisor allows. Here both clocks agree.
#
# To keep the measurement free of anything else, this guest is not a kernel:
# it lets its ring-3 code write to the few ports it needs itself, marks every
# page user-accessible, and has no IDT. 04 shows how a kernel protects itself;
# 06 only measures.
#
# The ports are granted with the TSS's I/O permission bitmap (what Linux's
# ioperm() sets up): one bit per port, 0 = allowed in ring 3. Setting IOPL 3
# in RFLAGS would allow every port instead, but kvm_pvm does not keep IOPL
# (RFLAGS reads back with IOPL 0 after the iretq, and ring-3 port access is
# then decided by the bitmap alone); the bitmap works the same on every host.
#
# Who runs what:
#   guest mode - the two loops: natively on VT-x/AMD-V; on kvm_pvm the ring-3
#                loop natively and the ring-0 loop emulated by KVM, one
#                instruction at a time (still no exit to pykvm).
#   KVM        - the CR3 write; on kvm_pvm, the emulation of all ring-0 code.
#   pykvm      - the marker and text `out`s, timestamped as they arrive.

.include "tutorial.inc"

.set RING0_ITERATIONS, 500000
.set RING3_ITERATIONS, 50000000

.set PROGRESS_PORT, 0xf5        # pykvm timestamps each byte written here
.set MARK_RING0_START, 10
.set MARK_RING0_END,   11
.set MARK_RING3_START, 30
.set MARK_RING3_END,   31

.set KERNEL_CS, 0x08
.set KERNEL_DS, 0x10
.set USER_DS,   0x18 | 3
.set USER_CS,   0x20 | 3
.set TSS_SEL,   0x28

.set PTE_PRESENT,  1 << 0
.set PTE_WRITABLE, 1 << 1
.set PTE_USER,     1 << 2
.set PTE_HUGE,     1 << 7

    .text
    .code64
    .globl _start

# MARK code: write a marker byte to the progress port (one timestamped exit).
.macro MARK code
    mov     $\code, %al
    out     %al, $PROGRESS_PORT
.endm

# TIMED_LOOP iterations: the measured loop, RBX = TSC ticks it took.
# `rdtsc` returns the counter in EDX:EAX.
.macro TIMED_LOOP iterations
    rdtsc
    shl     $32, %rdx
    or      %rax, %rdx
    mov     %rdx, %rbx              # start time
    mov     $\iterations, %ecx
.Lloop\@:
    dec     %rcx                    # the loop: two instructions per iteration
    jnz     .Lloop\@
    rdtsc
    shl     $32, %rdx
    or      %rax, %rdx
    sub     %rbx, %rdx
    mov     %rdx, %rbx              # elapsed ticks
.endm

# --- ring 0 ------------------------------------------------------------------------------------
_start:
    cli
    cld
    lea     stack_top(%rip), %rsp

    # Our page tables (every page user-accessible) and GDT (with ring-3 segments).
    lea     pml4(%rip), %rax
    mov     %rax, %cr3
    lgdt    gdt_descriptor(%rip)
    pushq   $KERNEL_CS              # reload CS with a far return (see 04)
    lea     1f(%rip), %rax
    push    %rax
    lretq
1:  mov     $KERNEL_DS, %ax
    mov     %ax, %ds
    mov     %ax, %es
    mov     %ax, %ss

    # The TSS, for its I/O permission bitmap: put its address into its GDT
    # descriptor (see 04), then load the task register.
    lea     tss(%rip), %rax
    lea     gdt_tss(%rip), %rdi
    mov     %ax, 2(%rdi)
    shr     $16, %rax
    mov     %al, 4(%rdi)
    mov     %ah, 7(%rdi)
    shr     $16, %rax
    mov     %eax, 8(%rdi)
    mov     $TSS_SEL, %ax
    ltr     %ax

    MARK    MARK_RING0_START
    TIMED_LOOP RING0_ITERATIONS
    MARK    MARK_RING0_END
    mov     %rbx, ring0_ticks(%rip)

    # To ring 3: iretq with user segments (IOPL stays 0: the bitmap decides).
    pushq   $USER_DS                # SS
    lea     user_stack_top(%rip), %rax
    push    %rax                    # RSP
    pushq   $2                      # RFLAGS: only the always-one bit
    pushq   $USER_CS                # CS
    lea     ring3(%rip), %rax
    push    %rax                    # RIP
    iretq

# --- ring 3 -------------------------------------------------------------------------------------
ring3:
    MARK    MARK_RING3_START
    TIMED_LOOP RING3_ITERATIONS
    MARK    MARK_RING3_END
    mov     %rbx, %r12              # ring-3 ticks

    # "ring 0: N iterations of dec/jnz, T TSC ticks"
    lea     msg_ring0(%rip), %rsi
    call    puts
    mov     $RING0_ITERATIONS, %eax
    call    put_decimal
    lea     msg_iterations(%rip), %rsi
    call    puts
    mov     ring0_ticks(%rip), %rax
    call    put_decimal
    lea     msg_ticks(%rip), %rsi
    call    puts

    lea     msg_ring3(%rip), %rsi
    call    puts
    mov     $RING3_ITERATIONS, %eax
    call    put_decimal
    lea     msg_iterations(%rip), %rsi
    call    puts
    mov     %r12, %rax
    call    put_decimal
    lea     msg_ticks(%rip), %rsi
    call    puts

    # ratio = (ring-0 ticks / RING0_ITERATIONS) / (ring-3 ticks / RING3_ITERATIONS)
    #       = ring-0 ticks * RING3_ITERATIONS / (ring-3 ticks * RING0_ITERATIONS),
    # rounded; `mul` leaves a 128-bit product in RDX:RAX, which `div` divides.
    lea     msg_ratio(%rip), %rsi
    call    puts
    mov     ring0_ticks(%rip), %rax
    mov     $RING3_ITERATIONS, %ecx
    mul     %rcx
    mov     %rax, %r8               # RDX:R8 = numerator
    mov     %r12, %rax
    mov     $RING0_ITERATIONS, %ecx
    mul     %rcx
    mov     %rax, %rcx              # denominator (fits in 64 bits for any sane run)
    test    %rcx, %rcx
    jnz     2f
    inc     %rcx                    # a zero-tick loop would divide by zero
2:  mov     %rcx, %rax
    shr     $1, %rax                # + denominator / 2: round to nearest
    add     %rax, %r8
    adc     $0, %rdx
    mov     %r8, %rax
    div     %rcx
    call    put_decimal
    lea     msg_newline(%rip), %rsi
    call    puts

    EXIT_VM 0                       # allowed in ring 3 here, by the I/O bitmap
3:  jmp     3b                      # (ring 3 may not hlt)

# puts: the NUL-terminated string at RSI to COM1.
puts:
    COM1_PUTS
    ret

# put_decimal: RAX in decimal, digits built backwards in number_buffer.
put_decimal:
    lea     number_buffer_end(%rip), %rsi
    movb    $0, (%rsi)
    mov     $10, %ecx
4:  xor     %edx, %edx
    div     %rcx
    add     $'0', %dl
    dec     %rsi
    mov     %dl, (%rsi)
    test    %rax, %rax
    jnz     4b
    jmp     puts

# --- data --------------------------------------------------------------------------------------------
msg_ring0:      .asciz "ring 0: "
msg_ring3:      .asciz "ring 3: "
msg_iterations: .asciz " iterations of dec/jnz, "
msg_ticks:      .asciz " TSC ticks\n"
msg_ratio:      .asciz "ring 0 / ring 3 time per iteration: "
msg_newline:    .asciz "\n"

    .balign 8
ring0_ticks:    .quad 0
number_buffer:  .fill 24, 1, 0
number_buffer_end: .byte 0

    .balign 8
gdt:
    .quad   0                                       # 0x00 null
    SEGMENT_DESCRIPTOR 0, 0xfffff, 0x9a, 0xa        # 0x08 ring-0 code, 64-bit
    SEGMENT_DESCRIPTOR 0, 0xfffff, 0x92, 0xc        # 0x10 ring-0 data
    SEGMENT_DESCRIPTOR 0, 0xfffff, 0xf2, 0xc        # 0x18 ring-3 data
    SEGMENT_DESCRIPTOR 0, 0xfffff, 0xfa, 0xa        # 0x20 ring-3 code, 64-bit
gdt_tss:                                            # 0x28 TSS, base filled in at start
    SEGMENT_DESCRIPTOR 0, tss_end-tss-1, 0x89, 0x0
    .quad   0
gdt_end:
gdt_descriptor:
    .word   gdt_end - gdt - 1
    .quad   gdt

# A 64-bit TSS with an I/O permission bitmap for ports 0-0x3ff (ports above
# lie beyond the TSS limit: denied). Granted: 0xf4-0xf5 (pykvm's exit and
# progress ports) and 0x3f8-0x3ff (COM1).
    .balign 16
tss:
    .fill   102, 1, 0               # RSP0-2, IST1-7: unused, nothing enters ring 0 here
    .word   io_bitmap - tss         # where the bitmap starts
io_bitmap:
    .fill   0xf4 / 8, 1, 0xff       # ports 0x00-0xef: denied
    .byte   0xcf                    # ports 0xf0-0xf7: bits 4 and 5 clear, 0xf4 and 0xf5 allowed
    .fill   0x3f8 / 8 - 0xf4 / 8 - 1, 1, 0xff   # ports 0xf8-0x3f7: denied
    .byte   0x00                    # ports 0x3f8-0x3ff: COM1, allowed
    .byte   0xff                    # the CPU requires a final all-ones byte
tss_end:

    .balign 16
    .fill   512, 1, 0
stack_top:
    .fill   512, 1, 0
user_stack_top:

# One 2 MiB page at address 0, user-accessible: the whole guest lives in it.
    .balign 4096
pml4:
    .quad   pdpt + PTE_PRESENT + PTE_WRITABLE + PTE_USER
    .fill   511, 8, 0
pdpt:
    .quad   page_directory + PTE_PRESENT + PTE_WRITABLE + PTE_USER
    .fill   511, 8, 0
page_directory:
    .quad   0 + PTE_PRESENT + PTE_WRITABLE + PTE_USER + PTE_HUGE
    .fill   511, 8, 0
