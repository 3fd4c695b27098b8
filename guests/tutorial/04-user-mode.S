# 04-user-mode.S - a tiny 64-bit kernel and one user program: rings, the TSS,
# the IDT, and the system-call boundary between them.
#
#   python3 -m pykvm run --flat guests/tutorial/build/04-user-mode.bin --entry long
#
# `--entry long` lets pykvm do what 02 and 03 showed: we start in 64-bit mode
# with pykvm's boot GDT and identity page tables, interrupts off, no IDT. The
# kernel then builds the machinery of protection itself:
#
#   page tables  with the User bit set only on the user program's pages
#   GDT          ring-0 segments for the kernel, ring-3 segments for the user
#   TSS          where the CPU finds the kernel stack (RSP0) when an exception
#                takes it from ring 3 to ring 0
#   IDT          a handler for each CPU exception (#UD, #GP, #PF, ...): print
#                what happened and exit with status 128 + vector
#   syscall MSRs STAR (segments), LSTAR (entry point), SFMASK (flags to clear),
#                and EFER.SCE to allow the `syscall` instruction at all
#
# and drops to ring 3 with `iretq`. The user program cannot do port I/O (IOPL
# is 0: an `out` in ring 3 raises #GP), so to print it asks the kernel:
# write(1, msg, len) and exit(status) through `syscall`, with Linux's numbers
# and registers (RAX = number, RDI, RSI, RDX = arguments, RAX = result).
#
# Output:
#   kernel: entering user mode
#   user: hello via syscall
#   kernel: user exited with 0
#
# Who runs what:
#   guest mode - the user program in ring 3 (natively, on every host, kvm_pvm
#                included); `syscall` and `sysretq` themselves; the kernel's
#                ordinary instructions (natively on VT-x/AMD-V, emulated in the
#                kernel on kvm_pvm, where all ring-0 code is).
#   KVM        - the CR3 write, `wrmsr`, `lgdt`/`lidt`/`ltr` as the host needs
#                (VT-x traps CR and MSR writes; KVM finishes them and resumes).
#   pykvm      - the `out`s of the kernel's printing and the exit port. The
#                write() system call sends its buffer with one `rep outsb`,
#                yet that is still one exit per byte: KVM performs a string
#                `out` one element at a time, each a KVM_EXIT_IO to pykvm.
#
# kvm_pvm (docs/hosts.md): `syscall` from ring 3 does not switch to ring 0 there. The
# CPU jumps to LSTAR still in ring 3, the fetch from a supervisor page faults,
# and without help this kernel reports
#   kernel: #PF page fault at rip=<syscall_entry> in ring 3 ...
# and exits with 142. pykvm's syscall completion (pykvm/quirks/syscall.py)
# catches that page fault at the #PF handler's entry and finishes the system
# call as the CPU should have (see the exception stubs below).

.include "tutorial.inc"

# --- the GDT's selectors (index * 8 | requested privilege level) ------------------------
.set KERNEL_CS,  0x08           # ring-0 64-bit code
.set KERNEL_DS,  0x10           # ring-0 data (syscall loads SS = KERNEL_CS + 8)
.set USER_BASE,  0x18           # sysretq loads CS = USER_BASE + 16, SS = USER_BASE + 8
.set USER_DS,    0x20 | 3       # ring-3 data
.set USER_CS,    0x28 | 3       # ring-3 64-bit code
.set TSS_SEL,    0x30           # the TSS descriptor (16 bytes in long mode)

# --- control registers, MSRs and flags ------------------------------------------------------
.set MSR_EFER,   0xc0000080
.set EFER_SCE,   1 << 0         # system-call extensions: allows syscall/sysret
.set MSR_STAR,   0xc0000081     # segment selectors for syscall and sysret
.set MSR_LSTAR,  0xc0000082     # RIP of the 64-bit syscall entry point
.set MSR_SFMASK, 0xc0000084     # RFLAGS bits syscall clears
.set RFLAGS_FIXED, 1 << 1       # bit 1 always reads as 1
# syscall clears what Linux clears: TF, IF, DF, IOPL, NT, AC. With IF clear the
# kernel is not interrupted before it has switched to its own stack.
.set SYSCALL_MASK, 0x47700

