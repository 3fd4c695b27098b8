"""VM life cycle with real KVM: resource hygiene over many create/run/destroy
cycles, devices flushed and closed on the way out, and SMP start-up through the
in-kernel LAPIC (INIT/SIPI) with flat guests, no Linux needed."""

import gc
import io
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from pykvm import ioctl as k
from pykvm import layout
from pykvm.boot.modes import set_mode
from pykvm.bus import Device
from pykvm.devices.virtio.fs import FsSpec
from pykvm.machine import MachineConfig, build_for_boot
from pykvm.machine.config import DiskSpec
from pykvm.memory import GuestMemory
from pykvm.vstate.vm import State, Vm

from ..asm import assemble
from ..ports import ExitPort
from .test_core import resume_run, start_run_pause, stop_and_join

CYCLES = 100


# --- resource hygiene ---------------------------------------------------------------------
def open_fds() -> int:
    return len(fd_targets())


def fd_targets() -> list[str]:
    targets = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            targets.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            pass    # the listing's own descriptor, closed by now
    return sorted(targets)


def mappings() -> int:
    with open("/proc/self/maps") as maps:
        return sum(1 for _ in maps)


def settled_thread_count(expected: int, timeout: float = 3.0) -> int:
    """Threads that end on their own once a VM stops (helper threads watching it) get
    a moment to do so."""
    deadline = time.monotonic() + timeout
    while threading.active_count() > expected and time.monotonic() < deadline:
        time.sleep(0.02)
    return threading.active_count()


@pytest.fixture(scope="module")
def hello_guest(tmp_path_factory):
    """A flat real-mode guest: 'ok' on the serial port, then exit status 0 on the exit port."""
    code = assemble(f"""
        mov $0x3f8, %dx
        mov $'o', %al
        out %al, %dx
        mov $'k', %al
        out %al, %dx
        mov ${layout.EXIT_PORT:#x}, %dx
        xor %al, %al
        out %al, %dx
    1:  hlt
        jmp 1b""")
    path = tmp_path_factory.mktemp("guest") / "hello.bin"
    path.write_bytes(code)
    return path


def one_cycle(path, cpus: int) -> None:
    out, err = io.BytesIO(), io.BytesIO()
    config = MachineConfig(flat=path, mem_size=layout.MIN_MEM_SIZE + 0x10000, cpus=cpus)
    with build_for_boot(config, stdout=out, stderr=err) as machine:
        stop = machine.run(timeout=30)
        assert (stop.kind, stop.status) == ("exit", 0), stop
        assert machine.vm.state is State.STOPPED
    assert out.getvalue() == b"ok", (out.getvalue(), err.getvalue())


def test_create_run_destroy_cycles_leak_nothing(kvm, hello_guest):
    one_cycle(hello_guest, 2)           # warm-up: imports, caches, the kick handler
    gc.collect()                        # what earlier tests left for the collector goes now
    fds, maps, threads = fd_targets(), mappings(), settled_thread_count(1)
    names = sorted(thread.name for thread in threading.enumerate())
    for i in range(CYCLES):
        one_cycle(hello_guest, 1 + i % 2)   # 1 and 2 vCPUs (an AP that never starts)
    # No growth. (Fewer is fine: a thread or fd an earlier test left may end meanwhile.)
    assert open_fds() <= len(fds), (fds, fd_targets())
    assert settled_thread_count(threads) <= threads, \
        (names, sorted(thread.name for thread in threading.enumerate()))
    # A leaked guest RAM, kvm_run page or thread stack is one mapping or more per cycle;
    # the Python allocator may map an arena or two of its own over 100 cycles.
    assert mappings() <= maps + CYCLES // 20, (maps, mappings())


# --- a live share: virtiofsd, its socket and directory, memfd RAM (issue #16 item 6) ---------
VIRTIOFSD = "/usr/lib/qemu/virtiofsd"
SHARE_CYCLES = 20       # each starts and stops a real virtiofsd (0.1-0.2 s, more under load)
needs_virtiofsd = pytest.mark.skipif(not os.access(VIRTIOFSD, os.X_OK),
                                     reason="virtiofsd missing (apt-get install qemu-system-common)")

