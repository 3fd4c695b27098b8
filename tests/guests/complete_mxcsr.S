/* ldmxcsr / stmxcsr / xgetbv in ring 0, every addressing form and every exception the
 * SDM lists for them. kvm_pvm's emulator stops at all three (pykvm completes them);
 * elsewhere the CPU runs them. Either way the output must be the same: the test
 * compares it line by line.
 *
 * Each case prints its name, then " fx=" MXCSR as the CPU's own fxsave stores it
 * (an independent read of the architectural state), " st=" a stmxcsr into a
 * quadword of all ones (the upper half must stay ones), " flags=" RFLAGS after the
 * instruction (set to 0x8d7 before: nothing may change them).
 * An exception the case expects goes to `expected`, which prints the vector, error
 * code, RIP (the test compares it with the faulting label) and for #PF CR2, then
 * resumes at %r15. */

.include "common.S"

.set PD1, 0xb008                  /* the PDE mapping 0x200000..0x3fffff (set_mode's tables) */
.set RO_PAGE, 0x200000
.set UNMAPPED, 0x8000000000       /* PML4 entry 1: not present */
.set NONCANONICAL, 0x0000800000000000
.set MSR_GS_BASE, 0xc0000101
.set FLAGS_IN, 0x8d5              /* OF SF ZF AF PF CF */

/* CASE name: print the name of the case. */
.macro CASE name
    PRINT "\name:"
.endm

/* SETFLAGS: RFLAGS = FLAGS_IN without touching other registers. */
.macro SETFLAGS
    pushq $FLAGS_IN
    popfq
.endm

/* RESUME label: an expected exception continues at label. */
.macro RESUME label
    lea \label(%rip), %r15
.endm

main:
    IDT_BEGIN
    GATE 6, ud_handler
    GATE 7, nm_handler
    GATE 12, ss_handler
    GATE 13, gp_handler
    GATE 14, pf_handler
    lidt idtr(%rip)

    mov %cr0, %rax                /* x87/SSE on: MP, no EM, no TS; OSFXSR */
    and $~0xc, %rax
    or $0x2, %rax
    mov %rax, %cr0
    mov %cr4, %rax
    or $0x600, %rax
    mov %rax, %cr4
    lea fxarea(%rip), %rdi
    fxsave (%rdi)

    /* --- ldmxcsr, one addressing form per case ------------------------------------ */
    CASE "rdi"
    lea buf(%rip), %rdi
    movl $0x9f80, (%rdi)          /* FZ and all masks */
    SETFLAGS
    ldmxcsr (%rdi)
    call report

    CASE "rsp+4"
    sub $16, %rsp
    movl $0x3f80, 4(%rsp)         /* RC = round down */
    SETFLAGS
    ldmxcsr 4(%rsp)               /* SIB (base rsp) + disp8: Debian's own */
    lea 16(%rsp), %rsp
    call report

    CASE "rip"
    SETFLAGS
    ldmxcsr rip_value(%rip)       /* 0x5f80, RC = round up */
    call report

    CASE "sib"
    lea buf(%rip), %r13
    mov $2, %r9
    movl $0x7f80, 0x108(%r13)
    SETFLAGS
    ldmxcsr 0x100(%r13,%r9,4)     /* REX.B and REX.X, scale 4, disp32 */
    call report

    CASE "r12"
    lea buf+0x20(%rip), %r12
    movl $0x1f81, (%r12)          /* IE set: a flag bit loads too */
    SETFLAGS
    ldmxcsr (%r12)                /* r12 needs a SIB byte */
    call report

    CASE "r13"
    lea buf+0x30(%rip), %r13
    movl $0x1e80, (%r13)          /* IM clear */
    SETFLAGS
    ldmxcsr (%r13)                /* r13 as base needs mod 01 and a zero disp8 */
    call report

    CASE "addr32"
    lea buf+0x40(%rip), %rax
    movl $0x9f80, (%rax)
    mov $0xdead, %rdx
    shl $32, %rdx
    or %rdx, %rax                 /* upper half garbage: a 67 prefix uses only eax */
    SETFLAGS
    ldmxcsr (%eax)
    call report

    CASE "gs"
    lea buf+0x80(%rip), %rax
    movl $0x3f80, 0x50(%rax)
    mov %rax, %rdx
    shr $32, %rdx
    mov $MSR_GS_BASE, %ecx
    wrmsr
    SETFLAGS
    ldmxcsr %gs:0x50
    call report

    CASE "split"
    lea page_end-2(%rip), %rax    /* two bytes on each side of a page boundary */
    movl $0x5f80, (%rax)
    SETFLAGS
    ldmxcsr (%rax)
    call report

    /* --- stmxcsr: the value lands in memory, 4 bytes exactly ------------------------ */
    CASE "st-rip"
    movq $-1, st_slot(%rip)
    SETFLAGS
    stmxcsr st_slot(%rip)
    pushfq
    PRINT " mem="
    PRINTHEX st_slot(%rip)
    PRINT " flags="
    PRINTHEX (%rsp)
    add $8, %rsp
    PRINT "\n"

    CASE "st-split"
    lea page_end-1(%rip), %rbx
    movq $-1, -4(%rbx)
    movq $-1, 4(%rbx)
    stmxcsr (%rbx)                /* one byte before the boundary, three after */
    PRINT " mem="
    PRINTHEX -4(%rbx)
    PRINT " "
    PRINTHEX 4(%rbx)
    PRINT "\n"

    /* --- exceptions: MXCSR must not change ------------------------------------------ */
    CASE "reserved"
    lea buf(%rip), %rdi
    movl $0x11f80, (%rdi)         /* bit 16: reserved on every CPU */
    RESUME 1f
