"""The AT (PS/2) keyboard behind the i8042's first port: the commands a driver sends
it, the bytes it answers, and the scancodes of keys the host presses.

Why a VM has one: Firecracker's ``SendCtrlAltDel`` is delivered as the real key
sequence (Linux's atkbd turns it into KEY_LEFTCTRL, KEY_LEFTALT, KEY_DELETE; the
VT keyboard handler's Ctrl-Alt-Del reboots, and the reboot ends the VMM).

The keyboard speaks scancode set 2, as real ones do after reset; the controller
translates to set 1 when its command byte asks (``translate_set2``, IBM's 8042
table). The commands are those Linux's atkbd (drivers/input/keyboard/atkbd.c) and
libps2 use while probing and running: reset (0xFF -> ACK, BAT 0xAA), identify (0xF2
-> ACK, 0xAB 0x83), enable/disable scanning (0xF4/0xF5), defaults (0xF6), LEDs
(0xED + byte), typematic rate (0xF3 + byte), scancode set (0xF0 + 0..3), echo
(0xEE), resend (0xFE); anything else is refused with 0xFE, as keyboards do.

The output queue is bounded (a real keyboard holds 16 bytes): past it, host key
presses are dropped, so a client pressing keys at a stopped guest costs nothing.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Annotated

from ..snapshot.schema import U8, Bounds, blob
from ..snapshot.state import ComponentState, SnapshotError

ACK = 0xFA
RESEND = 0xFE
BAT_OK = 0xAA
ECHO = 0xEE
KEYBOARD_ID = (0xAB, 0x83)    # an MF2 keyboard (0x83 reads as 0x41 through translation)
BREAK_PREFIX = 0xF0           # set 2: the next code is a release
EXTENDED_PREFIX = 0xE0
QUEUE_LIMIT = 16

CMD_SET_LEDS = 0xED
CMD_ECHO = 0xEE
CMD_SCANCODE_SET = 0xF0
CMD_IDENTIFY = 0xF2
CMD_TYPEMATIC = 0xF3
CMD_ENABLE = 0xF4
CMD_DISABLE = 0xF5            # "reset and disable": defaults, scanning off
CMD_DEFAULTS = 0xF6
CMD_RESEND = 0xFE
CMD_RESET = 0xFF
PARAMETER_COMMANDS = frozenset({CMD_SET_LEDS, CMD_SCANCODE_SET, CMD_TYPEMATIC})

# Set 2 make codes of the keys the host presses (a leading 0xE0 is part of the code).
KEY_LEFT_CTRL = (0x14,)
KEY_LEFT_ALT = (0x11,)
KEY_DELETE = (EXTENDED_PREFIX, 0x71)
CTRL_ALT_DEL = (KEY_LEFT_CTRL, KEY_LEFT_ALT, KEY_DELETE)

# Set 1 codes of the same keys (a keyboard switched to set 1 with 0xF0 0x01): release
# is the make code with bit 7 set.
_SET1 = {KEY_LEFT_CTRL: (0x1D,), KEY_LEFT_ALT: (0x38,), KEY_DELETE: (EXTENDED_PREFIX, 0x53)}

# IBM's 8042 translation of set 2 codes 0x00-0x7F to set 1 (the controller's command
# byte bit 6). Codes 0x80-0xFF pass unchanged except 0x83 (F7) -> 0x41 and 0x84 -> 0x54.
_TRANSLATION = bytes.fromhex(
    "ff 43 41 3f 3d 3b 3c 58 64 44 42 40 3e 0f 29 59"
    "65 38 2a 70 1d 10 02 5a 66 71 2c 1f 1e 11 03 5b"
    "67 2e 2d 20 12 05 04 5c 68 39 2f 21 14 13 06 5d"
    "69 31 30 23 22 15 07 5e 6a 72 32 24 16 08 09 5f"
    "6b 33 25 17 18 0b 0a 60 6c 34 35 26 27 19 0c 61"
    "6d 73 28 74 1a 0d 62 6e 3a 36 1c 1b 75 2b 63 76"
    "55 56 77 78 79 7a 0e 7b 7c 4f 7d 4b 47 7e 7f 6f"
    "52 53 50 4c 4d 48 01 45 57 4e 51 4a 37 49 46 54")
_HIGH_TRANSLATION = {0x83: 0x41, 0x84: 0x54}


def translate_set2(code: int) -> int:
    """The set 1 byte the 8042 delivers for set 2 byte ``code`` (prefixes excluded)."""
    if code < 0x80:
        return _TRANSLATION[code]
    return _HIGH_TRANSLATION.get(code, code)


@dataclass(frozen=True)
class KeyboardState(ComponentState, tag="ps2-keyboard"):
    """What a snapshot keeps of the keyboard."""

    queue: blob(QUEUE_LIMIT)                # bytes not yet taken by the controller
    scanning: bool
    scancode_set: Annotated[int, Bounds(1, 3)]
    pending_command: U8 | None
    leds: Annotated[int, Bounds(0, 0x07)]
    typematic: Annotated[int, Bounds(0, 0x7F)]
    last_sent: U8

    def check(self) -> None:
        if self.pending_command is not None and self.pending_command not in PARAMETER_COMMANDS:
            raise SnapshotError(f"keyboard: {self.pending_command:#x} takes no parameter")


class Ps2Keyboard:
    """The keyboard's side of the wire. Not thread-safe: the i8042 calls it under its
    own lock. ``receive`` takes a byte the driver sent; ``next_byte`` gives the
    controller the next byte to deliver (None when the queue is empty)."""

    def __init__(self):
        self._queue: deque[int] = deque()
        self._reset_settings()
        self._pending_command: int | None = None
        self._last_sent = ACK
        self.dropped = 0          # bytes lost to a full queue

    def _reset_settings(self) -> None:
        self._scanning = True
        self._scancode_set = 2
        self._leds = 0
        self._typematic = 0x2B    # 10.9 characters/s, 500 ms delay: the power-on value

    # --- the wire --------------------------------------------------------------------
    def has_output(self) -> bool:
        return bool(self._queue)

    def next_byte(self) -> int | None:
        if not self._queue:
            return None
        self._last_sent = self._queue.popleft()
        return self._last_sent

    def _send(self, *data: int) -> bool:
        """Queue ``data`` whole, or nothing when it does not fit."""
        if len(self._queue) + len(data) > QUEUE_LIMIT:
            self.dropped += len(data)
            return False
        self._queue.extend(data)
        return True

    def receive(self, value: int) -> None:
        """A byte the driver wrote to the keyboard (through port 0x60)."""
        command, self._pending_command = self._pending_command, None
        if command is not None and value < CMD_SET_LEDS:     # else a command cancels it
            self._parameter(command, value)
            return
        self._command(value)

    def _parameter(self, command: int, value: int) -> None:
        if command == CMD_SET_LEDS:
            self._leds = value & 0x07
            self._send(ACK)
        elif command == CMD_TYPEMATIC:
            self._typematic = value & 0x7F
            self._send(ACK)
        elif value == 0:          # CMD_SCANCODE_SET 0: which set is in use
            self._send(ACK, self._scancode_set)
        elif value <= 3:
            self._scancode_set = value
            self._queue.clear()
            self._send(ACK)
        else:
            self._send(RESEND)

    def _command(self, command: int) -> None:
        if command in PARAMETER_COMMANDS:
            self._pending_command = command
            if command == CMD_SCANCODE_SET:
                self._scanning = False      # keys would come in the wrong set meanwhile
            self._send(ACK)
        elif command == CMD_RESET:
            self._queue.clear()
            self._reset_settings()
            self._send(ACK, BAT_OK)
        elif command == CMD_IDENTIFY:
            self._send(ACK, *KEYBOARD_ID)
        elif command == CMD_ENABLE:
            self._queue.clear()
            self._scanning = True
            self._send(ACK)
        elif command == CMD_DISABLE:
            self._queue.clear()
            self._reset_settings()
            self._scanning = False
            self._send(ACK)
        elif command == CMD_DEFAULTS:
            self._queue.clear()
            self._reset_settings()
            self._send(ACK)
        elif command == CMD_ECHO:
            self._send(ECHO)
        elif command == CMD_RESEND:
            self._send(self._last_sent)
        else:
            self._send(RESEND)

    # --- keys the host presses -------------------------------------------------------------
    def press_and_release(self, keys: tuple[tuple[int, ...], ...]) -> bool:
        """Each key of ``keys`` (set 2 make codes) pressed in order, then released in
        reverse order, as a person types a chord. False (nothing queued) while the
        driver has scanning disabled or the queue has no room for the whole chord."""
        if not self._scanning:
            return False
        data: list[int] = []
        for key in keys:
            data += self._make(key)
        for key in reversed(keys):
            data += self._break(key)
        return self._send(*data)

    def _make(self, key: tuple[int, ...]) -> tuple[int, ...]:
        return _SET1[key] if self._scancode_set == 1 else key

    def _break(self, key: tuple[int, ...]) -> tuple[int, ...]:
        if self._scancode_set == 1:
            *prefix, code = _SET1[key]
            return (*prefix, code | 0x80)
        *prefix, code = key
        return (*prefix, BREAK_PREFIX, code)

    # --- snapshots --------------------------------------------------------------------
    def save_state(self) -> KeyboardState:
        return KeyboardState(queue=bytes(self._queue), scanning=self._scanning,
                             scancode_set=self._scancode_set,
                             pending_command=self._pending_command, leds=self._leds,
                             typematic=self._typematic, last_sent=self._last_sent)

    def restore_state(self, state: KeyboardState) -> None:
        self._queue = deque(state.queue)
        self._scanning = state.scanning
        self._scancode_set = state.scancode_set
        self._pending_command = state.pending_command
        self._leds = state.leds
        self._typematic = state.typematic
        self._last_sent = state.last_sent
