"""Build pykvm's default Linux guest: a small kernel made for VMs and a tiny initramfs.

``pykvm guest build`` runs this (``make guest`` in pykvm's repository runs the same
command). Its inputs ship in the package, next to this file: ``kernel.fragment``
(the kernel configuration over ``tinyconfig``), ``init.c`` (the guest's /init) and
``agent.c`` (pykvm-agent); the kernel source and busybox come from Debian 12's
``linux-source-6.1`` and ``busybox-static``, which a root user gets installed with
apt-get and anyone else is told to install. Nothing binary ships. The result lives
in a cache directory named after a key over every input:

    ${PYKVM_CACHE:-~/.cache/pykvm}/linux-<first 16 hex digits of the key>/
        bzImage  vmlinux  System.map  config  initramfs.cpio  manifest.json

When that directory exists the build is a no-op (about a second), and
pykvm.guestimage.cache finds it for ``pykvm run`` and the pytest plugin. The kernel
source is extracted once per linux-source version and built out of tree in one build
directory per version, so a changed fragment rebuilds incrementally.

The kernel has a key of its own (the fragment, the source version and the
kernel-building code of this file) and its own cache directory,
``kernel-<key>/``: a change to init.c, agent.c or the initramfs recipe rebuilds
only the initramfs (seconds), never the kernel. Details: README.md in this directory.
"""

from __future__ import annotations

import fcntl
import hashlib
import inspect
import json
import os
import shutil
import stat
import struct
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from ..boot import cpio
from ..errors import GuestBuildError
from ..layout import KERNEL_LOAD_ADDR

HERE = Path(__file__).resolve().parent
FRAGMENT = HERE / "kernel.fragment"
INIT_C = HERE / "init.c"
AGENT_C = HERE / "agent.c"         # pykvm-agent, the guest side of pykvm/agent.py
AGENT_PATH = "sbin/pykvm-agent"    # where the initramfs has it (init.c starts it)
# Every file whose content changes what comes out; package versions join them.
KEY_FILES = (FRAGMENT, INIT_C, AGENT_C, Path(__file__).resolve(),
             HERE.parent / "boot" / "cpio.py")
KERNEL_FILES = (("arch/x86/boot/bzImage", "bzImage"), ("vmlinux", "vmlinux"),
                ("System.map", "System.map"), (".config", "config"))

SOURCE_PACKAGE = "linux-source-6.1"
SOURCE_TARBALL = Path("/usr/src/linux-source-6.1.tar.xz")
BUSYBOX_PACKAGE = "busybox-static"
BUSYBOX = Path("/bin/busybox")
PACKAGES = (SOURCE_PACKAGE, BUSYBOX_PACKAGE, "bc", "bison", "flex", "libelf-dev", "libssl-dev",
            "cpio", "xz-utils", "gcc", "make", "libc6-dev")
# --kernel-source: the source's version in the key reads "custom-<digest>"
CUSTOM_SOURCE_PREFIX = "custom-"
LOCK_NAME = "linux.lock"           # serialises builds (and cleaning) of one cache
DEFAULT_LINK = "default-guest"     # -> the last linux-<key> built or found by a build
PROGRESS_EVERY = 30.0              # seconds between "still building" lines of a long step

# Fixed build stamps so that `uname -v` and the image bytes do not depend on when or where.
KERNEL_MAKE_ENV = {
    "ARCH": "x86_64",
    "KBUILD_BUILD_TIMESTAMP": "2024-01-01 00:00:00 UTC",
    "KBUILD_BUILD_USER": "pykvm",
    "KBUILD_BUILD_HOST": "pykvm",
    "KBUILD_BUILD_VERSION": "1",
}

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

_started = time.monotonic()


def progress(message: str) -> None:
    print(f"[guest {time.monotonic() - _started:6.1f}s] {message}", file=sys.stderr, flush=True)


class BuildFailed(GuestBuildError):
    """A step failed; the message says which and where its log is."""


def run(argv: list[str], *, cwd: Path | None = None, log: Path | None = None,
        env: dict[str, str] | None = None) -> str:
    """Run a command; its output goes to ``log`` (appended) or is returned. A step with a
    log (configuring, compiling the kernel) says every PROGRESS_EVERY seconds that it is
    still going and what it last did, so a build of minutes is never silent."""
    full_env = {**os.environ, **(env or {})}
    if log is None:
        try:
            done = subprocess.run(argv, cwd=cwd, env=full_env, capture_output=True, text=True)
        except FileNotFoundError:
            raise BuildFailed(f"{argv[0]} is not installed") from None
        if done.returncode != 0:
            raise BuildFailed(f"{' '.join(argv)} failed:\n{done.stderr.strip()}")
        return done.stdout
    with open(log, "a") as out:
        out.write(f"\n$ {' '.join(argv)}\n")
        out.flush()
        try:
            child = subprocess.Popen(argv, cwd=cwd, env=full_env, stdout=out,
                                     stderr=subprocess.STDOUT)
        except FileNotFoundError:
            raise BuildFailed(f"{argv[0]} is not installed") from None
        with child:
            while True:
                try:
                    child.wait(PROGRESS_EVERY)
                    break
                except subprocess.TimeoutExpired:
                    progress(f"  ... {_last_line(log)}")
    if child.returncode != 0:
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-30:])
        raise BuildFailed(f"{' '.join(argv)} failed (full log: {log}):\n{tail}")
    return ""


