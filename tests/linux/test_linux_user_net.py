"""--net user with the real default Linux guest, as an unprivileged user: ONE boot.

pykvm runs as ``nobody`` with only an extra group that may open a KVM device node
(a node for /dev/kvm's device number, made in a private directory with that group
and mode 0660: the way a kvm group grants it, without touching the host's
/dev/kvm), inside a throwaway network namespace whose only uplink is a veth pair
with both ends inside it, an address and a default route via a gateway that does
not exist. passt, started by pykvm, runs as nobody too. The one boot checks:

- the guest's /init got a DHCP lease from passt: the namespace's address, its
  default route, and the DNS server of the namespace's resolv.conf;
- the guest fetches a token over HTTP from a server on the namespace's loopback,
  through the gateway address passt maps to the host;
- ``fwd=tcp:HOSTPORT:GUESTPORT``: a connection to the host port reaches a busybox
  ``nc -l`` in the guest, both ways;
- afterwards no passt is left in the namespace.
"""

import http.server
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from pykvm.machine import default_guest_dir
from pykvm.net.passt import passt_binary

from ..conftest import needs_kvm
from ..kvm.test_passt import NS_ADDRESS, NS_GATEWAY, passt_in, user_netns  # noqa: F401 - a fixture

GUEST = default_guest_dir()
ROOT = Path(__file__).resolve().parents[2]
BOOT_TIMEOUT = 1200
HTTP_PORT, HOST_PORT, GUEST_PORT = 18000, 18080, 8080
DNS_SERVER = "192.0.2.53"            # TEST-NET-1: written to resolv.conf, never queried
TOKEN = os.urandom(8).hex()
NOBODY = 65534

pytestmark = [
    pytest.mark.linux,
    needs_kvm,
    pytest.mark.skipif(GUEST is None, reason="the default Linux guest is not built (make guest)"),
    pytest.mark.skipif(os.geteuid() != 0, reason="making the namespace and the user needs root"),
    pytest.mark.skipif(passt_binary() is None, reason="passt is not installed"),
    pytest.mark.skipif(shutil.which("setpriv") is None, reason="setpriv (util-linux) is missing"),
]

# Every line the host reads is key=value; each fork+exec costs ~1.5 s on kvm_pvm.
SCRIPT = (
    "echo lease=$(ip -4 -o addr show dev eth0); "
    "echo route=$(ip route show default); "
    "echo dns=$(cat /etc/resolv.conf); "
    f"echo token=$(wget -qO- http://{NS_GATEWAY}:{HTTP_PORT}/token); "
    f"echo nc=listening; echo guest-says-hi | nc -l -p {GUEST_PORT}; echo ncstatus=$?"
)


def unused_gid() -> int:
    import grp
    for gid in range(60100, 61000):
        try:
            grp.getgrgid(gid)
        except KeyError:
            return gid
    raise RuntimeError("no free group id")


class TokenHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = (TOKEN if self.path == "/token" else "no").encode()
        self.send_response(200 if self.path == "/token" else 404)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def private_dir():
    """A directory nobody can read: the KVM node, the guest's files and a HOME."""
    directory = Path(tempfile.mkdtemp(prefix="pykvm-usernet-"))
    directory.chmod(0o755)
    try:
        yield directory
    finally:
        shutil.rmtree(directory)


def talk_to_guest_port(result: dict, deadline: float) -> None:
    """Connect to the forwarded host port until the guest's nc answers (passt accepts
    at once and drops the connection while nothing listens in the guest)."""
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", HOST_PORT), timeout=30) as conn:
                conn.sendall(b"host-says-hi\n")
                data = b""
                while not data.endswith(b"\n") and (chunk := conn.recv(4096)):
                    data += chunk
                if data:
                    result["reply"] = data
                    return
        except OSError:
            pass
        time.sleep(1)


def test_user_networking_unprivileged_dhcp_http_and_port_forward(user_netns, private_dir):
    name = user_netns
    etc = Path("/etc/netns") / name
    etc.mkdir(parents=True)
    (etc / "resolv.conf").write_text(f"nameserver {DNS_SERVER}\n")
    gid = unused_gid()
    node = private_dir / "kvm"
    os.mknod(node, stat.S_IFCHR | 0o660, os.stat("/dev/kvm").st_rdev)
    os.chown(node, 0, gid)
    node.chmod(0o660)                       # past the umask
    for file in ("vmlinux", "initramfs.cpio"):
        shutil.copyfile(GUEST / file, private_dir / file)
        (private_dir / file).chmod(0o644)
    home = private_dir / "home"
    home.mkdir()
    os.chown(home, NOBODY, NOBODY)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", HTTP_PORT), TokenHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    env = {"PATH": os.environ["PATH"], "HOME": str(home), "PYKVM_CACHE": str(home / "cache"),
           "PYTHONDONTWRITEBYTECODE": "1"}
    process = subprocess.Popen(
        ["ip", "netns", "exec", name, "setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}",
         f"--groups={gid}", "--inh-caps=-all", "--",
         sys.executable, "-m", "pykvm", "run", "--device", str(node),
         "--kernel", str(private_dir / "vmlinux"), "--initrd", str(private_dir / "initramfs.cpio"),
         "--net", f"user,fwd=tcp:{HOST_PORT}:{GUEST_PORT}", "--", "sh", "-c", SCRIPT],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    inode = os.stat("/proc/thread-self/ns/net").st_ino
    values, forward, output = {}, {}, []
    passt_users = set()
    try:
        deadline = time.monotonic() + BOOT_TIMEOUT
        talker = None
        for line in process.stdout:
            output.append(line)
            key, _, value = line.strip().partition("=")
            values[key] = value
            for pid in passt_in(inode):
                passt_users.add(Path(f"/proc/{pid}/status").read_text().split("Uid:")[1].split()[0])
            if key == "nc" and talker is None:
                talker = threading.Thread(target=talk_to_guest_port, args=(forward, deadline))
                talker.start()
        process.wait(timeout=60)
        if talker is not None:
            talker.join(timeout=120)
        stderr = process.stderr.read()
    finally:
        if process.poll() is None:
            process.kill()
        server.shutdown()
        server.server_close()
        shutil.rmtree(etc)
    shown = "".join(output[-40:]) + stderr[-2000:]
    assert process.returncode == 0, shown
    assert re.search(rf"inet {re.escape(NS_ADDRESS)}/24 ", values["lease"]), shown
    assert values["route"].startswith(f"default via {NS_GATEWAY} dev eth0"), shown
    assert f"nameserver {DNS_SERVER}" in values["dns"], shown
    assert values["token"] == TOKEN, shown
    assert forward.get("reply") == b"guest-says-hi\n", (forward, shown)
    assert "host-says-hi" in values, values           # what the host sent, printed by nc
    assert values["ncstatus"] == "0", shown
    assert passt_users <= {str(NOBODY)} and passt_users, passt_users
    assert not passt_in(inode)
