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
kernel-building code of kernel.py) and its own cache directory,
``kernel-<key>/``: a change to init.c, agent.c or the initramfs recipe rebuilds
only the initramfs (seconds), never the kernel. Details: README.md in this directory.

This module keys, locks and assembles; the steps are host.py (packages, commands),
kernel.py and initramfs.py, whose public names it re-exports.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from ..layout import KERNEL_LOAD_ADDR
# The steps, re-exported: pykvm.guestimage.build is where callers and tests find them.
from .host import (BUSYBOX_PACKAGE, PACKAGES, SOURCE_PACKAGE, BuildFailed,  # noqa: F401
                   ensure_packages, installed_versions, progress, run)
from .initramfs import AGENT_C, build_initramfs, compile_init, compile_static
from .kernel import (CUSTOM_SOURCE_PREFIX, FRAGMENT, KERNEL_FILES, custom_source,  # noqa: F401
                     kernel_key, kernel_or_build, source_tree)

HERE = Path(__file__).resolve().parent
# Every file whose content changes what comes out; package versions join them.
KEY_FILES = (FRAGMENT, HERE / "init.c", AGENT_C, Path(__file__).resolve(),
             HERE / "host.py", HERE / "kernel.py", HERE / "initramfs.py",
             HERE.parent / "boot" / "cpio.py")
LOCK_NAME = "linux.lock"           # serialises builds (and cleaning) of one cache
DEFAULT_LINK = "default-guest"     # -> the last linux-<key> built or found by a build


def cache_key(versions: dict[str, str]) -> str:
    digest = hashlib.sha256()
    for path in KEY_FILES:
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    for package in (SOURCE_PACKAGE, BUSYBOX_PACKAGE):
        digest.update(f"{package}={versions[package]}\0".encode())
    return digest.hexdigest()


def cache_root() -> Path:
    return Path(os.environ.get("PYKVM_CACHE") or Path.home() / ".cache" / "pykvm")


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
