/*
 * net_loop.S: the guest of bench/net.py -- ring-3 code that owns one virtio-net
 * queue and keeps it as busy as it can.
 *
 * Entered in 64-bit long mode, ring 0, at its first byte (linked for the load
 * address with -Ttext). The bench has already done what a driver's probe does:
 * features negotiated, both queues set up and DRIVER_OK, every descriptor
 * written once (the same buffer per descriptor for the whole run) and the avail
 * ring filled with slot i -> descriptor i. The device hands chains back in the
 * order it took them, so the guest never touches a descriptor: it only moves
 * the avail index, exactly as far as the used index says buffers came back.
 *
 * The parameter block at offset 8 (patched by the bench) says what to do:
 *   mode   0: transmit -- keep all N frames in flight: whenever the device has
 *             used k of them, make those k available again (publish avail idx);
 *          1: receive  -- count the frames the device filled (used idx moved by
 *             k), add k to `frames`, and give the k buffers back;
 *   and where the avail and used rings are, the queue size N, the notify
 *   address (the queue's doorbell in the device's BAR, an ioeventfd in KVM) and
 *   the value to write there (the queue index).
 * With nothing to do (transmit: every frame in flight; receive: nothing new) the
 * guest either spins (wait_port 0) or, like an interrupt-driven driver, sets
 * used_event and blocks in a read of the bench's wait port (an `in`) until the device
 * interrupts: the default, so that the guest does not take a host CPU from the
 * device on a busy 2-CPU host.
 * Notifications follow VIRTIO_F_RING_EVENT_IDX: after publishing a new avail
 * idx the guest reads avail_event (after the used ring) and rings the doorbell
 * only if the index moved past it, i.e. only when the device asked to be woken
 * (it had run dry). `notifies` counts the doorbells.
 *
 * `glitches` counts ring indexes that cannot be true (more than N buffers in
 * flight or returned at once): a torn read; the guest reads again. Measured
 * cause: pykvm's Virtqueue stores the used index and avail_event with
 * struct.pack_into, which clears both bytes and then writes them one at a time,
 * so a driver reading at that instant sees 0 or half an index. With the index
 * stored as one 16-bit store (a memoryview cast to "H") the count stays 0. A
 * real driver (Linux's virtqueue_get_buf) does not re-read: it would take the 0
 * for new used entries; the store belongs fixed in pykvm/devices/virtio/queue.py.
 *
 * Ring 0 does only the set-up (its instructions are emulated on kvm_pvm): its
 * own GDT with ring-3 segments, page tables mapping the first GiB of RAM and
 * the PCI MMIO window at 3 GiB user-accessible, then iretq to ring 3 with
 * interrupts off. Ring 3 runs natively on every host; it never exits to pykvm
 * (doorbell writes end in KVM's ioeventfd) and loops until the bench stops the VM.
 */

/* READ16 src, reg: a 16-bit ring index, with one 16-bit load (pykvm stores each
 * index with one 16-bit store, after the elements it covers). Re-reading and
 * counting a difference, as this macro once did, also counted the device's
 * legitimate progress between the two loads. */
        .macro  READ16 src, reg, scratch
        movzwl  \src, \reg
        .endm

        .code64
        .text
        .globl _start
_start:
        jmp     ring0                   /* offset 0 */
        .balign 8
params:                                 /* offset 8: patched by the bench */
mode:           .quad   0               /* +0  */
queue_size:     .quad   0               /* +8  */
avail_ring:     .quad   0               /* +16 */
used_ring:      .quad   0               /* +24 */
notify_addr:    .quad   0               /* +32 */
notify_value:   .quad   0               /* +40 */
frames:         .quad   0               /* +48: receive: frames the guest got */
notifies:       .quad   0               /* +56: doorbells rung */
glitches:       .quad   0               /* +64: ring indexes read mid-store (see below) */
wait_port:      .quad   0               /* +72: 0: spin; else the bench's wait port */
waits:          .quad   0               /* +80: times the guest waited there */

