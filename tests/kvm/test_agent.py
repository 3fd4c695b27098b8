"""The guest agent: its frames, the host client, the C agent and its virtio channel.

Without KVM:
- the framing and the client against a fake channel (a scripted agent in Python);
- pykvm/guestimage/agent.c itself, compiled here and run on the host over a socketpair
  (``--fd``): exit statuses, separate stdout/stderr, 1 MiB through, stdin, timeouts,
  concurrent commands, files and directories;
- the virtio-serial device (multiport console) behind the PCI transport, driven the
  way Linux's virtio_console driver brings a named port up;
- --share images (mke2fs -d, read back with debugfs, byte-identical twice).

With KVM and the default guest (marked ``linux``): ONE guest — booted once and
snapshotted by the pytest plugin's ``linux_vm``, then restored (later runs only
restore: the snapshot is kept in ~/.cache/pykvm/snapshots) — serves the exec
statuses, 1 MiB of output, a clean timeout, file copies both ways, the --share
directory read-only at /mnt/share, and ``pykvm exec`` / ``pykvm cp`` through the
control socket.
"""

from __future__ import annotations

import errno
import hashlib
import os
import random
import shutil
import socket
import stat
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pykvm import agent
from pykvm.agent import (AgentClient, AgentError, AgentTimeout, AgentUnavailable, FrameReader,
                         GuestFileError, ProtocolError, Result, frame)

from ..fakes import wait_for

REPO = Path(__file__).resolve().parents[2]
AGENT_C = REPO / "pykvm" / "guestimage" / "agent.c"


# --- frames ---------------------------------------------------------------------------------------
def test_frames_round_trip_whatever_the_read_sizes():
    stream = b"".join([frame(agent.EXEC, 1, b"abc"), frame(agent.STDIN, 1, b""),
                       frame(agent.DATA, 0xFFFFFFFF, bytes(range(256)) * 300)])
    for step in (1, 7, 12, 13, 4096, len(stream)):
        reader, got = FrameReader(), []
        for i in range(0, len(stream), step):
            got += reader.feed(stream[i:i + step])
        assert got == [(agent.EXEC, 1, b"abc"), (agent.STDIN, 1, b""),
                       (agent.DATA, 0xFFFFFFFF, bytes(range(256)) * 300)]
        assert reader.buffered == 0


def test_header_layout_is_the_documented_one():
    assert frame(agent.PING, 0x01020304, b"xy") == b"PK\x07\x00\x04\x03\x02\x01\x02\x00\x00\x00xy"


def test_bad_magic_and_oversized_frames_are_protocol_errors():
    with pytest.raises(ProtocolError, match="out of step"):
        FrameReader().feed(b"XX" + bytes(10))
    with pytest.raises(ProtocolError, match="exceeds"):
        FrameReader().feed(struct.pack("<HBBII", agent.MAGIC, agent.DATA, 0, 1, agent.MAX_PAYLOAD + 1))
    with pytest.raises(ValueError):
        frame(agent.DATA, 1, bytes(agent.MAX_PAYLOAD + 1))


def test_data_is_cut_into_chunks_with_an_end_frame():
    frames = agent.data_frames(agent.STDIN, 5, bytes(agent.CHUNK * 2 + 1), end=True)
    lengths = [item[2] for item in FrameReader().feed(b"".join(frames))]
    assert [len(x) for x in lengths] == [agent.CHUNK, agent.CHUNK, 1, 0]
    assert agent.data_frames(agent.STDIN, 5, b"", end=False) == []


def test_exec_payload_round_trips_and_refuses_nul():
    payload = agent.exec_payload(["ls", "-l", "a b"], shell=False, stdin=True,
                                 env={"A": "1", "B": "x=y"}, cwd="/tmp")
    assert agent.parse_exec_payload(payload) == (agent.EXEC_STDIN, ["ls", "-l", "a b"],
                                                 ["A=1", "B=x=y"], "/tmp")
    assert agent.parse_exec_payload(agent.exec_payload(["echo hi"], shell=True, stdin=False)) == \
        (agent.EXEC_SHELL, ["echo hi"], [], "")
    with pytest.raises(ValueError):
        agent.exec_payload(["a\0b"], shell=False, stdin=False)
    with pytest.raises(ValueError):
        agent.exec_payload(["x"], shell=False, stdin=False, env={"A=B": "1"})


