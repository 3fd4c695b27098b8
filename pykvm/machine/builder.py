"""Building a :class:`~pykvm.machine.machine.Machine`: for a boot, or from a snapshot.

Firecracker's ``builder.rs`` has the same two entry points
(``build_microvm_for_boot``, ``build_microvm_from_snapshot``), and for the same reason:
a pre-boot API collects a complete, validated configuration first (PUT machine-config,
boot-source, drives, network-interfaces), and only ``InstanceStart`` (a boot) or
``snapshot/load`` (a restore) creates anything. Both paths assemble the same machine
from the same :class:`~pykvm.machine.config.MachineConfig` (devices in the same slots,
on the same GSIs); they differ only in what fills it:

    build_for_boot       fresh anonymous RAM, then the guest is loaded (machine/boot.py)
    build_from_snapshot  the snapshot's RAM mapped copy-on-write, then every part's
                         saved state applied (pykvm/snapshot/snapshot.py checks and
                         orchestrates; each part restores its own typed state)

Either returns a machine whose vCPUs have not run: :meth:`Machine.run` starts it.
"""

from __future__ import annotations

from typing import BinaryIO

from ..memory import GuestMemory
from .config import MachineConfig
from .machine import Machine


def build_for_boot(config: MachineConfig, *, stdout: BinaryIO | None = None,
                   stderr: BinaryIO | None = None, stdin: BinaryIO | None = None,
                   tracer=None) -> Machine:
    """A machine for ``config`` with its guest loaded, ready to :meth:`~Machine.run`.
    ConfigError, ImageError, KvmError: one line each; nothing is left open."""
    from .boot import load_guest

    config.validate()
    memory = GuestMemory.anonymous(config.mem_size)
    try:
        machine = Machine(config, memory=memory, stdout=stdout, stderr=stderr, stdin=stdin,
                          tracer=tracer)
    except BaseException:
        memory.close()
        raise
    try:
        machine.boot_info = load_guest(machine)
    except BaseException:
        machine.close()
        raise
    return machine


def build_from_snapshot(directory, *, stdout: BinaryIO | None = None,
                        stderr: BinaryIO | None = None, stdin: BinaryIO | None = None,
                        tracer=None, verify: bool = True, paused: bool = False,
                        trust: bool = False, disks=None, nets=None, shares=None,
                        kvm_device: str | None = None) -> Machine:
    """A machine in the state the snapshot ``directory`` holds, ready to
    :meth:`~Machine.run` (which resumes the guest where it was; with ``paused`` it starts
    paused, for a control-socket ``resume``). ``verify`` checks the memory file's digest.

    Host resources are the caller's (pykvm/snapshot/resources.py): ``disks`` (DiskSpec),
    ``nets`` (NetSpec) and ``shares`` (directories) replace the snapshot's, one per
    device in its order; a kind not given is refused if the snapshot has any, unless
    ``trust`` (a snapshot you took yourself); ``kvm_device`` is /dev/kvm by default,
    whatever the snapshot says. SnapshotError: one line."""
    from ..snapshot.snapshot import apply_state, open_snapshot

    opened = open_snapshot(directory, verify=verify, trust=trust, disks=disks, nets=nets,
                           shares=shares, kvm_device=kvm_device)
    config = opened.config
    try:
        machine = Machine(config, memory=opened.memory, stdout=stdout, stderr=stderr,
                          stdin=None if config.command is not None else stdin, tracer=tracer)
    except BaseException:
        _quietly(opened.verified)
        opened.memory.close()
        raise
    try:
        apply_state(machine, opened.document)
        if paused:
            machine.vm.pause()
        opened.verified()      # memory.bin's digest, checked while the machine was built
    except BaseException:
        _quietly(opened.verified)
        machine.close()
        raise
    return machine


def _quietly(wait) -> None:
    """``wait()`` on a path that already fails: its own failure is not the one to report."""
    try:
        wait()
    except Exception:
        pass


restore_machine = build_from_snapshot   # pykvm.snapshot.restore_machine: its older name
