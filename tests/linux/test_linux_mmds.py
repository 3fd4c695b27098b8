"""MMDS seen from a real guest: the default guest booted through Firecracker's API with
a NIC on a TAP in a throwaway network namespace (no uplink: nothing leaves this
machine, and the frames to the MMDS address never even reach the TAP), an address
and a route set in the guest, and busybox's wget and nc talking HTTP to
169.254.169.254 through pykvm's in-VMM stack (pykvm/mmds/). V2: a GET without a
session token is refused (401), one with a token from PUT /latest/api/token is
served, and a PATCH /mmds on the running VM is seen at once. One Linux boot."""

from __future__ import annotations

import pytest

from .test_linux_firecracker import FirecrackerShell, put_firectl_config
from ..kvm.test_net import ip, netns  # noqa: F401 - netns: a fixture

pytestmark = pytest.mark.linux

METADATA = {"latest": {"meta-data": {"ami-id": "ami-12345678", "hostname": "pykvm-guest"}}}
TOKEN_REQUEST = ("busybox printf 'PUT /latest/api/token HTTP/1.1\\r\\n"
                 "X-metadata-token-ttl-seconds: 21600\\r\\n\\r\\n' | busybox nc -w 60 169.254.169.254 80")
URL = "http://169.254.169.254/latest/meta-data"
WGET = "busybox wget -q -O -"   # (busybox 1.35's wget -T segfaults at address 0 in this guest)


def get(shell, token: str, path: str) -> str:
    """The body of a GET with ``token``, through busybox nc, whose -w bounds the wait
    (busybox wget has no working timeout here: see WGET)."""
    answer = shell.check(f"busybox printf 'GET /latest/meta-data{path} HTTP/1.1\\r\\n"
                         f"X-metadata-token: {token}\\r\\n\\r\\n' | "
                         f"busybox nc -w 60 169.254.169.254 80")
    return answer.replace("\r\n", "\n").split("\n\n", 1)[1].strip()


def test_guest_reads_metadata_with_a_v2_token(netns, tmp_path):  # noqa: F811
    ip("tuntap", "add", "dev", "mmdstap0", "mode", "tap")
    with FirecrackerShell(tmp_path / "fc.sock", tmp_path / "fc.log") as shell:
        put_firectl_config(shell, tmp_path)         # the machine, kernel, ext4 root
        shell.ok("PUT", "/network-interfaces/eth0", {"iface_id": "eth0",
                                                     "host_dev_name": "mmdstap0",
                                                     "guest_mac": "06:00:ac:10:00:02"})
        shell.ok("PUT", "/mmds/config", {"network_interfaces": ["eth0"], "version": "V2"})
        shell.ok("PUT", "/mmds", METADATA)
        shell.ok("PUT", "/actions", {"action_type": "InstanceStart"})
        shell.wait_for_shell()
        shell.check("busybox ip link set eth0 up && busybox ip addr add 10.0.2.15/24 dev eth0"
                    " && busybox ip route add 169.254.169.254 dev eth0")

        refused, status = shell.run(f"{WGET} {URL}/ami-id")
        assert status != 0 and "401 Unauthorized" in refused, refused   # V2: no token
        answer = shell.check(TOKEN_REQUEST)
        assert answer.startswith("HTTP/1.1 200"), answer
        token = answer.strip().splitlines()[-1]
        assert len(token) == 64, answer
        assert get(shell, token, "/ami-id") == "ami-12345678"
        assert shell.check(f"{WGET} --header 'X-metadata-token: {token}' {URL}/hostname"
                           ).strip() == "pykvm-guest"
        assert get(shell, token, "/").split() == ["ami-id", "hostname"]   # IMDS: the keys
        assert get(shell, "0" * 64, "/ami-id") == "MMDS token not valid."
        shell.ok("PATCH", "/mmds", {"latest": {"meta-data": {"ami-id": "ami-87654321"}}})
        assert get(shell, token, "/ami-id") == "ami-87654321"
        assert shell.ok("GET", "/mmds")["latest"]["meta-data"]["ami-id"] == "ami-87654321"
