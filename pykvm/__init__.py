"""pykvm: a userspace virtual machine monitor in Python on top of Linux KVM."""


def __getattr__(name: str) -> str:
    """``pykvm.__version__``: pyproject.toml's, read from the installed package's metadata
    on first use (importlib.metadata costs a run ~15 ms of start-up; bench/startup.py)."""
    if name != "__version__":
        raise AttributeError(f"module 'pykvm' has no attribute {name!r}")
    from importlib import metadata
    global __version__
    try:
        __version__ = metadata.version("pykvm")
    except metadata.PackageNotFoundError:     # a source tree on sys.path, never installed
        __version__ = "0+unknown"
    return __version__
