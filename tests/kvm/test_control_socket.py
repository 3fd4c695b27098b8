"""The control socket against hostile clients (issue 12, items 6 and 12): bounded request
lines, nesting, numbers and connections; peer credentials checked on every connection.

Real sockets, a real (never started) flat machine, and real other users: clients that
run as uid 65534 in a child process.
"""

import json
import os
import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path

import pytest

from pykvm.control import MAX_CONNECTIONS, MAX_REQUEST, ControlServer, request

from ..conftest import needs_kvm

NOBODY = 65534


@pytest.fixture
def machine(tmp_path):
    from pykvm.machine import MachineConfig, build_for_boot

    flat = tmp_path / "hlt.bin"
    flat.write_bytes(b"\xf4")
    with build_for_boot(MachineConfig(flat=flat, mem_size=2 << 20)) as built:
        yield built


@pytest.fixture
def public_dir():
    """A directory other users can traverse (pytest's tmp_path is 0700 root's)."""
    path = Path(tempfile.mkdtemp(prefix="pykvm-ctl-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


def connect(path) -> socket.socket:
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.connect(str(path))          # blocking: waits while the backlog is full
    client.settimeout(10)
    return client


def answers(client: socket.socket, data: bytes) -> list[dict]:
    """Send ``data``, then every response line until the server closes or goes quiet."""
    client.sendall(data)
    received = b""
    client.settimeout(2)
    try:
        while True:
            chunk = client.recv(65536)
            if not chunk:
                break
            received += chunk
    except socket.timeout:
        pass
    return [json.loads(line) for line in received.splitlines()]


# --- item 6: parsing, line length, connections --------------------------------------------------
@needs_kvm
@pytest.mark.parametrize("line, error", [
    (b"[" * 50000 + b"\n", "nested deeper than"),
    (b'{"action": "status", "id": ' + b"7" * 5000 + b"}\n", "integer of 5000 digits"),
    (b'{"action": "status", "id": ' + b"[" * 2000 + b"]" * 2000 + b"}\n", "nested deeper"),
    (b"\xff\xfe\n", "not a JSON request"),
])
def test_a_hostile_request_is_one_error_and_the_connection_lives_on(tmp_path, machine,
                                                                    line, error):
    sock = tmp_path / "s"
    with ControlServer(sock, machine), connect(sock) as client:
        bad, good = answers(client, line + b'{"action": "status", "id": 1}\n')
        assert bad["ok"] is False and error in bad["error"]
        assert good["ok"] is True and good["id"] == 1 and good["state"] == "created"


@needs_kvm
def test_an_over_long_line_is_refused_whole_and_never_parsed_as_more_requests(tmp_path,
                                                                              machine):
    """Before: readline() cut the line at 64 KiB and parsed its tail as the next request,
    here a "stop"."""
    sock = tmp_path / "s"
    with ControlServer(sock, machine), connect(sock) as client:
        responses = answers(client, b" " * MAX_REQUEST + b'{"action": "stop"}\n'
                            + b'{"action": "status"}\n')
        assert len(responses) == 1, responses            # then the server hung up
        assert responses[0]["ok"] is False and "longer than" in responses[0]["error"]
        assert not machine.vm.stop_requested
        assert request(sock, {"action": "status"})["ok"]  # a new connection is served


@needs_kvm
def test_connections_are_bounded_and_extra_ones_refused_cleanly(tmp_path, machine):
    sock = tmp_path / "s"
    before = threading.active_count()
    with ControlServer(sock, machine):
        idle = [connect(sock) for _ in range(MAX_CONNECTIONS)]
        wait_for_threads(before + 1 + MAX_CONNECTIONS)
        try:
            for _ in range(20):
                client = connect(sock)
                response = json.loads(client.makefile("rb").readline())
                assert response == {"ok": False, "error": "too many connections "
                                    f"({MAX_CONNECTIONS} are served at once)"}
                client.close()
            # one accepting thread and one per served connection, whatever came after
            assert threading.active_count() == before + 1 + MAX_CONNECTIONS
        finally:
            for client in idle:
                client.close()
        wait_for_threads(before + 1)
        assert request(sock, {"action": "status"})["ok"]   # the slots came back


def wait_for_threads(count: int) -> None:
    deadline = time.monotonic() + 10
    while threading.active_count() != count and time.monotonic() < deadline:
        time.sleep(0.02)


# --- item 12: peer credentials ---------------------------------------------------------------------
def exchange_as_user(uid: int, gid: int, path, data: bytes) -> bytes:
    """Connect to the Unix socket ``path`` from a forked child running as ``uid``:``gid``,
    send ``data`` and return what the server sends until it closes or goes quiet (2 s).
    Only socket calls run between fork and _exit; the answer comes back through a pipe."""
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:
        status = 1
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            client.connect(str(path))
            client.settimeout(2)
            try:
                client.sendall(data)
            except BrokenPipeError:
                pass             # refused at once: the reason may still be there to read
            received = b""
            try:
                while chunk := client.recv(65536):
                    received += chunk
            except (socket.timeout, ConnectionResetError):
                pass
            os.write(write_end, b"+" + received)
            status = 0
        except BaseException as error:
            os.write(write_end, repr(error).encode())
        finally:
            os._exit(status)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as answer:
        reply = answer.read()
    _, status = os.waitpid(child, 0)
    assert status == 0, f"the client as another user failed: {reply!r}"
    return reply[1:]


def as_user(uid: int, gid: int, path) -> dict:
    """A status request as another user, and its one-line answer."""
    return json.loads(exchange_as_user(uid, gid, path, b'{"action": "status"}\n')
                      .splitlines()[0])


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="runs clients as another uid")


@needs_kvm
@needs_root
def test_another_user_is_refused_even_when_the_socket_file_lets_it_in(public_dir, machine):
    sock = public_dir / "s"
    with ControlServer(sock, machine):
        assert os.stat(sock).st_mode & 0o777 == 0o600
        os.chmod(sock, 0o666)                     # a mistake, or a directory that allows it
        response = as_user(NOBODY, NOBODY, sock)
        assert response == {"ok": False, "error": f"uid {NOBODY} may not use this socket"}
        assert request(sock, {"action": "status"})["ok"]          # root / the same uid


@needs_kvm
@needs_root
def test_api_sock_group_lets_that_group_in_deliberately(public_dir, machine):
    import grp

    group = grp.getgrgid(NOBODY).gr_name
    sock = public_dir / "s"
    with ControlServer(sock, machine, group=group):
        info = os.stat(sock)
        assert info.st_mode & 0o777 == 0o660 and info.st_gid == NOBODY
        assert as_user(NOBODY, NOBODY, sock)["ok"] is True
        os.chmod(sock, 0o666)
        other = as_user(NOBODY, 12345, sock)                      # not in the group
        assert other["ok"] is False and "may not use" in other["error"]