def _last_line(log: Path) -> str:
    """The last line a running step wrote to its log (read from the end: logs grow large)."""
    with open(log, "rb") as f:
        f.seek(max(0, f.seek(0, os.SEEK_END) - 4096))
        lines = f.read().decode(errors="replace").strip().splitlines()
    return lines[-1].strip() if lines else "(no output yet)"


# --- packages and the cache key ---------------------------------------------------------------

def installed_versions(packages: tuple[str, ...]) -> dict[str, str]:
    """Version of each installed package (missing ones are left out; none without dpkg)."""
    try:
        done = subprocess.run(["dpkg-query", "-W", "-f",
                               "${Package} ${db:Status-Abbrev} ${Version}\n", *packages],
                              capture_output=True, text=True)
    except FileNotFoundError:          # not a Debian system
        return {}
    versions = {}
    for line in done.stdout.splitlines():
        name, status, version = (line.split() + ["", "", ""])[:3]
        if status.startswith("ii"):
            versions[name.split(":")[0]] = version
    return versions


def ensure_packages(packages: tuple[str, ...] = PACKAGES) -> dict[str, str]:
    """The installed versions of ``packages``. Missing ones are installed with apt-get when
    pykvm runs as root (the Makefile's `deps` step); anyone else gets one line naming them,
    since a build cannot start without them."""
    versions = installed_versions(packages)
    missing = [p for p in packages if p not in versions]
    if not missing:
        return versions
    if shutil.which("dpkg-query") is None or shutil.which("apt-get") is None:
        raise GuestBuildError(
            f"building the default guest needs Debian 12 packages ({' '.join(packages)}); "
            f"elsewhere pass your own kernel: pykvm run --kernel PATH, pytest --pykvm-kernel PATH")
    if os.geteuid() != 0:
        raise GuestBuildError(f"building the default guest needs Debian packages: "
                              f"sudo apt-get install {' '.join(missing)}")
    progress(f"installing {' '.join(missing)} with apt-get")
    env = {"DEBIAN_FRONTEND": "noninteractive"}
    run(["apt-get", "update", "-qq"], env=env)
    run(["apt-get", "install", "-y", "-qq", *missing], env=env)
    return installed_versions(packages)


def cache_key(versions: dict[str, str]) -> str:
    digest = hashlib.sha256()
    for path in KEY_FILES:
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    for package in (SOURCE_PACKAGE, BUSYBOX_PACKAGE):
        digest.update(f"{package}={versions[package]}\0".encode())
    return digest.hexdigest()


def kernel_key(versions: dict[str, str]) -> str:
    """What the kernel alone depends on: the fragment, the source package's version and
    the code below that configures, builds and checks it (not init.c, agent.c or the
    initramfs code: changing those must not cost a kernel build)."""
    digest = hashlib.sha256(FRAGMENT.read_bytes() + b"\0")
    digest.update(f"{SOURCE_PACKAGE}={versions[SOURCE_PACKAGE]}\0".encode())
    digest.update(repr(sorted(KERNEL_MAKE_ENV.items())).encode() + repr(KERNEL_FILES).encode())
    for function in (source_tree, parse_config, missing_options, configure_kernel, build_kernel,
                     check_vmlinux, kernel_or_build):
        digest.update(inspect.getsource(function).encode())
    return digest.hexdigest()


def cache_root() -> Path:
    return Path(os.environ.get("PYKVM_CACHE") or Path.home() / ".cache" / "pykvm")


# --- the kernel -------------------------------------------------------------------------------

def source_tree(root: Path, version: str) -> Path:
    """Debian's kernel source, extracted once per package version."""
    tree = root / "src" / f"{SOURCE_PACKAGE}_{version}"
    if (tree / "Makefile").exists():
        return tree
    progress(f"extracting {SOURCE_TARBALL} (once per version, about a minute)")
    tree.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=tree.parent) as scratch:
        run(["tar", "-xf", str(SOURCE_TARBALL), "-C", scratch])
        (Path(scratch) / SOURCE_PACKAGE).rename(tree)
    return tree


