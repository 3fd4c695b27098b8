/*
 * blk_loop.S: the guest of bench/blk.py -- ring-3 code that owns the one queue
 * of a virtio-blk device and keeps `depth` requests in flight as fast as it can.
 *
 * Entered in 64-bit long mode, ring 0, at its first byte (linked for the load
 * address with -Ttext). Ring 0 only sets up (its instructions are emulated on
 * kvm_pvm): a GDT with ring-3 segments, page tables mapping the first GiB of RAM
 * and the PCI MMIO window at 3 GiB user-accessible, then iretq to ring 3 with
 * interrupts off. The prologue, GDT and page tables are net_loop.S's.
 *
 * The bench has done the driver's probe from the host (features incl.
 * EVENT_IDX, the queue's rings, DRIVER_OK) and lays out request slots: slot i
 * uses descriptors 4i (16-byte header), 4i+1 (data) and 4i+2 (status byte), so
 * a used entry's id >> 2 is its slot. Per case the bench writes the descriptors
 * and header types (read or write, the data length) while the guest waits for a
 * command, then answers the guest's read of the command register with 1.
 *
 * The guest then makes `depth` requests available, and for every completion it
 * finds in the used ring (polling the used index) counts it, checks its status
 * byte, gives the slot its next sector (sequential: the next `spr` sectors,
 * wrapping at `limit`; random: a xorshift64 block number & `limit` times `spr`)
 * and makes it available again; after publishing the avail index it rings the
 * doorbell (an MMIO write that KVM matches with an ioeventfd: no exit) only when
 * the device asked for it (VIRTIO_F_RING_EVENT_IDX's avail_event). When the
 * bench sets `stop`, it stops refilling, waits for what is in flight and goes
 * back to the command register.
 * With nothing completed yet it spins (wait_port 0) or sets used_event and
 * reads the bench's wait port (an `in`, granted by the TSS's I/O bitmap in
 * user_tables.inc), which returns when the device interrupted
 * (INTx, acknowledged by that read) or after a few ms: one exit per wait. With
 * `guest_poll` N it first looks at the used index up to N more times (a `pause`
 * between looks), as a Linux guest's haltpoll idle governor polls before halting.
 */

/* READ16 src, reg, scratch: a 16-bit ring index, with one 16-bit load: pykvm
 * publishes each index with one 16-bit store, after the element it covers
 * (tests/kvm/test_hostile_guest.py proves it with a guest like this one). Reading
 * twice and counting a difference as a glitch, as this macro once did, counted
 * the device's legitimate progress between the two loads (the one "glitch" seen
 * at QD32); `glitches` now counts only indexes that cannot be true. */
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
queue_size:     .quad   0               /* +0   N */
avail_ring:     .quad   0               /* +8   */
used_ring:      .quad   0               /* +16  */
notify_addr:    .quad   0               /* +24  the queue's doorbell in the BAR */
notify_value:   .quad   0               /* +32  */
wait_port:      .quad   0               /* +40  0: spin; else the bench's wait port */
cmd_addr:       .quad   0               /* +48  the bench's command register */
headers:        .quad   0               /* +56  slot i's header at headers + 16 i */
statuses:       .quad   0               /* +64  slot i's status byte at statuses + i */
depth:          .quad   0               /* +72  per case: requests in flight */
pattern:        .quad   0               /* +80  0 sequential, 1 random */
spr:            .quad   0               /* +88  sectors per request */
limit:          .quad   0               /* +96  sequential: sectors in the image; random: blocks - 1 */
stop:           .quad   0               /* +104 set by the bench: drain and wait for a command */
completed:      .quad   0               /* +112 requests completed (all cases) */
errors:         .quad   0               /* +120 completions whose status was not OK */
notifies:       .quad   0               /* +128 doorbells rung */
waits:          .quad   0               /* +136 reads of the wait port */
glitches:       .quad   0               /* +144 used indexes that cannot be true */
rng:            .quad   0               /* +152 xorshift64 state (random) */
next_sector:    .quad   0               /* +160 sequential: the next request's sector */
cases:          .quad   0               /* +168 cases finished */
guest_poll:     .quad   0               /* +176 pause loops on the used index before a wait */

/* Registers in ring 3: r8 avail ring, r9 used ring, r10 notify address, r11 N,
 * r12 used index seen, ebx avail index, ebp in flight, r13 notify value,
 * r14 &avail_event, r15 &used_event. */
ring3:
        mov     queue_size(%rip), %r11
        mov     avail_ring(%rip), %r8
        mov     used_ring(%rip), %r9
        mov     notify_addr(%rip), %r10
        mov     notify_value(%rip), %r13
        lea     4(%r9,%r11,8), %r14     /* &avail_event: after used ring[N] */
        lea     4(%r8,%r11,2), %r15     /* &used_event: after avail ring[N] */
        xor     %ebx, %ebx
        xor     %r12d, %r12d
        xor     %ebp, %ebp

