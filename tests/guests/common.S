/* Helpers shared by the quirk test guests: 64-bit, ring 0, loaded at LOAD.
 * Output goes to the serial port one byte per `out`; the exit port stops the VM
 * with the status written (pykvm's layout.EXIT_PORT). `.include` this first: it
 * starts with the entry point, _start at the load address, which jumps to the
 * guest's own `main`. */

.code64
.text
.globl _start
_start:
    jmp main

.set LOAD, 0x10000
.set SERIAL, 0x3f8
.set EXIT_PORT, 0xf4
.set CODE64, 0x10                 /* 64-bit code in the boot GDT set_mode() sets up */

/* PRINT "text": print a literal; preserves every register and the flags. */
.macro PRINT text
    pushfq
    push %rsi
    lea .Lstr\@(%rip), %rsi
    call puts
    pop %rsi
    popfq
    jmp .Lend\@
.Lstr\@: .asciz "\text"
.Lend\@:
.endm

/* PRINTHEX operand: print a 64-bit register or memory operand (also %rsp-relative)
 * in hex, no leading zeros; preserves every register and the flags. */
.macro PRINTHEX operand
    pushq \operand
    call puthex_top
    lea 8(%rsp), %rsp
.endm

/* putc: the byte in %al. */
putc:
    push %rdx
    mov $SERIAL, %dx
    out %al, %dx
    pop %rdx
    ret

/* puts: the NUL-terminated string at %rsi. */
puts:
    push %rax
    push %rsi
1:  lodsb
    test %al, %al
    jz 2f
    call putc
    jmp 1b
2:  pop %rsi
    pop %rax
    ret

/* puthex: %rax as 0x..., lowercase, no leading zeros. */
puthex:
    push %rax
    push %rcx
    push %rdx
    mov %rax, %rdx
    mov $'0', %al
    call putc
    mov $'x', %al
    call putc
    mov $60, %cl
1:  test %cl, %cl              /* skip leading zero digits, keep the last one */
    jz 2f
    mov %rdx, %rax
    shr %cl, %rax
    test $0xf, %al
    jnz 2f
    sub $4, %cl
    jmp 1b
2:  mov %rdx, %rax
    shr %cl, %rax
    and $0xf, %al
    cmp $10, %al
    jb 3f
    add $('a' - '0' - 10), %al
3:  add $'0', %al
    call putc
    sub $4, %cl
    jns 2b
    pop %rdx
    pop %rcx
    pop %rax
    ret

/* puthex_top: print the quadword just above the return address. */
puthex_top:
    pushfq
    push %rax
    mov 24(%rsp), %rax
    call puthex
    pop %rax
    popfq
    ret

/* exit: stop the VM with status %al (does not return). */
exit:
    mov $EXIT_PORT, %dx
    out %al, %dx
1:  cli
    hlt
    jmp 1b

/* set_gate: IDT entry %rdi of the table at %rbx -> handler %rsi, selector %cx,
 * attributes %dl (0x8e: present, DPL 0, 64-bit interrupt gate). */
set_gate:
    push %rax
    push %rdi
    shl $4, %rdi
    add %rbx, %rdi
    mov %si, (%rdi)
    mov %cx, 2(%rdi)
    movb $0, 4(%rdi)
    mov %dl, 5(%rdi)
    mov %rsi, %rax
    shr $16, %rax
    mov %ax, 6(%rdi)
    shr $16, %rax
    mov %eax, 8(%rdi)
    movl $0, 12(%rdi)
    pop %rdi
    pop %rax
    ret

/* Exception stubs 0..31, 16 bytes apart: each pushes its vector number. An
 * exception nobody expected prints the vector and the top of the frame, exits 99. */
.balign 16
fault_stubs:
.set vector, 0
.rept 32
    .balign 16
    pushq $vector
    jmp fault_common
    .set vector, vector + 1
.endr

fault_common:
    PRINT "unexpected exception "
    PRINTHEX (%rsp)
    PRINT " frame "
    PRINTHEX 8(%rsp)
    PRINT " "
    PRINTHEX 16(%rsp)
    PRINT " "
    PRINTHEX 24(%rsp)
    PRINT "\n"
    mov $99, %al
    jmp exit

/* install_fault_stubs: point vectors 0..31 of the IDT at %rbx to the stubs (selector %cx). */
install_fault_stubs:
    push %rdi
    push %rsi
    push %rdx
    xor %edi, %edi
    lea fault_stubs(%rip), %rsi
    mov $0x8e, %dl
1:  call set_gate
    add $16, %rsi
    inc %edi
    cmp $32, %edi
    jb 1b
    pop %rdx
    pop %rsi
    pop %rdi
    ret

/* IDT_BEGIN: start an IDT at `idt` (from IDT_TABLE) in the boot GDT's CODE64, every
 * exception at the fault stubs; leaves %rbx and %cx as GATE needs them. */
.macro IDT_BEGIN
    lea idt(%rip), %rbx
    mov $CODE64, %cx
    call install_fault_stubs
.endm

/* GATE vector, handler, attr: point one vector at handler (after IDT_BEGIN). The
 * default attributes are a present DPL 0 64-bit interrupt gate. */
.macro GATE vector, handler, attr=0x8e
    mov $\vector, %edi
    lea \handler(%rip), %rsi
    mov $\attr, %dl
    call set_gate
.endm

/* IDT_TABLE: the 256-entry table IDT_BEGIN fills and its descriptor `idtr` for lidt. */
.macro IDT_TABLE
.balign 8
idtr:
    .word 256 * 16 - 1
    .quad idt
.balign 16
idt:
    .skip 256 * 16
.endm
