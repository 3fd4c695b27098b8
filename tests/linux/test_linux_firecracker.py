"""firectl's sequence against ``pykvm firecracker``: the default guest booted purely
through Firecracker's API to a shell on the serial console, paused and resumed,
snapshotted through the API and loaded into a fresh process, where it answers.
The guest's agent listens on vsock (``pykvm.agent=vsock:PORT`` on its command line: the
default guest's /init starts it), so a command runs over ``CONNECT PORT`` on the vsock
device's uds_path too. One Linux boot (minutes on kvm_pvm hosts)."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time

import pytest

from ..guest_shell import REPO, GuestShell
from ..kvm.test_firecracker_api import call

pytestmark = pytest.mark.linux
AGENT_PORT = 1024               # pykvm.agent=vsock:AGENT_PORT: the guest agent's vsock port


class FirecrackerShell(GuestShell):
    """GuestShell's console protocol over ``pykvm firecracker`` (stdin/stdout are the
    serial console, as with Firecracker); the API is HTTP, not pykvm's control socket."""

    def __init__(self, api_sock, log):
        self.api_sock = api_sock
        self.args = []
        self.started = time.monotonic()
        self._output = bytearray()
        self._cond = threading.Condition()
        self._count = 0
        self.log_path = log
        self._stderr_log = open(log, "wb")
        env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.process = subprocess.Popen(
            [sys.executable, "-m", "pykvm", "firecracker", "--api-sock", str(api_sock)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr_log, env=env,
            cwd=str(REPO))
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def api(self, method, url, body=None):
        return call(str(self.api_sock), method, url, body)

    def ok(self, method, url, body=None):
        status, answer = self.api(method, url, body)
        assert status in (200, 204), (method, url, status, answer)
        return answer

    def post_mortem(self) -> str:
        return ""

    def ctl(self, action, timeout=600, **fields):     # stop(): SIGTERM is the way
        raise OSError("pykvm-firecracker has no pykvm control socket")


def reboots_on_ctrl_alt_del(guest_dir) -> bool:
    """Whether the guest kernel in ``guest_dir`` (its build's ``config``) reboots on
    Ctrl-Alt-Del: Linux does that in the VT keyboard driver (CONFIG_VT), on keys from
    atkbd behind the i8042 (pykvm-firecracker's SendCtrlAltDel)."""
    config = guest_dir / "config"
    lines = config.read_text().splitlines() if config.exists() else []
    return all(f"CONFIG_{name}=y" in lines for name in ("VT", "SERIO_I8042", "KEYBOARD_ATKBD"))


def ext4_root_image(tmp_path):
    """A 16 MiB ext4 root file system holding a static busybox as /bin/sh (mke2fs -d):
    the default guest's /init mounts root=/dev/vda and runs its shell chrooted there."""
    busybox = shutil.which("busybox")
    if busybox is None:
        pytest.skip("needs busybox (busybox-static) for the root image")
    tree = tmp_path / "rootfs"
    (tree / "bin").mkdir(parents=True)
    shutil.copy(busybox, tree / "bin" / "busybox")
    for applet in ("sh", "cat", "ls"):
        (tree / "bin" / applet).symlink_to("busybox")
    image = tmp_path / "rootfs.ext4"
    with open(image, "wb") as stream:
        stream.truncate(16 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(tree), str(image)], check=True)
    return image


def connect_vsock(uds_path, port: int, timeout: float = 600) -> socket.socket:
    """A connection to guest ``port`` through Firecracker's host side of vsock: connect
    to ``uds_path``, write ``CONNECT port``, read ``OK hostport``; retried until the
    guest listens (until then the muxer closes the client)."""
    deadline = time.monotonic() + timeout
    while True:
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.settimeout(60)
        line = b""
        try:
            client.connect(str(uds_path))
            client.sendall(b"CONNECT %d\n" % port)
            while not line.endswith(b"\n") and (byte := client.recv(1)):
                line += byte
            if re.fullmatch(rb"OK \d+\n", line):
                client.settimeout(None)
                return client
        except OSError:
            if time.monotonic() > deadline:
                raise
        client.close()
        assert time.monotonic() < deadline, f"guest port {port} never accepted: {line!r}"
        time.sleep(1)


def put_firectl_config(shell, tmp_path, extra_args: str = "") -> None:
    """firectl's requests before InstanceStart: the machine, the default guest's kernel
    with firectl's command line, an ext4 root drive (ext4_root_image)."""
    from pykvm.machine import default_guest_dir, default_linux_guest
    if default_guest_dir() is None:
        pytest.skip("the default Linux guest is not built (pykvm guest build)")
    kernel, initrd = default_linux_guest()
    rootfs = ext4_root_image(tmp_path)
    shell.wait_for_socket()
    assert shell.ok("GET", "/machine-config")["vcpu_count"] == 1
    shell.ok("PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 256, "smt": False})
    boot = {"kernel_image_path": str(kernel),
            "boot_args": f"console=ttyS0 reboot=k pci=off {extra_args}".strip()}
    if initrd:
        boot["initrd_path"] = str(initrd)
    shell.ok("PUT", "/boot-source", boot)
    shell.ok("PUT", "/drives/rootfs", {"drive_id": "rootfs", "path_on_host": str(rootfs),
                                       "is_root_device": True, "is_read_only": False})


def test_firectl_sequence_boot_pause_snapshot_load(tmp_path):
    from pykvm.machine import default_guest_dir

    from .test_linux_vsock import run_over

    uds = tmp_path / "v.sock"
    with FirecrackerShell(tmp_path / "fc.sock", tmp_path / "fc.log") as shell:
        put_firectl_config(shell, tmp_path, f"pykvm.agent=vsock:{AGENT_PORT}")
        shell.ok("PUT", "/vsock", {"guest_cid": 3, "uds_path": str(uds)})
        shell.ok("PUT", "/actions", {"action_type": "InstanceStart"})
        assert shell.ok("GET", "/")["state"] == "Running"
        shell.wait_for_shell()
        assert shell.check("cat /sys/block/vda/serial").strip() == "rootfs"
        # pci=off: the disk is a virtio-mmio device, announced on the command line
        assert "virtio-mmio.0" in shell.check("ls /sys/bus/platform/devices").split()
        assert shell.check("ls /bin").split() == ["busybox", "cat", "ls", "sh"]  # the ext4 root
        # the same shell over vsock: the agent (bound into the ext4 root) runs it there
        status, output = run_over(connect_vsock(uds, AGENT_PORT), "ls /bin; echo $((6 * 7))")
        assert (status, output.decode().split()) == (0, ["busybox", "cat", "ls", "sh", "42"])
        shell.ok("PATCH", "/vm", {"state": "Paused"})
        assert shell.ok("GET", "/")["state"] == "Paused"
        shell.ok("PATCH", "/vm", {"state": "Resumed"})
        shell.check("echo from-before-the-snapshot > /tmp/marker")
        shell.ok("PATCH", "/vm", {"state": "Paused"})
        paths = {"snapshot_path": str(tmp_path / "vm.snap"),
                 "mem_file_path": str(tmp_path / "vm.mem")}
        shell.ok("PUT", "/snapshot/create", paths)

    with FirecrackerShell(tmp_path / "fc2.sock", tmp_path / "fc2.log") as fresh:
        fresh.wait_for_socket()
        fresh.ok("PUT", "/snapshot/load", {**paths, "resume_vm": True})
        assert fresh.ok("GET", "/")["state"] == "Running"
        assert fresh.check("cat /tmp/marker").strip() == "from-before-the-snapshot"
        if reboots_on_ctrl_alt_del(default_guest_dir()):
            fresh.ok("PUT", "/actions", {"action_type": "SendCtrlAltDel"})
            assert fresh.process.wait(timeout=300) == 0
