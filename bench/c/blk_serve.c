/*
 * blk_serve.c: bench/blk.py's C reference device -- virtio-blk requests (virtio
 * 1.2 section 5.2.6) on the ring loop of virtq.h (read that first: the doorbell,
 * the completion path, the checks of the ring, the memory ordering).
 *
 * A request is a 16-byte header (type, reserved, sector) in device-readable
 * buffers, the data, and a status byte, the last device-writable byte. Data moves
 * with preadv/pwritev straight between the image and guest RAM. A request outside
 * the image gets VIRTIO_BLK_S_IOERR, an unknown type VIRTIO_BLK_S_UNSUPP; a chain
 * without a status byte or a whole header is a broken rule.
 */
#include "virtq.h"

#define BLK_T_IN 0
#define BLK_T_OUT 1
#define BLK_S_OK 0
#define BLK_S_IOERR 1
#define BLK_S_UNSUPP 2
#define SECTOR 512
#define HEADER 16

/* Bytes [skip, skip + want) of the buffers as an iovec list; the count, or -1. */
static int slice(struct iovec *out, const struct iovec *in, int n, uint64_t skip, uint64_t want)
{
    int k = 0;
    for (int i = 0; i < n && want; i++) {
        uint64_t len = in[i].iov_len;
        if (skip >= len) {
            skip -= len;
            continue;
        }
        uint64_t take = len - skip < want ? len - skip : want;
        out[k].iov_base = (uint8_t *)in[i].iov_base + skip;
        out[k++].iov_len = take;
        want -= take;
        skip = 0;
    }
    return want ? -1 : k;
}

/* preadv/pwritev of all of `iov` at `offset`, short transfers continued; bytes, or -1. */
static int64_t transfer(int fd, int out, struct iovec *iov, int n, uint64_t offset)
{
    int64_t done = 0;
    int first = 0;
    while (first < n) {
        ssize_t r = out ? pwritev(fd, iov + first, n - first, offset + done)
                        : preadv(fd, iov + first, n - first, offset + done);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            return -1;
        done += r;
        while (first < n && (size_t)r >= iov[first].iov_len)
            r -= iov[first++].iov_len;
        if (first < n) {
            iov[first].iov_base = (uint8_t *)iov[first].iov_base + r;
            iov[first].iov_len -= r;
        }
    }
    return done;
}

static int blk_request(const struct virtq *q, struct virtq_counters *c, const struct chain *ch,
                       uint32_t *written)
{
    static __thread struct iovec part[MAX_QUEUE];
    if (ch->wr_len < 1)
        return failed(c, "block request without a status byte");
    if (ch->rd_len < HEADER)
        return failed(c, "block request header shorter than 16 bytes");
    uint8_t header[HEADER];
    uint64_t got = 0;
    for (int i = 0; i < ch->nrd && got < HEADER; i++) {
        uint64_t take = ch->rd[i].iov_len < HEADER - got ? ch->rd[i].iov_len : HEADER - got;
        memcpy(header + got, ch->rd[i].iov_base, take);
        got += take;
    }
    uint32_t type;
    uint64_t sector;
    memcpy(&type, header, 4);
    memcpy(&sector, header + 8, 8);
    const struct iovec *last = &ch->wr[ch->nwr - 1];
    uint8_t *status = (uint8_t *)last->iov_base + last->iov_len - 1;
    uint8_t result = BLK_S_OK;
    *written = 1;
    int out = type == BLK_T_OUT;
    if (type == BLK_T_IN || type == BLK_T_OUT) {
        uint64_t len = out ? ch->rd_len - HEADER : ch->wr_len - 1;
        int n = out ? slice(part, ch->rd, ch->nrd, HEADER, len)
                    : slice(part, ch->wr, ch->nwr, 0, len);
        if (sector > q->backend_size / SECTOR || len > q->backend_size - sector * SECTOR
            || n < 0 || transfer(q->backend_fd, out, part, n, sector * SECTOR) != (int64_t)len)
            result = BLK_S_IOERR;
        else if (!out)
            *written += len;
        if (out)
            c->writes++;
        else
            c->reads++;
    } else {
        result = BLK_S_UNSUPP;
    }
    if (result != BLK_S_OK) {
        c->errors++;
        *written = 1;
    }
    __atomic_store_n(status, result, __ATOMIC_RELAXED);
    return 0;
}

int blk_serve(const struct virtq *q, struct virtq_counters *c)
{
    return virtq_serve(q, c, blk_request);
}
