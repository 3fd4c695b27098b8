# 05-serial-echo.S - input: read bytes from the serial port by polling it, and
# echo them back in upper case until Enter (or 'q').
#
#   echo "hello, world" | python3 -m pykvm run --flat guests/tutorial/build/05-serial-echo.bin
#   python3 -m pykvm run --flat guests/tutorial/build/05-serial-echo.bin     (type; Enter ends)
#
# Output for the first command:
#   type a line (Enter or q ends it):
#   HELLO, WORLD
#
# The upper-casing is there to prove that the guest did the work: pykvm's UART
# only moves bytes between the host's stdin/stdout and the guest.
#
# How a byte arrives: pykvm's console thread reads the host's stdin and puts
# each byte into the UART's receive FIFO. The guest sees it by reading the
# line status register (LSR bit 0 = data ready) and then the receive buffer
# register (RBR). Real mode again (--entry real is pykvm's default), linked at
# 0 like 01: this guest is about I/O, not CPU modes.
#
# Who runs what:
#   guest mode - the compare-and-convert logic. (kvm_pvm: emulated, ring 0.)
#   KVM        - nothing: no interrupts are used.
#   pykvm      - every `in` and `out`. Polling is expensive in a VM: while
#                nobody types, each turn of the wait loop is an `in`, and so a
#                full exit to pykvm and back (~10 us on kvm_pvm). A few seconds
#                of waiting cost hundreds of thousands of exits: compare the
#                `--stats` of a typed run with a piped one. That is why real
#                drivers sleep (`hlt`) until the UART raises its interrupt
#                (IRQ 4), which KVM's in-kernel interrupt controller delivers
#                without any exit to pykvm.

.include "tutorial.inc"

    .code16
    .text
    .globl _start
_start:
    cli
    cld
    mov     %cs, %ax
    mov     %ax, %ds

    mov     $prompt, %si
    COM1_PUTS

next_byte:
    # Wait until the UART has a byte: one `in` (one exit) per look.
    mov     $COM1_LSR, %dx
1:  in      %dx, %al
    test    $LSR_DATA_READY, %al
    jz      1b

    mov     $COM1, %dx
    in      %dx, %al                # RBR: the byte; reading it removes it from the FIFO

    # A terminal in raw mode sends '\r' for Enter; a pipe sends '\n'.
    cmp     $'\r', %al
    je      done
    cmp     $'\n', %al
    je      done
    cmp     $'q', %al
    je      done

    cmp     $'a', %al               # lower-case ASCII letter? make it upper case
    jb      2f
    cmp     $'z', %al
    ja      2f
    sub     $('a' - 'A'), %al
2:  out     %al, %dx                # echo it (DX is still COM1)
    jmp     next_byte

done:
    mov     $'\n', %al              # end the echoed line
    out     %al, %dx
    EXIT_VM 0

3:  cli
    hlt
    jmp     3b

prompt:
    .asciz  "type a line (Enter or q ends it):\n"