# --- the client against a scripted agent --------------------------------------------------------------
class FakeAgent:
    """The guest side in Python: answers each frame the client sends through ``script``
    (a callable (type, id, payload) -> frames to feed back), on another thread as a real
    channel would."""

    def __init__(self, script):
        self.script = script
        self.reader = FrameReader()
        self.received = []
        self.client = AgentClient(self.send)

    def send(self, data: bytes) -> None:
        for kind, request_id, payload in self.reader.feed(data):
            self.received.append((kind, request_id, payload))
            replies = self.script(kind, request_id, payload)
            if replies:
                threading.Thread(target=self.client.feed, args=(b"".join(replies),)).start()


def pong(kind, request_id, payload):
    return [frame(agent.PONG, request_id, payload)] if kind == agent.PING else None


def test_client_keeps_stdout_stderr_and_status_apart():
    def script(kind, request_id, payload):
        if kind == agent.EXEC:
            return [frame(agent.STDOUT, request_id, b"out1 "), frame(agent.STDERR, request_id, b"err"),
                    frame(agent.STDOUT, 999, b"someone else's"), frame(agent.STDOUT, request_id, b"out2"),
                    frame(agent.EXIT, request_id, struct.pack("<i", 7))]
        return pong(kind, request_id, payload)

    fake = FakeAgent(script)
    result = fake.client.exec("whatever", timeout=5)
    assert result == Result(7, b"out1 out2", b"err", result.seconds)
    assert fake.client.discarded == 1
    flags, argv, env, cwd = agent.parse_exec_payload(
        next(p for k, _, p in fake.received if k == agent.EXEC))
    assert flags == agent.EXEC_SHELL and argv == ["whatever"]


@pytest.mark.parametrize("refresh_answer", [None, errno.ENOSYS, errno.EPERM])
def test_a_restored_guest_is_refreshed_before_its_command(refresh_answer):
    """pykvm/warm/guest.fresh_exec: REFRESH (seed, time), then the command line; an
    agent without REFRESH (ENOSYS) gets the old ``pykvm-agent --refresh`` EXEC; any
    other refusal means the guest is not fresh: RefreshFailed, the command not run."""
    from types import SimpleNamespace

    from pykvm.errors import RefreshFailed
    from pykvm.warm.guest import AGENT_BINARY, REFRESH_SEED_BYTES, fresh_exec

    def script(kind, request_id, payload):
        if kind == agent.REFRESH:
            if refresh_answer is None:
                return [frame(agent.OK, request_id)]
            return [frame(agent.ERROR, request_id, struct.pack("<I", refresh_answer) + b"no")]
        if kind == agent.EXEC:
            return [frame(agent.STDOUT, request_id, b"ran"),
                    frame(agent.EXIT, request_id, struct.pack("<i", 4))]
        return pong(kind, request_id, payload)

    fake = FakeAgent(script)
    guest = SimpleNamespace(machine=SimpleNamespace(agent=fake.client, exec=fake.client.exec))
    before = time.time_ns()
    if refresh_answer == errno.EPERM:
        with pytest.raises(RefreshFailed):
            fresh_exec(guest, "date", timeout=5)
        assert [k for k, _, _ in fake.received] == [agent.REFRESH]
        return
    assert fresh_exec(guest, "date", timeout=5).status == 4
    kinds = [k for k, _, _ in fake.received if k != agent.PING]
    refresh = next(p for k, _, p in fake.received if k == agent.REFRESH)
    seconds, nanoseconds = struct.unpack_from("<QI", refresh)
    assert before <= seconds * 10**9 + nanoseconds <= time.time_ns()
    assert len(refresh) == 12 + REFRESH_SEED_BYTES
    flags, argv, _, _ = agent.parse_exec_payload(
        next(p for k, _, p in fake.received if k == agent.EXEC))
    if refresh_answer is None:
        assert kinds == [agent.REFRESH, agent.EXEC] and argv == ["date"]
    else:
        assert kinds == [agent.REFRESH, agent.EXEC, agent.STDIN, agent.STDIN]
        assert argv[:2] == [AGENT_BINARY, "--refresh"] and argv[-1] == "date"


def test_client_sends_stdin_and_a_kill_after_the_timeout():
    def script(kind, request_id, payload):
        if kind == agent.SIGNAL:
            assert struct.unpack("<I", payload)[0] == 9
            return [frame(agent.STDOUT, request_id, b"partial"),
                    frame(agent.EXIT, request_id, struct.pack("<i", 137))]
        return pong(kind, request_id, payload)

    fake = FakeAgent(script)
    started = time.monotonic()
    with pytest.raises(AgentTimeout) as caught:
        fake.client.exec(["sleep", "99"], timeout=0.3, stdin=b"in" * 40000)
    assert 0.3 <= time.monotonic() - started < 5
    assert caught.value.result.status == 137 and caught.value.result.stdout == b"partial"
    assert isinstance(caught.value, TimeoutError)
    stdin = b"".join(p for k, _, p in fake.received if k == agent.STDIN)
    assert stdin == b"in" * 40000
    assert [p for k, _, p in fake.received if k == agent.STDIN][-1] == b""   # end of input