def parse_config(text: str) -> dict[str, str]:
    """CONFIG_X -> value; '# CONFIG_X is not set' reads as 'n'."""
    values = {}
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("CONFIG_") and "=" in line:
            name, _, value = line.partition("=")
            values[name] = value
        elif line.startswith("# CONFIG_") and line.endswith(" is not set"):
            values[line[2:-len(" is not set")]] = "n"
    return values


def missing_options(fragment: str, config: str) -> list[str]:
    """Every fragment setting that the final .config does not have."""
    final = parse_config(config)
    return [f"{name}: wanted {wanted}, got {final.get(name, 'n (absent)')}"
            for name, wanted in parse_config(fragment).items()
            if final.get(name, "n") != wanted]


def configure_kernel(src: Path, build: Path, log: Path) -> None:
    progress("configuring: tinyconfig + kernel.fragment (allnoconfig merge)")
    make = ["make", "-C", str(src), f"O={build}"]
    run([*make, "tinyconfig"], log=log, env=KERNEL_MAKE_ENV)
    # -n: symbols neither tinyconfig nor the fragment name stay off, instead of
    # taking Kconfig defaults that would pull in drivers nobody asked for.
    run([str(src / "scripts/kconfig/merge_config.sh"), "-n", "-O", str(build),
         str(build / ".config"), str(FRAGMENT)], cwd=src, log=log, env=KERNEL_MAKE_ENV)
    run([*make, "olddefconfig"], log=log, env=KERNEL_MAKE_ENV)
    missing = missing_options(FRAGMENT.read_text(), (build / ".config").read_text())
    if missing:
        raise BuildFailed("kernel.fragment options lost in the final .config "
                          "(an unmet dependency?):\n  " + "\n  ".join(missing))


def build_kernel(src: Path, build: Path, log: Path) -> str:
    progress(f"building bzImage with make -j{os.cpu_count()} (about 3.5 min from scratch; "
             f"log: {log})")
    run(["make", "-C", str(src), f"O={build}", f"-j{os.cpu_count()}", "bzImage"],
        log=log, env=KERNEL_MAKE_ENV)
    return run(["make", "-s", "-C", str(src), f"O={build}", "kernelrelease"],
               env=KERNEL_MAKE_ENV).strip()


def check_vmlinux(path: Path) -> None:
    """An x86-64 ELF whose entry and first segment sit where pykvm loads a vmlinux."""
    with open(path, "rb") as f:
        header = f.read(64)
        if header[:4] != b"\x7fELF" or header[4] != 2:
            raise BuildFailed(f"{path} is not an ELF64 file")
        machine, = struct.unpack_from("<H", header, 18)
        entry, phoff = struct.unpack_from("<QQ", header, 24)
        phentsize, phnum = struct.unpack_from("<HH", header, 54)
        f.seek(phoff)
        table = f.read(phentsize * phnum)
    loads = [struct.unpack_from("<IIQQQ", table, i * phentsize)
             for i in range(phnum)]
    load_paddrs = [paddr for ptype, _, _, _, paddr in loads if ptype == 1]  # PT_LOAD
    if not load_paddrs:
        raise BuildFailed(f"{path} has no loadable segment")
    if machine != 62 or entry != KERNEL_LOAD_ADDR or min(load_paddrs) != KERNEL_LOAD_ADDR:
        raise BuildFailed(f"{path}: machine {machine}, entry {entry:#x}, first PT_LOAD at "
                          f"{min(load_paddrs):#x}; wanted x86-64 at {KERNEL_LOAD_ADDR:#x}")


def kernel_or_build(root: Path, versions: dict[str, str]) -> tuple[Path, str]:
    """The kernel cache directory for the current kernel key (built first if missing)
    and the kernel release. Holds bzImage, vmlinux, System.map, config, release."""
    kernel = root / f"kernel-{kernel_key(versions)[:16]}"
    if (kernel / "release").exists():
        progress(f"kernel cached in {kernel.name}: only the initramfs is built")
        return kernel, (kernel / "release").read_text().strip()
    source_version = versions[SOURCE_PACKAGE]
    src = source_tree(root, source_version)
    kernel_build = root / "build" / f"{SOURCE_PACKAGE}_{source_version}"
    kernel_build.mkdir(parents=True, exist_ok=True)
    log = kernel_build / "build.log"
    log.write_text("")
    configure_kernel(src, kernel_build, log)
    release = build_kernel(src, kernel_build, log)
    check_vmlinux(kernel_build / "vmlinux")
    with tempfile.TemporaryDirectory(dir=root, prefix=".kernel-") as scratch:
        staging = Path(scratch) / "kernel"
        staging.mkdir()
        for name, target in KERNEL_FILES:
            shutil.copyfile(kernel_build / name, staging / target)
        (staging / "release").write_text(release + "\n")
        staging.rename(kernel)
    return kernel, release


# --- the initramfs ---------------------------------------------------------------------------

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


