"""A virtio device whose queues another process serves (a vhost-user back end,
pykvm/vhost_user/device.py): the transport's part of the vhost-user protocol's
queue hand-over (vhost-user spec, "Starting and stopping rings": SET_VRING_NUM,
_ADDR, _BASE, _KICK, _CALL; virtio 1.2 section 3.1.1 step 8, DRIVER_OK).

Why a module of its own: pykvm/devices/virtio/transport.py is what every transport
does for every device; this is the extra path of the one kind of device whose
queues pykvm does not walk, and the reasoning about its interrupt fds is its own:

Who serves the queues: a Python device's ``process_queue`` on the transport's
worker thread (woken by the doorbell eventfds, which KVM signals from ioeventfds),
or -- a device with ``external_queues`` (pykvm/vhost_user/device.py) -- another
process, handed the queues at DRIVER_OK and stopped at reset. Such a back end
signals a used buffer on the call fd it was given (SET_VRING_CALL): where the
transport can say which KVM irqfd is the queue's interrupt right now
(:meth:`_direct_call_fd`: virtio-pci with the queue's MSI-X vector enabled and
unmasked) that irqfd, so a completion goes back end -> KVM -> guest with no pykvm
thread; otherwise (INTx, no vector, a masked vector, virtio-mmio whose
InterruptStatus pykvm must set) the transport's own call eventfd, which the worker
polls to raise the interrupt the transport's way -- for a masked vector that sets
its pending bit, delivered at unmask. :meth:`_rewire_calls` swaps the fd (another
SET_VRING_CALL) whenever the answer changes, as QEMU's vhost_virtqueue_mask does.
A signal crossing a swap is not lost: one sent to the old irqfd just before a mask
is delivered (as on real hardware when the message was already in flight), one
sent to the eventfd just before an unmask reaches the worker and is delivered.

The vhost-user module is imported where it is used: pykvm/vhost_user imports this
package.
"""

from __future__ import annotations


class ExternalQueues:
    """The external-queue half of :class:`~.transport.VirtioTransport` (a mixin: it uses
    the transport's queues, lock, eventfds and ``fail``)."""

    def _check_snapshot(self) -> None:
        if self.external:
            from ...errors import VhostUserError
            device = self.device
            raise VhostUserError(f"{self.name}: a VM with {device.snapshot_kind} cannot be "
                                 f"snapshotted yet: its queues and the back end's state live "
                                 f"in another process{device.snapshot_hint}")

    def _hand_over(self, features: int) -> bool:
        """DRIVER_OK of an external device: give the back end its queues."""
        from ...errors import VhostUserError
        from ...vhost_user.device import QueueHandoff
        from ...vhost_user.frontend import Vring
        wired = {index: self._call_fd(index)
                 for index, queue in enumerate(self.queues) if queue.active}
        vrings = [Vring(index, queue.size, queue.desc_addr, queue.avail_addr, queue.used_addr,
                        self.queue_fds[index], wired[index])
                  for index, queue in enumerate(self.queues) if queue.active]
        try:
            self.device.start_queues(QueueHandoff(features, self.memory, vrings))
        except VhostUserError as error:
            self.fail(error)
            return False
        self._wired = wired
        return True

    def _direct_call_fd(self, index: int) -> int | None:
        """The KVM irqfd that is queue ``index``'s interrupt now, if a back end may
        signal it directly; None: the interrupt needs pykvm (the default)."""
        return None

    def _call_fd(self, index: int) -> int:
        direct = self._direct_call_fd(index)
        return self.call_fds[index] if direct is None else direct

    def _rewire_calls(self) -> None:
        """After whatever can change a queue's interrupt path (a vector masked or
        unmasked, MSI-X enabled or disabled, a queue's vector reassigned): give each
        started queue's back end the call fd :meth:`_call_fd` says, when it changed.
        The vCPU thread that wrote the register sends the SET_VRING_CALL."""
        if not self.external:
            return
        from ...errors import VhostUserError
        with self._lock:
            if not self.running or self.broken:
                return
            for index, current in list(self._wired.items()):
                fd = self._call_fd(index)
                if fd == current:
                    continue
                try:
                    self.device.set_call(index, fd)
                except VhostUserError as error:
                    self.fail(error)
                    return
                self._wired[index] = fd

    def _backend_used(self, index: int) -> None:
        """A back end's call eventfd fired: interrupt the driver for queue ``index``."""
        if self.running and not self.broken:
            self._signal_queue(index)
