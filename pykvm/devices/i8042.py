"""The PS/2 controller (i8042): the PC's reset line, and an AT keyboard (no mouse).

A VM needs it for three reasons. Guests reboot through it (command 0xFE pulses
the CPU reset line: Linux's ``reboot=k``, Firecracker's way out); the host
presses keys through it (Firecracker's SendCtrlAltDel: :meth:`I8042.press_keys`,
the keyboard in pykvm/devices/ps2_keyboard.py); and a guest's i8042 driver
probes it, polling the status port until the answer it waits for arrives: a
status that never settles costs tens of thousands of port exits (measured on
kvm_pvm). So every command completes at once, the input buffer is always empty,
and the output buffer holds one byte: a controller answer, or the keyboard's
next byte, moved in as soon as the guest read the previous one (each with its
own rising edge on IRQ 1, as Linux's handler reads one byte per interrupt).

Registered at port 0x60 for 5 ports: offset 0 is the data port (0x60), offset
4 the status/command port (0x64). Offsets 1-3 (0x61-0x63) are not the
controller's: 0x61 is the PC's system control port, which KVM's in-kernel PIT
answers itself; should an access reach this device it reads as a floating bus.

A byte written to 0x60 without a pending controller command goes to the
keyboard, whose answers (ACK, identity, BAT) come back through the output buffer,
translated to scancode set 1 while the command byte's XLATE bit is set (the BIOS
default, which Linux keeps: atkbd then reads "AT Translated Set 2"), and held
back while the keyboard interface is disabled (CTR_KBDDIS). Nothing is attached
to the aux port, and the controller says so as PS/2 controllers do: a byte sent
to the mouse comes back as 0xFE with the status register's time-out and mouse
bits set. Controller-internal features work: self-test (0xAA -> 0x55), interface
tests (0xAB, 0xA9 -> 0x00: the lines are fine, just unconnected), the
controller command byte (0x20/0x60), port enable/disable, the output port
(0xD0/0xD1, whose bit 0 is the reset line too) and the loop-back commands
0xD2/0xD3 that Linux uses to probe the aux port. With ``kbd_irq``/``aux_irq``
given (GSI 1 and 12), a byte in the output buffer raises its interrupt while
the command byte enables it, so interrupt-driven probes end without waiting
out their time-outs.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable

from .. import layout
from ..bus import Device, IrqLine
from ..snapshot.schema import U8
from ..snapshot.state import ComponentState, SnapshotError
from .ps2_keyboard import BREAK_PREFIX, KeyboardState, Ps2Keyboard, translate_set2

PORT_BASE = layout.I8042_BASE   # 0x60: where a PC has it (pykvm/layout.py owns the ports)
PORT_COUNT = layout.I8042_LEN
DATA = 0                  # offset of port 0x60
STATUS = COMMAND = 4      # offset of port 0x64

# --- status register -------------------------------------------------------------
STR_OBF = 0x01            # output buffer full: a byte waits at 0x60
STR_IBF = 0x02            # input buffer full: never, writes complete at once
STR_SYSFLAG = 0x04        # mirrors the command byte's system flag
STR_CMDDAT = 0x08         # the last write went to 0x64 (a command)
STR_KEYLOCK = 0x10        # 1 = keyboard not inhibited by a key lock
STR_AUXDATA = 0x20        # the byte at 0x60 comes from the aux (mouse) port
STR_TIMEOUT = 0x40        # the device did not answer

# --- controller command byte -------------------------------------------------------
CTR_KBDINT = 0x01
CTR_AUXINT = 0x02
CTR_SYSFLAG = 0x04
CTR_KBDDIS = 0x10
CTR_AUXDIS = 0x20
CTR_XLATE = 0x40
# What a BIOS leaves when it found no mouse: translation on, keyboard interrupt on.
DEFAULT_CTR = CTR_XLATE | CTR_AUXDIS | CTR_SYSFLAG | CTR_KBDINT

# --- commands (written to 0x64) -------------------------------------------------------
CMD_READ_CTR = 0x20
CMD_WRITE_CTR = 0x60
CMD_AUX_DISABLE = 0xA7
CMD_AUX_ENABLE = 0xA8
CMD_AUX_TEST = 0xA9
CMD_SELF_TEST = 0xAA
CMD_KBD_TEST = 0xAB
CMD_KBD_DISABLE = 0xAD
CMD_KBD_ENABLE = 0xAE
CMD_READ_OUTPUT_PORT = 0xD0
CMD_WRITE_OUTPUT_PORT = 0xD1
CMD_KBD_LOOP = 0xD2       # next data byte appears as if the keyboard sent it
CMD_AUX_LOOP = 0xD3       # next data byte appears as if the mouse sent it
CMD_AUX_SEND = 0xD4       # next data byte goes to the mouse
CMD_PULSE_FIRST = 0xF0    # 0xF0-0xFF pulse output-port lines; a clear bit 0 pulses reset
CMD_RESET = 0xFE

SELF_TEST_PASSED = 0x55
INTERFACE_OK = 0x00
NO_DEVICE = 0xFE          # what the controller reports when a device does not answer
OUTPUT_PORT_RESET_LINE = 0x01   # active low: writing 0 resets the CPU
DEFAULT_OUTPUT_PORT = 0x03      # reset line high, A20 enabled

# Commands whose next data-port byte is their parameter.
PARAMETER_COMMANDS = frozenset({CMD_WRITE_CTR, CMD_WRITE_OUTPUT_PORT,
                                CMD_KBD_LOOP, CMD_AUX_LOOP, CMD_AUX_SEND})


@dataclass(frozen=True)
class I8042State(ComponentState, tag="i8042"):
    """The controller's registers, its one-byte output buffer, and its keyboard."""

    ctr: U8
    output_port: U8
    pending_command: U8 | None              # waiting for its parameter byte
    last_write_was_command: bool
    data: U8
    data_full: bool
    data_from_aux: bool
    data_timed_out: bool
    kbd_level: bool
    aux_level: bool
    xlate_break: bool
    keyboard: KeyboardState

    def check(self) -> None:
        if self.pending_command is not None and self.pending_command not in PARAMETER_COMMANDS:
            raise SnapshotError(f"i8042: {self.pending_command:#x} is not a command that "
                                f"takes a parameter")


