/*
 * complete_loop.S: the guest of bench/completions.py. Ring 0, 64-bit long mode as
 * pykvm's set_mode() leaves it (flat guest at 0x10000). COUNT (the quadword at
 * offset 8, patched by the bench) iterations, timed from an `out` to port 0x81, of one instruction, chosen with
 * .set (the bench prepends it): OUT (a port-I/O exit, the reference), FWAIT, LDMXCSR or STMXCSR (each
 * refused by kvm_pvm's emulator and completed by pykvm; native elsewhere). Then
 * status 0 to pykvm's exit port 0xF4.
 */

        .code64
        .text
        .globl _start
_start:
        jmp     main                    /* offset 0 */
        .balign 8
count:  .quad   0                       /* offset 8 */

main:
        mov     %cr4, %rax
        or      $0x600, %rax            /* OSFXSR, OSXMMEXCPT: SSE state instructions allowed */
        mov     %rax, %cr4
        lea     mxcsr(%rip), %rdi
        mov     count(%rip), %rcx
        out     %al, $0x81              /* the bench's clock starts here */
1:
.ifdef OUT
        out     %al, $0x80
.endif
.ifdef FWAIT
        fwait
.endif
.ifdef LDMXCSR
        ldmxcsr (%rdi)
.endif
.ifdef STMXCSR
        stmxcsr (%rdi)
.endif
        dec     %rcx
        jnz     1b
        xor     %eax, %eax
        out     %al, $0xf4
2:      cli
        hlt
        jmp     2b

        .balign 8
mxcsr:  .long   0x1f80
