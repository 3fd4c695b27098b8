/* A tiny long-mode kernel with a user process, for the system-call path.
 *
 * The kernel (ring 0) sets up what Linux does for SYSCALL: its own GDT with
 * Linux's selectors, a TSS per CPU (RSP0), page tables with user pages, an IDT
 * whose #PF handler starts with a NOP (or clac with --defsym PF_CLAC=1),
 * EFER.SCE/NXE, STAR/LSTAR/SFMASK, KERNEL_GS_BASE for swapgs. It then `iretq`s to
 * ring 3. The user process makes COUNT system calls, checks after each
 * `sysretq` that RCX was the return address and R11 its RFLAGS, writes to a page
 * that is not mapped (the #PF handler maps it: a genuine page fault), and exits.
 *
 * SMP: every vCPU enters at _start with its index in %rsi (pykvm's set_mode(rsi=));
 * the test writes the CPU count to NCPUS. The last CPU to exit stops the VM.
 * With REWRITE set (one CPU only) the kernel rewrites the first bytes of its own
 * #PF handler twice, as Linux patches its text, to make pykvm re-plant its int3.
 *
 * Fixed layout (absolute addresses; the binary is loaded at LOAD):
 */
.set GDT_ADDR,    0x12000
.set TSS_ADDR,    0x12100   /* one 0x80-byte TSS per CPU */
.set PERCPU_ADDR, 0x12300   /* one 0x40-byte area per CPU: the GS base after swapgs */
.set NCPUS,       0x12400   /* written by the test */
.set USER_CODE,   0x13000   /* the user page */
.set COUNT,       0x13ff0   /* in it, written by the test: how many SYS_PRINT calls */
.set REWRITE,     0x13ff8   /* in it, written by the test: 1 = rewrite the #PF handler's first bytes */
.set IDT_ADDR,    0x14000
.set PML4,        0x15000
.set PDPT,        0x16000
.set PD,          0x17000
.set PT,          0x18000   /* 4 KiB pages for the first 2 MiB */
.set USTACK,      0x19000   /* user stacks: one page per CPU */
.set KSTACK,      0x1B000   /* kernel stacks: one page per CPU */
.set DEMAND,      0x1F0000  /* not mapped until a user write faults: one page per CPU */
.set MAX_CPUS,    2

.set KERNEL_CS, 0x10        /* Linux's __KERNEL_CS, __KERNEL_DS, __USER_DS, __USER_CS */
.set KERNEL_DS, 0x18
.set USER32_CS, 0x23
.set USER_DS,   0x2b
.set USER_CS,   0x33
.set TSS_SEL,   0x40        /* CPU n: 0x40 + 16 n */

.set MSR_EFER, 0xc0000080
.set MSR_STAR, 0xc0000081
.set MSR_LSTAR, 0xc0000082
.set MSR_SFMASK, 0xc0000084
.set MSR_KERNEL_GS_BASE, 0xc0000102
.set SFMASK_VALUE, 0x47700  /* Linux: TF DF IF IOPL NT AC */

.set SYS_PRINT, 1           /* print %rdi; returns 2 * %rdi + 1 */
.set SYS_VALUE, 2           /* print the value the user read back */
.set SYS_EXIT, 3
.set SYS_FAIL, 4            /* a user-side check failed: %rdi what, %rsi the value */
.set SYS_REWRITE, 5         /* rewrite the #PF handler's first bytes; %rdi = 0: wait, 1: fwait */

/* percpu area fields */
.set PC_USER_RSP, 0
.set PC_KSTACK, 8
.set PC_CPU, 16

.include "common.S"

/* Serial output lock: lines from two CPUs must not interleave. */
.macro LOCKED_PRINT_BEGIN
    push %rax
1:  mov $1, %eax
    xchg %eax, print_lock(%rip)
    test %eax, %eax
    jnz 1b
    pop %rax
.endm
.macro LOCKED_PRINT_END
    movl $0, print_lock(%rip)
.endm

main:
    mov %rsi, %r15                      /* CPU index for the whole kernel path */
    mov %r15, %rax
    shl $12, %rax
    lea KSTACK + 0x1000(%rax), %rsp

    lgdt gdtr(%rip)
    pushq $KERNEL_CS
    lea 1f(%rip), %rax
    push %rax
    lretq
