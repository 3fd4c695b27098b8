"""A virtio device whose queues another process serves over vhost-user.

The virtio-pci transport (pykvm/devices/virtio/pci.py) keeps what the driver
talks to -- feature negotiation, the queues' registers, MSI-X, the device config
-- and at DRIVER_OK hands the queues over through :meth:`start_queues`
(a :class:`QueueHandoff`) instead of serving them on a Python worker. From then
on a guest notify goes from KVM's ioeventfd straight to the back end, a completion
from the back end straight to KVM's irqfd of the queue's MSI-X vector (while that
vector delivers; see transport.py), and no byte of the guest's I/O passes through
pykvm.

A back end that dies or refuses a request calls the transport's ``fail`` (set
by the transport, like ``kick``): the device goes NEEDS_RESET with one line on
stderr, and the VM and its other devices keep running.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..devices.virtio.device import TRANSPORT_FEATURES, VirtioDevice
from .frontend import Frontend, Vring
from .protocol import VhostUserError

HANGUP_GRACE = 1.0       # s a back end pykvm started gets to exit by itself once hung up


@dataclass(frozen=True)
class QueueHandoff:
    """What the transport gives a back end at DRIVER_OK."""
    features: int
    memory: object               # GuestMemory (shareable)
    vrings: list[Vring]


class VhostUserDevice(VirtioDevice):
    """Base of vhost-user devices (virtio-fs, virtio-blk). ``frontend`` is connected; ``daemon``
    (pykvm/vhost_user/daemon.py) is the back end pykvm started, or None for one the
    user runs. Both are closed with the device."""

    external_queues = True       # the transport hands queues over instead of serving them
    device_features = 0          # device-specific bits pykvm lets through to the driver
    # What the device is, as the snapshot refusal names it (transport.py), and the way out.
    snapshot_kind = "a vhost-user device"
    snapshot_hint = ""

    def __init__(self, frontend: Frontend, daemon=None):
        super().__init__()
        self.frontend = frontend
        self.daemon = daemon
        self.fail: Callable[[BaseException], None] = lambda error: None   # set by the transport
        frontend.watch(self._lost)

    @property
    def offered_features(self) -> int:
        """What both the back end and pykvm's transport support."""
        return self.frontend.features & (TRANSPORT_FEATURES | self.device_features)

    def _lost(self, reason: str) -> None:
        if self.daemon is not None and self.daemon.ended(1.0):
            reason = self.daemon.describe_exit()
        self.fail(VhostUserError(reason))

    def start_queues(self, handoff: QueueHandoff) -> None:
        self.frontend.start(handoff.features, handoff.memory, handoff.vrings)

    def set_call(self, index: int, fd: int) -> None:
        """Queue ``index``'s back end signals used buffers on ``fd`` from now on."""
        self.frontend.set_call(index, fd)

    def stop_queues(self) -> None:
        """Reset: the back end stops its rings (GET_VRING_BASE). A dead back end has
        nothing to stop."""
        try:
            self.frontend.stop()
        except VhostUserError:
            pass

    def reset(self) -> None:
        super().reset()
        if self.frontend.started:
            self.stop_queues()

    def close(self) -> None:
        """Hang up, then let the daemon exit on its own before :meth:`Daemon.stop`
        signals it: virtiofsd's sandboxed child serves the connection and exits on the
        hang-up, and its parent reaps it. A SIGTERM first kills only the parent, leaving
        the child to be reparented and reaped by init (a zombie until then, forever under
        an init that does not reap). qemu-storage-daemon listens again instead of
        exiting (``exits_on_hangup`` False): it is signalled at once."""
        self.frontend.close()
        if self.daemon is not None:
            if self.daemon.exits_on_hangup:
                self.daemon.ended(HANGUP_GRACE)
            self.daemon.stop()
