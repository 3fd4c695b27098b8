"""pytest fixtures for tests that need the default Linux guest at its shell (a plugin
module, loaded through ``pytest_plugins`` in tests/conftest.py).

A Linux boot costs minutes on kvm_pvm hosts; a restore costs about a second. So the
session boots the guest ONCE, with a 16 MiB scratch disk (/dev/vda, serial
"scratch"), writes a marker to /tmp/marker, snapshots it at its shell and stops it;
each test then gets guests restored from that snapshot:

    def test_something(linux_guest):            # one restored guest
        assert linux_guest.check("uname -s").strip() == "Linux"
        output, status = linux_guest.run("false")

    def test_more(restored_guest):               # as many as the test wants
        with restored_guest() as first, restored_guest() as second: ...

``restored_guest(directory=None, reset_disk=True)`` restores the session snapshot (or
another snapshot ``directory``); ``reset_disk`` first puts the scratch image back as it
was at the session snapshot. Guests are tests/linux_snapshot.py's GuestShell: ``run``,
``check``, ``ctl`` (control socket), ``snapshot``, ``stop``. Every guest a test started
is stopped after it.
"""

from __future__ import annotations

import pytest

from pykvm.machine import default_guest_dir

from .linux_snapshot import GuestShell, boot_and_snapshot


def _skip_without_linux() -> None:
    from .conftest import _REASON
    if _REASON is not None:
        pytest.skip(f"needs /dev/kvm: {_REASON}")
    if default_guest_dir() is None:
        pytest.skip("the default Linux guest is not built (pykvm guest build)")


@pytest.fixture(scope="session")
def linux_snapshot(tmp_path_factory):
    """The default guest booted once to its shell and snapshotted there (LinuxSnapshot)."""
    _skip_without_linux()
    return boot_and_snapshot(tmp_path_factory.mktemp("linux-snapshot"))


@pytest.fixture
def restored_guest(linux_snapshot, tmp_path):
    started: list[GuestShell] = []

    def restore(directory=None, reset_disk: bool = True) -> GuestShell:
        if reset_disk:
            linux_snapshot.reset_disk()
        index = len(started)
        shell = GuestShell(["--restore", str(directory or linux_snapshot.directory)],
                           api_sock=tmp_path / f"guest{index}.sock",
                           log=tmp_path / f"guest{index}.log")
        started.append(shell)
        return shell

    yield restore
    for shell in started:
        shell.stop()


@pytest.fixture
def linux_guest(restored_guest) -> GuestShell:
    """One guest restored from the session snapshot, its shell answering."""
    return restored_guest()