1:  mov $KERNEL_DS, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    mov %r15, %rax
    shl $4, %rax
    add $TSS_SEL, %ax
    ltr %ax

    mov $PML4, %rax
    mov %rax, %cr3

    test %r15, %r15
    jnz 2f
    call build_idt
    movl $1, idt_ready(%rip)
2:  cmpl $1, idt_ready(%rip)
    je 3f
    pause
    jmp 2b
3:  lidt idtr(%rip)

    mov $MSR_EFER, %ecx
    rdmsr
    or $((1 << 0) | (1 << 11)), %eax    /* SCE, NXE */
    wrmsr
    mov $MSR_STAR, %ecx
    xor %eax, %eax
    mov $((USER32_CS << 16) | KERNEL_CS), %edx
    wrmsr
    mov $MSR_LSTAR, %ecx
    lea syscall_entry(%rip), %rax
    xor %edx, %edx
    wrmsr
    mov $MSR_SFMASK, %ecx
    mov $SFMASK_VALUE, %eax
    wrmsr
    mov %r15, %rax                      /* percpu area: GS base inside the kernel */
    shl $6, %rax
    add $PERCPU_ADDR, %rax
    mov %r15, PC_CPU(%rax)
    lea KSTACK + 0x1000, %rdx
    mov %r15, %rcx
    shl $12, %rcx
    add %rcx, %rdx
    mov %rdx, PC_KSTACK(%rax)
    mov %rax, %rdx
    shr $32, %rdx
    mov $MSR_KERNEL_GS_BASE, %ecx
    wrmsr

    /* Any instruction the host's emulator stops at lets a VMM look at the IDT
     * now, as Linux's boot gives it many chances to; fwait is one (a no-op here).
     * With --defsym NO_STOP=1 there is none: the first system call follows the lidt
     * by a few port writes (the line below) and microseconds. */
    .ifndef NO_STOP
    fwait
    .endif

    LOCKED_PRINT_BEGIN
    PRINT "cpu "
    PRINTHEX %r15
    PRINT ": to user mode\n"
    LOCKED_PRINT_END

    mov %r15, %rax                      /* iretq to ring 3 */
    shl $12, %rax
    lea USTACK + 0x1000(%rax), %rax
    pushq $USER_DS
    push %rax
    pushq $0x202                        /* IF set: SFMASK must clear it in the kernel */
    pushq $USER_CS
    pushq $USER_CODE
    iretq

build_idt:
    mov $IDT_ADDR, %rbx
    mov $KERNEL_CS, %cx
    call install_fault_stubs
    mov $14, %edi
    lea pf_handler(%rip), %rsi
    mov $0x8e, %dl
    call set_gate
    ret

/* The system-call entry, as Linux's entry_SYSCALL_64 begins: swapgs, stack switch. */
syscall_entry:
    swapgs
    mov %rsp, %gs:PC_USER_RSP
    mov %gs:PC_KSTACK, %rsp
    push %rcx
    push %r11
    push %rbx
    push %rdx
    push %r8
    push %r9
    mov %gs:PC_CPU, %rbx

    mov %cs, %r8                        /* the ring switch pykvm completes on kvm_pvm */
    cmp $KERNEL_CS, %r8
    jne bad_kernel_state
    mov %ss, %r9
    cmp $KERNEL_DS, %r9
    jne bad_kernel_state
    pushfq
    pop %rdx
    test $0x200, %edx                   /* SFMASK cleared IF */
    jnz bad_kernel_state

    cmp $SYS_PRINT, %eax
    je sys_print
    cmp $SYS_VALUE, %eax
    je sys_value
    cmp $SYS_EXIT, %eax
    je sys_exit
    cmp $SYS_FAIL, %eax
    je sys_fail
    cmp $SYS_REWRITE, %eax
    je sys_rewrite
    mov $-1, %rax
    jmp sys_return

sys_print:
    LOCKED_PRINT_BEGIN
    PRINT "cpu "
    PRINTHEX %rbx
    PRINT ": syscall "
    PRINTHEX %rdi
    PRINT " cs="
    PRINTHEX %r8
    PRINT " ss="
    PRINTHEX %r9
    PRINT "\n"
    LOCKED_PRINT_END
    lea 1(%rdi, %rdi), %rax
    jmp sys_return

sys_value:
    LOCKED_PRINT_BEGIN
    PRINT "cpu "
    PRINTHEX %rbx
    PRINT ": read back "
    PRINTHEX %rdi
    PRINT "\n"
    LOCKED_PRINT_END
    xor %eax, %eax
    jmp sys_return