.set PTE_PRESENT,  1 << 0
.set PTE_WRITABLE, 1 << 1
.set PTE_USER,     1 << 2       # ring 3 may access the page (at every level of the walk)
.set PAGE_SIZE,    4096

# --- system calls, Linux x86-64 numbers and error codes ------------------------------------
.set SYS_WRITE, 1
.set SYS_EXIT,  60
.set EBADF,     9
.set EFAULT,    14
.set ENOSYS,    38

    .text
    .code64
    .globl _start

#############################################################################################
# The kernel: ring 0
#############################################################################################
_start:
    cli                         # pykvm starts us with interrupts off; say so anyway
    cld
    lea     kernel_stack_top(%rip), %rsp

    # --- 1. Page tables: ours, not pykvm's. The user program's pages (and
    # only those) get the User bit; everything else stays kernel-only, so a
    # ring-3 access to it is a page fault. page_table maps the first 2 MiB in
    # 4 KiB pages: entry i maps address i * 4096.
    lea     user_start(%rip), %rax
    lea     user_end(%rip), %rcx
    lea     page_table(%rip), %rdx
1:  mov     %rax, %rbx
    shr     $12, %rbx                       # page number = PTE index
    orq     $PTE_USER, (%rdx,%rbx,8)
    add     $PAGE_SIZE, %rax
    cmp     %rcx, %rax
    jb      1b
    lea     pml4(%rip), %rax
    mov     %rax, %cr3                      # switch to our tables (flushes the TLB)

    # --- 2. GDT and TSS. The TSS descriptor holds the TSS's 64-bit address in
    # four pieces; the assembler cannot split an address the linker decides,
    # so the kernel fills them in now, as real kernels do.
    lea     tss(%rip), %rax
    lea     gdt_tss(%rip), %rdi
    mov     %ax, 2(%rdi)                    # base 15:0
    shr     $16, %rax
    mov     %al, 4(%rdi)                    # base 23:16
    mov     %ah, 7(%rdi)                    # base 31:24
    shr     $16, %rax
    mov     %eax, 8(%rdi)                   # base 63:32
    lgdt    gdt_descriptor(%rip)

    # Reload CS from the new GDT. There is no far `jmp` with an immediate in
    # 64-bit mode; a far return pops RIP and CS, so push them and `lretq`.
    pushq   $KERNEL_CS
    lea     2f(%rip), %rax
    push    %rax
    lretq
2:  mov     $KERNEL_DS, %ax
    mov     %ax, %ds
    mov     %ax, %es
    mov     %ax, %ss
    xor     %eax, %eax                      # FS and GS: the null selector is fine in 64-bit mode
    mov     %ax, %fs
    mov     %ax, %gs

    mov     $TSS_SEL, %ax
    ltr     %ax                             # the CPU now takes RSP0 from our TSS

    # --- 3. IDT: vectors 0-31 (the CPU's exceptions) each get a stub that
    # records its vector number; the other 224 stay not-present (delivering
    # one of those would raise #GP, whose handler reports it).
    xor     %edi, %edi                      # vector
    lea     exception_stubs(%rip), %rsi     # its stub