command:
        mov     cmd_addr(%rip), %rdx
        mov     (%rdx), %eax            /* the exit: blocks in the bench until a case */
        test    %eax, %eax
        jz      command

/* --- a case: depth requests, then refill every completion until `stop` ---------------- */
        mov     %ebx, %esi              /* old avail idx */
        xor     %edi, %edi              /* slot */
1:      mov     %edi, %eax
        shl     $2, %eax                /* head = 4 slot */
        call    offer
        inc     %edi
        cmp     depth(%rip), %rdi
        jb      1b
        call    publish

loop:
        READ16  2(%r9), %eax, %edx      /* used idx */
        mov     %eax, %ecx
        sub     %r12d, %ecx
        and     $0xffff, %ecx           /* completions since last look */
        jz      idle
        cmp     %ebp, %ecx
        ja      glitch                  /* more than in flight: a torn read */
        add     %rcx, completed(%rip)
        mov     %ebx, %esi              /* old avail idx */
2:      mov     %r12d, %edx
        inc     %r12d
        and     $0xffff, %r12d
        dec     %ebp
        mov     %r11d, %eax
        dec     %eax
        and     %eax, %edx
        mov     4(%r9,%rdx,8), %eax     /* used.ring[slot].id: the head */
        mov     %eax, %edx
        shr     $2, %edx
        add     statuses(%rip), %rdx
        cmpb    $0, (%rdx)
        je      3f
        incq    errors(%rip)
3:      cmpq    $0, stop(%rip)
        jne     4f
        call    offer                   /* the same slot again, next sector */
4:      dec     %ecx
        jnz     2b
        cmp     %esi, %ebx
        je      loop
        call    publish
        jmp     loop

idle:   cmpq    $0, stop(%rip)
        je      5f
        test    %ebp, %ebp
        jnz     5f
        incq    cases(%rip)             /* drained: wait for the next case */
        jmp     command
5:      cmpq    $0, wait_port(%rip)
        jne     6f
        pause
        jmp     loop
6:      mov     %r12w, (%r15)           /* used_event = seen: wake me at the next one */
        mfence                          /* used_event store before the used idx load */
        mov     guest_poll(%rip), %rcx  /* like Linux's haltpoll: look a while first */
7:      movzwl  2(%r9), %edx
        cmp     %r12d, %edx
        jne     loop                    /* it moved meanwhile */
        test    %rcx, %rcx
        jz      8f
        dec     %rcx
        pause
        jmp     7b
8:
        mov     wait_port(%rip), %rdx
        in      %dx, %eax               /* the exit: returns once the device interrupted */
        incq    waits(%rip)
        jmp     loop

glitch: incq    glitches(%rip)
        jmp     loop

/* offer: head %eax: its slot's header gets the next sector; avail.ring[avail] = head,
 * avail idx (%ebx, not yet published) + 1, in flight + 1. Keeps %ecx, %esi, %edi. */
offer:
        push    %rcx
        mov     %eax, %ecx
        shr     $2, %ecx
        shl     $4, %ecx
        add     headers(%rip), %rcx     /* &header[slot] */
        cmpq    $0, pattern(%rip)
        jne     1f
        mov     next_sector(%rip), %rdx /* sequential */
        mov     %rdx, 8(%rcx)
        add     spr(%rip), %rdx         /* the next request's sector */
        push    %rax
        mov     %rdx, %rax
        add     spr(%rip), %rax         /* and its end */
        cmp     limit(%rip), %rax
        pop     %rax
        jbe     2f
        xor     %edx, %edx              /* the next request would pass the end: wrap */
2:      mov     %rdx, next_sector(%rip)
        jmp     3f
1:      mov     rng(%rip), %rdx         /* random: xorshift64 */
        push    %rax
        mov     %rdx, %rax
        shl     $13, %rax
        xor     %rax, %rdx
        mov     %rdx, %rax
        shr     $7, %rax
        xor     %rax, %rdx
        mov     %rdx, %rax
        shl     $17, %rax
        xor     %rax, %rdx
        mov     %rdx, rng(%rip)
        and     limit(%rip), %rdx       /* block */
        imul    spr(%rip), %rdx
        mov     %rdx, 8(%rcx)
        pop     %rax
3:      mov     %r11d, %edx
        dec     %edx
        and     %ebx, %edx
        mov     %ax, 4(%r8,%rdx,2)      /* avail.ring[avail % N] = head */
        inc     %ebx
        and     $0xffff, %ebx
        inc     %ebp
        pop     %rcx
        ret

/* publish: avail idx := %ebx (old value %esi); ring the doorbell if the device
 * asked for it: vring_need_event(avail_event, new, old). Clobbers eax, ecx, edx, edi. */
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
        jae     1f
        mov     %r13w, (%r10)           /* doorbell: KVM signals the queue's eventfd */
        incq    notifies(%rip)
1:      ret

        .include "user_tables.inc"      /* GDT, page tables, user stack */
