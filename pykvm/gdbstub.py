"""`pykvm run --gdb PATH`: a GDB remote-serial-protocol stub for the guest.

    pykvm run --flat guests/tutorial/build/03-long-mode.bin --entry protected --gdb /tmp/g.sock
    gdb guests/tutorial/build/03-long-mode.elf -ex 'target remote /tmp/g.sock'

The VM starts paused, before the first guest instruction, and waits for gdb.
Whoever connects owns the guest (and can read and write all its memory), so by
default the stub serves a Unix socket: mode 0600, and every connection's
SO_PEERCRED must be this uid or root (:func:`pykvm.control.peer_refusal`). TCP
has no such check; it is served only when asked for explicitly (``--gdb
tcp:PORT`` on 127.0.0.1, or ``--gdb HOST:PORT``), and the CLI warns then.
Each vCPU is a gdb thread (id = vCPU number + 1).

What gdb can do, and how each is done with KVM:

- registers (``g``/``G``/``p``/``P``): KVM_GET/SET_REGS, SREGS and FPU on the
  vCPU's own thread (``Vcpu.call``); the layout is gdb's amd64 one, described
  by the target.xml sent through ``qXfer:features:read`` (plus cr0, cr2, cr3,
  cr4 and efer, read-only, as ``$cr3`` etc.);
- memory (``m``/``M``): through the guest's own page tables. Addresses are what
  the guest's code uses: linear addresses in 64-bit mode, and offsets from CS's
  base outside it (so a real-mode guest linked at 0 matches its ELF symbols);
- software breakpoints (``Z0``): an ``int3`` written into guest memory, the
  original byte kept (and shown by ``m``). A hit arrives as KVM_EXIT_DEBUG
  (#BP, with KVM_GUESTDBG_USE_SW_BP) on VT-x/AMD-V; on kvm_pvm, guest ring-0
  ``int3`` ends in an emulation-failure exit instead (the run loop offers it to
  :meth:`GdbStub.on_internal_error` before the host's quirks), and in real mode
  KVM's emulator runs ``int3`` through the guest's IVT without exiting at all,
  so each Z0 also takes a free debug register (DR0-3) when there is one;
- hardware breakpoints (``Z1``): DR0-3 and DR7 through KVM_SET_GUEST_DEBUG
  (KVM_GUESTDBG_USE_HW_BP), reported as KVM_EXIT_DEBUG (#DB);
- single step (``s``): KVM_GUESTDBG_SINGLESTEP, reported as KVM_EXIT_DEBUG (#DB);
- continue (``c``), kill (``k``), detach (``D``), Ctrl-C (0x03: pause the VM).

Measured on kvm_pvm: in guest ring 0 (all tutorial guests) single step and
hardware breakpoints work; in guest ring 3 neither is reported, and ``int3``
goes to the guest's own IDT, so gdb cannot stop ring-3 code there except with
Ctrl-C.
"""

from __future__ import annotations

import ctypes
import os
import queue
import select
import socket
import stat
import sys
import threading
from dataclasses import dataclass

from . import ioctl as k
from . import sandbox
from .control import listen_unix, peer_refusal
from .errors import ConfigError, GuestMemoryError, PykvmError
from .guest.code import linear_to_physical
from .observe.disasm import cpu_bits

SIGINT, SIGTRAP = 2, 5
INT3 = 0xCC
DR6_BS = 1 << 14          # single step
DR7_RESERVED = 1 << 10
PACKET_SIZE = 0x4000


# --- the register layout gdb gets ---------------------------------------------------------------
def _gpr(name):
    return (lambda r, s, f: getattr(r, name)), ("regs", name)


def _seg(name):
    return (lambda r, s, f: getattr(s, name).selector), None


def _fpu_bytes(getter):
    return getter, None


_GPRS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp",
         "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")


def _full_tag(ftwx: int, fpu) -> int:
    """fxsave's abridged tag byte -> the x87 tag word gdb shows (valid or empty)."""
    return sum((0 if ftwx >> i & 1 else 3) << (2 * i) for i in range(8))


@dataclass(frozen=True)
class Register:
    name: str
    bits: int
    type: str
    feature: str
    get: object                   # (regs, sregs, fpu) -> int or bytes
    set: tuple | None = None      # ("regs", field) / ("fpu", field[, index]); None: read-only
    group: str | None = None