3:  call    set_idt_gate
    inc     %edi
    add     $EXCEPTION_STUB_SIZE, %rsi
    cmp     $32, %edi
    jb      3b
    lidt    idt_descriptor(%rip)

    # --- 4. syscall: enable it, and tell the CPU where to go and with which segments.
    mov     $MSR_EFER, %ecx
    rdmsr
    or      $EFER_SCE, %eax
    wrmsr
    mov     $MSR_STAR, %ecx
    xor     %eax, %eax                      # STAR[31:0]: unused in 64-bit mode
    mov     $(USER_BASE << 16) | KERNEL_CS, %edx   # STAR[63:48] sysret base, STAR[47:32] syscall CS
    wrmsr
    mov     $MSR_LSTAR, %ecx
    lea     syscall_entry(%rip), %rax
    mov     %rax, %rdx
    shr     $32, %rdx                       # wrmsr takes the value in EDX:EAX
    wrmsr
    mov     $MSR_SFMASK, %ecx
    mov     $SYSCALL_MASK, %eax
    xor     %edx, %edx
    wrmsr

    lea     msg_entering(%rip), %rsi
    call    kputs

    # --- 5. Down to ring 3. `iretq` pops RIP, CS, RFLAGS, RSP, SS: the frame
    # an interrupt from user mode would have pushed. CS with RPL 3 makes the
    # CPU drop to ring 3; RFLAGS has IOPL 0 (no port I/O for the user) and IF 0
    # (this tutorial uses no interrupts).
    pushq   $USER_DS                        # SS
    lea     user_stack_top(%rip), %rax
    push    %rax                            # RSP
    pushq   $RFLAGS_FIXED                   # RFLAGS
    pushq   $USER_CS                        # CS
    lea     user_entry(%rip), %rax
    push    %rax                            # RIP
    iretq

# set_idt_gate: IDT entry EDI -> handler RSI, a ring-0 64-bit interrupt gate.
# (An interrupt gate clears IF on entry; DPL 0 means user code cannot raise the
# vector with `int n` itself.) Clobbers RAX, RDX.
set_idt_gate:
    mov     %edi, %edx
    shl     $4, %rdx                        # 16 bytes per entry
    lea     idt(%rip), %rax
    add     %rax, %rdx
    mov     %rsi, %rax
    mov     %ax, (%rdx)                     # offset 15:0
    movw    $KERNEL_CS, 2(%rdx)             # code segment the handler runs in
    movb    $0, 4(%rdx)                     # IST 0: use RSP0 / the current stack
    movb    $0x8e, 5(%rdx)                  # present, DPL 0, type 0xe (interrupt gate)
    shr     $16, %rax
    mov     %ax, 6(%rdx)                    # offset 31:16
    shr     $16, %rax
    mov     %eax, 8(%rdx)                   # offset 63:32
    movl    $0, 12(%rdx)
    ret

# --- System calls -------------------------------------------------------------------------
# `syscall` saved the user's RIP in RCX and RFLAGS in R11, cleared the RFLAGS
# bits in SFMASK, loaded CS/SS from STAR (ring 0) and jumped here. It did NOT
# switch stacks: RSP is still the user's, which the kernel must not trust.
syscall_entry:
    mov     %rsp, user_rsp(%rip)
    lea     kernel_stack_top(%rip), %rsp
    push    %rcx                            # for sysretq
    push    %r11
    # The ABI promises user code that only RAX, RCX and R11 change.
    push    %rdi
    push    %rsi
    push    %rdx

    cmp     $SYS_WRITE, %rax
    je      sys_write
    cmp     $SYS_EXIT, %rax
    je      sys_exit
    mov     $-ENOSYS, %rax
    jmp     syscall_return

# write(fd = RDI, buf = RSI, count = RDX) -> bytes written, or -errno
sys_write:
    mov     $-EBADF, %rax
    cmp     $1, %rdi                        # only stdout exists
    jne     syscall_return
    # Never trust a user pointer: the whole buffer must lie in user memory,
    # or a user could make the kernel print kernel memory for it.
    mov     $-EFAULT, %rax
    lea     user_start(%rip), %rcx
    cmp     %rcx, %rsi
    jb      syscall_return                  # starts below user memory
    lea     user_end(%rip), %rcx
    sub     %rsi, %rcx                      # bytes from buf to the end of user memory
    cmp     %rcx, %rdx
    ja      syscall_return                  # runs past it (or buf is beyond it)
    # One `rep outsb` sends the whole buffer: one instruction, but to the
    # hypervisor RCX separate `out`s, so still one exit to pykvm per byte.
    mov     %rdx, %rax                      # the result: all bytes written
    mov     %rdx, %rcx
    mov     $COM1, %dx
    rep outsb
    jmp     syscall_return

