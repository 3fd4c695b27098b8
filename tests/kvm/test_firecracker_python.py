"""A Firecracker client nobody here wrote: `firecracker-python` from PyPI (in a venv of
its own, tests/firecracker_python.py), its VMM binary pointed at pykvm-firecracker,
creates, starts, pauses, resumes, snapshots and deletes a microVM
(tests/firecracker_python_driver.py runs it; docs/firecracker.md says what it needs).

It runs in a throwaway network namespace with an uplink (the client names its NIC
after the default route's interface and creates a TAP for it). The VM is stopped
long before its guest finishes booting: this is the client's protocol, not a boot."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from ..firecracker_python import ClientUnavailable, client_python
from ..linux.test_linux_firecracker import ext4_root_image
from .test_passt import user_netns  # noqa: F401 - the fixture: a namespace with an uplink

DRIVER = Path(__file__).parents[1].joinpath("firecracker_python_driver.py")


def pykvm_firecracker() -> str:
    path = Path(sys.executable).with_name("pykvm-firecracker")
    if not path.exists():
        pytest.skip("the pykvm-firecracker console script is not installed (pip install -e .)")
    return str(path)


def vmm_processes(binary: Path) -> list[int]:
    """PIDs of processes running ``binary`` (this test's own symlink: no one else's)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if str(binary).encode() in argv:
                found.append(int(entry.name))
    return found


def test_firecracker_python_drives_pykvm_firecracker(user_netns, tmp_path):  # noqa: F811
    from pykvm.errors import ConfigError
    from pykvm.machine import default_linux_guest
    try:
        kernel, initrd = default_linux_guest()
    except ConfigError as error:
        pytest.skip(str(error))
    try:
        python = client_python()
    except ClientUnavailable as error:
        pytest.skip(str(error))
    # The client finds its VMM processes by the name "firecracker" (psutil): a symlink of
    # that name makes the script's process name so (the kernel names a process after
    # the file it executed).
    binary = tmp_path / "bin" / "firecracker"
    binary.parent.mkdir()
    binary.symlink_to(pykvm_firecracker())
    settings = {"data_path": str(tmp_path / "data"), "snapshot_path": str(tmp_path / "snap"),
                "binary_path": str(binary), "kernel": str(kernel), "initrd": str(initrd),
                "rootfs": str(ext4_root_image(tmp_path)), "memory_mib": 128}
    try:
        result = subprocess.run([str(python), str(DRIVER), json.dumps(settings)],
                                capture_output=True, text=True, timeout=600, cwd=tmp_path)
    finally:
        left = vmm_processes(binary)
        for pid in left:              # a client that died mid-way leaves its VMM running
            os.kill(pid, signal.SIGKILL)
    steps = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    log = "\n".join(p.read_text(errors="replace")[-3000:]
                    for p in (tmp_path / "data").glob("*/*.log")) if \
        (tmp_path / "data").exists() else ""
    context = f"steps: {steps}\nstderr: {result.stderr[-3000:]}\nVMM log: {log}"
    assert result.returncode == 0, context
    answers = {}
    for entry in steps:
        assert "error" not in entry, context
        answers.setdefault(entry["step"], []).append(entry["result"])
    vm_id = answers["create"][0].split()[1]
    assert answers["create"] == [f"VMM {vm_id} created"], context
    assert answers["state"] == ["Running", "Paused"], context
    assert answers["pause"] == [f"VMM {vm_id} paused successfully"]
    assert answers["resume"] == [f"VMM {vm_id} resumed successfully"]
    assert answers["config"][0]["mem_size_mib"] == 128
    assert answers["snapshot"] == [None]
    assert answers["snapshot_files"] == [["memory", "snapshot"]]
    snapshot = tmp_path / "snap" / vm_id
    assert (snapshot / "memory").stat().st_size == 128 << 20
    assert json.loads((snapshot / "snapshot").read_text())     # pykvm's state, as JSON
    assert answers["list"] == [[vm_id]]
    assert answers["delete"] == [f"VMM {vm_id} is deleted"]
    assert not (tmp_path / "data" / vm_id).exists()           # the client cleaned up
    assert not os.path.exists(f"/sys/class/net/tap_{vm_id}")   # its TAP is gone too
    assert left == [], "the client left its VMM running"