def _registers() -> list[Register]:
    core, sse, seg, sys_ = ("org.gnu.gdb.i386.core", "org.gnu.gdb.i386.sse",
                            "org.gnu.gdb.i386.segments", "org.pykvm.x86.system")
    regs = []
    for name in _GPRS:
        kind = "data_ptr" if name in ("rbp", "rsp") else "int64"
        regs.append(Register(name, 64, kind, core, *_gpr(name)))
    regs.append(Register("rip", 64, "code_ptr", core, *_gpr("rip")))
    regs.append(Register("eflags", 32, "i386_eflags", core, lambda r, s, f: r.rflags,
                         ("regs", "rflags")))
    for name in ("cs", "ss", "ds", "es", "fs", "gs"):
        regs.append(Register(name, 32, "int32", core, *_seg(name)))
    for i in range(8):
        regs.append(Register(f"st{i}", 80, "i387_ext", core,
                             lambda r, s, f, i=i: bytes(f.fpr[i])[:10], ("fpu", "fpr", i)))
    x87 = [("fctrl", lambda r, s, f: f.fcw, ("fpu", "fcw")),
           ("fstat", lambda r, s, f: f.fsw, ("fpu", "fsw")),
           ("ftag", lambda r, s, f: _full_tag(f.ftwx, f), None),
           ("fiseg", lambda r, s, f: 0, None),
           ("fioff", lambda r, s, f: f.last_ip & 0xFFFFFFFF, None),
           ("foseg", lambda r, s, f: 0, None),
           ("fooff", lambda r, s, f: f.last_dp & 0xFFFFFFFF, None),
           ("fop", lambda r, s, f: f.last_opcode, ("fpu", "last_opcode"))]
    for name, get, setter in x87:
        regs.append(Register(name, 32, "int", core, get, setter, "float"))
    for i in range(16):
        regs.append(Register(f"xmm{i}", 128, "vec128", sse,
                             lambda r, s, f, i=i: bytes(f.xmm[i]), ("fpu", "xmm", i)))
    regs.append(Register("mxcsr", 32, "i386_mxcsr", sse, lambda r, s, f: f.mxcsr,
                         ("fpu", "mxcsr"), "vector"))
    regs.append(Register("fs_base", 64, "int", seg, lambda r, s, f: s.fs.base))
    regs.append(Register("gs_base", 64, "int", seg, lambda r, s, f: s.gs.base))
    for name in ("cr0", "cr2", "cr3", "cr4", "efer"):
        regs.append(Register(name, 64, "int64", sys_, lambda r, s, f, n=name: getattr(s, n),
                             None, "system"))
    return regs


REGISTERS = _registers()
REGISTER_INDEX = {reg.name: i for i, reg in enumerate(REGISTERS)}

_FEATURE_TYPES = {
    "org.gnu.gdb.i386.core": """
  <flags id="i386_eflags" size="4">
    <field name="CF" start="0" end="0"/><field name="" start="1" end="1"/>
    <field name="PF" start="2" end="2"/><field name="AF" start="4" end="4"/>
    <field name="ZF" start="6" end="6"/><field name="SF" start="7" end="7"/>
    <field name="TF" start="8" end="8"/><field name="IF" start="9" end="9"/>
    <field name="DF" start="10" end="10"/><field name="OF" start="11" end="11"/>
    <field name="NT" start="14" end="14"/><field name="RF" start="16" end="16"/>
    <field name="VM" start="17" end="17"/><field name="AC" start="18" end="18"/>
    <field name="VIF" start="19" end="19"/><field name="VIP" start="20" end="20"/>
    <field name="ID" start="21" end="21"/>
  </flags>""",
    "org.gnu.gdb.i386.sse": """
  <vector id="v4f" type="ieee_single" count="4"/>
  <vector id="v2d" type="ieee_double" count="2"/>
  <vector id="v16i8" type="int8" count="16"/>
  <vector id="v8i16" type="int16" count="8"/>
  <vector id="v4i32" type="int32" count="4"/>
  <vector id="v2i64" type="int64" count="2"/>
  <union id="vec128">
    <field name="v4_float" type="v4f"/><field name="v2_double" type="v2d"/>
    <field name="v16_int8" type="v16i8"/><field name="v8_int16" type="v8i16"/>
    <field name="v4_int32" type="v4i32"/><field name="v2_int64" type="v2i64"/>
    <field name="uint128" type="uint128"/>
  </union>
  <flags id="i386_mxcsr" size="4">
    <field name="IE" start="0" end="0"/><field name="DE" start="1" end="1"/>
    <field name="ZE" start="2" end="2"/><field name="OE" start="3" end="3"/>
    <field name="UE" start="4" end="4"/><field name="PE" start="5" end="5"/>
    <field name="DAZ" start="6" end="6"/><field name="IM" start="7" end="7"/>
    <field name="DM" start="8" end="8"/><field name="ZM" start="9" end="9"/>
    <field name="OM" start="10" end="10"/><field name="UM" start="11" end="11"/>
    <field name="PM" start="12" end="12"/><field name="FZ" start="15" end="15"/>
  </flags>""",
}


