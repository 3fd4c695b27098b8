"""What building the default guest needs from the host: Debian's packages, and
commands run with their output kept and their progress shown.

A step that writes a log (configuring, compiling the kernel) says every
PROGRESS_EVERY seconds what it last did, so a build of minutes is never silent;
a failed step is a BuildFailed naming the command and the tail of its log.
Missing packages are installed with apt-get only when pykvm runs as root; anyone
else gets one line naming them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from ..errors import GuestBuildError

SOURCE_PACKAGE = "linux-source-6.1"
BUSYBOX_PACKAGE = "busybox-static"
PACKAGES = (SOURCE_PACKAGE, BUSYBOX_PACKAGE, "bc", "bison", "flex", "libelf-dev", "libssl-dev",
            "cpio", "xz-utils", "gcc", "make", "libc6-dev")
PROGRESS_EVERY = 30.0              # seconds between "still building" lines of a long step

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