sys_rewrite:
    /* Patch the #PF handler's first three bytes (a 3-byte NOP) the way Linux's
     * alternatives do: to 90 66 90, or back to 0f 1f 00; then give the VMM a
     * chance to notice: an emulation stop (fwait) or time (its watch thread). */
    lea pf_handler(%rip), %rdx
    cmpb $0x90, 1(%rdx)
    jne 1f
    movb $0x0f, (%rdx)                  /* was 90 66 90 (or cc 66 90) */
    movw $0x001f, 1(%rdx)
    jmp 2f
1:  movb $0x90, (%rdx)                  /* was 0f 1f 00 (or cc 1f 00) */
    movw $0x9066, 1(%rdx)
2:  test %rdi, %rdi
    jz 3f
    fwait
    jmp 5f
3:  mov $50000000, %ecx                 /* bounded: without a VMM's int3 nothing changes */
4:  cmpb $0xcc, (%rdx)
    je 5f
    dec %ecx
    jnz 4b
5:  LOCKED_PRINT_BEGIN
    PRINT "cpu "
    PRINTHEX %rbx
    PRINT ": rewrote the page-fault handler\n"
    LOCKED_PRINT_END
    xor %eax, %eax
    jmp sys_return

sys_fail:
    LOCKED_PRINT_BEGIN
    PRINT "cpu "
    PRINTHEX %rbx
    PRINT ": user check failed: "
    PRINTHEX %rdi
    PRINT " "
    PRINTHEX %rsi
    PRINT "\n"
    LOCKED_PRINT_END
    mov $2, %al
    jmp exit

sys_exit:
    LOCKED_PRINT_BEGIN
    PRINT "cpu "
    PRINTHEX %rbx
    PRINT ": exit\n"
    LOCKED_PRINT_END
    mov $1, %eax
    lock xadd %eax, cpus_done(%rip)
    inc %eax
    cmp NCPUS, %eax
    jb 1f
    xor %eax, %eax
    jmp exit
1:  sti                                 /* not the last: idle (IF set: not a dead halt) */
    hlt
    jmp 1b

sys_return:
    pop %r9
    pop %r8
    pop %rdx
    pop %rbx
    pop %r11
    pop %rcx
    mov %gs:PC_USER_RSP, %rsp
    swapgs
    sysretq

bad_kernel_state:
    LOCKED_PRINT_BEGIN
    PRINT "syscall entered with cs/ss/rflags "
    PRINTHEX %r8
    PRINT " "
    PRINTHEX %r9
    PRINT " "
    PRINTHEX %rdx
    PRINT "\n"
    LOCKED_PRINT_END
    mov $3, %al
    jmp exit

/* The #PF handler. It must start with an instruction pykvm can displace. */
pf_handler:
.ifdef PF_CLAC
    clac
.else
    nopl (%rax)                         /* 0f 1f 00, Linux's ASM_CLAC without SMAP */
.endif
    push %rax
    push %rbx
    push %rdx
    mov %cr2, %rax
    mov %rax, %rdx
    and $~0xfff, %rdx
    cmp $DEMAND, %rdx
    jb bad_pf
    cmp $DEMAND + MAX_CPUS * 0x1000, %rdx
    jae bad_pf
    mov %rdx, %rbx                      /* map the page: present, writable, user */
    shr $12, %rbx
    or $7, %rdx
    mov %rdx, PT(, %rbx, 8)
    invlpg (%rax)
    LOCKED_PRINT_BEGIN
    PRINT "page fault at "
    PRINTHEX %rax
    PRINT " error "
    PRINTHEX 24(%rsp)
    PRINT ": mapped\n"
    LOCKED_PRINT_END
    pop %rdx
    pop %rbx
    pop %rax
    add $8, %rsp                        /* the error code */
    iretq
bad_pf:
    LOCKED_PRINT_BEGIN
    PRINT "unexpected page fault at "
    PRINTHEX %rax
    PRINT " error "
    PRINTHEX 24(%rsp)
    PRINT " rip "
    PRINTHEX 32(%rsp)
    PRINT " cs "
    PRINTHEX 40(%rsp)
    PRINT "\n"
    LOCKED_PRINT_END
    mov $4, %al
    jmp exit

