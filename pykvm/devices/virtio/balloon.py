"""virtio-balloon (virtio 1.2, section 5.5): the host asks the guest for memory back.

The host sets a target (``num_pages``, 4 KiB pages, in the device configuration)
and raises a configuration interrupt; the guest's driver allocates that many pages
and lists their page frame numbers (le32 each) on the inflate queue; the device
gives those pages back to the host, so the VMM's resident memory drops. Lowering
the target makes the driver list pages on the deflate queue and use them again:
without VIRTIO_BALLOON_F_MUST_TELL_HOST (not offered) it may touch them at once,
and a touched page simply comes back, zero-filled (5.5.6.1).

Giving a page back (:meth:`GuestMemory.discard`) punches it out of the shared memfd
that holds a fresh VM's RAM (MADV_REMOVE: a vhost-user back end that maps the same
file sees the hole too), or drops the private copy of a snapshot-restored VM's
page (MADV_DONTNEED: the page reads as the snapshot's again, which a driver that
gave it away does not look at).

The statistics queue (VIRTIO_BALLOON_F_STATS_VQ, offered when a polling interval
is set, as Firecracker does): the driver offers one buffer of (le16 tag, le64 value)
records; the device reads it and keeps it; every interval it hands the buffer back
(a used buffer with nothing written), and the driver refills and re-offers it.
VIRTIO_BALLOON_F_DEFLATE_ON_OOM is offered on request: the driver then deflates
instead of letting the guest go out of memory.

The guest is hostile: every PFN is checked against guest RAM before anything is
discarded (a PFN outside it is a broken driver: DEVICE_NEEDS_RESET), a request is
at most MAX_PFNS_PER_REQUEST PFNs, a statistics buffer is read up to MAX_STATS
records, unknown tags are ignored, and ``actual`` (the driver's own count) is only
reported, never trusted for anything.
"""

from __future__ import annotations

import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Annotated, Callable

from ... import sandbox
from ...errors import SnapshotError
from ...layout import PAGE_SIZE
from ...memory import GuestMemory
from ...snapshot.schema import U32, Bounds
from ...snapshot.state import ComponentState
from .device import VirtioDevice
from .queue import Virtqueue, VirtqueueError, gather

VIRTIO_ID_BALLOON = 5
VIRTIO_BALLOON_F_MUST_TELL_HOST = 1 << 0
VIRTIO_BALLOON_F_STATS_VQ = 1 << 1
VIRTIO_BALLOON_F_DEFLATE_ON_OOM = 1 << 2

INFLATE, DEFLATE, STATS = 0, 1, 2
QUEUE_SIZE = 256
# Linux sends at most 256 PFNs per request (VIRTIO_BALLOON_ARRAY_PFNS_MAX); a request
# naming more than this is refused whole, so one request cannot occupy the device
# thread for long.
MAX_PFNS_PER_REQUEST = 4096
MAX_STATS = 32
MAX_TARGET_PAGES = 0xFFFFFFFF
MAX_STATS_INTERVAL_S = 1 << 16   # longer than anyone polls; keeps the wait finite

# Statistics tags (5.5.6.3) and the names Firecracker's GET /balloon/statistics uses.
STAT_NAMES = {0: "swap_in", 1: "swap_out", 2: "major_faults", 3: "minor_faults",
              4: "free_memory", 5: "total_memory", 6: "available_memory", 7: "disk_caches",
              8: "hugetlb_allocations", 9: "hugetlb_failures"}
_STAT = struct.Struct("<HQ")
_CONFIG = struct.Struct("<II")        # num_pages, actual


@dataclass
class BalloonSpec:
    """The balloon a machine gets (Firecracker's PUT /balloon): the first target,
    deflate-on-OOM, the statistics interval in seconds (0: no statistics queue)."""

    target_pages: int = 0
    deflate_on_oom: bool = False
    stats_interval_s: int = 0


