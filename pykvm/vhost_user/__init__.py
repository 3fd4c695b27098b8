"""vhost-user: virtio queues served by another process (QEMU docs/interop/vhost-user.rst).

protocol.py is the message codec, frontend.py the connection and the message
sequence a virtio transport drives, daemon.py starts, supervises and stops the
back-end daemons pykvm runs itself (virtiofsd, qemu-storage-daemon).
The devices on top: virtio-fs (pykvm/devices/virtio/fs.py) and virtio-blk
(pykvm/devices/virtio/vhost_blk.py).
"""
