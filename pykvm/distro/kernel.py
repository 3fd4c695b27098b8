"""Debian's own kernel packages, fetched and unpacked into pykvm's cache.

Why: to boot the kernels users bring (issue #15) without installing them on the host:
``apt-get download`` fetches the ``linux-image-*`` package the flavour's metapackage
depends on (``linux-image-cloud-amd64`` -> ``linux-image-6.1.0-57-cloud-amd64``) from
the host's configured Debian archive, and ``dpkg -x`` unpacks it (boot/vmlinuz-*,
lib/modules/*) without running its maintainer scripts. Both are Debian's own tools
(apt-get(8), dpkg-deb(1)); nothing is installed, nothing needs root but the cache.

Where: ``${PYKVM_CACHE:-~/.cache/pykvm}/distro/kernels/<package>/``, made in a scratch
directory and renamed into place once complete, under a lock, so a second caller (or a
parallel test) waits and then finds it. A package name comes from apt, and is checked
against Debian Policy 5.6.1 before it becomes a path or an argument.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError, GuestBuildError

FLAVOURS = {"cloud": "linux-image-cloud-amd64", "generic": "linux-image-amd64"}
PACKAGE_NAME = re.compile(r"linux-image-[a-z0-9][a-z0-9+.-]+\Z")
APT_TIMEOUT = 600           # seconds for one apt-get/dpkg step (a 27-60 MB download)


@dataclass(frozen=True)
class DebianKernel:
    """An unpacked linux-image package."""

    package: str
    root: Path

    @property
    def release(self) -> str:
        """The kernel release, e.g. ``6.1.0-57-cloud-amd64`` (the package's suffix)."""
        return self.package.removeprefix("linux-image-")

    @property
    def vmlinuz(self) -> Path:
        return self.root / "boot" / f"vmlinuz-{self.release}"

    @property
    def modules(self) -> Path:
        return self.root / "lib" / "modules" / self.release


def cache_root() -> Path:
    base = os.environ.get("PYKVM_CACHE") or os.path.expanduser("~/.cache/pykvm")
    return Path(base) / "distro" / "kernels"


def _tool(command: list[str], what: str, cwd: Path | None = None) -> str:
    try:
        done = subprocess.run(command, cwd=cwd, capture_output=True, text=True,
                              timeout=APT_TIMEOUT, stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        raise ConfigError(f"{what}: {command[0]} not found (Debian's kernels are fetched "
                          f"with Debian's tools: apt-get, dpkg)") from None
    except subprocess.TimeoutExpired:
        raise GuestBuildError(f"{what}: {command[0]} took over {APT_TIMEOUT} s") from None
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no message"])[-1]
        raise GuestBuildError(f"{what}: {' '.join(command[:2])} failed: {last}")
    return done.stdout


def package_for(flavour: str) -> str:
    """The versioned linux-image package that ``flavour``'s metapackage depends on now."""
    if flavour not in FLAVOURS:
        raise ConfigError(f"unknown Debian kernel flavour {flavour!r} "
                          f"(one of: {', '.join(FLAVOURS)})")
    meta = FLAVOURS[flavour]
    text = _tool(["apt-cache", "depends", meta], f"the {meta} package")
    for line in text.splitlines():
        kind, _, name = line.strip().partition(": ")
        if kind == "Depends" and PACKAGE_NAME.match(name):
            return name
    raise GuestBuildError(f"{meta}: apt knows no linux-image package it depends on "
                          f"(run `apt-get update` once?)")


def fetch(flavour: str = "cloud", root: Path | None = None) -> DebianKernel:
    """Debian's ``flavour`` kernel, downloaded and unpacked once, from the cache after."""
    package = package_for(flavour)
    root = root or cache_root()
    root.mkdir(parents=True, exist_ok=True)
    target = root / package
    lock_fd = os.open(root / f".{package}.lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX)
        if not (target / "boot").is_dir():
            scratch = Path(tempfile.mkdtemp(prefix=f".{package}.", dir=root))
            try:
                _tool(["apt-get", "download", package], f"downloading {package}", cwd=scratch)
                debs = sorted(scratch.glob(f"{package}_*.deb"))
                if len(debs) != 1:
                    raise GuestBuildError(f"apt-get download {package} left no single .deb")
                tree = scratch / "tree"
                _tool(["dpkg-deb", "-x", str(debs[0]), str(tree)], f"unpacking {package}")
                shutil.rmtree(target, ignore_errors=True)
                tree.rename(target)
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
    finally:
        os.close(lock_fd)
    kernel = DebianKernel(package, target)
    if not kernel.vmlinuz.is_file():
        raise GuestBuildError(f"{package}: no {kernel.vmlinuz} in the package")
    return kernel
