"""pykvm's pytest plugin: virtual machines as fixtures.

Installed with pykvm (the ``pytest11`` entry point ``pykvm``), so any project that
has pykvm installed can use it; ``-p no:pykvm`` turns it off.

Fixtures
--------
``kvm``
    An open :class:`pykvm.kvm.Kvm`. Where KVM cannot be used the test is *skipped*,
    never errored, with the reason: no such device, no permission to open it, or
    another KVM API version. ``--pykvm-device PATH`` (or ``PYKVM_DEVICE``) names
    another device node; every fixture here honours it. ``--pykvm-require`` (or
    ``PYKVM_REQUIRE=1``) makes each of those skips a failure, for CI jobs that
    must not pass without running their VM tests.
``vm``
    :class:`FlatVm`, for tutorial-class guests: a few instructions assembled with GNU
    as (or raw bytes), loaded at 0x10000 and run in real, protected or long mode::

        def test_hello(vm):
            result = vm.run('''
                mov $COM1, %dx
                mov $'H', %al
                out %al, %dx
                mov $7, %al
                out %al, $EXIT_PORT ''')          # mode="real" (default), "protected", "long"
            assert result.output == b"H" and result.status == 7

    ``COM1`` (0x3f8, the serial port: its output is ``result.output``) and
    ``EXIT_PORT`` (0xf4: the byte written there stops the guest and is
    ``result.status``) are predefined.
``linux_vm``
    :class:`LinuxVm`: the default Linux guest (``pykvm guest build``; or
    ``--pykvm-kernel``/``--pykvm-initrd``) running, with the guest agent:
    ``linux_vm.exec("uname -r")`` returns ``Result(status, stdout, stderr)``; also
    ``put_file``, ``get_file``, ``copy_in``, ``copy_out`` (pykvm/agent/).
    Where KVM works but there is no guest (not built, no ``--pykvm-kernel``), the
    test *fails*, naming ``pykvm guest build``: that is a set-up step that was
    missed, not a host that cannot run VMs.

    A Linux boot takes minutes where guest ring 0 is emulated (kvm_pvm) and seconds
    on VT-x/AMD-V; so the plugin boots each distinct machine once, snapshots it with
    its agent answering (pykvm/snapshot), and gives every test a fresh guest restored
    from that snapshot (about a second): tests cannot see each other's changes. The
    snapshots are kept between sessions in ``--pykvm-snapshots DIR`` (default
    ``${PYKVM_CACHE:-~/.cache/pykvm}/snapshots``; ``none``: only for this session),
    under a key over the kernel, the initramfs, the machine's configuration, the
    host's kind of KVM and pykvm's own source, so a change to any of them boots
    again (pykvm/warm: the code ``pykvm run -- CMD``'s boot cache uses too).
    Where a snapshot cannot be taken, the booted guest is shared by the
    session's tests instead. A ``pykvm_disk`` image is part of the key by its
    content, and each test's guest is restored onto the test's own image (a guest
    at its ready point has read its disks, not written them); a machine with a
    ``pykvm_net`` (or a vhost-user disk) is booted afresh for each test (a restore
    would meet a TAP or a back end that no longer exists).
``linux_vms``
    A factory for tests that want more than one guest: ``linux_vms(**changes)``
    starts a fresh guest of the test's machine, ``changes`` replacing fields of its
    :class:`~pykvm.warm.guest.GuestSpec` (``disks=(DiskSpec(path),)``, ``mem=...``);
    each comes from the same one-boot-per-configuration snapshots.

Markers that configure ``linux_vm``
-----------------------------------
``@pytest.mark.pykvm_cpus(2)``, ``@pytest.mark.pykvm_mem("512M")`` (default 256M),
``@pytest.mark.pykvm_disk(path, read_only=False, serial="")`` (repeatable),
``@pytest.mark.pykvm_net("tap=NAME,...")`` (repeatable; ``pykvm run --net``'s
syntax: ``pykvm_net("user")`` or ``pykvm_net("user,fwd=tcp:8080:80")`` gives the
guest a network with no root, through passt, configured by DHCP at boot;
``--pykvm-net user`` or ``PYKVM_NET=user`` gives one to every machine without the marker), ``@pytest.mark.pykvm_share(directory)`` (repeatable; read-only at
/mnt/share, /mnt/share1, ...).

Failing tests
-------------
A test that fails while it uses ``vm`` or ``linux_vm`` gets the guest's console
output attached to its report (a ``pykvm console: ...`` section, printed under
the failure), with the tail of the boot log for a restored Linux guest.
"""

from __future__ import annotations

import pytest

from .flat import FlatResult, FlatVm
from .linux import LinuxVm, linux_spec
from .options import cannot_run, kvm_device
from .session import DEFAULT_BOOT_TIMEOUT, Session, default_snapshot_root, kvm_unavailable_reason

__all__ = ["FlatResult", "FlatVm", "LinuxVm", "default_snapshot_root", "kvm_unavailable_reason"]

MARKERS = (
    "pykvm_cpus(n): vCPUs of the linux_vm guest",
    "pykvm_mem(size): RAM of the linux_vm guest, e.g. '512M' (default 256M)",
    "pykvm_disk(path, read_only=False, serial=''): a virtio-blk disk for linux_vm (repeatable)",
    "pykvm_net(spec): a virtio-net NIC for linux_vm, as pykvm run --net (repeatable)",
    "pykvm_share(directory): a host directory read-only at /mnt/share in linux_vm (repeatable)",
)

