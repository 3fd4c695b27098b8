"""i8042, CMOS RTC and pykvm's guest-control ports, driven as guests drive them."""

import base64
import json
import time
from datetime import datetime, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pykvm.devices import guest_control, i8042, ps2_keyboard, rtc
from pykvm.devices.guest_control import GuestControl
from pykvm.devices.i8042 import I8042, I8042State
from pykvm.devices.rtc import Rtc
from pykvm.layout import EXIT_PORT, PROGRESS_PORT
from pykvm.snapshot.state import SnapshotError

from ..fakes import FakeIrqLine


class StopVm(Exception):
    """What a VMM's callback might raise to leave the vCPU loop."""


# --- i8042 ---------------------------------------------------------------------

DATA, STATUS = 0, 4


class Controller:
    """A guest-side view of the controller: the ports plus Linux's wait loops."""

    def __init__(self, **kwargs):
        self.resets = 0
        self.device = I8042(self._reset, **kwargs)
        self.longest_wait = 0

    def _reset(self):
        self.resets += 1

    def status(self):
        return self.device.read(STATUS, 1)

    def command(self, command, *params, answers=0):
        """Linux's __i8042_command: wait for IBF clear, write, wait for OBF, read."""
        self.wait(lambda s: not s & i8042.STR_IBF)
        self.device.write(STATUS, 1, command)
        for param in params:
            self.wait(lambda s: not s & i8042.STR_IBF)
            self.device.write(DATA, 1, param)
        result = []
        for _ in range(answers):
            self.wait(lambda s: s & i8042.STR_OBF)
            result.append(self.device.read(DATA, 1))
        return result

    def wait(self, ready, limit=10000):
        for polls in range(1, limit + 1):
            if ready(self.status()):
                self.longest_wait = max(self.longest_wait, polls)
                return polls
        raise AssertionError("the driver would still be polling 0x64")


@pytest.fixture
def kbc():
    return Controller()


def test_idle_status_says_no_data_and_input_buffer_empty(kbc):
    status = kbc.status()
    assert not status & (i8042.STR_OBF | i8042.STR_IBF)
    assert status & i8042.STR_KEYLOCK       # else Linux warns "Keylock active"
    assert status != 0xFF                   # else Linux finds no controller


def test_reset_command_calls_on_reset(kbc):
    kbc.device.write(STATUS, 1, 0xFE)
    assert kbc.resets == 1
    kbc.device.write(STATUS, 1, 0xFF)       # pulses no line: not a reset
    assert kbc.resets == 1


def test_output_port_reset_line(kbc):
    kbc.command(0xD1, 0x03)
    assert kbc.resets == 0
    assert kbc.command(0xD0, answers=1) == [0x03]
    kbc.command(0xD1, 0x02)                 # bit 0 low: the CPU reset line
    assert kbc.resets == 1


def test_reset_callback_may_raise_to_stop_the_vm():
    def stop():
        raise StopVm

    device = I8042(stop)
    with pytest.raises(StopVm):
        device.write(STATUS, 1, 0xFE)
    device.write(STATUS, 1, 0xAA)           # the lock was not left held
    assert device.read(DATA, 1) == 0x55


def test_self_test_and_interface_tests(kbc):
    assert kbc.command(0xAA, answers=1) == [0x55]
    assert kbc.command(0xAB, answers=1) == [0x00]
    assert kbc.command(0xA9, answers=1) == [0x00]
    assert not kbc.status() & i8042.STR_OBF


def test_command_byte_round_trip(kbc):
    assert kbc.command(0x20, answers=1) == [i8042.DEFAULT_CTR]
    kbc.command(0x60, 0x30)
    assert kbc.command(0x20, answers=1) == [0x30]
    assert not kbc.status() & i8042.STR_SYSFLAG   # follows the command byte's bit 2


