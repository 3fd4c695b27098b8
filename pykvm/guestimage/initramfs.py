"""The default guest's initramfs: pykvm's /init (init.c) and pykvm-agent (agent.c),
compiled static, and Debian's static busybox with its applets, packed as a newc cpio
(pykvm/boot/cpio.py) and checked for what a boot cannot do without.
"""

from __future__ import annotations

import stat
from pathlib import Path

from ..boot import cpio
from .host import BuildFailed, run

HERE = Path(__file__).resolve().parent
INIT_C = HERE / "init.c"
AGENT_C = HERE / "agent.c"         # pykvm-agent, the guest side of pykvm/agent/
AGENT_PATH = "sbin/pykvm-agent"    # where the initramfs has it (init.c starts it)
BUSYBOX = Path("/bin/busybox")

# Mount points and the usual top-level directories of the initramfs.
INITRAMFS_DIRS = ("bin", "sbin", "usr/bin", "usr/sbin", "proc", "sys", "dev", "tmp", "run",
                  "mnt", "root", "etc", "var", "etc/udhcpc")
ETC_FILES = {
    "etc/passwd": "root:x:0:0:root:/root:/bin/sh\n",
    "etc/group": "root:x:0:\n",
}
# busybox udhcpc's hook (its default path in Debian's busybox), for the NICs init.c runs it on
# (pykvm.dhcp=): address with prefix, default route, resolv.conf. Each `ip` is a
# fork+exec (slow on kvm_pvm), so only bound/renew do anything: init.c has
# already brought the link up, and a fresh guest has nothing to deconfigure.
UDHCPC_SCRIPT = ("etc/udhcpc/default.script", """#!/bin/sh
case "$1" in
bound|renew)
    ip -4 addr flush dev "$interface"
    ip addr add "$ip/${mask:-24}" dev "$interface"
    for gateway in $router; do
        ip route replace default via "$gateway" dev "$interface" && break
    done
    : > /etc/resolv.conf
    [ -n "$domain" ] && echo "search $domain" >> /etc/resolv.conf
    for server in $dns; do echo "nameserver $server" >> /etc/resolv.conf; done
    ;;
esac
exit 0
""")
# What a bootable initramfs cannot do without.
INITRAMFS_MUST_HAVE = ("init", "bin/sh", "bin/busybox", "dev/console", AGENT_PATH)


def compile_static(source: Path, binary: Path) -> Path:
    run(["gcc", "-static", "-Os", "-s", "-Wall", "-Wextra", "-Werror", "-o", str(binary),
         str(source)])
    return binary


def compile_init(work: Path) -> Path:
    return compile_static(INIT_C, work / "init")


def busybox_applets() -> list[str]:
    """Where busybox's applets belong ("bin/ls", "usr/bin/awk", ...), minus its init."""
    listing = run([str(BUSYBOX), "--list-full"]).split()
    # /init is ours; busybox's own init and linuxrc would only confuse a reader
    return sorted(p for p in listing if p not in ("sbin/init", "linuxrc", "bin/busybox"))


def build_initramfs(init_binary: Path, agent_binary: Path) -> bytes:
    entries = [cpio.Entry(d, stat.S_IFDIR | 0o755) for d in INITRAMFS_DIRS]
    entries[INITRAMFS_DIRS.index("tmp")] = cpio.Entry("tmp", stat.S_IFDIR | 0o1777)
    # The kernel opens /dev/console for init before anything can mount devtmpfs.
    entries.append(cpio.Entry("dev/console", stat.S_IFCHR | 0o600, rdev_major=5, rdev_minor=1))
    entries.append(cpio.Entry("init", stat.S_IFREG | 0o755, init_binary.read_bytes()))
    entries.append(cpio.Entry("bin/busybox", stat.S_IFREG | 0o755, BUSYBOX.read_bytes()))
    entries.append(cpio.Entry(AGENT_PATH, stat.S_IFREG | 0o755, agent_binary.read_bytes()))
    entries += [cpio.Entry(path, stat.S_IFLNK | 0o777, b"/bin/busybox")
                for path in busybox_applets()]
    entries += [cpio.Entry(path, stat.S_IFREG | 0o644, text.encode())
                for path, text in ETC_FILES.items()]
    entries.append(cpio.Entry(UDHCPC_SCRIPT[0], stat.S_IFREG | 0o755, UDHCPC_SCRIPT[1].encode()))
    archive = cpio.build_archive(entries)
    names = {e.name for e in cpio.read_archive(archive)}
    lacking = [n for n in INITRAMFS_MUST_HAVE if n not in names]
    if lacking:
        raise BuildFailed(f"initramfs lacks {', '.join(lacking)}")
    return archive
