"""The default guest in the cache: which build is current, and removing the rest.

``pykvm run``, ``pykvm guest path`` and the pytest plugin find the guest here, in
``${PYKVM_CACHE:-~/.cache/pykvm}`` (build.py's layout). A build counts only if it was
made from the sources of *this* pykvm: its manifest's key must be the key build.py
computes now over the package's kernel.fragment, init.c, agent.c and builder (with the
package versions the manifest records). So an installed pykvm and a checkout of another
version can share one cache without booting each other's /init and agent, which speak
their own pykvm's protocol.

Lookup order: the build for the Debian packages installed now (what ``pykvm guest
build`` would make); else ``default-guest``, the last one a build made or found (a
``--kernel-source`` build, or one from before a linux-source upgrade).
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from . import build

WORK_AREAS = ("src", "build")                 # extracted sources and `make O=` trees
BUILD_PREFIXES = ("linux-", "kernel-", ".linux-", ".kernel-", f".{build.DEFAULT_LINK}.")


def _valid(result: Path) -> bool:
    """Whether ``result`` is a complete build of this pykvm's guest sources."""
    try:
        manifest = json.loads((result / "manifest.json").read_text())
        return manifest["key"] == build.cache_key(manifest["packages"])
    except (OSError, ValueError, KeyError, TypeError):
        return False


def find_guest(root: Path | None = None) -> Path | None:
    """The directory of the current default guest (vmlinux, initramfs.cpio, ...), or None
    when it is not built."""
    root = build.cache_root() if root is None else root
    candidates = []
    versions = build.installed_versions((build.SOURCE_PACKAGE, build.BUSYBOX_PACKAGE))
    if len(versions) == 2:
        candidates.append(root / f"linux-{build.cache_key(versions)[:16]}")
    link = root / build.DEFAULT_LINK
    if link.is_symlink():
        candidates.append(root / os.readlink(link))
    for result in candidates:
        # only a build named like one, directly in the cache (a link cannot lead elsewhere)
        if result.parent == root and result.name.startswith("linux-") and _valid(result):
            return result
    return None


@dataclass
class Cleaned:
    removed: list[str]        # names removed from the cache directory
    freed: int                # bytes
    kept: Path | None         # the current guest, when it was kept


def _size(path: Path) -> int:
    """Bytes under ``path`` (symlinks counted, never followed; hard links counted once)."""
    if path.is_symlink() or not path.is_dir():
        return path.lstat().st_size
    seen, total = set(), 0
    for top, dirs, files in os.walk(path):
        for name in dirs + files:
            st = os.lstat(os.path.join(top, name))
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_size
    return total


def clean(everything: bool = False, root: Path | None = None) -> Cleaned:
    """Remove the build work areas (the extracted kernel source and the object tree: over
    a GB) and every build but the current guest and its kernel; ``everything`` removes
    those too. The snapshots and anything else in the cache stay. Holds the build lock,
    so it never pulls a tree from under a running build."""
    root = build.cache_root() if root is None else root
    if not root.is_dir():
        return Cleaned([], 0, None)
    with open(root / build.LOCK_NAME, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        current = None if everything else find_guest(root)
        keep = set()
        if current is not None:
            keep.add(current.name)
            kernel = json.loads((current / "manifest.json").read_text()).get("kernel_key")
            if isinstance(kernel, str):
                keep.add(kernel)
        removed, freed = [], 0
        for entry in sorted(root.iterdir()):
            name = entry.name
            ours = name in WORK_AREAS or name.startswith(BUILD_PREFIXES)
            if not ours or name in keep:
                continue
            freed += _size(entry)
            if entry.is_symlink() or not entry.is_dir():
                entry.unlink()
            else:
                shutil.rmtree(entry)
            removed.append(name)
        link = root / build.DEFAULT_LINK
        if link.is_symlink() and os.readlink(link) not in keep:
            link.unlink()
            removed.append(link.name)
    return Cleaned(removed, freed, current)
