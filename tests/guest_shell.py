"""Driving the shell of a guest that a pykvm *command* runs, over its serial console:
for tests and benches of the command itself (``pykvm run``, ``pykvm firecracker``:
tests/linux/test_linux_firecracker.py's FirecrackerShell; bench/snapshot.py, bench/memory.py).
Tests that only need a Linux guest use the pytest plugin's ``linux_vm`` / ``linux_vms``
(pykvm/pytest_plugin: one boot and snapshot per configuration, a restore per test, the
guest agent as the driver), not this.

:class:`GuestShell` runs ``python -m pykvm run ...`` with the guest's serial console on
pipes and a control socket (``--api-sock``). :meth:`GuestShell.run` types a command
line and reads back its output and exit status between two markers (a simple
protocol over the console, until the guest has a proper exec channel):

    typed:   echo @@B""7@@; CMD; echo @@E""7@@ $?
    printed: @@B7@@ / CMD's output / @@E7@@ STATUS

The quotes split the markers in the echoed input line, so only the shell's output
matches. Output lines come with the console's CR LF; they are given back with LF.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BOOT_TIMEOUT = 900         # seconds to a shell: minutes on kvm_pvm hosts, seconds elsewhere
COMMAND_TIMEOUT = 300      # one command (a fork+exec is 1.5 s on kvm_pvm, more when busy)
PROMPT = b"# "


class GuestError(AssertionError):
    """The guest did not answer as expected (an AssertionError, so pytest shows it so)."""


class GuestShell:
    """A pykvm process whose guest has a shell on the serial console."""

    def __init__(self, args: list[str], *, api_sock: Path, log: Path | None = None):
        self.api_sock = Path(api_sock)
        if "--restore" in args and not {"--trust-snapshot", "--disk"} & set(args):
            args = [*args, "--trust-snapshot"]    # the tests restore snapshots they took
        self.args = args
        self.started = time.monotonic()
        self._output = bytearray()
        self._cond = threading.Condition()
        self._count = 0
        self.log_path = Path(log) if log else None
        self._stderr_log = open(log, "wb") if log else subprocess.DEVNULL
        env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.process = subprocess.Popen(
            [sys.executable, "-m", "pykvm", "run", *args, "--api-sock", str(self.api_sock)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr_log, env=env,
            cwd=str(REPO))
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    # --- console output -----------------------------------------------------------------
    def _read(self) -> None:
        fd = self.process.stdout.fileno()
        while True:
            try:
                data = os.read(fd, 65536)
            except OSError:
                data = b""
            with self._cond:
                if not data:
                    self._cond.notify_all()
                    return
                self._output += data
                self._cond.notify_all()

    @property
    def output(self) -> bytes:
        with self._cond:
            return bytes(self._output)

    def mark(self) -> int:
        """A position in the output: wait_for() from here on."""
        with self._cond:
            return len(self._output)

    def wait_for(self, pattern: bytes | re.Pattern, timeout: float, start: int = 0):
        """The first match of ``pattern`` (bytes or compiled regex) in the output from
        ``start``; GuestError after ``timeout`` seconds or when pykvm exits."""
        regex = pattern if isinstance(pattern, re.Pattern) else re.compile(re.escape(pattern))
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                found = regex.search(self._output, start)
                if found:
                    return found
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (self.process.poll() is not None
                                      and not self._reader.is_alive()):
                    tail = bytes(self._output[-3000:]).decode(errors="replace")
                    why = "pykvm exited" if self.process.poll() is not None else "timed out"
                    break
                self._cond.wait(min(remaining, 1.0))
        raise GuestError(f"{why} waiting for {regex.pattern!r}{self.post_mortem()}; "
                         f"output so far:\n{tail}")

    def post_mortem(self) -> str:
        """A guest that stopped answering: snapshot it where its log is (or next to the
        socket) and say where it stands (vCPU, serial port), for the error message."""
        if self.process.poll() is not None:
            return ""
        where = (self.log_path or self.api_sock).with_suffix(".hung")
        try:
            self.ctl("snapshot", timeout=120, path=str(where))
            state = json.loads((where / "state.json").read_text())
        except Exception as error:
            return f" (no post-mortem snapshot: {error})"
        vcpus = ", ".join(f"vCPU {v['id']} rip {v['regs']['rip']:#x} rflags "
                          f"{v['regs']['rflags']:#x} mp_state {v['mp_state']}"
                          for v in state["vcpus"])
        serial = state["devices"].get("serial@0x3f8", {})
        keys = ("ier", "mcr", "irq_level", "thr_pending", "rx_fifo", "host_queue", "tx_bytes")
        return (f" (guest snapshotted in {where}: {vcpus}; serial "
                f"{ {k: serial.get(k) for k in keys} }; ioapic irr "
                f"{state['vm']['irqchip']['ioapic']['irr']:#x})")

    def type(self, text: str) -> None:
        self.process.stdin.write(text.encode())
        self.process.stdin.flush()

    # --- the shell ----------------------------------------------------------------------
    def wait_for_shell(self, timeout: float = BOOT_TIMEOUT) -> None:
        self.wait_for(PROMPT, timeout)
        self.run("true", timeout=COMMAND_TIMEOUT)     # the shell reads its input now

    def run(self, command: str, timeout: float = COMMAND_TIMEOUT) -> tuple[str, int]:
        """Run ``command`` in the guest; (its output, its exit status). One line, not
        ending in ``&`` (put a background job in parentheses: ``(job &)``)."""
        self._count += 1
        n = self._count
        start = self.mark()
        self.type(f'echo @@B""{n}@@; {command}; echo @@E""{n}@@ $?\n')
        begin = self.wait_for(f"@@B{n}@@\r\n".encode(), timeout, start)
        end = self.wait_for(re.compile(rb"@@E%d@@ (\d+)\r?\n" % n), timeout, begin.end())
        text = self.output[begin.end():end.start()].decode(errors="replace")
        return text.replace("\r\n", "\n"), int(end.group(1))

    def check(self, command: str, timeout: float = COMMAND_TIMEOUT) -> str:
        """run(), insisting on exit status 0."""
        output, status = self.run(command, timeout)
        if status != 0:
            raise GuestError(f"`{command}` exited with {status}:\n{output}")
        return output

    # --- the control socket -------------------------------------------------------------
    def ctl(self, action: str, timeout: float = 600, **fields) -> dict:
        from pykvm.control import request
        response = request(self.api_sock, {"action": action, **fields}, timeout=timeout)
        if not response.get("ok"):
            raise GuestError(f"control socket {action}: {response.get('error')}")
        return response

    def wait_for_socket(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not self.api_sock.exists():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise GuestError(f"no control socket at {self.api_sock} (pykvm exited "
                                 f"{self.process.poll()})")
            time.sleep(0.05)

    def snapshot(self, directory: Path) -> dict:
        return self.ctl("snapshot", path=str(directory))["snapshot"]

    # --- the end ------------------------------------------------------------------------
    def stop(self, timeout: float = 60) -> int:
        """Stop the VM (control socket, then SIGTERM, then SIGKILL); pykvm's exit status."""
        if self.process.poll() is None:
            try:
                self.ctl("stop", timeout=10)
            except Exception:
                self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._reader.join(timeout=5)
        for stream in (self.process.stdin, self.process.stdout):
            try:
                stream.close()
            except OSError:
                pass
        if self._stderr_log is not subprocess.DEVNULL:
            self._stderr_log.close()
        return self.process.returncode

    def __enter__(self) -> "GuestShell":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
