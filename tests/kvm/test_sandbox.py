"""The VMM's seccomp sandbox (pykvm/sandbox): the BPF assembler, each role's filter
decisions, and the real kernel enforcing them on real pykvm threads.

A forbidden call ends the whole process, so every test that makes one runs its
scenario in a child Python process and checks that process's exit status and
stderr line."""

import os
import re
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from pykvm import layout, sandbox
from pykvm.ioctl import requests as k
from pykvm.sandbox import bpf, policy, syscalls

from ..asm import assemble
from ..conftest import needs_kvm

ROOT = Path(__file__).resolve().parents[2]
UNISTD = Path("/usr/include/x86_64-linux-gnu/asm/unistd_64.h")
TRAP, ALLOW, KILL = policy.SECCOMP_RET_TRAP, policy.SECCOMP_RET_ALLOW, \
    policy.SECCOMP_RET_KILL_PROCESS
PROBE_PORT = 0x510


# --- the syscall table and the assembler ---------------------------------------------------
@pytest.mark.skipif(not UNISTD.exists(), reason="no <asm/unistd_64.h> installed")
def test_syscall_table_matches_the_kernel_header():
    header = dict(re.findall(r"#define __NR_(\w+) (\d+)", UNISTD.read_text()))
    assert {name: int(nr) for name, nr in header.items()} == syscalls.NUMBERS
    assert syscalls.name(59) == "execve" and syscalls.name(0x40000000 | 59) == "x32 system call 59"


def test_assembler_refuses_what_the_kernel_would_misread():
    program = bpf.Program()
    program.jeq(1, true="far")
    for _ in range(256):
        program.ret(0)
    program.label("far")
    program.ret(1)
    with pytest.raises(bpf.BpfError, match="0..255"):
        program.assemble()
    dangling = bpf.Program()
    dangling.jeq(1, true="nowhere")
    dangling.ret(0)
    with pytest.raises(bpf.BpfError, match="undefined label"):
        dangling.assemble()
    open_end = bpf.Program()
    open_end.load(bpf.DATA_NR)
    with pytest.raises(bpf.BpfError, match="end with a return"):
        open_end.assemble()


# --- each role's decisions, through the interpreter ------------------------------------------
def seccomp_data(name_or_nr, *args, arch=syscalls.AUDIT_ARCH_X86_64) -> bytes:
    nr = syscalls.number(name_or_nr) if isinstance(name_or_nr, str) else name_or_nr
    return struct.pack("<IIQ6Q", nr, arch, 0, *(list(args) + [0] * (6 - len(args))))


def decide(role: str, *call, **kw) -> int:
    return bpf.run(policy.ROLES[role].program(), seccomp_data(*call, **kw))


@pytest.mark.parametrize("role", ["vcpu", "device"])
def test_both_roles_refuse_what_a_compromised_thread_wants(role):
    for call in (("execve",), ("execveat",), ("fork",), ("vfork",), ("ptrace",),
                 ("socket", 2, 1), ("connect",), ("mount",), ("setuid",), ("unshare",),
                 ("process_vm_writev",), ("memfd_create",), ("kill",), ("seccomp",),
                 ("clone", 0x11),                                    # fork through clone
                 ("openat", 0xFFFFFF9C, 0, os.O_WRONLY | os.O_CREAT),
                 ("open", 0, os.O_RDWR), ("openat", 0xFFFFFF9C, 0, os.O_RDONLY | os.O_TRUNC),
                 ("ioctl", 3, k.KVM_CREATE_VM), ("ioctl", 3, k.KVM_SET_USER_MEMORY_REGION),
                 ("ioctl", 3, k.KVM_CREATE_VCPU), ("ioctl", 3, 0x5401),          # TCGETS
                 ("mmap", 0, 4096, 7, 0x22), ("mprotect", 0, 4096, 5)):          # PROT_EXEC
        assert decide(role, *call) == TRAP, call
    # x32 numbers and any other architecture never reach the list
    assert decide(role, 0x40000000 | syscalls.number("read")) == TRAP
    assert decide(role, "read", arch=0x40000003) == KILL                      # i386


@pytest.mark.parametrize("role", ["vcpu", "device"])
def test_both_roles_allow_the_runtime_and_threads(role):
    for call in ("futex", "munmap", "madvise", "brk", "rt_sigreturn", "rt_sigprocmask",
                 "clock_gettime", "write", "read", "poll", "exit", "exit_group", "tgkill"):
        assert decide(role, call) == ALLOW, call
    assert decide(role, "mmap", 0, 1 << 20, 3, 0x22) == ALLOW          # read-write, anonymous
    assert decide(role, "mprotect", 0, 4096, 0) == ALLOW                # a thread's guard page
    assert decide(role, "clone", 0x3D0F00) == ALLOW          # glibc's pthread_create flags
    assert decide(role, "clone3") == policy.SECCOMP_RET_ERRNO | 38        # ENOSYS: use clone
    assert decide(role, "openat", 0xFFFFFF9C, 0, os.O_RDONLY | os.O_CLOEXEC) == \
        policy.SECCOMP_RET_ERRNO | 13                                      # EACCES, not a kill
    for request in policy.INTERRUPT_IOCTLS:
        assert decide(role, "ioctl", 9, request) == ALLOW


def test_the_vcpu_role_runs_the_guest_and_the_device_role_does_not():
    for request in (k.KVM_RUN, k.KVM_GET_REGS, k.KVM_SET_REGS, k.KVM_IOEVENTFD, k.KVM_IRQFD):
        assert decide("vcpu", "ioctl", 9, request) == ALLOW
        assert decide("device", "ioctl", 9, request) == TRAP
    for call in ("preadv", "pwritev", "fdatasync", "readv", "writev"):
        assert decide("device", call) == ALLOW


def test_the_control_role_writes_snapshots_but_starts_nothing():
    for call in (("openat", 0xFFFFFF9C, 0, os.O_WRONLY | os.O_CREAT | os.O_EXCL), ("mkdirat",),
                 ("fsync",), ("ioctl", 9, k.KVM_GET_IRQCHIP), ("accept4",), ("socket", 1, 1),
                 ("clone", 0x3D0F00)):
        assert decide("control", *call) == ALLOW, call
    for call in (("execve",), ("execveat",), ("fork",), ("vfork",), ("clone", 0x11),
                 ("ptrace",), ("process_vm_writev",), ("mount",), ("setuid",),
                 ("io_uring_setup",), ("bpf",), ("unshare",)):
        assert decide("control", *call) == TRAP, call
    assert decide("control", 0x40000000 | syscalls.number("read")) == TRAP
    assert decide("control", "read", arch=0x40000003) == KILL


def test_kvm_run_is_decided_within_the_first_instructions():
    """The per-exit cost: arch, nr == ioctl, cmd == KVM_RUN, allow."""
    executed = []
    assert bpf.run(policy.ROLES["vcpu"].program(), seccomp_data("ioctl", 9, k.KVM_RUN),
                   executed) == ALLOW
    assert len(executed) == 7


# --- the kernel enforcing it ----------------------------------------------------------------
def child(script: str, *args, timeout=60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script), *map(str, args)],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout)


CONFINED_THREAD = """
    import os, socket, sys, threading
    from pykvm import sandbox

    def work():
        sandbox.thread_role(sys.argv[1])
        data = [str(i) * 10 for i in range(50000)]          # the allocator
        helper = threading.Thread(target=lambda: None)      # a thread of its own
        helper.start(); helper.join()
        try:
            open("/etc/hostname").close()
            print("read-only open allowed", flush=True)
        except PermissionError:
            print("read-only open refused", flush=True)
        print("confined and working", flush=True)
        exec(sys.argv[2])
        print("survived", flush=True)

    thread = threading.Thread(target=work, name="confined")
    thread.start(); thread.join()
"""


@pytest.mark.parametrize("role, forbidden, syscall", [
    (role, forbidden, syscall) for role in ("vcpu", "device", "control")
    for forbidden, syscall in (("os.fork()", "clone"),
                               ("os.execv('/bin/true', ['true'])", "execve"),
                               ("open(sys.argv[3], 'w')", "openat"),
                               ("socket.socket()", "socket"),
                               ("__import__('ctypes').CDLL(None).ptrace(0, 0, 0, 0)",
                                "ptrace"),
                               ("__import__('mmap').mmap(-1, 4096, prot=7)", "mmap"))
    if role != "control" or syscall not in ("openat", "socket", "mmap")
])
def test_a_forbidden_call_kills_the_process_with_one_clear_line(tmp_path, role, forbidden,
                                                                syscall):
    target = tmp_path / "created"
    result = child(CONFINED_THREAD, role, forbidden, target)
    opened = "allowed" if role == "control" else "refused"
    assert result.stdout.splitlines() == [f"read-only open {opened}", "confined and working"]
    assert result.returncode == sandbox.KILL_STATUS == 159
    assert re.fullmatch(
        rf"pykvm: seccomp: thread confined \(role {role}\) made the forbidden system call "
        rf"{syscall} \(\d+\) with arguments .*; the VMM exits with status 159\n", result.stderr)
    assert not target.exists()


def test_an_allowed_workload_survives():
    result = child(CONFINED_THREAD, "vcpu", "os.write(1, b'')")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "survived"


# --- pykvm's own threads -----------------------------------------------------------------------
def probe_guest(tmp_path) -> Path:
    """Real mode: out to PROBE_PORT, then spin (the test stops it)."""
    path = tmp_path / "probe.bin"
    path.write_bytes(assemble(f"mov ${PROBE_PORT:#x}, %dx\n out %al, %dx\n 1: jmp 1b\n"))
    return path


VCPU_SCENARIO = """
    import os, sys, threading
    from pykvm import sandbox
    from pykvm.bus import Device
    from pykvm.machine import MachineConfig, build_for_boot

    if sys.argv[3] == "off":
        sandbox.configure(enabled=False)

    class Creator(Device):
        '''What a compromised vCPU thread would do: create a host file.'''
        name = "creator"
        def read(self, offset, size):
            return 0
        def write(self, offset, size, value):
            fd = os.open(sys.argv[2], os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            os.close(fd)
            machine.request_stop("exit", 0, "the device wrote its file")

    with build_for_boot(MachineConfig(mem_size=2 << 20, flat=sys.argv[1])) as machine:
        machine.vm.add_pio_device(int(sys.argv[4]), 1, Creator())
        stop = machine.run(timeout=30)
        print(stop.kind if stop else "timeout", flush=True)
"""


@needs_kvm
def test_the_vcpu_thread_is_confined(tmp_path):
    target = tmp_path / "escape"
    result = child(VCPU_SCENARIO, probe_guest(tmp_path), target, "on", PROBE_PORT)
    assert result.returncode == 159, (result.stdout, result.stderr)
    assert "thread vcpu0 (role vcpu) made the forbidden system call openat (257)" \
        in result.stderr
    assert not target.exists()


RARE_PATHS_SCENARIO = """
    import sys
    from pykvm.bus import Device
    from pykvm.machine import MachineConfig, build_for_boot
    from pykvm.observe.disasm import Disassembler
    from pykvm.quirks.syscall import nop_length

    assert "capstone" not in sys.modules and "pykvm.vstate.kvmstate" not in sys.modules
    assert "pykvm.quirks.decode" not in sys.modules

    class RarePaths(Device):
        '''At the guest's first exit, on the confined vCPU thread: what a snapshot and a
        message about an unknown instruction import lazily (preloaded in the background).'''
        name = "rare"
        def write(self, offset, size, value):
            state = machine.vm.vcpus[0].save_state()
            loaded = "capstone" in sys.modules
            text = Disassembler().decode(bytes.fromhex("0f01ca"), 0, 64).text
            nop = nop_length(bytes.fromhex("0f1f4000"))   # planting the #PF hook decodes
            print(f"saved {len(state.msrs)} MSRs; nop of {nop}; "
                  f"capstone loaded before: {loaded}; {text}", flush=True)
            machine.request_stop("exit", 0, "done")

    machine = build_for_boot(MachineConfig(mem_size=2 << 20, flat=sys.argv[1]))
    machine.vm.add_pio_device(int(sys.argv[2]), 1, RarePaths())
    try:
        print(machine.run(timeout=30).kind, flush=True)
    finally:
        machine.close()
"""


@needs_kvm
def test_rare_paths_import_on_a_confined_thread_right_after_start(tmp_path):
    """kvmstate and the #PF hook's instruction decoder are imported off the start-up path
    by an unconfined thread; a confined vCPU thread needing them at once waits for them
    (sandbox.wait_for_preload). capstone is not loaded until a confined thread needs it:
    the same thread imports it then (sandbox.import_unconfined)."""
    result = child(RARE_PATHS_SCENARIO, probe_guest(tmp_path), PROBE_PORT)
    assert result.returncode == 0, result.stderr
    saved, stop = result.stdout.splitlines()[-2:]
    assert stop == "exit" and saved.startswith("saved ")
    assert "capstone loaded before: False" in saved and "nop of 4;" in saved
    try:
        import capstone  # noqa: F401
    except ImportError:
        return
    assert saved.endswith("clac")


@needs_kvm
def test_an_instruction_completion_at_once_in_a_fresh_process(tmp_path):
    """kvm_pvm: the first instruction the emulator refuses (fwait, at a long-mode guest's
    first byte) is completed on the confined vCPU thread while the completion table may still
    be loading in the background (sandbox.wait_for_preload); elsewhere fwait just runs."""
    guest = tmp_path / "fwait.bin"
    guest.write_bytes(assemble(f"fwait\n xor %al, %al\n mov ${layout.EXIT_PORT:#x}, %dx\n"
                               f" out %al, %dx\n 1: jmp 1b\n", "long", layout.FLAT_LOAD_ADDR))
    result = subprocess.run([sys.executable, "-m", "pykvm", "run", "--flat", str(guest),
                             "--entry", "long"],
                            cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


@needs_kvm
def test_the_library_switch_turns_it_off(tmp_path):
    target = tmp_path / "escape"
    result = child(VCPU_SCENARIO, probe_guest(tmp_path), target, "off", PROBE_PORT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "exit" and target.exists()


DEVICE_SCENARIO = """
    import os, socket, sys
    from pykvm.devices.virtio import DiskSpec
    from pykvm.machine import MachineConfig, build_for_boot

    config = MachineConfig(mem_size=2 << 20, flat=sys.argv[1], disks=[DiskSpec(sys.argv[2])])
    with build_for_boot(config) as machine:
        function = machine.virtio.functions[0]
        # the test-only hook: the blk worker's next wake-up runs this instead of the queue
        function.worker._handle = lambda index: socket.socket()
        machine.vm.start()
        os.eventfd_write(function.queue_fds[0], 1)
        stop = machine.vm.wait(timeout=30)
        print("not killed:", stop, flush=True)
"""


@needs_kvm
def test_a_forbidden_call_from_a_device_thread_kills_the_vmm(tmp_path):
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(1 << 20))
    result = child(DEVICE_SCENARIO, probe_guest(tmp_path), disk)
    assert result.returncode == 159, (result.stdout, result.stderr)
    assert re.search(r"pykvm: seccomp: thread \S+-io \(role device\) made the forbidden system "
                     r"call socket \(41\) with arguments 0x2, 0x80001, ", result.stderr)
    assert result.stdout == ""


@needs_kvm
def test_vcpu_and_device_threads_run_under_a_filter(tmp_path):
    """In this process (the default: on): the flat guest runs, and /proc shows the
    vCPU and the disk's I/O thread each under a filter, the main thread under none."""
    from pykvm.devices.virtio import DiskSpec
    from pykvm.machine import MachineConfig, build_for_boot

    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(1 << 20))
    config = MachineConfig(mem_size=2 << 20, flat=probe_guest(tmp_path),
                           disks=[DiskSpec(str(disk))])
    with build_for_boot(config) as machine:
        seen = []
        machine.vm.add_pio_device(PROBE_PORT, 1, Probe(seen))
        machine.vm.start()
        deadline = time.monotonic() + 30
        while not seen and time.monotonic() < deadline:
            time.sleep(0.01)
        assert seen, "the guest never reached its port write"
        vcpu_thread = machine.vm.vcpus[0].thread
        worker = machine.virtio.functions[0].worker.thread
        assert sandbox.thread_filters(vcpu_thread.native_id) == 1
        assert sandbox.thread_filters(worker.native_id) == 1
        assert sandbox.thread_filters(os.getpid()) == 0
        machine.request_stop("user", 0, "test done")
        assert machine.vm.wait(timeout=10).kind == "user"


NIC_SCENARIO = """
    import threading
    from pykvm import sandbox
    from pykvm.devices.virtio import net
    from pykvm.net.tap import Tap

    device = net.NetDevice(Tap("sbx0"), bytes(6))
    done = []

    def as_the_vcpu_thread():
        # What a guest's DRIVER_OK and reset make the vCPU thread do: set the TAP's offloads
        sandbox.thread_role("vcpu")
        device.activate(net.VIRTIO_NET_F_GUEST_CSUM | net.VIRTIO_NET_F_GUEST_TSO4
                        | net.VIRTIO_NET_F_MRG_RXBUF)
        device.reset()
        done.append(device.stats["offload_errors"])

    thread = threading.Thread(target=as_the_vcpu_thread, name="vcpu0")
    thread.start(); thread.join()
    device.close()
    print("offload errors:", done[0])
"""


def test_a_guest_negotiating_offloads_is_not_killed_on_the_vcpu_thread():
    """virtio-net's activate and reset set TUNSETOFFLOAD on the vCPU thread (a throwaway
    network namespace: unshare -n; nothing is sent)."""
    if os.geteuid() != 0 or not os.path.exists("/dev/net/tun"):
        pytest.skip("a TAP needs root and /dev/net/tun")
    result = subprocess.run(["unshare", "-n", sys.executable, "-c", textwrap.dedent(NIC_SCENARIO)],
                            cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "offload errors: 0"


@needs_kvm
def test_snapshots_through_the_confined_control_socket(tmp_path):
    from pykvm.control import ControlServer, request
    from pykvm.machine import MachineConfig, build_for_boot

    with build_for_boot(MachineConfig(mem_size=2 << 20, flat=probe_guest(tmp_path))) as machine:
        seen = []
        machine.vm.add_pio_device(PROBE_PORT, 1, Probe(seen))
        machine.vm.start()
        with ControlServer(tmp_path / "api.sock", machine) as server:
            assert request(tmp_path / "api.sock", {"action": "status"})["ok"]
            assert sandbox.thread_filters(server._thread.native_id) == 1
            response = request(tmp_path / "api.sock",
                               {"action": "snapshot", "path": str(tmp_path / "snap")})
            assert response["ok"], response
        machine.request_stop("user", 0, "test done")
        machine.vm.wait(timeout=10)
    assert (tmp_path / "snap" / "memory.bin").stat().st_size > 0
    assert (tmp_path / "snap" / "state.json").exists()


class Probe:
    name = "probe"

    def __init__(self, seen):
        self.seen = seen

    def read(self, offset, size):
        return 0

    def write(self, offset, size, value):
        self.seen.append(value)


def test_cli_no_seccomp_turns_the_switch_off(tmp_path):
    guest = tmp_path / "exit.bin"
    guest.write_bytes(assemble(f"mov ${layout.EXIT_PORT:#x}, %dx\n mov $7, %al\n out %al, %dx\n"))
    script = """
        import sys
        from pykvm import cli, sandbox
        status = cli.main(sys.argv[1:])
        print(status, sandbox.enabled())
    """
    if not os.path.exists("/dev/kvm"):
        pytest.skip("no /dev/kvm")
    for options, enabled in (((), "True"), (("--no-seccomp",), "False")):
        result = child(script, "run", "--flat", guest, *options)
        assert result.stdout.split() == ["7", enabled], result.stderr


# --- a Linux guest with a disk workload under the filter --------------------------------------
@pytest.mark.linux
@needs_kvm
def test_linux_boot_and_disk_workload_under_the_filter(tmp_path):
    from pykvm.machine import default_guest_dir
    if default_guest_dir() is None:
        pytest.skip("the default Linux guest is not built (make guest)")
    disk = tmp_path / "disk.img"
    with open(disk, "wb") as image:
        image.truncate(16 << 20)
    script = ("mke2fs -q /dev/vda && mkdir -p /mnt && mount -t ext4 /dev/vda /mnt && "
              "dd if=/dev/urandom of=/mnt/f bs=64k count=32 2>/dev/null && sync && "
              "echo sum=$(md5sum < /mnt/f | cut -c1-32) && umount /mnt && echo done=ok")
    process = subprocess.Popen([sys.executable, "-m", "pykvm", "run", "--mem", "256M",
                                "--disk", str(disk), "--", script],
                               cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    confined = set()
    while process.poll() is None:     # sample which threads run under a filter
        for task in Path(f"/proc/{process.pid}/task").glob("*"):
            try:
                if "Seccomp_filters:\t1" in (task / "status").read_text():
                    confined.add(task.name)
            except OSError:
                pass
        time.sleep(0.5)
    stdout, stderr = process.communicate(timeout=900)
    assert process.returncode == 0, stderr[-3000:]
    assert "done=ok" in stdout and re.search(r"sum=[0-9a-f]{32}", stdout)
    assert len(confined) >= 2        # the vCPU and the disk's I/O thread at least
