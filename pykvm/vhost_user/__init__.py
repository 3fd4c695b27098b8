"""vhost-user: virtio queues served by another process (QEMU docs/interop/vhost-user.rst).

protocol.py is the message codec, frontend.py the connection and the message
sequence a virtio transport drives, daemon.py starts, supervises and stops the
back-end daemons pykvm runs itself (virtiofsd).
"""
