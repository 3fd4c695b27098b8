"""The ``vm`` fixture's guests: a few instructions assembled with GNU as (or raw
bytes), loaded at 0x10000 and run in real, protected or long mode, with COM1 and
EXIT_PORT predefined; a :class:`FlatResult` holds what the guest left behind.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from pykvm.errors import ConfigError, GuestMemoryError
from pykvm.warm.guest import ConsoleLog

FLAT_MEM = "16M"
# How much guest RAM (from address 0) a FlatResult keeps a copy of: flat guests live in
# their first MiBs, and the bound keeps a `mem="4G"` run from copying gigabytes.
FLAT_RESULT_RAM = 64 << 20

_DIRECTIVES = {"real": ".code16", "protected": ".code32", "long": ".code64"}
_PRELUDE = ".set COM1, 0x3f8\n.set EXIT_PORT, 0xf4\n"


@dataclass
class FlatResult:
    status: int | None          # the byte written to EXIT_PORT; None if the guest did not stop so
    output: bytes               # what the guest sent to the serial port
    stop: object = None         # pykvm.vstate.control.Stop (kind, status, message), None after a timeout
    timed_out: bool = False
    # What the guest left behind, read after it stopped (kvm-hello-world's last step):
    # vCPU 0's registers (KVM_GET_REGS: .rax, .rip, ...) and a copy of the guest RAM from
    # address 0 (up to FLAT_RESULT_RAM), indexed by guest-physical address. None after a
    # timeout.
    regs: object = None
    memory: memoryview | None = field(default=None, repr=False)

    @property
    def text(self) -> str:
        return self.output.decode(errors="replace")

    def read_int(self, address: int, size: int = 8) -> int:
        """The little-endian integer the guest left at ``address`` (``size`` bytes)."""
        if address < 0 or size <= 0 or address + size > len(self.memory):
            raise GuestMemoryError(f"{address:#x}+{size} is outside the {len(self.memory):#x} "
                                   f"bytes of guest RAM kept")
        return int.from_bytes(self.memory[address:address + size], "little")


@dataclass
class FlatVm:
    """Builds and runs small flat guests (the ``vm`` fixture)."""

    device: str
    workdir: Path
    runs: list = field(default_factory=list, repr=False)   # (label, console) of each run

    def assemble(self, source: str, mode: str = "real") -> bytes:
        """GNU as/ld: ``source`` for ``mode`` as a flat binary linked at 0x10000."""
        from pykvm import layout

        if mode not in _DIRECTIVES:
            raise ConfigError(f"mode {mode!r}: one of {', '.join(_DIRECTIVES)}")
        missing = [tool for tool in ("as", "ld") if shutil.which(tool) is None]
        if missing:
            # a missing tool, like a missing guest, is a set-up step to take: a failure
            pytest.fail(f"assembling a guest needs GNU binutils ({', '.join(missing)} "
                        f"missing): apt-get install binutils", pytrace=False)
        with tempfile.TemporaryDirectory(dir=self.workdir) as scratch:
            src, obj, out = (Path(scratch, name) for name in ("g.S", "g.o", "g.bin"))
            src.write_text(f"{_DIRECTIVES[mode]}\n{_PRELUDE}.globl _start\n_start:\n{source}\n")
            bits, emulation = (["--64"], "elf_x86_64") if mode == "long" else (["--32"], "elf_i386")
            for argv in (["as", *bits, "-o", str(obj), str(src)],
                         ["ld", "-m", emulation, f"-Ttext={layout.FLAT_LOAD_ADDR:#x}",
                          "--oformat", "binary", "-o", str(out), str(obj)]):
                done = subprocess.run(argv, capture_output=True, text=True)
                if done.returncode != 0:
                    raise AssertionError(f"{argv[0]} failed:\n{done.stderr}")
            return out.read_bytes()

    def run(self, program: str | bytes, *, mode: str = "real", timeout: float = 10.0,
            input: bytes = b"", mem: str = FLAT_MEM, cpus: int = 1) -> FlatResult:
        """Run ``program`` (assembly source, or the bytes of a flat binary) until it writes
        EXIT_PORT, halts for good, or ``timeout`` seconds pass."""
        import io

        from pykvm.machine import MachineConfig, build_for_boot, parse_size

        image = self.assemble(program, mode) if isinstance(program, str) else bytes(program)
        path = self.workdir / f"flat{len(self.runs)}.bin"
        path.write_bytes(image)
        console = ConsoleLog()
        config = MachineConfig(mem_size=parse_size(mem), cpus=cpus, flat=path, entry=mode,
                               kvm_device=self.device)
        label = f"run {len(self.runs) + 1} ({mode} mode, {len(image)} bytes)"
        self.runs.append((label, console))
        with build_for_boot(config, stdout=console, stderr=console,
                            stdin=io.BytesIO(input) if input else None) as machine:
            stop = machine.run(timeout)
            if stop is None:
                return FlatResult(None, console.getvalue(), None, True)
            # The vCPU threads have ended: their registers and the RAM can be read here.
            regs = machine.vm.vcpus[0].get_regs()
            memory = memoryview(machine.memory.read(
                0, min(machine.memory.regions[0].size, FLAT_RESULT_RAM)))
        status = stop.status if stop.kind == "exit" else None
        return FlatResult(status, console.getvalue(), stop, regs=regs, memory=memory)

    def console_text(self) -> str:
        return "\n".join(f"--- {label} ---\n{console.text()}" for label, console in self.runs)