def test_disable_and_enable_ports_change_the_command_byte(kbc):
    kbc.command(0xAD)
    kbc.command(0xA7)
    ctr = kbc.command(0x20, answers=1)[0]
    assert ctr & i8042.CTR_KBDDIS and ctr & i8042.CTR_AUXDIS
    kbc.command(0xAE)
    kbc.command(0xA8)
    ctr = kbc.command(0x20, answers=1)[0]
    assert not ctr & (i8042.CTR_KBDDIS | i8042.CTR_AUXDIS)


def read_all(kbc):
    """What the guest reads from 0x60 while the status says a byte waits."""
    data = []
    while kbc.status() & i8042.STR_OBF:
        assert not kbc.status() & i8042.STR_TIMEOUT
        data.append(kbc.device.read(DATA, 1))
    return data


def test_keyboard_reset_answers_ack_and_self_test_passed(kbc):
    kbc.device.write(DATA, 1, 0xFF)         # "keyboard, reset"
    assert not kbc.status() & i8042.STR_AUXDATA
    assert read_all(kbc) == [0xFA, 0xAA]


def test_atkbd_probe_sees_a_translated_mf2_keyboard(kbc):
    """atkbd_probe: GETID answers 0xAB then 0x83, which the 8042 translates to 0x41
    (atkbd then names it "AT Translated Set 2 keyboard"); the rest of atkbd_connect's
    commands (reset-disable, LEDs, typematic, enable) are acknowledged."""
    kbc.device.write(DATA, 1, 0xF2)
    assert read_all(kbc) == [0xFA, 0xAB, 0x41]
    for byte in (0xF5, 0xED, 0x00, 0xF3, 0x2B, 0xF4):
        kbc.device.write(DATA, 1, byte)
        assert read_all(kbc) == [0xFA]
    kbc.device.write(DATA, 1, 0x12)         # not a keyboard command
    assert read_all(kbc) == [0xFE]
    kbc.command(0x60, i8042.DEFAULT_CTR & ~i8042.CTR_XLATE)
    kbc.device.write(DATA, 1, 0xF2)
    assert read_all(kbc) == [0xFA, 0xAB, 0x83]


def test_ctrl_alt_del_in_translated_set_2_one_interrupt_per_byte():
    kbd = FakeIrqLine()
    kbc = Controller(kbd_irq=kbd)
    assert kbc.device.press_keys(ps2_keyboard.CTRL_ALT_DEL)
    data = read_all(kbc)
    # Set 1 make codes, then the breaks (bit 7) in reverse order.
    assert data == [0x1D, 0x38, 0xE0, 0x53, 0xE0, 0xD3, 0xB8, 0x9D]
    assert kbd.levels == [True, False] * len(data)


def test_ctrl_alt_del_in_set_2_and_set_1():
    kbc = Controller()
    kbc.command(0x60, i8042.DEFAULT_CTR & ~i8042.CTR_XLATE)
    assert kbc.device.press_keys(ps2_keyboard.CTRL_ALT_DEL)
    assert read_all(kbc) == [0x14, 0x11, 0xE0, 0x71, 0xE0, 0xF0, 0x71, 0xF0, 0x11, 0xF0, 0x14]
    for byte in (0xF0, 0x01, 0xF4):         # scancode set 1 (untranslated), enable
        kbc.device.write(DATA, 1, byte)
        assert read_all(kbc) == [0xFA]      # a driver waits for each ACK (ps2_command)
    assert kbc.device.press_keys(ps2_keyboard.CTRL_ALT_DEL)
    assert read_all(kbc) == [0x1D, 0x38, 0xE0, 0x53, 0xE0, 0xD3, 0xB8, 0x9D]
    kbc.device.write(DATA, 1, 0xF0)
    assert read_all(kbc) == [0xFA]
    kbc.device.write(DATA, 1, 0x00)         # which set?
    assert read_all(kbc) == [0xFA, 0x01]


def test_keys_wait_for_an_enabled_interface_and_scanning(kbc):
    kbc.command(0xAD)                       # keyboard interface disabled
    assert kbc.device.press_keys(ps2_keyboard.CTRL_ALT_DEL)
    assert not kbc.status() & i8042.STR_OBF
    kbc.command(0xAE)
    assert read_all(kbc)[:2] == [0x1D, 0x38]
    kbc.device.write(DATA, 1, 0xF5)         # the driver turns scanning off
    assert read_all(kbc) == [0xFA]
    assert not kbc.device.press_keys(ps2_keyboard.CTRL_ALT_DEL)
    assert read_all(kbc) == []