def target_xml() -> str:
    features: dict[str, list[str]] = {}
    for number, reg in enumerate(REGISTERS):
        group = f' group="{reg.group}"' if reg.group else ""
        features.setdefault(reg.feature, []).append(
            f'  <reg name="{reg.name}" bitsize="{reg.bits}" type="{reg.type}" '
            f'regnum="{number}"{group}/>')
    body = "".join(f'<feature name="{name}">{_FEATURE_TYPES.get(name, "")}\n'
                   + "\n".join(lines) + "\n</feature>\n" for name, lines in features.items())
    return ('<?xml version="1.0"?>\n<!DOCTYPE target SYSTEM "gdb-target.dtd">\n'
            '<target version="1.0">\n<architecture>i386:x86-64</architecture>\n'
            f'{body}</target>\n')


# --- state -------------------------------------------------------------------------------------
@dataclass
class SoftBreakpoint:
    address: int        # as gdb gave it
    linear: int
    physical: int
    original: int       # the byte int3 replaced
    slot: int | None    # a debug register backing it up, if one was free


@dataclass
class StopEvent:
    vcpu_id: int
    signal: int
    kind: str = ""      # "swbreak", "hwbreak", "" (step, interrupt)


class GdbProtocolError(PykvmError):
    pass


@dataclass(frozen=True)
class GdbAddress:
    """Where the stub listens: a Unix socket ``path``, or TCP ``host``:``port``."""

    path: str | None = None
    host: str = "127.0.0.1"
    port: int | None = None

    @property
    def tcp(self) -> bool:
        return self.path is None

    @classmethod
    def parse(cls, text: str) -> "GdbAddress":
        """``--gdb`` text: ``tcp:PORT`` (127.0.0.1), ``HOST:PORT``, or a socket path."""
        text = str(text)
        if text.startswith("tcp:"):
            return cls(host="127.0.0.1", port=_port(text, text[4:]))
        host, colon, port = text.rpartition(":")
        if colon and port.isdigit() and "/" not in text:
            return cls(host=host.strip("[]") or "127.0.0.1", port=_port(text, port))
        if text.isdigit():
            raise ConfigError(f"--gdb {text}: a bare number is not a socket path; for TCP "
                              f"(no authentication) say --gdb tcp:{text}")
        if not text:
            raise ConfigError("--gdb: give a socket path (or tcp:PORT)")
        return cls(path=text)

    def describe(self) -> str:
        return self.path if self.path is not None else f"{self.host}:{self.port}"

    def gdb_target(self) -> str:
        """What gdb's ``target remote`` takes to reach it."""
        if self.path is not None:
            return self.path
        return f":{self.port}" if self.host == "127.0.0.1" else f"{self.host}:{self.port}"


def _port(text: str, port: str) -> int:
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"--gdb {text}: not a TCP port number")
    return int(port)


