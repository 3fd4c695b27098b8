"""The agent's channel in a machine: a virtio-serial device (pykvm/devices/virtio/ports.py)
with the one port ``org.pykvm.agent.0``, and the client wired to it. It is not the guest
console: kernel messages never mix with the protocol."""

from __future__ import annotations

from typing import Callable

from .client import AgentClient
from .protocol import PORT_NAME


def agent_channel(alive: Callable[[], bool] = lambda: True):
    """A virtio-serial device with the agent's port, and the client wired to it."""
    from ..devices.virtio.ports import PortsDevice

    client: AgentClient | None = None
    device = PortsDevice([(PORT_NAME, lambda data: client.feed(data))])
    client = AgentClient(lambda data: device.send(0, data), alive=alive)
    return device, client
