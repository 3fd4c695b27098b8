"""Adaptive polling of a virtqueue's avail ring by its device thread (QEMU's
``poll-max-ns``, util/aio-posix.c), so that a request the guest makes right after
a completion is seen without the guest's notify and the thread's wake-up.

Why: on a nested host each wake-up in the request path (the notify's ioeventfd
waking the device thread, the interrupt waking the vCPU) costs tens of µs, more
than the request's own work. After serving a queue, the worker keeps looking at
the ring's avail index (one 16-bit load from a view bound at activation, not a
pop) for a short window before it goes back to sleep in poll(). While it looks,
guest notifications are suppressed (virtio 1.2 §2.7.7 / §2.7.10: avail_event
left behind with VIRTIO_F_EVENT_IDX, VIRTQ_USED_F_NO_NOTIFY without): the guest
skips the doorbell because the device is watching. Before sleeping the worker
re-enables notifications and then looks at the ring once more (queue.py's
``enable_notification``: the spec's race -- a request published after the last
look but before the re-enable would otherwise wait for the next notify, which
the guest never sends).

The window adapts, by QEMU's rule, to the time the queue was idle (``block``:
from the moment the worker found the ring empty until the next request):

- block <= window: the window caught it; no change;
- block > max: polling could not have caught it; the window is divided by
  ``shrink`` (to 0 below 1 µs);
- otherwise: a longer window would have caught it; the window is multiplied by
  ``grow``, up to ``max``. A shut window opens (at 4 µs) only after OPEN_AFTER such
  idle periods in a row: on this project's nested hosts a lone short one is noise, and
  a spin that cannot find work is not free (below).

Why a spin may find nothing however long: in CPython the worker and a vCPU thread share
the GIL, and a guest whose next request needs Python on its vCPU thread (an exit the VMM
serves) waits for the spinner, which takes the GIL back after every look; and a vCPU
sharing the spinner's CPU cannot run. So GIVE_UP spins in a row that found nothing shut
the window for 1, 2, 4 ... MAX_BACKOFF wake-ups (bench/RESULTS.md "blk" has the figures).

Bounds, so polling never costs more than the window: a spin ends at the window's
deadline, when the queue is no longer active (reset), the device stops serving
(broken, stopped, closed), or when the host is busy -- each look at the ring is
followed by a C call that returns at once, around which ctypes drops the GIL (not
``sched_yield()``, which hands the CPU to any other busy process for the rest of its
slice, nor ``time.sleep(0)``, which sleeps for the timer slack); a look that took
longer than BUSY_NS means another thread had the CPU or the GIL, so the spin ends
and the window is halved. ``max_ns`` 0 turns polling off (the worker sleeps at
once, as before).
"""

from __future__ import annotations

import ctypes
import time
from dataclasses import dataclass

from ...errors import ConfigError
from .queue import VirtqueueError

GROW_START_NS = 4_000         # QEMU: "start polling at 4 microseconds"
MIN_WINDOW_NS = 1_000         # shrinking below this turns the window off
BUSY_NS = 30_000              # one look this long: another thread had our CPU or the GIL
GIVE_UP = 5                   # spins in a row that found nothing: stop polling for a while
OPEN_AFTER = 8                # a shut window opens after this many short idle periods in a row
MAX_BACKOFF = 1024            # ... for at most this many wake-ups
DEFAULT_MAX_NS = 32_000       # pykvm run --virtio-poll-us (README "Performance")
MAX_MAX_NS = 1_000_000        # what a user may ask for at most: 1 ms per look


@dataclass(slots=True)
class PollWindow:
    """One queue's polling window and its rule (module docstring). Counters are for
    benches and tests: how spins ended, how often polling backed off."""

    max_ns: int = DEFAULT_MAX_NS
    ns: int = 0
    grow: int = 2
    shrink: int = 2
    idle_since: int = 0           # monotonic ns when the ring was last found empty; 0: busy
    misses: int = 0               # spins in a row that found nothing
    backoff: int = 0              # wake-ups to sit out after the last give-up (doubles)
    skip: int = 0                 # wake-ups still to sit out
    short: int = 0                # idle periods in a row a window could have caught (shut)
    found: int = 0
    timeouts: int = 0
    busy: int = 0
    give_ups: int = 0

    def __post_init__(self) -> None:
        check_max_ns(self.max_ns)
        if self.grow < 2 or self.shrink < 2:
            raise ConfigError("virtio poll grow and shrink factors must be at least 2")

    def adjust(self, block_ns: int) -> None:
        """QEMU's adjust_polling_time: the queue was idle ``block_ns`` before work came."""
        if self.max_ns == 0:
            self.ns = 0
        elif block_ns <= self.ns:
            pass                                          # the sweet spot
        elif block_ns > self.max_ns:
            self.halve()                                  # polling could not catch it
        elif self.ns:
            self.ns = min(self.max_ns, self.ns * self.grow)
        else:                                             # shut: open on a pattern, not a blip
            self.short += 1
            if self.short >= OPEN_AFTER:
                self.ns, self.short = GROW_START_NS, 0
            return
        self.short = 0

    def halve(self) -> None:
        self.ns //= self.shrink
        if self.ns < MIN_WINDOW_NS:
            self.ns = 0

    def went_idle(self, now: int) -> None:
        if not self.idle_since:
            self.idle_since = now

    def woke(self, now: int) -> None:
        """Work is here: adapt to how long the queue was idle (not while backing off)."""
        if self.idle_since:
            if self.skip:
                self.skip -= 1
            else:
                self.adjust(now - self.idle_since)
            self.idle_since = 0

    def spun(self, outcome: str) -> None:
        """Count a spin's end; GIVE_UP misses in a row turn polling off for ``backoff``
        wake-ups, twice as many as the time before (a spin that finds work resets it):
        a guest that cannot make its next request while we poll -- its vCPU shares our
        CPU, or waits for the GIL -- makes every spin miss, however long."""
        if outcome == FOUND:
            self.found += 1
            self.misses = self.backoff = 0
            return
        if outcome == BUSY:
            self.busy += 1
            self.halve()
        elif outcome == TIMEOUT:
            self.timeouts += 1
        else:
            return
        self.misses += 1
        if self.misses >= GIVE_UP:
            self.give_ups += 1
            self.misses = self.ns = 0
            self.backoff = min(MAX_BACKOFF, 2 * self.backoff or 1)
            self.skip = self.backoff