def test_client_reports_agent_errors_and_file_errors():
    def script(kind, request_id, payload):
        if kind in (agent.EXEC, agent.GET_FILE):
            return [frame(agent.ERROR, request_id, struct.pack("<I", errno.ENOENT) + b"gone")]
        return pong(kind, request_id, payload)

    fake = FakeAgent(script)
    with pytest.raises(AgentError, match="gone"):
        fake.client.exec("x")
    with pytest.raises(GuestFileError) as caught:
        fake.client.get_file("/nope")
    assert caught.value.errno == errno.ENOENT


def test_a_garbled_stream_fails_what_waits_and_a_closed_client_refuses():
    def script(kind, request_id, payload):
        if kind == agent.EXEC:
            return [b"garbage that is no frame header"]
        return pong(kind, request_id, payload)

    fake = FakeAgent(script)
    with pytest.raises(AgentError, match="protocol error"):
        fake.client.exec("x", timeout=5)
    fake.client.close("the VM was closed")
    with pytest.raises(AgentUnavailable, match="closed"):
        fake.client.exec("x")


def test_waiting_for_an_agent_that_never_answers_gives_up():
    client = AgentClient(lambda data: None)
    with pytest.raises(AgentUnavailable, match="did not answer"):
        client.wait_ready(0.5)
    stopped = AgentClient(lambda data: None, alive=lambda: False)
    with pytest.raises(AgentUnavailable, match="stopped"):
        stopped.exec("x", ready_timeout=5)


def test_result_serialises_for_the_control_socket():
    result = Result(3, b"\x00\xffout", b"err", 1.23456)
    assert Result.from_dict(result.as_dict()) == Result(3, b"\x00\xffout", b"err", 1.235)
    assert not result.ok and result.returncode == 3


# --- a hostile guest: modes, symlinks, sizes (issue 12, item 10) ---------------------------------------
def file_agent(content: bytes, mode: int, chunk: int = agent.CHUNK):
    """A guest that answers every GET_FILE with ``content`` and ``mode``."""
    def script(kind, request_id, payload):
        if kind == agent.GET_FILE:
            return [frame(agent.FILE_INFO, request_id, struct.pack("<IQ", mode, len(content))),
                    *agent.data_frames(agent.DATA, request_id, content, end=True)]
        return pong(kind, request_id, payload)
    return FakeAgent(script)


def user_mode(executable: bool) -> int:
    return (0o777 if executable else 0o666) & ~agent.current_umask()


def test_copy_out_never_applies_the_guests_setuid_bits_or_modes(tmp_path):
    """Before: a guest reporting 0o6777 got a setuid, world-writable file on the host."""
    file_agent(b"#!/bin/sh\n", 0o7777).client.copy_out("/bin/evil", tmp_path / "evil")
    evil = (tmp_path / "evil").stat()
    assert evil.st_mode & 0o7777 == user_mode(True)
    assert not evil.st_mode & (stat.S_ISUID | stat.S_ISGID | stat.S_ISVTX)
    assert evil.st_uid == os.geteuid()
    file_agent(b"data", 0o4600).client.copy_out("/etc/x", tmp_path / "x")
    assert (tmp_path / "x").stat().st_mode & 0o7777 == user_mode(False)
    assert (tmp_path / "x").read_bytes() == b"data"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evil", "x"]   # no temporary left


def test_copy_out_replaces_a_planted_symlink_and_never_follows_it(tmp_path):
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    (tmp_path / "out").symlink_to(victim)
    file_agent(b"from the guest", 0o644).client.copy_out("/f", tmp_path / "out")
    assert victim.read_bytes() == b"precious"
    assert not (tmp_path / "out").is_symlink()
    assert (tmp_path / "out").read_bytes() == b"from the guest"


def test_what_a_guest_sends_back_is_bounded_and_streamed_to_disk(tmp_path):
    big = random.Random(3).randbytes(5 << 20)
    fake = file_agent(big, 0o644)
    fake.client.max_file = 4 << 20
    with pytest.raises(GuestFileError, match="larger than 4194304 bytes") as caught:
        fake.client.copy_out("/big", tmp_path / "big")
    assert caught.value.errno == errno.EFBIG
    assert list(tmp_path.iterdir()) == []               # nothing half-written stays
    with pytest.raises(GuestFileError, match="larger than"):
        fake.client.get_file("/big", limit=1 << 20)
    # to disk it streams: 5 MiB copies out while only 1 MiB may be held in memory
    fake = file_agent(big, 0o644)
    fake.client.max_output = 1 << 20
    fake.client.copy_out("/big", tmp_path / "big")
    assert (tmp_path / "big").read_bytes() == big
    with pytest.raises(GuestFileError, match="larger than"):
        fake.client.get_file("/big")