def test_keyboard_queue_is_bounded(kbc):
    """A client pressing keys at a guest that never reads costs at most 16 bytes."""
    kbc.command(0xAD)
    typed = [kbc.device.press_keys(ps2_keyboard.CTRL_ALT_DEL) for _ in range(100)]
    assert typed[0] and not any(typed[1:])  # 11 set 2 bytes: a second chord does not fit
    kbc.command(0xAE)
    assert len(read_all(kbc)) == 8          # translated: the F0 prefixes fold away
    assert kbc.device.keyboard.dropped > 0


def test_keyboard_state_round_trip_and_hostile_states():
    kbc = Controller()
    kbc.command(0xAD)
    kbc.device.press_keys(ps2_keyboard.CTRL_ALT_DEL)
    saved = json.loads(json.dumps(kbc.device.save_state().to_json()))
    other = Controller()
    other.device.restore_state(I8042State.from_json(saved, "i8042"))
    other.command(0xAE)
    assert read_all(other) == [0x1D, 0x38, 0xE0, 0x53, 0xE0, 0xD3, 0xB8, 0x9D]
    for bad, why in (({"queue": [0x100]}, "expected base64"),
                     ({"queue": base64.b64encode(bytes(17)).decode()}, "17 bytes"),
                     ({"scancode_set": 7}, "out of range"),
                     ({"pending_command": 0xF4}, "0xf4 takes no parameter"),
                     ({"queue": ""} | {"tag": "i8042"}, "tag 'i8042' is not 'ps2-keyboard'")):
        with pytest.raises(SnapshotError, match=why):
            I8042State.from_json(saved | {"keyboard": saved["keyboard"] | bad}, "i8042")
    with pytest.raises(SnapshotError, match="i8042.keyboard: missing scanning"):
        I8042State.from_json(saved | {"keyboard": {"tag": "ps2-keyboard", "queue": ""}}, "i8042")


def test_no_mouse_answers_with_a_timeout(kbc):
    kbc.command(0xD4, 0xF4)                 # "mouse, enable"
    status = kbc.status()
    assert status & i8042.STR_OBF and status & i8042.STR_AUXDATA and status & i8042.STR_TIMEOUT
    assert kbc.device.read(DATA, 1) == 0xFE


def test_linux_probe_ends_at_once():
    """i8042_controller_check/selftest/init, the aux checks and MUX detection."""
    kbc = Controller()
    while kbc.status() & i8042.STR_OBF:     # i8042_flush
        kbc.device.read(DATA, 1)
    assert kbc.command(0xAA, answers=1) == [0x55]
    ctr = kbc.command(0x20, answers=1)
    assert kbc.command(0x20, answers=1) == ctr          # "stable CTR read"
    ctr = (ctr[0] | i8042.CTR_KBDDIS | i8042.CTR_AUXDIS) & ~(i8042.CTR_KBDINT | i8042.CTR_AUXINT)
    kbc.command(0x60, ctr)
    # i8042_check_aux: the loop test must come back from the aux side.
    assert kbc.command(0xD3, 0x5A, answers=1) == [0x5A]
    kbc.command(0xD3, 0x11)
    assert kbc.status() & i8042.STR_AUXDATA
    kbc.device.read(DATA, 1)
    # i8042_set_mux_mode: a plain echo of 0xA4 means "no multiplexer".
    answers = [kbc.command(0xD3, value, answers=1)[0] for value in (0xF0, 0x56, 0xA4)]
    assert answers == [0xF0, 0x56, 0xA4]
    # i8042_toggle_aux: the AUXDIS bit written through the command byte reads back.
    for disabled in (True, False):
        value = ctr | i8042.CTR_AUXDIS if disabled else ctr & ~i8042.CTR_AUXDIS
        kbc.command(0x60, value)
        assert bool(kbc.command(0x20, answers=1)[0] & i8042.CTR_AUXDIS) == disabled
    assert kbc.longest_wait == 1, "every wait loop should end on its first poll"