def check_max_ns(max_ns: int) -> int:
    """``max_ns`` if it is a polling cap pykvm accepts (0..MAX_MAX_NS), else ConfigError."""
    if not 0 <= max_ns <= MAX_MAX_NS:
        raise ConfigError(f"virtio poll window {max_ns} ns is not 0..{MAX_MAX_NS} ns")
    return max_ns


FOUND, TIMEOUT, STOPPED, BUSY = "found", "timeout", "stopped", "busy"

# A C call that returns at once without a system call (glibc answers from rseq): ctypes
# releases the GIL around it, so a vCPU thread waiting for the GIL gets it.
_release_gil = ctypes.CDLL(None).sched_getcpu


def spin(window: PollWindow, queue, serving) -> str:
    """Look at ``queue``'s avail index until it moves (FOUND), the window passes
    (TIMEOUT), ``serving()`` turns false or the queue is reset (STOPPED), or a yield
    shows the host is busy (BUSY, the window halved). No lock is held: the worker is
    the only writer of ``last_avail_idx``, and a reset is seen through ``active``."""
    avail_idx, last = queue._avail_idx, queue.last_avail_idx
    clock, yield_cpu = time.monotonic_ns, _release_gil
    now = clock()
    deadline = now + window.ns
    while True:
        if avail_idx[0] != last:
            return FOUND
        yield_cpu()                          # drops the GIL: the vCPU thread may need it
        before, now = now, clock()
        if now - before > BUSY_NS:
            return BUSY
        if now >= deadline:
            return TIMEOUT
        if not queue.active or not serving():
            return STOPPED


def serve_queue(transport, index: int) -> None:
    """The transport's data path for one wake-up of queue ``index`` (on its worker):
    serve what the driver made available, interrupt once per pass (the queue's
    ``should_interrupt`` honours EVENT_IDX's used_event), and when the ring is empty
    poll it for the window (no lock held) before re-enabling notifications, looking
    once more, and going to sleep. A driver that broke a rule gets NEEDS_RESET."""
    queue, window = transport.queues[index], transport.poll_windows[index]
    device, lock = transport.device, transport._lock
    clock = time.monotonic_ns
    worker = transport.worker

    def serving() -> bool:
        return transport.running and not transport.broken and not worker.stopping

    if window.max_ns:
        window.woke(clock())
    while True:
        with lock:
            if not transport.running or transport.broken or not queue.active:
                return
            try:
                while True:
                    device.process_queue(index, queue)
                    signal = queue.should_interrupt()
                    if not device.wants_more(index):
                        queue.enable_notification()    # a kick from the host resumes it
                        if signal:
                            transport._signal_queue(index)
                        return
                    if not window.ns:
                        if queue.enable_notification():
                            if signal:          # more came: the driver's interrupt first
                                transport._signal_queue(index)
                            continue
                        break
                    queue.suppress_notification()
                    if queue.avail_idx() == queue.last_avail_idx:
                        break
                    if signal:
                        transport._signal_queue(index)
                    window.spun(FOUND)      # more came while we served: no notify needed
            except VirtqueueError as error:
                transport.fail(error)
                return
            # The interrupt is the pass's last act under the lock (a reset cannot slip in
            # between): the thread it wakes (a vCPU waiting in an exit) needs the GIL, so
            # nothing of this pass should run after the wake-up, and the driver it wakes
            # finds notifications already re-armed (bench/RESULTS.md "blk", issue #13's
            # QD32 pass).
            if signal:
                transport._signal_queue(index)
        if window.max_ns:
            window.went_idle(clock())
        if window.ns:
            outcome = spin(window, queue, serving)
            window.spun(outcome)
            if outcome == FOUND:
                window.woke(clock())
                continue
            if outcome == STOPPED:
                return
            with lock:              # give up: notifications back on, then look once more
                if transport.running and not transport.broken and \
                        queue.enable_notification():
                    window.woke(clock())
                    continue
        return


def configure(transport, max_ns: int) -> None:
    """Set the polling cap of every queue of ``transport`` (0: no polling)."""
    check_max_ns(max_ns)
    for window in transport.poll_windows:
        window.max_ns = max_ns
        window.ns = min(window.ns, max_ns)
