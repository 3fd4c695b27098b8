/*
 * virtq.h: the ring half of the benches' C reference devices (blk_serve.c for
 * bench/blk.py, net_tx_serve.c for bench/net.py): one virtio split virtqueue
 * (virtio 1.2 section 2.7) served by a C loop on one thread, on the same
 * doorbell and completion path as pykvm's own device worker. It sleeps in
 * poll() on the queue's ioeventfd (KVM signals it on the guest's doorbell
 * write), hands every available chain to the device's handler, publishes the
 * used entries, and signals one eventfd per pass when the driver asked for it
 * (an MSI-X irqfd, or the bench's wait register's eventfd). What it measures is
 * the floor of that path on the host: the wake-ups and system calls with no
 * Python in the way.
 *
 * Built at run time by bench/cqueue.py (gcc -O2 -shared -fPIC) and called
 * through ctypes, which drops the GIL for the call: the serve functions return
 * only when the stop eventfd is signalled (0) or the driver broke a rule (-1,
 * counters->why says which; the queue is not served again, as a virtio device
 * with NEEDS_RESET would not).
 *
 * The guest is hostile: every index it writes is checked (a head or next index
 * below the queue size, a chain no longer than the queue, an avail index at
 * most queue-size ahead, device-readable descriptors before device-writable
 * ones, no INDIRECT (the benches do not negotiate it)), every buffer lies inside
 * guest RAM (overflow-safe arithmetic), and each descriptor is copied once
 * before it is used, so a guest rewriting it meanwhile cannot change what was
 * checked.
 *
 * Memory ordering (section 2.7.13; x86-64 here, written with C11 atomics): the
 * avail index is read with acquire before the ring entries it covers; used
 * entries are written before the used index, published with release; a full
 * fence separates publishing the used index from reading used_event, and
 * writing avail_event from reading the avail index again (2.7.10's races).
 */
#ifndef BENCH_VIRTQ_H
#define BENCH_VIRTQ_H

#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <stdint.h>
#include <string.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#define DESC_F_NEXT 1
#define DESC_F_WRITE 2
#define DESC_F_INDIRECT 4
#define AVAIL_F_NO_INTERRUPT 1
#define USED_F_NO_NOTIFY 1
#define MAX_QUEUE 1024

/* What the bench hands over: mirrored by cqueue.py's ctypes Structure. */
struct virtq {
    uint8_t *ram;               /* host address of guest physical 0 */
    uint64_t ram_size;
    uint64_t desc, avail, used; /* guest physical addresses of the three rings */
    uint64_t backend_size;      /* blk: the image's bytes */
    int64_t poll_ns;            /* after a pass, look at the avail index this long first */
    uint32_t size;              /* queue size, a power of two <= MAX_QUEUE */
    int32_t event_idx;          /* VIRTIO_F_RING_EVENT_IDX negotiated */
    int32_t kick_fd;            /* the doorbell's ioeventfd */
    int32_t call_fd;            /* signalled when the driver wants an interrupt; -1: none */
    int32_t stop_fd;            /* readable: return */
    int32_t backend_fd;         /* blk: the image; net: the TAP */
};

/* Written by the serving thread, read by the bench at any time (aligned u64s). */
struct virtq_counters {
    uint64_t reads, writes, errors, passes, wakeups, signals, polls_found, polls_missed;
    char why[120];
};

/* One chain, gathered: device-readable then device-writable buffers. */
struct chain {
    struct iovec rd[MAX_QUEUE], wr[MAX_QUEUE];
    int nrd, nwr;
    uint64_t rd_len, wr_len;
};

/* The device's part: serve `ch`; *written: bytes written into the chain. 0, or -1. */
typedef int (*virtq_handler)(const struct virtq *q, struct virtq_counters *c,
                             const struct chain *ch, uint32_t *written);

struct desc {
    uint64_t addr;
    uint32_t len;
    uint16_t flags, next;
};

static int failed(struct virtq_counters *c, const char *why)
{
    strncpy(c->why, why, sizeof c->why - 1);
    return -1;
}

/* The host address of [gpa, gpa + len) if all of it is guest RAM, else NULL. */
static uint8_t *guest(const struct virtq *q, uint64_t gpa, uint64_t len)
{
    if (gpa > q->ram_size || len > q->ram_size - gpa)
        return NULL;
    return q->ram + gpa;
}

static uint16_t load16(const uint8_t *p, int order)
{
    return __atomic_load_n((const uint16_t *)p, order);
}

static int64_t now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

/* vring_need_event (2.7.10): did the index pass `event` going from old to new? */
static int need_event(uint16_t event, uint16_t new, uint16_t old)
{
    return (uint16_t)(new - event - 1) < (uint16_t)(new - old);
}

