"""``pykvm run --image FILE[,ro]``: what booting a root filesystem image adds to a run.

The image becomes the first virtio-blk disk, so the guest sees it as /dev/vda, and the
kernel command line gets ``root=/dev/vda`` (and ``ro`` for a read-only image). By
default the kernel and initramfs are pykvm's own guest's: its /init (init.c) reads the
command (``-- CMD``) from its initramfs, mounts /dev/vda as ext4, mounts /proc, /sys,
/dev, /tmp and /run in it, binds its agent in at /run/pykvm-agent when asked for one
(``--agent``), and chroots into the image to run the command, the agent or a shell. So a
Debian image needs nothing from pykvm inside it, and the exit status still reaches pykvm
through port 0xF4. With ``--image-kernel`` the image's own kernel and initramfs (copied
beside it by ``pykvm image debian --kernel``) boot instead: Debian's initramfs-tools
mounts root= and starts the image's own init; pykvm's protocol is not in that boot, so
``-- CMD`` and ``--agent`` are refused.
"""

from __future__ import annotations

import re

from ..errors import ConfigError
from .debian import beside

ROOT_DEVICE = "/dev/vda"        # the first virtio-blk disk (the image goes first)


def apply_image(args) -> None:
    """Turn --image / --image-kernel into the disk, command line and boot files they
    stand for (in place on the parsed ``pykvm run`` arguments)."""
    from ..devices.virtio import DiskSpec

    if not args.image:
        raise ConfigError("--image-kernel goes with --image FILE")
    if args.restore is not None:
        raise ConfigError("--image boots an image; a restored snapshot brings its own disks "
                          "(give the image again with --disk)")
    if args.rootfs:
        raise ConfigError("give one root: --image or --rootfs")
    spec = DiskSpec.parse(args.image)
    args.disk.insert(0, args.image)
    words = [f"root={ROOT_DEVICE}", "ro" if spec.read_only else "rw"]
    if args.image_kernel:
        if args.kernel or args.initrd:
            raise ConfigError("--image-kernel boots the image's kernel: drop --kernel/--initrd")
        if args.command_args is not None or args.agent:
            raise ConfigError("-- CMD and --agent need pykvm's /init: drop --image-kernel")
        from pathlib import Path

        kernel, initrd = beside(Path(spec.path))
        for path in (kernel, initrd):
            if not path.is_file():
                raise ConfigError(f"--image-kernel: no {path} (build the image with "
                                  f"`pykvm image debian --kernel`)")
        args.kernel, args.initrd = kernel, initrd
    args.append = " ".join(words + ([args.append] if args.append else []))


def systemd_run_words(command: str) -> str:
    """Kernel command-line words that have systemd, an image's own init, run ``command``
    as the goal of the boot and power the guest off once it ends (systemd-run-generator(8):
    ``systemd.run=`` becomes kernel-command-line.service, a one-shot unit the boot goes
    to), with the journal, and so the command's output, forwarded to the console
    (journald's ``forward_to_console``). How bench/debian_systemd.py asks a booted Debian
    `systemctl is-system-running` when no pykvm code runs in the guest."""
    if '"' in command or not command.strip():
        raise ConfigError("a command for systemd.run= must be non-empty and hold no '\"' "
                          "(the kernel command line has no escape for it)")
    return (f'systemd.run="{command}" systemd.run_success_action=poweroff '
            "systemd.run_failure_action=poweroff systemd.journald.forward_to_console=1")


SYSTEM_STATE_QUESTION = "/usr/bin/systemctl is-system-running"

# systemctl(1), is-system-running: the states it prints. "offline" means systemd is not
# the running init (a boot that never reached it); every other state is an answer from a
# running systemd. On the console the answer comes through the journal as
# "systemctl[PID]: STATE" (systemd_run_words forwards the journal there).
SYSTEM_STATES = ("initializing", "starting", "running", "degraded", "maintenance",
                 "stopping", "offline")
_SYSTEM_STATE_LINE = re.compile(r"systemctl\[\d+\]: (" + "|".join(SYSTEM_STATES) + r")\b")


def system_state_answer(console: str) -> str | None:
    """The state `systemctl is-system-running` printed on the console (a line or a whole
    log), asked with ``systemd_run_words(SYSTEM_STATE_QUESTION)``; None before it answered.
    bench/debian_systemd.py times the answer and the slow Debian test checks it."""
    found = _SYSTEM_STATE_LINE.search(console)
    return found.group(1) if found else None
