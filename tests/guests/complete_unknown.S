/* An instruction kvm_pvm's emulator refuses and pykvm does not complete (popcnt: Linux
 * is kept off it by clearcpuid=popcnt), reached in ring 0. On kvm_pvm the VM must stop
 * at `refused` with one line naming it; elsewhere the CPU runs it and the guest exits 0.
 * With --defsym NOT_RAM=1 the instruction is instead an ldmxcsr whose operand is mapped
 * but is no guest RAM (16 MiB, above a 4 MiB guest): nothing pykvm can complete either. */

.include "common.S"

main:
    PRINT "before\n"
    mov $0xff, %eax
.ifdef NOT_RAM
    mov %cr4, %rbx
    or $0x200, %rbx               /* OSFXSR: ldmxcsr is #UD without it */
    mov %rbx, %cr4
.endif
refused:
.ifdef NOT_RAM
    ldmxcsr 0x1000000
.else
    popcnt %rax, %rax
.endif
    PRINT "after\n"
    xor %eax, %eax
    jmp exit