class GdbStub:
    """Serve one gdb at a time for ``vm`` at ``where``: a :class:`GdbAddress`, its text,
    or a TCP port on 127.0.0.1 (0: any free one; library and tests). :meth:`attach`
    before the VM starts; :meth:`close` when done."""

    def __init__(self, vm, where: "GdbAddress | str | int", *, log=None, verbose=False):
        self.vm = vm
        self.log = log if log is not None else sys.stderr
        self.verbose = verbose
        if isinstance(where, int):
            where = GdbAddress(port=where)
        elif not isinstance(where, GdbAddress):
            where = GdbAddress.parse(where)
        self.listener = _listen(where)
        if where.tcp:
            where = GdbAddress(host=where.host, port=self.listener.getsockname()[1])
        self.address = where
        self.port = where.port
        self.conn: socket.socket | None = None
        self._buffer = bytearray()
        self.no_ack = False
        self.breakpoints: dict[int, SoftBreakpoint] = {}
        self.slots: list[tuple[int, str] | None] = [None] * 4   # (linear, "Z0"/"Z1")
        self.stepping: set[int] = set()
        self._step_ended: set[int] = set()
        self.events: queue.Queue[StopEvent] = queue.Queue()
        self.last_stop = StopEvent(0, SIGTRAP)
        self.current = 0             # vCPU for g/m (Hg)
        self.step_vcpu = 0           # vCPU for s/c (Hc)
        self._state: dict[int, tuple] = {}
        self._closing = False
        self._spoken = False
        self.connected = threading.Event()
        self.thread = threading.Thread(target=self._serve, name="gdbstub", daemon=True)
        self._hooks = (_Breakpoints(self), _StepWatch(self))

    # --- life cycle ------------------------------------------------------------------------
    def attach(self) -> None:
        """Install as the VM's debugger, and make the VM start paused. Its breakpoints are
        asked before the host's quirks (an int3 of gdb's is not the guest's); the step
        watch sees port-I/O and MMIO exits after any tracer (pykvm/vstate/hooks.py)."""
        breakpoints, steps = self._hooks
        self.vm.hooks.add(breakpoints, first=True)
        self.vm.hooks.add(steps)
        self.vm.pause()
        self.thread.start()

    def close(self) -> None:
        self._closing = True
        _shut(self.listener)
        if self.address.path is not None:
            _unlink_socket(self.address.path)
        if self.thread.is_alive() and self.thread is not threading.current_thread():
            self.thread.join(timeout=1)   # a waiting gdb gets its "exited" (W) reply first
        _shut(self.conn)
        if self.thread.is_alive() and self.thread is not threading.current_thread():
            self.thread.join(timeout=5)
        for hook in self._hooks:
            self.vm.hooks.remove(hook)

    def _say(self, text: str) -> None:
        if self.verbose:
            print(f"pykvm: gdb: {text}", file=self.log, flush=True)

    # --- hooks called on vCPU threads -------------------------------------------------------
    def on_debug_exit(self, vcpu) -> bool:
        arch = vcpu.run_struct.debug.arch
        if arch.exception == 1:
            if vcpu.id in self._step_ended and arch.dr6 & DR6_BS:
                return True   # the trap of a step already reported at its port/MMIO exit
            if vcpu.id in self.stepping:
                self._stop_here(vcpu, StopEvent(vcpu.id, SIGTRAP))
                return True
            hit = [i for i in range(4) if arch.dr6 >> i & 1 and self.slots[i] is not None]
            if hit:
                kind = "hwbreak" if self.slots[hit[0]][1] == "Z1" else "swbreak"
                self._stop_here(vcpu, StopEvent(vcpu.id, SIGTRAP, kind))
                return True
            vcpu.inject_exception(1)   # the guest's own #DB
            return True
        if arch.exception == 3:
            if any(bp.linear == arch.pc for bp in self.breakpoints.values()):
                self._stop_here(vcpu, StopEvent(vcpu.id, SIGTRAP, "swbreak"))
                return True
            vcpu.inject_exception(3)   # the guest's own int3: let it have its #BP
            return True
        return False

    def on_internal_error(self, vcpu) -> bool:
        """kvm_pvm: guest ring-0 int3 ends in an emulation failure, RIP at the int3."""
        if not self.breakpoints or \
                vcpu.run_struct.internal.suberror != k.KVM_INTERNAL_ERROR_EMULATION:
            return False
        try:
            regs, sregs = vcpu.get_regs(), vcpu.get_sregs()
            linear = regs.rip if cpu_bits(sregs) == 64 else (sregs.cs.base + regs.rip) & 0xFFFFFFFF
            physical = linear_to_physical(vcpu, sregs, linear)
        except PykvmError:
            return False
        bp = self.breakpoints.get(physical)
        if bp is None or self.vm.memory.read_u8(physical) != INT3:
            return False
        self._stop_here(vcpu, StopEvent(vcpu.id, SIGTRAP, "swbreak"))
        return True

    def step_exit(self, vcpu) -> None:
        """A port-I/O or MMIO exit of a stepping vCPU. KVM loses the single-step
        trap of an instruction that exits to user space (its run loop says so:
        "we might be squashing a KVM_GUESTDBG_SINGLESTEP-triggered KVM_EXIT_DEBUG"),
        so the step ends here. The kick makes the next KVM_RUN finish the
        instruction (an `in` still needs its value) and return before running on."""
        if vcpu.id in self.stepping:
            self._step_ended.add(vcpu.id)
            self._stop_here(vcpu, StopEvent(vcpu.id, SIGTRAP))

    def _stop_here(self, vcpu, event: StopEvent) -> None:
        """On the vCPU thread: pause the VM, and this vCPU at its next KVM_RUN."""
        self.stepping.discard(vcpu.id)
        self.vm.pause()
        vcpu.kick()
        self.events.put(event)

    # --- the connection -------------------------------------------------------------------------
    def _serve(self) -> None:
        sandbox.thread_role("control")   # pykvm/sandbox: seccomp, unless --no-seccomp
        while not self._closing:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            if self.address.tcp:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            else:
                refusal = peer_refusal(conn)
                if refusal is not None:
                    self._say(f"connection refused: {refusal}")
                    _shut(conn)
                    continue
            self.conn, self._buffer, self.no_ack = conn, bytearray(), False
            self.connected.set()
            self._say("gdb connected")
            self._spoken = False
            detach = True
            try:
                detach = self._session()
            except (OSError, ValueError, GdbProtocolError) as error:  # ValueError: closed socket
                self._say(f"connection lost: {error}")
            except PykvmError as error:
                print(f"pykvm: gdb stub: {error}", file=self.log)
            finally:
                conn.close()
                self.conn = None
            if self.vm.stop_requested or self._closing:
                return
            if detach and self._spoken:   # a client that said nothing changes nothing
                self._detach()

    def _recv(self, timeout: float | None = None) -> int | None:
        if not self._buffer:
            if timeout is not None:
                ready, _, _ = select.select([self.conn], [], [], timeout)
                if not ready:
                    return None
            data = self.conn.recv(4096)
            if not data:
                raise ConnectionError("gdb closed the connection")
            self._buffer += data
        byte = self._buffer[0]
        del self._buffer[0]
        return byte

    def _read_packet(self) -> str:
        while True:
            byte = self._recv()
            if byte == 0x03:
                return "\x03"
            if byte == ord("$"):
                break
        data = bytearray()
        while (byte := self._recv()) != ord("#"):
            data.append(byte)
        checksum = bytes([self._recv(), self._recv()])
        if not self.no_ack:
            good = int(checksum, 16) == sum(data) & 0xFF
            self.conn.sendall(b"+" if good else b"-")
            if not good:
                return self._read_packet()
        return _unescape(bytes(data)).decode("latin-1")

    def _send(self, payload: str | bytes) -> None:
        data = _escape(payload.encode("latin-1") if isinstance(payload, str) else payload)
        packet = b"$" + data + b"#" + f"{sum(data) & 0xFF:02x}".encode()
        for _ in range(10):
            self.conn.sendall(packet)
            if self.no_ack:
                return
            while (byte := self._recv()) not in (ord("+"), ord("-")):
                if byte == 0x03:
                    continue
            if byte == ord("+"):
                return
        raise GdbProtocolError("gdb keeps rejecting a packet")

    def _session(self) -> bool:
        """Answer packets until gdb detaches (True) or kills (False)."""
        while True:
            packet = self._read_packet()
            self._spoken = True
            if packet == "\x03":
                continue  # already stopped
            if self.verbose:
                self._say(f"<- {packet[:80]}")
            command = packet[:1]
            if command in ("c", "s", "C", "S"):
                # c [addr], s [addr], C sig[;addr], S sig[;addr]: the signal is not delivered
                address = packet[1:] if command in "cs" else packet[1:].partition(";")[2]
                reply = self._resume(step=command in ("s", "S"), address=address)
            elif command == "k" or packet.startswith("vKill"):
                self.vm.request_stop("user", 0, "killed from gdb")
                if command != "k":
                    self._send("OK")
                return False
            elif command == "D":
                self._send("OK")
                return True
            else:
                reply = self._answer(packet)
            self._send(reply)
            if packet == "QStartNoAckMode":
                self.no_ack = True
            if reply.startswith(("W", "X")):
                return False

    def _answer(self, packet: str) -> str:
        command, rest = packet[:1], packet[1:]
        try:
            if packet.startswith("qSupported"):
                return (f"PacketSize={PACKET_SIZE:x};qXfer:features:read+;swbreak+;hwbreak+;"
                        "QStartNoAckMode+")
            if packet == "QStartNoAckMode":
                return "OK"
            if packet.startswith("qXfer:features:read:"):
                return self._xfer(packet[len("qXfer:features:read:"):])
            if packet == "?":
                return self._stop_reply(self.last_stop)
            if packet == "qAttached":
                return "1"
            if packet == "qC":
                return f"QC{self.current + 1:x}"
            if packet == "qfThreadInfo":
                return "m" + ",".join(f"{v.id + 1:x}" for v in self.vm.vcpus)
            if packet == "qsThreadInfo":
                return "l"
            if packet.startswith("qThreadExtraInfo,"):
                return self._thread_info(int(packet.split(",")[1], 16)).encode().hex()
            if packet.startswith("qSymbol"):
                return "OK"
            if command == "H":
                vcpu = self._thread(rest[1:])
                if rest[:1] == "g":
                    self.current = vcpu
                else:
                    self.step_vcpu = vcpu
                return "OK"
            if command == "T":
                return "OK" if 0 <= int(rest, 16) - 1 < len(self.vm.vcpus) else "E01"
            if command == "g":
                return self._read_registers()
            if command == "G":
                return self._write_registers(bytes.fromhex(rest))
            if command == "p":
                return self._read_register(int(rest, 16))
            if command == "P":
                number, value = rest.split("=")
                return self._write_register(int(number, 16), bytes.fromhex(value))
            if command == "m":
                address, length = (int(x, 16) for x in rest.split(","))
                data = self.read_memory(address, min(length, PACKET_SIZE // 2))
                return data.hex() if data else "E14"
            if command == "M":
                where, data = rest.split(":")
                address, length = (int(x, 16) for x in where.split(","))
                return "OK" if self.write_memory(address, bytes.fromhex(data)[:length]) else "E14"
            if command in ("Z", "z"):
                kind, address, _ = rest.split(",")[:3]
                return self._breakpoint(command == "Z", kind, int(address, 16))
        except (ValueError, IndexError):
            return "E01"
        except PykvmError as error:
            self._say(f"{packet[:40]}: {error}")
            return "E0e"
        return ""   # not supported: gdb copes

    def _thread(self, text: str) -> int:
        number = int(text, 16) if text not in ("", "-1", "0") else 1
        if not 1 <= number <= len(self.vm.vcpus):
            raise ValueError(text)
        return number - 1

    def _thread_info(self, number: int) -> str:
        if not 1 <= number <= len(self.vm.vcpus):
            return ""
        regs, sregs, _ = self._vcpu_state(number - 1)
        bits = cpu_bits(sregs)
        mode = {16: "real mode" if not sregs.cr0 & 1 else "16-bit protected mode",
                32: "protected mode", 64: "long mode"}[bits]
        return f"vCPU {number - 1}, {mode}, CPL {sregs.cs.selector & 3 if bits != 16 else 0}"

    def _xfer(self, args: str) -> str:
        annex, _, window = args.partition(":")
        if annex != "target.xml":
            return "E00"
        offset, length = (int(x, 16) for x in window.split(","))
        document = target_xml()
        chunk = document[offset:offset + length]
        return ("m" if offset + length < len(document) else "l") + chunk

    def _stop_reply(self, event: StopEvent) -> str:
        extra = f"{event.kind}:;" if event.kind else ""
        return f"T{event.signal:02x}thread:{event.vcpu_id + 1:x};{extra}"

    # --- registers --------------------------------------------------------------------------------
    def _vcpu_state(self, index: int):
        state = self._state.get(index)
        if state is None:
            vcpu = self.vm.vcpus[index]
            state = vcpu.call(lambda v: (v.get_regs(), v.get_sregs(), v.get_fpu()))
            self._state[index] = state
        return state

    @staticmethod
    def _encode(reg: Register, value) -> bytes:
        size = reg.bits // 8
        if isinstance(value, bytes):
            return value[:size].ljust(size, b"\0")
        return (value & ((1 << reg.bits) - 1)).to_bytes(size, "little")

    def _read_registers(self) -> str:
        regs, sregs, fpu = self._vcpu_state(self.current)
        return b"".join(self._encode(reg, reg.get(regs, sregs, fpu)) for reg in REGISTERS).hex()

    def _read_register(self, number: int) -> str:
        if not 0 <= number < len(REGISTERS):
            return "E01"
        regs, sregs, fpu = self._vcpu_state(self.current)
        reg = REGISTERS[number]
        return self._encode(reg, reg.get(regs, sregs, fpu)).hex()

    def _write_registers(self, data: bytes) -> str:
        offset = 0
        updates = []
        for number, reg in enumerate(REGISTERS):
            size = reg.bits // 8
            if offset + size > len(data):
                break
            updates.append((number, data[offset:offset + size]))
            offset += size
        regs, sregs, fpu = self._vcpu_state(self.current)
        for number, value in updates:
            reg = REGISTERS[number]
            if reg.set is not None and self._encode(reg, reg.get(regs, sregs, fpu)) != value:
                self._store(reg, value, regs, fpu)
        self._commit(regs, fpu)
        return "OK"

    def _write_register(self, number: int, value: bytes) -> str:
        if not 0 <= number < len(REGISTERS) or REGISTERS[number].set is None:
            return "E01"
        regs, sregs, fpu = self._vcpu_state(self.current)
        self._store(REGISTERS[number], value, regs, fpu)
        self._commit(regs, fpu)
        return "OK"

    @staticmethod
    def _store(reg: Register, value: bytes, regs, fpu) -> None:
        where, field, *index = reg.set
        target = regs if where == "regs" else fpu
        if index:
            array = getattr(target, field)[index[0]]
            ctypes.memmove(array, value, min(len(value), ctypes.sizeof(array)))
        else:
            setattr(target, field, int.from_bytes(value, "little"))

    def _commit(self, regs, fpu) -> None:
        def apply(vcpu):
            vcpu.set_regs(regs)
            vcpu.set_fpu(fpu)
        self.vm.vcpus[self.current].call(apply)

    # --- memory -------------------------------------------------------------------------------------
    def _linear(self, address: int, sregs) -> int:
        if cpu_bits(sregs) == 64:
            return address & 0xFFFFFFFFFFFFFFFF
        return (sregs.cs.base + address) & 0xFFFFFFFF

    def _physical(self, linear: int, sregs) -> int:
        return linear_to_physical(self.vm.vcpus[self.current], sregs, linear)

    def read_memory(self, address: int, length: int) -> bytes:
        """Guest memory at a gdb address, int3s hidden; shorter at an unmapped page."""
        _, sregs, _ = self._vcpu_state(self.current)
        out = bytearray()
        linear = self._linear(address, sregs)
        while len(out) < length:
            at = linear + len(out)
            chunk = min(length - len(out), 0x1000 - (at & 0xFFF))
            try:
                physical = self._physical(at, sregs)
                data = bytearray(self.vm.memory.read(physical, chunk))
            except (PykvmError, GuestMemoryError):
                break
            for i in range(chunk):
                bp = self.breakpoints.get(physical + i)
                if bp is not None:
                    data[i] = bp.original
            out += data
        return bytes(out)

    def write_memory(self, address: int, data: bytes) -> bool:
        _, sregs, _ = self._vcpu_state(self.current)
        linear = self._linear(address, sregs)
        try:
            for i, byte in enumerate(data):
                physical = self._physical(linear + i, sregs)
                bp = self.breakpoints.get(physical)
                if bp is not None:
                    bp.original = byte   # keep our int3 in place
                else:
                    self.vm.memory.write_u8(physical, byte)
        except (PykvmError, GuestMemoryError):
            return False
        return True

    # --- breakpoints ----------------------------------------------------------------------------
    def _breakpoint(self, insert: bool, kind: str, address: int) -> str:
        _, sregs, _ = self._vcpu_state(self.current)
        linear = self._linear(address, sregs)
        if kind == "0":
            try:
                physical = self._physical(linear, sregs)
            except PykvmError:
                return "E14"
            if insert:
                if physical not in self.breakpoints:
                    bp = SoftBreakpoint(address, linear, physical,
                                        self.vm.memory.read_u8(physical), self._take_slot(linear, "Z0"))
                    self.vm.memory.write_u8(physical, INT3)
                    self.breakpoints[physical] = bp
            else:
                bp = self.breakpoints.pop(physical, None)
                if bp is not None:
                    self.vm.memory.write_u8(physical, bp.original)
                    if bp.slot is not None and self.slots[bp.slot] == (linear, "Z0"):
                        self.slots[bp.slot] = None
            return "OK"
        if kind == "1":
            if insert:
                return "OK" if self._take_slot(linear, "Z1", evict=True) is not None else "E1c"
            for i, slot in enumerate(self.slots):
                if slot == (linear, "Z1"):
                    self.slots[i] = None
                    return "OK"
            return "OK"
        return ""   # watchpoints: not supported

    def _take_slot(self, linear: int, owner: str, evict: bool = False) -> int | None:
        for i, slot in enumerate(self.slots):
            if slot is None:
                self.slots[i] = (linear, owner)
                return i
        if evict:  # a Z0's backup register gives way to an explicit hardware breakpoint
            for i, slot in enumerate(self.slots):
                if slot[1] == "Z0":
                    for bp in self.breakpoints.values():
                        if bp.slot == i:
                            bp.slot = None
                    self.slots[i] = (linear, owner)
                    return i
        return None

    def _guest_debug(self, vcpu_id: int) -> tuple[int, list[int]]:
        control = 0
        debugreg = [0] * 8
        if self.breakpoints:
            control |= k.KVM_GUESTDBG_ENABLE | k.KVM_GUESTDBG_USE_SW_BP
        if any(self.slots):
            control |= k.KVM_GUESTDBG_ENABLE | k.KVM_GUESTDBG_USE_HW_BP
            debugreg[7] = DR7_RESERVED
            for i, slot in enumerate(self.slots):
                if slot is not None:
                    debugreg[i] = slot[0]
                    debugreg[7] |= 1 << (2 * i)      # Li: enabled; RWi = LENi = 0: execute
        if vcpu_id in self.stepping:
            control |= k.KVM_GUESTDBG_ENABLE | k.KVM_GUESTDBG_SINGLESTEP
        return control, debugreg

    # --- running --------------------------------------------------------------------------------
    def _resume(self, step: bool, address: str = "") -> str:
        if address:
            self._set_pc(int(address, 16))
        while not self.events.empty():
            self.events.get_nowait()     # stale stops of other vCPUs: they will hit again
        self.stepping = {self.step_vcpu} if step else set()
        self._step_ended.clear()
        for vcpu in self.vm.vcpus:
            control, debugreg = self._guest_debug(vcpu.id)
            vcpu.call(lambda v, c=control, d=debugreg: v.set_guest_debug(c, d))
        self._state.clear()
        self.vm.resume()
        return self._wait_for_stop()

    def _set_pc(self, pc: int) -> None:
        regs, sregs, fpu = self._vcpu_state(self.step_vcpu)
        regs.rip = pc
        self.vm.vcpus[self.step_vcpu].call(lambda v: v.set_regs(regs))

    def _wait_for_stop(self) -> str:
        while True:
            if self.vm.stop_requested:
                stop = self.vm.stop_reason
                status = stop.status if stop is not None else 0
                self._say(f"the VM stopped: {stop.message if stop else ''}")
                return f"W{status & 0xFF:02x}"
            try:
                event = self.events.get(timeout=0.02)
            except queue.Empty:
                byte = self._recv(timeout=0)
                if byte == 0x03:
                    self.vm.pause()
                    event = StopEvent(self.step_vcpu, SIGINT)
                else:
                    continue
            self.stepping.clear()
            self.last_stop = event
            self.current = self.step_vcpu = event.vcpu_id
            self._state.clear()
            return self._stop_reply(event)

    def _detach(self) -> None:
        """gdb left: take the breakpoints out and let the guest run on."""
        for bp in list(self.breakpoints.values()):
            self.vm.memory.write_u8(bp.physical, bp.original)
        self.breakpoints.clear()
        self.slots = [None] * 4
        self.stepping.clear()
        for vcpu in self.vm.vcpus:
            try:
                vcpu.call(lambda v: v.set_guest_debug(0))
            except PykvmError:
                pass
        self._state.clear()
        self._say("detached; the guest runs on")
        self.vm.resume()


class _Breakpoints:
    """The stub's exit handlers (the VM's hook list, first): its own int3 (kvm_pvm reports
    it as an emulation failure) and debug exits (single steps, hardware breakpoints)."""

    def __init__(self, stub: GdbStub):
        self.stub = stub

    def internal_error(self, vcpu, suberror: int) -> bool:
        return self.stub.on_internal_error(vcpu)

    def debug_exit(self, vcpu) -> bool:
        return self.stub.on_debug_exit(vcpu)


class _StepWatch:
    """An exit hook that ends single steps at port-I/O and MMIO exits (KVM reports no
    debug exit for an instruction it left to user space)."""

    def __init__(self, stub: GdbStub):
        self.stub = stub

    def pio(self, vcpu, *args) -> None:
        if self.stub.stepping:
            self.stub.step_exit(vcpu)

    def mmio(self, vcpu, *args) -> None:
        if self.stub.stepping:
            self.stub.step_exit(vcpu)


def _listen(where: GdbAddress) -> socket.socket:
    if where.path is not None:
        return listen_unix(where.path, "--gdb")
    try:
        return socket.create_server((where.host, where.port or 0),
                                    family=socket.AF_INET6 if ":" in where.host
                                    else socket.AF_INET)
    except (OSError, OverflowError) as error:
        reason = getattr(error, "strerror", None) or str(error)
        raise ConfigError(f"--gdb {where.describe()}: cannot listen: {reason}") from None


def _unlink_socket(path: str) -> None:
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
    except OSError:
        pass


def _shut(sock) -> None:
    if sock is None:
        return
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


def _escape(data: bytes) -> bytes:
    out = bytearray()
    for byte in data:
        if byte in (0x23, 0x24, 0x7D, 0x2A):   # # $ } *
            out += bytes([0x7D, byte ^ 0x20])
        else:
            out.append(byte)
    return bytes(out)


def _unescape(data: bytes) -> bytes:
    out = bytearray()
    escaped = False
    for byte in data:
        if escaped:
            out.append(byte ^ 0x20)
            escaped = False
        elif byte == 0x7D:
            escaped = True
        else:
            out.append(byte)
    return bytes(out)
