"""One vsock stream connection between a guest port and a host Unix socket: its
state and its credit (virtio 1.2, sections 5.10.6.3 and 5.10.6.6).

Two byte streams cross it, each with its own accounting:

guest -> host
    RW payloads from the guest are written to the host socket; what the socket
    does not take at once waits in ``tx``. The guest may have at most
    ``buf_alloc`` bytes not yet forwarded (``rx_cnt - fwd_cnt``): that is the
    credit every packet we send announces. A guest that sends beyond it breaks
    the protocol (:class:`CreditViolation`, the muxer resets the connection), so
    ``tx`` never holds more than ``buf_alloc`` bytes, whatever the guest does.
    When the host has taken enough (``fwd_cnt`` moved by CREDIT_THRESHOLD since
    the guest last heard it) a CREDIT_UPDATE is due, or a guest that used up its
    credit would wait forever.

host -> guest
    Bytes are read from the host socket straight into the guest's receive buffers,
    at most ``peer_credit()`` of them: ``peer_buf_alloc - (tx_cnt - peer_fwd_cnt)``,
    from the guest's own announcements. Nothing is buffered on the host side: what
    the guest cannot take stays in the host socket, whose sender then blocks.

Counters are u32 and wrap, as on the wire. A guest announcing a ``fwd_cnt`` ahead
of what it was sent gets no credit (the subtraction wraps past ``buf_alloc``).
"""

from __future__ import annotations

import enum
import socket
from dataclasses import dataclass, field

from .packet import (HOST_CID, OP_CREDIT_UPDATE, OP_REQUEST, OP_RESPONSE, OP_RST,
                     OP_SHUTDOWN, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM, Header)

U32 = 0xFFFF_FFFF
# What the guest may send us before we forward it (per connection), and so the most
# host memory one connection's ``tx`` takes. Firecracker's CONN_TX_BUF_SIZE is 64 KiB too.
BUFFER_SIZE = 64 * 1024
CREDIT_THRESHOLD = BUFFER_SIZE // 2
# Control packets in the order a connection sends them when several are due.
CONTROL_ORDER = (OP_RST, OP_REQUEST, OP_RESPONSE, OP_SHUTDOWN, OP_CREDIT_UPDATE)


class CreditViolation(Exception):
    """The guest sent more than the credit we gave it."""


class State(enum.Enum):
    DIALING = "dialing"             # guest-initiated: the host listener not connected yet
    CONNECTING = "connecting"       # host-initiated: REQUEST sent, waiting for RESPONSE
    ESTABLISHED = "established"


@dataclass(eq=False)
class Connection:
    sock: socket.socket | None      # None while DIALING
    local_port: int                 # the host side's port (src_port of what we send)
    peer_port: int                  # the guest's port
    state: State
    deadline: float | None = None   # CONNECTING: when to give up on the guest
    tx: bytearray = field(default_factory=bytearray)
    rx_cnt: int = 0                 # payload bytes received from the guest
    fwd_cnt: int = 0                # ... of which written to the host socket
    sent_fwd_cnt: int = 0           # the fwd_cnt the guest last heard from us
    tx_cnt: int = 0                 # payload bytes sent to the guest
    peer_buf_alloc: int = 0
    peer_fwd_cnt: int = 0
    peer_shutdown: int = 0          # SHUTDOWN_RCV | SHUTDOWN_SEND the guest announced
    host_eof: bool = False          # the host end sent its last byte
    host_write_closed: bool = False
    readable: bool = False          # poll saw input; cleared when a read finds none
    pending: set = field(default_factory=set)   # control ops due (at most one of each)
    shutdown_flags: int = 0         # what a due SHUTDOWN says

    @property
    def key(self) -> tuple[int, int]:
        return self.local_port, self.peer_port

    # --- credit ------------------------------------------------------------------------------
    def peer_credit(self) -> int:
        in_flight = (self.tx_cnt - self.peer_fwd_cnt) & U32
        return self.peer_buf_alloc - in_flight if in_flight <= self.peer_buf_alloc else 0

    def learn_credit(self, header: Header) -> None:
        self.peer_buf_alloc = header.buf_alloc
        self.peer_fwd_cnt = header.fwd_cnt

    def credit_update_due(self) -> bool:
        return (self.fwd_cnt - self.sent_fwd_cnt) & U32 >= CREDIT_THRESHOLD

    # --- guest -> host -----------------------------------------------------------------------
    def from_guest(self, views: list[memoryview], length: int) -> None:
        """``length`` payload bytes (``views``) for the host socket. Raises
        CreditViolation beyond the credit, OSError if the host socket failed."""
        if ((self.rx_cnt - self.fwd_cnt) & U32) + length > BUFFER_SIZE:
            raise CreditViolation(f"{length} bytes with {(self.rx_cnt - self.fwd_cnt) & U32} "
                                  f"of {BUFFER_SIZE} not yet forwarded")
        self.rx_cnt = (self.rx_cnt + length) & U32
        sent = 0
        if not self.tx:
            try:
                sent = self.sock.sendmsg(views)
            except BlockingIOError:
                sent = 0
        self.fwd_cnt = (self.fwd_cnt + sent) & U32
        skip = sent
        for view in views:
            if skip >= len(view):
                skip -= len(view)
                continue
            self.tx += view[skip:]
            skip = 0

    def flush(self) -> None:
        """Write what waits in ``tx`` (the socket is writable); OSError if it failed."""
        while self.tx:
            try:
                sent = self.sock.send(self.tx)
            except BlockingIOError:
                return
            del self.tx[:sent]
            self.fwd_cnt = (self.fwd_cnt + sent) & U32

    def close_host_write_if_done(self) -> None:
        """The guest will send no more: once ``tx`` is out, so is the host's input."""
        if self.peer_shutdown & SHUTDOWN_SEND and not self.tx and not self.host_write_closed:
            self.host_write_closed = True
            try:
                self.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    # --- host -> guest -----------------------------------------------------------------------
    def can_read_host(self) -> bool:
        """Host bytes may be moved to the guest now (poll should watch for input)."""
        return (self.state is State.ESTABLISHED and not self.host_eof
                and not self.peer_shutdown & SHUTDOWN_RCV and self.peer_credit() > 0)

    def has_work(self) -> bool:
        return bool(self.pending) or (self.readable and self.can_read_host())

    def header(self, op: int, guest_cid: int, length: int = 0, flags: int = 0) -> Header:
        """A packet from this connection's host end, carrying our current credit."""
        self.sent_fwd_cnt = self.fwd_cnt
        return Header(HOST_CID, guest_cid, self.local_port, self.peer_port, length,
                      TYPE_STREAM, op, flags, BUFFER_SIZE, self.fwd_cnt)

    def want(self, op: int, flags: int = 0) -> None:
        self.pending.add(op)
        if op == OP_SHUTDOWN:
            self.shutdown_flags |= flags

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()


__all__ = ["Connection", "State", "CreditViolation", "BUFFER_SIZE", "CREDIT_THRESHOLD",
           "CONTROL_ORDER", "SHUTDOWN_RCV", "SHUTDOWN_SEND", "OP_CREDIT_UPDATE"]