# exit(status = RDI): the process is gone; with nothing else to run, stop the VM.
sys_exit:
    movzbl  %dil, %ebx                      # the status's low byte, as Linux keeps it
    lea     msg_exited(%rip), %rsi          # (the print routines leave RBX alone)
    call    kputs
    mov     %rbx, %rax
    mov     $10, %ecx
    call    kput_uint
    lea     msg_newline(%rip), %rsi
    call    kputs
    mov     %bl, %al
    out     %al, $EXIT_PORT                 # pykvm exits with the user's status
    jmp     halt_forever

syscall_return:
    pop     %rdx
    pop     %rsi
    pop     %rdi
    pop     %r11
    pop     %rcx
    mov     user_rsp(%rip), %rsp
    # sysretq: RIP = RCX, RFLAGS = R11, CS/SS = STAR[63:48] + 16 / + 8, ring 3.
    # (A real kernel first checks that RCX is canonical: on Intel CPUs a
    # sysret to a non-canonical RIP faults in ring 0 on the user's stack.)
    sysretq

# --- Exceptions -----------------------------------------------------------------------------
# For each vector 0-31 a 16-byte stub pushes a dummy error code (where the
# CPU pushes none) and the vector number, so that exception_common always sees
#   [RSP] vector, error code, RIP, CS, RFLAGS, RSP, SS (the last five pushed by the CPU)
# It starts with a 3-byte NOP, as Linux's entry code does: there Linux patches
# in `clac` on CPUs with SMAP. On kvm_pvm the NOP has a second use: pykvm's
# system-call completion plants its `int3` over the first instruction of the
# #PF handler and then has to perform that instruction itself, which it can
# for a NOP or `clac` (pykvm/quirks/syscall.py). Then `cld`: unlike `syscall`
# (SFMASK), an exception does not clear the direction flag, user code may have
# set it, and the kernel's string instructions (lodsb in kputs) must run
# forwards.
.set EXCEPTION_STUB_SIZE, 16
# The vectors for which the CPU pushes an error code: #DF, #TS, #NP, #SS, #GP,
# #PF, #AC, #CP, #VC, #SX (one bit per vector).
.set ERROR_CODE_VECTORS, (1 << 8) | (1 << 10) | (1 << 11) | (1 << 12) | (1 << 13) | (1 << 14)
.set ERROR_CODE_VECTORS, ERROR_CODE_VECTORS | (1 << 17) | (1 << 21) | (1 << 29) | (1 << 30)
.macro EXCEPTION_STUB vector
    .balign EXCEPTION_STUB_SIZE
    nopl    (%rax)
    cld
    .if ((ERROR_CODE_VECTORS >> \vector) & 1) == 0
    pushq   $0
    .endif
    pushq   $\vector
    jmp     exception_common
.endm

    .balign EXCEPTION_STUB_SIZE
exception_stubs:
    .set    vector, 0
    .rept   32
    EXCEPTION_STUB vector
    .set    vector, vector + 1
    .endr

# Report the exception and stop the VM with status 128 + vector, e.g.
#   kernel: #GP general protection fault at rip=0x1b00d in ring 3, error=0x0
# This kernel has no way to recover: a user fault ends the "process", and the
# VM with it; a kernel fault is a bug.
exception_common:
    lea     msg_kernel(%rip), %rsi
    call    kputs
    mov     (%rsp), %rax                    # vector
    lea     exception_names(%rip), %rsi
    mov     (%rsi,%rax,8), %rsi
    call    kputs
    lea     msg_at_rip(%rip), %rsi
    call    kputs
    mov     16(%rsp), %rax                  # RIP of the faulting instruction
    call    kput_hex
    lea     msg_in_ring(%rip), %rsi
    call    kputs
    mov     24(%rsp), %rax                  # CS: its low 2 bits are the ring we came from
    and     $3, %eax
    mov     $10, %ecx
    call    kput_uint
    lea     msg_error(%rip), %rsi
    call    kputs
    mov     8(%rsp), %rax                   # error code
    call    kput_hex
    cmpq    $14, (%rsp)
    jne     4f
    lea     msg_cr2(%rip), %rsi             # #PF: CR2 holds the address that faulted
    call    kputs
    mov     %cr2, %rax
    call    kput_hex