.balign 4
print_lock: .long 0
idt_ready:  .long 0
cpus_done:  .long 0
.balign 8
gdtr:
    .word 0x60 - 1
    .quad GDT_ADDR
idtr:
    .word 256 * 16 - 1
    .quad IDT_ADDR

/* --- data at fixed addresses ----------------------------------------------------- */
.org GDT_ADDR - LOAD
    .quad 0
    .quad 0
    .quad 0x00af9b000000ffff            /* 0x10 kernel code, 64-bit */
    .quad 0x00cf93000000ffff            /* 0x18 kernel data */
    .quad 0x00cffb000000ffff            /* 0x23 user code, 32-bit (STAR's SYSRET base) */
    .quad 0x00cff3000000ffff            /* 0x2b user data */
    .quad 0x00affb000000ffff            /* 0x33 user code, 64-bit */
    .quad 0
.set cpu, 0
.rept MAX_CPUS                          /* 0x40 + 16 n: available 64-bit TSS of CPU n */
    .set base, TSS_ADDR + cpu * 0x80
    .quad 0x67 | ((base & 0xffffff) << 16) | (0x89 << 40) | (((base >> 24) & 0xff) << 56)
    .quad 0
    .set cpu, cpu + 1
.endr

.org TSS_ADDR - LOAD
.set cpu, 0
.rept MAX_CPUS
    .long 0
    .quad KSTACK + (cpu + 1) * 0x1000   /* RSP0: where a fault from ring 3 lands */
    .skip 0x66 - 12
    .word 0x68                          /* no I/O bitmap */
    .skip 0x80 - 0x68
    .set cpu, cpu + 1
.endr

.org NCPUS - LOAD
    .quad 1
    .quad 0

/* --- the user process (ring 3), on its own page --------------------------------- */
.org USER_CODE - LOAD
user_main:
    xor %r12, %r12
1:  mov %r12, %rdi
    mov $SYS_PRINT, %eax
    mov $0x5a5a, %rcx                   /* SYSCALL must overwrite these two */
    mov $0xa5a5, %r11
    pushfq
    pop %r13
    syscall
after_syscall:
    lea after_syscall(%rip), %r14
    cmp %r14, %rcx
    jne bad_rcx
    cmp %r13, %r11
    jne bad_r11
    lea 1(%r12, %r12), %r14
    cmp %r14, %rax
    jne bad_rax
    inc %r12
    cmp COUNT, %r12
    jb 1b

    cmpq $0, REWRITE
    je 2f
    mov $SYS_REWRITE, %eax
    mov $1, %edi                        /* re-planted at an emulation stop */
    syscall
    mov $SYS_PRINT, %eax
    mov $0x10, %edi
    syscall
    mov $SYS_REWRITE, %eax
    xor %edi, %edi                      /* re-planted by the watch thread */
    syscall
    mov $SYS_PRINT, %eax
    mov $0x11, %edi
    syscall

2:  mov %r15, %rax                      /* a genuine page fault: write an unmapped page */
    shl $12, %rax
    add $DEMAND, %rax
    movq $0x600df00d, (%rax)
    mov (%rax), %rdi
    mov $SYS_VALUE, %eax
    syscall

    mov $SYS_EXIT, %eax
    syscall
    ud2

bad_rcx:
    mov %rcx, %rsi
    mov $1, %edi
    jmp fail
bad_r11:
    mov %r11, %rsi
    mov $2, %edi
    jmp fail
bad_rax:
    mov %rax, %rsi
    mov $3, %edi
fail:
    mov $SYS_FAIL, %eax
    syscall
    ud2

.org COUNT - LOAD
    .quad 3
    .quad 0

/* --- page tables: the first 2 MiB in 4 KiB pages ---------------------------------- */
.org PML4 - LOAD
    .quad PDPT | 7
.org PDPT - LOAD
    .quad PD | 7
.org PD - LOAD
    .quad PT | 7
.org PT - LOAD
.set page, 0
.rept 512
    .if (page == USER_CODE) || ((page >= USTACK) && (page < USTACK + MAX_CPUS * 0x1000))
        .quad page | 7                  /* user, writable */
    .elseif (page >= DEMAND) && (page < DEMAND + MAX_CPUS * 0x1000)
        .quad 0                         /* mapped on the first fault */
    .else
        .quad page | 3                  /* kernel, writable */
    .endif
    .set page, page + 0x1000
.endr

.org KSTACK + MAX_CPUS * 0x1000 - LOAD
