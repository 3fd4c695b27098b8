"""pykvm's pytest plugin: virtual machines as fixtures.

Installed with pykvm (the ``pytest11`` entry point ``pykvm``), so any project that
has pykvm installed can use it; ``-p no:pykvm`` turns it off.

Fixtures
--------
``kvm``
    An open :class:`pykvm.kvm.Kvm`. Where KVM cannot be used the test is *skipped*,
    never errored, with the reason: no such device, no permission to open it, or
    another KVM API version. ``--pykvm-device PATH`` (or ``PYKVM_DEVICE``) names
    another device node; every fixture here honours it. ``--pykvm-require`` (or
    ``PYKVM_REQUIRE=1``) makes each of those skips a failure, for CI jobs that
    must not pass without running their VM tests.
``vm``
    :class:`FlatVm`, for tutorial-class guests: a few instructions assembled with GNU
    as (or raw bytes), loaded at 0x10000 and run in real, protected or long mode::

        def test_hello(vm):
            result = vm.run('''
                mov $COM1, %dx
                mov $'H', %al
                out %al, %dx
                mov $7, %al
                out %al, $EXIT_PORT ''')          # mode="real" (default), "protected", "long"
            assert result.output == b"H" and result.status == 7

    ``COM1`` (0x3f8, the serial port: its output is ``result.output``) and
    ``EXIT_PORT`` (0xf4: the byte written there stops the guest and is
    ``result.status``) are predefined.
``linux_vm``
    :class:`LinuxVm`: the default Linux guest (``pykvm guest build``; or
    ``--pykvm-kernel``/``--pykvm-initrd``) running, with the guest agent:
    ``linux_vm.exec("uname -r")`` returns ``Result(status, stdout, stderr)``; also
    ``put_file``, ``get_file``, ``copy_in``, ``copy_out`` (pykvm/agent.py).
    Where KVM works but there is no guest (not built, no ``--pykvm-kernel``), the
    test *fails*, naming ``pykvm guest build``: that is a set-up step that was
    missed, not a host that cannot run VMs.

    A Linux boot takes minutes where guest ring 0 is emulated (kvm_pvm) and seconds
    on VT-x/AMD-V; so the plugin boots each distinct machine once, snapshots it with
    its agent answering (pykvm/snapshot), and gives every test a fresh guest restored
    from that snapshot (about a second): tests cannot see each other's changes. The
    snapshots are kept between sessions in ``--pykvm-snapshots DIR`` (default
    ``${PYKVM_CACHE:-~/.cache/pykvm}/snapshots``; ``none``: only for this session),
    under a key over the kernel, the initramfs, the machine's configuration, the
    host's kind of KVM and pykvm's own source, so a change to any of them boots
    again (pykvm/warm: the code ``pykvm run -- CMD``'s boot cache uses too).
    Where a snapshot cannot be taken, the booted guest is shared by the
    session's tests instead. A machine with a ``pykvm_disk`` or ``pykvm_net`` is
    booted afresh for each test (a restore would meet a changed disk or a TAP
    that no longer exists).

Markers that configure ``linux_vm``
-----------------------------------
``@pytest.mark.pykvm_cpus(2)``, ``@pytest.mark.pykvm_mem("512M")`` (default 256M),
``@pytest.mark.pykvm_disk(path, read_only=False, serial="")`` (repeatable),
``@pytest.mark.pykvm_net("tap=NAME,...")`` (repeatable; ``pykvm run --net``'s
syntax: ``pykvm_net("user")`` or ``pykvm_net("user,fwd=tcp:8080:80")`` gives the
guest a network with no root, through passt, configured by DHCP at boot;
``--pykvm-net user`` or ``PYKVM_NET=user`` gives one to every machine without the marker), ``@pytest.mark.pykvm_share(directory)`` (repeatable; read-only at
/mnt/share, /mnt/share1, ...).

Failing tests
-------------
A test that fails while it uses ``vm`` or ``linux_vm`` gets the guest's console
output attached to its report (a ``pykvm console: ...`` section, printed under
the failure), with the tail of the boot log for a restored Linux guest.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from pykvm.warm.guest import ConsoleLog, GuestSpec, RunningGuest

DEFAULT_LINUX_MEM = "256M"
DEFAULT_BOOT_TIMEOUT = 900.0
REPORT_TAIL = 16 * 1024           # console bytes a failure report shows
BOOT_LOG_TAIL = 4 * 1024          # ... and of a restored guest's boot log
FLAT_MEM = "16M"
# How much guest RAM (from address 0) a FlatResult keeps a copy of: flat guests live in
# their first MiBs, and the bound keeps a `mem="4G"` run from copying gigabytes.
FLAT_RESULT_RAM = 64 << 20
SNAPSHOTS_KEPT = 6

MARKERS = (
    "pykvm_cpus(n): vCPUs of the linux_vm guest",
    "pykvm_mem(size): RAM of the linux_vm guest, e.g. '512M' (default 256M)",
    "pykvm_disk(path, read_only=False, serial=''): a virtio-blk disk for linux_vm (repeatable)",
    "pykvm_net(spec): a virtio-net NIC for linux_vm, as pykvm run --net (repeatable)",
    "pykvm_share(directory): a host directory read-only at /mnt/share in linux_vm (repeatable)",
)

_CONSOLES = pytest.StashKey[list]()
_STATE = pytest.StashKey["_Session"]()


# --- options and configuration --------------------------------------------------------------------
def pytest_addoption(parser) -> None:
    group = parser.getgroup("pykvm", "pykvm virtual machines")
    group.addoption("--pykvm-device", metavar="PATH", default=None,
                    help="the KVM device node (default $PYKVM_DEVICE or /dev/kvm); tests that "
                         "need KVM are skipped when it cannot be used")
    group.addoption("--pykvm-require", action="store_true", default=None,
                    help="fail, instead of skipping, the tests that need KVM where it cannot "
                         "be used ($PYKVM_REQUIRE=1)")
    group.addoption("--pykvm-kernel", metavar="PATH", default=None,
                    help="the Linux kernel of linux_vm (default: the guest `pykvm guest build` "
                         "built; $PYKVM_KERNEL)")
    group.addoption("--pykvm-initrd", metavar="PATH", default=None,
                    help="its initramfs (default: the default guest's, whose /init starts the "
                         "agent, also with --pykvm-kernel; $PYKVM_INITRD)")
    group.addoption("--pykvm-append", metavar="WORDS", default=None,
                    help="extra kernel command line for linux_vm ($PYKVM_APPEND)")
    group.addoption("--pykvm-net", metavar="SPEC", default=None,
                    help="a NIC for every linux_vm without a pykvm_net marker, as pykvm run "
                         "--net SPEC: 'user' gives it a network with no root ($PYKVM_NET)")
    group.addoption("--pykvm-snapshots", metavar="DIR", default=None,
                    help="where booted linux_vm guests are kept as snapshots between sessions "
                         "(default $PYKVM_SNAPSHOTS or ~/.cache/pykvm/snapshots; 'none': "
                         "for this session only)")
    group.addoption("--pykvm-boot-timeout", metavar="SECONDS", type=float, default=None,
                    help=f"how long a linux_vm boot may take (default {DEFAULT_BOOT_TIMEOUT:g})")


def pytest_configure(config) -> None:
    for line in MARKERS:
        config.addinivalue_line("markers", line)
    config.stash[_STATE] = _Session(config)


def pytest_unconfigure(config) -> None:
    state = config.stash.get(_STATE, None)
    if state is not None:
        state.close()


def _option(config, name: str, env: str):
    value = config.getoption(name, default=None)
    return value if value is not None else (os.environ.get(env) or None)


def _required(config) -> bool:
    """--pykvm-require, or PYKVM_REQUIRE set to anything but 0/no/false/off."""
    value = _option(config, "pykvm_require", "PYKVM_REQUIRE")
    return value is True or (isinstance(value, str)
                              and value.strip().lower() not in ("0", "no", "false", "off"))


def _cannot_run(config, reason: str) -> None:
    """Skip the test for ``reason`` (something this host lacks), or fail it under
    --pykvm-require: a CI job that needs its VM tests must not pass without them."""
    if _required(config):
        pytest.fail(f"{reason} (--pykvm-require / PYKVM_REQUIRE turns this skip into a "
                    f"failure)", pytrace=False)
    pytest.skip(reason)


# --- failure reports ------------------------------------------------------------------------------------
@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if not report.failed or report.when not in ("setup", "call"):
        return
    for name, source in item.stash.get(_CONSOLES, []):
        try:
            text = source()
        except Exception as error:           # a report must not fail
            text = f"(console log unavailable: {type(error).__name__}: {error})"
        report.sections.append((f"pykvm console: {name}", text or "(the guest printed nothing)"))


def _attach_console(request, name: str, source) -> None:
    consoles = request.node.stash.setdefault(_CONSOLES, [])
    consoles.append((name, source))


# --- kvm -----------------------------------------------------------------------------------------------------
def _device(config) -> str:
    from pykvm.kvm import DEFAULT_DEVICE
    return _option(config, "pykvm_device", "PYKVM_DEVICE") or DEFAULT_DEVICE


def kvm_unavailable_reason(device: str) -> str | None:
    """Why ``device`` cannot run pykvm's guests, or None when it can."""
    from pykvm.errors import KvmUnavailable
    from pykvm.kvm import Kvm

    try:
        Kvm(device).close()
    except KvmUnavailable as error:
        return str(error)
    return None


