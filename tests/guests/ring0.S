/* Ring-0 instructions kvm_pvm's emulator stops at and pykvm completes:
 * int3, int $0x80, clac/stac, fwait. Runs in the long mode set_mode() sets up
 * (boot GDT: 64-bit code at 0x10), with an IDT of its own. The test compares
 * the return addresses the handlers print with this file's symbols. */

.include "common.S"

main:
    IDT_BEGIN
    GATE 3, bp_handler
    GATE 0x80, int80_handler, 0xee /* DPL 3, as an OS gives its int $0x80 gate */
    lidt idtr(%rip)

    mov $0xb0b, %rax
    int3
after_int3:
    mov $0xcafe, %rax
    int $0x80
after_int80:

    /* clac/stac exist only with SMAP (CPUID.7.0:EBX bit 20); CR4.SMAP is not needed. */
    mov $7, %eax
    xor %ecx, %ecx
    cpuid
    bt $20, %ebx
    jnc no_smap
    stac
    pushfq
    pop %rax
    shr $18, %rax
    and $1, %rax
    PRINT "stac: ac="
    PRINTHEX %rax
    clac
    pushfq
    pop %rax
    shr $18, %rax
    and $1, %rax
    PRINT " clac: ac="
    PRINTHEX %rax
    PRINT "\n"
    jmp fpu
no_smap:
    PRINT "no smap\n"

fpu:
    fwait
    PRINT "fwait done\n"
    xor %eax, %eax
    jmp exit

bp_handler:
    PRINT "int3 handler: rax="
    PRINTHEX %rax
    PRINT " rip="
    PRINTHEX (%rsp)
    PRINT "\n"
    iretq

int80_handler:
    PRINT "int 0x80 handler: rax="
    PRINTHEX %rax
    PRINT " rip="
    PRINTHEX (%rsp)
    PRINT "\n"
    iretq

IDT_TABLE