4:  lea     msg_newline(%rip), %rsi
    call    kputs
    mov     (%rsp), %eax
    add     $128, %eax
    out     %al, $EXIT_PORT
halt_forever:
    cli
    hlt
    jmp     halt_forever

# --- Kernel printing ---------------------------------------------------------------------
# kputs: the NUL-terminated string at RSI to COM1, one `out` (one exit) per byte.
kputs:
    COM1_PUTS
    ret

# kput_hex: RAX as 0x... in hexadecimal.
kput_hex:
    push    %rax
    lea     msg_0x(%rip), %rsi
    call    kputs
    pop     %rax
    mov     $16, %ecx
    # fall through
# kput_uint: RAX in base RCX (2..16), digits built backwards in number_buffer.
kput_uint:
    lea     number_buffer_end(%rip), %rsi
    movb    $0, (%rsi)
    lea     digits(%rip), %r8
5:  xor     %edx, %edx
    div     %rcx                            # RAX = RAX / base, RDX = remainder
    movb    (%r8,%rdx), %dl
    dec     %rsi
    mov     %dl, (%rsi)
    test    %rax, %rax
    jnz     5b
    jmp     kputs

#############################################################################################
# The user program: ring 3. Its pages are the only ones with the User bit.
#############################################################################################
    .balign PAGE_SIZE
user_start:
user_entry:
    # write(1, user_msg, user_msg_len)
    mov     $SYS_WRITE, %eax
    mov     $1, %edi
    lea     user_msg(%rip), %rsi
    mov     $user_msg_len, %edx
    syscall                                 # to the kernel and back (RCX, R11 clobbered)

    # exit(0) if write wrote it all, exit(1) if not: the result came back in RAX.
    xor     %edi, %edi
    cmp     $user_msg_len, %rax
    setne   %dil
    mov     $SYS_EXIT, %eax
    syscall
    ud2                                     # exit does not return; if it did: #UD

user_msg:
    .ascii  "user: hello via syscall\n"
    .set    user_msg_len, . - user_msg

    .balign PAGE_SIZE
    .fill   PAGE_SIZE, 1, 0                 # the user stack: one page
user_stack_top:
user_end:

#############################################################################################
# Kernel data
#############################################################################################
msg_entering:   .asciz "kernel: entering user mode\n"
msg_exited:     .asciz "kernel: user exited with "
msg_kernel:     .asciz "kernel: "
msg_at_rip:     .asciz " at rip="
msg_in_ring:    .asciz " in ring "
msg_error:      .asciz ", error="
msg_cr2:        .asciz ", cr2="
msg_0x:         .asciz "0x"
msg_newline:    .asciz "\n"
digits:         .ascii "0123456789abcdef"

exception_names:                            # what the CPU means by each vector
    .irp    name, de, db, nmi, bp, of, br, ud, nm, df, cso, ts, np, ss, gp, pf, r15
    .quad   exception_name_\name
    .endr
    .irp    name, mf, ac, mc, xm, ve, cp, r22, r23, r24, r25, r26, r27, r28, r29, r30, r31
    .quad   exception_name_\name
    .endr