@pytest.fixture(scope="session")
def pykvm_device(pytestconfig) -> str:
    """The KVM device path; skips the test when KVM cannot be used through it (fails it
    under --pykvm-require)."""
    state = pytestconfig.stash[_STATE]
    device = _device(pytestconfig)
    reason = state.unavailable(device)
    if reason is not None:
        _cannot_run(pytestconfig, f"KVM is not usable: {reason}")
    return device


@pytest.fixture
def kvm(pykvm_device):
    """An open pykvm.kvm.Kvm (skipped, with the reason, where KVM cannot be used)."""
    from pykvm.kvm import Kvm

    with Kvm(pykvm_device) as handle:
        yield handle


# --- vm: flat guests ----------------------------------------------------------------------------------------------
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
            raise ValueError(f"{address:#x}+{size} is outside the {len(self.memory):#x} bytes "
                             f"of guest RAM kept")
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
            raise ValueError(f"mode {mode!r}: one of {', '.join(_DIRECTIVES)}")
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


@pytest.fixture
def vm(request, pykvm_device, tmp_path) -> FlatVm:
    """Flat guests from assembly or bytes: ``vm.run(source, mode=...)`` -> FlatResult."""
    helper = FlatVm(pykvm_device, tmp_path)
    _attach_console(request, "vm", helper.console_text)
    return helper


