"""``--share DIR``: a host directory shown to the guest, in one of two ways.

**Live (the default): virtio-fs.** ``--share DIR[,ro][,tag=T]`` starts a
virtiofsd for DIR (pykvm/vhost_user/daemon.py) and attaches a virtio-fs device
(pykvm/devices/virtio/fs.py); the default guest's /init mounts share ``i`` at
``/mnt/share`` (``/mnt/share1``, ...) as told by ``pykvm.virtiofs=`` on the kernel
command line (:func:`virtiofs_cmdline`). What the guest writes is on the host at
once and the other way round; ``ro`` makes the daemon's view read-only.
``--vhost-user-fs SOCKET,tag=T`` attaches a virtiofsd the user started.

**A copy: ``--share DIR,copy``** (also what you get, with one line saying so,
when virtiofsd is not installed). ``mke2fs -t ext2 -d DIR`` (e2fsprogs) writes
an ext2 image of the directory into a temporary file when the machine is built,
and the image is attached as a read-only virtio-blk disk whose serial is
``pykvm-share`` (``pykvm-share1``, ...). The guest agent (pykvm/guestimage/agent.c)
mounts each such disk read-only at ``/mnt/share`` (``/mnt/share1``, ...). Changes
on the host after the machine started are not seen. The copy is kept because it
can be snapshotted: a live share's state lives in virtiofsd, so a VM with one
refuses ``pykvm snapshot``, while the pytest plugin's snapshotted ``linux_vm``
(pykvm/pytest_plugin/) uses copies.

Images are byte-for-byte reproducible for the same directory content (fixed
UUID, hash seed and file-system times), so a machine restored from a snapshot
gets the very image the snapshot's guest has mounted, as long as the directory
has not changed meanwhile.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from .errors import ConfigError

SERIAL_PREFIX = "pykvm-share"
FS_UUID = "6b1ab6c7-9f2a-4c55-8d3e-70796b766d31"
HASH_SEED = "6b1ab6c7-9f2a-4c55-8d3e-70796b766d32"
FAKE_TIME = "1704067200"           # 2024-01-01: the file system's own times
BLOCK = 4096
MIN_IMAGE = 4 << 20


def serial(index: int) -> str:
    return SERIAL_PREFIX if index == 0 else f"{SERIAL_PREFIX}{index}"


def mount_point(index: int) -> str:
    """Where the guest agent mounts share ``index``."""
    return "/mnt/" + serial(index)[len("pykvm-"):]


def image_size(directory: Path) -> tuple[int, int]:
    """(image bytes, inodes) for the tree at ``directory``, with room to spare."""
    data, count = 0, 1
    for root, dirs, files in os.walk(directory):
        for name in dirs + files:
            count += 1
            try:
                size = os.lstat(os.path.join(root, name)).st_size
            except OSError:
                continue
            data += -(-size // BLOCK) * BLOCK
    inodes = count + 64
    size = max(MIN_IMAGE, int(data * 1.2) + inodes * 512 + (2 << 20))
    return -(-size // BLOCK) * BLOCK, inodes


def build_image(directory, image) -> Path:
    """Write an ext2 image of ``directory`` to ``image``; returns its path."""
    directory, image = Path(directory), Path(image)
    if not directory.is_dir():
        raise ConfigError(f"--share {directory}: not a directory")
    mke2fs = shutil.which("mke2fs") or shutil.which("mkfs.ext2", path="/sbin:/usr/sbin")
    if mke2fs is None:
        raise ConfigError("--share needs mke2fs (apt-get install e2fsprogs)")
    size, inodes = image_size(directory)
    env = dict(os.environ, E2FSPROGS_FAKE_TIME=FAKE_TIME)
    for _ in range(4):
        with open(image, "wb") as out:
            out.truncate(size)
        done = subprocess.run(
            [mke2fs, "-q", "-F", "-t", "ext2", "-b", str(BLOCK), "-N", str(inodes), "-m", "0",
             "-L", "pykvm-share", "-U", FS_UUID, "-E", f"hash_seed={HASH_SEED}",
             "-d", str(directory), str(image)],
            env=env, capture_output=True, text=True)
        if done.returncode == 0:
            return image
        if "allocate" not in done.stderr and "space" not in done.stderr:
            break
        size *= 2                  # many small files or sparse ones: try a bigger image
    image.unlink(missing_ok=True)
    message = (done.stderr or done.stdout).strip().splitlines()
    raise ConfigError(f"--share {directory}: mke2fs failed: {message[-1] if message else '?'}")


def share_disks(directories, workdir):
    """A read-only DiskSpec per shared directory, its image built in ``workdir``."""
    from .devices.virtio import DiskSpec

    disks = []
    for index, directory in enumerate(directories):
        image = build_image(directory, Path(workdir) / f"share{index}.img")
        disks.append(DiskSpec(str(image), read_only=True, serial=serial(index)))
    return disks


def parse_shares(texts, *, warn=None) -> tuple[list[str], list]:
    """``--share`` arguments -> (directories to copy, FsSpec of live shares). Without
    virtiofsd every share is a copy; ``warn(line)`` is told once."""
    from .devices.virtio.fs import FsSpec
    from .vhost_user.daemon import virtiofsd_path

    copies, live = [], []
    have_daemon = virtiofsd_path() is not None
    for text in texts:
        path, *options = text.split(",")
        if "copy" in options or not have_daemon:
            if [o for o in options if o not in ("copy", "ro")]:
                raise ConfigError(f"--share {text!r}: a copy takes no other options "
                                  f"(use DIR,copy)")
            if not have_daemon and "copy" not in options and warn is not None:
                warn("pykvm: virtiofsd is not installed (apt-get install qemu-system-common): "
                     "--share makes a read-only copy instead of a live share")
                warn = None
            copies.append(str(Path(path).absolute()))
        else:
            spec = FsSpec.parse_share(text, len(copies) + len(live))
            live.append(FsSpec(spec.tag, source=str(Path(spec.source).absolute()),
                               read_only=spec.read_only))
    return copies, live


def virtiofs_cmdline(config) -> str:
    """``pykvm.virtiofs=NAME:TAG[:ro],...`` for the default guest's /init: live share
    ``i`` mounts at /mnt/NAME, numbered after the copies (which the agent mounts)."""
    entries = []
    for index, spec in enumerate(config.live_shares):
        name = mount_point(len(config.shares) + index)[len("/mnt/"):]
        entries.append(f"{name}:{spec.tag}" + (":ro" if spec.read_only else ""))
    return "pykvm.virtiofs=" + ",".join(entries)


ROOT_TAG = "pykvm-root"
CWD_TAG = "pykvm-cwd"


def rootfs_shares(config) -> list:
    """``--rootfs DIR``: DIR read-only as the guest's root and the working directory
    read-write at its own path (virtme-ng's model); the default guest's /init puts a
    tmpfs overlay over the root and runs the command there (pykvm/guestimage/init.c)."""
    from .devices.virtio.fs import FsSpec

    if not config.rootfs:
        return []
    shares = [FsSpec(ROOT_TAG, source=config.rootfs, read_only=True)]
    if config.workdir:
        shares.append(FsSpec(CWD_TAG, source=config.workdir))
    return shares


def rootfs_cmdline(config) -> str:
    if not config.rootfs:
        return ""
    words = [f"pykvm.rootfs={ROOT_TAG}"]
    if config.workdir:
        if any(c.isspace() for c in config.workdir) or len(config.workdir) > 1000:
            raise ConfigError(f"--rootfs: the working directory {config.workdir!r} cannot be "
                              f"shared (white space, or longer than 1000 characters)")
        words.append(f"pykvm.cwd={CWD_TAG}:{config.workdir}")
    return " ".join(words)