def test_a_sink_is_written_by_the_waiting_thread_not_the_channels():
    """The channel's thread is a device thread: the sandbox keeps it from opening files
    (copy_out failed with EACCES in a real guest) and it must not wait for a disk."""
    content = random.Random(4).randbytes(agent.MAX_PENDING * 2 + 5)   # the channel waits too
    writers, written = set(), bytearray()

    class Sink:
        def write(self, data):
            writers.add(threading.current_thread())
            written.extend(data)

    assert file_agent(content, 0o644).client.get_file_into("/f", Sink()) == 0o644
    assert writers == {threading.current_thread()} and written == content


def test_exec_output_past_the_limit_kills_the_command(tmp_path):
    def script(kind, request_id, payload):
        if kind == agent.EXEC:
            return agent.data_frames(agent.STDOUT, request_id, bytes(3 << 20), end=False)
        if kind == agent.SIGNAL:
            return [frame(agent.EXIT, request_id, struct.pack("<i", 137))]
        return pong(kind, request_id, payload)

    fake = FakeAgent(script)
    with pytest.raises(agent.TooMuchOutput, match="stdout passed 1048576 bytes; it was killed"):
        fake.client.exec("yes", timeout=10, limit=1 << 20)
    assert any(k == agent.SIGNAL and struct.unpack("<I", p)[0] == 9
               for k, _, p in fake.received)


def test_a_directory_copied_out_gets_the_users_modes(tmp_path):
    import io
    import tarfile

    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w") as tar:
        for name, kind, mode in (("sub", tarfile.DIRTYPE, 0o7777), ("sub/suid", tarfile.REGTYPE,
                                 0o6755), ("plain", tarfile.REGTYPE, 0o4666)):
            info = tarfile.TarInfo(name)
            info.type, info.mode, info.uid, info.gid = kind, mode, 0, 0
            info.size = 1 if kind == tarfile.REGTYPE else 0
            tar.addfile(info, io.BytesIO(b"x") if kind == tarfile.REGTYPE else None)
    stream = archive.getvalue()

    def script(kind, request_id, payload):
        if kind == agent.GET_FILE:
            return [frame(agent.ERROR, request_id, struct.pack("<I", errno.EISDIR) + b"dir")]
        if kind == agent.EXEC:
            return [*agent.data_frames(agent.STDOUT, request_id, stream, end=False),
                    frame(agent.EXIT, request_id, struct.pack("<i", 0))]
        return pong(kind, request_id, payload)

    FakeAgent(script).client.copy_out("/d", tmp_path / "d")
    assert (tmp_path / "d" / "sub").stat().st_mode & 0o7777 == user_mode(True)
    assert (tmp_path / "d" / "sub" / "suid").stat().st_mode & 0o7777 == user_mode(True)
    assert (tmp_path / "d" / "plain").stat().st_mode & 0o7777 == user_mode(False)
    assert (tmp_path / "d" / "plain").read_bytes() == b"x"


# --- the C agent, on the host ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def agent_binary(tmp_path_factory):
    if shutil.which("gcc") is None:
        pytest.skip("needs gcc to build pykvm/guestimage/agent.c")
    binary = tmp_path_factory.mktemp("agent") / "pykvm-agent"
    subprocess.run(["gcc", "-O2", "-Wall", "-Wextra", "-Werror", "-o", str(binary), str(AGENT_C)],
                   check=True)
    return binary


class HostAgent:
    """pykvm-agent on this host, its channel a socketpair, a client on our end."""

    def __init__(self, binary):
        ours, theirs = socket.socketpair()
        self.socket = ours
        self.process = subprocess.Popen([str(binary), "--fd", str(theirs.fileno()), "--no-mount"],
                                        pass_fds=[theirs.fileno()], stderr=subprocess.PIPE)
        theirs.close()
        self.client = AgentClient(ours.sendall)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        self.client.wait_ready(10)

    def _read(self):
        while True:
            try:
                data = self.socket.recv(1 << 16)
            except OSError:
                data = b""
            if not data:
                self.client.close("the agent's socket closed")
                return
            self.client.feed(data)

    def close(self):
        self.socket.shutdown(socket.SHUT_RDWR)     # wakes our reader; the agent sees EOF
        self.reader.join(5)
        self.socket.close()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process.stderr.close()


