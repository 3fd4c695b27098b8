"""pykvm: a userspace virtual machine monitor in Python on top of Linux KVM."""

from importlib import metadata as _metadata

try:
    # One version, pyproject.toml's, read from the installed package's metadata.
    __version__ = _metadata.version("pykvm")
except _metadata.PackageNotFoundError:     # a source tree on sys.path, never installed
    __version__ = "0+unknown"