def test_keyboard_interrupt_follows_output_buffer_and_command_byte():
    kbd, aux = FakeIrqLine(), FakeIrqLine()
    kbc = Controller(kbd_irq=kbd, aux_irq=aux)
    kbc.device.write(STATUS, 1, 0xAA)       # default command byte enables IRQ 1
    assert kbd.levels == [True]
    kbc.device.read(DATA, 1)
    assert kbd.levels == [True, False]
    kbc.command(0x60, 0x00)                 # interrupts off
    kbc.device.write(STATUS, 1, 0xAA)
    assert kbd.levels == [True, False]
    kbc.device.read(DATA, 1)
    assert aux.levels == []


def test_aux_interrupt_on_loopback_byte():
    kbd, aux = FakeIrqLine(), FakeIrqLine()
    kbc = Controller(kbd_irq=kbd, aux_irq=aux)
    kbc.command(0x60, i8042.CTR_AUXINT)
    kbc.device.write(STATUS, 1, 0xD3)
    kbc.device.write(DATA, 1, 0xA5)         # Linux's AUX IRQ delivery test
    assert aux.levels == [True]
    assert kbc.device.read(DATA, 1) == 0xA5
    assert aux.levels == [True, False]
    assert kbd.levels == []


def test_unknown_command_is_counted_and_answers_nothing(kbc):
    kbc.device.write(STATUS, 1, 0x12)
    assert not kbc.status() & i8042.STR_OBF
    assert kbc.device.unknown_commands == 1


def test_i8042_registration_constants():
    assert (i8042.PORT_BASE, i8042.PORT_COUNT) == (0x60, 5)
    assert i8042.PORT_BASE + i8042.STATUS == 0x64


# --- RTC ------------------------------------------------------------------------

LEAP_DAY = datetime(2024, 2, 29, 13, 45, 56, tzinfo=timezone.utc).timestamp()   # a Thursday


class FakeClock:
    def __init__(self, now):
        self.now = now

    def __call__(self):
        return self.now


@pytest.fixture
def clock():
    return FakeClock(LEAP_DAY + 0.25)


@pytest.fixture
def cmos(clock):
    return Rtc(clock=clock)


def cmos_read(device, index):
    device.write(rtc.INDEX, 1, index)
    return device.read(rtc.DATA, 1)


def cmos_write(device, index, value):
    device.write(rtc.INDEX, 1, index)
    device.write(rtc.DATA, 1, value)


def time_registers(device):
    return [cmos_read(device, index) for index in (0x00, 0x02, 0x04, 0x06, 0x07, 0x08, 0x09, 0x32)]


def test_rtc_defaults_to_bcd_24_hour_host_time(cmos):
    assert cmos_read(cmos, rtc.REG_B) == 0x02
    # seconds, minutes, hours, weekday (Sunday = 1), day, month, year, century
    assert time_registers(cmos) == [0x56, 0x45, 0x13, 0x05, 0x29, 0x02, 0x24, 0x20]


def test_rtc_binary_mode(cmos):
    cmos_write(cmos, rtc.REG_B, 0x02 | rtc.REG_B_DM_BINARY)
    assert time_registers(cmos) == [56, 45, 13, 5, 29, 2, 24, 20]


@pytest.mark.parametrize("hour, binary, expected", [
    (13, False, 0x81), (13, True, 0x81), (0, False, 0x12), (12, False, 0x92), (11, True, 11),
    (23, True, 0x80 | 11),
])
def test_rtc_12_hour_mode(clock, hour, binary, expected):
    clock.now = datetime(2024, 1, 1, hour, 0, tzinfo=timezone.utc).timestamp()
    device = Rtc(clock=clock)
    cmos_write(device, rtc.REG_B, rtc.REG_B_DM_BINARY if binary else 0)
    assert cmos_read(device, rtc.HOURS) == expected