_CONSOLES = pytest.StashKey[list]()
_STATE = pytest.StashKey["Session"]()


# --- options and configuration -------------------------------------------------------------------
def pytest_addoption(parser) -> None:
    group = parser.getgroup("pykvm", "pykvm virtual machines")
    group.addoption("--pykvm-device", metavar="PATH", default=None,
                    help="the KVM device node (default $PYKVM_DEVICE or /dev/kvm); tests that "
                         "need KVM are skipped when it cannot be used")
    group.addoption("--pykvm-require", action="store_true", default=None,
                    help="fail, instead of skipping, the tests that need KVM where it cannot "
                         "be used ($PYKVM_REQUIRE=1)")
    group.addoption("--pykvm-kernel", metavar="PATH", default=None,
                    help="the Linux kernel of linux_vm (default: the guest `pykvm guest build` "
                         "built; $PYKVM_KERNEL)")
    group.addoption("--pykvm-initrd", metavar="PATH", default=None,
                    help="its initramfs (default: the default guest's, whose /init starts the "
                         "agent, also with --pykvm-kernel; $PYKVM_INITRD)")
    group.addoption("--pykvm-append", metavar="WORDS", default=None,
                    help="extra kernel command line for linux_vm ($PYKVM_APPEND)")
    group.addoption("--pykvm-net", metavar="SPEC", default=None,
                    help="a NIC for every linux_vm without a pykvm_net marker, as pykvm run "
                         "--net SPEC: 'user' gives it a network with no root ($PYKVM_NET)")
    group.addoption("--pykvm-snapshots", metavar="DIR", default=None,
                    help="where booted linux_vm guests are kept as snapshots between sessions "
                         "(default $PYKVM_SNAPSHOTS or ~/.cache/pykvm/snapshots; 'none': "
                         "for this session only)")
    group.addoption("--pykvm-boot-timeout", metavar="SECONDS", type=float, default=None,
                    help=f"how long a linux_vm boot may take (default {DEFAULT_BOOT_TIMEOUT:g})")


def pytest_configure(config) -> None:
    for line in MARKERS:
        config.addinivalue_line("markers", line)
    config.stash[_STATE] = Session(config)


def pytest_unconfigure(config) -> None:
    state = config.stash.get(_STATE, None)
    if state is not None:
        state.close()


# --- failure reports ------------------------------------------------------------------------------------
@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if not report.failed or report.when not in ("setup", "call"):
        return
    for name, source in item.stash.get(_CONSOLES, []):
        try:
            text = source()
        except Exception as error:           # a report must not fail
            text = f"(console log unavailable: {type(error).__name__}: {error})"
        report.sections.append((f"pykvm console: {name}", text or "(the guest printed nothing)"))


def attach_console(request, name: str, source) -> None:
    consoles = request.node.stash.setdefault(_CONSOLES, [])
    consoles.append((name, source))


# --- kvm -----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def pykvm_device(pytestconfig) -> str:
    """The KVM device path; skips the test when KVM cannot be used through it (fails it
    under --pykvm-require)."""
    state = pytestconfig.stash[_STATE]
    device = kvm_device(pytestconfig)
    reason = state.unavailable(device)
    if reason is not None:
        cannot_run(pytestconfig, f"KVM is not usable: {reason}")
    return device


@pytest.fixture
def kvm(pykvm_device):
    """An open pykvm.kvm.Kvm (skipped, with the reason, where KVM cannot be used)."""
    from pykvm.kvm import Kvm

    with Kvm(pykvm_device) as handle:
        yield handle


# --- vm: flat guests ----------------------------------------------------------------------------------------------
@pytest.fixture
def vm(request, pykvm_device, tmp_path) -> FlatVm:
    """Flat guests from assembly or bytes: ``vm.run(source, mode=...)`` -> FlatResult."""
    helper = FlatVm(pykvm_device, tmp_path)
    attach_console(request, "vm", helper.console_text)
    return helper


# --- linux_vm --------------------------------------------------------------------------------------------------
@pytest.fixture
def linux_vm(linux_vms):
    """The Linux guest, running, its agent answering: ``linux_vm.exec(cmd)``."""
    return linux_vms()


@pytest.fixture
def linux_vms(request, pykvm_device):
    """A factory of guests like ``linux_vm``'s, as many as the test wants:
    ``linux_vms(**changes)`` starts one more, of the test's machine with ``changes``
    (GuestSpec fields, e.g. ``disks=(DiskSpec(path),)``); each is closed after the test."""
    from dataclasses import replace

    spec = linux_spec(request)
    state = request.config.stash[_STATE]
    guests: list[LinuxVm] = []

    def start(**changes) -> LinuxVm:
        guest = state.linux_vm(replace(spec, **changes), pykvm_device)
        attach_console(request, f"linux_vm[{len(guests)}]" if guests else "linux_vm",
                       guest.console_text)
        guests.append(guest)
        return guest

    try:
        yield start
    finally:
        for guest in guests:
            state.release(guest)
