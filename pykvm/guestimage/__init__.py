"""pykvm's default Linux guest, shipped as sources: the kernel configuration fragment, the
guest's /init (init.c) and agent (agent.c), and the builder that turns them and Debian's
linux-source and busybox into a cached kernel and initramfs (build.py, over host.py,
kernel.py and initramfs.py; where the builds live and which is current: cache.py;
``pykvm guest``: cli.py; README.md has the rest).
"""