# --- linux_vm --------------------------------------------------------------------------------------------------
class LinuxVm(RunningGuest):
    """A running Linux guest with its agent (the ``linux_vm`` fixture; pykvm/warm/guest.py
    boots and restores it)."""

    def __init__(self, machine, console: ConsoleLog, origin: str = "booted for this test",
                 boot_log: str = ""):
        self.origin = origin            # "booted", "restored from DIR" or "shared ..."
        self.boot_log = boot_log
        super().__init__(machine, console)

    # the agent
    def exec(self, command, timeout: float | None = 600.0, **options):
        """Run ``command`` in the guest: see pykvm.agent.AgentClient.exec."""
        return self.machine.exec(command, timeout=timeout, **options)

    def put_file(self, guest_path: str, data: bytes, mode: int = 0o644) -> None:
        self.machine.put_file(guest_path, data, mode)

    def get_file(self, guest_path: str) -> bytes:
        return self.machine.get_file(guest_path)

    def copy_in(self, host_path, guest_path: str) -> None:
        self.machine.copy_in(host_path, guest_path)

    def copy_out(self, guest_path: str, host_path) -> None:
        self.machine.copy_out(guest_path, host_path)

    def console_text(self) -> str:
        parts = [f"(guest {self.origin})"]
        if self.boot_log:
            parts.append(f"--- boot log (tail) ---\n{self.boot_log[-BOOT_LOG_TAIL:]}")
        parts.append(f"--- console during the test ---\n{self.console.text(REPORT_TAIL)}")
        return "\n".join(parts)


