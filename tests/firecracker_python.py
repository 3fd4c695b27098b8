"""The `firecracker-python` client from PyPI in a virtualenv of its own, for
tests/kvm/test_firecracker_python.py: it pins its dependencies (pyroute2 0.8.1, requests,
docker...), which must not meet pykvm's own in .venv.

The venv lives in ``${PYKVM_CACHE:-~/.cache/pykvm}/firecracker-python-VERSION/`` and is
made once (under a lock, so parallel test workers wait for one another):
``python -m tests.firecracker_python`` makes it ahead of time and prints its python.
"""

from __future__ import annotations

import fcntl
import subprocess
import sys
import venv
from pathlib import Path

VERSION = "0.0.5"
PACKAGE = f"firecracker-python=={VERSION}"


class ClientUnavailable(Exception):
    """The client's venv could not be made (no package index reachable, ...)."""


def client_dir() -> Path:
    from pykvm.guestimage.build import cache_root
    return cache_root() / f"firecracker-python-{VERSION}"


def client_python() -> Path:
    """The venv's python, with firecracker-python installed (made if missing)."""
    directory = client_dir()
    python = directory / "venv" / "bin" / "python"
    stamp = directory / "installed"
    if stamp.exists():
        return python
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if stamp.exists():
            return python
        venv.EnvBuilder(with_pip=True, clear=True).create(directory / "venv")
        result = subprocess.run([str(python), "-m", "pip", "install", "-q",
                                 "--disable-pip-version-check", PACKAGE],
                                capture_output=True, text=True, timeout=900)
        if result.returncode != 0:
            tail = (result.stderr or result.stdout).strip().splitlines()[-1:]
            raise ClientUnavailable(f"pip install {PACKAGE} failed: {' '.join(tail)}")
        stamp.write_text(PACKAGE + "\n")
    return python


if __name__ == "__main__":
    try:
        print(client_python())
    except ClientUnavailable as error:
        sys.exit(str(error))
