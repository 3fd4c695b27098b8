/* An instruction kvm_pvm's emulator refuses and pykvm does not complete (popcnt: Linux
 * is kept off it by clearcpuid=popcnt), reached in ring 0. On kvm_pvm the VM must stop
 * at `refused` with one line naming it; elsewhere the CPU runs it and the guest exits 0. */

.code64
.text
.globl _start
_start:
    jmp main

.include "common.S"

main:
    PRINT "before\n"
    mov $0xff, %eax
refused:
    popcnt %rax, %rax
    PRINT "after\n"
    xor %eax, %eax
    jmp exit
