"""The GDB stub: one gdb client at a time answered on its own thread, the VM paused
and resumed for it (GDB manual, "Remote Protocol", Appendix E; all-stop mode).

The dispatcher answers the packets of "Packets" (E.4) and "General Query Packets"
(E.5) that gdb needs for a bare-metal target: ``?``, ``g``/``G``/``p``/``P``
(registers, pykvm/gdb/registers.py), ``m``/``M`` (memory through the guest's own
page tables), ``Z0``/``Z1``/``z`` (pykvm/gdb/breakpoints.py), ``c``/``s``/``C``/``S``,
``H``/``T``/``qfThreadInfo`` (each vCPU is a thread, id = vCPU number + 1), ``k``,
``vKill``, ``D``, and Ctrl-C. Anything else gets the empty reply, which gdb reads as
"not supported". A malformed packet gets ``E01``: the peer is untrusted, and the
stub must neither crash nor act on half a request.

vCPU state is read and written on each vCPU's own thread (``Vcpu.call``), cached
while the VM is stopped. Stops come from the exit hooks (pykvm/gdb/traps.py).
"""

from __future__ import annotations

import logging
import queue
import threading

from .. import sandbox
from ..errors import GdbProtocolError, GuestMemoryError, PykvmError
from ..guest.code import linear_to_physical
from ..observe.disasm import cpu_bits
from . import registers
from .breakpoints import Breakpoints
from .listen import GdbAddress, Listener, shut
from .protocol import CTRL_C, PACKET_SIZE, Connection
from .traps import SIGINT, SIGTRAP, BreakpointHook, StepWatch, StopEvent, Traps

log = logging.getLogger("pykvm.gdb")


