# device.S - lesson 5's guest: use a device the reader writes in Python.
#
#   python3 guests/tutorial/vmm/05_your_device.py
#
# UPCASE is not a PC port: the lesson's Python `Upcase` device answers it once
# registered on pykvm's port-I/O bus. Each byte goes out to it and comes back
# upper-cased (an `out` exit, then an `in` exit), and is then sent to COM1.

.include "tutorial.inc"

.set UPCASE, 0x510

.code32
.globl _start
_start:
    mov     $message, %esi
next:
    lodsb
    test    %al, %al
    jz      end
    mov     $UPCASE, %dx
    out     %al, %dx            # to the reader's device: Upcase.write
    in      %dx, %al            # and back: Upcase.read
    mov     $COM1, %dx
    out     %al, %dx
    jmp     next
end:
    EXIT_VM 0

message: .asciz "hello from the guest, through your device\n"