class I8042(Device):
    """A PS/2 controller with a keyboard on its first port and nothing on the second.
    ``on_reset`` is called for each reset request."""

    name = "i8042"

    def __init__(self, on_reset: Callable[[], object], *,
                 kbd_irq: IrqLine | None = None, aux_irq: IrqLine | None = None):
        self._on_reset = on_reset
        self._kbd_irq = kbd_irq
        self._aux_irq = aux_irq
        self._lock = threading.Lock()
        self._ctr = DEFAULT_CTR
        self._output_port = DEFAULT_OUTPUT_PORT
        self._pending_command: int | None = None  # waiting for its parameter byte
        self._last_write_was_command = False
        # The output buffer: one byte, with where it came from.
        self._data = 0
        self._data_full = False
        self._data_from_aux = False
        self._data_timed_out = False
        self._kbd_level = False
        self._aux_level = False
        self._xlate_break = False     # translating: a set 2 release prefix was swallowed
        self.keyboard = Ps2Keyboard()
        self.reset_requests = 0
        self.unknown_commands = 0

    _STATE = ("ctr", "output_port", "pending_command", "last_write_was_command", "data",
              "data_full", "data_from_aux", "data_timed_out")

    def save_state(self) -> I8042State:
        with self._lock:
            return I8042State(**{name: getattr(self, f"_{name}") for name in self._STATE},
                              kbd_level=self._kbd_level, aux_level=self._aux_level,
                              xlate_break=self._xlate_break,
                              keyboard=self.keyboard.save_state())

    def restore_state(self, state: I8042State) -> None:
        keyboard = Ps2Keyboard()
        keyboard.restore_state(state.keyboard)
        with self._lock:
            for name in self._STATE:
                setattr(self, f"_{name}", getattr(state, name))
            self.keyboard = keyboard
            self._xlate_break = state.xlate_break
            # The new VM's lines are low: raise again what the controller held high.
            self._kbd_level = self._aux_level = False
            self._update_irqs()

    def read(self, offset: int, size: int) -> int:
        with self._lock:
            if offset == DATA:
                value = self._data
                self._data_full = False
                self._data_timed_out = False
                self._update_irqs()     # the line drops: the next byte is a new edge
                self._pull_keyboard()
                self._update_irqs()
            elif offset == STATUS:
                value = self._status()
            else:
                return (1 << (8 * size)) - 1
        return value if size == 1 else value | ((1 << (8 * size)) - 0x100)

    def write(self, offset: int, size: int, value: int) -> None:
        value &= 0xFF
        with self._lock:
            if offset == COMMAND:
                reset = self._command(value)
            elif offset == DATA:
                reset = self._data_byte(value)
            else:
                return
            self._pull_keyboard()
            self._update_irqs()
        if reset:
            self.reset_requests += 1
            self._on_reset()    # may raise to unwind the vCPU loop: not under the lock

    def press_keys(self, keys: tuple[tuple[int, ...], ...]) -> bool:
        """The host presses the chord ``keys`` (set 2 make codes, e.g.
        ps2_keyboard.CTRL_ALT_DEL) and lets go; False when the guest's driver has the
        keyboard's scanning off or the keyboard's queue is full (nothing was typed)."""
        with self._lock:
            typed = self.keyboard.press_and_release(keys)
            self._pull_keyboard()
            self._update_irqs()
        return typed

    # --- the controller ------------------------------------------------------------
    def _pull_keyboard(self) -> None:
        """Move the keyboard's next byte into an empty output buffer, unless the
        keyboard interface is disabled; set 1 through the 8042 translation if XLATE."""
        while not self._data_full and not self._ctr & CTR_KBDDIS:
            value = self.keyboard.next_byte()
            if value is None:
                return
            if self._ctr & CTR_XLATE:
                if value == BREAK_PREFIX:
                    self._xlate_break = True    # folded into the next code's bit 7
                    continue
                value = translate_set2(value)
                if self._xlate_break:
                    value |= 0x80
                    self._xlate_break = False
            self._answer(value)

    def _status(self) -> int:
        status = STR_KEYLOCK
        if self._ctr & CTR_SYSFLAG:
            status |= STR_SYSFLAG
        if self._last_write_was_command:
            status |= STR_CMDDAT
        if self._data_full:
            status |= STR_OBF
            if self._data_from_aux:
                status |= STR_AUXDATA
            if self._data_timed_out:
                status |= STR_TIMEOUT
        return status

    def _answer(self, value: int, *, aux: bool = False, timed_out: bool = False) -> None:
        self._data = value
        self._data_full = True
        self._data_from_aux = aux
        self._data_timed_out = timed_out

    def _command(self, command: int) -> bool:
        """Runs a command written to 0x64; returns whether it asks for a reset."""
        self._last_write_was_command = True
        self._pending_command = None    # a new command abandons a missing parameter
        if command in PARAMETER_COMMANDS:
            self._pending_command = command
        elif command == CMD_READ_CTR:
            self._answer(self._ctr)
        elif command == CMD_SELF_TEST:
            self._answer(SELF_TEST_PASSED)
        elif command in (CMD_KBD_TEST, CMD_AUX_TEST):
            self._answer(INTERFACE_OK)
        elif command == CMD_KBD_DISABLE:
            self._ctr |= CTR_KBDDIS
        elif command == CMD_KBD_ENABLE:
            self._ctr &= ~CTR_KBDDIS
        elif command == CMD_AUX_DISABLE:
            self._ctr |= CTR_AUXDIS
        elif command == CMD_AUX_ENABLE:
            self._ctr &= ~CTR_AUXDIS
        elif command == CMD_READ_OUTPUT_PORT:
            self._answer(self._output_port)
        elif command >= CMD_PULSE_FIRST:
            return not command & OUTPUT_PORT_RESET_LINE
        else:
            self.unknown_commands += 1
        return False

    def _data_byte(self, value: int) -> bool:
        """Handles a byte written to 0x60; returns whether it asks for a reset."""
        self._last_write_was_command = False
        command, self._pending_command = self._pending_command, None
        if command == CMD_WRITE_CTR:
            self._ctr = value
        elif command == CMD_WRITE_OUTPUT_PORT:
            self._output_port = value
            return not value & OUTPUT_PORT_RESET_LINE
        elif command == CMD_KBD_LOOP:
            self._answer(value)
        elif command == CMD_AUX_LOOP:
            self._answer(value, aux=True)
        elif command == CMD_AUX_SEND:
            self._answer(NO_DEVICE, aux=True, timed_out=True)   # no mouse answers
        else:
            self.keyboard.receive(value)        # its answer comes in _pull_keyboard
        return False

    def _update_irqs(self) -> None:
        kbd = self._data_full and not self._data_from_aux and bool(self._ctr & CTR_KBDINT)
        aux = self._data_full and self._data_from_aux and bool(self._ctr & CTR_AUXINT)
        if kbd != self._kbd_level:
            self._kbd_level = kbd
            if self._kbd_irq is not None:
                self._kbd_irq.set_level(kbd)
        if aux != self._aux_level:
            self._aux_level = aux
            if self._aux_irq is not None:
                self._aux_irq.set_level(aux)