def test_rtc_ticks_with_the_host_clock(cmos, clock):
    clock.now += 5
    assert cmos_read(cmos, rtc.SECONDS) == 0x01
    assert cmos_read(cmos, rtc.MINUTES) == 0x46


def test_status_registers(cmos):
    assert not cmos_read(cmos, rtc.REG_A) & rtc.REG_A_UIP
    cmos_write(cmos, rtc.REG_A, 0xA6)       # UIP is read-only
    assert cmos_read(cmos, rtc.REG_A) == 0x26
    assert cmos_read(cmos, rtc.REG_C) == 0x00
    assert cmos_read(cmos, rtc.REG_D) == rtc.REG_D_VRT
    cmos_write(cmos, rtc.REG_D, 0)
    assert cmos_read(cmos, rtc.REG_D) == rtc.REG_D_VRT


def test_index_port_nmi_bit_and_write_only_index(cmos):
    cmos.write(rtc.INDEX, 1, rtc.NMI_DISABLE | rtc.REG_D)
    assert cmos.nmi_masked
    assert cmos.read(rtc.DATA, 1) == rtc.REG_D_VRT
    assert cmos.read(rtc.INDEX, 1) == 0xFF
    cmos.write(rtc.INDEX, 1, rtc.REG_D)
    assert not cmos.nmi_masked


def test_cmos_ram_is_read_write(cmos):
    ram = [index for index in range(0x0E, 0x80) if index != rtc.CENTURY]
    assert len(ram) + 1 == 114
    for index in ram:
        cmos_write(cmos, index, index ^ 0x5A)
    assert [cmos_read(cmos, index) for index in ram] == [index ^ 0x5A for index in ram]
    for alarm in (rtc.SECONDS_ALARM, rtc.MINUTES_ALARM, rtc.HOURS_ALARM):
        cmos_write(cmos, alarm, 0xC0)
        assert cmos_read(cmos, alarm) == 0xC0


def test_guest_sets_the_clock_like_linux(cmos, clock):
    """mc146818_set_time: raise SET, write every field, clear SET."""
    cmos_write(cmos, rtc.REG_B, 0x02 | rtc.REG_B_SET)
    values = {rtc.SECONDS: 0x05, rtc.MINUTES: 0x04, rtc.HOURS: 0x03, rtc.DAY_OF_MONTH: 0x31,
              rtc.MONTH: 0x12, rtc.YEAR: 0x30, rtc.CENTURY: 0x20}
    for index, value in values.items():     # day 31 before month 12: invalid in between
        cmos_write(cmos, index, value)
    clock.now += 100
    assert cmos_read(cmos, rtc.SECONDS) == 0x05        # held while SET is raised
    cmos_write(cmos, rtc.REG_B, 0x02)
    clock.now += 10
    assert time_registers(cmos) == [0x15, 0x04, 0x03, 0x03, 0x31, 0x12, 0x30, 0x20]
    assert cmos.invalid_time_writes == 0


def test_single_field_write_moves_the_clock(cmos, clock):
    cmos_write(cmos, rtc.HOURS, 0x01)
    assert cmos_read(cmos, rtc.HOURS) == 0x01
    clock.now += 2
    assert cmos_read(cmos, rtc.SECONDS) == 0x58
    assert cmos_read(cmos, rtc.DAY_OF_MONTH) == 0x29


def test_hour_written_in_12_hour_mode(cmos):
    cmos_write(cmos, rtc.REG_B, 0x00)
    cmos_write(cmos, rtc.HOURS, 0x80 | 0x12)    # 12 PM
    cmos_write(cmos, rtc.REG_B, 0x02)
    assert cmos_read(cmos, rtc.HOURS) == 0x12


def test_invalid_date_is_ignored(cmos):
    cmos_write(cmos, rtc.DAY_OF_MONTH, 0x30)    # 30 February
    assert cmos.invalid_time_writes == 1
    assert cmos_read(cmos, rtc.DAY_OF_MONTH) == 0x29