exception_name_de:  .asciz "#DE divide error"
exception_name_db:  .asciz "#DB debug"
exception_name_nmi: .asciz "NMI"
exception_name_bp:  .asciz "#BP breakpoint"
exception_name_of:  .asciz "#OF overflow"
exception_name_br:  .asciz "#BR bound range exceeded"
exception_name_ud:  .asciz "#UD invalid opcode"
exception_name_nm:  .asciz "#NM device not available"
exception_name_df:  .asciz "#DF double fault"
exception_name_cso: .asciz "coprocessor segment overrun"
exception_name_ts:  .asciz "#TS invalid TSS"
exception_name_np:  .asciz "#NP segment not present"
exception_name_ss:  .asciz "#SS stack fault"
exception_name_gp:  .asciz "#GP general protection fault"
exception_name_pf:  .asciz "#PF page fault"
exception_name_mf:  .asciz "#MF x87 floating-point error"
exception_name_ac:  .asciz "#AC alignment check"
exception_name_mc:  .asciz "#MC machine check"
exception_name_xm:  .asciz "#XM SIMD floating-point error"
exception_name_ve:  .asciz "#VE virtualization exception"
exception_name_cp:  .asciz "#CP control protection"
    .irp    n, 15, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31
exception_name_r\n: .asciz "reserved exception"
    .endr

    .balign 8
user_rsp:       .quad 0                     # the user's RSP while the kernel runs a syscall
number_buffer:  .fill 24, 1, 0
number_buffer_end: .byte 0

    .balign 8
gdt:
    .quad   0                                       # 0x00 null
    SEGMENT_DESCRIPTOR 0, 0xfffff, 0x9a, 0xa        # 0x08 kernel code, 64-bit, DPL 0
    SEGMENT_DESCRIPTOR 0, 0xfffff, 0x92, 0xc        # 0x10 kernel data, DPL 0
    .quad   0                                       # 0x18 (a 32-bit user code segment would go
                                                    #      here; sysretq only counts from it)
    SEGMENT_DESCRIPTOR 0, 0xfffff, 0xf2, 0xc        # 0x20 user data, DPL 3
    SEGMENT_DESCRIPTOR 0, 0xfffff, 0xfa, 0xa        # 0x28 user code, 64-bit, DPL 3
gdt_tss:                                            # 0x30 TSS: 16 bytes, base filled in at start
    SEGMENT_DESCRIPTOR 0, tss_end-tss-1, 0x89, 0x0      # present, DPL 0, type 9 (64-bit TSS)
    .quad   0                                       #      base 63:32 and reserved
gdt_end:
gdt_descriptor:
    .word   gdt_end - gdt - 1
    .quad   gdt

# The 64-bit TSS holds no task state any more, only stack pointers: RSP0 is
# the stack the CPU switches to when an exception or interrupt arrives in ring 3.
    .balign 16
tss:
    .long   0
    .quad   kernel_stack_top                # RSP0
    .quad   0, 0                            # RSP1, RSP2
    .quad   0                               # reserved
    .quad   0, 0, 0, 0, 0, 0, 0             # IST1-7
    .quad   0                               # reserved
    .word   0                               # reserved
    .word   tss_end - tss                   # I/O bitmap offset beyond the TSS: no bitmap,
tss_end:                                    # so ring 3 may use no port at all (IOPL is 0)

idt_descriptor:
    .word   256 * 16 - 1
    .quad   idt

# Page tables: the first 2 MiB in 4 KiB pages. The upper levels allow user
# access; page_table entries decide it page by page. Page 0 is left unmapped
# so that a null pointer faults.
    .balign PAGE_SIZE
pml4:
    .quad   pdpt + PTE_PRESENT + PTE_WRITABLE + PTE_USER
    .fill   511, 8, 0
pdpt:
    .quad   page_directory + PTE_PRESENT + PTE_WRITABLE + PTE_USER
    .fill   511, 8, 0
page_directory:
    .quad   page_table + PTE_PRESENT + PTE_WRITABLE + PTE_USER
    .fill   511, 8, 0
page_table:
    .quad   0                               # page 0: not present
    .set    address, PAGE_SIZE
    .rept   511
    .quad   address + PTE_PRESENT + PTE_WRITABLE   # kernel-only until _start adds PTE_USER
    .set    address, address + PAGE_SIZE
    .endr

idt:                                        # page-aligned, right after the page table
    .fill   256 * 16, 1, 0
    .fill   PAGE_SIZE, 1, 0                 # the kernel stack: one page
kernel_stack_top:
