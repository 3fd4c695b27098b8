"""What `pykvm run --flat` has imported when its vCPU first enters the guest (issue #13
item 3; bench/startup.py times it): only what that run needs. Interpreter start and imports
are most of a short run's cost, and a module that joins the start-up path silently (an
eager import at a module's top) costs every run; this names the modules that must stay off
it, so such a regression fails here rather than only in a bench row.

The child wraps pykvm's KVM_RUN ioctl and writes ``sorted(sys.modules)`` to a pipe opened
before any thread is confined (a confined vCPU thread may write to it, not open files), at
the first call. The sandbox's background preload (pykvm/sandbox/__init__.py) may be
importing the rare paths' modules at that moment (instruction completions, vCPU state), so
those are neither required nor forbidden here; what a flat run must never import before
its first KVM_RUN is.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pykvm import layout

ROOT = Path(__file__).resolve().parents[2]
while not (ROOT / "pykvm").is_dir():     # tests/ or tests/<kind>/
    ROOT = ROOT.parent

# Real mode at the flat load address: write 0 to the exit port, then halt.
GUEST = (b"\x30\xc0"                                        # xor %al, %al
         + b"\xba" + layout.EXIT_PORT.to_bytes(2, "little")  # mov $EXIT_PORT, %dx
         + b"\xee"                                          # out %al, %dx
         + b"\xf4\xeb\xfd")                                 # 1: hlt; jmp 1b

CHILD = textwrap.dedent("""
    import os, sys
    import pykvm.vstate.vcpu as vcpu
    out, real = [int(os.environ["PYKVM_TEST_FD"])], vcpu._kvm_run_ioctl
    def first_run(*args):
        if out[0] >= 0:
            os.write(out[0], "\\n".join(sorted(sys.modules)).encode())
            os.close(out[0])
            out[0] = -1
        return real(*args)
    vcpu._kvm_run_ioctl = first_run
    from pykvm.cli import main
    sys.exit(main(sys.argv[1:]))
""")

# Each is needed only by another subcommand, an option a flat run does not give, or a rare
# path that imports it when it happens (snapshot save/restore, tracing, gdb, virtio,
# networking, capstone for an unknown instruction's message).
NOT_BEFORE_FIRST_RUN = {
    "capstone", "pyroute2", "concurrent.futures", "logging.handlers", "subprocess",
    "tempfile", "ctypes.util", "importlib.metadata", "json", "socket", "http.server",
    "pykvm.snapshot.snapshot", "pykvm.snapshot.config", "pykvm.snapshot.directory",
    "pykvm.snapshot.document", "pykvm.snapshot.memfile", "pykvm.snapshot.migrate",
    "pykvm.gdb", "pykvm.observe.trace", "pykvm.observe.locate", "pykvm.observe.plot",
    "pykvm.observe.profile", "pykvm.observe.symbols", "pykvm.observe.kvmstats",
    "pykvm.observe.report", "pykvm.devices.virtio", "pykvm.net.passt", "pykvm.agent",
    "pykvm.vsock", "pykvm.share", "pykvm.control.server", "pykvm.api.firecracker.vmm",
    "pykvm.warm.cache", "pykvm.warm.run", "pykvm.mmds", "pykvm.vhost_user",
    "pykvm.boot.bzimage",
    # the other subcommands: `pykvm run` builds only its own parser (cli/__init__.py)
    "pykvm.api", "pykvm.distro", "pykvm.guestimage", "pykvm.warm.cli", "pykvm.cli.check",
    "pykvm.cli.ctl", "pykvm.cli.exec", "pykvm.cli.stat", "pykvm.command_group",
}
# Modules a flat run does need: their presence shows the wrapper saw a real start.
NEEDED = {"pykvm.cli.run", "pykvm.vstate.vm", "pykvm.vstate.vcpu", "pykvm.sandbox",
          "pykvm.devices.serial"}


def first_run_modules(tmp_path: Path) -> set[str]:
    guest = tmp_path / "flat.bin"
    guest.write_bytes(GUEST)
    read_fd, write_fd = os.pipe()
    try:
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, "run", "--flat", str(guest), "--entry", "real"],
            cwd=ROOT, env={**os.environ, "PYKVM_TEST_FD": str(write_fd)},
            pass_fds=(write_fd,), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        os.close(write_fd)
        write_fd = -1
        with os.fdopen(read_fd, "rb") as pipe:
            read_fd = -1
            listing = pipe.read().decode()
        _, err = child.communicate(timeout=60)
        assert child.returncode == 0, err.decode(errors="replace")
        return set(listing.split())
    finally:
        for fd in (read_fd, write_fd):
            if fd >= 0:
                os.close(fd)


@pytest.mark.skipif(not os.access("/dev/kvm", os.R_OK | os.W_OK), reason="needs /dev/kvm")
def test_a_flat_run_imports_only_what_it_needs_before_its_first_kvm_run(tmp_path):
    modules = first_run_modules(tmp_path)
    assert NEEDED <= modules, sorted(NEEDED - modules)
    # A forbidden package counts with any of its submodules.
    loaded = sorted(name for name in modules
                    if any(name == bad or name.startswith(bad + ".")
                           for bad in NOT_BEFORE_FIRST_RUN))
    assert not loaded, f"imported before the first KVM_RUN of a flat run: {loaded}"


def test_a_command_builds_only_its_own_parser_and_parses_as_the_full_one():
    """What build_parser("run") leaves out changes nothing a run's options parse into, and
    `pykvm --help` (no command) still lists every subcommand."""
    from pykvm.cli import SUBCOMMANDS, build_parser

    def commands(parser):
        return set(next(action for action in parser._actions
                        if action.dest == "==SUPPRESS==" and action.choices).choices)

    every = {name for names, _, _ in SUBCOMMANDS for name in names}
    assert commands(build_parser()) == every
    assert commands(build_parser("--help")) == every
    assert commands(build_parser("run")) == {"run"}
    assert commands(build_parser("cp")) == {"exec", "cp"}
    argv = ["run", "--flat", "guest.bin", "--entry", "long", "-m", "64M", "--stats"]
    only, full = build_parser("run").parse_args(argv), build_parser().parse_args(argv)
    assert vars(only) == vars(full)


def test_reading_a_snapshots_config_imports_no_virtio_fs():
    """A restore reads state.json's config (snapshot/config.py) without virtio-fs and
    vhost-user (~10 ms of every restore): a snapshot never holds a live share."""
    script = textwrap.dedent("""
        import sys
        from pykvm.machine import MachineConfig
        from pykvm.snapshot.config import decode_config, encode_config
        config = decode_config(encode_config(MachineConfig(mem_size=64 << 20, flat="g.bin")))
        assert config.live_shares == [] and config.mem_size == 64 << 20
        print(sorted(name for name in sys.modules
                     if name.startswith(("pykvm.devices.virtio", "pykvm.vhost_user"))))
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
