/*
 * net_tx_serve.c: bench/net.py's C reference device -- a virtio-net transmit
 * queue (virtio 1.2 section 5.1.6.2) on the ring loop of virtq.h (read that
 * first), into a TAP opened with IFF_VNET_HDR and a 12-byte header, as pykvm's
 * TapWire is: each chain (virtio_net_hdr_v1 + frame, device-readable) goes to
 * the TAP in one writev(), header included, and is used with length 0.
 *
 * A chain shorter than the header, longer than a GSO frame could be, or with
 * device-writable buffers is malformed: dropped and counted, as pykvm's device
 * does (the guest gets it back; nothing is sent). A write the kernel refuses is
 * counted as an error; the frame is dropped.
 */
#include "virtq.h"

#define NET_HDR 12
#define MAX_FRAME (NET_HDR + 65550)

static int net_transmit(const struct virtq *q, struct virtq_counters *c, const struct chain *ch,
                        uint32_t *written)
{
    *written = 0;
    if (ch->nwr || ch->rd_len < NET_HDR || ch->rd_len > MAX_FRAME) {
        c->errors++;
        return 0;
    }
    ssize_t r;
    do
        r = writev(q->backend_fd, ch->rd, ch->nrd);
    while (r < 0 && errno == EINTR);
    if (r < 0)
        c->errors++;
    else
        c->writes++;
    return 0;
}

int net_tx_serve(const struct virtq *q, struct virtq_counters *c)
{
    return virtq_serve(q, c, net_transmit);
}
