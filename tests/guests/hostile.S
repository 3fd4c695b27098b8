/*
 * hostile.S: the guest of tests/kvm/test_hostile_guest.py -- ring-3 code that runs the
 * scripts a test writes into its RAM: the stores and loads a hostile driver makes,
 * to its rings in RAM and to the virtio devices' BARs on the PCI bus (MMIO exits
 * and ioeventfd doorbells, as a real driver's). Ring 3 runs at native speed on
 * every host (ring 0 is emulated on kvm_pvm).
 *
 * Entered in 64-bit long mode, ring 0, at its first byte (linked for its load
 * address); bench/guests/user_tables.inc (appended by the test) drops to ring 3
 * with RAM's first GiB and the PCI MMIO window at 3 GiB mapped user-accessible.
 *
 * It waits on the test's command register (an MMIO read that returns 1 once a
 * script is posted), runs the script at `script`, counts the run and waits again.
 * A script is a list of 40-byte entries: op, width, addr, value, result (u64 each):
 *   op 0  end of script
 *   op 1  store `value` at `addr`, `width` bytes (1, 2, 4, 8): one store
 *   op 2  load `width` bytes at `addr` into `result`: one load
 *   op 3  watch a used ring at `addr` of `width` entries until `value` completions
 *         were seen: each used index read with one 16-bit load; a move backwards or
 *         further than the ring holds, or an element that is not the one the test's
 *         publisher wrote (id k, len k ^ 0xa5a5a5a5 for the k-th completion) counts
 *         as an anomaly in `result`; completions seen so far go to `progress`.
 */

        jmp     ring0                   /* offset 0 */
        .balign 8
params:                                 /* offset 8: patched by the test */
script:         .quad   0               /* +0  the script's address */
cmd_addr:       .quad   0               /* +8  the test's command register */
progress:       .quad   0               /* +16 op 3: completions seen */
runs:           .quad   0               /* +24 scripts finished */

ring3:
command:
        mov     cmd_addr(%rip), %rdx
        mov     (%rdx), %eax            /* the exit: returns 1 once a script is posted */
        test    %eax, %eax
        jz      command
        mov     script(%rip), %rsi
next:
        mov     (%rsi), %rax            /* op */
        mov     8(%rsi), %rcx           /* width */
        mov     16(%rsi), %rdi          /* addr */
        mov     24(%rsi), %rdx          /* value */
        cmp     $1, %rax
        je      store
        cmp     $2, %rax
        je      load
        cmp     $3, %rax
        je      watch
        incq    runs(%rip)              /* op 0 (or unknown): done */
        jmp     command

store:  cmp     $1, %rcx
        jne     1f
        mov     %dl, (%rdi)
        jmp     9f
1:      cmp     $2, %rcx
        jne     2f
        mov     %dx, (%rdi)
        jmp     9f
2:      cmp     $4, %rcx
        jne     3f
        mov     %edx, (%rdi)
        jmp     9f
3:      mov     %rdx, (%rdi)
9:      add     $40, %rsi
        jmp     next

load:   cmp     $1, %rcx
        jne     1f
        movzbl  (%rdi), %eax
        jmp     9f
1:      cmp     $2, %rcx
        jne     2f
        movzwl  (%rdi), %eax
        jmp     9f
2:      cmp     $4, %rcx
        jne     3f
        mov     (%rdi), %eax
        jmp     9f
3:      mov     (%rdi), %rax
9:      mov     %rax, 32(%rsi)
        add     $40, %rsi
        jmp     next

/* watch: rdi used ring, rcx N (a power of two), rdx completions to see.
 * r8 completions seen (k), r9 anomalies, r10 the last used index taken. */
watch:  xor     %r8d, %r8d
        xor     %r9d, %r9d
        xor     %r10d, %r10d
        mov     %ecx, %r12d
        dec     %r12d                   /* N - 1 */
1:      cmp     %rdx, %r8
        jae     8f
        movzwl  2(%rdi), %eax           /* used idx: one 16-bit load */
        mov     %eax, %r11d
        sub     %r10d, %r11d
        and     $0xffff, %r11d          /* new since the last look */
        jnz     2f
        pause
        jmp     1b
2:      cmp     %rcx, %r11
        jbe     3f
        inc     %r9                     /* backwards, or more than the ring holds: torn */
        jmp     1b
3:      mov     %r10d, %ebx
        and     %r12d, %ebx             /* slot */
        mov     4(%rdi,%rbx,8), %r13d   /* id */
        mov     8(%rdi,%rbx,8), %r14d   /* len */
        cmp     %r8d, %r13d
        jne     4f
        mov     %r8d, %r15d
        xor     $0xa5a5a5a5, %r15d
        cmp     %r15d, %r14d
        je      5f
4:      inc     %r9                     /* the element is not (yet) the one published */
5:      inc     %r8
        inc     %r10d
        and     $0xffff, %r10d
        mov     %r8, progress(%rip)
        dec     %r11d
        jnz     3b
        jmp     1b
8:      mov     %r9, 32(%rsi)
        add     $40, %rsi
        jmp     next