# A flat guest with a live share: MachineConfig refuses it (a flat guest cannot mount it), but
# the machine starts, hands over and stops the share's virtiofsd exactly as for Linux. The
# in-process tests use FlatWithLiveShare; the subprocess tests run the real CLI with this one
# rule lifted (LIFT_FLAT_SHARE_RULE).
_validate = MachineConfig.validate


def validate_allowing_live_shares(config: MachineConfig) -> None:
    shares, config.live_shares = config.live_shares, []
    try:
        _validate(config)
    finally:
        config.live_shares = shares


class FlatWithLiveShare(MachineConfig):
    validate = validate_allowing_live_shares


LIFT_FLAT_SHARE_RULE = """
import sys
from pykvm.cli import main
from pykvm.machine import MachineConfig
from tests.kvm.test_lifecycle import validate_allowing_live_shares
MachineConfig.validate = validate_allowing_live_shares
sys.exit(main(sys.argv[1:]))
"""


def processes_serving(directory, program: bytes = b"virtiofsd") -> set[int]:
    """Live (not zombie) processes whose command line names ``directory`` and
    ``program``: virtiofsd serving it (and its sandboxed child), wherever they were
    reparented; qemu-storage-daemon with its socket there."""
    needle = str(directory).encode()
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
            with open(f"/proc/{entry}/stat", "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0]
        except OSError:
            continue        # gone meanwhile
        if needle in cmdline and program in cmdline and state != b"Z":
            found.add(int(entry))
    return found


def children(of: int | None = None) -> set[int]:
    """The children of ``of`` (this process), zombies included (an unreaped daemon is a
    leak too)."""
    parent, found = str(of or os.getpid()).encode(), set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    if f.read().rsplit(b")", 1)[1].split()[1] == parent:
                        found.add(int(entry))
            except OSError:
                pass
    return found


def alive(pids) -> set[int]:
    return {pid for pid in pids if os.path.exists(f"/proc/{pid}")}


def vhost_directories(root=None) -> set[str]:
    return {str(p) for p in Path(root or tempfile.gettempdir()).glob("pykvm-vhost-*")}


def memfds() -> list[str]:
    return [target for target in fd_targets() if target.startswith("/memfd:")]


def one_share_cycle(path, share, read_only: bool) -> set[int]:
    """A flat guest with a live share of ``share``: the pids of its virtiofsd (pykvm's
    child) and of that daemon's own sandboxed children."""
    config = FlatWithLiveShare(flat=path, mem_size=layout.MIN_MEM_SIZE + 0x10000,
                               live_shares=[FsSpec("cycle", source=str(share),
                                                   read_only=read_only)])
    out, err = io.BytesIO(), io.BytesIO()
    before = children()
    with build_for_boot(config, stdout=out, stderr=err) as machine:
        assert machine.memory.shareable and len(memfds()) >= 1      # RAM is a memfd
        daemons = children() - before
        assert len(daemons) == 1, "no virtiofsd child while the VM lives"
        daemons |= {pid for daemon in daemons for pid in children(daemon)}
        stop = machine.run(timeout=30)
        assert (stop.kind, stop.status) == ("exit", 0), (stop, err.getvalue())
    assert out.getvalue() == b"ok", (out.getvalue(), err.getvalue())
    return daemons


@needs_virtiofsd
def test_cycles_with_a_live_share_leak_no_daemon_socket_or_memfd(kvm, hello_guest, tmp_path):
    """SHARE_CYCLES (not 100: every cycle starts a real virtiofsd) create/run/destroy cycles
    of a machine with memfd RAM and a live share, read-write and read-only (virtiofsd under
    unshare) in turn: after each close no virtiofsd of it lives or is left unreaped, no
    private directory or socket is left in the temp directory, no memfd is open; at the end
    fds, threads and mappings are back."""
    share = tmp_path / "share"
    share.mkdir()
    one_share_cycle(hello_guest, share, False)      # warm-up: imports, caches
    gc.collect()
    fds, maps, threads = fd_targets(), mappings(), settled_thread_count(1)
    kids, directories = children(), vhost_directories()
    assert not memfds(), memfds()
    for i in range(SHARE_CYCLES):
        daemons = one_share_cycle(hello_guest, share, read_only=bool(i % 2))
        assert not alive(daemons), "a virtiofsd outlived its VM (or is left unreaped)"
        assert children() <= kids
        assert vhost_directories() <= directories, vhost_directories() - directories
        assert not memfds(), memfds()
    assert not processes_serving(share)
    assert open_fds() <= len(fds), (fds, fd_targets())
    assert settled_thread_count(threads) <= threads, threading.enumerate()
    assert mappings() <= maps + 2, (maps, mappings())


SPIN_GUEST = b"\xeb\xfe"                          # jmp $
CRASH_GUEST = b"\x0f\x0b"                         # ud2 in long mode without an IDT: triple fault


class ShareWatcher:
    """Collects, on a thread, the pids of every virtiofsd serving ``share`` while the
    block runs (a flat guest ends within a second: it looks while it runs)."""

    def __init__(self, share, program: bytes = b"virtiofsd"):
        self.share, self.program, self.seen = share, program, set()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch)

    def _watch(self) -> None:
        while not self._done.is_set():
            self.seen.update(processes_serving(self.share, self.program))
            time.sleep(0.002)

    def __enter__(self) -> "ShareWatcher":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()