class GdbStub:
    """Serve one gdb at a time for ``vm`` at ``where``: a :class:`GdbAddress`, its text,
    or a TCP port on 127.0.0.1 (0: any free one; library and tests). :meth:`attach`
    before the VM starts; :meth:`close` when done. What gdb says and what the stub
    does are logged at DEBUG on the ``pykvm.gdb`` logger."""

    def __init__(self, vm, where: "GdbAddress | str | int"):
        self.vm = vm
        if isinstance(where, int):
            where = GdbAddress(port=where)
        elif not isinstance(where, GdbAddress):
            where = GdbAddress.parse(where)
        self.listener = Listener(where)
        self.address = self.listener.address
        self.port = self.address.port
        self.conn: Connection | None = None
        self.breakpoints = Breakpoints(vm.memory)
        self.traps = Traps(vm, self.breakpoints)
        self.last_stop = StopEvent(0, SIGTRAP)
        self.current = 0             # vCPU for g/m (Hg)
        self.step_vcpu = 0           # vCPU for s/c (Hc)
        self._state: dict[int, tuple] = {}
        self._closing = False
        self._spoken = False
        self.connected = threading.Event()
        self.thread = threading.Thread(target=self._serve, name="gdbstub", daemon=True)
        self._hooks = (BreakpointHook(self.traps), StepWatch(self.traps))

    # --- life cycle ------------------------------------------------------------------------
    def attach(self) -> None:
        """Install the exit hooks, and make the VM start paused. The breakpoints are
        asked before the host's quirks (an int3 of gdb's is not the guest's); the step
        watch sees port-I/O and MMIO exits after any tracer (pykvm/vstate/hooks.py)."""
        breakpoints, steps = self._hooks
        self.vm.hooks.add(breakpoints, first=True)
        self.vm.hooks.add(steps)
        self.vm.pause()
        self.thread.start()

    def close(self) -> None:
        self._closing = True
        self.listener.close()
        if self.thread.is_alive() and self.thread is not threading.current_thread():
            self.thread.join(timeout=1)   # a waiting gdb gets its "exited" (W) reply first
        if self.conn is not None:
            shut(self.conn.sock)
        if self.thread.is_alive() and self.thread is not threading.current_thread():
            self.thread.join(timeout=5)
        for hook in self._hooks:
            self.vm.hooks.remove(hook)

    # --- the connection -------------------------------------------------------------------------
    def _serve(self) -> None:
        sandbox.thread_role("control")   # pykvm/sandbox: seccomp, unless --no-seccomp
        while not self._closing:
            sock = self.listener.accept()
            if sock is None:
                return
            self.conn = Connection(sock)
            self.connected.set()
            log.info("gdb connected")
            self._spoken = False
            detach = True
            try:
                detach = self._session()
            except (OSError, ValueError, GdbProtocolError) as error:  # ValueError: closed socket
                log.info("gdb: connection lost: %s", error)
            except PykvmError as error:
                log.error("gdb stub: %s", error)
            finally:
                sock.close()
                self.conn = None
            if self.vm.stop_requested or self._closing:
                return
            if detach and self._spoken:   # a client that said nothing changes nothing
                self._detach()

    def _session(self) -> bool:
        """Answer packets until gdb detaches (True) or kills (False)."""
        while True:
            packet = self.conn.read_packet()
            self._spoken = True
            if packet == "\x03":
                continue  # already stopped
            log.debug("gdb <- %s", packet[:80])
            command = packet[:1]
            if command in ("c", "s", "C", "S"):
                # c [addr], s [addr], C sig[;addr], S sig[;addr]: the signal is not delivered
                address = packet[1:] if command in "cs" else packet[1:].partition(";")[2]
                try:
                    pc = int(address, 16) if address else None
                except ValueError:
                    self.conn.send("E01")
                    continue
                reply = self._resume(step=command in ("s", "S"), pc=pc)
            elif command == "k" or packet.startswith("vKill"):
                self.vm.request_stop("user", 0, "killed from gdb")
                if command != "k":
                    self.conn.send("OK")
                return False
            elif command == "D":
                self.conn.send("OK")
                return True
            else:
                reply = self._answer(packet)
            self.conn.send(reply)
            if packet == "QStartNoAckMode":
                self.conn.no_ack = True
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
                return self.last_stop.reply()
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
                if vcpu is None:
                    return "E01"
                if rest[:1] == "g":
                    self.current = vcpu
                else:
                    self.step_vcpu = vcpu
                return "OK"
            if command == "T":
                return "OK" if 0 <= int(rest, 16) - 1 < len(self.vm.vcpus) else "E01"
            if command == "g":
                return registers.read_all(*self._vcpu_state(self.current)).hex()
            if command == "G":
                return self._write_registers(registers.split_all(bytes.fromhex(rest)))
            if command == "p":
                number = int(rest, 16)
                if not 0 <= number < len(registers.REGISTERS):
                    return "E01"
                return registers.read_one(number, *self._vcpu_state(self.current)).hex()
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
            log.info("gdb: %s: %s", packet[:40], error)
            return "E0e"
        return ""   # not supported: gdb copes

    def _thread(self, text: str) -> int | None:
        """A vCPU index from an ``H`` thread id (-1 and 0: any, the first); None: no such."""
        number = int(text, 16) if text not in ("", "-1", "0") else 1
        return number - 1 if 1 <= number <= len(self.vm.vcpus) else None

    def _thread_info(self, number: int) -> str:
        if not 1 <= number <= len(self.vm.vcpus):
            return ""
        regs, sregs, _ = self._vcpu_state(number - 1)
        bits = cpu_bits(sregs)
        mode = {16: "real mode" if not sregs.cr0 & 1 else "16-bit protected mode",
                32: "protected mode", 64: "long mode"}[bits]
        return f"vCPU {number - 1}, {mode}, CPL {sregs.cs.selector & 3 if bits != 16 else 0}"

    @staticmethod
    def _xfer(args: str) -> str:
        """``qXfer:features:read:target.xml:OFFSET,LENGTH``: one window of the document,
        ``m`` (more follows) or ``l`` (the last)."""
        annex, _, window = args.partition(":")
        if annex != "target.xml":
            return "E00"
        offset, length = (int(x, 16) for x in window.split(","))
        length = min(length, PACKET_SIZE // 2)
        document = registers.target_xml()
        chunk = document[offset:offset + length]
        return ("m" if offset + length < len(document) else "l") + chunk

    # --- registers --------------------------------------------------------------------------------
    def _vcpu_state(self, index: int):
        state = self._state.get(index)
        if state is None:
            vcpu = self.vm.vcpus[index]
            state = vcpu.call(lambda v: (v.get_regs(), v.get_sregs(), v.get_fpu()))
            self._state[index] = state
        return state

    def _write_registers(self, updates: list[tuple[int, bytes]]) -> str:
        regs, sregs, fpu = self._vcpu_state(self.current)
        for number, value in updates:
            reg = registers.REGISTERS[number]
            if reg.set is not None and registers.read_one(number, regs, sregs, fpu) != value:
                registers.store(reg, value, regs, fpu)
        self._commit(regs, fpu)
        return "OK"

    def _write_register(self, number: int, value: bytes) -> str:
        if not 0 <= number < len(registers.REGISTERS) or \
                registers.REGISTERS[number].set is None:
            return "E01"
        regs, sregs, fpu = self._vcpu_state(self.current)
        registers.store(registers.REGISTERS[number], value, regs, fpu)
        self._commit(regs, fpu)
        return "OK"

    def _commit(self, regs, fpu) -> None:
        def apply(vcpu):
            vcpu.set_regs(regs)
            vcpu.set_fpu(fpu)
        self.vm.vcpus[self.current].call(apply)

    # --- memory -------------------------------------------------------------------------------------
    def _linear(self, address: int, sregs) -> int:
        """A gdb address as a linear one: as is in 64-bit mode, an offset from CS's base
        outside it (so a real-mode guest linked at 0 matches its ELF symbols)."""
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
                original = self.breakpoints.original(physical + i)
                if original is not None:
                    data[i] = original
            out += data
        return bytes(out)

    def write_memory(self, address: int, data: bytes) -> bool:
        _, sregs, _ = self._vcpu_state(self.current)
        linear = self._linear(address, sregs)
        try:
            for i, byte in enumerate(data):
                physical = self._physical(linear + i, sregs)
                bp = self.breakpoints.soft.get(physical)
                if bp is not None:
                    bp.original = byte   # keep our int3 in place
                else:
                    self.vm.memory.write_u8(physical, byte)
        except (PykvmError, GuestMemoryError):
            return False
        return True

    def _breakpoint(self, insert: bool, kind: str, address: int) -> str:
        _, sregs, _ = self._vcpu_state(self.current)
        linear = self._linear(address, sregs)
        if kind == "0":
            try:
                physical = self._physical(linear, sregs)
            except PykvmError:
                return "E14"
            if insert:
                self.breakpoints.insert_soft(address, linear, physical)
            else:
                self.breakpoints.remove_soft(linear, physical)
            return "OK"
        if kind == "1":
            if insert:
                return "OK" if self.breakpoints.insert_hard(linear) else "E1c"
            self.breakpoints.remove_hard(linear)
            return "OK"
        return ""   # watchpoints: not supported

    # --- running --------------------------------------------------------------------------------
    def _resume(self, step: bool, pc: int | None = None) -> str:
        traps = self.traps
        if pc is not None:
            regs, _, _ = self._vcpu_state(self.step_vcpu)
            regs.rip = pc
            self.vm.vcpus[self.step_vcpu].call(lambda v: v.set_regs(regs))
        while not traps.events.empty():
            traps.events.get_nowait()     # stale stops of other vCPUs: they will hit again
        traps.stepping = {self.step_vcpu} if step else set()
        traps.step_ended.clear()
        for vcpu in self.vm.vcpus:
            control, debugreg = self.breakpoints.guest_debug(vcpu.id in traps.stepping)
            vcpu.call(lambda v, c=control, d=debugreg: v.set_guest_debug(c, d))
        self._state.clear()
        self.vm.resume()
        return self._wait_for_stop()

    def _wait_for_stop(self) -> str:
        while True:
            if self.vm.stop_requested:
                stop = self.vm.stop_reason
                status = stop.status if stop is not None else 0
                log.info("gdb: the VM stopped: %s", stop.message if stop else "")
                return f"W{status & 0xFF:02x}"
            try:
                event = self.traps.events.get(timeout=0.02)
            except queue.Empty:
                if self.conn.recv_byte(timeout=0) != CTRL_C:
                    continue
                self.vm.pause()
                event = StopEvent(self.step_vcpu, SIGINT)
            self.traps.stepping.clear()
            self.last_stop = event
            self.current = self.step_vcpu = event.vcpu_id
            self._state.clear()
            return event.reply()

    def _detach(self) -> None:
        """gdb left: take the breakpoints out and let the guest run on."""
        self.breakpoints.clear()
        self.traps.stepping.clear()
        for vcpu in self.vm.vcpus:
            try:
                vcpu.call(lambda v: v.set_guest_debug(0))
            except PykvmError:
                pass
        self._state.clear()
        log.info("gdb detached; the guest runs on")
        self.vm.resume()