@pytest.fixture
def host_agent(agent_binary):
    running = HostAgent(agent_binary)
    yield running.client
    running.close()


def test_agent_reports_ready_with_its_version(host_agent):
    assert host_agent.ready_info == "protocol 1: pykvm-agent 1"


@pytest.mark.parametrize("command, status", [
    ("true", 0), ("exit 1", 1), ("exit 7", 7), ("no-such-command-here", 127),
    (["no-such-command-here"], 127), (["/dev/null"], 126), ("kill -9 $$", 137),
    ("kill -TERM $$", 143), ("trap 'exit 9' EXIT; exit 2", 9), ("exit 300", 44),
    ("if", 2)])
def test_agent_exit_statuses(host_agent, command, status):
    # (each in a fresh agent: a command line runs in its zygote, whose EXIT trap reports
    # the status, or waitpid when the command's own trap or a signal ends it)
    assert host_agent.exec(command, timeout=30).status == status


def test_agent_keeps_stdout_and_stderr_apart(host_agent):
    result = host_agent.exec("echo out; echo err >&2; printf more; exit 3", timeout=30)
    assert (result.status, result.stdout, result.stderr) == (3, b"out\nmore", b"err\n")


def test_agent_moves_megabytes_of_output_and_input(host_agent, tmp_path):
    data = random.Random(1).randbytes(3 << 20)
    (tmp_path / "blob").write_bytes(data)
    result = host_agent.exec(["cat", str(tmp_path / "blob")], timeout=60)
    assert hashlib.sha256(result.stdout).digest() == hashlib.sha256(data).digest()
    echoed = host_agent.exec(["sha256sum"], stdin=data, timeout=60)
    assert echoed.stdout.split()[0].decode() == hashlib.sha256(data).hexdigest()


def test_agent_timeout_kills_the_process_group_and_the_next_command_runs(host_agent, tmp_path):
    marker = tmp_path / "survived"
    started = time.monotonic()
    with pytest.raises(AgentTimeout) as caught:
        host_agent.exec(f"echo started; (sleep 3; touch {marker}) & sleep 60", timeout=1)
    assert time.monotonic() - started < 10
    assert caught.value.result.status == 137 and caught.value.result.stdout == b"started\n"
    assert host_agent.exec("echo next", timeout=30).stdout == b"next\n"
    time.sleep(3.5)
    assert not marker.exists()          # the background job died with its group