def finish(process: subprocess.Popen, terminate_when=None) -> bytes:
    """Wait for ``process`` to end (SIGTERM once ``terminate_when()`` holds, if given);
    its stderr. It is killed if it does not end."""
    try:
        if terminate_when is not None:
            deadline = time.monotonic() + 60
            while not terminate_when() and process.poll() is None \
                    and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(0.3)                 # into the guest's run
            process.send_signal(signal.SIGTERM)
        return process.communicate(timeout=60)[1]
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.fixture
def private_tmp():
    """A TMPDIR of pykvm's own with a short path: the daemons' sockets are made in it,
    and a Unix socket's path is at most 107 bytes (a tmp_path under pytest-xdist, with
    these tests' long names, is longer: virtiofsd refused it, 'Socket path too long')."""
    directory = Path(tempfile.mkdtemp(prefix="pykvm-t-"))
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


@needs_virtiofsd
@pytest.mark.parametrize("how", ["exit", "sigterm", "crash"])
def test_cli_stops_the_share_daemon_on_every_exit_path(kvm, hello_guest, tmp_path, private_tmp,
                                                       how):
    """`pykvm run --flat ... --share DIR` ends normally, by SIGTERM, or by a guest triple
    fault: afterwards nothing serves DIR (the daemon was seen while it ran) and pykvm's
    private temp directory (TMPDIR) is empty: no socket, log or directory left."""
    share = tmp_path / "share"
    share.mkdir()
    guest = tmp_path / "guest.bin"
    guest.write_bytes({"exit": hello_guest.read_bytes(), "sigterm": SPIN_GUEST,
                       "crash": CRASH_GUEST}[how])
    extra = ["--entry", "long"] if how == "crash" else []
    with ShareWatcher(share) as watcher:
        process = subprocess.Popen(
            [sys.executable, "-c", LIFT_FLAT_SHARE_RULE, "run", "--flat", str(guest), *extra,
             "--share", str(share)],
            cwd=Path(__file__).resolve().parents[2],
            env={**os.environ, "TMPDIR": str(private_tmp)},
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        err = finish(process, terminate_when=(lambda: watcher.seen) if how == "sigterm" else None)
    seen = watcher.seen
    expected = {"exit": 0, "sigterm": 128 + signal.SIGTERM, "crash": 3}[how]
    assert process.returncode == expected, err
    assert b"Traceback" not in err, err
    if how == "crash":
        assert b"triple fault" in err, err
    assert seen, "pykvm started no virtiofsd"
    assert not alive(seen), "a virtiofsd outlived pykvm (or is left for init to reap)"
    assert not list(private_tmp.iterdir()), list(private_tmp.iterdir())


# --- a vhost-user-blk disk: qemu-storage-daemon (issue #16 items 5 and 6) --------------------
QSD = "/usr/bin/qemu-storage-daemon"
DISK_CYCLES = 10        # each starts and stops a real qemu-storage-daemon
needs_qsd = pytest.mark.skipif(not os.access(QSD, os.X_OK) or not shutil.which("qemu-img"),
                               reason="qemu-storage-daemon or qemu-img missing (apt-get install "
                                      "qemu-system-common qemu-utils)")


@pytest.fixture
def qcow2_image(tmp_path):
    image = tmp_path / "disk.img"           # a qcow2 image by content, not by name
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "16M"], check=True)
    return image


