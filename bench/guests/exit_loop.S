/*
 * exit_loop.S: the guest of bench/exits.py, run unchanged by pykvm and by the C
 * reference (bench/c/exit_loop.c).
 *
 * Entered in 64-bit long mode, ring 0, at its first byte (loaded at the address
 * the bench links it for, -Ttext), with any identity mapping of the first 2 MiB
 * active; PORT and RING are given by the bench (--defsym). It
 *   1. brings its own GDT (with ring-3 segments) and page tables (with the U bit),
 *   2. with RING=3, drops to ring 3 with IOPL = 3 (iretq); with RING=0 stays,
 *   3. does COUNT `out %al, $PORT` in a loop (COUNT is the quadword at offset 8,
 *      patched by the bench, so one assembly serves every N),
 *   4. writes status 0 to pykvm's exit port 0xF4.
 *
 * Which ring (the bench's --ring, default 0), measured on kvm_pvm:
 * ring-0 code is emulated there (~0.5-0.8 us per instruction) and ring-3 code
 * runs natively, so a ring-3 loop looked like the way to time the exit alone.
 * It is not: an `out` from ring 3 (allowed by IOPL = 3) costs ~35 us per round
 * trip in the C reference, against ~10 us from ring 0 (where `out`, `dec`,
 * `jnz` are emulated, ~2 us of it). A ring-3 port access leaves natively run
 * guest code through a much longer path than the emulator's, and the VMM's own
 * user-space work after it is slower too (pykvm's per-exit overhead: ~9 us after
 * ring-3 exits, ~4 us after ring-0 ones; presumably it starts with colder caches).
 * Ring 0 has the smaller fixed cost, so the stricter ratio, and it is where real
 * guests do port I/O (kernel drivers). On VT-x/AMD-V hosts both rings run
 * natively and the choice hardly matters. The prologue below (a dozen
 * instructions) runs before the timed span.
 */

        .code64
        .text
        .globl _start
_start:
        jmp     ring0                   /* offset 0 */
        .balign 8
count:  .quad   0                       /* offset 8: number of `out`s, patched by the bench */

ring0:
        lgdt    gdt_pointer(%rip)       /* our GDT: kernel code/data, user data/code */
        movabs  $pml4, %rax
        mov     %rax, %cr3              /* our page tables: 0..2 MiB, user-accessible */
        .if     RING == 3
        pushq   $USER_DS                /* iretq frame: SS */
        pushq   $user_stack_top         /*               RSP */
        pushq   $0x3002                 /*               RFLAGS: IOPL=3, IF=0, bit 1 */
        pushq   $USER_CS                /*               CS (64-bit, DPL 3) */
        pushq   $loop                   /*               RIP */
        iretq                           /* -> CPL 3 */
        .endif

loop:
        mov     count(%rip), %rcx
        mov     $0x2a, %eax
1:      out     %al, $PORT              /* the measured exit */
        dec     %rcx
        jnz     1b
        xor     %eax, %eax
        out     %al, $0xF4              /* pykvm's exit port: stop, status 0 */
2:      jmp     2b                      /* not reached: the VMM stops at the exit port */

/* --- GDT: the selectors the VMM loaded (pykvm's boot GDT: CS 0x10, data 0x18) keep
 *     their meaning, and two ring-3 segments follow, in Linux's order -------------- */
        .set    USER_DS, 0x20 | 3
        .set    USER_CS, 0x28 | 3
        .balign 8
gdt:
        .quad   0                       /* null */
        .quad   0                       /* 0x08: unused */
        .quad   0x00af9b000000ffff      /* 0x10: 64-bit code, DPL 0 */
        .quad   0x00cf93000000ffff      /* 0x18: data, DPL 0 */
        .quad   0x00cff3000000ffff      /* 0x20: data, DPL 3 */
        .quad   0x00affb000000ffff      /* 0x28: 64-bit code, DPL 3 */
gdt_end:
gdt_pointer:
        .word   gdt_end - gdt - 1
        .quad   gdt

/* --- page tables: one 2 MiB page at 0, present | writable | user ---------------- */
        .balign 4096
pml4:   .quad   pdpt + 0x7
        .fill   511, 8, 0
pdpt:   .quad   pd + 0x7
        .fill   511, 8, 0
pd:     .quad   0x0 + 0x87              /* 2 MiB page: P | W | U | PS */
        .fill   511, 8, 0

        .space  256
user_stack_top:
