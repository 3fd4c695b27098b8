"""virtio-net with the real default Linux guest: ONE boot (minutes on kvm_pvm
hosts) inside a network namespace this test creates, with two NICs:

- eth0 on a TAP that carries the host address 10.0.2.2/24; the guest gives itself
  10.0.2.15/24, pings the host, and moves a file over TCP each way with busybox
  nc, against Python socket servers in the same namespace; checksums must match;
- eth1 on a TAP enslaved to a bridge pykvm creates, with a MAC from --net mac=.

Afterwards nothing pykvm created may be left in the namespace. All traffic stays
in the test's namespace.
"""

import hashlib
import os
import socket
import subprocess
import sys
import threading
import time
import types

import pytest

from pykvm.machine import default_guest_dir, default_linux_guest

from ..conftest import needs_kvm

GUEST = default_guest_dir()
BOOT_TIMEOUT = 1200
HOST_IP, GUEST_IP = "10.0.2.2", "10.0.2.15"
UP_PORT, DOWN_PORT = 5001, 5002
MAC1 = "52:54:00:12:34:56"
DOWN_DATA = os.urandom(96 * 1024)

pytestmark = [
    pytest.mark.linux,
    needs_kvm,
    pytest.mark.skipif(GUEST is None, reason="the default Linux guest is not built (make guest)"),
    pytest.mark.skipif(os.geteuid() != 0, reason="TAPs and network namespaces need root"),
    pytest.mark.skipif(not os.path.exists("/dev/net/tun"), reason="no /dev/net/tun"),
]

# Every line the host reads is key=value; each fork+exec costs ~1.5 s on kvm_pvm.
SCRIPT = (
    f"ip addr add {GUEST_IP}/24 dev eth0 && ip link set eth0 up && ip link set eth1 up "
    "&& echo link=up; "
    "echo mac0=$(cat /sys/class/net/eth0/address); "
    "echo mac1=$(cat /sys/class/net/eth1/address); "
    # The summary's "N packets received" counts each answered request once; a
    # duplicate reply (busybox marks it DUP!, seen once under load) is counted apart.
    f"echo ping=$(ping -c 3 -W 20 {HOST_IP} | grep -o '[0-9]* packets received' "
    "| cut -d' ' -f1); "
    "seq 1 20000 > /tmp/up; echo upsum=$(md5sum < /tmp/up); "
    f"nc {HOST_IP} {UP_PORT} < /tmp/up; echo upnc=$?; "
    f"nc {HOST_IP} {DOWN_PORT} < /dev/null > /tmp/down; echo downnc=$?; "
    "echo downsum=$(md5sum < /tmp/down); echo downsize=$(wc -c < /tmp/down)"
)


class HostSide:
    """The host's end inside the namespace: a server that takes the guest's upload
    and one that sends it DOWN_DATA."""

    def __init__(self):
        self.uploaded = None
        self.up = socket.create_server(("0.0.0.0", UP_PORT))
        self.down = socket.create_server(("0.0.0.0", DOWN_PORT))
        for target in (self._take_upload, self._send_download):
            threading.Thread(target=target, daemon=True).start()

    def _take_upload(self):
        connection, _ = self.up.accept()
        data = bytearray()
        while chunk := connection.recv(65536):
            data += chunk
        connection.close()
        self.uploaded = bytes(data)

    def _send_download(self):
        connection, _ = self.down.accept()
        connection.sendall(DOWN_DATA)
        connection.close()

    def close(self):
        self.up.close()
        self.down.close()


@pytest.fixture(scope="module")
def boot():
    from pykvm.net.plumbing import entered_netns, open_netns

    namespace = f"pykvm-lnet-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", namespace], check=True)
    fd = open_netns(namespace)
    try:
        with entered_netns(fd):
            subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
            host = HostSide()
            started = time.monotonic()
            result = subprocess.run(
                ["ip", "netns", "exec", namespace, sys.executable, "-m", "pykvm", "run",
                 "--mem", "256M",
                 "--net", f"tap=ptap0,host-ip={HOST_IP}/24",
                 "--net", f"tap=ptap1,bridge=pbr1,mac={MAC1}",
                 "--", SCRIPT],
                capture_output=True, text=True, timeout=BOOT_TIMEOUT,
                cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
            result.elapsed = time.monotonic() - started
            result.values = dict(line.split("=", 1) for line in result.stdout.splitlines()
                                 if "=" in line)
            time.sleep(0.5)
            result.uploaded = host.uploaded
            result.links_after = subprocess.run(["ip", "-o", "link"], capture_output=True,
                                                text=True).stdout
            host.close()
        yield result
    finally:
        os.close(fd)
        subprocess.run(["ip", "netns", "del", namespace])


def test_command_ran(boot):
    assert boot.returncode == 0, boot.stderr[-3000:]
    assert boot.values.get("link") == "up", boot.stdout


def test_guest_pings_the_host(boot):
    assert boot.values.get("ping") == "3", boot.stdout


def test_configured_mac_on_the_second_nic(boot):
    assert boot.values.get("mac1") == MAC1


def test_default_mac_is_the_stable_one(boot):
    from pykvm.net.plumbing import NetSpec, default_mac, format_mac, machine_key

    kernel, _ = default_linux_guest()
    config = types.SimpleNamespace(kernel=kernel, disks=[], nets=[
        NetSpec.parse(f"tap=ptap0,host-ip={HOST_IP}/24"),
        NetSpec.parse(f"tap=ptap1,bridge=pbr1,mac={MAC1}")])
    assert boot.values.get("mac0") == format_mac(default_mac(machine_key(config), 0))


def test_upload_over_tcp_matches(boot):
    expected = "".join(f"{i}\n" for i in range(1, 20001)).encode()
    assert boot.values.get("upnc") == "0", boot.stdout
    assert boot.uploaded == expected
    assert boot.values.get("upsum", "").split()[0] == hashlib.md5(expected).hexdigest()


def test_download_over_tcp_matches(boot):
    assert boot.values.get("downsize") == str(len(DOWN_DATA)), boot.stdout
    assert boot.values.get("downsum", "").split()[0] == hashlib.md5(DOWN_DATA).hexdigest()


def test_nothing_left_in_the_namespace(boot):
    names = {line.split(":")[1].strip() for line in boot.links_after.splitlines()}
    assert names == {"lo"}, boot.links_after