def one_disk_cycle(path, image, read_only: bool) -> set[int]:
    """A flat guest with ``image`` as a vhost-user-blk disk: the pid of its daemon."""
    config = MachineConfig(flat=path, mem_size=layout.MIN_MEM_SIZE + 0x10000,
                           disks=[DiskSpec.parse(f"{image}{',ro' if read_only else ''}")])
    out, err = io.BytesIO(), io.BytesIO()
    before = children()
    with build_for_boot(config, stdout=out, stderr=err) as machine:
        daemons = children() - before
        assert len(daemons) == 1, "no qemu-storage-daemon child while the VM lives"
        stop = machine.run(timeout=30)
        assert (stop.kind, stop.status) == ("exit", 0), (stop, err.getvalue())
    assert out.getvalue() == b"ok", (out.getvalue(), err.getvalue())
    return daemons


@needs_qsd
def test_cycles_with_a_vhost_user_disk_leak_no_daemon_socket_lock_or_memfd(kvm, hello_guest,
                                                                           qcow2_image):
    """DISK_CYCLES create/run/destroy cycles of a machine with a qcow2 disk (read-write and
    read-only in turn): after each close its qemu-storage-daemon is gone and reaped, no
    private directory is left, no memfd is open, the image is unlocked; at the end fds,
    threads and mappings are back and the image is consistent."""
    from pykvm.devices.virtio.blk import open_image
    one_disk_cycle(hello_guest, qcow2_image, False)          # warm-up: imports, caches
    gc.collect()
    fds, maps, threads = fd_targets(), mappings(), settled_thread_count(1)
    kids, directories = children(), vhost_directories()
    for i in range(DISK_CYCLES):
        daemons = one_disk_cycle(hello_guest, qcow2_image, read_only=bool(i % 2))
        assert not alive(daemons), "a qemu-storage-daemon outlived its VM (or is left unreaped)"
        assert children() <= kids
        assert vhost_directories() <= directories, vhost_directories() - directories
        assert not memfds(), memfds()
    fd, _ = open_image(str(qcow2_image), False, sized=False)    # no lock left behind
    os.close(fd)
    assert open_fds() <= len(fds), (fds, fd_targets())
    assert settled_thread_count(threads) <= threads, threading.enumerate()
    assert mappings() <= maps + 2, (maps, mappings())
    subprocess.run(["qemu-img", "check", "-q", str(qcow2_image)], check=True)


