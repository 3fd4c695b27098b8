"""virtio-vsock with the real default Linux guest and Firecracker's host side: ONE boot
(``pykvm run --vsock 3,uds=PATH -- SCRIPT``). The script runs pykvm-agent twice:

- ``--vsock-connect 5005``: the guest dials host port 5005, which reaches the host's
  listener at ``PATH_5005`` (a guest-initiated connection); the host runs a command
  through the agent on that connection, then closes it;
- ``--vsock-listen 1024 --once``: the host connects to ``PATH``, writes
  ``CONNECT 1024\\n``, gets ``OK <port>\\n`` and runs a command in the guest through
  the agent (a host-initiated connection), as a Firecracker user reaches a guest,
  then moves 1 MiB each way over it (credit updates in both directions).

Each guest fork+exec costs about 1.5 s on kvm_pvm; the boot most of the time.
"""

import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pykvm.agent import AgentClient
from pykvm.machine import default_guest_dir

from ..conftest import needs_kvm

GUEST = default_guest_dir()
ROOT = Path(__file__).resolve().parents[2]
BOOT_TIMEOUT = 1200
GUEST_PORT, HOST_PORT = 1024, 5005
AGENT = "/sbin/pykvm-agent"
BULK = os.urandom(1 << 20)       # 1 MiB each way: many times one connection's credit
SCRIPT = (f"echo phase=dial; {AGENT} --vsock-connect {HOST_PORT}; echo dialstatus=$?; "
          f"echo phase=listen; {AGENT} --vsock-listen {GUEST_PORT} --once; "
          f"echo listenstatus=$?")

pytestmark = [
    pytest.mark.linux,
    needs_kvm,
    pytest.mark.skipif(GUEST is None, reason="the default Linux guest is not built (make guest)"),
]


def run_over(sock: socket.socket, command: str, timeout: float = 300,
             more=()) -> tuple[int, bytes]:
    """Run ``command`` through the guest agent at the other end of ``sock`` (then each
    ``(command, stdin)`` of ``more``: their (status, stdout) go in ``sock``'s place in
    the result list); returns the first one's (status, stdout)."""
    client = AgentClient(sock.sendall)

    def pump():
        while data := sock.recv(65536):
            client.feed(data)
        client.close("the vsock connection closed")

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        result = client.exec(command, timeout=timeout, ready_timeout=timeout)
        for index, (extra, stdin) in enumerate(more):
            other = client.exec(extra, stdin=stdin, timeout=timeout)
            more[index] = (other.status, other.stdout)
        return result.status, result.stdout
    finally:
        sock.shutdown(socket.SHUT_RDWR)
        reader.join(timeout=30)
        sock.close()


def guest_dials_in(listener: socket.socket, result: dict) -> None:
    """Accept the guest's connection to HOST_PORT; run a command over it."""
    try:
        connection, _ = listener.accept()
        connection.settimeout(None)
        result["dial"] = run_over(connection, "echo dialled-in $((6 * 7))")
    except Exception as error:        # noqa: BLE001 - reported by the test
        result["dial_error"] = repr(error)


def host_connects(uds: Path, result: dict, deadline: float) -> None:
    """CONNECT to GUEST_PORT until the guest's agent listens (until then the guest
    answers RST and the muxer closes the client); run a command over it."""
    while time.monotonic() < deadline:
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            client.settimeout(60)
            client.connect(str(uds))
            client.sendall(b"CONNECT %d\n" % GUEST_PORT)
            line = b""
            while not line.endswith(b"\n") and (byte := client.recv(1)):
                line += byte
            match = re.fullmatch(rb"OK (\d+)\n", line)
            if match:
                result["local_port"] = int(match.group(1))
                client.settimeout(None)
                bulk = [("head -c 1048576 /dev/zero", None), ("wc -c", BULK)]
                result["connect"] = run_over(client, "uname -s", more=bulk)
                result["bulk"] = bulk
                return
        except Exception as error:    # noqa: BLE001 - retried, the last one reported
            result["connect_error"] = repr(error)
        client.close()
        time.sleep(1)


def test_host_and_guest_initiated_connections_reach_the_agent(tmp_path):
    uds = tmp_path / "v.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(f"{uds}_{HOST_PORT}")
    listener.listen(1)
    listener.settimeout(BOOT_TIMEOUT)
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    process = subprocess.Popen(
        [sys.executable, "-m", "pykvm", "run", "--vsock", f"3,uds={uds}", "--",
         "sh", "-c", SCRIPT],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    result: dict = {}
    values: dict = {}
    output = []
    dialler = threading.Thread(target=guest_dials_in, args=(listener, result))
    dialler.start()
    connector = None
    try:
        deadline = time.monotonic() + BOOT_TIMEOUT
        for line in process.stdout:
            output.append(line)
            key, _, value = line.strip().partition("=")
            values[key] = value
            if key == "phase" and value == "listen" and connector is None:
                connector = threading.Thread(target=host_connects, args=(uds, result, deadline))
                connector.start()
        process.wait(timeout=120)
        stderr = process.stderr.read()
    finally:
        if process.poll() is None:
            process.kill()
        listener.close()
        dialler.join(timeout=60)
        if connector is not None:
            connector.join(timeout=120)
    shown = "".join(output[-30:]) + stderr[-3000:] + repr(result)
    assert process.returncode == 0, shown
    assert result.get("dial") == (0, b"dialled-in 42\n"), shown
    assert values.get("dialstatus") == "0", shown
    status, stdout = result.get("connect", (None, b""))
    assert (status, stdout) == (0, b"Linux\n"), shown
    assert result["local_port"] >= 1 << 30, shown        # Firecracker's local port range
    (out_status, out), (in_status, counted) = result["bulk"]
    assert (out_status, out) == (0, bytes(1 << 20)), (out_status, len(out))
    assert (in_status, counted.strip()) == (0, b"%d" % len(BULK)), (in_status, counted)
    assert values.get("listenstatus") == "0", shown
    assert not uds.exists()                               # removed when pykvm ended