/* The chain at `head` into `ch`, every rule checked; 0, or -1 (rule broken). */
static int walk(const struct virtq *q, struct virtq_counters *c, uint16_t head,
                struct chain *ch)
{
    uint32_t index = head;
    ch->nrd = ch->nwr = 0;
    ch->rd_len = ch->wr_len = 0;
    for (uint32_t count = 0;; count++) {
        if (index >= q->size)
            return failed(c, "descriptor index out of range");
        if (count >= q->size)
            return failed(c, "descriptor chain longer than the queue (a loop?)");
        struct desc d;
        memcpy(&d, q->ram + q->desc + 16 * (uint64_t)index, sizeof d);   /* one copy */
        if (d.flags & DESC_F_INDIRECT)
            return failed(c, "indirect descriptor (not negotiated)");
        uint8_t *p = guest(q, d.addr, d.len);
        if (p == NULL)
            return failed(c, "buffer outside guest RAM");
        if (d.flags & DESC_F_WRITE) {
            ch->wr[ch->nwr].iov_base = p;
            ch->wr[ch->nwr++].iov_len = d.len;
            ch->wr_len += d.len;
        } else {
            if (ch->nwr)
                return failed(c, "device-readable descriptor after a device-writable one");
            ch->rd[ch->nrd].iov_base = p;
            ch->rd[ch->nrd++].iov_len = d.len;
            ch->rd_len += d.len;
        }
        if (!(d.flags & DESC_F_NEXT))
            return 0;
        index = d.next;
    }
}

/* Notifications on (2.7.10 / 2.7.7): the driver rings for the next request. */
static void enable_notify(const struct virtq *q, uint8_t *avail_event, uint8_t *used_flags,
                          uint16_t last)
{
    if (q->event_idx)
        __atomic_store_n((uint16_t *)avail_event, last, __ATOMIC_RELAXED);
    else
        __atomic_store_n((uint16_t *)used_flags, 0, __ATOMIC_RELAXED);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
}

/* Serve the queue with `handle` until the stop eventfd (0) or a broken rule (-1). */
static int virtq_serve(const struct virtq *q, struct virtq_counters *c, virtq_handler handle)
{
    static __thread struct chain ch;            /* 32 KiB: not on the stack */
    uint32_t n = q->size;
    if (n == 0 || n > MAX_QUEUE || n & (n - 1))
        return failed(c, "queue size not a power of two up to 1024");
    uint8_t *desc = guest(q, q->desc, 16 * (uint64_t)n);
    uint8_t *avail = guest(q, q->avail, 6 + 2 * (uint64_t)n);
    uint8_t *used = guest(q, q->used, 6 + 8 * (uint64_t)n);
    if (!desc || !avail || !used || q->desc & 15 || q->avail & 1 || q->used & 3)
        return failed(c, "ring outside guest RAM or misaligned");
    uint8_t *used_event = avail + 4 + 2 * n, *avail_event = used + 4 + 8 * n;
    /* Take the ring where the device left it: what it used is what it took. */
    uint16_t last_avail = load16(used + 2, __ATOMIC_RELAXED);
    uint16_t used_idx = last_avail;
    struct pollfd fds[2] = {{q->kick_fd, POLLIN, 0}, {q->stop_fd, POLLIN, 0}};
    uint64_t drained;

    enable_notify(q, avail_event, used, last_avail);
    for (;;) {
        for (;;) {                                  /* one pass, then look again */
            uint16_t avail_idx = load16(avail + 2, __ATOMIC_ACQUIRE);
            if ((uint16_t)(avail_idx - last_avail) > n)
                return failed(c, "avail index more than the queue size ahead");
            if (avail_idx != last_avail) {
                uint16_t old = used_idx;
                c->passes++;
                while (last_avail != avail_idx) {
                    uint16_t head = load16(avail + 4 + 2 * (last_avail & (n - 1)),
                                           __ATOMIC_RELAXED);
                    uint32_t written = 0;
                    if (walk(q, c, head, &ch) < 0 || handle(q, c, &ch, &written) < 0)
                        return -1;
                    uint8_t *elem = used + 4 + 8 * (used_idx & (n - 1));
                    uint32_t id = head;
                    memcpy(elem, &id, 4);
                    memcpy(elem + 4, &written, 4);
                    last_avail++;
                    used_idx++;
                }
                __atomic_store_n((uint16_t *)(used + 2), used_idx, __ATOMIC_RELEASE);
                __atomic_thread_fence(__ATOMIC_SEQ_CST);
                int signal = q->event_idx
                    ? need_event(load16(used_event, __ATOMIC_RELAXED), used_idx, old)
                    : !(load16(avail, __ATOMIC_RELAXED) & AVAIL_F_NO_INTERRUPT);
                if (signal && q->call_fd >= 0) {
                    uint64_t one = 1;
                    if (write(q->call_fd, &one, 8) == 8)
                        c->signals++;
                }
                continue;
            }
            if (q->poll_ns > 0) {                   /* notifications stay suppressed */
                int64_t deadline = now_ns() + q->poll_ns;
                while (load16(avail + 2, __ATOMIC_ACQUIRE) == last_avail && now_ns() < deadline)
                    __builtin_ia32_pause();
                if (load16(avail + 2, __ATOMIC_ACQUIRE) != last_avail) {
                    c->polls_found++;
                    continue;
                }
                c->polls_missed++;
            }
            enable_notify(q, avail_event, used, last_avail);
            if (load16(avail + 2, __ATOMIC_ACQUIRE) == last_avail)
                break;                              /* empty, notifications on: sleep */
        }
        while (poll(fds, 2, -1) < 0)
            if (errno != EINTR)
                return failed(c, "poll failed");
        if (fds[1].revents)
            return 0;
        if (read(q->kick_fd, &drained, 8) == 8)
            c->wakeups++;
        if (q->event_idx == 0)                      /* while serving: no notifies */
            __atomic_store_n((uint16_t *)used, USED_F_NO_NOTIFY, __ATOMIC_RELAXED);
    }
}

#endif