def test_clock_running_past_year_9999_falls_back_to_host_time(cmos, clock):
    cmos_write(cmos, rtc.REG_B, 0x02 | rtc.REG_B_SET)
    for index, value in {rtc.SECONDS: 0x59, rtc.MINUTES: 0x59, rtc.HOURS: 0x23,
                         rtc.DAY_OF_MONTH: 0x31, rtc.MONTH: 0x12, rtc.YEAR: 0x99,
                         rtc.CENTURY: 0x99}.items():
        cmos_write(cmos, index, value)
    cmos_write(cmos, rtc.REG_B, 0x02)
    assert cmos_read(cmos, rtc.CENTURY) == 0x99
    clock.now += 2
    assert cmos_read(cmos, rtc.CENTURY) == 0x20


def test_rtc_with_the_real_clock_reads_today():
    device = Rtc()
    cmos_write(device, rtc.REG_B, 0x02 | rtc.REG_B_DM_BINARY)
    now = datetime.now(timezone.utc)
    assert cmos_read(device, rtc.CENTURY) * 100 + cmos_read(device, rtc.YEAR) == now.year


# --- guest control ------------------------------------------------------------------

def test_exit_port_calls_on_exit_with_the_status():
    statuses = []
    device = GuestControl(statuses.append)
    device.write(guest_control.EXIT_OFFSET, 1, 3)
    device.write(guest_control.EXIT_OFFSET, 4, 0x1234)
    assert statuses == [3, 0x34]
    assert device.progress == []


def test_progress_port_records_timestamped_codes():
    codes = []
    device = GuestControl(lambda status: None, on_progress=codes.append)
    before = time.monotonic()
    device.write(guest_control.PROGRESS_OFFSET, 1, 1)
    device.write(guest_control.PROGRESS_OFFSET, 1, 2)
    assert codes == [1, 2]
    assert [code for code, _ in device.progress] == [1, 2]
    stamps = [stamp for _, stamp in device.progress]
    assert before <= stamps[0] <= stamps[1] <= time.monotonic()


def test_guest_control_layout_and_reads():
    assert guest_control.PORT_BASE == EXIT_PORT
    assert guest_control.PORT_BASE + guest_control.PROGRESS_OFFSET == PROGRESS_PORT
    device = GuestControl(lambda status: None)
    assert device.read(0, 1) == 0xFF
    assert device.read(1, 2) == 0xFFFF


def test_exit_callback_may_raise_to_stop_the_vm():
    def stop(status):
        raise StopVm(status)

    with pytest.raises(StopVm):
        GuestControl(stop).write(guest_control.EXIT_OFFSET, 1, 0)


# --- robustness ---------------------------------------------------------------------

def port_traffic(port_count):
    return st.lists(st.tuples(st.booleans(), st.integers(0, port_count - 1),
                              st.sampled_from([1, 2, 4]), st.integers(0, 0xFFFFFFFF)),
                    max_size=80)


def replay(device, operations):
    for is_write, offset, size, value in operations:
        if is_write:
            device.write(offset, size, value & ((1 << (8 * size)) - 1))
        else:
            assert 0 <= device.read(offset, size) < 1 << (8 * size)


@settings(max_examples=200, deadline=None)
@given(port_traffic(i8042.PORT_COUNT))
def test_random_i8042_traffic_never_raises(operations):
    kbd, aux = FakeIrqLine(), FakeIrqLine()
    replay(I8042(lambda: None, kbd_irq=kbd, aux_irq=aux), operations)
    for line in (kbd, aux):
        assert all(a != b for a, b in zip(line.levels, line.levels[1:]))


@settings(max_examples=200, deadline=None)
@given(port_traffic(rtc.PORT_COUNT), st.floats(0, 4e9))
def test_random_rtc_traffic_never_raises(operations, now):
    device = Rtc(clock=FakeClock(now))
    replay(device, operations)
    time_registers(device)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 9), st.integers(0, 255)), max_size=40))
def test_random_rtc_time_writes_never_raise(writes):
    device = Rtc(clock=FakeClock(LEAP_DAY))
    for index, value in writes:
        cmos_write(device, index if index != 9 else rtc.CENTURY, value)
    time_registers(device)