@dataclass
class BalloonStats:
    """The last statistics the driver reported (``values`` by Firecracker's names)
    and when (time.monotonic(); 0.0: never)."""

    values: dict[str, int] = field(default_factory=dict)
    updated: float = 0.0


@dataclass(frozen=True)
class BalloonState(ComponentState, tag="virtio-balloon"):
    """The target and actual size the driver and the host agreed, the statistics buffer
    the driver left with the device, and the statistics interval."""

    target: U32                                             # pages
    actual: U32
    stats_head: Annotated[int, Bounds(0, QUEUE_SIZE - 1)] | None
    interval: Annotated[int, Bounds(0, MAX_STATS_INTERVAL_S)]


class BalloonDevice(VirtioDevice):
    """One balloon. :meth:`set_target` and :meth:`set_stats_interval` may be called from
    any thread; ``config_changed`` is set by whoever attaches the device to its
    transport (it raises the configuration interrupt)."""

    device_id = VIRTIO_ID_BALLOON
    name = "virtio-balloon"

    def __init__(self, memory: GuestMemory, spec: BalloonSpec):
        super().__init__()
        self.memory = memory
        self.spec = spec
        self.features = VIRTIO_BALLOON_F_DEFLATE_ON_OOM if spec.deflate_on_oom else 0
        if spec.stats_interval_s:
            self.features |= VIRTIO_BALLOON_F_STATS_VQ
        self.queue_sizes = (QUEUE_SIZE,) * (3 if spec.stats_interval_s else 2)
        self.config_changed: Callable[[], None] = lambda: None
        self._lock = threading.Lock()
        self._target = self._check_target(spec.target_pages)
        self._actual = 0
        self._stats_head: int | None = None   # the driver's statistics buffer, kept
        self._stats_due = False
        self.stats = BalloonStats()
        self.discarded_pages = 0             # given back to the host, ever
        self.returned_pages = 0              # deflated, ever
        self._interval = spec.stats_interval_s
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None
        if spec.stats_interval_s:
            self._poller = threading.Thread(target=self._poll_stats, name="balloon-stats",
                                            daemon=True)
            self._poller.start()

    # --- the host's side ------------------------------------------------------------------
    def _check_target(self, pages: int) -> int:
        if not 0 <= pages <= min(MAX_TARGET_PAGES, self.memory.size // PAGE_SIZE):
            raise ValueError(f"balloon target {pages} pages is more than guest RAM")
        return pages

    def set_target(self, pages: int) -> None:
        """Ask the driver to hold ``pages`` pages (ValueError: more than guest RAM)."""
        with self._lock:
            self._target = self._check_target(pages)
        self.config_changed()

    @property
    def target_pages(self) -> int:
        return self._target

    @property
    def actual_pages(self) -> int:
        """What the driver says it holds (its word, for reports only)."""
        return self._actual

    def set_stats_interval(self, seconds: int) -> None:
        """A new polling interval; statistics cannot be switched on or off once the
        device exists (the queue is there or not), as in Firecracker."""
        if bool(seconds) != bool(self._interval):
            raise ValueError("statistics cannot be enabled or disabled after the balloon "
                             "was created")
        self._interval = seconds

    @property
    def stats_interval_s(self) -> int:
        return self._interval

    def _poll_stats(self) -> None:
        sandbox.thread_role("device")   # pykvm/sandbox: seccomp, unless --no-seccomp
        while not self._stop.wait(self._interval):
            with self._lock:
                self._stats_due = self._stats_head is not None
            if self._stats_due:
                self.kick(STATS)

    # --- the device configuration (5.5.4) ----------------------------------------------------
    def config_bytes(self) -> bytes:
        return _CONFIG.pack(self._target, self._actual)

    def write_config(self, offset: int, size: int, value: int) -> None:
        """Only ``actual`` (bytes 4-7) is the driver's to write."""
        if offset < 4 or offset + size > 8:
            return
        data = bytearray(self.config_bytes())
        data[offset:offset + size] = value.to_bytes(size, "little")
        self._actual = _CONFIG.unpack(bytes(data))[1]

    # --- the queues ---------------------------------------------------------------------------
    def process_queue(self, index: int, queue: Virtqueue) -> None:
        if index == STATS:
            self._serve_stats(queue)
            return
        while (chain := queue.pop()) is not None:
            if chain.readable_len > MAX_PFNS_PER_REQUEST * 4:
                raise VirtqueueError(f"balloon request of {chain.readable_len // 4} PFNs "
                                     f"(at most {MAX_PFNS_PER_REQUEST})")
            data = gather(chain.readable, MAX_PFNS_PER_REQUEST * 4)
            pfns = struct.unpack(f"<{len(data) // 4}I", data[:len(data) // 4 * 4])
            runs = self._checked_runs(pfns)
            if index == INFLATE:
                for start, count in runs:
                    self.memory.discard(start * PAGE_SIZE, count * PAGE_SIZE)
                self.discarded_pages += len(pfns)
            else:
                self.returned_pages += len(pfns)
            queue.add_used(chain.head, 0)

    def _checked_runs(self, pfns) -> list[tuple[int, int]]:
        """``pfns`` as (first PFN, count) runs of consecutive pages, each page checked
        against guest RAM first (VirtqueueError: a page the guest does not have)."""
        runs: list[tuple[int, int]] = []
        for pfn in pfns:
            if not self.memory.contains(pfn * PAGE_SIZE, PAGE_SIZE):
                raise VirtqueueError(f"balloon: PFN {pfn:#x} is not guest RAM")
            if runs and runs[-1][0] + runs[-1][1] == pfn:
                runs[-1] = (runs[-1][0], runs[-1][1] + 1)
            else:
                runs.append((pfn, 1))
        return runs

    def _serve_stats(self, queue: Virtqueue) -> None:
        with self._lock:
            if self._stats_due and self._stats_head is not None:
                queue.add_used(self._stats_head, 0)     # "send me new statistics"
                self._stats_head = None
            self._stats_due = False
        while (chain := queue.pop()) is not None:
            data = gather(chain.readable, MAX_STATS * _STAT.size)
            values = dict(self.stats.values)
            for offset in range(0, len(data) - _STAT.size + 1, _STAT.size):
                tag, value = _STAT.unpack_from(data, offset)
                if tag in STAT_NAMES:
                    values[STAT_NAMES[tag]] = value
            with self._lock:
                if self._stats_head is not None:    # a second buffer: give the first back
                    queue.add_used(self._stats_head, 0)
                self._stats_head = chain.head
                self.stats = BalloonStats(values, time.monotonic())

    def wants_more(self, index: int) -> bool:
        return index != STATS      # the statistics buffer is kept on purpose

    def reset(self) -> None:
        super().reset()
        with self._lock:
            self._actual = 0
            self._stats_head = None
            self._stats_due = False

    # --- snapshots -------------------------------------------------------------------------
    def save_state(self) -> BalloonState:
        with self._lock:
            return BalloonState(self._target, self._actual, self._stats_head, self._interval)

    def restore_state(self, state: BalloonState) -> None:
        with self._lock:
            try:
                self._target = self._check_target(state.target)
            except ValueError as error:
                raise SnapshotError(f"virtio-balloon: {error}") from None
            self._actual = state.actual
            self._stats_head = state.stats_head if self.features & VIRTIO_BALLOON_F_STATS_VQ \
                else None
            if self._interval and state.interval:
                self._interval = state.interval

    def close(self) -> None:
        self._stop.set()
        if self._poller is not None and self._poller is not threading.current_thread():
            self._poller.join(timeout=5)


def mib_to_pages(mib: int) -> int:
    return mib * (1 << 20) // PAGE_SIZE


def pages_to_mib(pages: int) -> int:
    return pages * PAGE_SIZE >> 20


__all__ = ["BalloonDevice", "BalloonSpec", "BalloonStats", "VIRTIO_ID_BALLOON", "STAT_NAMES",
           "mib_to_pages", "pages_to_mib"]