def test_agent_runs_commands_concurrently(host_agent):
    results = {}

    def run(n):
        results[n] = host_agent.exec(f"sleep 0.5; echo {n}", timeout=30)

    threads = [threading.Thread(target=run, args=(n,)) for n in range(6)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert time.monotonic() - started < 3
    assert {n: r.stdout for n, r in results.items()} == {n: f"{n}\n".encode() for n in range(6)}


def test_agent_environment_and_working_directory(host_agent, tmp_path):
    result = host_agent.exec(["sh", "-c", 'echo "$GREETING"; pwd'], env={"GREETING": "hi there"},
                             cwd=str(tmp_path), timeout=30)
    assert result.stdout == f"hi there\n{tmp_path}\n".encode()
    assert host_agent.exec("pwd", timeout=30).stdout == b"/\n"
    assert host_agent.exec("pwd", cwd="/no/such/dir", timeout=30).status == 126


def test_agent_files_in_and_out(host_agent, tmp_path):
    data = random.Random(2).randbytes(1 << 20) + b"tail"
    host_agent.put_file(str(tmp_path / "f"), data, 0o640)
    assert (tmp_path / "f").read_bytes() == data
    assert (tmp_path / "f").stat().st_mode & 0o777 == 0o640
    assert not list(tmp_path.glob("*.pykvm-part"))
    assert host_agent.get_file(str(tmp_path / "f")) == (data, 0o640)
    assert host_agent.get_file("/proc/self/status")[0].startswith(b"Name:")   # size 0 in stat
    with pytest.raises(GuestFileError) as caught:
        host_agent.get_file(str(tmp_path))
    assert caught.value.errno == errno.EISDIR
    with pytest.raises(GuestFileError) as caught:
        host_agent.put_file(str(tmp_path / "no" / "dir" / "f"), b"x")
    assert caught.value.errno == errno.ENOENT
    assert host_agent.exec("echo still fine", timeout=30).stdout == b"still fine\n"


def test_agent_copies_directories_both_ways(host_agent, tmp_path):
    source = tmp_path / "src"
    (source / "sub").mkdir(parents=True)
    (source / "a.txt").write_text("alpha\n")
    (source / "sub" / "b.bin").write_bytes(bytes(range(256)) * 100)
    os.chmod(source / "a.txt", 0o600)
    host_agent.copy_in(source, str(tmp_path / "in-guest"))
    assert (tmp_path / "in-guest" / "sub" / "b.bin").read_bytes() == bytes(range(256)) * 100
    host_agent.copy_out(str(tmp_path / "in-guest"), tmp_path / "back")
    assert (tmp_path / "back" / "a.txt").read_text() == "alpha\n"
    assert (tmp_path / "back" / "sub" / "b.bin").read_bytes() == bytes(range(256)) * 100
    host_agent.copy_out(str(tmp_path / "in-guest" / "a.txt"), tmp_path / "one.txt")
    assert (tmp_path / "one.txt").read_text() == "alpha\n"


def test_agent_skips_garbage_and_answers_the_next_frame(agent_binary):
    running = HostAgent(agent_binary)
    try:
        running.socket.sendall(b"\x00garbage PK\x99")
        assert running.client.ping(5)
        assert running.client.exec("echo ok", timeout=30).stdout == b"ok\n"
    finally:
        running.close()


def children(pid: int) -> list[int]:
    """The live processes whose parent is ``pid``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid and fields[0] != "Z":
                found.append(int(entry.name))
    return found


def test_agent_runs_the_first_command_line_in_the_shell_it_started_before_ready(agent_binary):
    running = HostAgent(agent_binary)
    try:
        zygote, = children(running.process.pid)         # there at READY, before any EXEC
        # an EXEC the zygote cannot run as sh -c would (environment) forks and leaves it
        other = running.client.exec("echo $$ $GREETING", env={"GREETING": "hi"}, timeout=30)
        assert other.stdout.split()[1] == b"hi" and int(other.stdout.split()[0]) != zygote
        first = running.client.exec(
            'echo $$; cat; for fd in 3 4; do [ -e /proc/$$/fd/$fd ] && echo "fd $fd open"; done;'
            ' echo err >&2; exit 5', timeout=30)
        # stdin is /dev/null (cat returns at once) and neither pipe of its start-up is open
        assert (first.status, first.stdout, first.stderr) == (5, f"{zygote}\n".encode(), b"err\n")
        second = running.client.exec("echo $$", timeout=30)
        assert second.status == 0 and int(second.stdout) not in (zygote, int(other.stdout.split()[0]))
    finally:
        running.close()


def test_agent_forks_when_its_zygote_died(agent_binary):
    running = HostAgent(agent_binary)
    try:
        zygote, = children(running.process.pid)
        os.kill(zygote, 9)
        assert wait_for(lambda: zygote not in children(running.process.pid), 10)
        result = running.client.exec("echo ok; exit 3", timeout=30)
        assert (result.status, result.stdout) == (3, b"ok\n")
    finally:
        running.close()


def test_agent_refuses_a_refresh_it_cannot_do_without_touching_the_clock(host_agent):
    # (a valid REFRESH here would set this host's clock: only refusals are tested on the
    # host; tests/kvm/test_warm_start.py checks the real thing in guests)
    with pytest.raises(agent.RequestRefused) as caught:
        host_agent.refresh(bytes(513), time.time_ns(), timeout=30)
    assert caught.value.errno == errno.EINVAL and "513 bytes of seed" in str(caught.value)
    assert host_agent.exec("echo still fine", timeout=30).stdout == b"still fine\n"


# --- the virtio-serial device, as Linux's virtio_console drives it --------------------------------------------
def test_virtio_serial_brings_a_named_port_up_and_carries_data():
    from pykvm.devices.virtio import ports
    from pykvm.devices.virtio.device import VIRTIO_F_VERSION_1
    from pykvm.devices.virtio.driver import DriverRing, PciDriver, RecordingLine, StandInVm
    from pykvm.devices.virtio.pci import VirtioPciDevice
    from pykvm.memory import GuestMemory

    received, opened = [], []
    device = ports.PortsDevice([(agent.PORT_NAME, received.append)],
                               on_open=lambda port, state: opened.append((port, state)))
    assert device.offered_features & ports.VIRTIO_CONSOLE_F_MULTIPORT
    with GuestMemory.anonymous(16 << 20) as memory:
        stand_in = StandInVm(memory)
        function = VirtioPciDevice(stand_in, memory, device,
                                   interrupt_lines=[RecordingLine(24 + i) for i in range(5)])
        try:
            driver = PciDriver(function)
            assert driver.negotiate(VIRTIO_F_VERSION_1 | ports.VIRTIO_CONSOLE_F_MULTIPORT) & 8
            assert driver.read(0x2000 + 4, 4) == 1                    # max_nr_ports
            rings = [DriverRing(memory, 0x1000 + 0x4000 * i, 16) for i in range(4)]
            for index, ring in enumerate(rings):
                driver.setup_queue(index, ring)
            driver.driver_ok()
            rx, tx, control_rx, control_tx = rings
            for slot in range(4):
                control_rx.add_chain([(0x100000 + 0x1000 * slot, 0x1000, True)])
            driver.notify(2)

            def control(event, value, port=0xFFFFFFFF, at=0x200000):
                memory.write(at, struct.pack("<IHH", port, event, value))
                control_tx.add_chain([(at, 8, False)])
                driver.notify(3)

            def messages(count):
                assert wait_for(lambda: control_rx.used_idx() >= count)
                return [(memory.read(0x100000 + 0x1000 * head, 8), memory.read(
                    0x100000 + 0x1000 * head + 8, length - 8)) for head, length in
                    control_rx.take_used()]

            control(ports.DEVICE_READY, 1)
            (add, _), = messages(1)
            assert struct.unpack("<IHH", add) == (0, ports.PORT_ADD, 0)
            control(ports.PORT_READY, 1, port=0)
            (name_head, name), (open_head, _) = messages(3)
            assert struct.unpack("<IHH", name_head) == (0, ports.PORT_NAME, 1)
            assert name == agent.PORT_NAME.encode() + b"\0"
            assert struct.unpack("<IHH", open_head) == (0, ports.PORT_OPEN, 1)   # host connected

            # Linux drops what reaches a port nobody opened: it waits for the open
            device.send(0, b"to the guest")
            rx.add_chain([(0x310000, 64, True)])
            driver.notify(0)
            time.sleep(0.2)
            assert rx.used_idx() == 0 and device.pending(0) == 12
            control(ports.PORT_OPEN, 1, port=0)
            assert wait_for(lambda: opened == [(0, True)])
            assert wait_for(lambda: rx.used_idx() == 1)
            assert rx.take_used() == [(0, 12)] and memory.read(0x310000, 12) == b"to the guest"

            memory.write(0x300000, b"to the host")
            tx.add_chain([(0x300000, 11, False)])
            driver.notify(1)
            assert wait_for(lambda: received == [b"to the host"])
            state = device.save_state()
            assert state.ports[0].ready and state.ports[0].guest_open
        finally:
            function.close()
            stand_in.close()




# --- --share images ---------------------------------------------------------------------------------------------
def test_share_image_holds_the_directory_and_is_reproducible(tmp_path):
    from pykvm import share

    if shutil.which("mke2fs") is None or shutil.which("debugfs") is None:
        pytest.skip("needs e2fsprogs (mke2fs, debugfs)")
    source = tmp_path / "dir"
    (source / "sub").mkdir(parents=True)
    (source / "hello.txt").write_text("hello share\n")
    (source / "sub" / "blob").write_bytes(random.Random(3).randbytes(300000))
    first = share.build_image(source, tmp_path / "1.img")
    second = share.build_image(source, tmp_path / "2.img")
    assert first.read_bytes() == second.read_bytes()
    shown = subprocess.run(["debugfs", "-R", "cat /hello.txt", str(first)], capture_output=True)
    assert shown.stdout == b"hello share\n"
    blob = subprocess.run(["debugfs", "-R", "cat /sub/blob", str(first)], capture_output=True)
    assert blob.stdout == (source / "sub" / "blob").read_bytes()
    assert share.serial(0) == "pykvm-share" and share.mount_point(1) == "/mnt/share1"
    with pytest.raises(Exception, match="not a directory"):
        share.build_image(tmp_path / "missing", tmp_path / "3.img")


# --- one Linux guest for everything -------------------------------------------------------------------------------
SHARE = Path(f"/tmp/pykvm-test-share-{os.getuid()}")
SHARE_FILES = {"hello.txt": b"hello from the host\n",
               "sub/data.bin": random.Random(4).randbytes(200000)}
SHARE_MTIME = 1_700_000_000


def make_share() -> Path:
    """The same content and times every time, so the plugin's snapshot key stays the same
    (tests/kvm/test_pytest_plugin.py shares it)."""
    for name, content in SHARE_FILES.items():
        path = SHARE / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists() or path.read_bytes() != content:
            path.write_bytes(content)
        os.utime(path, (SHARE_MTIME, SHARE_MTIME))
    for directory in (SHARE / "sub", SHARE):
        os.utime(directory, (SHARE_MTIME, SHARE_MTIME))
    return SHARE


make_share()


@pytest.mark.linux
@pytest.mark.pykvm_share(SHARE)
def test_linux_guest_exec_files_and_share(linux_vm, tmp_path):
    # exit statuses, stdout and stderr apart
    result = linux_vm.exec("echo out; echo err >&2; exit 7", timeout=120)
    assert (result.status, result.stdout, result.stderr) == (7, b"out\n", b"err\n")
    assert linux_vm.exec("true", timeout=120).status == 0
    assert linux_vm.exec("false", timeout=120).status == 1
    assert linux_vm.exec("no-such-command", timeout=120).status == 127
    assert linux_vm.exec(["no-such-command"], timeout=120).status == 127
    assert linux_vm.exec("kill -9 $$", timeout=120).status == 137
    assert linux_vm.exec(["uname", "-s"], timeout=120).stdout == b"Linux\n"

    # 1 MiB+ of output, checksummed
    expected = "".join(f"{n}\n" for n in range(1, 200001)).encode()
    assert len(expected) > 1 << 20
    big = linux_vm.exec("seq 1 200000", timeout=300)
    assert big.status == 0 and hashlib.sha256(big.stdout).digest() == hashlib.sha256(expected).digest()

    # a clean timeout; the next command still runs
    with pytest.raises(AgentTimeout) as caught:
        linux_vm.exec("echo before; sleep 600", timeout=5)
    assert caught.value.result.stdout == b"before\n" and caught.value.result.status == 137
    assert linux_vm.exec("echo after", timeout=120).stdout == b"after\n"

    # files in and out, checksums on both sides
    data = random.Random(5).randbytes(1 << 20)
    linux_vm.put_file("/tmp/in.bin", data, 0o600)
    inside = linux_vm.exec(["sha256sum", "/tmp/in.bin"], timeout=120).stdout.split()[0].decode()
    assert inside == hashlib.sha256(data).hexdigest()
    linux_vm.exec("cp /tmp/in.bin /tmp/out.bin && echo x >> /tmp/out.bin", timeout=120)
    assert linux_vm.get_file("/tmp/out.bin") == data + b"x\n"
    source = tmp_path / "dir"
    (source / "sub").mkdir(parents=True)
    (source / "sub" / "f.txt").write_text("in a directory\n")
    linux_vm.copy_in(source, "/root/dir")
    linux_vm.copy_out("/root/dir", tmp_path / "back")
    assert (tmp_path / "back" / "sub" / "f.txt").read_text() == "in a directory\n"
    # a setuid file in the guest is the user's own plain file on the host
    linux_vm.exec("echo '#!/bin/sh' > /tmp/suid && chmod 6777 /tmp/suid", timeout=120, check=True)
    linux_vm.copy_out("/tmp/suid", tmp_path / "suid")
    assert (tmp_path / "suid").stat().st_mode & 0o7777 == user_mode(True)

    # --share: visible at /mnt/share, read-only
    assert linux_vm.get_file("/mnt/share/hello.txt") == SHARE_FILES["hello.txt"]
    shown = linux_vm.exec("sha256sum /mnt/share/sub/data.bin", timeout=120).stdout.split()[0]
    assert shown.decode() == hashlib.sha256(SHARE_FILES["sub/data.bin"]).hexdigest()
    denied = linux_vm.exec("touch /mnt/share/new", timeout=120)
    assert denied.status != 0 and b"Read-only file system" in denied.stderr
    assert b"/mnt/share ext" in linux_vm.get_file("/proc/mounts")

    # the same through the control socket: pykvm exec and pykvm cp
    from pykvm.control import ControlServer

    sock = tmp_path / "api.sock"
    with ControlServer(sock, linux_vm.machine):
        env = dict(os.environ, PYTHONPATH=str(REPO))
        done = subprocess.run([sys.executable, "-m", "pykvm", "exec", "--api-sock", str(sock),
                               "--", "echo to-stdout; echo to-stderr >&2; exit 5"],
                              capture_output=True, env=env, timeout=300)
        assert (done.returncode, done.stdout, done.stderr) == (5, b"to-stdout\n", b"to-stderr\n")
        done = subprocess.run([sys.executable, "-m", "pykvm", "exec", "--api-sock", str(sock),
                               "-t", "3", "--", "sleep", "600"],
                              capture_output=True, env=env, timeout=300)
        assert done.returncode == 124 and b"did not finish" in done.stderr
        (tmp_path / "up.txt").write_text("copied up\n")
        for argv in ([str(tmp_path / "up.txt"), "guest:/tmp/up.txt"],
                     ["guest:/tmp/up.txt", str(tmp_path / "down.txt")]):
            subprocess.run([sys.executable, "-m", "pykvm", "cp", "--api-sock", str(sock), *argv],
                           check=True, env=env, timeout=300)
        assert (tmp_path / "down.txt").read_text() == "copied up\n"