@needs_qsd
@pytest.mark.parametrize("how", ["exit", "sigterm", "crash", "vmm-error"])
def test_cli_stops_the_disk_daemon_on_every_exit_path(kvm, hello_guest, qcow2_image, tmp_path,
                                                      private_tmp, how):
    """`pykvm run --flat ... --disk IMG` (a qcow2 image) ends normally, by SIGTERM, by a
    guest triple fault, or by a VMM error after its daemon started (the same image again as
    a second --disk: locked by the first): afterwards no qemu-storage-daemon of it lives (it was seen while pykvm
    ran) and pykvm's private temp directory (TMPDIR) is empty."""
    guest = tmp_path / "guest.bin"
    guest.write_bytes({"exit": hello_guest.read_bytes(), "sigterm": SPIN_GUEST,
                       "crash": CRASH_GUEST, "vmm-error": hello_guest.read_bytes()}[how])
    extra = ["--entry", "long"] if how == "crash" else []
    if how == "vmm-error":
        extra += ["--disk", str(qcow2_image)]
    with ShareWatcher(private_tmp, b"qemu-storage-daemon") as watcher:
        process = subprocess.Popen(
            [sys.executable, "-m", "pykvm", "run", "--flat", str(guest), "--disk",
             str(qcow2_image), *extra],
            cwd=Path(__file__).resolve().parents[2],
            env={**os.environ, "TMPDIR": str(private_tmp)},
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        err = finish(process, terminate_when=(lambda: watcher.seen) if how == "sigterm" else None)
    seen = watcher.seen
    expected = {"exit": 0, "sigterm": 128 + signal.SIGTERM, "crash": 3, "vmm-error": 2}[how]
    assert process.returncode == expected, err
    assert b"Traceback" not in err, err
    if how == "crash":
        assert b"triple fault" in err, err
    if how == "vmm-error":
        assert b"locked" in err and len(err.strip().splitlines()) == 1, err
    else:
        assert seen, "pykvm started no qemu-storage-daemon"
    assert not alive(seen), "a qemu-storage-daemon outlived pykvm"
    assert not processes_serving(private_tmp, b"qemu-storage-daemon")     # even one unseen
    assert not list(private_tmp.iterdir()), list(private_tmp.iterdir())


def test_a_closed_vm_with_msi_routes_is_freed(kvm):
    """A VM's GSI routing table (the value of its entry in interrupts.gsi_routing's
    WeakKeyDictionary) once held the VM strongly: every VM with MSI-X stayed alive -- its
    guest RAM mapped, the memfd open -- until the process ended."""
    import weakref
    from pykvm.interrupts import gsi_routing
    memory = GuestMemory.anonymous(2 << 20)
    vm = Vm(kvm, memory)
    gsi_routing(vm)
    vm.close()
    memory.close()
    alive_vm = weakref.ref(vm)
    del vm
    gc.collect()
    assert alive_vm() is None


def test_vm_close_releases_everything_even_never_started(kvm):
    fds, maps = open_fds(), mappings()
    for _ in range(10):
        with GuestMemory.anonymous(2 << 20) as memory, Vm(kvm, memory) as vm:
            vm.create_vcpus(3)
    assert (open_fds(), mappings()) == (fds, maps)


class Closable(Device):
    name = "closable"

    def __init__(self, log):
        self.log = log

    def flush(self):
        self.log.append(("flush", self))

    def close(self):
        self.log.append(("close", self))


class Broken(Closable):
    name = "broken"

    def close(self):
        raise OSError("disk on fire")


def test_close_flushes_then_closes_every_device_once(kvm, caplog):
    log = []
    with GuestMemory.anonymous(2 << 20) as memory:
        vm = Vm(kvm, memory)
        first, broken, mmio = Closable(log), Broken(log), Closable(log)
        vm.add_pio_device(0x100, 4, first)
        vm.add_pio_device(0x200, 1, first)          # a second range of the same device
        vm.add_pio_device(0x300, 1, broken)
        vm.add_mmio_device(0xD0000000, 0x1000, mmio)
        vm.on_close(lambda: log.append(("closer", None)))
        vm.close()
        vm.close()                                   # idempotent
    kinds = [kind for kind, _ in log]
    assert kinds == ["flush", "flush", "flush", "closer", "close", "close"]
    assert [d for kind, d in log if kind == "close"] == [first, mmio]
    # reported (logged: pykvm/cli/logs.py shows it as one line), and the others still closed
    assert [r.getMessage() for r in caplog.records if r.name == "pykvm.vstate.vm"] == \
        ["closing devices: OSError: disk on fire"]


class Faulty(Device):
    name = "faulty"

    def write(self, offset, size, value):
        raise ZeroDivisionError("a bug in a device")

    def read(self, offset, size):
        return 0


def test_a_bug_on_a_vcpu_thread_stops_the_vm_and_is_logged(kvm, caplog):
    """Not a PykvmError: the VM stops with one line, and the vCPU logs the exception
    (with its traceback for PYKVM_DEBUG) instead of printing it to a stream."""
    code = assemble("mov $0x300, %dx\n out %al, %dx\n hlt", "real", layout.FLAT_LOAD_ADDR)
    with GuestMemory.anonymous(2 << 20) as memory, Vm(kvm, memory) as vm:
        vm.add_pio_device(0x300, 1, Faulty())
        memory.write(layout.FLAT_LOAD_ADDR, code)
        vm.create_vcpus(1)
        set_mode(vm.vcpus[0], memory, "real", layout.FLAT_LOAD_ADDR)
        stop = vm.run(timeout=20)
    assert stop.kind == "error" and "internal error" in stop.message, stop
    logged = [r for r in caplog.records if r.name == "pykvm.vstate.vcpu"]
    assert [r.getMessage() for r in logged] == ["vCPU 0: internal error"]
    assert isinstance(logged[0].exc_info[1], ZeroDivisionError)


# --- pause and resume: tests/kvm/test_core.py has the single-vCPU case -------------------------
class Counter(Device):
    name = "counter"

    def __init__(self):
        self.count = 0

    def write(self, offset, size, value):
        self.count += 1


def test_pause_and_resume_with_an_ap_waiting_for_sipi(kvm):
    """A paused 2-vCPU VM: the BSP stops counting, the AP (blocked in KVM_RUN until a
    SIPI that never comes) is paused too; both resume; states follow the life cycle."""
    counter = Counter()
    code = assemble("1: out %al, $0x80\n jmp 1b", "long", origin=layout.FLAT_LOAD_ADDR)
    with GuestMemory.anonymous(2 << 20) as memory, Vm(kvm, memory) as vm:
        vm.add_pio_device(0x80, 1, counter)
        memory.write(layout.FLAT_LOAD_ADDR, code)
        vm.create_vcpus(2)
        set_mode(vm.vcpus[0], memory, "long", layout.FLAT_LOAD_ADDR)
        start_run_pause(vm)
        frozen = counter.count
        time.sleep(0.3)
        assert counter.count == frozen > 0
        assert vm.vcpus[1].call(lambda v: v.get_mp_state()) == k.KVM_MP_STATE_UNINITIALIZED
        resume_run(vm)
        assert counter.count > frozen
        stop_and_join(vm)


# --- SMP: application processors start through the in-kernel LAPIC --------------------------
AP_VECTOR = 0x30            # SIPI vector: the AP starts in real mode at 0x30000
AP_ADDR = AP_VECTOR << 12
AP_PORT, GO_PORT = 0x82, 0x81


class Gate(Device):
    """Port GO_PORT reads 0 until the test opens it; AP_PORT records the AP's hello."""

    name = "gate"

    def __init__(self):
        self.open = False
        self.hello = []

    def read(self, offset, size):
        return int(self.open)

    def write(self, offset, size, value):
        self.hello.append(value)


def smp_guest(bsp_end: str, broadcast: bool = False) -> tuple[bytes, bytes]:
    """BSP (long mode): LAPIC on, INIT + SIPI + SIPI to APIC ID 1, wait for the gate, then
    ``bsp_end``.
    AP (real mode at AP_ADDR): say hello on AP_PORT, then cli; hlt forever.
    ``broadcast``: the IPIs go to all but self (ICR shorthand 11), as Linux's SMP boot can."""
    shorthand = 0xC0000 if broadcast else 0
    bsp = assemble(f"""
        mov $0xfee000f0, %edi
        movl $0x1ff, (%rdi)              # SVR: software-enable the BSP's LAPIC (KVM sends no
        mov $0xfee00310, %edi            # IPI from a disabled one; every OS enables it first)
        movl $(1 << 24), (%rdi)          # ICR high: destination APIC ID 1
        mov $0xfee00300, %edi
        movl $0x{shorthand | 0x4500:x}, (%rdi)             # INIT, assert
        movl $0x{shorthand | 0x4600 | AP_VECTOR:x}, (%rdi)   # STARTUP
        movl $0x{shorthand | 0x4600 | AP_VECTOR:x}, (%rdi)   # STARTUP again (MP spec)
        mov ${GO_PORT:#x}, %dx
    1:  in %dx, %al
        test %al, %al
        jz 1b
        {bsp_end}""", "long", origin=layout.FLAT_LOAD_ADDR)
    ap = assemble(f"""
        mov ${AP_PORT:#x}, %dx
        mov $0xa5, %al
        out %al, %dx
        cli
    1:  hlt
        jmp 1b""")
    return bsp, ap


def run_smp(kvm, bsp_end: str, open_after: float, cpus: int = 2, inspect=None):
    """Run the SMP guest; ``inspect(vm)`` runs after the stop, before the VM is closed."""
    gate = Gate()
    bsp, ap = smp_guest(bsp_end, broadcast=cpus > 2)
    with GuestMemory.anonymous(2 << 20) as memory, Vm(kvm, memory) as vm:
        vm.add_pio_device(GO_PORT, 2, gate)
        vm.add_pio_device(layout.EXIT_PORT, 1, ExitPort(vm))
        memory.write(layout.FLAT_LOAD_ADDR, bsp)
        memory.write(AP_ADDR, ap)
        vm.create_vcpus(cpus)
        assert [v.get_mp_state() for v in vm.vcpus] == \
            [k.KVM_MP_STATE_RUNNABLE] + [k.KVM_MP_STATE_UNINITIALIZED] * (cpus - 1)
        set_mode(vm.vcpus[0], memory, "long", layout.FLAT_LOAD_ADDR)
        vm.start()
        deadline = time.monotonic() + 30
        while len(gate.hello) < cpus - 1 and time.monotonic() < deadline \
                and not vm.stop_requested:
            time.sleep(0.05)
        assert gate.hello == [0xA5] * (cpus - 1), "not every AP started"
        assert [v.stats.pio[(AP_PORT, "out")] for v in vm.vcpus] == [0] + [1] * (cpus - 1)
        time.sleep(open_after)
        gate.open = True
        stop = vm.wait(timeout=20)
        if inspect is not None:
            inspect(vm)
        return stop, vm


def test_ap_starts_by_init_sipi_and_a_halted_ap_does_not_end_the_vm(kvm):
    """The AP ends in cli; hlt (as Linux parks an offlined CPU). For several idle-monitor
    rounds only the BSP runs: the VM must go on until the BSP exits by itself."""
    stop, vm = run_smp(kvm, f"mov $7, %al\n mov ${layout.EXIT_PORT:#x}, %dx\n out %al, %dx",
                       open_after=3.5)
    assert (stop.kind, stop.status) == ("exit", 7), stop


def test_eight_vcpus_start_by_broadcast_ipis_with_their_own_apic_ids(kvm):
    def check_cpuid(vm):
        for vcpu in vm.vcpus:
            leaves = {(e.function, e.index): e for e in vcpu.get_cpuid()}
            assert leaves[(1, 0)].ebx >> 24 == vcpu.id             # initial APIC ID
            assert (leaves[(1, 0)].ebx >> 16) & 0xFF == 8          # logical CPUs in the package
            if (0xB, 1) in leaves:
                assert leaves[(0xB, 0)].edx == leaves[(0xB, 1)].edx == vcpu.id
                assert leaves[(0xB, 1)].ebx == 8 and leaves[(0xB, 1)].eax == 3
            if (0x8000001E, 0) in leaves:
                assert leaves[(0x8000001E, 0)].eax == vcpu.id

    stop, _ = run_smp(kvm, "cli\n 2: hlt\n jmp 2b", open_after=0, cpus=8, inspect=check_cpuid)
    assert stop.kind == "halt" and "all 8 vCPUs" in stop.message, stop


def test_bsp_halted_with_interrupts_off_ends_an_smp_vm(kvm):
    stop, _ = run_smp(kvm, "cli\n 2: hlt\n jmp 2b", open_after=0)
    assert stop.kind == "halt" and "all 2 vCPUs" in stop.message, stop   # the AP halted too


# --- the CLI: signals stop the VM gracefully ---------------------------------------------------
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_stops_gracefully_with_128_plus_signal(kvm, tmp_path, signum):
    """Output the guest wrote is flushed, the status says which signal (130, 143)."""
    code = assemble("""
        mov $0x3f8, %dx
        mov $'a', %al
        out %al, %dx
        mov $'b', %al
        out %al, %dx
    1:  jmp 1b""")
    guest = tmp_path / "spin.bin"
    guest.write_bytes(code)
    child = subprocess.Popen([sys.executable, "-m", "pykvm", "run", "--flat", str(guest)],
                             stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)
    try:
        seen = read_until(child, b"ab", timeout=60)   # the guest runs: the handlers are in
        child.send_signal(signum)
        out, err = child.communicate(timeout=30)
        out = seen + out
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    name = signal.Signals(signum).name
    assert child.returncode == 128 + signum, err
    assert out == b"ab"
    assert f"stopped by {name}".encode() in err


def read_until(child, marker: bytes, timeout: float) -> bytes:
    deadline, seen = time.monotonic() + timeout, b""
    while marker not in seen and time.monotonic() < deadline and child.poll() is None:
        ready, _, _ = select.select([child.stdout], [], [], 0.2)
        if ready:
            seen += os.read(child.stdout.fileno(), 4096)
    assert marker in seen, f"no {marker!r} from the guest: {seen!r}"
    return seen