gp_reserved:
    ldmxcsr (%rdi)
    PRINT " not raised"
1:  call report

    CASE "unmapped-load"
    mov $UNMAPPED + 0x10, %rdi
    RESUME 1f
pf_load:
    ldmxcsr (%rdi)
    PRINT " not raised"
1:  call report

    CASE "unmapped-store"
    mov $UNMAPPED + 0xffe, %rdi   /* crosses into the next (also unmapped) page */
    RESUME 1f
pf_store:
    stmxcsr (%rdi)
    PRINT " not raised"
1:  PRINT "\n"

    CASE "read-only"
    movl $0x12345678, RO_PAGE
    mov %cr0, %rax
    or $0x10000, %rax             /* CR0.WP: ring 0 honours read-only pages too */
    mov %rax, %cr0
    andq $~2, PD1
    invlpg RO_PAGE
    mov $RO_PAGE, %rdi
    RESUME 1f
pf_read_only:
    stmxcsr (%rdi)
    PRINT " not raised"
1:  PRINT " kept="
    PRINTHEX RO_PAGE
    orq $2, PD1
    invlpg RO_PAGE
    PRINT "\n"

    CASE "noncanonical"
    mov $NONCANONICAL, %rdi
    RESUME 1f
gp_noncanonical:
    ldmxcsr (%rdi)
    PRINT " not raised"
1:  PRINT "\n"

    CASE "noncanonical-rbp"
    push %rbp
    mov $NONCANONICAL, %rbp
    RESUME 1f
ss_noncanonical:
    ldmxcsr 8(%rbp)               /* rbp-based: the stack segment, so #SS */
    PRINT " not raised"
1:  pop %rbp
    PRINT "\n"

    CASE "lock"
    lea buf(%rip), %rdi
    RESUME 1f
ud_lock:
    .byte 0xf0
    ldmxcsr (%rdi)
    PRINT " not raised"
1:  PRINT "\n"

    CASE "ts"
    mov %cr0, %rax
    or $0x8, %rax
    mov %rax, %cr0
    RESUME 1f
nm_ts:
    stmxcsr buf(%rip)
    PRINT " not raised"
1:  clts
    PRINT "\n"

    CASE "no-osfxsr"
    mov %cr4, %rax
    and $~0x200, %rax
    mov %rax, %cr4
    RESUME 1f
ud_osfxsr:
    ldmxcsr buf(%rip)
    PRINT " not raised"
1:  mov %cr4, %rax
    or $0x200, %rax
    mov %rax, %cr4
    PRINT "\n"

    /* --- xgetbv ----------------------------------------------------------------------- */
    mov $1, %eax
    cpuid
    bt $26, %ecx                  /* XSAVE */
    jnc no_xsave
    CASE "xgetbv-ud"
    xor %ecx, %ecx
    RESUME 1f
ud_xgetbv:
    xgetbv
    PRINT " not raised"
1:  PRINT "\n"
    mov %cr4, %rax
    or $0x40000, %rax             /* OSXSAVE */
    mov %rax, %cr4
    xor %ecx, %ecx
    xor %edx, %edx
    mov $3, %eax                  /* x87 | SSE */
    xsetbv
    CASE "xgetbv"
    mov $-1, %rax
    mov $-1, %rdx
    xor %ecx, %ecx
    SETFLAGS
    xgetbv
    pushfq
    PRINT " rax="
    PRINTHEX %rax
    PRINT " rdx="
    PRINTHEX %rdx
    PRINT " flags="
    PRINTHEX (%rsp)
    add $8, %rsp
    PRINT "\n"
    CASE "xgetbv-ecx"
    mov $2, %ecx
    RESUME 1f
gp_xgetbv:
    xgetbv
    PRINT " not raised"
1:  PRINT "\n"
    jmp done
no_xsave:
    PRINT "no xsave\n"
done:
    PRINT "done\n"
    xor %eax, %eax
    jmp exit

/* report: " fx=MXCSR (fxsave) st=stmxcsr-into-ones flags=RFLAGS\n"; RFLAGS as on entry. */
report:
    pushfq
    push %rax
    push %rdi
    lea fxarea(%rip), %rdi
    fxsave (%rdi)
    mov 24(%rdi), %eax
    PRINT " fx="
    PRINTHEX %rax
    sub $8, %rsp
    movq $-1, (%rsp)
    stmxcsr (%rsp)
    PRINT " st="
    PRINTHEX (%rsp)
    add $8, %rsp
    PRINT " flags="
    PRINTHEX 16(%rsp)
    PRINT "\n"
    pop %rdi
    pop %rax
    popfq
    ret

/* Expected exceptions: " vector V error E rip R [cr2 C]", then on at %r15. */
ud_handler:
    pushq $0
    pushq $6
    jmp expected
nm_handler:
    pushq $0
    pushq $7
    jmp expected
ss_handler:
    pushq $12
    jmp expected
gp_handler:
    pushq $13
    jmp expected
pf_handler:
    pushq $14
expected:
    PRINT " vector "
    PRINTHEX (%rsp)
    PRINT " error "
    PRINTHEX 8(%rsp)
    PRINT " rip "
    PRINTHEX 16(%rsp)
    cmpq $14, (%rsp)
    jne 1f
    push %rax
    mov %cr2, %rax
    PRINT " cr2 "
    PRINTHEX %rax
    pop %rax
1:  mov %r15, 16(%rsp)
    add $16, %rsp
    iretq

.balign 8
rip_value: .long 0x5f80
.balign 8
st_slot: .quad 0
IDT_TABLE
.balign 16
fxarea:
    .skip 512
buf:
    .skip 0x200
.balign 4096
    .skip 4096 - 16
page_end_minus_16:
    .skip 16
page_end:
    .skip 16