ring3:
        mov     queue_size(%rip), %r11
        mov     avail_ring(%rip), %r8
        mov     used_ring(%rip), %r9
        mov     notify_addr(%rip), %r10
        mov     notify_value(%rip), %r13
        lea     4(%r9,%r11,8), %r14     /* &avail_event: after used ring[N] */
        lea     4(%r8,%r11,2), %r15     /* &used_event: after avail ring[N] */
        cmpq    $0, mode(%rip)
        jne     receive

/* --- transmit: all N frames in flight, always ---------------------------------------- */
transmit:
        xor     %ebx, %ebx              /* avail idx (the bench published 0) */
1:      READ16  2(%r9), %eax, %edx      /* used idx */
        mov     %ebx, %ecx
        sub     %eax, %ecx
        and     $0xffff, %ecx           /* in flight */
        cmp     %r11d, %ecx
        ja      glitch_tx
        mov     %r11d, %edx
        sub     %ecx, %edx              /* free slots */
        jz      3f
        mov     %ebx, %esi              /* old avail idx */
        add     %edx, %ebx
        and     $0xffff, %ebx           /* new avail idx */
        call    publish
        jmp     1b
3:      cmpq    $0, wait_port(%rip)
        je      4f
        /* Block until half the ring is back: used_event = used + N/2 - 1 */
        mov     %r11d, %ecx
        shr     $1, %ecx
        lea     -1(%rax,%rcx), %ecx
        call    wait
        jmp     1b
4:      pause
        jmp     1b
glitch_tx:
        incq    glitches(%rip)
        jmp     1b

/* --- receive: count what came, give the buffers back --------------------------------- */
receive:
        xor     %r12d, %r12d            /* used idx seen */
        mov     %r11d, %ebx             /* avail idx: the bench made all N available */
1:      READ16  2(%r9), %eax, %edx      /* used idx */
        cmp     %eax, %r12d
        je      3f
        mov     %eax, %ecx
        sub     %r12d, %ecx
        and     $0xffff, %ecx           /* frames received since last look */
        cmp     %r11d, %ecx
        ja      glitch_rx
        add     %rcx, frames(%rip)
        mov     %eax, %r12d
        mov     %ebx, %esi
        add     %ecx, %ebx
        and     $0xffff, %ebx
        call    publish
        jmp     1b
3:      cmpq    $0, wait_port(%rip)
        je      4f
        mov     %r12d, %ecx             /* block until the next frame: used_event = seen */
        call    wait
        jmp     1b
4:      pause
        jmp     1b
glitch_rx:
        incq    glitches(%rip)
        jmp     1b

/* wait: used idx was %eax; ask for an interrupt once it passes %ecx (used_event,
 * VIRTIO_F_RING_EVENT_IDX), look once more, then read the bench's wait port:
 * that exit returns when the device interrupted (or after a few ms). A kernel
 * driver would `hlt` here; ring 3 cannot. A port, not an MMIO register: the
 * cheaper exit from ring 3 on kvm_pvm (bench/RESULTS.md, blk: "the bench guests
 * wait through port I/O"). Clobbers %eax, %edx. */
wait:
        mov     %cx, (%r15)
        mfence                          /* used_event store before the used idx load */
        movzwl  2(%r9), %edx
        cmp     %eax, %edx
        jne     1f                      /* it moved meanwhile: no need to wait */
        mov     wait_port(%rip), %rdx
        in      %dx, %eax               /* the exit: blocks in the bench */
        incq    waits(%rip)
1:      ret

/* publish: avail idx := %ebx (old value %esi); ring the doorbell if the device
 * asked for it: vring_need_event(avail_event, new, old) */
publish:
        mov     %bx, 2(%r8)
        mfence                          /* idx store before the avail_event load */
        READ16  (%r14), %eax, %edx
        mov     %ebx, %ecx
        sub     %eax, %ecx
        dec     %ecx
        and     $0xffff, %ecx           /* (new - event - 1) & 0xffff */
        mov     %ebx, %edi
        sub     %esi, %edi
        and     $0xffff, %edi           /* (new - old) & 0xffff */
        cmp     %edi, %ecx
        jae     2f
        mov     %r13w, (%r10)           /* doorbell: KVM signals the queue's eventfd */
        incq    notifies(%rip)
2:      ret

        .include "user_tables.inc"      /* GDT, page tables, user stack */