def _linux_spec(request) -> GuestSpec:
    from pykvm.devices.virtio import DiskSpec
    from pykvm.machine import default_guest_dir, parse_size

    config = request.config
    kernel = _option(config, "pykvm_kernel", "PYKVM_KERNEL")
    initrd = _option(config, "pykvm_initrd", "PYKVM_INITRD")
    directory = default_guest_dir()
    if kernel is None:
        if directory is None:
            # KVM works (pykvm_device came first): this is a missed set-up step, not a host
            # that cannot run guests, so it fails rather than skips
            pytest.fail("no Linux guest for linux_vm: the default guest is not built; run "
                        "`pykvm guest build` (or pass --pykvm-kernel PATH)", pytrace=False)
        kernel = str(directory / "vmlinux" if (directory / "vmlinux").exists()
                     else directory / "bzImage")
    if initrd is None and directory is not None and (directory / "initramfs.cpio").exists():
        initrd = str(directory / "initramfs.cpio")     # its /init starts the agent
    node = request.node

    def last(name, default):
        marker = node.get_closest_marker(name)
        return marker.args[0] if marker is not None and marker.args else default

    disks = []
    for marker in node.iter_markers("pykvm_disk"):
        if not marker.args:
            raise pytest.UsageError("pykvm_disk needs the image path")
        disks.append(DiskSpec(str(Path(marker.args[0]).absolute()),
                              read_only=bool(marker.kwargs.get("read_only", False)),
                              serial=str(marker.kwargs.get("serial", ""))))
    nets = []
    for marker in node.iter_markers("pykvm_net"):
        from pykvm.net.plumbing import NetSpec
        nets.append(NetSpec.parse(str(marker.args[0])))
    if not nets and _option(config, "pykvm_net", "PYKVM_NET"):
        from pykvm.net.plumbing import NetSpec
        nets.append(NetSpec.parse(_option(config, "pykvm_net", "PYKVM_NET")))
    shares = [str(Path(marker.args[0]).absolute()) for marker in node.iter_markers("pykvm_share")]
    return GuestSpec(kernel=str(Path(kernel).absolute()),
                      initrd=str(Path(initrd).absolute()) if initrd else None,
                      append=_option(config, "pykvm_append", "PYKVM_APPEND") or "",
                      mem=parse_size(str(last("pykvm_mem", DEFAULT_LINUX_MEM))),
                      cpus=int(last("pykvm_cpus", 1)), disks=tuple(disks), nets=tuple(nets),
                      shares=tuple(reversed(shares)))


@pytest.fixture
def linux_vm(request, pykvm_device):
    """The Linux guest, running, its agent answering: ``linux_vm.exec(cmd)``."""
    spec = _linux_spec(request)
    state = request.config.stash[_STATE]
    guest = state.linux_vm(spec, pykvm_device)
    _attach_console(request, "linux_vm", guest.console_text)
    try:
        yield guest
    finally:
        state.release(guest)


# --- the session: booted guests and their snapshots -------------------------------------------------------------
def default_snapshot_root() -> Path:
    """Where snapshots of booted guests are kept between sessions by default."""
    cache = os.environ.get("PYKVM_CACHE") or Path.home() / ".cache" / "pykvm"
    return Path(cache) / "snapshots"