# --- putting it together -------------------------------------------------------------------

def build(root: Path, key: str, versions: dict[str, str], result: Path) -> None:
    started = time.monotonic()
    kernel, release = kernel_or_build(root, versions)
    progress(f"kernel {release} ready; packing the initramfs")

    with tempfile.TemporaryDirectory(dir=root, prefix=".linux-") as scratch:
        staging = Path(scratch) / "out"
        staging.mkdir()
        for _, name in KERNEL_FILES:
            try:
                os.link(kernel / name, staging / name)   # no second copy of the same kernel
            except OSError:
                shutil.copyfile(kernel / name, staging / name)
        agent = compile_static(AGENT_C, Path(scratch) / "pykvm-agent")
        (staging / "initramfs.cpio").write_bytes(build_initramfs(compile_init(Path(scratch)),
                                                                 agent))
        manifest = {
            "kernel_release": release,
            "key": key,
            "kernel_key": kernel.name,
            "packages": {p: versions[p] for p in (SOURCE_PACKAGE, BUSYBOX_PACKAGE)},
            "files": {f.name: f.stat().st_size for f in sorted(staging.iterdir())},
            "vmlinux_entry": hex(KERNEL_LOAD_ADDR),
            "build_seconds": round(time.monotonic() - started, 1),
        }
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        staging.rename(result)


def custom_source(root: Path, source: Path) -> str:
    """Make ``--kernel-source`` (a Linux source tree, or a tarball of one) the tree that
    source_tree() finds, and return the version that stands for it in the keys:
    ``custom-`` and a digest of the tarball's bytes, or of a tree's path and top Makefile
    (a tree's other files are not read: after changing them, build with --force)."""
    source = source.expanduser().resolve()
    digest = hashlib.sha256()
    if source.is_dir():
        if not (source / "Makefile").is_file():
            raise GuestBuildError(f"{source}: not a Linux source tree (no Makefile)")
        digest.update(str(source).encode() + b"\0" + (source / "Makefile").read_bytes())
    elif source.is_file():
        with open(source, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    else:
        raise GuestBuildError(f"{source}: no such kernel source (a directory or a tarball)")
    version = CUSTOM_SOURCE_PREFIX + digest.hexdigest()[:16]
    tree = root / "src" / f"{SOURCE_PACKAGE}_{version}"
    if (tree / "Makefile").exists():
        return version
    tree.parent.mkdir(parents=True, exist_ok=True)
    if source.is_dir():
        tree.unlink(missing_ok=True)
        tree.symlink_to(source)         # built out of tree: the source is only read
        return version
    if not tarfile.is_tarfile(source):
        raise GuestBuildError(f"{source}: not a tar archive of a Linux source tree")
    progress(f"extracting {source}")
    with tempfile.TemporaryDirectory(dir=tree.parent) as scratch:
        run(["tar", "-xf", str(source), "-C", scratch])
        tops = [p for p in Path(scratch).iterdir() if (p / "Makefile").is_file()]
        if len(tops) != 1:
            raise GuestBuildError(f"{source}: wanted one top-level directory with a Makefile, "
                                  f"found {len(tops)}")
        tops[0].rename(tree)
    return version


def build_or_reuse(force: bool = False, kernel_source: Path | None = None) -> Path:
    """The cached result for the current inputs, built first if need be. ``force`` removes
    the cached result and its kernel first (the kernel then rebuilds incrementally)."""
    root = cache_root()
    if kernel_source is None:
        versions = ensure_packages()
    else:
        versions = ensure_packages(tuple(p for p in PACKAGES if p != SOURCE_PACKAGE))
    root.mkdir(parents=True, exist_ok=True)
    with open(root / LOCK_NAME, "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            progress(f"waiting for another build in {root} to finish")
            fcntl.flock(lock, fcntl.LOCK_EX)   # one build at a time per cache
        if kernel_source is not None:
            versions[SOURCE_PACKAGE] = custom_source(root, kernel_source)
        key = cache_key(versions)
        result = root / f"linux-{key[:16]}"
        if force:
            for stale in (result, root / f"kernel-{kernel_key(versions)[:16]}"):
                if stale.exists():
                    shutil.rmtree(stale)
        if (result / "manifest.json").exists():
            progress(f"cached in {result}")
        else:
            build(root, key, versions, result)
        point_default_at(root, result)
    return result


def point_default_at(root: Path, result: Path) -> None:
    """Make ``root/default-guest`` a symlink to ``result`` (replaced atomically): the build
    the lookup falls back to when the installed packages do not name it (a --kernel-source
    build, or a linux-source upgraded since)."""
    temporary = root / f".{DEFAULT_LINK}.{os.getpid()}"
    temporary.unlink(missing_ok=True)
    temporary.symlink_to(result.name)
    temporary.replace(root / DEFAULT_LINK)