class _Session:
    """What the plugin keeps for one pytest session."""

    def __init__(self, config):
        self.config = config
        self._reasons: dict[str, str | None] = {}
        self._snapshots: dict[str, Path] = {}
        self._shared: dict[str, LinuxVm] = {}
        self._tmp: Path | None = None

    def unavailable(self, device: str) -> str | None:
        if device not in self._reasons:
            self._reasons[device] = kvm_unavailable_reason(device)
        return self._reasons[device]

    @property
    def boot_timeout(self) -> float:
        value = self.config.getoption("pykvm_boot_timeout", default=None)
        return float(value) if value else DEFAULT_BOOT_TIMEOUT

    def tmp(self) -> Path:
        if self._tmp is None:
            self._tmp = Path(tempfile.mkdtemp(prefix="pykvm-pytest-"))
        return self._tmp

    def snapshot_root(self) -> Path:
        chosen = _option(self.config, "pykvm_snapshots", "PYKVM_SNAPSHOTS")
        if chosen and chosen.lower() == "none":
            return self.tmp() / "snapshots"
        return Path(chosen) if chosen else default_snapshot_root()

    def cache(self):
        """The snapshots, kept like `pykvm run`'s boot cache (pykvm/warm/cache.py): the
        SNAPSHOTS_KEPT most recently used."""
        from pykvm.warm.cache import BootCache

        return BootCache(self.snapshot_root(), cap=None, max_entries=SNAPSHOTS_KEPT)

    # --- giving a test its guest ---------------------------------------------------------------------
    def linux_vm(self, spec: GuestSpec, device: str) -> LinuxVm:
        if not spec.restorable:
            return self._boot(spec, device)
        key = spec.key(device)
        if key in self._shared:
            return self._shared[key]
        snapshot = self._snapshots.get(key) or self.cache().lookup(key)
        if snapshot is not None:
            guest = self._try_restore(key, snapshot, device)
            if guest is not None:
                return guest
        booted = self._boot(spec, device)
        snapshot = self._take_snapshot(booted, spec, key)
        guest = self._try_restore(key, snapshot, device) if snapshot is not None else None
        if guest is None:               # no snapshots here: the booted guest serves the session
            booted.origin = "booted once for the session (no snapshot could be used)"
            self._shared[key] = booted
            return booted
        booted.close()
        return guest

    def _try_restore(self, key: str, snapshot: Path, device: str) -> LinuxVm | None:
        from pykvm.errors import PykvmError

        try:
            guest = self._restore(snapshot, device)
        except PykvmError as error:
            warnings.warn(pytest.PytestWarning(f"pykvm: cannot restore {snapshot}: {error}; "
                                               f"booting instead"))
            self._snapshots.pop(key, None)
            self.cache().drop(snapshot)
            return None
        self._snapshots[key] = snapshot
        return guest

    def release(self, guest: LinuxVm) -> None:
        if guest not in self._shared.values():
            guest.close()

    def _boot(self, spec: GuestSpec, device: str) -> LinuxVm:
        from pykvm.warm.guest import boot_guest

        console = ConsoleLog()
        try:
            return boot_guest(spec, device, console, self.boot_timeout, factory=LinuxVm)
        except BaseException as error:
            tail = console.text(4096)
            raise RuntimeError(f"the Linux guest's agent did not answer: {error}\n"
                               f"--- console (tail) ---\n{tail}") from None

    def _take_snapshot(self, guest: LinuxVm, spec: GuestSpec, key: str) -> Path | None:
        from pykvm.errors import PykvmError

        try:
            return self.cache().store(guest.machine, key, spec.describe(),
                                      guest.console.getvalue())
        except (PykvmError, OSError) as error:
            warnings.warn(pytest.PytestWarning(f"pykvm: no snapshot of the booted guest "
                                               f"({error}); its tests share one guest"))
            return None

    def _restore(self, snapshot: Path, device: str) -> LinuxVm:
        from pykvm.warm.cache import BOOT_LOG
        from pykvm.warm.guest import restore_guest

        # the plugin took this snapshot itself (its shares are the spec's own): trusted
        guest = restore_guest(snapshot, device, ConsoleLog(), factory=LinuxVm)
        guest.origin = f"restored from {snapshot}"
        boot_log = snapshot / BOOT_LOG
        if boot_log.exists():
            guest.boot_log = boot_log.read_bytes().decode(errors="replace")
        self.cache().touch(snapshot)    # recently used: kept by the eviction
        return guest

    def close(self) -> None:
        for guest in self._shared.values():
            guest.close()
        self._shared.clear()
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
